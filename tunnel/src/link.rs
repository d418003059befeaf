//! [`Link`]: the tunnel's WebSocket, kept alive, carrying control messages and sessions.
//!
//! A link outlives the sessions it carries. While no session runs, its owner (the
//! tunnel task at either end) reads it with [`Link::next`]; while one runs, it is lent to the
//! session's connection ([`mux`](crate::mux)). Either way the link itself:
//! - sends a WebSocket ping every interval and fails when nothing at all has arrived from the
//!   peer for too long, so a peer that vanished without a FIN is noticed within
//!   [`Liveness::detection_bound`];
//! - hands each [`Control`] message the peer sends to the owner's handler, except
//!   [`Control::SessionEnd`], which it reports as [`Incoming::SessionEnd`];
//! - sends the control messages queued in its [`Outbox`], also in the middle of a session;
//! - keeps the peer's close frame: the daemon redials at once when a proxy in front of the
//!   relay closes with 1012 (service restart) and reports any other code to the user.

use std::collections::VecDeque;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use cloudllm_proto::Control;
use futures_util::task::AtomicWaker;
use futures_util::{Sink, SinkExt, Stream};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::{Instant, Sleep};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

use crate::{Liveness, lock};

/// What [`Link::next`] found on the tunnel.
#[derive(Debug)]
pub enum Incoming {
    /// Bytes of a session (a binary message).
    Data(Bytes),
    /// The peer's [`Control::SessionEnd`]: its session is over.
    SessionEnd,
    /// The WebSocket has closed (see [`Link::peer_close`]).
    Closed,
}

/// What a link does with the control messages its peer sends.
pub type ControlHandler = Box<dyn FnMut(Control) + Send>;

/// The tunnel's WebSocket with its liveness, control messages and outbox. See the module docs.
pub struct Link<S> {
    ws: WebSocketStream<S>,
    liveness: Liveness,
    /// When anything (data, control, ping, pong) last arrived from the peer.
    last_received: Instant,
    /// Fires when the next ping is due.
    ping_timer: Pin<Box<Sleep>>,
    /// Fires when the peer may be declared dead unless something arrived meanwhile.
    silence_timer: Pin<Box<Sleep>>,
    /// Something was queued on the socket and not flushed since.
    unflushed: bool,
    /// When our last ping went out, until its pong arrives.
    ping_sent: Option<Instant>,
    /// Where the measured round trip goes, in microseconds.
    rtt_micros: Option<Arc<AtomicU64>>,
    /// The WebSocket has closed.
    closed: bool,
    /// The close frame the peer sent, if it sent one.
    peer_close: Option<CloseFrame>,
    outbox: Outbox,
    on_control: ControlHandler,
}

impl<S> Link<S> {
    /// Wraps an established WebSocket. `liveness` sets the ping interval and how long the
    /// peer may stay silent; `on_control` gets every control message but
    /// [`Control::SessionEnd`]. The first ping goes out at once, so the round trip is known
    /// right after connecting.
    pub fn new(ws: WebSocketStream<S>, liveness: Liveness, on_control: ControlHandler) -> Self {
        let now = Instant::now();
        Link {
            ws,
            liveness,
            last_received: now,
            ping_timer: Box::pin(tokio::time::sleep_until(now)),
            silence_timer: Box::pin(tokio::time::sleep_until(now + liveness.detection_bound())),
            unflushed: false,
            ping_sent: None,
            rtt_micros: None,
            closed: false,
            peer_close: None,
            outbox: Outbox::default(),
            on_control,
        }
    }

    /// Stores each measured ping round trip (microseconds) into `cell`.
    pub fn with_rtt(mut self, cell: Arc<AtomicU64>) -> Self {
        self.rtt_micros = Some(cell);
        self
    }

    /// A handle that queues control messages for the peer, usable from any task while the
    /// link is idle or lent to a session.
    pub fn outbox(&self) -> Outbox {
        self.outbox.clone()
    }

    /// The close frame the peer sent, once the WebSocket has closed with one.
    pub fn peer_close(&self) -> Option<&CloseFrame> {
        self.peer_close.as_ref()
    }

    /// Whether the WebSocket has closed.
    pub fn is_closed(&self) -> bool {
        self.closed
    }

    /// The liveness settings the link runs with.
    pub fn liveness(&self) -> Liveness {
        self.liveness
    }
}

pub(crate) fn to_io(err: WsError) -> io::Error {
    match err {
        WsError::Io(err) => err,
        WsError::ConnectionClosed | WsError::AlreadyClosed => {
            io::Error::new(io::ErrorKind::BrokenPipe, "websocket closed")
        }
        other => io::Error::other(other),
    }
}

