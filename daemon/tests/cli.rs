//! The `cloudllmd` binary: refuses bad settings and says which one; with none at all it starts
//! logged out, waiting for `cloudllm login`, and exits cleanly on SIGTERM.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_cloudllmd");

/// The daemon with an empty environment and a home of its own (so no user config is read and
/// its socket and state land in the scratch dir).
fn daemon(home: &Path) -> Command {
    let mut command = Command::new(BIN);
    command
        .env_clear()
        .env("HOME", home)
        .env("XDG_CONFIG_HOME", home.join("config"))
        .env("XDG_STATE_HOME", home.join("state"))
        .env("XDG_RUNTIME_DIR", home.join("run"))
        .env("PATH", std::env::var_os("PATH").unwrap_or_default());
    command
}

fn scratch(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("cloudllmd-cli-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn stderr_of(command: &mut Command) -> String {
    let output = command.output().unwrap();
    assert!(!output.status.success());
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn bad_settings_are_named() {
    let home = scratch("bad");
    let err = stderr_of(daemon(&home).env("CLOUDLLM_RELAY_URL", "relay.example.com"));
    assert!(
        err.contains("CLOUDLLM_RELAY_URL=\"relay.example.com\" is not a URL"),
        "{err}"
    );

    let err = stderr_of(daemon(&home).env("CLOUDLLM_DEVICE_NAME", "bad\u{7}name"));
    assert!(err.contains("device name"), "{err}");

    let config_dir = home.join("config/cloudllm");
    std::fs::create_dir_all(&config_dir).unwrap();
    std::fs::write(config_dir.join("cloudllmd.toml"), "olama_url = \"x\"\n").unwrap();
    let err = stderr_of(&mut daemon(&home));
    assert!(
        err.contains("cloudllmd.toml") && err.contains("olama_url"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(home);
}

#[test]
fn with_no_settings_it_starts_logged_out_and_stops_on_sigterm() {
    let home = scratch("bare");
    let mut child = daemon(&home)
        .env("RUST_LOG", "info")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (lines_tx, lines_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = lines_tx.send(line);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut ready = false;
    while Instant::now() < deadline {
        if let Ok(line) = lines_rx.recv_timeout(Duration::from_millis(100))
            && line.contains("cloudllmd ready")
        {
            ready = true;
            break;
        }
    }
    assert!(ready, "the daemon did not report ready");
    let socket = home.join("run/cloudllm/cloudllmd.sock");
    assert!(socket.exists(), "socket at {}", socket.display());

    // A second daemon on the same socket refuses to start and leaves the first one alone.
    let err = stderr_of(&mut daemon(&home));
    assert!(err.contains("already running"), "{err}");
    assert!(socket.exists());

    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "no exit after SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{status}");
    assert!(!socket.exists(), "the socket is removed on exit");
    let _ = std::fs::remove_dir_all(home);
}
