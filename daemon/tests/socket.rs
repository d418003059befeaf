//! Where `cloudllmd` puts its IPC socket when nothing names one: never in a directory shared
//! with other users, where another user could bind the name first and catch what the CLI sends.

#![cfg(unix)]

use std::process::Stdio;
use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_cloudllmd");

/// A uid with no entry in the user database, hence no home directory.
const HOMELESS_UID: u32 = 4242;

/// Longest wait for the daemon to give up; a daemon that starts instead runs until killed.
const STEP: Duration = Duration::from_secs(20);

#[tokio::test]
async fn without_home_or_runtime_dir_the_daemon_refuses_to_start_and_says_what_to_set() {
    let shared = std::env::temp_dir().join("cloudllmd.sock");
    let existed = shared.exists();
    // A config file and a state dir of its own, so that only the socket lacks a place.
    let dir = tempfile::tempdir().expect("scratch dir");
    std::os::unix::fs::chown(dir.path(), Some(HOMELESS_UID), Some(HOMELESS_UID))
        .expect("giving the scratch dir to the user");
    let config = dir.path().join("cloudllmd.toml");
    let state = dir.path().join("state");
    std::fs::write(
        &config,
        format!(
            "state_dir = \"{}\"\ncredential_store = \"file\"\n",
            state.display()
        ),
    )
    .expect("writing the config");
    let run = tokio::process::Command::new("setpriv")
        .arg(format!("--reuid={HOMELESS_UID}"))
        .arg(format!("--regid={HOMELESS_UID}"))
        .args(["--clear-groups", BIN, "--config"])
        .arg(&config)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(STEP, run)
        .await
        .expect("the daemon started without a private place for its socket");
    let output = output.expect("running setpriv");
    let err = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{err}");
    assert!(
        err.contains("XDG_RUNTIME_DIR")
            && err.contains("CLOUDLLM_SOCKET")
            && err.contains("socket_path"),
        "{err}"
    );
    assert!(
        existed || !shared.exists(),
        "the daemon created {}",
        shared.display()
    );
}
