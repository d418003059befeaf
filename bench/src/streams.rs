//! Many concurrent streams over many devices: `streams` paced generate requests at once,
//! spread evenly over `devices` real daemons ([`daemons`](crate::daemons)) of
//! `devices / 10` users, through a relay process, all forwarding to one fake backend.
//!
//! Figures: lines per second over all streams (from sending the requests to the last line),
//! and the 99th percentile and the largest gap between consecutive lines of a stream — the
//! backend produces them `delay` apart, so whatever exceeds that is queueing in cloudllm or
//! on this machine.

use std::time::Duration;

use anyhow::Context;
use tokio::task::JoinSet;
use tokio::time::{Instant, timeout};
use tokio_util::sync::CancellationToken;

use crate::client::{self, STEP, Target};
use crate::daemons::{self, Daemon};
use crate::figures::{Figure, Figures};
use crate::relay_host::{self, RelayHost};
use crate::scratch::Scratch;
use crate::stack::Handles;

/// Devices per user, as in the idle scenario.
const DEVICES_PER_USER: usize = 10;

/// How long the daemons get to register: 60 s for a hundred daemons on a busy machine.
const REGISTER_TIMEOUT: Duration = Duration::from_secs(60);

/// How the run is shaped.
#[derive(Debug, Clone, Copy)]
pub struct Options {
    /// Streams at once.
    pub streams: usize,
    /// Devices (daemons) they are spread over.
    pub devices: usize,
    /// Lines per stream.
    pub lines: usize,
    /// Pause the backend makes between lines.
    pub delay: Duration,
}

/// Runs the scenario, adding its figures.
pub async fn run(
    options: &Options,
    handles: &Handles,
    figures: &mut Figures,
) -> anyhow::Result<()> {
    anyhow::ensure!(
        options.streams > 0 && options.devices > 0 && options.lines >= 2,
        "streams, devices and lines (≥ 2) must be set"
    );
    let relay = RelayHost::spawn(&relay_host::relay_binary()?, relay_host::SESSION_IDLE).await?;
    let backend_stop = CancellationToken::new();
    let backend = timeout(
        STEP,
        handles
            .backend
            .spawn(crate::backend::serve(backend_stop.clone())),
    )
    .await
    .context("fake backend start timed out")?
    .context("fake backend task")??;
    let keys = relay_host::keys();
    let scratch = Scratch::create("streams")?;
    let mut fleet = Vec::with_capacity(options.devices);
    let mut targets = Vec::with_capacity(options.devices);
    for i in 0..options.devices {
        let user = format!("streams-user-{}", i / DEVICES_PER_USER);
        let spec = daemons::Spec {
            name: format!("streams-dev-{i}"),
            relay: relay.url(),
            backend,
            token: relay_host::agent_token(&keys, &user)?,
        };
        let target = Target::through(relay.addr, &relay_host::client_token(&keys, &user)?)?
            .with_device(&spec.name)?;
        fleet.push(Daemon::start(spec, &scratch.0, &handles.daemon)?);
        targets.push(target);
    }
    let outcome = async {
        relay
            .wait_devices(
                options.devices as u64,
                Duration::from_millis(50),
                REGISTER_TIMEOUT,
            )
            .await?;
        measure(options, &targets, figures).await
    }
    .await;
    for daemon in &mut fleet {
        if let Err(err) = daemon.stop().await {
            tracing::warn!(error = format!("{err:#}"), "stopping a daemon");
        }
    }
    backend_stop.cancel();
    relay.stop().await?;
    outcome
}

async fn measure(
    options: &Options,
    targets: &[Target],
    figures: &mut Figures,
) -> anyhow::Result<()> {
    // Every connection is opened and warmed before the clock starts.
    let mut opening = JoinSet::new();
    for i in 0..options.streams {
        let target = targets[i % targets.len()].clone();
        opening.spawn(async move {
            let mut conn = target.connect().await?;
            conn.version().await?;
            Ok::<_, anyhow::Error>(conn)
        });
    }
    let mut conns = Vec::with_capacity(options.streams);
    while let Some(joined) = timeout(STEP * 3, opening.join_next())
        .await
        .context("opening connections timed out")?
    {
        conns.push(joined.context("opening task")??);
    }

    let body = serde_json::json!({
        "model": "bench",
        "prompt": "bench",
        "stream": true,
        "lines": options.lines,
        "delay_ms": options.delay.as_millis(),
    });
    let start = Instant::now();
    let mut running = JoinSet::new();
    for mut conn in conns {
        let body = body.clone();
        let delay = options.delay;
        running.spawn(async move {
            let response = conn.start("/api/generate", &body, None).await?;
            client::read_lines(response, STEP + delay, |_| Ok(())).await
        });
    }
    let limit = options.delay * options.lines as u32 + STEP * 3;
    let (mut gaps, mut lines, mut failed, mut end) = (Vec::new(), 0usize, 0usize, start);
    while let Some(joined) = timeout(limit, running.join_next())
        .await
        .context("streams still running")?
    {
        match joined.context("stream task")? {
            Ok(arrivals) if arrivals.len() == options.lines => {
                lines += arrivals.len();
                end = end.max(*arrivals.last().unwrap_or(&start));
                gaps.extend(arrivals.windows(2).map(|w| w[1].duration_since(w[0])));
            }
            Ok(_) | Err(_) => failed += 1,
        }
    }
    gaps.sort_unstable();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let scenario = format!(
        "{} streams over {} devices",
        options.streams, options.devices
    );
    let p = |q: f64| {
        gaps.get(((gaps.len().saturating_sub(1)) as f64 * q).round() as usize)
            .copied()
            .unwrap_or_default()
    };
    figures.figures.extend([
        Figure::info(
            &scenario,
            "lines/s over all streams",
            lines as f64 / end.duration_since(start).as_secs_f64().max(1e-9),
            "lines/s",
        ),
        Figure::info(
            &scenario,
            format!(
                "inter-line gap p50 (backend: {} ms)",
                options.delay.as_millis()
            ),
            ms(p(0.5)),
            "ms",
        ),
        Figure::info(&scenario, "inter-line gap p99", ms(p(0.99)), "ms"),
        Figure::info(&scenario, "inter-line gap max", ms(p(1.0)), "ms"),
        Figure::info(&scenario, "streams failed", failed as f64, "streams")
            .goal(crate::figures::Goal::AtMost(0.0)),
    ]);
    figures.setup.push(format!(
        "{scenario}: real daemons in the benchmark process, relay process, one fake backend; \
         each stream {} lines {} ms apart on its own HTTP/1 connection",
        options.lines,
        options.delay.as_millis()
    ));
    Ok(())
}
