//! The daemon's end of the tunnel: dial the relay, serve HTTP/2 over the WebSocket, and
//! redial for ever with backoff, reporting each step in the daemon's [`State`].
//!
//! A tunnel ends in one of four ways: the relay asked it to drain (it is restarting), or the
//! WebSocket was closed with 1012 "service restart" or 1001 "going away" (as a proxy in front
//! of the relay does when it restarts) — redial at once; it closed or failed after working for
//! a while — redial after a short random delay; dialling failed — redial with exponential
//! backoff and full jitter, capped; or the daemon stopped this tunnel — in-flight requests
//! finish (within the grace period) and it returns.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use cloudllm_proto::Secret;
use cloudllm_proto::ipc::Connection;
use cloudllm_tunnel::{CloseCell, WsIo};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, info, info_span, warn};

use crate::backoff::Backoff;
use crate::config::DaemonConfig;
use crate::dial::{self, DialError};
use crate::forward::{ConnectionSignals, Forwarder};
use crate::state::State;

/// A tunnel that stayed up this long counts as good: the next failure backs off from the
/// start again. Shorter-lived tunnels (accepted, then dropped at once) keep backing off, so a
/// relay that refuses us after the upgrade is not hammered.
const STABLE_AFTER: Duration = Duration::from_secs(10);

/// What one tunnel runs with.
#[derive(Clone)]
pub struct Session {
    /// The daemon's settings.
    pub config: Arc<DaemonConfig>,
    /// The agent token.
    pub token: Secret,
    /// This device's id on the relay.
    pub device_id: String,
}

/// Longest a replaced tunnel keeps serving the requests it has in flight: 5 min covers a long
/// generation on a slow machine; the relay cuts it anyway once its token is past expiry.
pub const RETIRE_DRAIN: Duration = Duration::from_secs(300);

/// How the daemon ends a tunnel.
#[derive(Clone, Default)]
pub struct Stop {
    /// The daemon is stopping or the user disconnected: requests in flight get the shutdown
    /// grace period.
    pub now: CancellationToken,
    /// A newer tunnel took over (a refreshed token, changed settings): requests in flight get
    /// up to [`RETIRE_DRAIN`], shortened to the grace period if `now` comes meanwhile.
    pub retire: CancellationToken,
}

/// How one connection ended.
enum Ended {
    /// The relay asked us to drain: it is going away; dial again at once.
    Drained,
    /// The connection closed or failed after it was established.
    Closed(Option<String>),
    /// The daemon stopped or retired this tunnel.
    Stopped,
}

/// Keeps a tunnel to the relay open until `stop` says otherwise; then lets in-flight requests
/// finish (see [`Stop`]) and returns. `up` is cancelled once the relay has fetched
/// this device's hello on a connection, i.e. once requests can arrive.
pub async fn run(
    session: Session,
    state: Arc<State>,
    stop: Stop,
    up: CancellationToken,
) -> anyhow::Result<()> {
    let config = &session.config;
    let tls = dial::tls_config(config)?;
    let forwarder = Arc::new(Forwarder::new(
        config.ollama_url.clone(),
        config.allow_model_management,
        config.device_name.clone(),
        state.clone(),
    )?);
    let mut backoff = Backoff::new(config.reconnect_max);
    let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::from_os_rng();
    loop {
        if backoff.attempt() == 0 {
            state.set_connection(Connection::Connecting);
        }
        let dialled = tokio::select! {
            dialled = dial::dial(config, &tls, &session.device_id, &session.token) => dialled,
            () = stop.now.cancelled() => return Ok(()),
            () = stop.retire.cancelled() => return Ok(()),
        };
        let (delay, error) = match dialled {
            Ok(ws) => {
                let started = Instant::now();
                match serve(ws, &session, &forwarder, &state, &stop, &up).await {
                    Ended::Stopped => return Ok(()),
                    Ended::Drained => {
                        info!("tunnel drained by the relay; reconnecting");
                        backoff.reset();
                        (Duration::ZERO, "the relay restarted".to_owned())
                    }
                    Ended::Closed(reason) => {
                        if started.elapsed() >= STABLE_AFTER {
                            backoff.reset();
                        }
                        let reason = reason.unwrap_or_else(|| "closed by the relay".to_owned());
                        let delay = backoff.next_delay(&mut rng);
                        warn!(%reason, retry_in = ?delay, "tunnel lost");
                        (delay, format!("tunnel lost: {reason}"))
                    }
                }
            }
            Err(err) => {
                let delay = backoff.next_delay(&mut rng);
                if let DialError::Refused {
                    status: 401,
                    reason,
                } = &err
                {
                    warn!(error = %err, retry_in = ?delay, "the relay does not accept this agent token");
                    state.set_connection(Connection::LoginRequired {
                        reason: format!(
                            "the relay refused the token ({reason}): run `cloudllm login`"
                        ),
                    });
                } else {
                    warn!(error = %err, attempt = backoff.attempt(), retry_in = ?delay, "cannot reach the relay");
                }
                (delay, err.to_string())
            }
        };
        let refused = matches!(
            state.snapshot().connection,
            Connection::LoginRequired { .. }
        );
        if !delay.is_zero() && !refused {
            state.set_connection(Connection::Reconnecting {
                attempt: backoff.attempt(),
                next_try: unix_now() + delay.as_secs(),
                last_error: error,
            });
        }
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = stop.now.cancelled() => return Ok(()),
            () = stop.retire.cancelled() => return Ok(()),
        }
    }
}

