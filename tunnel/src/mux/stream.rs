//! One stream's state, its receiving half ([`RecvBody`]) and its sending half ([`Pump`]).

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use bytes::{Buf, Bytes};
use http_body::{Body, Frame, SizeHint};

use super::frame::{self, MAX_DATA, ProtocolError, Reason, ResponseHead};
use super::{BoxError, Core, Error, Shared, WINDOW, WINDOW_UPDATE_AT, Wakes};

/// A stream as one side sees it.
pub(super) struct Stream {
    /// Body bytes received and not yet taken by the reader.
    recv: VecDeque<Bytes>,
    /// The peer's body has ended.
    pub(super) recv_end: bool,
    /// How many more body bytes the peer may send before this side grants more.
    recv_allowed: u32,
    /// Bytes the reader took since the last window frame.
    unacked: u32,
    /// The reader (request future or body) waiting for data or the head.
    reader: Option<Waker>,
    /// The reading half is gone (dropped, or never needed).
    pub(super) reader_gone: bool,
    /// The response head, on the relay's side, until the request future takes it.
    pub(super) head: Option<ResponseHead>,
    /// A response head has arrived (a second one breaks the protocol).
    pub(super) answered: bool,
    /// How many body bytes this side may still send.
    pub(super) credit: u32,
    /// The writer waiting for credit (or, on the daemon's side, to hear of a reset).
    pub(super) writer: Option<Waker>,
    /// This side's body has ended (its last frame carried the end flag).
    pub(super) sent_end: bool,
    /// The writing half is gone.
    pub(super) writer_gone: bool,
    /// Either side reset the stream.
    pub(super) reset: Option<Reason>,
}

impl Stream {
    pub(super) fn new(recv_end: bool, sent_end: bool) -> Self {
        Stream {
            recv: VecDeque::new(),
            recv_end,
            recv_allowed: WINDOW,
            unacked: 0,
            reader: None,
            reader_gone: false,
            head: None,
            answered: false,
            credit: WINDOW,
            writer: None,
            sent_end,
            writer_gone: sent_end,
            reset: None,
        }
    }

    /// Takes body bytes from the peer, within the window this side granted.
    pub(super) fn receive(
        &mut self,
        data: Bytes,
        end: bool,
        wakes: &mut Wakes,
    ) -> Result<(), ProtocolError> {
        if self.recv_end {
            return Err(ProtocolError("data after the end of a body"));
        }
        let len = data.len() as u32;
        self.recv_allowed = self
            .recv_allowed
            .checked_sub(len)
            .ok_or(ProtocolError("data beyond the stream's window"))?;
        self.recv_end = end;
        // A reader that went away takes nothing more: the bytes are dropped (the stream is
        // reset or ends once this side's writer is done).
        if !self.reader_gone && !data.is_empty() {
            self.recv.push_back(data);
        }
        if let Some(reader) = self.reader.take() {
            wakes.others.push(reader);
        }
        Ok(())
    }

    pub(super) fn wake_all(&mut self, wakes: &mut Wakes) {
        wakes.others.extend(self.reader.take());
        wakes.others.extend(self.writer.take());
    }

    pub(super) fn wait_to_read(&mut self, cx: &Context<'_>) {
        store(&mut self.reader, cx);
    }

    pub(super) fn wait_to_write(&mut self, cx: &Context<'_>) {
        store(&mut self.writer, cx);
    }
}

fn store(slot: &mut Option<Waker>, cx: &Context<'_>) {
    match slot {
        Some(waker) if waker.will_wake(cx.waker()) => {}
        _ => *slot = Some(cx.waker().clone()),
    }
}

/// A body arriving over the tunnel: the request body on the daemon's side, the response body
/// on the relay's. Taking its data grants the peer more window; dropping it before its end
/// resets the stream.
pub struct RecvBody {
    shared: Arc<Shared>,
    id: u32,
    /// Known to have ended: nothing more to ask the session.
    done: bool,
}

impl std::fmt::Debug for RecvBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecvBody")
            .field("stream", &self.id)
            .finish()
    }
}

impl RecvBody {
    pub(super) fn new(shared: Arc<Shared>, id: u32) -> Self {
        RecvBody {
            shared,
            id,
            done: false,
        }
    }
}

impl Body for RecvBody {
    type Data = Bytes;
    type Error = Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Error>>> {
        if self.done {
            return Poll::Ready(None);
        }
        let mut wakes = Wakes::default();
        let mut core = self.shared.lock();
        let polled = read(&mut core, self.id, cx, &mut wakes);
        drop(core);
        wakes.wake();
        if matches!(polled, Poll::Ready(None | Some(Err(_)))) {
            self.done = true;
        }
        polled.map(|next| next.map(|data| data.map(Frame::data)))
    }

