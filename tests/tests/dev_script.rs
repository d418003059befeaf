//! `scripts/dev`, the README's first command, as a newcomer runs it: it says so clearly when its
//! port belongs to another program, shows a model that Ollama really has, and stops at once
//! on Ctrl-C whether Ollama is up or down.
//!
//! The script runs the workspace's debug binaries (`CLOUDLLM_DEV_BIN`), built here if missing.

#![cfg(unix)]

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cloudllm_e2e::FakeOllama;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;

/// Longest the script may take from Ctrl-C to its exit. Relay and daemon stop in well under a
/// second when nothing is in flight; the bound leaves room for a loaded CI machine.
const STOP_BOUND: Duration = Duration::from_secs(8);

/// Longest the script may take to say it is running (binaries already built).
const START_BOUND: Duration = Duration::from_secs(60);

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The directory of the workspace's debug binaries, built if one is missing.
fn binaries() -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    // target/debug/deps/dev_script-… → target/debug
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target dir")
        .to_owned();
    let names = ["cloudllm-relay", "cloudllmd", "cloudllm"];
    if names.iter().any(|n| !dir.join(n).exists()) {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
        let status = Command::new(cargo)
            .current_dir(repo())
            .args([
                "build",
                "-p",
                "cloudllm-relay",
                "-p",
                "cloudllm-daemon",
                "-p",
                "cloudllm-cli",
            ])
            .status()
            .expect("running cargo build");
        assert!(status.success(), "building the binaries for scripts/dev");
    }
    dir
}

/// A free loopback port (bound, then let go).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `scripts/dev` in its own process group, killed with everything it started when dropped.
struct Dev {
    child: Child,
    lines: std::sync::mpsc::Receiver<(bool, String)>,
    seen: Vec<(bool, String)>,
}

impl Dev {
    fn start(port: u16, ollama: &str) -> Dev {
        let mut child = Command::new(repo().join("scripts/dev"))
            .env("CLOUDLLM_PORT", port.to_string())
            .env("CLOUDLLM_OLLAMA_URL", ollama)
            .env("CLOUDLLM_DEV_BIN", binaries())
            .env("RUST_LOG", "warn")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .spawn()
            .expect("running scripts/dev");
        let (tx, lines) = std::sync::mpsc::channel();
        for (is_stdout, pipe) in [
            (
                true,
                Box::new(child.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>,
            ),
            (false, Box::new(child.stderr.take().unwrap())),
        ] {
            let tx = tx.clone();
            std::thread::spawn(move || {
                use std::io::BufRead;
                for line in std::io::BufReader::new(pipe).lines().map_while(Result::ok) {
                    let _ = tx.send((is_stdout, line));
                }
            });
        }
        Dev {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// Reads output until a line contains `text`; panics with all output after `limit`.
    fn wait_for(&mut self, text: &str, limit: Duration) {
        let deadline = Instant::now() + limit;
        while !self.seen.iter().any(|(_, l)| l.contains(text)) {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => self.seen.push(line),
                Err(_) => panic!("scripts/dev never printed {text:?}: {:#?}", self.seen),
            }
        }
    }

    /// Waits for the script to exit; returns its success and how long it took.
    fn wait_exit(&mut self, limit: Duration) -> (bool, Duration) {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                self.seen.extend(self.lines.try_iter());
                return (status.success(), start.elapsed());
            }
            assert!(
                start.elapsed() < limit,
                "scripts/dev still running after {limit:?}: {:#?}",
                self.seen
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Ctrl-C as a terminal sends it: SIGINT to the script and everything it started.
    fn ctrl_c(&self) {
        self.signal_group(Signal::SIGINT)
            .expect("SIGINT to scripts/dev");
    }

    fn signal_group(&self, signal: Signal) -> nix::Result<()> {
        let group = i32::try_from(self.child.id()).expect("pid");
        killpg(Pid::from_raw(group), signal)
    }

    fn stdout_has(&self, text: &str) -> bool {
        self.seen.iter().any(|(out, l)| *out && l.contains(text))
    }
}

impl Drop for Dev {
    fn drop(&mut self) {
        let _ = self.signal_group(Signal::SIGKILL);
        let _ = self.child.wait();
    }
}

#[test]
fn a_port_taken_by_another_program_is_refused_clearly() {
    // Another web server on the port: it answers every request with 200, health checks too.
    let other = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = other.local_addr().unwrap().port();
    std::thread::spawn(move || {
        use std::io::{Read, Write};
        for mut conn in other.incoming().map_while(Result::ok) {
            let mut buf = [0u8; 4096];
            let _ = conn.read(&mut buf);
            let _ = conn.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok");
        }
    });
    let mut dev = Dev::start(port, "http://127.0.0.1:9");
    let (ok, _) = dev.wait_exit(START_BOUND);
    assert!(
        !ok,
        "scripts/dev succeeded on a taken port: {:#?}",
        dev.seen
    );
    assert!(
        dev.seen.iter().any(
            |(_, l)| l.contains(&format!("port {port} is already in use"))
                && l.contains("CLOUDLLM_PORT")
        ),
        "{:#?}",
        dev.seen
    );
    assert!(!dev.stdout_has("cloudllm is running"), "{:#?}", dev.seen);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn it_shows_a_model_ollama_has_and_stops_at_once() {
    let ollama = FakeOllama::start().await;
    ollama.set_models(&["smollm2:135m"]);
    let url = ollama.url().to_string();
    let result = tokio::task::spawn_blocking(move || {
        let mut dev = Dev::start(free_port(), url.trim_end_matches('/'));
        dev.wait_for("Ctrl-C stops", START_BOUND);
        assert!(
            dev.stdout_has(r#""model":"smollm2:135m""#),
            "the example should use a model Ollama has: {:#?}",
            dev.seen
        );
        dev.ctrl_c();
        dev.wait_exit(STOP_BOUND)
    })
    .await
    .unwrap();
    assert!(result.1 < STOP_BOUND);
}

#[test]
fn with_ollama_down_it_still_starts_and_stops_at_once() {
    let port = free_port();
    let mut dev = Dev::start(port, "http://127.0.0.1:9");
    dev.wait_for("Ctrl-C stops", START_BOUND);
    // Said on stderr before the banner on stdout, but the two pipes are read apart: wait for it.
    dev.wait_for("Ollama is not answering", START_BOUND);
    assert!(
        dev.seen
            .iter()
            .any(|(out, l)| !out && l.contains("Ollama is not answering")),
        "{:#?}",
        dev.seen
    );
    // A request meets the missing Ollama (502) before the stop, as a first try would.
    let token = dev
        .seen
        .iter()
        .find_map(|(_, l)| l.split("Client token:").nth(1))
        .expect("the client token is printed")
        .trim()
        .to_owned();
    let tags = Command::new("curl")
        .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "-H"])
        .arg(format!("Authorization: Bearer {token}"))
        .arg(format!("http://127.0.0.1:{port}/api/tags"))
        .output()
        .expect("curl");
    assert_eq!(String::from_utf8_lossy(&tags.stdout), "502");
    dev.ctrl_c();
    let (_, took) = dev.wait_exit(STOP_BOUND);
    assert!(took < STOP_BOUND, "{took:?}");
}
