//! Reading a test relay's Prometheus `/metrics`: many tests wait for a counter or a gauge rather
//! than sleep, since a metric is what an operator would watch for the same event.

use std::net::SocketAddr;
use std::time::Duration;

use crate::{STEP, TestRelay, client};

/// How often [`TestRelay::wait_metric`] scrapes: fast enough for tests that wait on many steps.
const SCRAPE_EVERY: Duration = Duration::from_millis(20);

/// The value of `series` (its name with labels, exactly as the relay writes it) in the metrics
/// text `text`, if the relay wrote it.
pub fn metric_value(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .map(|value| value.trim().parse().expect("a metric value"))
}

/// The `/metrics` text of the listener at `addr` (a relay's, or a cluster node's).
pub async fn scrape(addr: SocketAddr) -> String {
    let scrape = async {
        client()
            .get(format!("http://{addr}/metrics"))
            .send()
            .await?
            .text()
            .await
    };
    tokio::time::timeout(STEP, scrape)
        .await
        .expect("/metrics timed out")
        .expect("/metrics")
}

impl TestRelay {
    /// The relay's `/metrics` text, from its metrics listener when it has one (connections
    /// there are not counted as clients) or else from its main listener.
    pub async fn metrics(&self) -> String {
        scrape(self.relay.metrics_addr.unwrap_or(self.relay.addr)).await
    }

    /// The value of `series` now (see [`metric_value`]); panics if the relay does not write it.
    pub async fn metric(&self, series: &str) -> f64 {
        let text = self.metrics().await;
        metric_value(&text, series).unwrap_or_else(|| panic!("no {series} in:\n{text}"))
    }

    /// Waits until `series` reads `want` (a series not written yet reads 0); panics with the
    /// last scrape after [`STEP`].
    pub async fn wait_metric(&self, series: &str, want: f64) {
        let deadline = tokio::time::Instant::now() + STEP;
        loop {
            let text = self.metrics().await;
            if metric_value(&text, series).unwrap_or(0.0) == want {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{series} never reached {want}:\n{text}"
            );
            tokio::time::sleep(SCRAPE_EVERY).await;
        }
    }
}
