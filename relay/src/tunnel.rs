//! The relay's end of a tunnel: authenticate the daemon, upgrade to a WebSocket, read the
//! daemon's hello, keep the device registered for as long as the tunnel lives, and run an
//! HTTP/2 client session over it whenever requests need one.
//!
//! The token is checked before the upgrade, so a bad token gets a plain HTTP 401 and never a
//! WebSocket. An idle tunnel holds only its WebSocket: the HTTP/2 session (hyper's client,
//! with its buffers and tables) opens when a request comes and closes after `session_idle`
//! without requests. A tunnel lives no longer than its agent token: once the token's `exp`
//! plus `token_grace` has passed, the device leaves the registry and the tunnel is drained. On
//! relay shutdown each tunnel is drained too: the daemon sends GOAWAY, lets in-flight streams
//! finish and reconnects (to the next relay, or with a fresh token) at once.
//!
//! One device id has one tunnel: a newer tunnel with the same user and device id takes the
//! older one's place in the registry, and the older one's task lets the requests it carries
//! finish (within [`REPLACED_GRACE`]) and closes it with [`proto::CLOSE_REPLACED`], which
//! tells its daemon not to dial again by itself. Every tunnel, whatever its state, holds one
//! of its user's [`TUNNELS_PER_DEVICE`] × `devices` slots from before the upgrade to its end.
//!
//! Everything the daemon sends is hostile until checked: the hello's version must be a plain
//! version string or the tunnel is refused, model names are cut to what [`proto::sane_models`]
//! allows, and whatever else from the network reaches a log line goes through [`escaped`].

use std::borrow::Cow;
use std::net::IpAddr;
use std::sync::{Arc, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use cloudllm_proto::{self as proto, Control, Hello};
use cloudllm_tunnel::{Incoming, Link, Outbox, ReadAhead, Returned, WsIo};
use http::{HeaderMap, HeaderValue, StatusCode, header};
use hyper_util::rt::TokioIo;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role};
use tracing::{Instrument, debug, info, info_span, warn};

use crate::admission::Caller;
use crate::audit::Event;
use crate::auth::{AuthError, Scope};
use crate::limits::{Limit, Refusal};
use crate::registry::Device;
use crate::{AppState, Denied};

/// Time for the WebSocket upgrade and for the hello: 10 s is generous on any
/// network and stops half-open tunnels from holding memory.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Open tunnels a user may hold per device the tier allows: each device's live tunnel plus one
/// replacing it (a daemon that renews its token opens the new tunnel before it lets the old one
/// go, and a daemon that lost its network redials before the relay notices the old tunnel is
/// dead). Handshaking tunnels and replaced ones still closing count too.
pub const TUNNELS_PER_DEVICE: usize = 2;

/// Longest a replaced tunnel keeps carrying the requests it has in flight before the relay
/// closes it: 5 min, like the daemon's own limit for a tunnel it retires (a long generation on
/// a slow machine). New requests never reach it, it still counts against its user's tunnels,
/// and relay shutdown or token expiry cut it sooner.
pub const REPLACED_GRACE: Duration = Duration::from_secs(300);

/// Longest piece of network-supplied text (an error chain with a peer's words in it) the relay
/// writes into one log line, in bytes: enough for any honest error, and a hostile peer cannot
/// grow the log by more per connection.
const MAX_LOGGED_BYTES: usize = 512;

/// The close reason for a hello whose version is not a plain version string.
const BAD_VERSION_REASON: &str =
    "invalid hello: daemon_version must be 1 to 64 characters of A-Z a-z 0-9 . + - _";