/// Serves HTTP/2 on one established WebSocket until it ends.
async fn serve(
    ws: tokio_tungstenite::WebSocketStream<Box<dyn dial::Stream>>,
    session: &Session,
    forwarder: &Arc<Forwarder>,
    state: &Arc<State>,
    stop: &Stop,
    up: &CancellationToken,
) -> Ended {
    let config = &session.config;
    let relay = config
        .relay_url
        .as_ref()
        .map(|u| u.as_str())
        .unwrap_or_default();
    let liveness = config.liveness();
    let close = CloseCell::default();
    let io = TokioIo::new(
        WsIo::new(ws, liveness)
            .with_rtt(state.rtt_cell())
            .with_close(close.clone()),
    );
    let signals = ConnectionSignals::default();
    let service = {
        let forwarder = forwarder.clone();
        let signals = signals.clone();
        service_fn(move |req| {
            let id = req
                .headers()
                .get(cloudllm_proto::HEADER_REQUEST_ID)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("-")
                .to_owned();
            forwarder
                .clone()
                .serve(req, signals.clone())
                .instrument(info_span!("stream", request_id = %id))
        })
    };
    let connection = cloudllm_tunnel::h2_server(liveness).serve_connection(io, service);
    tokio::pin!(connection);
    let mut registered = false;
    let closing = loop {
        tokio::select! {
            result = connection.as_mut() => {
                let frame = close.lock().ok().and_then(|mut slot| slot.take());
                return match frame {
                    Some(frame) if matches!(frame.code, CloseCode::Restart | CloseCode::Away) => {
                        info!(code = u16::from(frame.code), reason = %frame.reason, "tunnel closed for a restart");
                        Ended::Drained
                    }
                    Some(frame) => Ended::Closed(Some(format!(
                        "WebSocket closed with code {} ({})",
                        u16::from(frame.code),
                        if frame.reason.is_empty() { "no reason given" } else { frame.reason.as_str() }
                    ))),
                    None => Ended::Closed(result.err().map(|e| with_causes(&e))),
                };
            }
            () = signals.hello.cancelled(), if !registered => {
                registered = true;
                info!(%relay, device = %config.device_name, "tunnel up");
                state.set_connection(Connection::Connected { since: unix_now(), rtt_ms: None });
                up.cancel();
            }
            () = signals.drain.cancelled() => break Ended::Drained,
            () = stop.now.cancelled() => break Ended::Stopped,
            () = stop.retire.cancelled() => break Ended::Stopped,
        }
    };
    // GOAWAY: no new streams; the ones in flight finish within the limit.
    signals.closing.cancel();
    connection.as_mut().graceful_shutdown();
    let grace = config.shutdown_grace;
    let limit = if stop.now.is_cancelled() {
        grace
    } else {
        RETIRE_DRAIN
    };
    let finished = tokio::select! {
        finished = tokio::time::timeout(limit, connection.as_mut()) => finished.is_ok(),
        () = stop.now.cancelled(), if limit != grace => {
            tokio::time::timeout(grace, connection.as_mut()).await.is_ok()
        }
    };
    if !finished {
        warn!(
            ?limit,
            "in-flight requests still running after the drain limit: cut"
        );
    }
    closing
}

/// `err` and its causes, `: `-separated. hyper's errors print only their own kind
/// ("connection error"); the cause (the peer silent past the ping bound, a reset) is what the
/// user needs to see in `status`.
fn with_causes(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.ends_with(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("connection error")]
    struct Outer(#[source] std::io::Error);

    #[test]
    fn lost_tunnels_are_reported_with_their_causes() {
        let err = Outer(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "tunnel peer silent for 2s",
        ));
        assert_eq!(
            with_causes(&err),
            "connection error: tunnel peer silent for 2s"
        );
        let plain = std::io::Error::other("reset");
        assert_eq!(with_causes(&plain), "reset");
    }
}
