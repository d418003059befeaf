//! The user-facing API: `/api/*` (Ollama) and `/v1/*` (OpenAI-compatible), forwarded as one
//! HTTP/2 stream each to one of the caller's own devices.
//!
//! Bodies stream both ways without buffering. The relay strips the caller's credentials and
//! hop-by-hop headers before anything reaches the device, and tags the request with an
//! `x-request-id` that comes back on the response. When the caller goes away, dropping the
//! response body resets the stream, which makes the daemon abort its request to Ollama.

use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use cloudllm_proto as proto;
use cloudllm_proto::endpoints::{self, Routing};
use cloudllm_tunnel::body::{BodyError, read_limited};
use cloudllm_tunnel::coalesce::Coalesce;
use http::{HeaderMap, HeaderValue, StatusCode, header};
use http_body::{Body as HttpBody, Frame, SizeHint};
use http_body_util::BodyExt as _;
use tracing::{debug, info};

use crate::audit::{Audit, Event};
use crate::auth::Scope;
use crate::client_addr::client_ip;
use crate::config::TierLimits;
use crate::limits::{Admitted, Refusal};
use crate::metrics::{DirectionLabel, Metrics, StatusLabel};
use crate::registry::{Device, RouteError};
use crate::{AppState, Denied};

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

/// `/api/*` and `/v1/*`: authenticate, apply the caller's tier limits, pick one of their
/// devices, forward, stream back.
pub async fn forward(State(state): State<Arc<AppState>>, req: Request) -> Response {
    let started = tokio::time::Instant::now();
    let path = req.uri().path().to_owned();
    let api = Api(&path);
    let peer = req
        .extensions()
        .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
        .map(|info| info.0);
    let addr = client_ip(peer, req.headers(), &state.config.trusted_proxies);
    let identity = match state
        .authenticate(req.headers(), addr, Scope::Client, "api")
        .await
    {
        Ok(identity) => identity,
        Err(Denied::Limited(refusal)) => return limited(&state, api, None, addr, &refusal),
        Err(Denied::Auth(err)) => return api.error(err.status(), &err.to_string()),
    };
    let (tier_name, tier) = state.config.tier(identity.tier.as_deref());
    let admitted = match state.limits.admit(&identity.user, tier_name, tier) {
        Ok(admitted) => admitted,
        Err(refusal) => return limited(&state, api, Some(&identity.user), addr, &refusal),
    };
    // The connection no longer counts against the caps on unauthenticated connections.
    crate::connections::admitted(req.extensions());
    // Set by the router's outermost layer ([`crate::request_id`]), which also puts it on the
    // response.
    let request_id = req
        .headers()
        .get(proto::HEADER_REQUEST_ID)
        .cloned()
        .unwrap_or(HeaderValue::from_static("unknown"));
    let method = req.method().to_string();
    let mut record = RequestRecord::new(&state, started);
    let response = route(
        &state,
        api,
        &identity.user,
        tier,
        &request_id,
        &record.received,
        req,
    )
    .await;
    record.status = response.status().as_u16();
    if state.audit.is_enabled() {
        record.audit = Some(AuditFields {
            request_id: request_id.to_str().unwrap_or_default().to_owned(),
            user: identity.user,
            device: response.extensions().get::<ServedBy>().map(|d| d.0.clone()),
            model: response.extensions().get::<Model>().map(|m| m.0.clone()),
            method,
            path,
            addr,
        });
    }
    let max_stream = tier.max_stream;
    response.map(|body| {
        Body::new(Tracked {
            inner: body,
            deadline: Box::pin(tokio::time::sleep(max_stream)),
            max_stream,
            record,
            _admitted: admitted,
        })
    })
}

/// Answers a request refused by a limit: 429 with `Retry-After`, counted and audited.
fn limited(
    state: &AppState,
    api: Api<'_>,
    user: Option<&str>,
    addr: Option<IpAddr>,
    refusal: &Refusal,
) -> Response {
    debug!(
        limit = refusal.limit.as_str(),
        user, "request refused by a limit"
    );
    state.record_refusal(user, addr, "api", refusal);
    let mut response = api.error(StatusCode::TOO_MANY_REQUESTS, &refusal.message);
    refusal.set_retry_after(response.headers_mut());
    response
}

/// The device that served a response (a response extension, for the audit log).
#[derive(Clone)]
struct ServedBy(String);

/// The model a request named, when the relay read it (a response extension, for the audit
/// log).
#[derive(Clone)]
struct Model(String);

/// The audit log's fields of one request.
struct AuditFields {
    request_id: String,
    user: String,
    device: Option<String>,
    model: Option<String>,
    method: String,
    path: String,
    addr: Option<IpAddr>,
}