/// Longest wait armed for a token's expiry: no tunnel lives ten years, and the cap keeps the
/// deadline arithmetic far from overflow whatever `exp` a token carries.
const MAX_TOKEN_WAIT: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// `GET /tunnel`: a daemon opens its tunnel.
pub async fn accept(State(state): State<Arc<AppState>>, mut req: Request) -> Response {
    let addr = state.client_addr(&req);
    let deny = |denied: Denied| match denied {
        Denied::Limited(refusal) => limited(&state, None, addr, &refusal),
        Denied::Auth(err) => {
            warn!(reason = %escaped(&err.to_string()), "tunnel refused");
            plain(err.status(), &err.to_string())
        }
    };
    let Caller {
        identity,
        tier_name,
        tier,
    } = match state
        .admit(req.headers(), addr, Scope::Agent, "tunnel")
        .await
    {
        Ok(caller) => caller,
        Err(denied) => return deny(denied),
    };
    let max_devices = tier.devices as usize;
    // A token still inside the verification leeway but past its tunnel grace would open a
    // tunnel only to have it closed at once.
    let Some(lifetime) = token_lifetime(identity.expires_at, state.config.token_grace) else {
        return deny(state.auth_failed(addr, "tunnel", AuthError::Expired));
    };
    let expiry = tokio::time::Instant::now() + lifetime;
    let (device_id, device_name) = match device_headers(req.headers()) {
        Ok(device) => device,
        Err(message) => return plain(StatusCode::BAD_REQUEST, &message),
    };
    let others = state.registry.others(&identity.user, &device_id);
    if others.len() >= max_devices {
        let refusal = device_limit(tier_name, max_devices, &others);
        return limited(&state, Some(&identity.user), addr, &refusal);
    }
    let accept_key = match websocket_key(req.headers()) {
        Ok(key) => key,
        Err(message) => return plain(StatusCode::BAD_REQUEST, message),
    };
    let Some(on_upgrade) = req.extensions_mut().remove::<hyper::upgrade::OnUpgrade>() else {
        return plain(StatusCode::BAD_REQUEST, "connection cannot be upgraded");
    };
    // Counted from here to the task's end, whatever becomes of the tunnel.
    let max_tunnels = max_devices.saturating_mul(TUNNELS_PER_DEVICE);
    let slot = match state.registry.open_tunnel(&identity.user, max_tunnels) {
        Ok(slot) => (slot, state.metrics.tunnel_open()),
        Err(open) => {
            let refusal = tunnel_limit(tier_name, max_devices, open);
            return limited(&state, Some(&identity.user), addr, &refusal);
        }
    };

    let span = info_span!(
        "tunnel",
        user = %escaped(&identity.user),
        device = %escaped(&device_name)
    );
    let task_state = state.clone();
    state.tasks.spawn(
        async move {
            let _slot = slot;
            let upgraded = match tokio::time::timeout(HANDSHAKE_TIMEOUT, on_upgrade).await {
                Ok(Ok(upgraded)) => upgraded,
                Ok(Err(err)) => return warn!(error = %err, "upgrade failed"),
                Err(_) => return warn!("upgrade timed out"),
            };
            let device = (identity.user, device_id, device_name);
            let io = TokioIo::new(upgraded);
            match run(task_state, io, device, max_devices, expiry, addr).await {
                Ok(()) => info!("tunnel closed"),
                Err(err) => info!(error = %escaped(&format!("{err:#}")), "tunnel closed"),
            }
        }
        .instrument(span),
    );

    let mut response = Response::new(Body::empty());
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let headers = response.headers_mut();
    headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    headers.insert(header::SEC_WEBSOCKET_ACCEPT, accept_key);
    response
}

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

/// A tunnel's connection as its WebSocket reads it: small reads, large ones in a burst.
type TunnelIo = ReadAhead<TokioIo<hyper::upgrade::Upgraded>>;

/// The relay's end of a tunnel's WebSocket.
type TunnelLink = Link<TunnelIo>;

