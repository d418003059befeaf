//! What both ends' connection task does: read the link's messages and apply their frames,
//! send what the streams queued, and notice the session's end.

use std::collections::VecDeque;
use std::io;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite};

use super::frame::{Frame, Frames, ProtocolError};
use super::{Core, Shared, Wakes, on_stream_frame};
use crate::link::{Incoming, Link};

/// How a session ended: its link back (idle, unless the WebSocket closed), and how.
pub struct Ended<S> {
    pub link: Link<S>,
    /// The peer ended its part of the session (for [`Link::end_session`]).
    pub peer_ended: bool,
    /// Whether the session failed: the link failed or the peer broke the protocol.
    pub result: io::Result<()>,
}

/// A session's connection: the link and the messages on their way out.
pub(super) struct Conn<S> {
    pub(super) link: Link<S>,
    pub(super) shared: Arc<Shared>,
    sending: VecDeque<Bytes>,
    pub(super) peer_ended: bool,
}

/// What reading found when it stopped.
pub(super) enum Read {
    /// Nothing more for now.
    Pending,
    /// The peer ended its session, or the WebSocket closed: read no more.
    Over,
}

impl<S> Conn<S>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    pub(super) fn new(link: Link<S>, shared: Arc<Shared>) -> Self {
        Conn {
            link,
            shared,
            sending: VecDeque::new(),
            peer_ended: false,
        }
    }

    /// Reads every message available and applies its frames; heads go to `on_head`.
    pub(super) fn poll_read(
        &mut self,
        cx: &mut Context<'_>,
        on_head: &mut impl FnMut(&mut Core, Frame, &mut Wakes) -> Result<(), ProtocolError>,
    ) -> io::Result<Read> {
        if self.peer_ended || self.link.is_closed() {
            return Ok(Read::Over);
        }
        loop {
            let message = match self.link.poll_incoming(cx)? {
                Poll::Pending => return Ok(Read::Pending),
                Poll::Ready(Incoming::Data(message)) => message,
                Poll::Ready(Incoming::SessionEnd) => {
                    self.peer_ended = true;
                    return Ok(Read::Over);
                }
                Poll::Ready(Incoming::Closed) => return Ok(Read::Over),
            };
            let mut wakes = Wakes::default();
            let mut core = self.shared.lock();
            let applied = Frames::new(message).try_for_each(|frame| match frame? {
                head @ (Frame::Request { .. } | Frame::Response { .. }) => {
                    on_head(&mut core, head, &mut wakes)
                }
                other => on_stream_frame(&mut core, other, &mut wakes),
            });
            drop(core);
            wakes.wake();
            applied.map_err(|err| io::Error::new(io::ErrorKind::InvalidData, err))?;
        }
    }

    /// Sends what the streams queued; `Ready` once all of it is on the socket.
    pub(super) fn poll_write(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.shared.lock().take_output(&mut self.sending);
        if self.sending.is_empty() {
            return Poll::Ready(Ok(()));
        }
        while let Some(message) = self.sending.front() {
            ready!(self.link.poll_send_binary(cx, message))?;
            self.sending.pop_front();
        }
        self.link.poll_flush(cx)
    }

    /// Leaves this task's waker for the streams; `true` if they queued something meanwhile
    /// (poll again).
    pub(super) fn park(&self, cx: &Context<'_>) -> bool {
        let mut core = self.shared.lock();
        match &core.driver {
            Some(waker) if waker.will_wake(cx.waker()) => {}
            _ => core.driver = Some(cx.waker().clone()),
        }
        core.has_output()
    }

    /// Ends the session for every stream still open, with `why`.
    pub(super) fn end_streams(&self, why: &str) {
        let mut wakes = Wakes::default();
        self.shared.lock().end(Arc::from(why), &mut wakes);
        wakes.wake();
    }

    /// Everything sent and nothing waiting: the session may end.
    pub(super) fn idle(&self) -> bool {
        self.sending.is_empty() && !self.shared.lock().has_output()
    }

    pub(super) fn into_ended(self, result: io::Result<()>) -> Ended<S> {
        Ended {
            link: self.link,
            peer_ended: self.peer_ended,
            result,
        }
    }
}
