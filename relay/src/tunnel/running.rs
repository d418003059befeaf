//! A registered tunnel's life: idle as a bare WebSocket, a session while requests
//! flow, and its end — closed by the daemon, or drained by the relay.
//!
//! An idle tunnel holds only its WebSocket: the session (its multiplexer state, with its
//! buffers and tables) opens when a request comes and closes after `session_idle` without
//! requests. A tunnel lives no longer than its agent token: once the token's `exp` plus
//! `token_grace` has passed, the device leaves the registry and the tunnel is drained. On relay
//! shutdown each tunnel is drained too: the daemon refuses new requests, lets in-flight streams finish
//! and reconnects (to the next relay, or with a fresh token) at once. A tunnel replaced by a
//! newer one with the same device id lets its requests finish (within [`REPLACED_GRACE`]) and
//! is closed with [`proto::CLOSE_REPLACED`], which tells its daemon not to dial again by itself.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use cloudllm_proto::{self as proto, Control};
use cloudllm_tunnel::mux::Ended;
use cloudllm_tunnel::mux::client::Cut;
use cloudllm_tunnel::{Incoming, Outbox};
use hyper_util::rt::TokioIo;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tracing::{debug, info, warn};

use super::TunnelLink;
use super::hello::open;
use crate::AppState;
use crate::audit::Event;
use crate::limits::Limit;
use crate::registry::Device;

/// Longest a replaced tunnel keeps carrying the requests it has in flight before the relay
/// closes it: 5 min, like the daemon's own limit for a tunnel it retires (a long generation on
/// a slow machine). New requests never reach it, it still counts against its user's tunnels,
/// and relay shutdown or token expiry cut it sooner.
pub const REPLACED_GRACE: Duration = Duration::from_secs(300);

/// Why the relay ends a tunnel that is still up.
#[derive(Debug, Clone, Copy)]
enum Drain {
    /// The relay is shutting down.
    Shutdown,
    /// The agent token's expiry plus `token_grace` has passed.
    TokenExpired,
    /// A newer tunnel with the same user and device id took this one's place.
    Replaced,
}

impl Drain {
    fn reason(self) -> &'static str {
        match self {
            Drain::Shutdown => "relay shutdown",
            Drain::TokenExpired => "token expired",
            Drain::Replaced => "replaced by a newer tunnel with the same device id",
        }
    }

    /// Until when the requests in flight may run: the shutdown grace for a drain, at most
    /// [`REPLACED_GRACE`] (and never past the token's expiry) for a replaced tunnel.
    fn deadline(self, state: &AppState, expiry: tokio::time::Instant) -> tokio::time::Instant {
        let now = tokio::time::Instant::now();
        match self {
            Drain::Shutdown | Drain::TokenExpired => now + state.config.shutdown_grace,
            Drain::Replaced => (now + REPLACED_GRACE).min(expiry),
        }
    }
}

/// Runs one upgraded tunnel until it closes, the relay drains it, or `expiry` passes.
pub(super) async fn run(
    state: Arc<AppState>,
    io: TokioIo<hyper::upgrade::Upgraded>,
    (user, id, name): (String, String, String),
    max_devices: usize,
    expiry: tokio::time::Instant,
    addr: Option<IpAddr>,
) -> anyhow::Result<()> {
    // Boxed: the handshake's state lives on the heap while it runs and is freed after, so an
    // idle tunnel's task keeps only what it waits on.
    let (device, mut link, daemon_version) = Box::pin(open(&state, io, (user, id, name))).await?;
    // Checked again here: another tunnel of the same user may have come up meanwhile.
    match state.register(device.clone(), max_devices).await {
        Err(others) => {
            state.metrics.limited(Limit::Devices);
            let message = format!(
                "device limit reached while connecting ({} connected: {})",
                others.len(),
                others.join(", ")
            );
            link.close_and_wait(CloseCode::Policy, &message).await;
            anyhow::bail!(message);
        }
        Ok(Some(old)) => info!(
            replaced_tunnel = old.tunnel_id,
            "took the place of this device's older tunnel, which closes"
        ),
        Ok(None) => {}
    }
    if let Err(err) = link.send(&Control::Ready).await {
        state.registry.remove(&device);
        return Err(anyhow::Error::new(err).context("telling the daemon it is registered"));
    }
    // The version passed `valid_version`: plain characters only.
    info!(%daemon_version, models = device.models().len(), tunnel = device.tunnel_id, "tunnel up");
    state.audit.record(Event::TunnelConnect {
        user: device.user.clone(),
        device: device.name.clone(),
        device_id: device.id.clone(),
        addr,
    });
    let mut audited = Disconnect {
        audit: state.audit.clone(),
        device: device.clone(),
        since: tokio::time::Instant::now(),
        reason: "closed",
    };
    let ended = serve(&state, &device, link, expiry).await;
    state.registry.remove(&device);
    device.set_gone();
    state.trimmer.freed();
    match ended {
        Served::Closed(result) => result,
        Served::Drained(reason, result) => {
            audited.reason = reason.reason();
            match reason {
                Drain::TokenExpired => info!(
                    grace = ?state.config.token_grace,
                    "agent token expired and the daemon did not replace the tunnel: closed it"
                ),
                Drain::Replaced => info!(
                    tunnel = device.tunnel_id,
                    "a newer tunnel with the same device id replaced this one: closed it"
                ),
                Drain::Shutdown => {}
            }
            result
        }
    }
}