/// Runs one upgraded tunnel until it closes, the relay drains it, or `expiry` passes.
async fn run(
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
    match state.registry.insert(device.clone(), max_devices) {
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
/// device comes; then an HTTP/2 session, which serves every request until the device has had
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

/// Runs one HTTP/2 session on `link` for the requests waiting and those that follow, until
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
    let (io, back) = WsIo::lend(link, Bytes::new());
    let (sender, connection) = cloudllm_tunnel::h2_client(state.config.liveness())
        .handshake::<_, Body>(TokioIo::new(io))
        .await
        .map_err(|err| Stop::Failed(anyhow::Error::new(err).context("HTTP/2 handshake")))?;
    let mut connection = tokio::spawn(connection);
    device.open_session(sender);
    let _open = state.metrics.session_open();
    debug!("session open");
    let mut drained = None;
    let mut cut = false;
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
                match drain_session(state, device, &outbox, &mut connection, reason, deadline).await {
                    Some(ended) => break ended,
                    None => {
                        cut = true;
                        break Ok(Ok(()));
                    }
                }
            }
        }
    };
    // However the session ended, its handle goes too (it holds hyper's request queue).
    device.close_session();
    let Ok(Returned { link, peer_ended }) = back.await else {
        return Err(Stop::Failed(anyhow::anyhow!(
            "HTTP/2 session lost the tunnel's link"
        )));
    };
    debug!("session closed");
    state.trimmer.freed();
    if let Some((reason, deadline)) = drained {
        let mut link = link;
        if !cut && !link.is_closed() {
            // Ended as after an idle period: the daemon's session ends now instead of waiting
            // for a peer that has gone (until its HTTP/2 keepalive gives up), and the daemon,
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
    match ended {
        Ok(Ok(())) => {}
        Ok(Err(err)) => {
            return Err(Stop::Failed(
                anyhow::Error::new(err).context("tunnel session"),
            ));
        }
        Err(err) => return Err(Stop::Failed(anyhow::anyhow!("tunnel session task: {err}"))),
    }
    let mut link = link;
    link.end_session(peer_ended)
        .await
        .map_err(|err| Stop::Failed(anyhow::Error::new(err).context("ending a session")))?;
    Ok(Some(link))
}

/// Opens the tunnel on an upgraded connection: the WebSocket and the daemon's hello. Returns
/// the device, not yet registered, and the link, whose control handler keeps the device's
/// model list current.
async fn open(
    state: &AppState,
    io: TokioIo<hyper::upgrade::Upgraded>,
    (user, id, name): (String, String, String),
) -> anyhow::Result<(Arc<Device>, TunnelLink, String)> {
    let mut ws = WebSocketStream::from_raw_socket(
        ReadAhead::new(io),
        Role::Server,
        Some(cloudllm_tunnel::ws_config(
            cloudllm_tunnel::RELAY_WS_READ_BUFFER,
        )),
    )
    .await;
    let hello = tokio::time::timeout(HANDSHAKE_TIMEOUT, read_hello(&mut ws))
        .await
        .context("hello timed out")??;
    if hello.protocol_version != proto::PROTOCOL_VERSION {
        refuse_hello(&mut ws, "unsupported protocol version: upgrade cloudllmd").await;
        anyhow::bail!(
            "daemon speaks protocol {}, relay speaks {}",
            hello.protocol_version,
            proto::PROTOCOL_VERSION
        );
    }
    if !proto::valid_version(&hello.daemon_version) {
        refuse_hello(&mut ws, BAD_VERSION_REASON).await;
        anyhow::bail!(
            "invalid hello: a daemon_version of {} bytes that is not a plain version",
            hello.daemon_version.len()
        );
    }
    let device = Arc::new(Device::new(user, id, name));
    let offered = hello.models.len();
    let models = proto::sane_models(hello.models);
    if models.len() < offered {
        debug!(
            offered,
            kept = models.len(),
            "left out model names that are empty, too long or not printable ASCII"
        );
    }
    device.set_models(models);
    let handler = control_handler(Arc::downgrade(&device));
    let link = Link::new(ws, state.config.liveness(), handler);
    Ok((device, link, hello.daemon_version))
}

/// Reads the daemon's first message, which must be its hello.
async fn read_hello(ws: &mut WebSocketStream<TunnelIo>) -> anyhow::Result<Hello> {
    use futures_util::StreamExt;
    loop {
        let message = ws
            .next()
            .await
            .context("tunnel closed before the hello")?
            .context("reading the hello")?;
        match message {
            Message::Ping(_) | Message::Pong(_) => {}
            Message::Text(text) => match serde_json::from_str(text.as_str()) {
                Ok(Control::Hello(hello)) => return Ok(hello),
                Ok(other) => {
                    refuse_hello(ws, "invalid hello: the first message must be a hello").await;
                    anyhow::bail!("daemon sent a {} message before its hello", kind(&other))
                }
                Err(err) => {
                    refuse_hello(ws, "invalid hello: unreadable JSON").await;
                    // serde quotes what it could not read: the peer's words, cut and escaped.
                    anyhow::bail!("unreadable hello: {}", escaped(&err.to_string()))
                }
            },
            Message::Binary(_) => {
                refuse_hello(ws, "invalid hello: the first message must be a hello").await;
                anyhow::bail!("daemon sent binary data before its hello")
            }
            Message::Close(_) | Message::Frame(_) => {
                anyhow::bail!("tunnel closed before the hello")
            }
        }
    }
}

/// What the relay does with the daemon's control messages after the hello: model lists
/// update the device; anything else a daemon does not send is ignored.
fn control_handler(device: Weak<Device>) -> cloudllm_tunnel::ControlHandler {
    Box::new(move |control| match control {
        Control::Models { models } => {
            if let Some(device) = device.upgrade() {
                let models = proto::sane_models(models);
                debug!(models = models.len(), "device models changed");
                device.set_models(models);
            }
        }
        other => debug!(
            control = kind(&other),
            "ignoring a control message daemons do not send"
        ),
    })
}

/// Closes a tunnel whose hello is refused with 1002 (protocol error) and `reason`, and reads
/// (for a bounded time) until the daemon answers the close: a socket dropped with unread bytes
/// is reset, and the reset may overtake the reason.
async fn refuse_hello(ws: &mut WebSocketStream<TunnelIo>, reason: &str) {
    use futures_util::StreamExt;
    let frame = CloseFrame {
        code: CloseCode::Protocol,
        reason: reason.to_owned().into(),
    };
    let _ = tokio::time::timeout(HANDSHAKE_TIMEOUT, async {
        ws.close(Some(frame)).await?;
        while let Some(message) = ws.next().await {
            if let Message::Close(_) = message? {
                break;
            }
        }
        Ok::<_, tokio_tungstenite::tungstenite::Error>(())
    })
    .await;
}

/// A control message's type, which is all the relay logs of a message it does not expect (the
/// rest may be a quarter of a megabyte of the peer's text).
fn kind(control: &Control) -> &'static str {
    match control {
        Control::Hello(_) => "hello",
        Control::Ready => "ready",
        Control::Models { .. } => "models",
        Control::Drain => "drain",
        Control::SessionEnd => "session_end",
    }
}

