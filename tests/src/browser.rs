//! The web page's browser runs, for the tests that drive it: checks that Chromium and the
//! page's packages are there ([`tools_ready`]), runs one of `web/e2e/*.mjs` with a config
//! ([`run_script`]), and a fake chat backend ([`FakeChat`], a fake, named so) whose answers the
//! page renders: a fixed Markdown text with `<script>` and `<img onerror>` for models named
//! `fake-md…`; for `fake-echo…` and `fake-vision…` an answer that names the request's number,
//! the question it answers, the model and the fake (for regenerate, edit, and which device
//! answered); `fake-think…` and `fake-r1…` answer the same after some thinking, the one in
//! Ollama's `message.thinking` field, the other in `<think>…</think>` at the start of the
//! text; for any other model a never-ending stream that records when the client goes away, for
//! the Stop check. `fake-vision…` is the one model whose `/api/show` lists the `vision`
//! capability. The fake keeps the images and the chat requests it receives, and shows the
//! requests at `GET /fake/requests`, so that a browser run can check what reached the backend.
//!
//! Needs `chromium` (Debian: `apt-get install chromium`; `CLOUDLLM_CHROMIUM` names another) and
//! Node.js; `npm ci` runs in `web/` when its packages are missing. `CLOUDLLM_SKIP_WEB_TEST=1`
//! skips knowingly; otherwise a missing tool fails the test with what to install.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use tokio::sync::Notify;
use tokio::time::timeout;
use url::Url;

use crate::STEP;

/// `npm ci` on a cold cache downloads a few dozen packages: a minute is plenty; 5 leaves room
/// for a slow registry.
const NPM_CI: Duration = Duration::from_secs(300);

/// What the fake model answers: Markdown with a code block, and markup that must never run.
pub const HOSTILE_MARKDOWN: &str = "Here is **bold** text.\n\n<img src=x onerror=\"window.__pwned='img'\">\n\n<script>window.__pwned='script'</script>\n\n<a href=\"javascript:window.__pwned='link'\">click</a>\n\n```js\nconst answer = 42;\nconsole.log(answer);\n```\n";

/// The workspace's root.
pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The Chromium the runs drive: `CLOUDLLM_CHROMIUM`, else Debian's.
pub fn chromium() -> String {
    std::env::var("CLOUDLLM_CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".to_owned())
}

/// Where the runs save their screenshots.
pub fn screenshots() -> PathBuf {
    repo().join("target/web-screenshots")
}

/// Smallest screenshot that shows something: a blank page's PNG is a few hundred bytes.
const MIN_SCREENSHOT_BYTES: u64 = 1000;

/// Asserts that the run saved each of the screenshots `names` (in [`screenshots`], without
/// `.png`) and that none is blank.
pub fn assert_screenshots(names: &[&str]) {
    for name in names {
        let shot = screenshots().join(format!("{name}.png"));
        let size = std::fs::metadata(&shot).map(|m| m.len()).unwrap_or(0);
        assert!(
            size > MIN_SCREENSHOT_BYTES,
            "screenshot {} missing or empty",
            shot.display()
        );
    }
}

/// Checks the browser and the page's packages (installing the packages when missing); `false`
/// means skip.
pub async fn tools_ready() -> bool {
    if std::env::var("CLOUDLLM_SKIP_WEB_TEST").as_deref() == Ok("1") {
        eprintln!("skipping the browser test: CLOUDLLM_SKIP_WEB_TEST=1");
        return false;
    }
    assert!(
        std::path::Path::new(&chromium()).exists(),
        "the browser test needs Chromium at {} (Debian: apt-get install chromium), or set CLOUDLLM_SKIP_WEB_TEST=1",
        chromium()
    );
    npm_ci(
        &repo().join("web"),
        "playwright-core",
        "the page's packages",
    )
    .await;
    true
}

