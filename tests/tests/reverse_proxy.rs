//! The relay in plain HTTP behind a real nginx configured with exactly the snippet the README
//! points operators to (`packaging/nginx/cloudllm-relay.conf`): the daemon's WebSocket upgrade
//! on `/tunnel` passes, a streamed answer reaches the client line by line, not buffered, and a
//! busy device's lanes (one more WebSocket per relay thread) come up through it.
//!
//! Needs the `nginx` binary (Debian package `nginx`); `CLOUDLLM_SKIP_NGINX_TEST=1` skips the test
//! where it is missing.

use cloudllm_e2e::nginx::{self, Nginx};
use cloudllm_e2e::{
    FakeOllama, TestDaemon, TestRelay, client, daemon_config, relay_config, send, token,
};
use cloudllm_relay::Scope;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn behind_nginx_the_tunnel_connects_and_streams_arrive_line_by_line() {
    cloudllm_e2e::init_logs();
    let Some(binary) = nginx::binary() else {
        return;
    };
    let mut config = relay_config();
    // Three threads: the device gets a lane to each of the two its tunnel is not on.
    config.threads = 3;
    let relay = TestRelay::start(config).await;
    let upstream = format!(
        "upstream cloudllm_relay {{ server {}; keepalive 8; }}",
        relay.relay.addr
    );
    let nginx = Nginx::start(&binary, &upstream).await;
    let backend = FakeOllama::start().await;

    // The daemon knows only nginx: its WebSocket upgrade has to pass through.
    let _daemon = TestDaemon::start(daemon_config(
        &nginx.url(),
        "alice",
        "laptop",
        &backend.url(),
    ));
    relay.wait_for_devices("alice", 1).await;

    // Lines produced 100 ms apart each reach the client before the next one is produced.
    let lines = 8;
    let response = send(
        client()
            .post(format!("{}api/generate", nginx.url()))
            .bearer_auth(token("alice", Scope::Client))
            .json(&json!({"prompt": "via-nginx", "options": {"num_predict": lines}, "fake_interval_ms": 100})),
    )
    .await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "application/x-ndjson");
    let received = cloudllm_e2e::timed_lines(response).await;
    assert_eq!(received.len(), lines + 1, "all lines and the final one");
    assert_eq!(received.last().unwrap().1["done"], true);
    let produced = backend.records.produced("via-nginx");
    for k in 0..lines {
        assert!(
            received[k].0 < produced[k + 1],
            "line {k} arrived {:?} after line {} was produced: nginx buffered it",
            received[k].0 - produced[k + 1],
            k + 1
        );
    }

    // The API's own answers pass unchanged (not nginx's error pages).
    let missing = send(client().get(format!("{}api/tags", nginx.url()))).await;
    assert_eq!(missing.status(), 401);
    let tags = send(
        client()
            .get(format!("{}api/tags", nginx.url()))
            .bearer_auth(token("alice", Scope::Client)),
    )
    .await;
    assert_eq!(tags.status(), 200);

    // The requests above made the device busy: its lanes' upgrades, each naming its relay
    // thread, pass through nginx to the thread they name.
    relay.wait_metric("cloudllm_tunnel_lanes_open", 2.0).await;
    relay.stop().await;
}
