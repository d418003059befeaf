//! The user-facing API: `/api/*` (Ollama) and `/v1/*` (OpenAI-compatible), forwarded as one
//! HTTP/2 stream each to one of the caller's own devices.
//!
//! Bodies stream both ways without buffering. The relay strips the caller's credentials and
//! hop-by-hop headers before anything reaches the device, and tags the request with an
//! `x-request-id` that comes back on the response. When the caller goes away, dropping the
//! response body resets the stream, which makes the daemon abort its request to Ollama.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use cloudllm_proto as proto;
use cloudllm_tunnel::coalesce::Coalesce;
use http::{HeaderMap, HeaderValue, StatusCode, header};
use http_body::{Body as HttpBody, Frame, SizeHint};
use http_body_util::BodyExt as _;
use tracing::{debug, info};

use crate::AppState;
use crate::audit::{Audit, Event};
use crate::auth::Scope;

/// Request headers that stay at the relay besides the hop-by-hop ones: the caller's
/// credentials, and `Host` (HTTP/2 carries the authority itself).
const CALLER_ONLY_HEADERS: &[header::HeaderName] =
    &[header::AUTHORIZATION, header::COOKIE, header::HOST];

/// The API a request came in on, so errors come in the shape its clients parse.
#[derive(Clone, Copy)]
struct Api<'a>(&'a str);

impl Api<'_> {
    fn error(self, status: StatusCode, message: &str) -> Response {
        let body = proto::api_error_body(self.0, status.is_server_error(), message);
        let mut response = (
            status,
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            )],
            body,
        )
            .into_response();
        if status == StatusCode::UNAUTHORIZED {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

/// `/api/*` and `/v1/*`: authenticate, pick the caller's device, forward, stream back.
pub async fn forward(State(state): State<Arc<AppState>>, req: Request) -> Response {
    let started = tokio::time::Instant::now();
    let path = req.uri().path().to_owned();
    let api = Api(&path);
    let addr = req
        .extensions()
        .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
        .map(|info| info.0);
    let identity = match state.keys.authenticate(req.headers(), Scope::Client).await {
        Ok(identity) => identity,
        Err(err) => {
            state.audit.record(Event::AuthFailure {
                reason: err.to_string(),
                route: "api",
                addr,
            });
            return api.error(err.status(), &err.to_string());
        }
    };
    let request_id = request_id(req.headers());
    let method = req.method().to_string();
    let received = Arc::new(AtomicU64::new(0));
    let mut response = forward_for(
        &state,
        api,
        &identity.user,
        &request_id,
        received.clone(),
        req,
    )
    .await;
    response
        .headers_mut()
        .insert(proto::HEADER_REQUEST_ID, request_id.clone());
    if !state.audit.is_enabled() {
        return response;
    }
    // Logged when the response body ends or the caller goes away, with what was sent.
    let mut record = RequestRecord {
        audit: state.audit.clone(),
        request_id: request_id.to_str().unwrap_or_default().to_owned(),
        user: identity.user,
        device: response.extensions().get::<ServedBy>().map(|d| d.0.clone()),
        method,
        path,
        status: response.status().as_u16(),
        received,
        sent: 0,
        started,
        addr,
    };
    response.map(|body| {
        Body::new(body.map_frame(move |frame| {
            // The whole record moves into the closure, so it drops with the body.
            let record = &mut record;
            if let Some(data) = frame.data_ref() {
                record.sent += data.len() as u64;
            }
            frame
        }))
    })
}

/// The device that served a response (a response extension, for the audit log).
#[derive(Clone)]
struct ServedBy(String);

/// One request's audit line, written when dropped: when its response body ends or the caller
/// goes away.
struct RequestRecord {
    audit: Audit,
    request_id: String,
    user: String,
    device: Option<String>,
    method: String,
    path: String,
    status: u16,
    received: Arc<AtomicU64>,
    sent: u64,
    started: tokio::time::Instant,
    addr: Option<std::net::SocketAddr>,
}

impl Drop for RequestRecord {
    fn drop(&mut self) {
        self.audit.record(Event::Request {
            request_id: std::mem::take(&mut self.request_id),
            user: std::mem::take(&mut self.user),
            device: self.device.take(),
            method: std::mem::take(&mut self.method),
            path: std::mem::take(&mut self.path),
            status: self.status,
            bytes_in: self.received.load(Ordering::Relaxed),
            bytes_out: self.sent,
            duration_ms: self.started.elapsed().as_millis() as u64,
            addr: self.addr,
        });
    }
}

async fn forward_for(
    state: &AppState,
    api: Api<'_>,
    user: &str,
    request_id: &HeaderValue,
    received: Arc<AtomicU64>,
    req: Request,
) -> Response {
    let limit = state.config.max_body_bytes;
    if declared_length(req.headers()).is_some_and(|len| len > limit) {
        tokio::spawn(discard(req.into_body()));
        return too_large(api, limit);
    }
    let wanted = req
        .headers()
        .get(proto::HEADER_DEVICE)
        .and_then(|v| v.to_str().ok());
    let device = match state.registry.pick(user, wanted) {
        Ok(device) => device,
        Err(err) => return api.error(StatusCode::SERVICE_UNAVAILABLE, &err.to_string()),
    };

    let (mut parts, body) = req.into_parts();
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let uri = match format!("http://tunnel{path}").parse() {
        Ok(uri) => uri,
        Err(_) => return api.error(StatusCode::BAD_REQUEST, "malformed request path"),
    };
    parts.uri = uri;
    parts.version = http::Version::HTTP_2;
    cloudllm_tunnel::headers::remove_hop_by_hop(&mut parts.headers);
    for name in CALLER_ONLY_HEADERS {
        parts.headers.remove(name);
    }
    parts.headers.remove(proto::HEADER_DEVICE);
    parts
        .headers
        .insert(proto::HEADER_REQUEST_ID, request_id.clone());
    let over_limit = Arc::new(AtomicBool::new(false));
    let body = Body::new(CappedBody {
        inner: Some(body),
        remaining: limit,
        tripped: over_limit.clone(),
        received,
    });
    let request = http::Request::from_parts(parts, body);

    let in_flight = device.begin_request();
    let method = request.method().clone();
    let path = request.uri().path().to_owned();
    match device.sender().send_request(request).await {
        Ok(response) => {
            info!(user, device = %device.name, %method, %path, status = response.status().as_u16(), request_id = ?request_id, "request");
            let (mut parts, body) = response.into_parts();
            cloudllm_tunnel::headers::remove_hop_by_hop(&mut parts.headers);
            // Chunks already waiting go out as one; the request counts as in flight until its
            // body ends or the caller goes away.
            let body = Coalesce::new(body).map_frame(move |frame| {
                let _ = &in_flight;
                frame
            });
            parts.extensions.insert(ServedBy(device.name.clone()));
            Response::from_parts(parts, Body::new(body))
        }
        Err(_) if over_limit.load(Ordering::Relaxed) => too_large(api, limit),
        Err(err) => {
            debug!(error = %err, "tunnel request failed");
            let message = format!(
                "the tunnel to device {:?} failed before the response started ({err}); it may have just gone offline — try again",
                device.name
            );
            api.error(StatusCode::BAD_GATEWAY, &message)
        }
    }
}

fn too_large(api: Api<'_>, limit: u64) -> Response {
    api.error(
        StatusCode::PAYLOAD_TOO_LARGE,
        &format!("request body is larger than this relay's limit of {limit} bytes"),
    )
}

/// The caller's `x-request-id` if it is a sane token, else a fresh UUID.
fn request_id(headers: &HeaderMap) -> HeaderValue {
    headers
        .get(proto::HEADER_REQUEST_ID)
        .filter(|v| {
            let bytes = v.as_bytes();
            !bytes.is_empty()
                && bytes.len() <= 128
                && bytes
                    .iter()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(b))
        })
        .cloned()
        .unwrap_or_else(|| {
            HeaderValue::from_str(&uuid::Uuid::new_v4().to_string())
                .unwrap_or(HeaderValue::from_static("unknown"))
        })
}

