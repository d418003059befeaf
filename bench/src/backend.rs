//! A fake Ollama backend (a fake, not Ollama): the fastest server that still has Ollama's API
//! shape, so the benchmark measures what cloudllm adds and nothing of a model.
//!
//! - `GET /api/version` answers `{"version":"bench"}`; `GET /api/tags` lists one model, so the
//!   daemon's health check finds a working Ollama.
//! - `POST /api/generate` streams NDJSON lines of about [`LINE_BYTES`] bytes, each line its own
//!   body chunk. The line count and the pause between lines come from the query
//!   (`?lines=N&delay_ms=M`) or from the JSON body (`{"lines": N, "delay_ms": M}`), the query
//!   winning. Lines are produced as fast as the reader takes them when the delay is 0, and on
//!   a fixed schedule (line `i` at `start + i × delay`, timed by an OS thread) otherwise, so a
//!   late line never shifts the ones after it.
//!
//! - With `"echo": true` in the body, every line also carries the request's `x-request-id` and
//!   the backend's label (which device it stands behind), so that a client can check that each
//!   line it got belongs to its own request and reached its own user's device. Lines are then
//!   longer than [`LINE_BYTES`].
//! - A [`Cancellations`] recorder, when given, learns when a stream with an `x-request-id`
//!   lost its reader before its last line: the moment the backend sees a cancellation.
//!
//! It is a bare hyper 1 HTTP/1 server with `TCP_NODELAY`, so that direct measurements are as
//! cheap as this machine allows.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, Limited, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::header::{self, HeaderValue};
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

/// Size of one NDJSON line, newline included: about what Ollama sends per token.
pub const LINE_BYTES: usize = 100;

/// Longest stream the fake produces: far above what the benchmark asks, a cap so a typo cannot
/// make it stream for ever.
const MAX_LINES: u64 = 1_000_000;

/// Longest pause between lines: 10 s, far above the benchmark's 25 ms.
const MAX_DELAY_MS: u64 = 10_000;

/// Largest request body read: 64 KiB, plenty for a generate request.
const MAX_REQUEST_BYTES: usize = 64 * 1024;

/// How long the fake waits for a request body or for a reader to take a line: a reader that
/// stops for this long is gone.
const STALL_TIMEOUT: Duration = Duration::from_secs(10);

/// Lines queued between the producer and the connection: enough that producing never waits on
/// a reader that keeps up, few enough that a slow reader holds back the producer.
const CHANNEL_LINES: usize = 64;

/// Pause after a failed `accept` (out of file descriptors, say) before the next one.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(10);

/// Response body of the fake.
type FakeBody = BoxBody<Bytes, Infallible>;

/// Where a stream's producer puts its lines.
type Sender = mpsc::Sender<Result<Frame<Bytes>, Infallible>>;

/// Most cancellations a [`Cancellations`] keeps: its reader takes each one out, so only a
/// runaway would reach this; then the oldest are not kept.
const MAX_CANCELLATIONS: usize = 10_000;

/// When the fake saw streams lose their reader, by request id.
#[derive(Debug, Clone, Default)]
pub struct Cancellations(Arc<Mutex<HashMap<String, Instant>>>);

impl Cancellations {
    /// Takes out the instant the stream of request `id` was cancelled, if it was.
    pub fn take(&self, id: &str) -> Option<Instant> {
        self.0.lock().ok()?.remove(id)
    }

    fn record(&self, id: String, at: Instant) {
        if let Ok(mut seen) = self.0.lock()
            && seen.len() < MAX_CANCELLATIONS
        {
            seen.insert(id, at);
        }
    }
}

/// What a fake backend does beyond the plain fake.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Named in echoed lines: the device (or user/device) this backend stands behind.
    pub label: String,
    /// Where to record cancelled streams.
    pub cancellations: Option<Cancellations>,
}

/// Starts the fake on `127.0.0.1:0` and serves until `shutdown` is cancelled. Returns its
/// address. Call it on the runtime the fake should run on.
pub async fn serve(shutdown: CancellationToken) -> anyhow::Result<SocketAddr> {
    serve_with(shutdown, Options::default()).await
}

/// [`serve`] with [`Options`].
pub async fn serve_with(
    shutdown: CancellationToken,
    options: Options,
) -> anyhow::Result<SocketAddr> {
    let options = Arc::new(options);
    let listener = TcpListener::bind(("127.0.0.1", 0))
        .await
        .context("binding the fake backend")?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                accepted = listener.accept() => accepted,
                () = shutdown.cancelled() => break,
            };
            let tcp = match accepted {
                Ok((tcp, _)) => tcp,
                Err(err) => {
                    warn!(error = %err, "fake backend: accept failed");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            let shutdown = shutdown.clone();
            let options = options.clone();
            tokio::spawn(async move {
                let service = service_fn(move |req| handle(req, options.clone()));
                let connection = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), service);
                tokio::select! {
                    result = connection => if let Err(err) = result {
                        debug!(error = %err, "fake backend: connection ended with an error");
                    },
                    () = shutdown.cancelled() => {}
                }
            });
        }
        debug!("fake backend stopped");
    });
    Ok(addr)
}

