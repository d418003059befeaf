//! Streaming through the tunnel: tokens arrive as they are produced, a caller who leaves stops
//! the backend, stalled readers do not block the others, and failures end the response with an
//! error instead of a hang.

use std::time::Duration;

use cloudllm_e2e::fake_ollama::StreamEnd;
use cloudllm_e2e::{STEP, Stack, take_lines};
use serde_json::json;
use tokio::time::{Instant, timeout};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_line_arrives_before_the_next_is_produced() {
    let stack = Stack::start().await;
    let lines = 8;
    let response = stack
        .post("/api/generate")
        .json(&json!({"model": "fake", "prompt": "paced", "options": {"num_predict": lines}, "fake_interval_ms": 50}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "application/x-ndjson");
    let received = cloudllm_e2e::timed_lines(response).await;
    assert_eq!(received.len(), lines + 1, "all lines and the final one");
    assert_eq!(received.last().unwrap().1["done"], true);
    let produced = stack.backend.records.produced("paced");
    for k in 0..lines {
        assert!(
            received[k].0 < produced[k + 1],
            "line {k} arrived {:?} after line {} was produced",
            received[k].0 - produced[k + 1],
            k + 1
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closing_the_client_stops_the_backend_within_100ms() {
    let stack = Stack::start().await;
    let mut response = stack
        .post("/api/generate")
        .json(&json!({"prompt": "abandoned", "options": {"num_predict": 100000}, "fake_interval_ms": 10}))
        .send()
        .await
        .unwrap();
    // Read a few lines, then hang up.
    let mut buf = Vec::new();
    let mut seen = 0;
    while seen < 3 {
        let chunk = timeout(STEP, response.chunk())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        buf.extend_from_slice(&chunk);
        seen += take_lines(&mut buf).len();
    }
    let hung_up = Instant::now();
    drop(response);
    let (ended_at, how) = stack.backend.records.wait_end("abandoned").await;
    assert_eq!(how, StreamEnd::Cancelled);
    let after = ended_at.saturating_duration_since(hung_up);
    assert!(
        after < Duration::from_millis(100),
        "backend noticed after {after:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_readers_do_not_block_other_streams() {
    // Regression test for h2's GOAWAY(too_many_data_frames): many streams of small chunks.
    let stack = Stack::start().await;
    let streams = 64;
    let stalled = 8;
    let lines = 2000;
    let mut tasks = Vec::new();
    let (hold_tx, hold_rx) = tokio::sync::watch::channel(false);
    for i in 0..streams {
        let request = stack.post("/api/generate").json(&json!({
            "prompt": format!("flow-{i}"), "options": {"num_predict": lines}
        }));
        let mut release = hold_rx.clone();
        tasks.push(tokio::spawn(async move {
            let mut response = request.send().await.unwrap();
            assert_eq!(response.status(), 200);
            if i < stalled {
                // Take one chunk, then stop reading until the test is over.
                let _ = response.chunk().await;
                let _ = release.wait_for(|done| *done).await;
                return None;
            }
            let mut buf = Vec::new();
            let mut count = 0;
            let mut last = json!(null);
            while let Some(chunk) = response.chunk().await.unwrap() {
                buf.extend_from_slice(&chunk);
                for line in take_lines(&mut buf) {
                    count += 1;
                    last = line;
                }
            }
            Some((count, last))
        }));
    }
    let readers: Vec<_> = tasks.drain(stalled..).collect();
    for reader in readers {
        let (count, last) = timeout(Duration::from_secs(60), reader)
            .await
            .expect("a reading stream was blocked")
            .unwrap()
            .unwrap();
        assert_eq!(count, lines + 1);
        assert_eq!(last["done"], true);
    }
    // The tunnel is still healthy: a new request works while the stalled streams are open.
    let response = stack.get("/api/tags").send().await.unwrap();
    assert_eq!(response.status(), 200);
    hold_tx.send(true).unwrap();
    for task in tasks {
        timeout(STEP, task).await.unwrap().unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_failure_mid_stream_ends_the_response_with_an_error() {
    let stack = Stack::start().await;
    let response = stack
        .post("/api/generate")
        .json(&json!({"prompt": "broken", "options": {"num_predict": 50}, "fake_interval_ms": 5, "fake_fail_after": 5}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let (mut buf, outcome) = cloudllm_e2e::read_to_end(response).await;
    assert!(
        outcome.is_err(),
        "a truncated stream must not look complete"
    );
    let lines = take_lines(&mut buf);
    assert_eq!(lines.len(), 5);
    assert!(lines.iter().all(|l| l["done"] == false));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemon_dying_mid_stream_ends_the_response_with_an_error() {
    let stack = Stack::start().await;
    let mut response = stack
        .post("/api/generate")
        .json(
            &json!({"prompt": "orphan", "options": {"num_predict": 1000}, "fake_interval_ms": 10}),
        )
        .send()
        .await
        .unwrap();
    let _ = timeout(STEP, response.chunk()).await.unwrap().unwrap();
    let Stack {
        daemon,
        relay,
        backend,
        ..
    } = stack;
    drop(daemon); // abrupt: the tunnel is cut, nothing drains
    let (_, outcome) = cloudllm_e2e::read_to_end(response).await;
    assert!(outcome.is_err(), "a cut stream must not look complete");
    relay.wait_for_devices("alice", 0).await;
    // The backend's request was dropped too.
    assert_eq!(
        backend.records.wait_end("orphan").await.1,
        StreamEnd::Cancelled
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_server_sent_events_pass_unchanged() {
    let stack = Stack::start().await;
    let response = stack
        .post("/v1/chat/completions")
        .json(&json!({"model": "fake", "stream": true, "max_tokens": 4, "messages": []}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    let body = timeout(STEP, response.text()).await.unwrap().unwrap();
    let events: Vec<&str> = body.split("\n\n").filter(|e| !e.is_empty()).collect();
    assert_eq!(events.len(), 5);
    assert_eq!(*events.last().unwrap(), "data: [DONE]");
    for (i, event) in events[..4].iter().enumerate() {
        let chunk: serde_json::Value =
            serde_json::from_str(event.strip_prefix("data: ").unwrap()).unwrap();
        assert_eq!(chunk["choices"][0]["delta"]["content"], format!("t{i}"));
    }
}
