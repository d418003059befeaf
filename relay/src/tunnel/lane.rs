//! A busy tunnel's lanes: more connections from the same daemon, one per relay thread (shard),
//! each carrying a session of its own.
//!
//! Why: a tunnel is one connection, served by one relay thread and one daemon thread, and a
//! busy device's requests all queue on those two threads while the other cores wait
//! (docs/performance.md). When a device's session opens, the relay asks its daemon (if its
//! hello offered lanes) for a lane to every other shard; the daemon dials each one on a thread
//! of its own, with the tunnel's key and the shard in the upgrade's `x-cloudllm-lane` header,
//! and the relay serves the upgrade on that shard (`crate::shards`). A request served on a
//! shard with a lane of its device then uses that lane's session: request and session on one
//! thread, at both ends, and every core busy.
//!
//! A lane is part of its tunnel, not a device of its own: it is not registered, counts against
//! no limit of the user (one per shard per tunnel, and only while the tunnel is), sends no
//! hello, and carries no control messages. It ends when its device has been idle for
//! `session_idle`, when its tunnel ends or is replaced, or at relay shutdown, each time after
//! its requests in flight finish; the daemon does not dial it again by itself (the next busy
//! period asks anew). Without lanes (TLS served by the relay itself, a cluster, a single
//! thread, an older daemon) the tunnel alone carries every request, as before.

use std::sync::Arc;

use cloudllm_tunnel::mux::Ended;
use cloudllm_tunnel::{Link, ReadAhead};
use http::{HeaderValue, StatusCode};
use hyper_util::rt::TokioIo;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tracing::{debug, warn};

use super::HANDSHAKE_TIMEOUT;
use super::running::REPLACED_GRACE;
use crate::AppState;
use crate::registry::Device;

/// The device whose tunnel a lane's upgrade names (`x-cloudllm-lane: SHARD.KEY`), and the
/// shard, which must be the one serving the upgrade; else the status and message to refuse it
/// with.
pub(super) fn find(
    state: &AppState,
    user: &str,
    device_id: &str,
    header: &HeaderValue,
) -> Result<(Arc<Device>, usize), (StatusCode, String)> {
    let invalid = || {
        (
            StatusCode::BAD_REQUEST,
            format!(
                "invalid {} header: expected SHARD.KEY as the relay asked",
                cloudllm_proto::HEADER_LANE
            ),
        )
    };
    let (shard, key) = header
        .to_str()
        .ok()
        .and_then(|value| value.split_once('.'))
        .ok_or_else(invalid)?;
    let shard: usize = shard.parse().map_err(|_| invalid())?;
    if !cloudllm_proto::valid_lane_key(key) {
        return Err(invalid());
    }
    if crate::shards::current() != Some(shard) {
        return Err((
            StatusCode::CONFLICT,
            format!(
                "this lane is for relay thread {shard} and reached another: lanes need the \
                 relay's plain HTTP port (or a proxy that keeps one connection per WebSocket)"
            ),
        ));
    }
    let device = state
        .registry
        .lane_device(user, device_id, key)
        .ok_or_else(|| {
            (
                StatusCode::GONE,
                "no tunnel of this device has that lane key: it has closed or been replaced"
                    .to_owned(),
            )
        })?;
    Ok((device, shard))
}

/// Serves one lane of `device` on `shard` (the current one) until it ends (see the module
/// docs).
pub(super) async fn run(
    state: Arc<AppState>,
    device: Arc<Device>,
    shard: usize,
    on_upgrade: hyper::upgrade::OnUpgrade,
) {
    let upgraded = match tokio::time::timeout(HANDSHAKE_TIMEOUT, on_upgrade).await {
        Ok(Ok(upgraded)) => upgraded,
        Ok(Err(err)) => return warn!(error = %err, "lane upgrade failed"),
        Err(_) => return warn!("lane upgrade timed out"),
    };
    let ws = WebSocketStream::from_raw_socket(
        ReadAhead::new(TokioIo::new(upgraded)),
        Role::Server,
        Some(cloudllm_tunnel::ws_config(
            cloudllm_tunnel::RELAY_WS_READ_BUFFER,
        )),
    )
    .await;
    // Lanes carry no control messages: whatever a daemon sends there is ignored.
    let link = Link::new(ws, state.config.liveness(), Box::new(|_| {}));
    let (client, cut, connection) = cloudllm_tunnel::mux::client::connect(link);
    // In a task of its own, as a tunnel's session: its wake-ups do not poll the select below.
    let mut connection = tokio::spawn(connection);
    if !device.attach_lane(shard, client) {
        debug!("a lane for this thread is open already, or the tunnel is gone");
        cut.cut();
        return close(connection.await, CloseCode::Policy, "no lane wanted here").await;
    }
    let _open = state.metrics.lane_open();
    debug!("lane up");
    let reason = tokio::select! {
        ended = &mut connection => {
            device.detach_lane(shard);
            if let Ok(Ended { result: Err(err), .. }) = &ended {
                debug!(error = %err, "lane failed");
            }
            return debug!("lane closed by the daemon");
        }
        () = device.idle_for(state.config.session_idle) => "device idle",
        () = device.ended() => "tunnel closed",
        () = state.shutdown.cancelled() => "relay shutdown",
    };
    // No new request takes the lane; those in flight finish first.
    device.detach_lane(shard);
    let grace = if state.shutdown.is_cancelled() {
        state.config.shutdown_grace
    } else {
        REPLACED_GRACE
    };
    let ended = match tokio::time::timeout(grace, &mut connection).await {
        Ok(ended) => ended,
        Err(_) => {
            warn!(?grace, "lane still busy after the grace period: cut");
            cut.cut();
            connection.await
        }
    };
    debug!(reason, "lane closed");
    close(ended, CloseCode::Normal, reason).await;
}

/// Closes the lane's WebSocket once its session has ended, unless the daemon closed it.
async fn close(
    ended: Result<Ended<super::TunnelIo>, tokio::task::JoinError>,
    code: CloseCode,
    reason: &str,
) {
    if let Ok(Ended { mut link, .. }) = ended
        && !link.is_closed()
    {
        link.close(code, reason).await;
    }
}