/// One request's metrics and audit line, recorded when dropped: when its response body ends or
/// the caller goes away.
struct RequestRecord {
    metrics: Arc<Metrics>,
    audit_log: Audit,
    audit: Option<AuditFields>,
    status: u16,
    received: Arc<AtomicU64>,
    sent: u64,
    started: tokio::time::Instant,
    first_byte: bool,
}

impl RequestRecord {
    fn new(state: &AppState, started: tokio::time::Instant) -> Self {
        state.metrics.in_flight.inc();
        RequestRecord {
            metrics: state.metrics.clone(),
            audit_log: state.audit.clone(),
            audit: None,
            status: 0,
            received: Arc::default(),
            sent: 0,
            started,
            first_byte: false,
        }
    }

    fn sent(&mut self, bytes: usize) {
        if !self.first_byte && bytes > 0 {
            self.first_byte = true;
            self.metrics
                .first_byte
                .observe(self.started.elapsed().as_secs_f64());
        }
        self.sent += bytes as u64;
    }
}

impl Drop for RequestRecord {
    fn drop(&mut self) {
        let elapsed = self.started.elapsed();
        let received = self.received.load(Ordering::Relaxed);
        let metrics = &self.metrics;
        metrics.in_flight.dec();
        metrics
            .requests
            .get_or_create(&StatusLabel {
                status: self.status,
            })
            .inc();
        metrics.duration.observe(elapsed.as_secs_f64());
        metrics
            .bytes
            .get_or_create(&DirectionLabel { direction: "in" })
            .inc_by(received);
        metrics
            .bytes
            .get_or_create(&DirectionLabel { direction: "out" })
            .inc_by(self.sent);
        if let Some(fields) = self.audit.take() {
            self.audit_log.record(Event::Request {
                request_id: fields.request_id,
                user: fields.user,
                device: fields.device,
                model: fields.model,
                method: fields.method,
                path: fields.path,
                status: self.status,
                bytes_in: received,
                bytes_out: self.sent,
                duration_ms: elapsed.as_millis() as u64,
                addr: fields.addr,
            });
        }
    }
}

/// A response body on its way to the caller: counts bytes and the first byte, holds the
/// request's place in its tier's concurrency limit, and ends the response once it has streamed
/// for the tier's `max_stream`.
struct Tracked {
    inner: Body,
    deadline: Pin<Box<tokio::time::Sleep>>,
    max_stream: std::time::Duration,
    record: RequestRecord,
    _admitted: Admitted,
}