/// Runs `npm ci` in `dir` (naming `what` it installs) unless the `package` it needs is
/// installed there already; panics, saying why, when it fails.
pub async fn npm_ci(dir: &Path, package: &str, what: &str) {
    if dir
        .join("node_modules")
        .join(package)
        .join("package.json")
        .exists()
    {
        return;
    }
    eprintln!("installing {what}: npm ci in {}", dir.display());
    let npm = tokio::process::Command::new("npm")
        .args(["ci", "--no-audit", "--no-fund"])
        .current_dir(dir)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = timeout(NPM_CI, npm)
        .await
        .expect("npm ci timed out")
        .expect("running npm (install it with Node.js; Debian: apt-get install nodejs npm)");
    assert!(
        out.status.success(),
        "npm ci in {} failed:\n{}",
        dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs `web/e2e/{script}` with `config` (written to a file; `chromium` and `screenshots` are
/// added) within `within`, prints its report and panics when a check failed. Returns its
/// standard output: one line per check.
pub async fn run_script(script: &str, config: serde_json::Value, within: Duration) -> String {
    let mut config = config;
    if let Some(fields) = config.as_object_mut() {
        fields.insert("chromium".into(), chromium().into());
        fields.insert(
            "screenshots".into(),
            screenshots().display().to_string().into(),
        );
    }
    let path = crate::scratch_dir().join("web-e2e.json");
    std::fs::write(&path, config.to_string()).expect("write the run's config");
    let run = tokio::process::Command::new("node")
        .arg(repo().join("web/e2e").join(script))
        .arg(&path)
        .current_dir(repo().join("web"))
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    let output = timeout(within, run)
        .await
        .unwrap_or_else(|_| panic!("the browser run {script} timed out"))
        .unwrap_or_else(|e| panic!("running node web/e2e/{script}: {e}"));
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    println!("{stdout}");
    assert!(
        output.status.success(),
        "the browser run {script} failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

/// The fake chat backend's record: streams open now, streams whose client went away, and the
/// requests received.
#[derive(Default)]
pub struct FakeChat {
    /// Which fake this is, named in its echo answers (e.g. the device it stands behind).
    pub label: String,
    /// Chat streams open now.
    pub open: AtomicUsize,
    /// Chat streams whose client went away before their end.
    pub cancelled: AtomicUsize,
    /// Chat requests received.
    pub chats: AtomicUsize,
    /// The base64 images of every message of every chat request received, in order.
    pub images: Mutex<Vec<String>>,
    /// Every chat request received (its JSON body, or `null` when it was not JSON), in order;
    /// served at `GET /fake/requests`.
    pub requests: Mutex<Vec<serde_json::Value>>,
    /// Told at every change of the counts above.
    pub changed: Notify,
}

impl FakeChat {
    /// The models the fake lists, sorted (as the relay reports a device's models).
    pub const MODELS: [&str; 6] = [
        "fake-echo:latest",
        "fake-md:latest",
        "fake-r1:latest",
        "fake-slow:latest",
        "fake-think:latest",
        "fake-vision:latest",
    ];

    /// Starts the fake on `127.0.0.1:0`, labelled `fake`: its URL, its record, and its task. It
    /// lists [`FakeChat::MODELS`].
    pub async fn start() -> (Url, Arc<FakeChat>, tokio::task::JoinHandle<()>) {
        Self::start_labelled("fake").await
    }

    /// [`FakeChat::start`] for a fake named `label` in its echo answers.
    pub async fn start_labelled(label: &str) -> (Url, Arc<FakeChat>, tokio::task::JoinHandle<()>) {
        let fake = Arc::new(FakeChat {
            label: label.to_owned(),
            ..FakeChat::default()
        });
        let app = Router::new()
            .route(
                "/api/version",
                get(|| async { axum::Json(serde_json::json!({"version": "0.0.0-fake"})) }),
            )
            .route(
                "/api/tags",
                get(|| async {
                    let models: Vec<_> = FakeChat::MODELS
                        .iter()
                        .map(|name| serde_json::json!({"name": name, "model": name, "size": 1}))
                        .collect();
                    axum::Json(serde_json::json!({ "models": models }))
                }),
            )
            .route("/api/show", post(show))
            .route("/api/chat", post(chat))
            .route("/fake/requests", get(requests))
            .with_state(fake.clone());
        let (addr, task) = crate::serve_on_loopback(app, "fake").await;
        let url = Url::parse(&format!("http://{addr}")).expect("the fake's URL");
        (url, fake, task)
    }

    /// Waits until a stream was cancelled by its client and none is open.
    pub async fn wait_cancelled(&self) {
        timeout(STEP, async {
            loop {
                let changed = self.changed.notified();
                if self.cancelled.load(Ordering::SeqCst) >= 1
                    && self.open.load(Ordering::SeqCst) == 0
                {
                    return;
                }
                changed.await;
            }
        })
        .await
        .expect("the backend never saw the stopped request cancelled");
    }
}

/// Counts a stream as cancelled when it is dropped before its end.
struct Guard {
    fake: Arc<FakeChat>,
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

/// `/api/show`: only `fake-vision…` lists the `vision` capability.
async fn show(body: Bytes) -> Response {
    let request: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
    let model = request["model"].as_str().unwrap_or_default();
    let capabilities = if model.starts_with("fake-vision") {
        serde_json::json!(["completion", "vision"])
    } else {
        serde_json::json!(["completion"])
    };
    axum::Json(
        serde_json::json!({"capabilities": capabilities, "details": {"families": ["llama"]}}),
    )
    .into_response()
}

/// `GET /fake/requests`: the chat requests received, as a JSON array.
async fn requests(State(fake): State<Arc<FakeChat>>) -> Response {
    let all = fake
        .requests
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    axum::Json(serde_json::Value::Array(all)).into_response()
}

/// The last question of a chat request.
fn question(request: &serde_json::Value) -> String {
    let messages = request["messages"].as_array().cloned().unwrap_or_default();
    messages
        .iter()
        .rev()
        .find(|m| m["role"] == "user")
        .and_then(|m| m["content"].as_str())
        .unwrap_or_default()
        .to_owned()
}

/// What the echoing models answer to the chat request numbered `number`: which request it
/// was, the last question, how many images came with the request, the model and the fake.
fn echo(fake: &FakeChat, number: usize, request: &serde_json::Value, images: usize) -> String {
    let question = question(request);
    let model = request["model"].as_str().unwrap_or_default();
    format!(
        "Answer {number} to: {question} (saw {images} images) — {model} on {}\n",
        fake.label
    )
}

/// One piece of a streamed answer: `true` for thinking (Ollama's `message.thinking`).
type Piece = (bool, String);

/// `text` in pieces of a few characters each, as a model streams it.
fn pieces(thinking: bool, text: &str) -> Vec<Piece> {
    let chars: Vec<char> = text.chars().collect();
    chars
        .chunks(7)
        .map(|c| (thinking, c.iter().collect()))
        .collect()
}

fn ndjson(line: &serde_json::Value) -> Result<Bytes, std::io::Error> {
    Ok(Bytes::from(format!("{line}\n")))
}

async fn chat(State(fake): State<Arc<FakeChat>>, body: Bytes) -> Response {
    let request: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
    let model = request["model"].as_str().unwrap_or_default().to_owned();
    let number = fake.chats.fetch_add(1, Ordering::SeqCst) + 1;
    fake.requests
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(request.clone());
    let images: Vec<String> = request["messages"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|m| m["images"].as_array().cloned().unwrap_or_default())
        .filter_map(|i| i.as_str().map(str::to_owned))
        .collect();
    let seen = images.len();
    fake.images
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .extend(images);
    let thought = format!("Pondering {} step by step.", question(&request));
    // `None`: the never-ending stream.
    let answer: Option<Vec<Piece>> =
        if model.starts_with("fake-echo") || model.starts_with("fake-vision") {
            Some(pieces(false, &echo(&fake, number, &request, seen)))
        } else if model.starts_with("fake-think") {
            let mut all = pieces(true, &thought);
            all.extend(pieces(false, &echo(&fake, number, &request, seen)));
            Some(all)
        } else if model.starts_with("fake-r1") {
            let text = format!(
                "<think>\n{thought}\n</think>\n\n{}",
                echo(&fake, number, &request, seen)
            );
            Some(pieces(false, &text))
        } else if model.starts_with("fake-md") {
            Some(pieces(false, HOSTILE_MARKDOWN))
        } else {
            None
        };
    fake.open.fetch_add(1, Ordering::SeqCst);
    fake.changed.notify_waiters();
    let guard = Guard {
        fake: fake.clone(),
        finished: false,
    };
    let stream = futures_util::stream::unfold(Some((guard, 0usize)), move |state| {
        let model = model.clone();
        let answer = answer.clone();
        async move {
            let (mut guard, n) = state?;
            if let Some(answer) = answer {
                let Some((thinking, piece)) = answer.get(n) else {
                    guard.finished = true;
                    let done = serde_json::json!({"model": model, "message": {"role": "assistant", "content": ""}, "done": true, "done_reason": "stop"});
                    // The guard goes with the last line: the stream ends after it.
                    drop(guard);
                    return Some((ndjson(&done), None));
                };
                tokio::time::sleep(Duration::from_millis(5)).await;
                let message = if *thinking {
                    serde_json::json!({"role": "assistant", "content": "", "thinking": piece})
                } else {
                    serde_json::json!({"role": "assistant", "content": piece})
                };
                let line = serde_json::json!({"model": model, "message": message, "done": false});
                Some((ndjson(&line), Some((guard, n + 1))))
            } else {
                // Never ends: only the client going away stops it.
                tokio::time::sleep(Duration::from_millis(100)).await;
                let line = serde_json::json!({"model": model, "message": {"role": "assistant", "content": format!("tick {n} ")}, "done": false});
                Some((ndjson(&line), Some((guard, n + 1))))
            }
        }
    });
    (
        [(http::header::CONTENT_TYPE, "application/x-ndjson")],
        Body::from_stream(stream),
    )
        .into_response()
}
