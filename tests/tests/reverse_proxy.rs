//! The relay in plain HTTP behind a real nginx configured with exactly the snippet the README
//! points operators to (`packaging/nginx/cloudllm-relay.conf`): the daemon's WebSocket upgrade
//! on `/tunnel` passes, and a streamed answer reaches the client line by line, not buffered.
//!
//! Needs the `nginx` binary (Debian package `nginx`); `CLOUDLLM_SKIP_NGINX_TEST=1` skips the test
//! where it is missing.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use cloudllm_e2e::{
    FakeOllama, STEP, TestDaemon, TestRelay, daemon_config, relay_config, scratch_dir, token,
};
use cloudllm_relay::Scope;
use serde_json::json;
use tokio::time::{Instant, timeout};
use url::Url;

/// The snippet operators include, from the repository.
fn snippet() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../packaging/nginx/cloudllm-relay.conf")
        .canonicalize()
        .expect("packaging/nginx/cloudllm-relay.conf")
}

/// The nginx binary, or `None` when it is missing and the test may be skipped.
fn nginx_binary() -> Option<PathBuf> {
    let found = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|path| std::env::split_paths(&path).collect::<Vec<_>>())
        .chain([PathBuf::from("/usr/sbin")])
        .map(|dir| dir.join("nginx"))
        .find(|path| path.is_file());
    if found.is_none() {
        if std::env::var("CLOUDLLM_SKIP_NGINX_TEST").as_deref() == Ok("1") {
            eprintln!("skipping: nginx not found and CLOUDLLM_SKIP_NGINX_TEST=1");
            return None;
        }
        panic!(
            "nginx not found: install it (Debian: nginx), or set CLOUDLLM_SKIP_NGINX_TEST=1 to skip"
        );
    }
    found
}

/// An nginx in the foreground, one process, with its files in a scratch directory.
struct Nginx {
    child: Child,
    addr: SocketAddr,
    dir: PathBuf,
}

impl Nginx {
    /// Starts nginx on a free loopback port in front of `relay`, with the snippet included in
    /// its `server` block.
    ///
    /// nginx cannot be given port 0, so the port is one the kernel just handed out and this
    /// test released; should another process take it in between, nginx fails to bind and the
    /// next port is tried.
    async fn start(binary: &Path, relay: SocketAddr) -> Nginx {
        for _ in 0..5 {
            let dir = scratch_dir();
            let addr = std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .unwrap();
            let temp = |name: &str| dir.join(name).display().to_string();
            let conf = format!(
                "daemon off;\n\
                 master_process off;\n\
                 worker_processes 1;\n\
                 pid {pid};\n\
                 error_log {log} info;\n\
                 events {{ worker_connections 256; }}\n\
                 http {{\n\
                 access_log off;\n\
                 client_body_temp_path {body};\n\
                 proxy_temp_path {proxy};\n\
                 fastcgi_temp_path {fastcgi};\n\
                 uwsgi_temp_path {uwsgi};\n\
                 scgi_temp_path {scgi};\n\
                 upstream cloudllm_relay {{ server {relay}; keepalive 8; }}\n\
                 server {{\n\
                 listen {addr};\n\
                 include {snippet};\n\
                 }}\n\
                 }}\n",
                pid = temp("nginx.pid"),
                log = temp("error.log"),
                body = temp("body"),
                proxy = temp("proxy"),
                fastcgi = temp("fastcgi"),
                uwsgi = temp("uwsgi"),
                scgi = temp("scgi"),
                snippet = snippet().display(),
            );
            let conf_path = dir.join("nginx.conf");
            std::fs::write(&conf_path, conf).unwrap();
            let child = Command::new(binary)
                .arg("-p")
                .arg(&dir)
                .arg("-e")
                .arg(dir.join("error.log"))
                .arg("-c")
                .arg(&conf_path)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("starting nginx");
            let mut nginx = Nginx { child, addr, dir };
            if nginx.wait_ready().await {
                return nginx;
            }
        }
        panic!("nginx did not start in five attempts");
    }

    /// Waits until nginx accepts connections; `false` if it exited (its port was taken).
    async fn wait_ready(&mut self) -> bool {
        let deadline = Instant::now() + STEP;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                let log = std::fs::read_to_string(self.dir.join("error.log")).unwrap_or_default();
                assert!(
                    log.contains("Address already in use"),
                    "nginx exited ({status}):\n{log}"
                );
                return false;
            }
            if tokio::net::TcpStream::connect(self.addr).await.is_ok() {
                return true;
            }
            assert!(Instant::now() < deadline, "nginx did not start listening");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn url(&self) -> Url {
        Url::parse(&format!("http://{}", self.addr)).unwrap()
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn behind_nginx_the_tunnel_connects_and_streams_arrive_line_by_line() {
    cloudllm_e2e::init_logs();
    let Some(binary) = nginx_binary() else {
        return;
    };
    let relay = TestRelay::start(relay_config()).await;
    let nginx = Nginx::start(&binary, relay.relay.addr).await;
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
    let response = timeout(
        STEP,
        cloudllm_e2e::client()
            .post(format!("{}api/generate", nginx.url()))
            .bearer_auth(token("alice", Scope::Client))
            .json(&json!({"prompt": "via-nginx", "options": {"num_predict": lines}, "fake_interval_ms": 100}))
            .send(),
    )
    .await
    .unwrap()
    .unwrap();
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
    let missing = timeout(
        STEP,
        cloudllm_e2e::client()
            .get(format!("{}api/tags", nginx.url()))
            .send(),
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(missing.status(), 401);
    let tags = timeout(
        STEP,
        cloudllm_e2e::client()
            .get(format!("{}api/tags", nginx.url()))
            .bearer_auth(token("alice", Scope::Client))
            .send(),
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(tags.status(), 200);
    relay.stop().await;
}