/// How [`serve`] ended.
enum Served {
    /// The daemon closed the tunnel, or it failed.
    Closed(anyhow::Result<()>),
    /// The relay drained it.
    Drained(Drain, anyhow::Result<()>),
}

/// Serves a registered device's tunnel: idle (its WebSocket only) until a request for the
/// device comes; then a session, which serves every request until the device has had
/// none for `session_idle`; then idle again.
async fn serve(
    state: &AppState,
    device: &Arc<Device>,
    mut link: TunnelLink,
    expiry: tokio::time::Instant,
) -> Served {
    let drain = async {
        tokio::select! {
            () = state.shutdown.cancelled() => Drain::Shutdown,
            () = tokio::time::sleep_until(expiry) => Drain::TokenExpired,
            () = device.replaced() => Drain::Replaced,
        }
    };
    tokio::pin!(drain);
    loop {
        tokio::select! {
            () = device.session_wanted() => {}
            incoming = link.next() => {
                let result = match incoming {
                    Ok(Incoming::Closed) => Ok(()),
                    Ok(Incoming::Data(_)) => Err(anyhow::anyhow!("daemon sent HTTP/2 bytes outside a session")),
                    Ok(Incoming::SessionEnd) => Err(anyhow::anyhow!("daemon ended a session that was not open")),
                    Err(err) => Err(anyhow::Error::new(err).context("tunnel")),
                };
                return Served::Closed(result);
            }
            reason = &mut drain => {
                state.registry.remove(device);
                let deadline = reason.deadline(state, expiry);
                let result = Box::pin(end_idle(link, reason, deadline, false)).await;
                return Served::Drained(reason, result);
            }
        }
        // Boxed: an idle tunnel's task does not carry the session's state.
        match Box::pin(session(state, device, link, &mut drain, expiry)).await {
            Ok(Some(idle)) => link = idle,
            Ok(None) => return Served::Closed(Ok(())),
            Err(Stop::Failed(err)) => return Served::Closed(Err(err)),
            Err(Stop::Drained(reason, deadline, link)) => {
                let result = Box::pin(end_idle(*link, reason, deadline, true)).await;
                return Served::Drained(reason, result);
            }
        }
    }
}

/// Why a session ended the tunnel.
enum Stop {
    /// The tunnel failed.
    Failed(anyhow::Error),
    /// The relay drains the tunnel (or it was replaced): the session is over, the link waits
    /// for the daemon's close until the deadline (or is closed at once).
    Drained(Drain, tokio::time::Instant, Box<TunnelLink>),
}

/// Runs one session on `link` for the requests waiting and those that follow, until
/// the device has been idle for `session_idle`. Returns the idle link, or `None` if the
/// WebSocket closed.
async fn session(
    state: &AppState,
    device: &Arc<Device>,
    link: TunnelLink,
    drain: &mut std::pin::Pin<&mut impl std::future::Future<Output = Drain>>,
    expiry: tokio::time::Instant,
) -> Result<Option<TunnelLink>, Stop> {
    let outbox = link.outbox();
    let (sender, cut, connection) = cloudllm_tunnel::mux::client::connect(link);
    let mut connection = tokio::spawn(connection);
    device.open_session(sender);
    let _open = state.metrics.session_open();
    debug!("session open");
    ask_for_lanes(state, device, &outbox);
    let mut drained = None;
    let mut cut_short = false;
    let ended = loop {
        tokio::select! {
            ended = &mut connection => break ended,
            () = device.idle_for(state.config.session_idle), if device.has_session() => {
                debug!("device idle: closing the session");
                device.close_session();
            }
            reason = drain.as_mut() => {
                state.registry.remove(device);
                let deadline = reason.deadline(state, expiry);
                drained = Some((reason, deadline));
                let (ended, was_cut) =
                    drain_session(state, device, &outbox, &mut connection, &cut, reason, deadline).await;
                cut_short = was_cut;
                break ended;
            }
        }
    };
    // However the session ended, its handle goes too.
    device.close_session();
    let Ok(Ended {
        link,
        peer_ended,
        result,
    }) = ended
    else {
        return Err(Stop::Failed(anyhow::anyhow!(
            "the tunnel session's task failed"
        )));
    };
    debug!("session closed");
    state.trimmer.freed();
    if let Some((reason, deadline)) = drained {
        let mut link = link;
        if !cut_short && !link.is_closed() {
            // Ended as after an idle period: the daemon's session ends now instead of waiting
            // for a peer that has gone (until its silence bound passes), and the daemon,
            // idle again, reads the close that follows as the end of the tunnel rather than of
            // a session gone wrong.
            if let Err(err) = link.end_session(peer_ended).await {
                debug!(error = %err, "ending the drained tunnel's session");
            }
        }
        return Err(Stop::Drained(reason, deadline, Box::new(link)));
    }
    if link.is_closed() {
        return Ok(None);
    }
    if let Err(err) = result {
        return Err(Stop::Failed(
            anyhow::Error::new(err).context("tunnel session"),
        ));
    }
    let mut link = link;
    link.end_session(peer_ended)
        .await
        .map_err(|err| Stop::Failed(anyhow::Error::new(err).context("ending a session")))?;
    Ok(Some(link))
}

