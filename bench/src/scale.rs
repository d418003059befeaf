//! `cloudllm-bench scale`, the relay with many devices: memory per idle tunnel, and how quickly
//! a crashed relay gets every device back.
//!
//! The relay runs as its own process (the release `cloudllm-relay` next to the benchmark), so
//! its `VmRSS` is its own. The devices are a [fleet](crate::fleet) of real tunnels in this
//! process, dialled in bounded batches. Afterwards, [`streams`](crate::streams) measures many
//! concurrent streams through real daemons.
//!
//! - Idle tunnels: the relay's RSS before and after `N` tunnels are registered (its
//!   `/metrics` gauge `cloudllm_devices_connected` says when), divided by `N`; then again
//!   with one request put through every tunnel (each opens an HTTP/2 session), and once more
//!   after every session has closed for idleness (`cloudllm_tunnel_sessions_open` back at 0).
//! - Reconnect storm: with the storm's count connected, the relay is killed (SIGKILL, a crash)
//!   and started again on the same port; then stopped gracefully (SIGTERM: it drains every
//!   tunnel, and daemons redial at once into a relay that is gone) and started again. The
//!   figure is the time from the signal until the gauge is back at `N`, plus how the
//!   arrivals spread (full jitter at work) and what the new relay spent on them.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::task::JoinSet;
use tokio::time::{Instant, timeout};
use tokio_util::sync::CancellationToken;

use crate::figures::{Figure, Figures, Goal};
use crate::fleet::{self, Stats};
use crate::relay_host::{self, RelayHost, Restart};

/// Devices per user: ten, a busy household or a small team on one account. Keeps each
/// user's device list (which the relay scans on connect) realistic.
const DEVICES_PER_USER: usize = 10;

/// Tunnels dialled at once: 250 keeps the relay's accept queue and the handshake timeouts far
/// from their limits while 10,000 devices still connect within a minute.
const BATCH: usize = 250;

/// How long one batch may take to register: 60 s, far above the sub-second it takes.
const BATCH_TIMEOUT: Duration = Duration::from_secs(60);

/// Pause before reading the relay's memory, so that freed buffers and the allocator settle.
pub(crate) const SETTLE: Duration = Duration::from_secs(2);

/// How often the storm polls the relay's gauge: 50 ms, fine enough for a figure in seconds.
const STORM_POLL: Duration = Duration::from_millis(50);

/// Longest a storm may take before it is reported as failed: 120 s, four times the reconnect
/// cap.
const STORM_LIMIT: Duration = Duration::from_secs(120);

/// Target memory per idle tunnel on the relay.
const TARGET_KIB_PER_TUNNEL: f64 = 24.0;

/// Target time for every device to be back after a relay restart.
const TARGET_STORM_SECS: f64 = 10.0;

/// How the scale run is shaped.
#[derive(Debug, Clone)]
pub struct Options {
    /// Idle tunnel counts to measure, in order (`1000,10000`).
    pub tunnels: Vec<usize>,
    /// Devices connected during the reconnect storm; 0 skips it.
    pub storm: usize,
    /// How long the tunnels stay connected for a second memory reading; zero skips it.
    pub idle_for: Duration,
}

