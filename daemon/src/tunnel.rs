//! The daemon's end of the tunnel: dial the relay, serve the sessions the relay opens on the WebSocket, and
//! redial for ever with backoff, reporting each step in the daemon's [`State`].
//!
//! A tunnel ends in one of five ways: the relay asked it to drain (it is restarting), or the
//! WebSocket was closed with 1012 "service restart" or 1001 "going away" (as a proxy in front
//! of the relay does when it restarts) — redial at once; it closed or failed after working for
//! a while — redial after a short random delay; dialling failed — redial with exponential
//! backoff and full jitter, capped; the daemon stopped this tunnel — in-flight requests
//! finish (within the grace period) and it returns; or the relay closed it with
//! [`CLOSE_REPLACED`] because a newer tunnel with this device id took over — it returns too.
//!
//! A replacement by this daemon's own newer tunnel (a renewed token, changed settings: see
//! [`Stop::superseded`]) is the planned handover. Any other replacement came from a second
//! daemon with the same device id (a copied state directory) or from someone holding the agent
//! token: redialling would take the device back and be taken again, for ever, with each side's
//! requests failing in between. So the daemon stops, reports [`Connection::Replaced`], and
//! leaves the choice to its user (`cloudllm connect`), as a chat app open in two places asks
//! which one to use instead of flipping between them.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use cloudllm_proto::ipc::Connection;
use cloudllm_proto::{CLOSE_REPLACED, Control, Hello, PROTOCOL_VERSION, Secret, sane_models};
use cloudllm_tunnel::Link;
use cloudllm_tunnel::server::{self, RelaySignals, Served};
use futures_util::{FutureExt, SinkExt};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::backoff::Backoff;
use crate::config::DaemonConfig;
use crate::dial::{self, DialError};
use crate::forward::Forwarder;
use crate::lanes::Lanes;
use crate::state::TunnelReport;

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
    /// This daemon has started a newer tunnel for the same device, before it dials: once that
    /// one registers, the relay closes this one as replaced, and that is no one else's doing.
    /// Cancelled before the newer tunnel exists, so the relay's replacement can never be seen
    /// first.
    pub superseded: CancellationToken,
}

/// Why [`run`] returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finished {
    /// The daemon stopped or retired the tunnel, or its own newer tunnel replaced it.
    Stopped,
    /// Another connection with this device id replaced the tunnel on the relay at `at` (Unix
    /// seconds); the daemon does not dial again by itself.
    Replaced {
        /// When, Unix seconds.
        at: u64,
    },
}

/// How one connection ended.
enum Ended {
    /// The relay asked us to drain: it is going away; dial again at once.
    Drained,
    /// The connection closed or failed after it was established.
    Closed(Option<String>),
    /// The relay closed it with [`CLOSE_REPLACED`]: a newer tunnel has this device id.
    Replaced,
    /// The daemon stopped or retired this tunnel.
    Stopped,
}