/// `text` as it may go into a log line: [`proto::printable`] (no newlines, ESC or other
/// characters that could forge a line or steer a terminal), cut to [`MAX_LOGGED_BYTES`] with
/// the length left out noted. Short plain text is returned as it is.
pub fn escaped(text: &str) -> Cow<'_, str> {
    let shown = proto::printable(text);
    if shown.len() <= MAX_LOGGED_BYTES {
        return shown;
    }
    let mut end = MAX_LOGGED_BYTES;
    while !shown.is_char_boundary(end) {
        end -= 1;
    }
    Cow::Owned(format!(
        "{}… ({} more bytes)",
        &shown[..end],
        shown.len() - end
    ))
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

/// The task running a tunnel's HTTP/2 session.
type Connection = tokio::task::JoinHandle<hyper::Result<()>>;

/// Drains a tunnel with a session open: asks the daemon to drain unless the tunnel was
/// replaced (a drained daemon dials again at once; a replaced one must not), lets go of the
/// session (no new requests reach the device: it has already left the registry), and gives
/// in-flight streams until `deadline` to finish before cutting the session. Relay shutdown
/// shortens a replaced tunnel's wait to the shutdown grace. `None` if the session was cut.
async fn drain_session(
    state: &AppState,
    device: &Device,
    outbox: &Outbox,
    connection: &mut Connection,
    reason: Drain,
    mut deadline: tokio::time::Instant,
) -> Option<Result<hyper::Result<()>, tokio::task::JoinError>> {
    if !matches!(reason, Drain::Replaced) {
        // The session's stream holds the link; the link's outbox reaches the daemon all the
        // same.
        outbox.push(Control::Drain);
    }
    device.close_session();
    let mut shutdown_seen = matches!(reason, Drain::Shutdown);
    loop {
        tokio::select! {
            ended = &mut *connection => return Some(ended),
            () = tokio::time::sleep_until(deadline) => break,
            () = state.shutdown.cancelled(), if !shutdown_seen => {
                shutdown_seen = true;
                deadline = deadline.min(tokio::time::Instant::now() + state.config.shutdown_grace);
            }
        }
    }
    warn!("tunnel still busy after the grace period: cut");
    connection.abort();
    // The aborted task drops the session, which sends the link back.
    let _ = connection.await;
    None
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

/// How long a tunnel opened now with a token expiring at `expires_at` (seconds since the Unix
/// epoch) may live: until the expiry plus `grace`. `None` if that moment has passed.
fn token_lifetime(expires_at: u64, grace: Duration) -> Option<Duration> {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).ok()?;
    let end = Duration::from_secs(expires_at).saturating_add(grace);
    let left = end.checked_sub(now).filter(|left| !left.is_zero())?;
    Some(left.min(MAX_TOKEN_WAIT))
}

