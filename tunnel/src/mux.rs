//! The tunnel's multiplexer: many HTTP exchanges at once over the link's binary messages.
//!
//! The relay opens a *stream* per user request ([`client`]); the daemon answers it
//! ([`server`]). A stream carries the request head and body one way and the response head and
//! body the other, as the frames of [`frame`]. What HTTP/2 gave the tunnel, this keeps:
//! - **per-stream flow control**: each side may send at most [`WINDOW`] body bytes on
//!   a stream before the reader grants more (window frames, sent as the reader's consumer
//!   takes the data). A reader that stalls holds at most one window and stops only its own
//!   stream; the connection reads on for every other stream, so there is no connection-wide
//!   window to exhaust. A peer that sends past a window breaks the protocol and the session
//!   ends.
//! - **cancellation both ways**: dropping a response body (the caller hung up) or a request
//!   future resets the stream, and the daemon drops its request to Ollama; a daemon that cannot
//!   finish a body resets the stream, and the caller's response ends with an error.
//! - **liveness** is the link's: pings and the silence bound, whether or not streams are open.
//!
//! What it leaves out, and why it is cheaper: one framing instead of HTTP/2 frames inside
//! WebSocket messages, headers as plain name/value bytes instead of HPACK (the tunnel's
//! requests carry a handful of short headers), and no task per stream: the relay's request
//! future and response body talk to the session's one connection task through shared state,
//! and the daemon runs every stream's handler inside its connection task.
//!
//! A session (see the crate docs) is one multiplexer connection: [`client::connect`] on the
//! relay, [`server::serve_session`] on the daemon, each owning the link until the session ends.

pub mod client;
mod conn;
pub mod frame;
pub mod server;
mod stream;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::Waker;

use bytes::{Bytes, BytesMut};
pub use conn::Ended;
pub use frame::Reason;
pub use stream::RecvBody;
use stream::Stream;

use crate::MAX_WS_MESSAGE_OUT;

/// A boxed error, as bodies give them.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Why a stream or request failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    /// The peer reset the stream.
    #[error("the tunnel peer reset the stream ({0:?})")]
    Reset(Reason),
    /// The session ended before the stream did: the tunnel closed, failed or is being drained.
    #[error("the tunnel session ended: {0}")]
    Closed(Arc<str>),
    /// The session already carries the most streams it may.
    #[error(
        "the tunnel carries {} requests already",
        crate::MAX_CONCURRENT_STREAMS
    )]
    Busy,
    /// The request head is larger than the tunnel carries.
    #[error("request head over {} bytes", crate::MAX_HEADER_LIST_BYTES)]
    HeadTooLarge,
}

/// What a session's streams and its connection task share.
struct Shared {
    core: Mutex<Core>,
}

/// The session's state, under one lock. Each change is one short step under the lock, so a
/// panicking holder cannot leave it half-made.
struct Core {
    streams: HashMap<u32, Stream>,
    /// Frames gathered for the next message.
    out: BytesMut,
    /// Whole messages waiting to be sent, oldest first.
    messages: Vec<Bytes>,
    /// The connection task, to wake when there is something to send or the session should end.
    driver: Option<Waker>,
    /// Set once the session has ended (or is ending for new streams): why.
    ended: Option<Arc<str>>,
    /// Every [`client::Client`] of the session is gone: no new streams will come (never on
    /// the daemon's side).
    released: bool,
    /// The next stream id the relay gives.
    next_id: u32,
    /// The relay cut the session short: the connection returns at once.
    cut: bool,
}