impl HttpBody for Tracked {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        if self.deadline.as_mut().poll(cx).is_ready() {
            info!(max_stream = ?self.max_stream, "response streamed for its tier's max_stream: ending it");
            return Poll::Ready(Some(Err(axum::Error::new(format!(
                "response ended by the relay after {:?}, the tier's max_stream",
                self.max_stream
            )))));
        }
        let frame = std::task::ready!(Pin::new(&mut self.inner).poll_frame(cx));
        if let Some(Ok(data)) = frame.as_ref().map(|f| f.as_ref().map(Frame::data_ref)) {
            let len = data.map_or(0, Bytes::len);
            self.record.sent(len);
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Whether the request's body names a model (a JSON object with `"model"`), by the endpoint
/// table both ends share.
fn names_a_model(method: &http::Method, path: &str) -> bool {
    endpoints::routing(method.as_str(), path) == Routing::ByModel
}

/// The `model` of a JSON request body, if it is one.
fn model_of(body: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Named {
        model: Option<String>,
    }
    serde_json::from_slice::<Named>(body).ok()?.model
}

/// Longest the relay waits for one device's model list when merging them.
const LISTING_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// Largest model list read from one device: thousands of models fit in 8 MiB.
const MAX_LISTING_BYTES: usize = 8 * 1024 * 1024;

/// Picks the device for a request and forwards it: the device named by `x-cloudllm-device`,
/// else (with several devices) one that has the requested model, least busy first. With
/// several devices, `GET /api/tags` and `GET /v1/models` answer with every device's models.
async fn route(
    state: &AppState,
    api: Api<'_>,
    user: &str,
    tier: &TierLimits,
    request_id: &HeaderValue,
    received: &Arc<AtomicU64>,
    req: Request,
) -> Response {
    let limit = tier.max_body_bytes;
    if declared_length(req.headers()).is_some_and(|len| len > limit) {
        tokio::spawn(discard(req.into_body()));
        return too_large(api, limit);
    }
    let wanted = req
        .headers()
        .get(proto::HEADER_DEVICE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let several = wanted.is_none() && state.registry.count(user) > 1;
    let path = req.uri().path();
    if several
        && req.method() == http::Method::GET
        && endpoints::routing(req.method().as_str(), path) == Routing::ModelList
    {
        return merged_listing(api, &state.registry.devices_of(user), request_id).await;
    }
    let mut model = None;
    let req = if several && names_a_model(req.method(), path) {
        // Routing by model needs the body; model requests are small JSON documents.
        let (parts, body) = req.into_parts();
        let read_timeout = state.config.client_read_timeout;
        let read = read_limited(body, usize::try_from(limit).unwrap_or(usize::MAX));
        let bytes = match tokio::time::timeout(read_timeout, read).await {
            Ok(Ok(bytes)) => bytes,
            Ok(Err(BodyError::TooLarge { .. })) => return too_large(api, limit),
            Ok(Err(BodyError::Read(_))) => {
                return api.error(StatusCode::BAD_REQUEST, "the request body ended early");
            }
            Err(_) => return stalled(api, read_timeout),
        };
        received.fetch_add(bytes.len() as u64, Ordering::Relaxed);
        model = model_of(&bytes);
        Request::from_parts(parts, Body::from(bytes))
    } else {
        req
    };
    let device = match state
        .registry
        .pick(user, wanted.as_deref(), model.as_deref())
    {
        Ok(device) => device,
        Err(err @ RouteError::NoModel(..)) => {
            let mut response = api.error(StatusCode::NOT_FOUND, &err.to_string());
            response
                .extensions_mut()
                .insert(Model(model.unwrap_or_default()));
            return response;
        }
        Err(err) => return api.error(StatusCode::SERVICE_UNAVAILABLE, &err.to_string()),
    };
    let mut response = forward_to(
        api,
        &device,
        (limit, state.config.client_read_timeout),
        request_id,
        received,
        // Only the audit log wants the model of a request that was not routed by it.
        model.is_none() && state.audit.is_enabled(),
        req,
    )
    .await;
    if let Some(model) = model {
        response.extensions_mut().insert(Model(model));
    }
    response
}

/// `GET /api/tags` or `GET /v1/models` over all `devices`: each device's list, merged (a model
/// on several devices is listed once). Devices that do not answer are left out; if none
/// answers, 502.
async fn merged_listing(
    api: Api<'_>,
    devices: &[Arc<Device>],
    request_id: &HeaderValue,
) -> Response {
    let openai = api.0.starts_with("/v1/");
    let path = api.0;
    let lists = futures_util::future::join_all(devices.iter().map(|device| async move {
        let _in_flight = device.begin_request();
        let request = http::Request::get(format!("http://tunnel{path}"))
            .header(proto::HEADER_REQUEST_ID, request_id.clone())
            .body(Body::empty())
            .ok()?;
        let fetch = async {
            let response = device
                .sender()
                .await
                .ok()?
                .send_request(request)
                .await
                .ok()?;
            if !response.status().is_success() {
                return None;
            }
            let body = read_limited(response.into_body(), MAX_LISTING_BYTES)
                .await
                .ok()?;
            serde_json::from_slice::<serde_json::Value>(&body).ok()
        };
        tokio::time::timeout(LISTING_TIMEOUT, fetch)
            .await
            .ok()
            .flatten()
    }))
    .await;
    let (field, key) = if openai {
        ("data", "id")
    } else {
        ("models", "name")
    };
    let mut seen = std::collections::HashSet::new();
    let mut merged = Vec::new();
    let mut answered = 0;
    for list in lists.into_iter().flatten() {
        let Some(entries) = list.get(field).and_then(|v| v.as_array()) else {
            continue;
        };
        answered += 1;
        for entry in entries {
            let name = entry.get(key).and_then(|v| v.as_str()).unwrap_or_default();
            if seen.insert(name.to_owned()) {
                merged.push(entry.clone());
            }
        }
    }
    if answered == 0 {
        return api.error(
            StatusCode::BAD_GATEWAY,
            "none of your devices answered with its model list; check that Ollama runs on them",
        );
    }
    let body = if openai {
        serde_json::json!({ "object": "list", "data": merged })
    } else {
        serde_json::json!({ "models": merged })
    };
    let names: Vec<&str> = devices.iter().map(|d| d.name.as_str()).collect();
    let mut response = (
        StatusCode::OK,
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        body.to_string(),
    )
        .into_response();
    response.extensions_mut().insert(ServedBy(names.join(",")));
    response
}

/// Sends one request to `device` with its body streamed (capped at `limit`, and given up when
/// the caller sends nothing for `read_timeout`), and streams the response back. With
/// `sniff_model`, the model named in the body's first chunk is noted for the audit log.
async fn forward_to(
    api: Api<'_>,
    device: &Arc<Device>,
    (limit, read_timeout): (u64, std::time::Duration),
    request_id: &HeaderValue,
    received: &Arc<AtomicU64>,
    sniff_model: bool,
    req: Request,
) -> Response {
    let sniff = sniff_model && names_a_model(req.method(), req.uri().path());
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
    let stalled_body = Arc::new(AtomicBool::new(false));
    let sniffed = Arc::new(std::sync::OnceLock::new());
    let body = Body::new(CappedBody {
        inner: Some(body),
        remaining: limit,
        tripped: over_limit.clone(),
        idle: None,
        read_timeout,
        stalled: stalled_body.clone(),
        received: received.clone(),
        sniff: sniff.then(|| sniffed.clone()),
    });
    let request = http::Request::from_parts(parts, body);

    let in_flight = device.begin_request();
    let method = request.method().clone();
    let path = request.uri().path().to_owned();
    let sent = match device.sender().await {
        Ok(mut sender) => sender
            .send_request(request)
            .await
            .map_err(|err| err.to_string()),
        Err(offline) => Err(offline.to_string()),
    };
    let mut response = match sent {
        Ok(response) => {
            info!(user = %device.user, device = %device.name, %method, %path, status = response.status().as_u16(), request_id = ?request_id, "request");
            let (mut parts, body) = response.into_parts();
            cloudllm_tunnel::headers::remove_hop_by_hop(&mut parts.headers);
            // Chunks already waiting go out as one; the request counts as in flight until its
            // body ends or the caller goes away.
            let body = Coalesce::new(body).map_frame(move |frame| {
                let _ = &in_flight;
                frame
            });
            Response::from_parts(parts, Body::new(body))
        }
        Err(_) if over_limit.load(Ordering::Relaxed) => return too_large(api, limit),
        Err(_) if stalled_body.load(Ordering::Relaxed) => return stalled(api, read_timeout),
        Err(err) => {
            debug!(error = %err, "tunnel request failed");
            let message = format!(
                "the tunnel to device {:?} failed before the response started ({err}); it may have just gone offline — try again",
                device.name
            );
            api.error(StatusCode::BAD_GATEWAY, &message)
        }
    };
    response
        .extensions_mut()
        .insert(ServedBy(device.name.clone()));
    if let Some(model) = sniffed.get() {
        response.extensions_mut().insert(Model(model.clone()));
    }
    response
}

/// The answer to a caller whose request body stopped arriving for `read_timeout`.
fn stalled(api: Api<'_>, read_timeout: std::time::Duration) -> Response {
    debug!(?read_timeout, "request body stalled: giving up on it");
    api.error(
        StatusCode::REQUEST_TIMEOUT,
        &format!("the request body stopped arriving for {read_timeout:?}"),
    )
}

fn too_large(api: Api<'_>, limit: u64) -> Response {
    api.error(
        StatusCode::PAYLOAD_TOO_LARGE,
        &format!("request body is larger than this relay's limit of {limit} bytes"),
    )
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
/// `tripped` so the relay can answer 413 rather than a generic tunnel error. It also fails
/// when the caller sends nothing for `read_timeout` (a slow-body attack, or a client that
/// died mid-upload), and says so in `stalled` for a 408.
///
/// When it trips, the rest of the caller's upload is read and thrown away in the background
/// (bounded by [`DRAIN_BYTES`] and [`DRAIN_TIME`]): closing a socket with unread data makes the
/// kernel send a reset, and the caller would see "connection reset" instead of the 413.
struct CappedBody {
    inner: Option<Body>,
    remaining: u64,
    tripped: Arc<AtomicBool>,
    /// Fires when the caller has sent nothing for `read_timeout` while the body was wanted;
    /// armed at the first wait, so time queued behind the tunnel's flow control never counts.
    idle: Option<Pin<Box<tokio::time::Sleep>>>,
    read_timeout: std::time::Duration,
    stalled: Arc<AtomicBool>,
    /// Bytes passed so far, for the audit log.
    received: Arc<AtomicU64>,
    /// Where to note the model named by the first chunk, when it is a whole JSON document.
    sniff: Option<Arc<std::sync::OnceLock<String>>>,
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
        let Poll::Ready(frame) = Pin::new(inner).poll_frame(cx) else {
            let read_timeout = self.read_timeout;
            let idle = self
                .idle
                .get_or_insert_with(|| Box::pin(tokio::time::sleep(read_timeout)));
            if idle.as_mut().poll(cx).is_ready() {
                self.stalled.store(true, Ordering::Relaxed);
                self.inner = None;
                return Poll::Ready(Some(Err(axum::Error::new("request body stalled"))));
            }
            return Poll::Pending;
        };
        self.idle = None;
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
            if let (Some(sniff), Some(data)) = (self.sniff.take(), data)
                && let Some(model) = model_of(data)
            {
                let _ = sniff.set(model);
            }
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
