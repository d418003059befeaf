//! The `cloudllm` CLI against a running daemon (in-process, with its own socket), a relay and
//! a fake Ollama: every command, `--json` parsed back, exit codes, and what a user sees when
//! the daemon is not there.

use cloudllm_e2e::STEP;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

mod common;

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_command_says_in_one_line_when_the_daemon_is_not_running() {
    let socket =
        std::env::temp_dir().join(format!("cloudllm-nodaemon-{}.sock", std::process::id()));
    for args in [
        &["status"][..],
        &["connect"],
        &["logs"],
        &["config", "get"],
        &["models"],
        &["logout"],
        &["open", "--print"],
    ] {
        let output = run(&socket, args).await;
        assert_eq!(output.status.code(), Some(3), "{args:?}");
        let err = stderr(&output);
        assert_eq!(err.trim().lines().count(), 1, "{err}");
        assert!(
            err.contains("not running") && err.contains("cloudllm daemon"),
            "{err}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_with_token_connects_and_status_shows_the_user() {
    let f = Fixture::start().await;
    let (code, status) = status_json(&f.socket).await;
    assert_eq!(code, 4, "not connected before login");
    assert_eq!(status["connection"]["state"], "logged_out");
    let human = stdout(&run(&f.socket, &["status"]).await);
    assert!(
        human.contains("logged out") && human.contains("cloudllm login"),
        "{human}"
    );

    let agent = f.login().await;
    let status = wait_connection(&f.socket, "connected").await;
    assert_eq!(status["user"], "alice");
    assert_eq!(status["device_name"], "laptop");
    assert!(
        status["credential_store"]
            .as_str()
            .unwrap()
            .starts_with("file "),
        "{status}"
    );
    let (code, _) = status_json(&f.socket).await;
    assert_eq!(code, 0);
    f.relay.wait_for_devices("alice", 1).await;

    // A request through the relay is counted by the daemon.
    let response = f.relay.get_as("alice", "/api/tags").await;
    assert_eq!(response.status(), 200);
    let status = wait_status(&f.socket, "counted", |s| s["requests_total"] == 1).await;
    assert_eq!(status["ollama"]["state"], "up");

    // The token is stored privately and shows up nowhere else.
    let secret_part = agent.rsplit('.').next().unwrap();
    let stored = f.state_dir.join("credentials.json");
    assert!(
        std::fs::read_to_string(&stored)
            .unwrap()
            .contains(secret_part)
    );
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&stored).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }
    let config_text = std::fs::read_to_string(&f.config_file).unwrap();
    assert!(
        config_text.contains("relay_url") && !config_text.contains(secret_part),
        "{config_text}"
    );
    for args in [
        &["status"][..],
        &["status", "--json"],
        &["logs", "-n", "1000"],
        &["config", "get"],
    ] {
        let output = run(&f.socket, args).await;
        assert!(
            !stdout(&output).contains(secret_part),
            "token leaked by {args:?}"
        );
    }

    // Human status: connected, relay, user, Ollama.
    let human = stdout(&run(&f.socket, &["status"]).await);
    assert!(human.contains("connected to http://127.0.0.1:"), "{human}");
    assert!(
        human.contains("alice") && human.contains("up, version 0.0.0-fake, 1 model\n"),
        "{human}"
    );
    assert!(
        !human.contains('\x1b'),
        "no colour when NO_COLOR is set or not a terminal"
    );

    // Logout forgets the credentials and closes the tunnel.
    assert!(run(&f.socket, &["logout"]).await.status.success());
    f.relay.wait_for_devices("alice", 0).await;
    assert!(!stored.exists());
    let (code, status) = status_json(&f.socket).await;
    assert_eq!(
        (code, status["connection"]["state"].as_str()),
        (4, Some("logged_out"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_token_is_reported_as_login_required() {
    let f = Fixture::start().await;
    let relay = f.relay.url();
    let login = ["login", "--relay", relay.as_str(), "--with-token"];
    // What the daemon can check is refused at once, saying why, and nothing is stored.
    let output = run_with_stdin(&f.socket, &login, "not.a.valid-token").await;
    assert_fails_saying(&output, "not a cloudllm token");
    assert!(!f.state_dir.join("credentials.json").exists());
    // The signature it cannot check (only the relay holds the key): a token signed by another
    // relay is taken on trust, and the relay decides.
    let foreign = cloudllm_relay::Keys::new(&cloudllm_proto::Secret::new(
        "another-relays-secret-another-relays-secret",
    ))
    .issue(
        "alice",
        cloudllm_relay::Scope::Agent,
        None,
        std::time::Duration::from_secs(3600),
    )
    .unwrap();
    let output = run_with_stdin(&f.socket, &login, &foreign).await;
    assert!(
        output.status.success(),
        "the daemon takes the signature on trust; the relay decides"
    );
    let status = wait_connection(&f.socket, "login_required").await;
    assert!(
        status["connection"]["reason"]
            .as_str()
            .unwrap()
            .contains("cloudllm login"),
        "{status}"
    );
    let empty = run_with_stdin(&f.socket, &["login", "--with-token"], "").await;
    assert_fails_saying(&empty, "no token on standard input");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disconnect_and_connect_close_and_reopen_the_tunnel() {
    let f = Fixture::start().await;
    f.login().await;
    f.relay.wait_for_devices("alice", 1).await;
    let output = run(&f.socket, &["disconnect"]).await;
    assert!(output.status.success(), "{}", stderr(&output));
    f.relay.wait_for_devices("alice", 0).await;
    let (code, status) = status_json(&f.socket).await;
    assert_eq!(
        (code, status["connection"]["state"].as_str()),
        (4, Some("disconnected"))
    );
    assert!(run(&f.socket, &["connect"]).await.status.success());
    f.relay.wait_for_devices("alice", 1).await;
    wait_connection(&f.socket, "connected").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_get_set_and_path() {
    let f = Fixture::start().await;
    let output = run(&f.socket, &["config", "path"]).await;
    assert_eq!(stdout(&output).trim(), f.config_file.display().to_string());

    let output = run(&f.socket, &["config", "set", "device_name", "workstation"]).await;
    assert!(output.status.success(), "{}", stderr(&output));
    assert_eq!(
        stdout(&run(&f.socket, &["config", "get", "device_name"]).await).trim(),
        "workstation"
    );
    let all: serde_json::Value =
        serde_json::from_slice(&run(&f.socket, &["config", "get", "--json"]).await.stdout).unwrap();
    assert_eq!(all["device_name"], "workstation");
    assert_eq!(all["allow_model_management"], "false");
    assert!(
        std::fs::read_to_string(&f.config_file)
            .unwrap()
            .contains("device_name = \"workstation\"")
    );
    let (_, status) = status_json(&f.socket).await;
    assert_eq!(status["device_name"], "workstation");

    let bad = run(&f.socket, &["config", "set", "colour", "red"]).await;
    assert_fails_saying(&bad, "unknown setting \"colour\"");
    let bad = run(&f.socket, &["config", "set", "ollama_url", "not a url"]).await;
    assert_fails_saying(&bad, "ollama_url");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn models_lists_what_the_relay_will_see() {
    let f = Fixture::start().await;
    assert_eq!(
        stdout(&run(&f.socket, &["models"]).await).trim(),
        "fake:latest"
    );
    let models: Vec<String> =
        serde_json::from_slice(&run(&f.socket, &["models", "--json"]).await.stdout).unwrap();
    assert_eq!(models, ["fake:latest"]);
    drop(f.backend);
    let output = run(&f.socket, &["models"]).await;
    assert_fails_saying(&output, "cannot reach Ollama");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_watch_streams_every_change() {
    let f = Fixture::start().await;
    f.login().await;
    wait_connection(&f.socket, "connected").await;
    let mut watcher = cli(&f.socket)
        .args(["status", "--watch", "--json"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(watcher.stdout.take().unwrap()).lines();
    let first: serde_json::Value = serde_json::from_str(
        &tokio::time::timeout(STEP, lines.next_line())
            .await
            .unwrap()
            .unwrap()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(first["connection"]["state"], "connected");
    assert!(run(&f.socket, &["disconnect"]).await.status.success());
    let deadline = tokio::time::Instant::now() + STEP;
    loop {
        let line = tokio::time::timeout_at(deadline, lines.next_line())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        let status: serde_json::Value = serde_json::from_str(&line).unwrap();
        if status["connection"]["state"] == "disconnected" {
            break;
        }
    }
    watcher.kill().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_show_recent_lines_and_follow_new_ones() {
    let f = Fixture::start().await;
    let output = run(&f.socket, &["logs", "-n", "1000"]).await;
    assert!(output.status.success());
    assert!(
        stdout(&output).contains("cloudllmd ready"),
        "{}",
        stdout(&output)
    );

    // `-n 1`: the daemon subscribes the follower to new lines before it sends the recent one,
    // so once that line is here, nothing logged later can be missed.
    let mut follower = cli(&f.socket)
        .args(["logs", "-f", "-n", "1"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(follower.stdout.take().unwrap()).lines();
    let deadline = tokio::time::Instant::now() + STEP;
    let recent = tokio::time::timeout_at(deadline, lines.next_line())
        .await
        .expect("the follower printed no recent line")
        .unwrap();
    assert!(recent.is_some(), "the follower ended");
    // Then make the daemon log something no other test in this binary (they share the
    // daemon's log buffer) logs: a change of this one setting.
    assert!(
        run(&f.socket, &["config", "set", "reconnect_max", "3s"])
            .await
            .status
            .success()
    );
    loop {
        let line = tokio::time::timeout_at(deadline, lines.next_line())
            .await
            .expect("the follower never showed the setting change")
            .unwrap()
            .expect("the follower ended");
        if line.contains("setting changed") && line.contains("reconnect_max") {
            break;
        }
    }
    follower.kill().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completions_are_printed_for_each_shell() {
    for shell in ["bash", "zsh", "fish", "powershell"] {
        let output = tokio::time::timeout(
            STEP,
            Command::new(BIN).args(["completions", shell]).output(),
        )
        .await
        .unwrap()
        .unwrap();
        assert!(output.status.success(), "{shell}");
        assert!(stdout(&output).contains("cloudllm"), "{shell}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemon_runs_the_cloudllmd_beside_it_with_its_arguments() {
    let dir = cloudllm_e2e::scratch_dir();
    let cli_copy = dir.join("cloudllm");
    std::fs::copy(BIN, &cli_copy).unwrap();
    // Alone, it says what is missing.
    let output = tokio::time::timeout(
        STEP,
        Command::new(&cli_copy)
            .args(["daemon"])
            .env("PATH", "")
            .output(),
    )
    .await
    .unwrap()
    .unwrap();
    assert_fails_saying(&output, "is cloudllmd installed?");
    // With a cloudllmd beside it, that one runs, with the arguments and its exit code.
    let fake = dir.join("cloudllmd");
    std::fs::write(&fake, "#!/bin/sh\necho \"cloudllmd got: $*\"\nexit 7\n").unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let output = tokio::time::timeout(
        STEP,
        Command::new(&cli_copy)
            .args(["daemon", "--system", "--config", "x.toml"])
            .output(),
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(output.status.code(), Some(7));
    assert_eq!(
        stdout(&output).trim(),
        "cloudllmd got: --system --config x.toml"
    );
    // On Unix it becomes cloudllmd (same process), so `cloudllm daemon &` then `kill $!`
    // stops the daemon itself and leaves no orphan behind.
    #[cfg(unix)]
    {
        std::fs::write(&fake, "#!/bin/sh\necho \"pid $$\"\n").unwrap();
        let child = Command::new(&cli_copy)
            .arg("daemon")
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let pid = child.id().unwrap();
        let output = tokio::time::timeout(STEP, child.wait_with_output())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(stdout(&output).trim(), format!("pid {pid}"));
    }
}

#[test]
fn output_into_a_closed_pipe_ends_quietly() {
    // `cloudllm completions bash | head -1`: the reader is gone before the first write.
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let output = std::process::Command::new(BIN)
        .args(["completions", "bash"])
        .stdout(writer)
        .stderr(std::process::Stdio::piped())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(output.status.success(), "{:?} {stderr}", output.status);
}
