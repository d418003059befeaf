//! Time to first byte and cancellation, directly and through cloudllm (relay and daemon in
//! this process on their own runtimes, as in the tunnel benchmark, see [`stack`](crate::stack)).
//!
//! - Time to first byte: from sending `POST /api/generate` on a warm connection to the first
//!   line's arrival.
//! - Cancel to backend: a paced stream is read to its first line, then the client closes its
//!   connection; the figure is the time until the backend sees its stream dropped (recorded
//!   by [`Cancellations`]). Through cloudllm that is the relay noticing the closed client,
//!   resetting the HTTP/2 stream, and the daemon dropping its request to the backend: what
//!   stops a generation on the GPU when a web user closes the tab.

use std::time::Duration;

use anyhow::Context;
use tokio::time::{Instant, timeout};
use tokio_util::sync::CancellationToken;

use crate::backend::{self, Cancellations};
use crate::client::{STEP, Target};
use crate::figures::{Figure, Figures};
use crate::stack::{Handles, Stack};

/// Pause between lines of the stream that gets cancelled: 5 ms, short so that the backend's
/// next write (which is when a plain HTTP/1 server notices a closed peer) comes soon.
const CANCEL_DELAY: Duration = Duration::from_millis(5);

/// Lines of the stream that gets cancelled: far more than are read before the cancel.
const CANCEL_LINES: usize = 100_000;

/// How often to look for the backend's record of the cancellation.
const CANCEL_POLL: Duration = Duration::from_millis(1);

/// Runs both measurements `reps` times each way, adding their figures.
pub async fn run(reps: usize, handles: &Handles, figures: &mut Figures) -> anyhow::Result<()> {
    let cancellations = Cancellations::default();
    let backend_stop = CancellationToken::new();
    let backend = timeout(
        STEP,
        handles.backend.spawn(backend::serve_with(
            backend_stop.clone(),
            backend::Options {
                label: String::new(),
                cancellations: Some(cancellations.clone()),
            },
        )),
    )
    .await
    .context("fake backend start timed out")?
    .context("fake backend task")??;
    let stack = Stack::start(handles, backend).await?;
    let direct = Target::direct(backend)?;
    let through = Target::through(stack.relay_addr, &stack.client_token)?;
    let outcome = measure(reps, &direct, &through, &cancellations, figures).await;
    if let Err(err) = stack.stop().await {
        tracing::warn!(error = format!("{err:#}"), "stopping relay and daemon");
    }
    backend_stop.cancel();
    outcome
}

async fn measure(
    reps: usize,
    direct: &Target,
    through: &Target,
    cancellations: &Cancellations,
    figures: &mut Figures,
) -> anyhow::Result<()> {
    let (mut ttfb_direct, mut ttfb_through) = (Vec::new(), Vec::new());
    let (mut cancel_direct, mut cancel_through) = (Vec::new(), Vec::new());
    let mut conn_direct = direct.connect().await?;
    let mut conn_through = through.connect().await?;
    conn_direct.version().await?;
    conn_through.version().await?;
    for _ in 0..reps {
        ttfb_direct.push(first_line(&mut conn_direct).await?);
        ttfb_through.push(first_line(&mut conn_through).await?);
    }
    for rep in 0..reps {
        cancel_direct.push(cancel(direct, &format!("cancel-direct-{rep}"), cancellations).await?);
        cancel_through
            .push(cancel(through, &format!("cancel-through-{rep}"), cancellations).await?);
    }
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let scenario = "latency";
    let (d50, t50) = (median(&mut ttfb_direct), median(&mut ttfb_through));
    let (c_d, c_t) = (median(&mut cancel_direct), median(&mut cancel_through));
    figures.figures.extend([
        Figure::info(
            scenario,
            "time to first byte, direct (median)",
            ms(d50),
            "ms",
        ),
        Figure::info(
            scenario,
            "time to first byte, through cloudllm (median)",
            ms(t50),
            "ms",
        ),
        Figure::info(
            scenario,
            "time to first byte overhead (median)",
            ms(t50.saturating_sub(d50)),
            "ms",
        ),
        Figure::info(
            scenario,
            "cancel to backend, direct (median)",
            ms(c_d),
            "ms",
        ),
        Figure::info(
            scenario,
            "cancel to backend, through cloudllm (median)",
            ms(c_t),
            "ms",
        ),
        Figure::info(
            scenario,
            "cancel to backend, through cloudllm (max)",
            ms(cancel_through.last().copied().unwrap_or_default()),
            "ms",
        ),
    ]);
    figures.setup.push(format!(
        "latency: relay and daemon in-process on their own runtimes, fake backend; {reps} \
         one-line generates each way on a warm connection; {reps} cancels each way of a stream \
         paced {} ms, after its first line",
        CANCEL_DELAY.as_millis()
    ));
    Ok(())
}

/// Time from sending a one-line generate to its line.
async fn first_line(conn: &mut crate::client::Conn) -> anyhow::Result<Duration> {
    let start = Instant::now();
    let arrivals = conn.generate(1, Duration::ZERO).await?;
    Ok(arrivals
        .first()
        .copied()
        .unwrap_or(start)
        .duration_since(start))
}

/// Reads one line of a long paced stream, closes the connection, and returns the time until
/// the backend saw the stream cancelled.
async fn cancel(
    target: &Target,
    id: &str,
    cancellations: &Cancellations,
) -> anyhow::Result<Duration> {
    let mut conn = target.connect().await?;
    let body = serde_json::json!({
        "model": "bench",
        "prompt": "bench",
        "lines": CANCEL_LINES,
        "delay_ms": CANCEL_DELAY.as_millis(),
    });
    let response = conn.start("/api/generate", &body, Some(id)).await?;
    let mut body = response.into_body();
    // The first chunk: the stream is running end to end.
    timeout(STEP, http_body_util::BodyExt::frame(&mut body))
        .await
        .context("no first line")?
        .context("stream ended before its first line")?
        .context("stream broke")?;
    let closed = Instant::now();
    drop(body);
    drop(conn);
    let deadline = closed + STEP;
    loop {
        if let Some(at) = cancellations.take(id) {
            return Ok(at.saturating_duration_since(closed.into_std()));
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the backend did not see request {id} cancelled within {STEP:?}"
        );
        tokio::time::sleep(CANCEL_POLL).await;
    }
}

/// The median of `samples` (sorted in place).
fn median(samples: &mut [Duration]) -> Duration {
    samples.sort_unstable();
    samples.get(samples.len() / 2).copied().unwrap_or_default()
}
