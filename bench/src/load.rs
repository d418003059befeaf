//! The load scenarios. Each runs against one [`Target`] and returns one figure; the caller runs
//! it against the backend directly and through cloudllm, alternating, so that drift in the
//! machine's load hits both sides alike.
//!
//! Connections are opened and warmed up before the clock starts: the figures are about
//! requests on established keep-alive connections, which is how API clients and the relay's
//! tunnel behave.

use std::time::Duration;

use anyhow::{Context, ensure};
use tokio::task::JoinSet;
use tokio::time::{Instant, timeout};

use crate::client::{Conn, STEP, Target};

/// Latency percentiles of sequential requests.
#[derive(Debug, Clone, Copy)]
pub struct Latency {
    /// Median.
    pub p50: Duration,
    /// 99th percentile.
    pub p99: Duration,
}

/// `requests` sequential `GET /api/version` on one connection, after `warmup` unmeasured ones.
pub async fn sequential(target: Target, warmup: usize, requests: usize) -> anyhow::Result<Latency> {
    ensure!(requests > 0, "no requests to measure");
    let mut conn = target.connect().await?;
    for _ in 0..warmup {
        conn.version().await?;
    }
    let mut samples = Vec::with_capacity(requests);
    for _ in 0..requests {
        let start = Instant::now();
        conn.version().await?;
        samples.push(start.elapsed());
    }
    samples.sort_unstable();
    Ok(Latency {
        p50: percentile(&samples, 0.50),
        p99: percentile(&samples, 0.99),
    })
}

/// Requests per second of `GET /api/version` over `connections` keep-alive connections, each
/// sending its next request as soon as the last one is answered, for `duration`. Requests
/// answered after the deadline are not counted.
pub async fn throughput(
    target: Target,
    connections: usize,
    duration: Duration,
) -> anyhow::Result<f64> {
    // Open and warm every connection first (through cloudllm this also fills the daemon's
    // pool of connections to the backend).
    let mut opening = JoinSet::new();
    for _ in 0..connections {
        let target = target.clone();
        opening.spawn(async move {
            let mut conn = target.connect().await?;
            conn.version().await?;
            Ok::<Conn, anyhow::Error>(conn)
        });
    }
    let conns = join_all(opening, STEP * 2)
        .await
        .context("opening connections")?;

    let deadline = Instant::now() + duration;
    let mut running = JoinSet::new();
    for mut conn in conns {
        running.spawn(async move {
            let mut answered: u64 = 0;
            loop {
                conn.version().await?;
                if Instant::now() > deadline {
                    return Ok::<u64, anyhow::Error>(answered);
                }
                answered += 1;
            }
        });
    }
    let answered: u64 = join_all(running, duration + STEP)
        .await
        .context("sending requests")?
        .into_iter()
        .sum();
    Ok(answered as f64 / duration.as_secs_f64())
}

/// Time from sending `POST /api/generate` for `lines` unpaced lines to the last line's arrival,
/// on a connection opened and warmed beforehand.
pub async fn one_stream(target: Target, lines: usize) -> anyhow::Result<Duration> {
    let mut conn = target.connect().await?;
    conn.version().await?;
    let start = Instant::now();
    let arrivals = conn.generate(lines, Duration::ZERO).await?;
    Ok(last(&arrivals).duration_since(start))
}

/// Time from sending `streams` generate requests at once (each on its own connection) until
/// the last line of the last stream has arrived.
pub async fn parallel_streams(
    target: Target,
    streams: usize,
    lines: usize,
) -> anyhow::Result<Duration> {
    let mut conns = Vec::with_capacity(streams);
    for _ in 0..streams {
        let mut conn = target.connect().await?;
        conn.version().await?;
        conns.push(conn);
    }
    let start = Instant::now();
    let mut running = JoinSet::new();
    for mut conn in conns {
        running.spawn(async move {
            let arrivals = conn.generate(lines, Duration::ZERO).await?;
            Ok::<Instant, anyhow::Error>(last(&arrivals))
        });
    }
    let ends = join_all(running, STEP * 2)
        .await
        .context("parallel streams")?;
    let end = ends.into_iter().max().unwrap_or(start);
    Ok(end.duration_since(start))
}

/// The longest gap between consecutive lines of a stream of `lines` lines produced `delay`
/// apart.
pub async fn paced_gap(target: Target, lines: usize, delay: Duration) -> anyhow::Result<Duration> {
    ensure!(lines >= 2, "a gap needs two lines");
    let mut conn = target.connect().await?;
    conn.version().await?;
    let arrivals = conn.generate(lines, delay).await?;
    Ok(arrivals
        .windows(2)
        .map(|pair| pair[1].duration_since(pair[0]))
        .max()
        .unwrap_or_default())
}

/// Waits for every task of `set`, failing on the first error or after `limit`.
async fn join_all<T: 'static>(
    mut set: JoinSet<anyhow::Result<T>>,
    limit: Duration,
) -> anyhow::Result<Vec<T>> {
    let deadline = Instant::now() + limit;
    let mut out = Vec::with_capacity(set.len());
    while let Some(joined) = timeout(
        deadline.saturating_duration_since(Instant::now()),
        set.join_next(),
    )
    .await
    .with_context(|| format!("tasks still running after {limit:?}"))?
    {
        out.push(joined.context("task panicked or was cancelled")??);
    }
    Ok(out)
}

fn last(arrivals: &[Instant]) -> Instant {
    // `generate` checked the count, and every scenario asks for at least one line.
    arrivals.last().copied().unwrap_or_else(Instant::now)
}

/// The `p` quantile (0..=1) of sorted, non-empty `samples`, by nearest rank.
fn percentile(samples: &[Duration], p: f64) -> Duration {
    let rank = ((samples.len() - 1) as f64 * p).round() as usize;
    samples[rank.min(samples.len() - 1)]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_by_nearest_rank() {
        let samples: Vec<Duration> = (1..=100).map(Duration::from_micros).collect();
        assert_eq!(percentile(&samples, 0.5), Duration::from_micros(51));
        assert_eq!(percentile(&samples, 0.99), Duration::from_micros(99));
        assert_eq!(percentile(&samples[..1], 0.99), Duration::from_micros(1));
    }
}