/// The refusal of a device over its user's device limit.
fn device_limit(tier: &str, max: usize, others: &[String]) -> Refusal {
    Refusal {
        limit: Limit::Devices,
        // A minute: devices come and go on human time scales.
        retry_after: Duration::from_secs(60),
        message: format!(
            "device limit reached: the {tier} tier allows {max} connected device{} and {} {} connected ({}). \
             Disconnect one (`cloudllm disconnect` on it) or upgrade your plan",
            if max == 1 { "" } else { "s" },
            others.len(),
            if others.len() == 1 { "is" } else { "are" },
            others.join(", ")
        ),
    }
}

/// The refusal of a tunnel over its user's bound of open tunnels.
fn tunnel_limit(tier: &str, max_devices: usize, open: usize) -> Refusal {
    Refusal {
        limit: Limit::Devices,
        // An idle replaced tunnel closes within a second; a busy one within REPLACED_GRACE.
        retry_after: Duration::from_secs(10),
        message: format!(
            "too many tunnels: the {tier} tier allows {max_devices} connected device{} and {open} \
             tunnels of your account are open or opening (a replaced tunnel counts until its \
             requests have finished). Stop the daemons you do not use, or retry later",
            if max_devices == 1 { "" } else { "s" },
        ),
    }
}

/// Answers a tunnel request refused by a limit: 429 with `Retry-After`, counted and audited.
fn limited(
    state: &AppState,
    user: Option<&str>,
    addr: Option<IpAddr>,
    refusal: &Refusal,
) -> Response {
    warn!(limit = refusal.limit.as_str(), "tunnel refused by a limit");
    state.too_many(refusal, user, addr, "tunnel", plain)
}

