//! Which of the caller's devices serves an API request, and the forwarding to it.
//!
//! The device named by `x-cloudllm-device` if there is one; else, for a user with several
//! devices, one that has the model the request's body names, least busy first (which
//! endpoints name a model: the table in [`cloudllm_proto::endpoints`]), and for a model list
//! every device's list merged; else the least busy device. Only the caller's own devices are
//! ever looked at ([`crate::registry`]).
//!
//! On the way to the device the request loses the caller's credentials and hop-by-hop
//! headers and gains the request id; the response comes back as it streams.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::body::Body;
use axum::extract::Request;
use axum::response::{IntoResponse, Response};
use cloudllm_proto::endpoints::{self, Routing};
use cloudllm_proto::{self as proto};
use cloudllm_tunnel::body::{BodyError, read_limited};
use cloudllm_tunnel::coalesce::Coalesce;
use http::{HeaderValue, StatusCode, header};
use http_body_util::BodyExt as _;
use tracing::debug;

use super::Api;
use super::accounting::{Model, ServedBy};
use super::body::{CappedBody, Watch, declared_length, discard, model_of, stalled, too_large};
use crate::AppState;
use crate::cluster::RemoteDevice;
use crate::config::TierLimits;
use crate::registry::{Device, RouteError};

/// Request headers that stay at the relay besides the hop-by-hop ones: the caller's
/// credentials, and `Host` (HTTP/2 carries the authority itself).
pub(super) const CALLER_ONLY_HEADERS: &[header::HeaderName] =
    &[header::AUTHORIZATION, header::COOKIE, header::HOST];

/// Longest the relay waits for one device's model list when merging them.
const LISTING_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest model list read from one device: thousands of models fit in 8 MiB.
const MAX_LISTING_BYTES: usize = 8 * 1024 * 1024;

/// Whether the request's body names a model (a JSON object with `"model"`), by the endpoint
/// table both ends share.
fn names_a_model(method: &http::Method, path: &str) -> bool {
    endpoints::routing(method.as_str(), path) == Routing::ByModel
}