impl<S> Link<S>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    /// The next session bytes, session end or close from the peer; control messages go to the
    /// handler on the way, pings and pongs are answered and measured. Cancel-safe.
    pub async fn next(&mut self) -> io::Result<Incoming> {
        std::future::poll_fn(|cx| self.poll_incoming(cx)).await
    }

    /// Sends one control message now. A peer that does not take it within the liveness bound
    /// (its socket full: it stopped reading) is presumed dead.
    pub async fn send(&mut self, control: &Control) -> io::Result<()> {
        let bound = self.liveness.detection_bound();
        let message = Message::Text(control.to_text().into());
        match tokio::time::timeout(bound, self.ws.send(message)).await {
            Ok(sent) => sent.map_err(to_io),
            Err(_) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("tunnel peer took no message for {bound:?}: connection presumed dead"),
            )),
        }
    }

    /// Closes the WebSocket with `code` and `reason` (cut to the 123 bytes a close frame
    /// holds), waiting at most the liveness bound for the frame to go out.
    pub async fn close(&mut self, code: CloseCode, reason: &str) {
        let mut end = reason.len().min(123);
        while !reason.is_char_boundary(end) {
            end -= 1;
        }
        let frame = CloseFrame {
            code,
            reason: reason[..end].to_owned().into(),
        };
        let bound = self.liveness.detection_bound();
        let _ = tokio::time::timeout(bound, self.ws.close(Some(frame))).await;
        self.closed = true;
    }

    /// Closes the WebSocket like [`Link::close`], then reads until the peer answers the close
    /// (or the liveness bound passes), dropping what it sent meanwhile. Dropping the socket
    /// with the peer's bytes unread makes the kernel reset the connection, and a reset can
    /// reach the peer before the close frame does: a close whose code and reason matter (the
    /// peer acts on them) is sent this way.
    pub async fn close_and_wait(&mut self, code: CloseCode, reason: &str) {
        use futures_util::StreamExt;
        self.close(code, reason).await;
        let bound = self.liveness.detection_bound();
        let _ = tokio::time::timeout(bound, async {
            while let Some(Ok(message)) = self.ws.next().await {
                if let Message::Close(_) = message {
                    break;
                }
            }
        })
        .await;
    }

    /// Ends this end's part of a session whose connection is gone: tells the peer,
    /// then (unless `peer_ended`) waits for the peer to say the same, dropping the ended
    /// session's last bytes. Afterwards the link is idle. A peer that does not answer within
    /// the liveness bound is an error.
    pub async fn end_session(&mut self, peer_ended: bool) -> io::Result<()> {
        self.send(&Control::SessionEnd).await?;
        if peer_ended {
            return Ok(());
        }
        let bound = self.liveness.detection_bound();
        let wait = async {
            loop {
                match self.next().await? {
                    Incoming::Data(_) => {}
                    Incoming::SessionEnd => return Ok(()),
                    Incoming::Closed => {
                        return Err(io::Error::new(
                            io::ErrorKind::BrokenPipe,
                            "tunnel closed while ending a session",
                        ));
                    }
                }
            }
        };
        tokio::time::timeout(bound, wait).await.unwrap_or_else(|_| {
            Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("tunnel peer did not end its session within {bound:?}"),
            ))
        })
    }

    /// See [`Link::next`].
    pub(crate) fn poll_incoming(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<Incoming>> {
        if self.closed {
            return Poll::Ready(Ok(Incoming::Closed));
        }
        self.poll_outgoing(cx)?;
        loop {
            match ready!(Pin::new(&mut self.ws).poll_next(cx)) {
                Some(Ok(message)) => {
                    self.last_received = Instant::now();
                    match message {
                        Message::Binary(data) => return Poll::Ready(Ok(Incoming::Data(data))),
                        Message::Text(text) => match serde_json::from_str(text.as_str()) {
                            Ok(Control::SessionEnd) => {
                                return Poll::Ready(Ok(Incoming::SessionEnd));
                            }
                            Ok(control) => (self.on_control)(control),
                            Err(err) => {
                                return Poll::Ready(Err(io::Error::new(
                                    io::ErrorKind::InvalidData,
                                    format!(
                                        "unreadable control message from the tunnel peer: {err}"
                                    ),
                                )));
                            }
                        },
                        // tungstenite answers the close for us.
                        Message::Close(frame) => {
                            self.closed = true;
                            self.peer_close = frame;
                            return Poll::Ready(Ok(Incoming::Closed));
                        }
                        Message::Pong(_) => {
                            if let (Some(sent), Some(cell)) =
                                (self.ping_sent.take(), &self.rtt_micros)
                            {
                                let micros =
                                    sent.elapsed().as_micros().clamp(1, u128::from(u64::MAX));
                                cell.store(micros as u64, Ordering::Relaxed);
                            }
                        }
                        // Pings are answered by tungstenite.
                        Message::Ping(_) | Message::Frame(_) => {}
                    }
                    // Answers to pings and handler output go out without waiting.
                    self.poll_outgoing(cx)?;
                }
                Some(Err(WsError::ConnectionClosed | WsError::AlreadyClosed)) | None => {
                    self.closed = true;
                    return Poll::Ready(Ok(Incoming::Closed));
                }
                Some(Err(err)) => return Poll::Ready(Err(to_io(err))),
            }
        }
    }

    /// Sends what is due without waiting for room: a ping when its time has come, queued
    /// control messages, a flush; fails when the peer has been silent past the bound. Leaves
    /// wakers on everything it waits for.
    fn poll_outgoing(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        if self.silence_timer.as_mut().poll(cx).is_ready() {
            let deadline = self.last_received + self.liveness.detection_bound();
            if deadline <= Instant::now() {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "tunnel peer silent for {:?}: connection presumed dead",
                        self.liveness.detection_bound()
                    ),
                ));
            }
            self.silence_timer.as_mut().reset(deadline);
            // Register the waker on the new deadline.
            let _ = self.silence_timer.as_mut().poll(cx);
        }
        if self.ping_timer.as_mut().poll(cx).is_ready()
            && self.poll_start_send(cx, || Message::Ping(Bytes::new()))?
        {
            self.ping_sent = Some(Instant::now());
            let next = Instant::now() + self.liveness.ping_interval;
            self.ping_timer.as_mut().reset(next);
            let _ = self.ping_timer.as_mut().poll(cx);
        }
        self.outbox.shared.waker.register(cx.waker());
        // Checked on every read: the lock is taken only when something was queued.
        while self.outbox.shared.queued.load(Ordering::Acquire) {
            let queue = lock(&self.outbox.shared.queue);
            let Some(control) = queue.front().map(Control::to_text) else {
                self.outbox.shared.queued.store(false, Ordering::Release);
                break;
            };
            drop(queue);
            if !self.poll_start_send(cx, || Message::Text(control.into()))? {
                break;
            }
            let mut queue = lock(&self.outbox.shared.queue);
            queue.pop_front();
            if queue.is_empty() {
                self.outbox.shared.queued.store(false, Ordering::Release);
            }
        }
        if self.unflushed
            && let Poll::Ready(flushed) = Pin::new(&mut self.ws).poll_flush(cx)
        {
            flushed.map_err(to_io)?;
            self.unflushed = false;
        }
        Ok(())
    }

    /// Queues one message if the socket has room; `Ok(false)` if not (the waker is set).
    fn poll_start_send(
        &mut self,
        cx: &mut Context<'_>,
        message: impl FnOnce() -> Message,
    ) -> io::Result<bool> {
        match Pin::new(&mut self.ws).poll_ready(cx) {
            Poll::Ready(ready) => {
                ready.map_err(to_io)?;
                Pin::new(&mut self.ws)
                    .start_send(message())
                    .map_err(to_io)?;
                self.unflushed = true;
                Ok(true)
            }
            Poll::Pending => Ok(false),
        }
    }

    /// Queues `message` as one binary message, once the socket has room.
    pub(crate) fn poll_send_binary(
        &mut self,
        cx: &mut Context<'_>,
        message: &Bytes,
    ) -> Poll<io::Result<()>> {
        ready!(Pin::new(&mut self.ws).poll_ready(cx)).map_err(to_io)?;
        let message = Message::Binary(message.clone());
        Pin::new(&mut self.ws).start_send(message).map_err(to_io)?;
        self.unflushed = true;
        Poll::Ready(Ok(()))
    }

    /// Flushes everything queued on the socket.
    pub(crate) fn poll_flush(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(Pin::new(&mut self.ws).poll_flush(cx)).map_err(to_io)?;
        self.unflushed = false;
        Poll::Ready(Ok(()))
    }
}

/// Control messages waiting to go to the peer (see [`Link::outbox`]).
#[derive(Clone, Default)]
pub struct Outbox {
    shared: Arc<OutboxShared>,
}

#[derive(Default)]
struct OutboxShared {
    queue: Mutex<VecDeque<Control>>,
    /// Whether `queue` may hold something; changed only under its lock.
    queued: std::sync::atomic::AtomicBool,
    /// The task polling the link.
    waker: AtomicWaker,
}

impl Outbox {
    /// Queues `control`; the link sends it as soon as its owner or session polls it.
    pub fn push(&self, control: Control) {
        let mut queue = lock(&self.shared.queue);
        queue.push_back(control);
        self.shared.queued.store(true, Ordering::Release);
        drop(queue);
        self.shared.waker.wake();
    }
}

#[cfg(test)]
mod tests;
