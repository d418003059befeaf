//! The web page in headless Chromium (Debian's `chromium`, driven by `playwright-core` from
//! `web/e2e/run.mjs`) against a real relay and two real daemons started here: device
//! `desktop` in front of the genuine Ollama (`scripts/real-ollama`, model `smollm2:135m`) and
//! device `laptop` in front of a fake chat backend (a fake, named so: it answers a fixed
//! Markdown text with `<script>` and `<img onerror>`, and a never-ending stream that records
//! when the client goes away, for the Stop check).
//!
//! Needs `chromium` (Debian: `apt-get install chromium`) and the page's packages
//! (`npm ci --prefix web`, run here when `web/node_modules` is missing). Set
//! `CLOUDLLM_SKIP_WEB_TEST=1` to skip knowingly; otherwise a missing tool fails the test with
//! what to install. Screenshots land in `target/web-screenshots/`.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use cloudllm_e2e::{STEP, TestDaemon, TestRelay, daemon_config, relay_config, token};
use cloudllm_relay::{Keys, Scope};
use tokio::sync::Notify;
use tokio::time::timeout;
use url::Url;

const REAL_MODEL: &str = "smollm2:135m";

/// The first start of the real Ollama installs it (about a minute); later starts take seconds.
const OLLAMA_START: Duration = Duration::from_secs(600);
/// The whole browser run: a dozen checks, two of them waiting for a real model on a CPU.
const BROWSER_RUN: Duration = Duration::from_secs(480);
/// `npm ci` of the page's packages on a cold cache.
const NPM_CI: Duration = Duration::from_secs(300);

/// What the fake model answers: Markdown with a code block, and markup that must never run.
const HOSTILE_MARKDOWN: &str = "Here is **bold** text.\n\n<img src=x onerror=\"window.__pwned='img'\">\n\n<script>window.__pwned='script'</script>\n\n<a href=\"javascript:window.__pwned='link'\">click</a>\n\n```js\nconst answer = 42;\nconsole.log(answer);\n```\n";

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The fake chat backend's record: streams open now, and streams whose client went away.
#[derive(Default)]
struct Fake {
    open: AtomicUsize,
    cancelled: AtomicUsize,
    changed: Notify,
}

/// Counts a stream as cancelled when it is dropped before its end.
struct Guard {
    fake: Arc<Fake>,
    finished: bool,
}

impl Drop for Guard {
    fn drop(&mut self) {
        self.fake.open.fetch_sub(1, Ordering::SeqCst);
        if !self.finished {
            self.fake.cancelled.fetch_add(1, Ordering::SeqCst);
        }
        self.fake.changed.notify_waiters();
    }
}

fn ndjson(line: &serde_json::Value) -> Result<Bytes, std::io::Error> {
    Ok(Bytes::from(format!("{line}\n")))
}

async fn chat(State(fake): State<Arc<Fake>>, body: Bytes) -> Response {
    let request: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
    let model = request["model"].as_str().unwrap_or_default().to_owned();
    fake.open.fetch_add(1, Ordering::SeqCst);
    let guard = Guard {
        fake: fake.clone(),
        finished: false,
    };
    let stream = futures_util::stream::unfold((guard, 0usize), move |(mut guard, n)| {
        let model = model.clone();
        async move {
            if model.starts_with("fake-md") {
                // The hostile text in pieces, a few characters each, then the end.
                let chars: Vec<char> = HOSTILE_MARKDOWN.chars().collect();
                let start = n * 7;
                if start >= chars.len() {
                    if start == usize::MAX {
                        return None;
                    }
                    guard.finished = true;
                    let done = serde_json::json!({"model": model, "message": {"role": "assistant", "content": ""}, "done": true, "done_reason": "stop"});
                    return Some((ndjson(&done), (guard, usize::MAX / 7)));
                }
                let piece: String = chars[start..(start + 7).min(chars.len())].iter().collect();
                tokio::time::sleep(Duration::from_millis(5)).await;
                let line = serde_json::json!({"model": model, "message": {"role": "assistant", "content": piece}, "done": false});
                Some((ndjson(&line), (guard, n + 1)))
            } else {
                // Never ends: only the client going away stops it.
                tokio::time::sleep(Duration::from_millis(100)).await;
                let line = serde_json::json!({"model": model, "message": {"role": "assistant", "content": format!("tick {n} ")}, "done": false});
                Some((ndjson(&line), (guard, n + 1)))
            }
        }
    });
    (
        [(http::header::CONTENT_TYPE, "application/x-ndjson")],
        Body::from_stream(stream),
    )
        .into_response()
}