/// Runs the idle-tunnel and storm scenarios against a relay process started from `relay`.
/// Call it on a runtime; the fleet runs on the caller's runtime.
pub async fn idle_and_storm(
    options: &Options,
    relay: &std::path::Path,
    figures: &mut Figures,
) -> anyhow::Result<()> {
    figures.setup.push(format!(
        "idle tunnels: relay = `cloudllm-relay serve` process; devices = fleet tunnels \
         (WebSocket, hello, sessions on demand) in the benchmark process, {DEVICES_PER_USER} per \
         user, dialled {BATCH} at a time; RSS = relay VmRSS after minus before, {SETTLE:?} after \
         the last registered"
    ));
    let mut storm_done = options.storm == 0;
    for &count in &options.tunnels {
        crate::progress(&format!("{count} idle tunnels"));
        let with_storm = !storm_done && count == options.storm;
        match idle(count, with_storm, options.idle_for, relay, figures).await {
            Ok(()) => storm_done |= with_storm,
            Err(err) => {
                figures
                    .notes
                    .push(format!("{count} idle tunnels did not complete: {err:#}"));
                // A larger count fails the same way, only slower.
                break;
            }
        }
    }
    if !storm_done {
        crate::progress(&format!("reconnect storm with {}", options.storm));
        if let Err(err) = idle(options.storm, true, Duration::ZERO, relay, figures).await {
            figures
                .notes
                .push(format!("reconnect storm did not complete: {err:#}"));
        }
    }
    Ok(())
}

/// Puts one request through every one of the `count` tunnels (each opens an HTTP/2 session),
/// records the relay's memory per tunnel with the sessions open, waits until every session
/// has closed for idleness and the relay has given the freed memory back, and records the
/// memory per idle tunnel again.
async fn used_then_idle(
    relay: &RelayHost,
    count: usize,
    before: u64,
    scenario: &str,
    figures: &mut Figures,
) -> anyhow::Result<()> {
    crate::progress(&format!("a request through each of {count} tunnels"));
    let keys = relay_host::keys();
    let tokens: Vec<String> = (0..count.div_ceil(DEVICES_PER_USER))
        .map(|user| relay_host::client_token(&keys, &format!("scale-user-{user}")))
        .collect::<anyhow::Result<_>>()?;
    let mut served = 0;
    for batch in (0..count).collect::<Vec<_>>().chunks(BATCH) {
        let requests = batch.iter().map(|&i| {
            let token = &tokens[i / DEVICES_PER_USER];
            let device = format!("scale-device-{i}");
            async move { relay.get_as(token, &device, "/api/version").await }
        });
        for answer in futures_util::future::join_all(requests).await {
            let body = answer.context("a request through a fleet tunnel")?;
            anyhow::ensure!(body.contains("bench-fleet"), "unexpected answer {body:?}");
            served += 1;
        }
    }
    let open = relay.sessions_open().await?;
    tokio::time::sleep(SETTLE).await;
    let busy = relay.rss_kib().context("reading the relay's VmRSS")?;
    let deadline = Instant::now() + relay_host::SESSION_IDLE * 2 + BATCH_TIMEOUT;
    loop {
        if relay.sessions_open().await? == 0 {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "sessions still open long after session_idle"
        );
        tokio::time::sleep(STORM_POLL).await;
    }
    let connected = relay.devices_connected().await?;
    anyhow::ensure!(
        connected == count as u64,
        "{connected} of {count} tunnels still registered after their sessions closed"
    );
    // The relay gives freed memory back within one trim interval.
    tokio::time::sleep(cloudllm_relay::memory::TRIM_INTERVAL + SETTLE).await;
    let idle_again = relay.rss_kib().context("reading the relay's VmRSS")?;
    let per_tunnel = |rss: u64| rss.saturating_sub(before) as f64 / count as f64;
    figures.figures.extend([
        Figure::info(
            scenario,
            "requests served, one per tunnel",
            served as f64,
            "",
        ),
        Figure::info(
            scenario,
            format!("relay RSS per tunnel with its session open ({open} open)"),
            per_tunnel(busy),
            "KiB",
        ),
        Figure::info(
            scenario,
            format!(
                "relay RSS per idle tunnel after its session closed (session_idle {})",
                humantime::format_duration(relay_host::SESSION_IDLE)
            ),
            per_tunnel(idle_again),
            "KiB",
        )
        .goal(Goal::AtMost(TARGET_KIB_PER_TUNNEL)),
    ]);
    Ok(())
}