fn declared_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

/// A request body that fails once more than `remaining` bytes have passed, and says so in
/// `tripped` so the relay can answer 413 rather than a generic tunnel error.
///
/// When it trips, the rest of the caller's upload is read and thrown away in the background
/// (bounded by [`DRAIN_BYTES`] and [`DRAIN_TIME`]): closing a socket with unread data makes the
/// kernel send a reset, and the caller would see "connection reset" instead of the 413.
struct CappedBody {
    inner: Option<Body>,
    remaining: u64,
    tripped: Arc<AtomicBool>,
    /// Bytes passed so far, for the audit log.
    received: Arc<AtomicU64>,
}

/// Most of an oversized upload the relay reads and discards so the caller gets its 413.
const DRAIN_BYTES: u64 = 64 * 1024 * 1024;
/// Longest the relay spends discarding an oversized upload.
const DRAIN_TIME: std::time::Duration = std::time::Duration::from_secs(10);

impl HttpBody for CappedBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let Some(inner) = self.inner.as_mut() else {
            return Poll::Ready(None);
        };
        let frame = std::task::ready!(Pin::new(inner).poll_frame(cx));
        if let Some(Ok(data)) = frame.as_ref().map(|f| f.as_ref().map(Frame::data_ref)) {
            let len = data.map_or(0, |d| d.len() as u64);
            if len > self.remaining {
                self.tripped.store(true, Ordering::Relaxed);
                if let Some(rest) = self.inner.take() {
                    tokio::spawn(discard(rest));
                }
                return Poll::Ready(Some(Err(axum::Error::new("request body over the limit"))));
            }
            self.remaining -= len;
            self.received.fetch_add(len, Ordering::Relaxed);
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.as_ref().is_none_or(HttpBody::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        self.inner
            .as_ref()
            .map(HttpBody::size_hint)
            .unwrap_or_default()
    }
}

/// Reads and drops the rest of an oversized upload, within bounds.
async fn discard(body: Body) {
    use http_body_util::BodyExt;
    let mut body = http_body_util::Limited::new(body, DRAIN_BYTES as usize);
    let _ = tokio::time::timeout(DRAIN_TIME, async {
        while let Some(Ok(_)) = body.frame().await {}
    })
    .await;
}