/// `/api/version`'s answer.
const VERSION: &[u8] = br#"{"version":"bench"}"#;

/// `/api/tags`' answer: one model.
const TAGS: &[u8] =
    br#"{"models":[{"name":"bench:latest","model":"bench:latest","size":1,"digest":"0"}]}"#;

async fn handle(
    req: Request<Incoming>,
    options: Arc<Options>,
) -> Result<Response<FakeBody>, Infallible> {
    Ok(match (req.method(), req.uri().path()) {
        (&Method::GET, "/api/version") => json(StatusCode::OK, Bytes::from_static(VERSION)),
        (&Method::GET, "/api/tags") => json(StatusCode::OK, Bytes::from_static(TAGS)),
        (&Method::POST, "/api/generate") => generate(req, &options).await,
        _ => json(
            StatusCode::NOT_FOUND,
            Bytes::from_static(br#"{"error":"not found"}"#),
        ),
    })
}

/// What a generate request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct StreamSpec {
    lines: u64,
    delay: Duration,
    echo: bool,
}

/// What an echoed line carries, besides the stream's shape.
#[derive(Debug, Clone)]
struct Echo {
    request_id: String,
    label: String,
}

/// Notes a stream's cancellation when its body is dropped before the end.
struct Watch {
    id: Option<String>,
    cancellations: Option<Cancellations>,
    ended: bool,
}

impl Watch {
    /// The stream gave its last line: no cancellation to note.
    fn end(&mut self) {
        self.ended = true;
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        if !self.ended
            && let (Some(id), Some(cancellations)) = (self.id.take(), &self.cancellations)
        {
            cancellations.record(id, Instant::now());
        }
    }
}

