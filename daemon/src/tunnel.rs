//! The daemon's end of the tunnel: dial the relay, serve HTTP/2 over the WebSocket, and
//! redial for ever with backoff.
//!
//! A tunnel ends in one of three ways: the relay asked it to drain (it is restarting) — redial
//! at once; it closed or failed after working for a while — redial after a short random delay;
//! or dialling failed — redial with exponential backoff and full jitter, capped.

use std::sync::Arc;
use std::time::Duration;

use cloudllm_tunnel::WsIo;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, info, info_span, warn};

use crate::backoff::Backoff;
use crate::config::DaemonConfig;
use crate::dial::{self, DialError};
use crate::forward::Forwarder;

/// A tunnel that stayed up this long counts as good: the next failure backs off from the
/// start again. Shorter-lived tunnels (accepted, then dropped at once) keep backing off, so a
/// relay that refuses us after the upgrade is not hammered.
const STABLE_AFTER: Duration = Duration::from_secs(10);

/// How a tunnel ended.
enum Ended {
    /// The relay asked us to drain: it is going away; dial again at once.
    Drained,
    /// The connection closed or failed after it was established.
    Closed(Option<String>),
    /// The daemon is shutting down.
    Shutdown,
}

/// Keeps a tunnel to the relay open until `shutdown` is cancelled.
pub async fn run(
    config: Arc<DaemonConfig>,
    forwarder: Arc<Forwarder>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let tls = dial::tls_config(&config)?;
    let device_id = config
        .device_id
        .clone()
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    let mut backoff = Backoff::new(config.reconnect_max);
    let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::from_os_rng();
    loop {
        let attempt = async {
            let ws = dial::dial(&config, &tls, &device_id).await?;
            let up = Instant::now();
            let ended = serve(ws, &config, &forwarder, &shutdown).await;
            Ok::<_, DialError>((ended, up.elapsed()))
        };
        let outcome = tokio::select! {
            outcome = attempt => outcome,
            () = shutdown.cancelled() => return Ok(()),
        };
        let delay = match outcome {
            Ok((Ended::Shutdown, _)) => return Ok(()),
            Ok((Ended::Drained, _)) => {
                info!("tunnel drained by the relay; reconnecting");
                backoff.reset();
                Duration::ZERO
            }
            Ok((Ended::Closed(reason), lived)) => {
                if lived >= STABLE_AFTER {
                    backoff.reset();
                }
                let delay = backoff.next_delay(&mut rng);
                warn!(reason = reason.as_deref().unwrap_or("closed by the relay"), retry_in = ?delay, "tunnel lost");
                delay
            }
            Err(err) => {
                let delay = backoff.next_delay(&mut rng);
                match &err {
                    DialError::Refused { status: 401, .. } => warn!(
                        error = %err, retry_in = ?delay,
                        "the relay does not accept this agent token: get a new one (CLOUDLLM_TOKEN)"
                    ),
                    _ => {
                        warn!(error = %err, attempt = backoff.attempt(), retry_in = ?delay, "cannot reach the relay")
                    }
                }
                delay
            }
        };
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = shutdown.cancelled() => return Ok(()),
        }
    }
}

/// Serves HTTP/2 on one established WebSocket until it ends.
async fn serve(
    ws: tokio_tungstenite::WebSocketStream<Box<dyn dial::Stream>>,
    config: &DaemonConfig,
    forwarder: &Arc<Forwarder>,
    shutdown: &CancellationToken,
) -> Ended {
    let relay = config
        .relay_url
        .as_ref()
        .map(|u| u.as_str())
        .unwrap_or_default();
    info!(%relay, device = %config.device_name, "tunnel up");
    let liveness = config.liveness();
    let io = TokioIo::new(WsIo::new(ws, liveness));
    let drain = CancellationToken::new();
    let service = {
        let forwarder = forwarder.clone();
        let drain = drain.clone();
        service_fn(move |req| {
            let id = req
                .headers()
                .get(cloudllm_proto::HEADER_REQUEST_ID)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("-")
                .to_owned();
            forwarder
                .clone()
                .serve(req, drain.clone())
                .instrument(info_span!("stream", request_id = %id))
        })
    };
    let connection = cloudllm_tunnel::h2_server(liveness).serve_connection(io, service);
    tokio::pin!(connection);
    let closing = tokio::select! {
        result = connection.as_mut() => return Ended::Closed(result.err().map(|e| format!("{e:#}"))),
        () = drain.cancelled() => Ended::Drained,
        () = shutdown.cancelled() => Ended::Shutdown,
    };
    // GOAWAY: no new streams; the ones in flight finish (within the grace period).
    connection.as_mut().graceful_shutdown();
    if tokio::time::timeout(config.shutdown_grace, connection)
        .await
        .is_err()
    {
        warn!(grace = ?config.shutdown_grace, "in-flight requests still running after the grace period: cut");
    }
    closing
}
