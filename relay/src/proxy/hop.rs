//! The hop to another node: a request whose device is held by another cluster node is sent
//! there ([`crate::cluster::peer`]) and its response streamed back.
//!
//! The request is prepared as for a local device (the caller's credentials and hop-by-hop
//! headers removed, the request id set, the body capped at the tier's size and read timeout);
//! the holding node serves it from its tunnel. Dropping the response body (the caller hung up)
//! resets the node-to-node stream, and the holding node resets the tunnel's.

use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use axum::body::Body;
use axum::extract::Request;
use axum::response::Response;
use http::{HeaderValue, StatusCode};
use tracing::{debug, info};

use super::Api;
use super::route::{answer, outgoing};
use crate::AppState;
use crate::cluster::RemoteDevice;

/// Forwards `req` for `user` to `device` on another node: `(user, device, sniff_model)`, the
/// body capped at `cap`: `(limit, read_timeout)`.
pub(super) async fn forward_remote(
    state: &AppState,
    api: Api<'_>,
    (user, device, sniff_model): (&str, &RemoteDevice, bool),
    cap: (u64, Duration),
    request_id: &HeaderValue,
    received: &Arc<AtomicU64>,
    req: Request,
) -> Response {
    let Some(cluster) = &state.cluster else {
        return api.error(StatusCode::SERVICE_UNAVAILABLE, "not a cluster node");
    };
    let (request, watch) = outgoing(req, request_id, cap, received, sniff_model);
    let method = request.method().clone();
    let path = request.uri().path().to_owned();
    state.metrics.forwarded_out.inc();
    let started = tokio::time::Instant::now();
    let sent = cluster
        .peers
        .send(
            &device.addr,
            state.config.liveness(),
            user,
            &device.id,
            request,
        )
        .await;
    let sent = sent.map(|response| {
        state
            .metrics
            .hop_latency
            .observe(started.elapsed().as_secs_f64());
        info!(%user, device = %device.name, node = %device.node, %method, %path, status = response.status().as_u16(), request_id = ?request_id, "request via node");
        let (mut parts, body) = response.into_parts();
        cloudllm_tunnel::headers::remove_hop_by_hop(&mut parts.headers);
        Response::from_parts(parts, Body::new(body))
    });
    let failed = |err: anyhow::Error| {
        debug!(error = %format!("{err:#}"), node = %device.node, "forwarding to a node failed");
        format!(
            "relay node {:?}, which holds device {:?}, could not be reached ({err}); it may have just gone down — try again",
            device.node, device.name
        )
    };
    answer(api, sent, &watch, cap, &device.name, failed)
}