async fn generate(req: Request<Incoming>, options: &Options) -> Response<FakeBody> {
    let query = req.uri().query().map(str::to_owned);
    let request_id = req
        .headers()
        .get(cloudllm_proto::HEADER_REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let body = match tokio::time::timeout(
        STALL_TIMEOUT,
        Limited::new(req.into_body(), MAX_REQUEST_BYTES).collect(),
    )
    .await
    {
        Ok(Ok(body)) => body.to_bytes(),
        Ok(Err(_)) | Err(_) => {
            return json(
                StatusCode::BAD_REQUEST,
                Bytes::from_static(br#"{"error":"request body too large, broken or too slow"}"#),
            );
        }
    };
    let spec = match parse_spec(query.as_deref(), &body) {
        Ok(spec) => spec,
        Err(message) => {
            let body = serde_json::json!({ "error": message }).to_string();
            return json(StatusCode::BAD_REQUEST, Bytes::from(body));
        }
    };

    let echo = spec.echo.then(|| Echo {
        request_id: request_id.clone().unwrap_or_default(),
        label: options.label.clone(),
    });
    let (tx, mut rx) = mpsc::channel::<Result<Frame<Bytes>, Infallible>>(CHANNEL_LINES);
    if spec.delay.is_zero() {
        tokio::spawn(produce_fast(spec.lines, echo, tx));
    } else {
        tokio::task::spawn_blocking(move || produce_paced(spec, echo, &tx));
    }
    let mut watch = Watch {
        id: request_id,
        cancellations: options.cancellations.clone(),
        ended: false,
    };
    let body = StreamBody::new(futures_util::stream::poll_fn(move |cx| {
        let polled = rx.poll_recv(cx);
        if matches!(polled, Poll::Ready(None)) {
            watch.end();
        }
        polled
    }));
    let mut response = Response::new(body.boxed());
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/x-ndjson"),
    );
    response
}

/// Sends `lines` lines as fast as the reader takes them.
async fn produce_fast(lines: u64, echo: Option<Echo>, tx: Sender) {
    for i in 0..lines {
        let frame = Ok(Frame::data(any_line(i, i + 1 == lines, echo.as_ref())));
        match tokio::time::timeout(STALL_TIMEOUT, tx.send(frame)).await {
            Ok(Ok(())) => {}
            // The reader went away or stalled: stop generating, as Ollama does.
            Ok(Err(_)) | Err(_) => return,
        }
    }
}

/// Sends line `i` at `start + i × delay`, like a model producing tokens on its own thread.
/// It sleeps on an OS thread rather than on tokio's timer, whose 1 ms ticks would add up to a
/// millisecond of jitter to every gap and hide what the tunnel adds.
fn produce_paced(spec: StreamSpec, echo: Option<Echo>, tx: &Sender) {
    let runtime = tokio::runtime::Handle::current();
    let start = Instant::now();
    for i in 0..spec.lines {
        let due = start + spec.delay * u32::try_from(i).unwrap_or(u32::MAX);
        std::thread::sleep(due.saturating_duration_since(Instant::now()));
        let frame = Ok(Frame::data(any_line(i, i + 1 == spec.lines, echo.as_ref())));
        match runtime.block_on(tokio::time::timeout(STALL_TIMEOUT, tx.send(frame))) {
            Ok(Ok(())) => {}
            Ok(Err(_)) | Err(_) => return,
        }
    }
}

/// Reads the stream's shape from the query (first) and the JSON body.
fn parse_spec(query: Option<&str>, body: &[u8]) -> Result<StreamSpec, String> {
    let json: serde_json::Value = if body.is_empty() {
        serde_json::Value::Null
    } else {
        serde_json::from_slice(body).map_err(|err| format!("request body is not JSON: {err}"))?
    };
    let field = |name: &str| -> Result<Option<u64>, String> {
        let from_query = query
            .into_iter()
            .flat_map(|q| q.split('&'))
            .filter_map(|pair| pair.split_once('='))
            .find(|(key, _)| *key == name)
            .map(|(_, value)| {
                value
                    .parse::<u64>()
                    .map_err(|_| format!("{name}={value:?} is not a number"))
            });
        match from_query {
            Some(parsed) => parsed.map(Some),
            None => match json.get(name) {
                None => Ok(None),
                Some(value) => value
                    .as_u64()
                    .map(Some)
                    .ok_or_else(|| format!("{name} must be a number")),
            },
        }
    };
    let lines = field("lines")?.unwrap_or(1).min(MAX_LINES);
    let delay_ms = field("delay_ms")?.unwrap_or(0).min(MAX_DELAY_MS);
    let echo = json.get("echo").and_then(serde_json::Value::as_bool) == Some(true);
    Ok(StreamSpec {
        lines,
        delay: Duration::from_millis(delay_ms),
        echo,
    })
}

/// Line `i`: plain, or echoing the request id and label.
fn any_line(i: u64, last: bool, echo: Option<&Echo>) -> Bytes {
    match echo {
        None => line(i, last),
        Some(echo) => echo_line(i, last, echo),
    }
}

/// Line `i` of an echoing stream: Ollama's shape plus `request_id` and `served_by`.
fn echo_line(i: u64, last: bool, echo: &Echo) -> Bytes {
    let mut text = serde_json::json!({
        "model": "bench",
        "response": i.to_string(),
        "done": last,
        "request_id": echo.request_id,
        "served_by": echo.label,
    })
    .to_string();
    text.push('\n');
    Bytes::from(text)
}

/// Line `i` of a stream, shaped like Ollama's and padded to [`LINE_BYTES`].
fn line(i: u64, last: bool) -> Bytes {
    const HEAD: &str =
        r#"{"model":"bench","created_at":"2025-01-01T00:00:00.000000000Z","response":""#;
    let tail = if last {
        r#"","done":true}"#
    } else {
        r#"","done":false}"#
    };
    let width = LINE_BYTES.saturating_sub(HEAD.len() + tail.len() + 1);
    Bytes::from(format!("{HEAD}{i:0>width$}{tail}\n"))
}

fn json(status: StatusCode, body: Bytes) -> Response<FakeBody> {
    let mut response = Response::new(Full::new(body).boxed());
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_json_of_the_stated_size() {
        let first = line(0, false);
        assert_eq!(first.len(), LINE_BYTES);
        let value: serde_json::Value = serde_json::from_slice(&first).unwrap();
        assert_eq!(value["done"], false);
        let last: serde_json::Value = serde_json::from_slice(&line(1999, true)).unwrap();
        assert_eq!(last["done"], true);
    }

    #[test]
    fn the_query_wins_over_the_body() {
        let body = br#"{"lines": 5, "delay_ms": 7}"#;
        let spec = parse_spec(Some("lines=9"), body).unwrap();
        assert_eq!(
            spec,
            StreamSpec {
                lines: 9,
                delay: Duration::from_millis(7),
                echo: false,
            }
        );
        assert_eq!(parse_spec(None, b"").unwrap().lines, 1);
        assert!(parse_spec(Some("lines=x"), b"").is_err());
        assert!(parse_spec(None, b"not json").is_err());
        assert!(parse_spec(None, br#"{"echo": true}"#).unwrap().echo);
    }

    #[test]
    fn echoed_lines_name_request_and_backend() {
        let echo = Echo {
            request_id: "u1-7".into(),
            label: "user-1/dev-0".into(),
        };
        let value: serde_json::Value = serde_json::from_slice(&echo_line(3, true, &echo)).unwrap();
        assert_eq!(value["request_id"], "u1-7");
        assert_eq!(value["served_by"], "user-1/dev-0");
        assert_eq!(value["done"], true);
    }
}
