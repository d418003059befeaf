//! A fake Ollama backend (a fake, not Ollama): streams NDJSON and SSE at a pace the test sets,
//! records when each line was produced and when each stream ended (finished or cancelled by
//! the client going away), echoes the headers and URI it received, and fails mid-stream on
//! request.
//!
//! `POST /api/generate` takes Ollama's request shape plus fake-only fields:
//! `{"prompt": TAG, "options": {"num_predict": N}, "fake_interval_ms": M, "fake_fail_after": K}`.
//! The prompt names the stream in the records.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{ConnectInfo, State};
use axum::http::{HeaderMap, Request, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, post};
use serde::Deserialize;
use tokio::sync::{Notify, mpsc};
use tokio::time::Instant;
use url::Url;

/// How a fake stream ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamEnd {
    /// Every line was handed to the server.
    Completed,
    /// The client went away before the end.
    Cancelled,
    /// The fake failed it on purpose.
    Failed,
}

/// What the fake has seen.
#[derive(Default)]
pub struct Records {
    /// Paths of the requests that came through the tunnel (they carry an `x-request-id`; the
    /// daemon's own health polls do not).
    pub hits: Mutex<Vec<String>>,
    /// The daemon's connection (its address) each of those requests came on, in order.
    pub hit_peers: Mutex<Vec<SocketAddr>>,
    /// For each stream tag, when each line was produced.
    pub produced: Mutex<HashMap<String, Vec<Instant>>>,
    /// For each stream tag, when and how it ended.
    pub ended: Mutex<HashMap<String, (Instant, StreamEnd)>>,
    /// Headers of the last request to `/api/show`.
    pub echoed: Mutex<Option<HeaderMap>>,
    /// Streams open right now.
    pub open_streams: AtomicUsize,
    /// The model names `/api/tags` and `/v1/models` list (default `fake:latest`).
    pub models: Mutex<Vec<String>>,
    changed: Notify,
}

impl Records {
    /// How many requests reached the fake.
    pub fn hit_count(&self) -> usize {
        self.hits.lock().unwrap().len()
    }

    /// The paths of the requests that reached the fake so far, in order.
    pub fn hits(&self) -> Vec<String> {
        self.hits.lock().unwrap().clone()
    }

    /// Waits until stream `tag` has ended, and says when and how.
    pub async fn wait_end(&self, tag: &str) -> (Instant, StreamEnd) {
        let deadline = Instant::now() + crate::STEP;
        loop {
            let notified = self.changed.notified();
            if let Some(end) = self.ended.lock().unwrap().get(tag) {
                return *end;
            }
            tokio::time::timeout_at(deadline, notified)
                .await
                .unwrap_or_else(|_| panic!("stream {tag} did not end"));
        }
    }

    /// The headers of the last request to `/api/show` (panics if there was none).
    pub fn echoed(&self) -> HeaderMap {
        self.echoed
            .lock()
            .unwrap()
            .clone()
            .expect("a request reached /api/show")
    }

    /// When stream `tag` produced its lines.
    pub fn produced(&self, tag: &str) -> Vec<Instant> {
        self.produced
            .lock()
            .unwrap()
            .get(tag)
            .cloned()
            .unwrap_or_default()
    }
}