/// Keeps a tunnel to the relay open until `stop` says otherwise (then lets in-flight requests
/// finish, see [`Stop`]) or another connection replaces it; then returns why. `up` is
/// cancelled once the relay has registered this device on a connection, i.e. once requests
/// can arrive. Each step is reported through `report`, which the daemon's state heeds only
/// while this is its current tunnel.
pub async fn run(
    session: Session,
    report: TunnelReport,
    stop: Stop,
    up: CancellationToken,
) -> anyhow::Result<Finished> {
    let state = report.state();
    let config = &session.config;
    let tls = dial::tls_config(config)?;
    let forwarder = Arc::new(Forwarder::for_config(config, state.clone())?);
    let mut backoff = Backoff::new(config.reconnect_max);
    let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::from_os_rng();
    // The relay refused the token at the latest upgrade it answered: "login required" stays
    // shown through network failures until the relay accepts a token again.
    let mut refused = false;
    loop {
        if backoff.attempt() == 0 {
            report.set_connection(Connection::Connecting);
        }
        let dialled = tokio::select! {
            dialled = dial::dial(config, &tls, &session.device_id, &session.token, None) => dialled,
            () = stop.now.cancelled() => return Ok(Finished::Stopped),
            () = stop.retire.cancelled() => return Ok(Finished::Stopped),
        };
        let (delay, error) = match dialled {
            Ok(ws) => {
                refused = false;
                let started = Instant::now();
                match serve(ws, &session, &tls, &forwarder, &report, &stop, &up).await {
                    Ended::Stopped => return Ok(Finished::Stopped),
                    Ended::Replaced if stop.superseded.is_cancelled() => {
                        info!("this device's newer tunnel took over from this one");
                        return Ok(Finished::Stopped);
                    }
                    Ended::Replaced => {
                        let at = unix_now();
                        warn!(
                            device_id = %session.device_id,
                            "another connection with this device id replaced this tunnel on the \
                             relay: not reconnecting until `cloudllm connect`"
                        );
                        report.set_connection(Connection::Replaced { at });
                        return Ok(Finished::Replaced { at });
                    }
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
                    refused = true;
                    report.set_connection(Connection::LoginRequired {
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
        if !delay.is_zero() && !refused {
            report.set_connection(Connection::Reconnecting {
                attempt: backoff.attempt(),
                next_try: unix_now() + delay.as_secs(),
                last_error: error,
            });
        }
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = stop.now.cancelled() => return Ok(Finished::Stopped),
            () = stop.retire.cancelled() => return Ok(Finished::Stopped),
        }
    }
}

/// Serves one established WebSocket until it ends: says hello, then answers the
/// sessions the relay opens, and keeps the relay's view of this device's models current.
async fn serve(
    mut ws: tokio_tungstenite::WebSocketStream<Box<dyn dial::Stream>>,
    session: &Session,
    tls: &Arc<rustls::ClientConfig>,
    forwarder: &Arc<Forwarder>,
    report: &TunnelReport,
    stop: &Stop,
    up: &CancellationToken,
) -> Ended {
    let config = &session.config;
    let relay = config
        .relay_url
        .as_ref()
        .map(|u| u.as_str())
        .unwrap_or_default();
    let mut models = report.state().models();
    let hello = Control::Hello(Hello {
        protocol_version: PROTOCOL_VERSION,
        daemon_version: env!("CARGO_PKG_VERSION").to_owned(),
        models: sane_models(models.borrow_and_update().clone()),
        lanes: true,
    });
    let bound = config.liveness().detection_bound();
    let message = Message::Text(hello.to_text().into());
    match tokio::time::timeout(bound, ws.send(message)).await {
        Ok(Ok(())) => {}
        Ok(Err(err)) => return Ended::Closed(Some(format!("sending the hello: {err}"))),
        Err(_) => return Ended::Closed(Some(format!("the relay took no hello for {bound:?}"))),
    }
    let signals = RelaySignals::default();
    let link = Link::new(ws, config.liveness(), signals.handler()).with_rtt(report.rtt_cell());
    let outbox = link.outbox();
    let service = forwarder.clone().service();
    let closing = CancellationToken::new();
    // Dropped when this function returns: the lanes drain with the tunnel's connection.
    let lanes = Lanes::new(
        session.clone(),
        tls.clone(),
        report.state().clone(),
        closing.clone(),
    );
    // The session runs in a task of its own, so that each of its wake-ups (several per
    // request) does not also poll every branch of the select below (issue 19); it ends with
    // this function (aborted when dropped).
    let session = tokio::spawn({
        let closing = closing.clone();
        async move { server::serve(link, service, &closing).await }
    });
    let served = tokio_util::task::AbortOnDropHandle::new(session)
        .map(|joined| joined.unwrap_or_else(|err| Served::Failed(Box::new(err))));
    tokio::pin!(served);
    let mut registered = false;
    let ended = loop {
        tokio::select! {
            served = served.as_mut() => break served,
            () = signals.ready.cancelled(), if !registered => {
                registered = true;
                info!(%relay, device = %config.device_name, "tunnel up");
                report.set_connection(Connection::Connected { since: unix_now(), rtt_ms: None });
                up.cancel();
            }
            changed = models.changed(), if registered => {
                if changed.is_ok() {
                    let models = sane_models(models.borrow_and_update().clone());
                    outbox.push(Control::Models { models });
                }
            }
            () = signals.lanes.notified() => {
                if let Some(asked) = signals.lanes_asked() {
                    lanes.open(asked);
                }
            }
            () = signals.drain.cancelled(), if !closing.is_cancelled() => {
                info!("relay asked this tunnel to drain");
                closing.cancel();
            }
            () = stop.now.cancelled(), if !closing.is_cancelled() => closing.cancel(),
            () = stop.retire.cancelled(), if !closing.is_cancelled() => closing.cancel(),
        }
        if closing.is_cancelled() {
            // Draining: new requests are refused; the ones in flight finish within the limit.
            let grace = config.shutdown_grace;
            let limit = if stop.retire.is_cancelled() && !stop.now.is_cancelled() {
                RETIRE_DRAIN
            } else {
                grace
            };
            // The lanes' requests too: the lanes end when this function returns.
            let drained = async {
                let served = served.as_mut().await;
                lanes.finished().await;
                served
            };
            tokio::pin!(drained);
            let finished = tokio::select! {
                finished = tokio::time::timeout(limit, drained.as_mut()) => finished.ok(),
                () = stop.now.cancelled(), if limit != grace => {
                    tokio::time::timeout(grace, drained.as_mut()).await.ok()
                }
            };
            match finished {
                Some(served) => break served,
                None => {
                    warn!(
                        ?limit,
                        "in-flight requests still running after the drain limit: cut"
                    );
                    lanes.cut();
                    break Served::Failed("cut after the drain limit".into());
                }
            }
        }
    };
    let stopped = stop.now.is_cancelled() || stop.retire.is_cancelled();
    match ended {
        Served::Stopped(mut link) => {
            let reason = if stopped {
                "daemon stopping"
            } else {
                "drained"
            };
            link.close(CloseCode::Normal, reason).await;
            if stopped {
                Ended::Stopped
            } else {
                Ended::Drained
            }
        }
        _ if stopped => Ended::Stopped,
        Served::Closed(Some(frame)) if u16::from(frame.code) == CLOSE_REPLACED => Ended::Replaced,
        _ if signals.drain.is_cancelled() => Ended::Drained,
        Served::Closed(Some(frame))
            if matches!(frame.code, CloseCode::Restart | CloseCode::Away) =>
        {
            // The relay's words, escaped: they go into a log line.
            info!(code = u16::from(frame.code), reason = ?frame.reason.as_str(), "tunnel closed for a restart");
            Ended::Drained
        }
        Served::Closed(Some(frame)) => Ended::Closed(Some(format!(
            "WebSocket closed with code {} ({})",
            u16::from(frame.code),
            if frame.reason.is_empty() {
                "no reason given".to_owned()
            } else {
                // Shown by `cloudllm status` and logged: no control characters from the wire.
                cloudllm_proto::printable(frame.reason.as_str()).into_owned()
            }
        ))),
        Served::Closed(None) => Ended::Closed(None),
        Served::Failed(err) => Ended::Closed(Some(server::with_causes(err.as_ref()))),
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