/// Asks the daemon of a device that has just become busy for a lane on each shard that has
/// none (see [`super::lane`]); nothing for a device without lanes.
fn ask_for_lanes(state: &AppState, device: &Device, outbox: &Outbox) {
    let (Some(key), Some(own)) = (device.lane_key(), crate::shards::current()) else {
        return;
    };
    let shards = device.lanes_missing(state.lanes, own);
    if !shards.is_empty() {
        debug!(?shards, "asking the daemon for lanes");
        outbox.push(Control::Lanes { shards, key });
    }
}

/// Records a tunnel's end in the audit log when dropped, however `run` returns.
struct Disconnect {
    audit: crate::audit::Audit,
    device: Arc<Device>,
    since: tokio::time::Instant,
    reason: &'static str,
}

impl Drop for Disconnect {
    fn drop(&mut self) {
        self.audit.record(Event::TunnelDisconnect {
            user: self.device.user.clone(),
            device: self.device.name.clone(),
            device_id: self.device.id.clone(),
            seconds: self.since.elapsed().as_secs(),
            reason: self.reason.to_owned(),
        });
    }
}

/// The task running a tunnel's session.
type Connection = tokio::task::JoinHandle<Ended<super::TunnelIo>>;

/// Drains a tunnel with a session open: asks the daemon to drain unless the tunnel was
/// replaced (a drained daemon dials again at once; a replaced one must not), lets go of the
/// session (no new requests reach the device: it has already left the registry), and gives
/// in-flight streams until `deadline` to finish before cutting the session. Relay shutdown
/// shortens a replaced tunnel's wait to the shutdown grace. Returns how the session ended and
/// whether it was cut.
async fn drain_session(
    state: &AppState,
    device: &Device,
    outbox: &Outbox,
    connection: &mut Connection,
    cut: &Cut,
    reason: Drain,
    mut deadline: tokio::time::Instant,
) -> (Result<Ended<super::TunnelIo>, tokio::task::JoinError>, bool) {
    if !matches!(reason, Drain::Replaced) {
        // The session holds the link; the link's outbox reaches the daemon all the same.
        outbox.push(Control::Drain);
    }
    device.close_session();
    let mut shutdown_seen = matches!(reason, Drain::Shutdown);
    loop {
        tokio::select! {
            ended = &mut *connection => return (ended, false),
            () = tokio::time::sleep_until(deadline) => break,
            () = state.shutdown.cancelled(), if !shutdown_seen => {
                shutdown_seen = true;
                deadline = deadline.min(tokio::time::Instant::now() + state.config.shutdown_grace);
            }
        }
    }
    warn!("tunnel still busy after the grace period: cut");
    cut.cut();
    (connection.await, true)
}

/// Ends an idle tunnel the relay no longer serves: closes a replaced one at once with
/// [`proto::CLOSE_REPLACED`]; drains any other (see [`drain_idle`]).
async fn end_idle(
    mut link: TunnelLink,
    reason: Drain,
    deadline: tokio::time::Instant,
    asked: bool,
) -> anyhow::Result<()> {
    if let Drain::Replaced = reason {
        link.close_and_wait(
            CloseCode::from(proto::CLOSE_REPLACED),
            proto::REPLACED_REASON,
        )
        .await;
        return Ok(());
    }
    drain_idle(link, deadline, asked).await
}

/// Drains an idle tunnel: asks the daemon to drain (unless it was `asked` during a session)
/// and waits, until `deadline`, for it to close the WebSocket.
async fn drain_idle(
    mut link: TunnelLink,
    deadline: tokio::time::Instant,
    asked: bool,
) -> anyhow::Result<()> {
    if link.is_closed() {
        return Ok(());
    }
    let closed = tokio::time::timeout_at(deadline, async {
        if !asked && link.send(&Control::Drain).await.is_err() {
            return;
        }
        loop {
            match link.next().await {
                Ok(Incoming::Closed) | Err(_) => return,
                Ok(Incoming::Data(_) | Incoming::SessionEnd) => {}
            }
        }
    })
    .await;
    match closed {
        Ok(()) => Ok(()),
        Err(_) => anyhow::bail!("daemon did not close the tunnel within the grace period: cut"),
    }
}
