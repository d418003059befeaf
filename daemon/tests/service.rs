//! `cloudllmd` as a service: the systemd notifications it sends (to a fake `NOTIFY_SOCKET` that
//! the test binds, as systemd would) and a graceful stop on SIGTERM with a stream in flight.

use std::os::unix::net::{UnixDatagram, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cloudllm_e2e::{FakeOllama, STEP, TestRelay, client, relay_config, take_lines, token};
use cloudllm_relay::Scope;
use serde_json::json;

const BIN: &str = env!("CARGO_BIN_EXE_cloudllmd");

/// The daemon with an empty environment and a scratch home (so no user config is read and its
/// socket and state land in the scratch dir).
fn daemon(home: &Path) -> Command {
    in_home(Command::new(BIN), home)
}

/// `command` with the daemon's test environment (see [`daemon`]).
fn in_home(mut command: Command, home: &Path) -> Command {
    command
        .env_clear()
        .env("HOME", home)
        .env("XDG_CONFIG_HOME", home.join("config"))
        .env("XDG_STATE_HOME", home.join("state"))
        .env("XDG_RUNTIME_DIR", home.join("run"))
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    command
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("cloudllmd-svc-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn socket_of(home: &Path) -> PathBuf {
    home.join("run/cloudllm/cloudllmd.sock")
}

fn sigterm(child: &Child) {
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

/// Waits for the child's exit, at most `limit`.
fn wait_exit(child: &mut Child, limit: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("no exit within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Receives one datagram, or `None` after `limit`.
fn recv(socket: &UnixDatagram, limit: Duration) -> Option<String> {
    socket.set_read_timeout(Some(limit)).unwrap();
    let mut buf = [0u8; 4096];
    match socket.recv(&mut buf) {
        Ok(n) => Some(String::from_utf8_lossy(&buf[..n]).into_owned()),
        Err(err)
            if matches!(
                err.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) =>
        {
            None
        }
        Err(err) => panic!("notify socket: {err}"),
    }
}

#[test]
fn ready_comes_once_the_socket_accepts_then_watchdog_then_stopping() {
    let home = scratch("notify");
    let notify_path = home.join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    let socket = socket_of(&home);
    // systemd names the watched process in WATCHDOG_PID; `exec` keeps the shell's pid.
    let mut shell = Command::new("sh");
    shell.args(["-c", "WATCHDOG_PID=$$ exec \"$0\"", BIN]);
    let mut child = in_home(shell, &home)
        .env("NOTIFY_SOCKET", &notify_path)
        // 400 ms: keep-alives every 200 ms, so a few arrive within the test.
        .env("WATCHDOG_USEC", "400000")
        .spawn()
        .unwrap();

    let first = recv(&notify, STEP).expect("a notification within the bound");
    assert_eq!(
        first.trim(),
        "READY=1",
        "the first notification is readiness"
    );
    // Right when READY=1 arrives, the IPC socket takes connections.
    UnixStream::connect(&socket).expect("the IPC socket accepts once READY=1 is sent");

    let mut watchdogs = 0;
    let deadline = Instant::now() + Duration::from_secs(5);
    while watchdogs < 3 && Instant::now() < deadline {
        if let Some(message) = recv(&notify, Duration::from_secs(1)) {
            assert_eq!(
                message.trim(),
                "WATCHDOG=1",
                "only keep-alives while running"
            );
            watchdogs += 1;
        }
    }
    assert_eq!(watchdogs, 3, "WATCHDOG=1 at half of WATCHDOG_USEC");

    sigterm(&child);
    let mut stopping = false;
    let deadline = Instant::now() + STEP;
    while !stopping && Instant::now() < deadline {
        if let Some(message) = recv(&notify, Duration::from_secs(1)) {
            stopping = message.trim() == "STOPPING=1";
        }
    }
    assert!(stopping, "STOPPING=1 once the stop begins");
    let status = wait_exit(&mut child, STEP);
    assert!(status.success(), "{status}");
    let _ = std::fs::remove_dir_all(home);
}

#[test]
fn without_a_watchdog_only_ready_and_stopping_are_sent() {
    let home = scratch("nowatchdog");
    let notify_path = home.join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    let mut child = daemon(&home)
        .env("NOTIFY_SOCKET", &notify_path)
        .spawn()
        .unwrap();
    assert_eq!(
        recv(&notify, STEP).as_deref().map(str::trim),
        Some("READY=1")
    );
    assert_eq!(recv(&notify, Duration::from_millis(800)), None);
    sigterm(&child);
    assert_eq!(
        recv(&notify, STEP).as_deref().map(str::trim),
        Some("STOPPING=1")
    );
    assert!(wait_exit(&mut child, STEP).success());
    let _ = std::fs::remove_dir_all(home);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_the_stream_in_flight_finish_then_exits_0() {
    let relay = TestRelay::start(relay_config()).await;
    let backend = FakeOllama::start().await;
    let home = scratch("drain");
    let mut child = daemon(&home)
        .env("CLOUDLLM_RELAY_URL", relay.url().as_str())
        .env("CLOUDLLM_TOKEN", token("alice", Scope::Agent))
        .env("CLOUDLLM_OLLAMA_URL", backend.url().as_str())
        .env("CLOUDLLM_DEVICE_NAME", "laptop")
        .spawn()
        .unwrap();
    relay.wait_for_devices("alice", 1).await;

    // 40 lines, 50 ms apart: two seconds of stream, most of it after the signal.
    let mut response = tokio::time::timeout(
        STEP,
        client()
            .post(relay.api("/api/generate"))
            .bearer_auth(token("alice", Scope::Client))
            .json(&json!({"prompt": "draining", "options": {"num_predict": 40}, "fake_interval_ms": 50}))
            .send(),
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(response.status(), 200);
    let first = tokio::time::timeout(STEP, response.chunk())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    sigterm(&child);
    let signalled = Instant::now();
    let mut buf = first.to_vec();
    while let Some(chunk) = tokio::time::timeout(STEP, response.chunk())
        .await
        .expect("the stream goes on after SIGTERM")
        .expect("the stream ends cleanly")
    {
        buf.extend_from_slice(&chunk);
    }
    let lines = take_lines(&mut buf);
    assert_eq!(lines.len(), 41, "every line and the final one arrived");
    assert_eq!(lines.last().unwrap()["done"], true);
    assert!(
        signalled.elapsed() > Duration::from_secs(1),
        "most of the stream came after the signal"
    );

    let status = tokio::task::spawn_blocking(move || wait_exit(&mut child, STEP))
        .await
        .unwrap();
    assert_eq!(status.code(), Some(0), "exit 0 after a graceful drain");
    assert!(!socket_of(&home).exists(), "the socket is removed on exit");
    relay.stop().await;
    let _ = std::fs::remove_dir_all(home);
}