/// Connects `count` fleet devices to a fresh relay process, records the relay's memory per
/// tunnel (again after `idle_for`, unless zero), and with `storm`, crashes and restarts the
/// relay and times the return.
async fn idle(
    count: usize,
    storm: bool,
    idle_for: Duration,
    binary: &std::path::Path,
    figures: &mut Figures,
) -> anyhow::Result<()> {
    let mut relay = RelayHost::spawn(binary, relay_host::SESSION_IDLE).await?;
    tokio::time::sleep(SETTLE).await;
    let before = relay.rss_kib().context("reading the relay's VmRSS")?;
    let stats = Arc::new(Stats::default());
    let stop = CancellationToken::new();
    let mut devices = JoinSet::new();
    let started = Instant::now();
    dial_idle(&[relay.addr], count, &stats, &stop, &mut devices).await?;
    let connect_time = started.elapsed();
    relay
        .wait_devices(count as u64, STORM_POLL, BATCH_TIMEOUT)
        .await?;
    tokio::time::sleep(SETTLE).await;
    let after = relay.rss_kib().context("reading the relay's VmRSS")?;
    let scenario = format!("idle tunnels ×{count}");
    let per_tunnel = after.saturating_sub(before) as f64 / count as f64;
    figures.figures.extend([
        Figure::info(&scenario, "relay RSS before", before as f64 / 1024.0, "MiB"),
        Figure::info(
            &scenario,
            "relay RSS with all connected",
            after as f64 / 1024.0,
            "MiB",
        ),
        Figure::info(&scenario, "relay RSS per idle tunnel", per_tunnel, "KiB")
            .goal(Goal::AtMost(TARGET_KIB_PER_TUNNEL)),
        Figure::info(
            &scenario,
            "time to connect all (batches of 250)",
            connect_time.as_secs_f64(),
            "s",
        ),
    ]);
    if !idle_for.is_zero() {
        crate::progress(&format!("{count} tunnels idle for {idle_for:?}"));
        tokio::time::sleep(idle_for).await;
        let connected = relay.devices_connected().await?;
        anyhow::ensure!(
            connected == count as u64,
            "{connected} of {count} tunnels still registered after {idle_for:?}"
        );
        let later = relay.rss_kib().context("reading the relay's VmRSS")?;
        let per_tunnel = later.saturating_sub(before) as f64 / count as f64;
        figures.figures.push(
            Figure::info(
                &scenario,
                format!(
                    "relay RSS per tunnel after {}",
                    humantime::format_duration(idle_for)
                ),
                per_tunnel,
                "KiB",
            )
            .goal(Goal::AtMost(TARGET_KIB_PER_TUNNEL)),
        );
    }

    used_then_idle(&relay, count, before, &scenario, figures).await?;

    if storm {
        crate::progress(&format!("reconnect storm with {count} devices"));
        for how in [Restart::Crash, Restart::Graceful] {
            storm_run(&mut relay, how, count, &stats, figures).await?;
        }
    }

    stop.cancel();
    let drained = timeout(Duration::from_secs(30), async {
        while devices.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        devices.abort_all();
    }
    relay.stop().await?;
    Ok(())
}

/// Dials `count` idle fleet devices, [`DEVICES_PER_USER`] per user, the users spread over
/// `relays` in turn (user `u` on `relays[u % len]`), in batches of [`BATCH`], and returns once
/// each has registered. The devices run on `devices` until `stop`.
pub(crate) async fn dial_idle(
    relays: &[std::net::SocketAddr],
    count: usize,
    stats: &Arc<Stats>,
    stop: &CancellationToken,
    devices: &mut JoinSet<()>,
) -> anyhow::Result<()> {
    anyhow::ensure!(!relays.is_empty(), "no relay to dial");
    let keys = relay_host::keys();
    let mut token = String::new();
    for i in 0..count {
        let user = i / DEVICES_PER_USER;
        if i % DEVICES_PER_USER == 0 {
            token = relay_host::agent_token(&keys, &format!("scale-user-{user}"))?;
        }
        let device = fleet::Device {
            relay: relays[user % relays.len()],
            token: token.clone(),
            id: format!("scale-device-{i}"),
        };
        devices.spawn(fleet::run(device, stats.clone(), stop.clone()));
        if (i + 1) % BATCH == 0 || i + 1 == count {
            wait_registered(stats, i as u64 + 1).await?;
        }
    }
    Ok(())
}

/// How many of [`dial_idle`]'s `count` devices land on relay `index` of `relays`.
pub(crate) fn dialled_to(relays: usize, index: usize, count: usize) -> usize {
    (0..count)
        .filter(|i| (i / DEVICES_PER_USER) % relays == index)
        .count()
}

async fn wait_registered(stats: &Stats, count: u64) -> anyhow::Result<()> {
    let deadline = Instant::now() + BATCH_TIMEOUT;
    while Stats::get(&stats.registered) < count {
        anyhow::ensure!(
            Instant::now() < deadline,
            "{} of {count} tunnels registered after {BATCH_TIMEOUT:?} ({} dials refused, {} unreachable)",
            Stats::get(&stats.registered),
            Stats::get(&stats.refused),
            Stats::get(&stats.unreachable),
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(())
}

/// Kills and restarts the relay with `count` devices connected and times their return.
async fn storm_run(
    relay: &mut RelayHost,
    how: Restart,
    count: usize,
    stats: &Stats,
    figures: &mut Figures,
) -> anyhow::Result<()> {
    let target = count as u64;
    let (dials, refused) = (Stats::get(&stats.dials), Stats::get(&stats.refused));
    let signalled = Instant::now();
    relay.restart(how).await?;
    let listening = signalled.elapsed();
    let (mut half, mut ninety) = (None, None);
    let back = loop {
        let seen = relay.devices_connected().await.unwrap_or(0);
        if half.is_none() && seen * 2 >= target {
            half = Some(signalled.elapsed());
        }
        if ninety.is_none() && seen * 10 >= target * 9 {
            ninety = Some(signalled.elapsed());
        }
        if seen >= target {
            break signalled.elapsed();
        }
        anyhow::ensure!(
            signalled.elapsed() < STORM_LIMIT,
            "{seen} of {count} devices back {STORM_LIMIT:?} after the relay restart"
        );
        tokio::time::sleep(STORM_POLL).await;
    };
    let cpu = relay.cpu_seconds();
    let rss = relay.rss_kib();
    let scenario = match how {
        Restart::Crash => format!("reconnect storm ×{count}, relay killed"),
        Restart::Graceful => format!("reconnect storm ×{count}, relay SIGTERM"),
    };
    let secs = |d: Option<Duration>| d.unwrap_or(back).as_secs_f64();
    figures.figures.extend([
        Figure::info(
            &scenario,
            "relay listening again after the signal",
            listening.as_secs_f64(),
            "s",
        ),
        Figure::info(&scenario, "50% of devices back", secs(half), "s"),
        Figure::info(&scenario, "90% of devices back", secs(ninety), "s"),
        Figure::info(&scenario, "all devices back", back.as_secs_f64(), "s")
            .goal(Goal::AtMost(TARGET_STORM_SECS)),
        Figure::info(
            &scenario,
            "dial attempts per device",
            (Stats::get(&stats.dials) - dials) as f64 / count as f64,
            "dials",
        ),
        Figure::info(
            &scenario,
            "dials refused by the relay (HTTP error)",
            (Stats::get(&stats.refused) - refused) as f64,
            "dials",
        )
        .goal(Goal::AtMost(0.0)),
    ]);
    if let Some(cpu) = cpu {
        figures.figures.push(Figure::info(
            &scenario,
            "new relay's CPU until all back",
            cpu,
            "s",
        ));
    }
    if let Some(rss) = rss {
        figures.figures.push(Figure::info(
            &scenario,
            "relay RSS with all back",
            rss as f64 / 1024.0,
            "MiB",
        ));
    }
    Ok(())
}
