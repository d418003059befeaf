//! The user-facing API: `/api/*` (Ollama) and `/v1/*` (OpenAI-compatible), forwarded as one
//! tunnel stream each to one of the caller's own devices.
//!
//! A request passes [admission](crate::admission) (the address's failure budget, the client
//! token, the tier) and its tier's request limits here; then
//! - [`route`] picks the device and forwards the request (or merges every device's model list),
//! - [`hop`] sends a request whose device another cluster node holds to that node,
//! - [`body`] bounds the request body on its way, in bytes and in time,
//! - [`accounting`] follows the response back: metrics, the audit line, the tier's
//!   `max_stream`, and the request's place in its tier's concurrency limit.
//!
//! Bodies stream both ways without buffering. The relay strips the caller's credentials and
//! hop-by-hop headers before anything reaches the device, and tags the request with an
//! `x-request-id` that comes back on the response. When the caller goes away, dropping the
//! response body resets the stream, which makes the daemon abort its request to Ollama.

mod accounting;
mod body;
mod entry;
mod hop;
mod route;

pub(crate) use entry::{ApiEntry, is_api_path};
use hop::forward_remote;
pub(crate) use route::serve_forwarded;

use std::net::IpAddr;
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use cloudllm_proto as proto;
use http::{HeaderValue, StatusCode, header};
use tracing::debug;

use crate::admission::Caller;
use crate::auth::Scope;
use crate::limits::Refusal;
use crate::{AppState, Denied};
use accounting::{AuditFields, Model, RequestRecord, ServedBy, Tracked};

/// The API a request came in on, so errors come in the shape its clients parse.
#[derive(Clone, Copy)]
pub(crate) struct Api<'a>(pub(crate) &'a str);

impl Api<'_> {
    pub(crate) fn error(self, status: StatusCode, message: &str) -> Response {
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

/// `/api/*` and `/v1/*`: admit the caller, apply their tier's request limits, pick one of their
/// devices, forward, stream back.
pub async fn forward(State(state): State<Arc<AppState>>, req: Request) -> Response {
    let started = tokio::time::Instant::now();
    let path = req.uri().path().to_owned();
    let api = Api(&path);
    let addr = state.client_addr(&req);
    let Caller {
        identity,
        tier_name,
        tier,
    } = match state.admit(req.headers(), addr, Scope::Client, "api").await {
        Ok(caller) => caller,
        Err(Denied::Limited(refusal)) => return limited(&state, api, None, addr, &refusal),
        Err(Denied::Auth(err)) => return api.error(err.status(), &err.to_string()),
    };
    let mut admitted = match state.limits.admit(&identity.user, tier_name, tier) {
        Ok(admitted) => admitted,
        Err(refusal) => return limited(&state, api, Some(&identity.user), addr, &refusal),
    };
    if let Some(cluster) = &state.cluster {
        match Box::pin(cluster.admit(&identity.user, tier_name, tier)).await {
            Ok(Some(slot)) => admitted.attach(slot),
            Ok(None) => {}
            Err(refusal) => return limited(&state, api, Some(&identity.user), addr, &refusal),
        }
    }
    // The connection no longer counts against the caps on unauthenticated connections.
    crate::connections::admitted(req.extensions());
    // Set by `ApiEntry` ([`crate::request_id`]), which also puts it on the response.
    let request_id = req
        .headers()
        .get(proto::HEADER_REQUEST_ID)
        .cloned()
        .unwrap_or(HeaderValue::from_static("unknown"));
    let method = req.method().to_string();
    let mut record = RequestRecord::new(&state, started);
    let response = route::route(
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
    Tracked::wrap(response, record, tier.max_stream, admitted)
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
    state.too_many(refusal, user, addr, "api", |status, message| {
        api.error(status, message)
    })
}