    fn is_end_stream(&self) -> bool {
        self.done
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

/// The next piece of stream `id`'s body, granting window as the reader takes it.
fn read(
    core: &mut Core,
    id: u32,
    cx: &Context<'_>,
    wakes: &mut Wakes,
) -> Poll<Option<Result<Bytes, Error>>> {
    let ended = core.closed();
    let Some(stream) = core.streams.get_mut(&id) else {
        return Poll::Ready(Some(Err(ended.unwrap_or(Error::Reset(Reason::Cancel)))));
    };
    if let Some(data) = stream.recv.pop_front() {
        stream.unacked += data.len() as u32;
        if stream.unacked >= WINDOW_UPDATE_AT && !stream.recv_end {
            let increment = std::mem::take(&mut stream.unacked);
            stream.recv_allowed += increment;
            core.put(wakes, |out| frame::put_window(out, id, increment));
        }
        return Poll::Ready(Some(Ok(data)));
    }
    if stream.recv_end {
        return Poll::Ready(None);
    }
    if let Some(reason) = stream.reset {
        return Poll::Ready(Some(Err(Error::Reset(reason))));
    }
    if let Some(ended) = ended {
        return Poll::Ready(Some(Err(ended)));
    }
    stream.wait_to_read(cx);
    Poll::Pending
}

impl Drop for RecvBody {
    fn drop(&mut self) {
        let mut wakes = Wakes::default();
        let mut core = self.shared.lock();
        if let Some(stream) = core.streams.get_mut(&self.id) {
            stream.reader_gone = true;
            stream.recv.clear();
            stream.reader = None;
            core.settle(self.id, &mut wakes);
        }
        drop(core);
        wakes.wake();
    }
}

/// Sends a body on a stream: data frames within the stream's credit, the last with the end
/// flag. Dropped before the end, it resets the stream.
pub(super) struct Pump<B> {
    body: Pin<Box<B>>,
    /// Data taken from the body and not yet sent.
    pending: Bytes,
    /// The body has no more data; the end flag is still to be sent.
    body_done: bool,
    finished: bool,
}

impl<B> Pump<B>
where
    B: Body,
    B::Error: Into<BoxError>,
{
    pub(super) fn new(body: B) -> Self {
        Pump {
            body: Box::pin(body),
            pending: Bytes::new(),
            body_done: false,
            finished: false,
        }
    }

    /// Sends what it can; `Ready` once the body has been sent whole, or the stream is over
    /// (reset, or the session ended).
    pub(super) fn poll_send(&mut self, cx: &mut Context<'_>, shared: &Shared, id: u32) -> Poll<()> {
        // While the body is slow to give more, a reset must still stop it: the writer's waker
        // is left on the stream.
        if !self.finished {
            let mut wakes = Wakes::default();
            let mut core = shared.lock();
            let ended = core.ended.is_some();
            match core.streams.get_mut(&id) {
                Some(stream) if stream.reset.is_none() && !ended => stream.wait_to_write(cx),
                Some(stream) => {
                    stream.writer_gone = true;
                    self.finished = true;
                    core.settle(id, &mut wakes);
                }
                None => self.finished = true,
            }
            drop(core);
            wakes.wake();
        }
        while !self.finished {
            if self.pending.is_empty() && !self.body_done {
                match self.body.as_mut().poll_frame(cx) {
                    Poll::Ready(Some(Ok(frame))) => {
                        if let Ok(mut data) = frame.into_data() {
                            self.pending = data.copy_to_bytes(data.remaining());
                        }
                        self.body_done = self.body.is_end_stream();
                        if self.pending.is_empty() && !self.body_done {
                            continue;
                        }
                    }
                    Poll::Ready(Some(Err(_))) => {
                        self.finish(shared, id, Some(Reason::Internal));
                        return Poll::Ready(());
                    }
                    Poll::Ready(None) => self.body_done = true,
                    Poll::Pending => return Poll::Pending,
                }
            }
            let mut wakes = Wakes::default();
            let mut core = shared.lock();
            let sent = self.send_some(&mut core, cx, id, &mut wakes);
            drop(core);
            wakes.wake();
            if sent.is_pending() {
                return Poll::Pending;
            }
        }
        Poll::Ready(())
    }

    /// Sends as much of the pending data as the credit allows (and the end once all is out).
    fn send_some(
        &mut self,
        core: &mut Core,
        cx: &Context<'_>,
        id: u32,
        wakes: &mut Wakes,
    ) -> Poll<()> {
        loop {
            let ended = core.ended.is_some();
            let Some(stream) = core.streams.get_mut(&id) else {
                self.finished = true;
                return Poll::Ready(());
            };
            if stream.reset.is_some() || ended {
                self.finished = true;
                stream.writer_gone = true;
                core.settle(id, wakes);
                return Poll::Ready(());
            }
            let n = self.pending.len().min(MAX_DATA).min(stream.credit as usize);
            if n == 0 && !self.pending.is_empty() {
                stream.wait_to_write(cx);
                return Poll::Pending;
            }
            let end = self.body_done && self.pending.len() == n;
            if n == 0 && !end {
                // Nothing to send until the body gives more.
                return Poll::Ready(());
            }
            stream.credit -= n as u32;
            if end {
                stream.sent_end = true;
                stream.writer_gone = true;
                self.finished = true;
            }
            let chunk = self.pending.split_to(n);
            core.put(wakes, |out| frame::put_data(out, id, &chunk, end));
            if end {
                core.settle(id, wakes);
                return Poll::Ready(());
            }
            if self.pending.is_empty() {
                return Poll::Ready(());
            }
        }
    }
}

impl<B> Pump<B> {
    /// Stops sending: resets the stream with `reason` if it is still open.
    fn finish(&mut self, shared: &Shared, id: u32, reason: Option<Reason>) {
        self.finished = true;
        let mut wakes = Wakes::default();
        let mut core = shared.lock();
        if let Some(stream) = core.streams.get_mut(&id) {
            stream.writer_gone = true;
            if let Some(reason) = reason
                && stream.reset.is_none()
                && !stream.sent_end
            {
                stream.reset = Some(reason);
                stream.wake_all(&mut wakes);
                core.reset(id, reason, &mut wakes);
            }
            core.settle(id, &mut wakes);
        }
        drop(core);
        wakes.wake();
    }

    /// Called when the pump is dropped before it finished: the stream is reset.
    pub(super) fn abandon(&mut self, shared: &Shared, id: u32) {
        if !self.finished {
            self.finish(shared, id, Some(Reason::Cancel));
        }
    }
}