/// A running fake backend.
pub struct FakeOllama {
    /// Its address.
    pub addr: SocketAddr,
    /// What it has seen.
    pub records: Arc<Records>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakeOllama {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FakeOllama {
    /// Starts the fake on `127.0.0.1:0`.
    pub async fn start() -> FakeOllama {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind fake");
        FakeOllama::serve(listener)
    }

    /// Serves the fake on an already bound listener.
    pub fn serve(listener: tokio::net::TcpListener) -> FakeOllama {
        let addr = listener.local_addr().expect("fake address");
        let records = Arc::new(Records::default());
        *records.models.lock().unwrap() = vec!["fake:latest".to_owned()];
        let app = Router::new()
            .route(
                "/api/version",
                get(|| async { axum::Json(serde_json::json!({"version": "0.0.0-fake"})) }),
            )
            .route("/api/tags", get(tags))
            .route("/v1/models", get(openai_models))
            .route("/api/generate", post(generate))
            .route("/api/show", any(echo_headers))
            .route("/v1/chat/completions", post(chat_sse))
            .fallback(|| async { (StatusCode::NOT_FOUND, "404 page not found") })
            .layer(middleware::from_fn_with_state(records.clone(), record_hit))
            .layer(axum::extract::DefaultBodyLimit::max(64 * 1024 * 1024))
            .with_state(records.clone());
        let task = tokio::spawn(async move {
            let app = app.into_make_service_with_connect_info::<SocketAddr>();
            let _ = axum::serve(listener, app).await;
        });
        FakeOllama {
            addr,
            records,
            task,
        }
    }

    /// Sets the models it lists.
    pub fn set_models(&self, models: &[&str]) {
        *self.records.models.lock().unwrap() = models.iter().map(|m| (*m).to_owned()).collect();
    }

    /// Its base URL.
    pub fn url(&self) -> Url {
        Url::parse(&format!("http://{}", self.addr)).expect("fake URL")
    }
}

async fn record_hit(
    State(records): State<Arc<Records>>,
    req: Request<Body>,
    next: Next,
) -> Response {
    if req.headers().contains_key("x-request-id") {
        if let Some(ConnectInfo(peer)) = req.extensions().get::<ConnectInfo<SocketAddr>>() {
            records.hit_peers.lock().unwrap().push(*peer);
        }
        records
            .hits
            .lock()
            .unwrap()
            .push(req.uri().path().to_owned());
    }
    next.run(req).await
}

async fn tags(State(records): State<Arc<Records>>) -> impl IntoResponse {
    let models: Vec<serde_json::Value> = records
        .models
        .lock()
        .unwrap()
        .iter()
        .map(|name| serde_json::json!({"name": name, "model": name, "size": 1, "digest": "0"}))
        .collect();
    axum::Json(serde_json::json!({ "models": models }))
}

async fn openai_models(State(records): State<Arc<Records>>) -> impl IntoResponse {
    let models: Vec<serde_json::Value> = records
        .models
        .lock()
        .unwrap()
        .iter()
        .map(|id| serde_json::json!({"id": id, "object": "model", "owned_by": "library"}))
        .collect();
    axum::Json(serde_json::json!({ "object": "list", "data": models }))
}

async fn echo_headers(
    State(records): State<Arc<Records>>,
    uri: axum::http::Uri,
    headers: HeaderMap,
) -> impl IntoResponse {
    let map: HashMap<String, String> = headers
        .iter()
        .map(|(k, v)| {
            (
                k.as_str().to_owned(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect();
    *records.echoed.lock().unwrap() = Some(headers);
    axum::Json(serde_json::json!({ "headers": map, "uri": uri.to_string() }))
}

#[derive(Deserialize)]
struct GenerateRequest {
    prompt: String,
    #[serde(default)]
    options: Options,
    #[serde(default)]
    fake_interval_ms: u64,
    fake_fail_after: Option<usize>,
    #[serde(default)]
    fake_line_bytes: usize,
}

#[derive(Deserialize, Default)]
struct Options {
    num_predict: Option<usize>,
}

async fn generate(State(records): State<Arc<Records>>, body: Bytes) -> Response {
    let req: GenerateRequest = match serde_json::from_slice(&body) {
        Ok(req) => req,
        Err(err) => {
            return (
                StatusCode::BAD_REQUEST,
                axum::Json(serde_json::json!({"error": err.to_string()})),
            )
                .into_response();
        }
    };
    let lines = req.options.num_predict.unwrap_or(3);
    let interval = Duration::from_millis(req.fake_interval_ms);
    let padding = "x".repeat(req.fake_line_bytes);
    let (tx, mut rx) = mpsc::channel::<Result<Bytes, std::io::Error>>(1);
    let tag = req.prompt.clone();
    records.open_streams.fetch_add(1, Ordering::SeqCst);
    let task_records = records.clone();
    tokio::spawn(async move {
        let end = produce(
            &task_records,
            &tag,
            lines,
            interval,
            req.fake_fail_after,
            &padding,
            &tx,
        )
        .await;
        task_records.open_streams.fetch_sub(1, Ordering::SeqCst);
        task_records
            .ended
            .lock()
            .unwrap()
            .insert(tag, (Instant::now(), end));
        task_records.changed.notify_waiters();
    });
    let stream = futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx));
    Response::builder()
        .header("content-type", "application/x-ndjson")
        .body(Body::from_stream(stream))
        .expect("response")
}

async fn produce(
    records: &Records,
    tag: &str,
    lines: usize,
    interval: Duration,
    fail_after: Option<usize>,
    padding: &str,
    tx: &mpsc::Sender<Result<Bytes, std::io::Error>>,
) -> StreamEnd {
    for i in 0..=lines {
        if i > 0 && !interval.is_zero() {
            tokio::select! {
                () = tokio::time::sleep(interval) => {}
                () = tx.closed() => return StreamEnd::Cancelled,
            }
        }
        if fail_after == Some(i) {
            let _ = tx.send(Err(std::io::Error::other("fake failure"))).await;
            return StreamEnd::Failed;
        }
        let done = i == lines;
        let line = if done {
            format!(
                "{{\"model\":\"fake\",\"response\":\"\",\"done\":true,\"eval_count\":{lines}}}\n"
            )
        } else {
            format!("{{\"model\":\"fake\",\"response\":\"t{i}{padding}\",\"done\":false}}\n")
        };
        records
            .produced
            .lock()
            .unwrap()
            .entry(tag.to_owned())
            .or_default()
            .push(Instant::now());
        records.changed.notify_waiters();
        if tx.send(Ok(Bytes::from(line))).await.is_err() {
            return StreamEnd::Cancelled;
        }
    }
    StreamEnd::Completed
}

async fn chat_sse(body: Bytes) -> Response {
    let req: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
    let chunks = req["max_tokens"].as_u64().unwrap_or(3);
    let mut out = String::new();
    for i in 0..chunks {
        out.push_str(&format!(
            "data: {{\"id\":\"chatcmpl-fake\",\"object\":\"chat.completion.chunk\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"t{i}\"}}}}]}}\n\n"
        ));
    }
    out.push_str("data: [DONE]\n\n");
    let stream = futures_util::stream::iter(
        out.split_inclusive("\n\n")
            .map(|s| Ok::<_, Infallible>(Bytes::from(s.to_owned())))
            .collect::<Vec<_>>(),
    );
    Response::builder()
        .header("content-type", "text/event-stream")
        .body(Body::from_stream(stream))
        .expect("response")
}