impl Shared {
    fn new() -> Arc<Self> {
        Arc::new(Shared {
            core: Mutex::new(Core {
                streams: HashMap::new(),
                out: BytesMut::new(),
                messages: Vec::new(),
                driver: None,
                ended: None,
                released: false,
                next_id: 1,
                cut: false,
            }),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Core> {
        crate::lock(&self.core)
    }
}

/// Wakers collected under the lock, woken after it is released: declared before the lock's
/// guard, so that they are woken when dropped on every path, early returns included (a driver
/// waker taken from the session and never woken would leave its output unsent).
#[derive(Default)]
struct Wakes {
    driver: Option<Waker>,
    others: Vec<Waker>,
}

impl Wakes {
    /// Wakes now (the same as dropping).
    fn wake(self) {}
}

impl Drop for Wakes {
    fn drop(&mut self) {
        if let Some(driver) = self.driver.take() {
            driver.wake();
        }
        for waker in self.others.drain(..) {
            waker.wake();
        }
    }
}

impl Core {
    /// Appends one frame, written by `encode`, to the current message; a frame that would make
    /// the message outgrow [`MAX_WS_MESSAGE_OUT`] starts the next one. Notes that the driver
    /// must send. `encode` writes nothing when it fails.
    fn put<R>(&mut self, wakes: &mut Wakes, encode: impl FnOnce(&mut BytesMut) -> R) -> R {
        let start = self.out.len();
        let encoded = encode(&mut self.out);
        if start > 0 && self.out.len() > MAX_WS_MESSAGE_OUT {
            let full = self.out.split_to(start).freeze();
            self.messages.push(full);
        }
        if wakes.driver.is_none() {
            wakes.driver = self.driver.take();
        }
        encoded
    }

    fn reset(&mut self, id: u32, reason: Reason, wakes: &mut Wakes) {
        self.put(wakes, |out| frame::put_reset(out, id, reason));
    }

    /// Removes stream `id` once neither half of this side uses it; a stream left before both
    /// directions ended is reset, so that the peer stops too.
    fn settle(&mut self, id: u32, wakes: &mut Wakes) {
        let Some(stream) = self.streams.get(&id) else {
            return;
        };
        if !stream.reader_gone || !(stream.writer_gone || stream.sent_end) {
            return;
        }
        let unfinished = stream.reset.is_none()
            && (!stream.recv_end || !stream.sent_end)
            && self.ended.is_none();
        self.streams.remove(&id);
        if unfinished {
            self.reset(id, Reason::Cancel, wakes);
        }
        if self.streams.is_empty() && wakes.driver.is_none() {
            // The session may be waiting for its last stream to end.
            wakes.driver = self.driver.take();
        }
    }

    /// Ends the session for every stream: readers and writers waiting are woken and fail
    /// with `why`.
    fn end(&mut self, why: Arc<str>, wakes: &mut Wakes) {
        if self.ended.is_none() {
            self.ended = Some(why);
        }
        for stream in self.streams.values_mut() {
            stream.wake_all(wakes);
        }
    }

    /// The error a stream sees once the session has ended, if it has.
    fn closed(&self) -> Option<Error> {
        self.ended.as_ref().map(|why| Error::Closed(why.clone()))
    }

    /// Whether this side has anything waiting to go out.
    fn has_output(&self) -> bool {
        !self.out.is_empty() || !self.messages.is_empty()
    }

    /// Moves everything waiting to go out into `into`, as whole messages.
    fn take_output(&mut self, into: &mut std::collections::VecDeque<Bytes>) {
        into.extend(self.messages.drain(..));
        if !self.out.is_empty() {
            into.push_back(self.out.split().freeze());
        }
    }
}

/// Applies one frame that concerns an open stream (data, reset, window) from the peer.
/// Frames for streams this side has already let go are dropped: they crossed a reset.
fn on_stream_frame(
    core: &mut Core,
    frame: frame::Frame,
    wakes: &mut Wakes,
) -> Result<(), frame::ProtocolError> {
    use frame::{Frame, ProtocolError};
    match frame {
        Frame::Data { id, data, end } => {
            let Some(stream) = core.streams.get_mut(&id) else {
                return Ok(());
            };
            stream.receive(data, end, wakes)?;
            if end {
                core.settle(id, wakes);
            }
        }
        Frame::Reset { id, reason } => {
            if let Some(stream) = core.streams.get_mut(&id) {
                stream.reset = Some(reason);
                stream.wake_all(wakes);
                core.settle(id, wakes);
            }
        }
        Frame::Window { id, increment } => {
            if let Some(stream) = core.streams.get_mut(&id) {
                stream.credit = stream
                    .credit
                    .checked_add(increment)
                    .filter(|credit| *credit <= i32::MAX as u32)
                    .ok_or(ProtocolError("window over 2^31 - 1"))?;
                if let Some(writer) = stream.writer.take() {
                    wakes.others.push(writer);
                }
            }
        }
        Frame::Request { .. } | Frame::Response { .. } => {
            unreachable!("heads are handled by the client and the server")
        }
    }
    Ok(())
}

/// The window a stream starts with in each direction: 256 KiB. A 2,000-line stream (≈200 KB)
/// then crosses without waiting for a window frame: with 64 KiB it took 1.36–1.45× the direct
/// time in the benchmark, with 256 KiB 1.03×. What a stalled reader can make the other side
/// hold is one window per stream, and a user has as many streams as their tier's concurrency
/// limit allows (at most [`MAX_CONCURRENT_STREAMS`](crate::MAX_CONCURRENT_STREAMS)).
pub const WINDOW: u32 = 256 * 1024;

/// A reader grants more window once its consumer has taken this many bytes: a quarter of the
/// window, so the sender rarely waits and window frames stay few.
const WINDOW_UPDATE_AT: u32 = WINDOW / 4;