/// Picks the device for a request and forwards it: the device named by `x-cloudllm-device`,
/// else (with several devices) one that has the requested model, least busy first. With
/// several devices, `GET /api/tags` and `GET /v1/models` answer with every device's models.
pub(super) async fn route(
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
    // The paths only a cluster or several devices take are boxed (`Box::pin`): inline, their
    // state made every request's future 1.3 KB larger, copied at each level of the call
    // (issue 19).
    // In a cluster, the user's devices on the other nodes too (one Redis round trip), unless
    // the request names a device this node holds.
    let named_here = || {
        wanted.as_deref().is_some_and(|wanted| {
            state
                .registry
                .devices_of(user)
                .iter()
                .any(|d| d.name == wanted || d.id == wanted)
        })
    };
    let remote = match &state.cluster {
        Some(cluster) if !named_here() => Box::pin(cluster.remote_devices(user)).await,
        _ => Vec::new(),
    };
    let several = wanted.is_none() && state.registry.count(user) + remote.len() > 1;
    let path = req.uri().path();
    if several
        && req.method() == http::Method::GET
        && endpoints::routing(req.method().as_str(), path) == Routing::ModelList
    {
        let devices = state.registry.devices_of(user);
        return Box::pin(merged_listing(api, &devices, &remote, request_id)).await;
    }
    let mut model = None;
    let req = if several && names_a_model(req.method(), path) {
        // Routing by model needs the body; model requests are small JSON documents.
        let (parts, body) = req.into_parts();
        let read_timeout = state.config.client_read_timeout;
        let read = read_limited(body, usize::try_from(limit).unwrap_or(usize::MAX));
        let bytes = match Box::pin(tokio::time::timeout(read_timeout, read)).await {
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
    let picked = state
        .registry
        .pick(user, wanted.as_deref(), model.as_deref());
    // A device on this node is served here; else one held by another node, through it.
    let picked = match picked {
        Err(_) if !remote.is_empty() => {
            match pick_remote(&remote, wanted.as_deref(), model.as_deref()) {
                Some(device) => {
                    let limits = (limit, state.config.client_read_timeout);
                    let sniff = model.is_none() && state.audit.is_enabled();
                    let hop = (user, device, sniff);
                    let mut response = Box::pin(super::forward_remote(
                        state, api, hop, limits, request_id, received, req,
                    ))
                    .await;
                    if let Some(model) = model {
                        response.extensions_mut().insert(Model(model));
                    }
                    return response;
                }
                None => Err(no_device_anywhere(
                    (wanted.as_deref(), model.as_deref()),
                    &state.registry.devices_of(user),
                    &remote,
                )),
            }
        }
        picked => picked,
    };
    let device = match picked {
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
    remote: &[RemoteDevice],
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
    // Devices on other nodes, from their presence records: names only, which is what
    // clients choose by.
    for device in remote {
        answered += 1;
        for name in &device.models {
            if seen.insert(name.clone()) {
                merged.push(if openai {
                    serde_json::json!({ "id": name, "object": "model", "created": 0, "owned_by": device.name })
                } else {
                    serde_json::json!({ "name": name, "model": name })
                });
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
    let names: Vec<&str> = devices
        .iter()
        .map(|d| d.name.as_str())
        .chain(remote.iter().map(|d| d.name.as_str()))
        .collect();
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

/// The caller's request as a device receives it, from this node's tunnel or through the node
/// holding it ([`super::forward_remote`]): hop-by-hop and caller-only headers dropped, the
/// caller's device choice removed, the request id set, the body capped at `(limit,
/// read_timeout)` and counted into `received`; with `sniff_model`, the model it names is noted
/// (on the endpoints whose body names one).
pub(super) fn outgoing(
    req: Request,
    request_id: &HeaderValue,
    cap: (u64, Duration),
    received: &Arc<AtomicU64>,
    sniff_model: bool,
) -> (http::Request<Body>, Watch) {
    let sniff = sniff_model && names_a_model(req.method(), req.uri().path());
    let (mut parts, body) = req.into_parts();
    cloudllm_tunnel::headers::remove_hop_by_hop(&mut parts.headers);
    for name in CALLER_ONLY_HEADERS {
        parts.headers.remove(name);
    }
    parts.headers.remove(proto::HEADER_DEVICE);
    parts
        .headers
        .insert(proto::HEADER_REQUEST_ID, request_id.clone());
    let (body, watch) = CappedBody::new(body, cap, received, sniff);
    (http::Request::from_parts(parts, Body::new(body)), watch)
}

/// Sends one request to `device` with its body streamed (capped at `cap`: `(limit,
/// read_timeout)`, given up when the caller sends nothing for `read_timeout`), and streams the
/// response back. With `sniff_model`, the model named in the body's first chunk is noted for
/// the audit log.
pub(super) async fn forward_to(
    api: Api<'_>,
    device: &Arc<Device>,
    cap: (u64, Duration),
    request_id: &HeaderValue,
    received: &Arc<AtomicU64>,
    sniff_model: bool,
    req: Request,
) -> Response {
    // The tunnel carries the path and query only; hyper has already checked them.
    let (request, watch) = outgoing(req, request_id, cap, received, sniff_model);
    let in_flight = device.begin_request();
    let method = request.method().clone();
    // For the debug line only: not copied when it is off.
    let path = tracing::enabled!(tracing::Level::DEBUG).then(|| request.uri().path().to_owned());
    let path = path.as_deref().unwrap_or_default();
    let sent = match device.sender().await {
        Ok(sender) => match sender.send_request(request).await {
            Err(cloudllm_tunnel::mux::Error::HeadTooLarge) => {
                return api.error(
                    StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                    &format!(
                        "the request's headers come to more than the {} bytes the tunnel carries; send fewer or shorter headers",
                        cloudllm_tunnel::MAX_HEADER_LIST_BYTES
                    ),
                );
            }
            sent => sent.map_err(|err| err.to_string()),
        },
        Err(offline) => Err(offline.to_string()),
    };
    let sent = sent.map(|response| {
        debug!(user = %device.user, device = %device.name, %method, %path, status = response.status().as_u16(), request_id = ?request_id, "request");
        let (mut parts, body) = response.into_parts();
        cloudllm_tunnel::headers::remove_hop_by_hop(&mut parts.headers);
        // Chunks already waiting go out as one; the request counts as in flight until its
        // body ends or the caller goes away.
        let body = Coalesce::new(body).map_frame(move |frame| {
            let _ = &in_flight;
            frame
        });
        Response::from_parts(parts, Body::new(body))
    });
    let failed = |err: String| {
        debug!(error = %err, "tunnel request failed");
        format!(
            "the tunnel to device {:?} failed before the response started ({err}); it may have just gone offline — try again",
            device.name
        )
    };
    answer(api, sent, &watch, cap, &device.name, failed)
}

/// The caller's answer to a request sent to `device` (on this node or another), watched by
/// `watch` and capped at `(limit, read_timeout)`: the device's response, else 413 or 408 when
/// the request body broke a cap, else 502 with `failed`'s message. Marked with the device that
/// served and the model the body named, for the audit log.
pub(super) fn answer<E>(
    api: Api<'_>,
    sent: Result<Response, E>,
    watch: &Watch,
    (limit, read_timeout): (u64, Duration),
    device: &str,
    failed: impl FnOnce(E) -> String,
) -> Response {
    let mut response = match sent {
        Ok(response) => response,
        Err(_) if watch.over_limit() => return too_large(api, limit),
        Err(_) if watch.stalled() => return stalled(api, read_timeout),
        Err(err) => api.error(StatusCode::BAD_GATEWAY, &failed(err)),
    };
    response
        .extensions_mut()
        .insert(ServedBy(device.to_owned()));
    if let Some(model) = watch.model() {
        response.extensions_mut().insert(Model(model.clone()));
    }
    response
}

/// The device on another node that should serve a request: the one named `wanted` (name or
/// id); else the least loaded of those with `model`; else the least loaded.
fn pick_remote<'a>(
    remote: &'a [RemoteDevice],
    wanted: Option<&str>,
    model: Option<&str>,
) -> Option<&'a RemoteDevice> {
    match (wanted, model) {
        (Some(wanted), _) => remote.iter().find(|d| d.name == wanted || d.id == wanted),
        (None, Some(model)) => remote
            .iter()
            .filter(|d| d.has_model(model))
            .min_by_key(|d| d.load),
        (None, None) => remote.iter().min_by_key(|d| d.load),
    }
}

/// Why no device on any node could take a request for `wanted` or `model`, naming the
/// user's devices on every node.
fn no_device_anywhere(
    (wanted, model): (Option<&str>, Option<&str>),
    local: &[Arc<Device>],
    remote: &[RemoteDevice],
) -> RouteError {
    let names = local
        .iter()
        .map(|d| d.name.as_str())
        .chain(remote.iter().map(|d| d.name.as_str()))
        .collect::<Vec<_>>()
        .join(", ");
    match (wanted, model) {
        (Some(wanted), _) => RouteError::UnknownDevice(wanted.to_owned(), names),
        (None, Some(model)) => RouteError::NoModel(model.to_owned(), names),
        (None, None) => RouteError::NoDevice,
    }
}

/// Serves a request another node forwarded (already verified, see [`crate::cluster::peer`])
/// from the tunnel of the device it names. The sending node applied the user's limits and
/// caps the body at the user's tier; here the largest tier's cap bounds it.
pub(crate) async fn serve_forwarded(
    state: &AppState,
    user: &str,
    from: &str,
    mut req: Request,
) -> Response {
    let path = req.uri().path().to_owned();
    let api = Api(&path);
    let headers = req.headers_mut();
    let request_id = headers
        .get(proto::HEADER_REQUEST_ID)
        .cloned()
        .unwrap_or(HeaderValue::from_static("unknown"));
    let id = headers
        .get(proto::HEADER_DEVICE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    for name in [
        crate::cluster::peer::HEADER_PEER_NODE,
        crate::cluster::peer::HEADER_PEER_USER,
        crate::cluster::peer::HEADER_PEER_TIME,
        crate::cluster::peer::HEADER_PEER_SIGNATURE,
    ] {
        headers.remove(name);
    }
    let Some(device) = state
        .registry
        .devices_of(user)
        .into_iter()
        .find(|d| d.id == id)
    else {
        debug!(%from, "forwarded request for a device no longer here");
        return api.error(
            StatusCode::SERVICE_UNAVAILABLE,
            "your device just moved to another relay node or went offline; try again",
        );
    };
    let limit = state
        .config
        .tiers
        .values()
        .map(|t| t.max_body_bytes)
        .max()
        .unwrap_or(u64::MAX);
    let received = Arc::new(AtomicU64::new(0));
    let limits = (limit, state.config.client_read_timeout);
    forward_to(api, &device, limits, &request_id, &received, false, req).await
}
