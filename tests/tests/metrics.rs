//! `/metrics` scraped and parsed as Prometheus text after real traffic: devices, requests by
//! status, bytes, latency and time-to-first-byte histograms, auth failures and refusals by
//! limit — on a separate listen address when `metrics_listen` is set, else on the main one.

use std::net::SocketAddr;

use cloudllm_e2e::{Stack, client, relay_config, test_tier};
use prometheus_parse::{Scrape, Value};

async fn scrape(addr: SocketAddr) -> Scrape {
    let response = client()
        .get(format!("http://{addr}/metrics"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let content_type = response.headers()["content-type"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(
        content_type.starts_with("application/openmetrics-text"),
        "{content_type}"
    );
    let text = response.text().await.unwrap();
    Scrape::parse(text.lines().map(|line| Ok(line.to_owned()))).expect("Prometheus text")
}

/// The value of `metric` with label `label` (if given), as a number; histograms give their
/// count.
fn value(scrape: &Scrape, metric: &str, label: Option<(&str, &str)>) -> f64 {
    let sample = scrape
        .samples
        .iter()
        .find(|s| s.metric == metric && label.is_none_or(|(k, v)| s.labels.get(k) == Some(v)))
        .unwrap_or_else(|| panic!("no {metric} {label:?} in the scrape"));
    match &sample.value {
        Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => *v,
        Value::Histogram(buckets) => buckets.last().map_or(0.0, |b| b.count),
        Value::Summary(_) => panic!("no summaries expected"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_devices_requests_bytes_failures_and_limits() {
    let mut config = relay_config();
    config.metrics_listen = Some(SocketAddr::from(([127, 0, 0, 1], 0)));
    test_tier(&mut config).requests_per_minute = 3;
    let stack = Stack::with_relay_config(config).await;
    let metrics_addr = stack.relay.relay.metrics_addr.expect("a metrics address");

    assert_eq!(stack.get("/api/tags").send().await.unwrap().status(), 200);
    let stream = stack
        .post("/api/generate")
        .json(&serde_json::json!({"model": "fake", "prompt": "m", "options": {"num_predict": 5}}))
        .send()
        .await
        .unwrap();
    assert_eq!(stream.status(), 200);
    let streamed = stream.bytes().await.unwrap().len();
    let forged = client()
        .get(stack.relay.api("/api/tags"))
        .bearer_auth("forged")
        .send()
        .await
        .unwrap();
    assert_eq!(forged.status(), 401);
    assert_eq!(stack.get("/api/tags").send().await.unwrap().status(), 200);
    assert_eq!(stack.get("/api/tags").send().await.unwrap().status(), 429);

    let scrape = scrape(metrics_addr).await;
    assert_eq!(value(&scrape, "cloudllm_devices_connected", None), 1.0);
    assert_eq!(value(&scrape, "cloudllm_requests_in_flight", None), 0.0);
    assert_eq!(
        value(&scrape, "cloudllm_requests_total", Some(("status", "200"))),
        3.0
    );
    assert_eq!(
        value(
            &scrape,
            "cloudllm_auth_failures_total",
            Some(("route", "api"))
        ),
        1.0
    );
    assert_eq!(
        value(
            &scrape,
            "cloudllm_rate_limited_total",
            Some(("limit", "requests_per_minute"))
        ),
        1.0
    );
    let out = value(
        &scrape,
        "cloudllm_body_bytes_total",
        Some(("direction", "out")),
    );
    assert!(out >= streamed as f64, "{out} < {streamed}");
    assert!(
        value(
            &scrape,
            "cloudllm_body_bytes_total",
            Some(("direction", "in"))
        ) > 0.0
    );
    assert_eq!(
        value(&scrape, "cloudllm_request_duration_seconds", None),
        3.0
    );
    assert_eq!(
        value(&scrape, "cloudllm_time_to_first_byte_seconds", None),
        3.0
    );

    // With a metrics address of its own, the public port does not serve them.
    let public = client()
        .get(stack.relay.api("/metrics"))
        .send()
        .await
        .unwrap();
    assert_eq!(public.status(), 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_metrics_listen_they_are_on_the_main_port() {
    let stack = Stack::with_relay_config(relay_config()).await;
    assert!(stack.relay.relay.metrics_addr.is_none());
    let scrape = scrape(stack.relay.relay.addr).await;
    assert_eq!(value(&scrape, "cloudllm_devices_connected", None), 1.0);
}
