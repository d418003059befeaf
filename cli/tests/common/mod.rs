//! What the CLI tests share: running `cloudllm` against a daemon started in this process.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use cloudllm_e2e::{FakeOllama, STEP, TestDaemon, TestRelay, daemon_config, token};
use cloudllm_relay::{RelayConfig, Scope};
use tokio::io::AsyncWriteExt;
use tokio::process::Command;

pub const BIN: &str = env!("CARGO_BIN_EXE_cloudllm");

/// `cloudllm --socket socket`, run by this test's own user.
pub fn cli(socket: &Path) -> Command {
    let mut command = Command::new(BIN);
    command
        .arg("--socket")
        .arg(socket)
        .env("NO_COLOR", "1")
        .kill_on_drop(true);
    command
}

/// `cloudllm --socket socket`, run by user and group `id` (65534 is nobody/nogroup on Debian)
/// with no supplementary groups, through `setpriv`.
pub fn cli_as(id: u32, socket: &Path) -> Command {
    let mut command = Command::new("setpriv");
    command
        .arg(format!("--reuid={id}"))
        .arg(format!("--regid={id}"))
        .args(["--clear-groups", BIN, "--socket"])
        .arg(socket)
        .env("NO_COLOR", "1")
        .kill_on_drop(true);
    command
}

/// Runs `command` to its end, bounded by [`STEP`].
pub async fn output(command: &mut Command) -> Output {
    tokio::time::timeout(STEP, command.output())
        .await
        .expect("cloudllm timed out")
        .expect("running cloudllm")
}

/// Runs `command` to its end with `input` on its standard input, bounded by [`STEP`].
pub async fn output_with_stdin(command: &mut Command, input: &str) -> Output {
    let mut child = command
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("running cloudllm");
    let mut stdin = child.stdin.take().expect("a piped stdin");
    stdin
        .write_all(input.as_bytes())
        .await
        .expect("writing cloudllm's stdin");
    drop(stdin);
    tokio::time::timeout(STEP, child.wait_with_output())
        .await
        .expect("cloudllm timed out")
        .expect("running cloudllm")
}

/// `cloudllm args` run by this test's own user.
pub async fn run(socket: &Path, args: &[&str]) -> Output {
    output(cli(socket).args(args)).await
}

/// `cloudllm args` run by user and group `id` (see [`cli_as`]).
pub async fn run_as(id: u32, socket: &Path, args: &[&str]) -> Output {
    output(cli_as(id, socket).args(args)).await
}

/// `cloudllm args` with `input` on its standard input.
pub async fn run_with_stdin(socket: &Path, args: &[&str], input: &str) -> Output {
    output_with_stdin(cli(socket).args(args), input).await
}

pub fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

pub fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

pub async fn status_json(socket: &Path) -> (i32, serde_json::Value) {
    let output = run(socket, &["status", "--json"]).await;
    let code = output.status.code().unwrap();
    (
        code,
        serde_json::from_slice(&output.stdout).expect("status --json is JSON"),
    )
}

/// Polls `status --json` until `done` holds for it.
pub async fn wait_status(
    socket: &Path,
    what: &str,
    done: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = tokio::time::Instant::now() + STEP;
    loop {
        let (_, status) = status_json(socket).await;
        if done(&status) {
            return status;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never {what}: {status}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Polls `status --json` until the connection is in `state` (`connected`, `login_required` …).
pub async fn wait_connection(socket: &Path, state: &str) -> serde_json::Value {
    wait_status(socket, state, |s| s["connection"]["state"] == state).await
}

/// Asserts that the command failed with exit code 1 (an error the user can fix) and that its
/// standard error says `needle`.
pub fn assert_fails_saying(output: &Output, needle: &str) {
    let err = stderr(output);
    assert_eq!(output.status.code(), Some(1), "{err}");
    assert!(err.contains(needle), "{err}");
}

/// A relay, a fake Ollama and a daemon that is not logged in.
pub struct Fixture {
    pub relay: TestRelay,
    pub backend: FakeOllama,
    pub daemon: TestDaemon,
    pub socket: PathBuf,
    pub state_dir: PathBuf,
    pub config_file: PathBuf,
}

impl Fixture {
    pub async fn start() -> Fixture {
        Fixture::with_relay(cloudllm_e2e::relay_config()).await
    }

    /// A fixture whose relay runs with `config`.
    pub async fn with_relay(config: RelayConfig) -> Fixture {
        cloudllm_e2e::init_logs();
        let relay = TestRelay::start(config).await;
        let backend = FakeOllama::start().await;
        let config = cloudllm_e2e::logged_out(daemon_config(
            &relay.url(),
            "alice",
            "laptop",
            &backend.url(),
        ));
        let socket = config.socket_path.clone().unwrap();
        let state_dir = config.state_dir.clone().unwrap();
        let config_file = config.file.clone().unwrap();
        let daemon = TestDaemon::start(config);
        cloudllm_e2e::wait_for_socket(&socket).await;
        Fixture {
            relay,
            backend,
            daemon,
            socket,
            state_dir,
            config_file,
        }
    }

    /// Logs alice in with `--with-token`; returns the agent token it used.
    pub async fn login(&self) -> String {
        let agent = token("alice", Scope::Agent);
        let output = run_with_stdin(
            &self.socket,
            &[
                "login",
                "--relay",
                self.relay.url().as_str(),
                "--with-token",
            ],
            &format!("{agent}\n"),
        )
        .await;
        assert!(output.status.success(), "{}", stderr(&output));
        assert!(
            stdout(&output).contains("Logged in as alice"),
            "{}",
            stdout(&output)
        );
        agent
    }
}
