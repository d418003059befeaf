//! Fault injection: `cloudllmd` frozen with SIGSTOP while a stream is in flight (a hung
//! process, a laptop lid closed, a VM paused: its sockets stay open but nothing answers). The
//! relay notices within its ping bound, fails the stream and answers new requests with 503;
//! after SIGCONT the daemon finds its tunnel dead, dials again and serves, with no manual step.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use cloudllm_e2e::{
    FakeOllama, STEP, TestRelay, client, relay_config, take_lines, token, wait_status,
};
use cloudllm_proto::ipc::Connection;
use cloudllm_relay::Scope;
use serde_json::json;
use tokio::time::{Instant, timeout};

const BIN: &str = env!("CARGO_BIN_EXE_cloudllmd");

/// Ping interval and timeout on both ends: the relay gives a silent tunnel up after 2 s.
const PING: Duration = Duration::from_secs(1);

/// The daemon process; killed when dropped (SIGKILL ends a stopped process too), so a failing
/// test leaves no frozen daemon behind.
struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn signal(child: &Child, name: &str) {
    let status = Command::new("kill")
        .args([format!("-{name}"), child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success(), "kill -{name}");
}

fn scratch() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("cloudllmd-faults-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("config/cloudllm")).unwrap();
    dir
}

/// Starts `cloudllmd` for alice with a scratch home, 1 s pings and a 2 s reconnect cap.
fn start_daemon(home: &Path, relay: &TestRelay, backend: &FakeOllama) -> Daemon {
    std::fs::write(
        home.join("config/cloudllm/cloudllmd.toml"),
        "ping_interval = \"1s\"\nping_timeout = \"1s\"\nreconnect_max = \"2s\"\n",
    )
    .unwrap();
    let child = Command::new(BIN)
        .env_clear()
        .env("HOME", home)
        .env("XDG_CONFIG_HOME", home.join("config"))
        .env("XDG_STATE_HOME", home.join("state"))
        .env("XDG_RUNTIME_DIR", home.join("run"))
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("CLOUDLLM_RELAY_URL", relay.url().as_str())
        .env("CLOUDLLM_TOKEN", token("alice", Scope::Agent))
        .env("CLOUDLLM_OLLAMA_URL", backend.url().as_str())
        .env("CLOUDLLM_DEVICE_NAME", "laptop")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    Daemon(child)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_daemon_is_given_up_within_the_bound_and_comes_back_when_thawed() {
    let mut config = relay_config();
    config.ping_interval = PING;
    config.ping_timeout = PING;
    let relay = TestRelay::start(config).await;
    let backend = FakeOllama::start().await;
    let home = scratch();
    let daemon = start_daemon(&home, &relay, &backend);
    let socket = home.join("run/cloudllm/cloudllmd.sock");
    relay.wait_for_devices("alice", 1).await;
    let http = client();
    let generate = |tag: &str, lines: usize, interval_ms: u64| {
        http.post(relay.api("/api/generate"))
            .bearer_auth(token("alice", Scope::Client))
            .json(&json!({"prompt": tag, "options": {"num_predict": lines}, "fake_interval_ms": interval_ms}))
    };

    let mut response = timeout(STEP, generate("frozen", 100_000, 20).send())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(response.status(), 200);
    let mut buf = Vec::new();
    while take_lines(&mut buf).is_empty() {
        let chunk = timeout(STEP, response.chunk()).await.unwrap().unwrap();
        buf.extend_from_slice(&chunk.expect("a first line"));
    }
    signal(&daemon.0, "STOP");
    let frozen_at = Instant::now();

    // The relay gives the tunnel up within interval + timeout (2 s) plus scheduling slack.
    relay.wait_for_devices("alice", 0).await;
    let noticed = frozen_at.elapsed();
    assert!(
        noticed < Duration::from_secs(4),
        "the relay noticed after {noticed:?}"
    );
    // The caller: the stream in flight fails rather than hanging for ever.
    let (_, outcome) = cloudllm_e2e::read_to_end(response).await;
    assert!(outcome.is_err(), "a cut stream must not look complete");
    // New requests: 503, the device is offline.
    let refused = timeout(STEP, generate("while-frozen", 3, 0).send())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(refused.status(), 503);
    let body = timeout(STEP, refused.text()).await.unwrap().unwrap();
    assert!(body.contains("your device is offline"), "{body}");

    // Thawed: the daemon sees its tunnel is gone, dials again and serves.
    signal(&daemon.0, "CONT");
    let thawed = Instant::now();
    relay.wait_for_devices("alice", 1).await;
    let back_after = thawed.elapsed();
    assert!(
        back_after < Duration::from_secs(6),
        "the daemon took {back_after:?} to come back"
    );
    // Connected, and the stream cut while frozen no longer counts as in flight.
    wait_status(&socket, STEP, |s| {
        matches!(s.connection, Connection::Connected { .. }) && s.requests_in_flight == 0
    })
    .await;
    let response = timeout(STEP, generate("thawed", 3, 0).send())
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
    drop(daemon);
    let _ = std::fs::remove_dir_all(home);
}
