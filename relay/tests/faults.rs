//! Fault injection: the relay process killed with SIGKILL while a stream is in flight (no
//! drain, no GOAWAY: the kernel closes its sockets), then started again on the same address.
//! The caller's stream fails instead of hanging, the daemon stops the generation and reports
//! the lost tunnel, and it is back on the new relay within its reconnect cap without a manual
//! step.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use cloudllm_e2e::fake_ollama::StreamEnd;
use cloudllm_e2e::{
    FakeOllama, SECRET, STEP, TestDaemon, client, daemon_config, init_logs, take_lines, token,
    wait_connected, wait_status,
};
use cloudllm_proto::ipc::Connection;
use cloudllm_relay::Scope;
use common::{BIN, lines_of, wait_listening, with_piped_log};
use serde_json::json;
use tokio::time::{Instant, timeout};

/// A relay process, killed when dropped (also when the test fails half-way).
struct RelayProcess(Child);

impl Drop for RelayProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts the relay binary listening on `listen` (port 0 for any) with 1 s pings, and gives
/// the address it reports.
fn start_relay(dir: &Path, listen: SocketAddr) -> (RelayProcess, SocketAddr) {
    let config = dir.join(format!("relay-{}.toml", listen.port()));
    std::fs::write(
        &config,
        format!(
            "listen = \"{listen}\"\ndefault_tier = \"premium\"\nping_interval = \"1s\"\nping_timeout = \"1s\"\n"
        ),
    )
    .unwrap();
    let mut child = Command::new(BIN);
    child
        .arg("serve")
        .arg("--config")
        .arg(&config)
        .env_clear()
        .env("CLOUDLLM_RELAY_SECRET", SECRET);
    let mut child = with_piped_log(&mut child)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .expect("the relay binary starts");
    let log = lines_of(child.stderr.take().expect("a piped log"));
    let process = RelayProcess(child);
    let (addr, _) = wait_listening(&log, STEP);
    let addr = addr.parse().expect("a socket address");
    (process, addr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_killed_mid_stream_and_restarted() {
    init_logs();
    let dir = std::env::temp_dir().join(format!("cloudllm-relay-faults-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let (relay, addr) = start_relay(&dir, SocketAddr::from(([127, 0, 0, 1], 0)));
    let base = format!("http://{addr}");
    let backend = FakeOllama::start().await;
    let mut config = daemon_config(&base.parse().unwrap(), "alice", "laptop", &backend.url());
    config.ping_interval = Duration::from_secs(1);
    config.ping_timeout = Duration::from_secs(1);
    let socket = config.socket_path.clone().unwrap();
    let _daemon = TestDaemon::start(config);
    wait_connected(&socket).await;
    let http = client();
    let generate = |tag: &str| {
        http.post(format!("{base}/api/generate"))
            .bearer_auth(token("alice", Scope::Client))
            .json(&json!({"prompt": tag, "options": {"num_predict": 100_000}, "fake_interval_ms": 10}))
    };

    let mut response = timeout(STEP, generate("killed").send())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(response.status(), 200);
    let mut buf = Vec::new();
    while take_lines(&mut buf).is_empty() {
        let chunk = timeout(STEP, response.chunk()).await.unwrap().unwrap();
        buf.extend_from_slice(&chunk.expect("a first line"));
    }
    drop(relay); // SIGKILL

    // The caller: the stream fails at once instead of hanging or looking complete.
    let (_, outcome) = cloudllm_e2e::read_to_end(response).await;
    assert!(outcome.is_err(), "a cut stream must not look complete");
    // The daemon stops the generation, and says the tunnel is lost and why.
    assert_eq!(
        backend.records.wait_end("killed").await.1,
        StreamEnd::Cancelled
    );
    let lost = wait_status(&socket, STEP, |s| {
        matches!(s.connection, Connection::Reconnecting { .. })
    })
    .await;
    let Connection::Reconnecting { last_error, .. } = &lost.connection else {
        unreachable!()
    };
    // The lost tunnel, as the WebSocket saw it ("… Connection reset without closing
    // handshake") or as the HTTP/2 session of the cut stream did ("tunnel lost: connection
    // error: connection reset"), or already the next dial that found nobody listening.
    let reason = last_error.to_lowercase();
    assert!(
        reason.contains("connection reset") || reason.contains("connecting to"),
        "{last_error}"
    );
    // While no relay runs, callers cannot connect at all.
    let refused = timeout(STEP, generate("nobody-home").send())
        .await
        .unwrap()
        .expect_err("nothing listens");
    assert!(refused.is_connect(), "{refused:?}");

    // A new relay on the same address: the daemon is back within its reconnect cap (2 s).
    let (_relay, again) = start_relay(&dir, addr);
    assert_eq!(again, addr);
    let restarted = Instant::now();
    wait_connected(&socket).await;
    let back_after = restarted.elapsed();
    assert!(
        back_after < Duration::from_secs(4),
        "the daemon took {back_after:?} to come back"
    );
    let response = timeout(STEP, {
        http.post(format!("{base}/api/generate"))
            .bearer_auth(token("alice", Scope::Client))
            .json(&json!({"prompt": "after", "options": {"num_predict": 3}}))
            .send()
    })
    .await
    .unwrap()
    .unwrap();
    assert_eq!(response.status(), 200);
    let mut buf = timeout(STEP, response.bytes())
        .await
        .unwrap()
        .unwrap()
        .to_vec();
    assert_eq!(take_lines(&mut buf).last().unwrap()["done"], true);
    // The stream cut by the kill no longer counts as in flight.
    wait_status(&socket, STEP, |s| s.requests_in_flight == 0).await;
    let _ = std::fs::remove_dir_all(&dir);
}