/// The device id and name from the upgrade request's headers.
fn device_headers(headers: &HeaderMap) -> Result<(String, String), String> {
    let field = |name: &str| -> Result<String, String> {
        let value = headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .filter(|v| proto::valid_device_field(v))
            .ok_or_else(|| format!("missing or invalid {name} header"))?;
        Ok(value.to_owned())
    };
    let version = headers
        .get(proto::HEADER_PROTOCOL)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u32>().ok());
    if version != Some(proto::PROTOCOL_VERSION) {
        return Err(format!(
            "unsupported tunnel protocol {version:?}: this relay speaks {}; upgrade cloudllmd",
            proto::PROTOCOL_VERSION
        ));
    }
    Ok((
        field(proto::HEADER_DEVICE_ID)?,
        field(proto::HEADER_DEVICE_NAME)?,
    ))
}

/// Checks the WebSocket upgrade headers (RFC 6455 §4.2.1) and returns the accept key.
fn websocket_key(headers: &HeaderMap) -> Result<HeaderValue, &'static str> {
    let has_token = |name: header::HeaderName, token: &str| {
        headers
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    };
    if !has_token(header::CONNECTION, "upgrade") || !has_token(header::UPGRADE, "websocket") {
        return Err("this endpoint takes a WebSocket upgrade");
    }
    if headers
        .get(header::SEC_WEBSOCKET_VERSION)
        .map(|v| v.as_bytes())
        != Some(b"13")
    {
        return Err("unsupported WebSocket version (need 13)");
    }
    let key = headers
        .get(header::SEC_WEBSOCKET_KEY)
        .ok_or("missing Sec-WebSocket-Key")?;
    HeaderValue::from_str(&derive_accept_key(key.as_bytes())).map_err(|_| "bad Sec-WebSocket-Key")
}

fn plain(status: StatusCode, message: &str) -> Response {
    let mut response = (status, format!("{message}\n")).into_response();
    if status == StatusCode::UNAUTHORIZED {
        response
            .headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn now() -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs()
    }

    #[test]
    fn logged_text_cannot_break_lines_steer_terminals_or_grow_without_end() {
        assert!(matches!(escaped("alice"), Cow::Borrowed("alice")));
        assert!(matches!(escaped(r#"a "quoted" \ path"#), Cow::Borrowed(_)));
        let forged = "1.0\n2026-01-01T00:00:00Z  INFO forged: admin logged in\u{1b}[2J\u{202e}";
        let shown = escaped(forged);
        assert!(!shown.contains(['\n', '\u{1b}', '\u{202e}']), "{shown}");
        assert!(
            shown.contains(r"\n") && shown.contains(r"\u{1b}"),
            "{shown}"
        );
        let huge = "\n".repeat(250_000);
        let shown = escaped(&huge);
        assert!(
            shown.len() <= MAX_LOGGED_BYTES + 32,
            "{} bytes",
            shown.len()
        );
        assert!(shown.ends_with("more bytes)"), "{shown}");
        assert!(!shown.contains('\n'));
        // Cut on a character boundary, whatever the text.
        let wide = "é".repeat(1000);
        assert!(escaped(&wide).starts_with("éé"));
    }

    #[test]
    fn a_tunnel_lives_until_its_token_expiry_plus_grace() {
        let grace = Duration::from_secs(60);
        let left = token_lifetime(now() + 100, grace).unwrap();
        assert!(left > Duration::from_secs(158) && left <= Duration::from_secs(160));
        // Expired, but within the grace: a short life.
        let left = token_lifetime(now() - 30, grace).unwrap();
        assert!(left <= Duration::from_secs(30));
        // Past the grace: no tunnel at all.
        assert_eq!(token_lifetime(now() - 61, grace), None);
        assert_eq!(token_lifetime(now(), Duration::ZERO), None);
        // Absurd expiries neither overflow nor refuse.
        assert_eq!(token_lifetime(u64::MAX, grace), Some(MAX_TOKEN_WAIT));
    }
}
