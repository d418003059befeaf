//! Zero storage: the relay binary runs as an unprivileged user in a working directory it cannot
//! write, with a HOME that does not exist, and every route works — tunnel, streamed API calls
//! on both APIs, listings, discovery, health, metrics, refusals. Afterwards the working
//! directory is still empty and the relay left no file in the temporary directory: the only
//! output is its log and the audit log on standard output, as configured.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Stdio};
use std::time::{Duration, SystemTime};

use cloudllm_e2e::{FakeOllama, SECRET, TestDaemon, client, daemon_config, init_logs, token};
use cloudllm_relay::Scope;
use common::{BIN, lines_of, wait_listening, with_piped_log};
/// The unprivileged user the relay runs as (`nobody`).
const NOBODY: u32 = 65534;
const STEP: Duration = Duration::from_secs(20);

/// Files under `dir` (one level down too) owned by `uid` and changed after `since`.
fn files_of(uid: u32, dir: &std::path::Path, since: SystemTime) -> Vec<std::path::PathBuf> {
    use std::os::unix::fs::MetadataExt;
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return found;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if let Ok(meta) = std::fs::symlink_metadata(&path) {
            if meta.uid() == uid && meta.modified().is_ok_and(|m| m >= since) {
                found.push(path.clone());
            }
            if meta.is_dir()
                && let Ok(inner) = std::fs::read_dir(&path)
            {
                for inner in inner.flatten() {
                    if let Ok(meta) = inner.metadata()
                        && meta.uid() == uid
                        && meta.modified().is_ok_and(|m| m >= since)
                    {
                        found.push(inner.path());
                    }
                }
            }
        }
    }
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_serves_every_route_without_writing_a_file() {
    init_logs();
    assert!(
        is_root(),
        "this test runs the relay as another user with setpriv: run the tests as root (CI does)"
    );
    let root = std::env::temp_dir().join(format!("cloudllm-readonly-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let cwd = root.join("cwd");
    std::fs::create_dir_all(&cwd).unwrap();
    std::fs::write(
        root.join("relay.toml"),
        "listen = \"127.0.0.1:0\"\naudit_log = \"-\"\ndefault_tier = \"premium\"\n",
    )
    .unwrap();
    for (path, mode) in [(&root, 0o755), (&cwd, 0o555)] {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    }
    let started = SystemTime::now() - Duration::from_secs(1);

    let mut relay = Command::new("setpriv");
    relay
        .args([
            format!("--reuid={NOBODY}"),
            format!("--regid={NOBODY}"),
            "--clear-groups".to_owned(),
            BIN.to_owned(),
            "serve".to_owned(),
            "--config".to_owned(),
        ])
        .arg(root.join("relay.toml"))
        .current_dir(&cwd)
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .env("HOME", "/nonexistent")
        .env("CLOUDLLM_RELAY_SECRET", SECRET);
    let mut relay = with_piped_log(&mut relay)
        .stdout(Stdio::piped())
        .spawn()
        .expect("setpriv (util-linux) runs the relay");
    let log = lines_of(relay.stderr.take().expect("a piped log"));
    let audit_rx = lines_of(relay.stdout.take().expect("a piped audit log"));
    let (addr, _) = wait_listening(&log, STEP);
    let base = format!("http://{addr}");

    let backend = FakeOllama::start().await;
    let relay_url = url::Url::parse(&base).unwrap();
    let _daemon = TestDaemon::start(daemon_config(&relay_url, "alice", "laptop", &backend.url()));
    let http = client();
    let user = token("alice", Scope::Client);
    let deadline = tokio::time::Instant::now() + STEP;
    loop {
        let tags = http
            .get(format!("{base}/api/tags"))
            .bearer_auth(&user)
            .send()
            .await
            .unwrap();
        if tags.status() == 200 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the daemon never connected"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    for (path, status) in [
        ("/healthz", 200),
        ("/readyz", 200),
        ("/.well-known/cloudllm", 200),
        ("/metrics", 200),
        ("/nothing-here", 404),
    ] {
        let response = http.get(format!("{base}{path}")).send().await.unwrap();
        assert_eq!(response.status(), status, "{path}");
    }
    for (method, path, body, status) in [
        ("GET", "/api/tags", None, 200),
        ("GET", "/v1/models", None, 200),
        ("POST", "/api/show", Some(r#"{"model":"fake"}"#), 200),
        (
            "POST",
            "/api/generate",
            Some(r#"{"model":"fake","prompt":"p","options":{"num_predict":3}}"#),
            200,
        ),
        (
            "POST",
            "/v1/chat/completions",
            Some(r#"{"model":"fake","stream":true,"messages":[{"role":"user","content":"hi"}]}"#),
            200,
        ),
        ("POST", "/api/pull", Some(r#"{"model":"fake"}"#), 403),
    ] {
        let mut request = http
            .request(method.parse().unwrap(), format!("{base}{path}"))
            .bearer_auth(&user);
        if let Some(body) = body {
            request = request.body(body);
        }
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), status, "{method} {path}");
        response.bytes().await.unwrap();
    }
    let refused = http
        .get(format!("{base}/api/tags"))
        .bearer_auth("forged")
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 401);

    // The audit log went to standard output, as configured.
    let mut events = Vec::new();
    while let Ok(line) = audit_rx.recv_timeout(Duration::from_secs(2)) {
        events.push(line);
        if events.iter().any(|l| l.contains("auth_failure")) {
            break;
        }
    }
    assert!(
        events.iter().any(|l| l.contains("tunnel_connect")),
        "audit lines: {events:?}"
    );

    let _ = relay.kill();
    let _ = relay.wait();
    let left: Vec<_> = std::fs::read_dir(&cwd).unwrap().flatten().collect();
    assert!(
        left.is_empty(),
        "the relay wrote into its working directory: {left:?}"
    );
    let stray = files_of(NOBODY, &std::env::temp_dir(), started);
    assert!(
        stray.is_empty(),
        "the relay wrote temporary files: {stray:?}"
    );
    let _ = std::fs::remove_dir_all(&root);
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|out| String::from_utf8_lossy(&out.stdout).trim() == "0")
}