async fn start_fake() -> (Url, Arc<Fake>, tokio::task::JoinHandle<()>) {
    let fake = Arc::new(Fake::default());
    let app = Router::new()
        .route(
            "/api/version",
            get(|| async { axum::Json(serde_json::json!({"version": "0.0.0-fake"})) }),
        )
        .route(
            "/api/tags",
            get(|| async {
                axum::Json(serde_json::json!({"models": [
                    {"name": "fake-md:latest", "model": "fake-md:latest", "size": 1},
                    {"name": "fake-slow:latest", "model": "fake-slow:latest", "size": 1},
                ]}))
            }),
        )
        .route(
            "/api/show",
            post(|| async {
                axum::Json(serde_json::json!({"capabilities": ["completion"], "details": {"families": ["llama"]}}))
            }),
        )
        .route("/api/chat", post(chat))
        .with_state(fake.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind the fake");
    let url = Url::parse(&format!("http://{}", listener.local_addr().unwrap())).unwrap();
    let task = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (url, fake, task)
}

async fn real_ollama() -> Option<Url> {
    if let Ok(url) = std::env::var("CLOUDLLM_REAL_OLLAMA_URL") {
        return Some(Url::parse(&url).expect("CLOUDLLM_REAL_OLLAMA_URL is a URL"));
    }
    if std::env::var("CLOUDLLM_SKIP_REAL_OLLAMA").as_deref() == Ok("1") {
        return None;
    }
    let tool = repo().join("scripts/real-ollama");
    let output = timeout(
        OLLAMA_START,
        tokio::process::Command::new(&tool).arg("start").output(),
    )
    .await
    .expect("scripts/real-ollama start timed out")
    .unwrap_or_else(|e| panic!("running {}: {e}", tool.display()));
    assert!(
        output.status.success(),
        "scripts/real-ollama start failed (CLOUDLLM_SKIP_WEB_TEST=1 skips this test): {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    let url = stdout
        .lines()
        .last()
        .expect("real-ollama printed its URL")
        .trim();
    Some(Url::parse(url).expect("real-ollama URL"))
}

/// Checks the browser and the page's packages; `false` means skip.
async fn tools_ready() -> bool {
    if std::env::var("CLOUDLLM_SKIP_WEB_TEST").as_deref() == Ok("1") {
        eprintln!("skipping the browser test: CLOUDLLM_SKIP_WEB_TEST=1");
        return false;
    }
    assert!(
        std::path::Path::new(&chromium()).exists(),
        "the browser test needs Chromium at {} (Debian: apt-get install chromium), or set CLOUDLLM_SKIP_WEB_TEST=1",
        chromium()
    );
    let web = repo().join("web");
    if !web
        .join("node_modules/playwright-core/package.json")
        .exists()
    {
        eprintln!(
            "installing the page's packages: npm ci in {}",
            web.display()
        );
        let npm = tokio::process::Command::new("npm")
            .args(["ci", "--no-audit", "--no-fund"])
            .current_dir(&web)
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true)
            .output();
        let out = timeout(NPM_CI, npm)
            .await
            .expect("npm ci timed out")
            .expect("running npm (Debian: apt-get install nodejs npm)");
        assert!(
            out.status.success(),
            "npm ci in web/ failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    true
}

fn chromium() -> String {
    std::env::var("CLOUDLLM_CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_web_page_in_chromium() {
    if !tools_ready().await {
        return;
    }
    let Some(ollama) = real_ollama().await else {
        eprintln!(
            "skipping the browser test: CLOUDLLM_SKIP_REAL_OLLAMA=1 (it needs the real Ollama)"
        );
        return;
    };
    cloudllm_e2e::init_logs();
    // The "other app" origin the relay allows: a port reserved here, served by the browser run.
    let cors_port = {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").expect("reserve a port");
        probe.local_addr().unwrap().port()
    };
    let mut config = relay_config();
    config.allowed_origins = vec![format!("http://127.0.0.1:{cors_port}")];
    let relay = TestRelay::start(config).await;
    let (fake_url, fake, _fake_task) = start_fake().await;
    let _desktop = TestDaemon::start(daemon_config(&relay.url(), "alice", "desktop", &ollama));
    let _laptop = TestDaemon::start(daemon_config(&relay.url(), "alice", "laptop", &fake_url));
    relay.wait_for_devices("alice", 2).await;
    relay
        .wait_for_models("alice", "laptop", &["fake-md:latest", "fake-slow:latest"])
        .await;

    let other_keys = Keys::new(&cloudllm_proto::Secret::new(
        "another-relay-secret-another-relay-secret",
    ));
    let forged = other_keys
        .issue("alice", Scope::Client, None, Duration::from_secs(3600))
        .expect("a token of another relay");
    let expired = cloudllm_e2e::keys()
        .issue("alice", Scope::Client, None, Duration::ZERO)
        .expect("an expired token");
    let screenshots = repo().join("target/web-screenshots");
    let run_config = serde_json::json!({
        "relay": relay.url().as_str(),
        "alice": token("alice", Scope::Client),
        "alice_agent": token("alice", Scope::Agent),
        "bob": token("bob", Scope::Client),
        "forged": forged,
        "expired": expired,
        "real_model": REAL_MODEL,
        "real_device": "desktop",
        "fake_device": "laptop",
        "cors_port": cors_port,
        "screenshots": screenshots,
        "chromium": chromium(),
    });
    let dir = cloudllm_e2e::scratch_dir();
    let config_path = dir.join("web-e2e.json");
    std::fs::write(&config_path, run_config.to_string()).expect("write the run's config");
    let run = tokio::process::Command::new("node")
        .arg(repo().join("web/e2e/run.mjs"))
        .arg(&config_path)
        .current_dir(repo().join("web"))
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    let output = timeout(BROWSER_RUN, run)
        .await
        .expect("the browser run timed out")
        .expect("running node web/e2e/run.mjs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    println!("{stdout}");
    assert!(
        output.status.success(),
        "the browser run failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    // Stop reached the backend: the endless stream's client went away.
    timeout(STEP, async {
        loop {
            let changed = fake.changed.notified();
            if fake.cancelled.load(Ordering::SeqCst) >= 1 && fake.open.load(Ordering::SeqCst) == 0 {
                return;
            }
            changed.await;
        }
    })
    .await
    .expect("the backend never saw the stopped request cancelled");
    for name in [
        "signin",
        "chat",
        "markdown",
        "chat-dark",
        "phone",
        "offline",
    ] {
        let shot = screenshots.join(format!("{name}.png"));
        let size = std::fs::metadata(&shot).map(|m| m.len()).unwrap_or(0);
        assert!(
            size > 1000,
            "screenshot {} missing or empty",
            shot.display()
        );
    }
    relay.stop().await;
}
