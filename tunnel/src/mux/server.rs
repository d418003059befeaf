//! The daemon's end of a session: every request the relay sends is answered by the service,
//! inside the session's one task.

use std::future::Future;
use std::pin::pin;
use std::sync::Arc;
use std::task::Poll;

use bytes::Bytes;
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use http::{Request, Response, StatusCode};
use http_body::Body;
use hyper::service::Service;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::sync::CancellationToken;

use super::conn::{Conn, Ended, Read};
use super::frame::{self, Frame, Frames, ProtocolError, Reason, RequestHead};
use super::stream::{Pump, Stream};
use super::{BoxError, Core, RecvBody, Shared, Wakes, on_stream_frame};
use crate::MAX_CONCURRENT_STREAMS;
use crate::link::Link;

/// Serves one session the relay opened with `first` (its first message) on `link`, until the
/// relay ends it or the WebSocket closes. Once `stop` is cancelled, new requests are refused
/// (the relay may send them again elsewhere) and the session ends when those in flight have.
pub async fn serve_session<S, Svc, B>(
    link: Link<S>,
    first: Bytes,
    service: &Svc,
    stop: &CancellationToken,
) -> Ended<S>
where
    S: AsyncRead + AsyncWrite + Unpin,
    Svc: Service<Request<RecvBody>, Response = Response<B>>,
    Svc::Error: Into<BoxError>,
    B: Body,
    B::Error: Into<BoxError>,
{
    let shared = Shared::new();
    let mut conn = Conn::new(link, shared.clone());
    let mut arrived: Vec<(u32, RequestHead)> = Vec::new();
    let mut handlers = FuturesUnordered::new();
    // Bodies of responses sent whole, dropped once the answers are written.
    let mut spent: Vec<Pump<B>> = Vec::new();
    let mut stopping = pin!(stop.cancelled());

    let first = {
        let mut wakes = Wakes::default();
        let mut core = shared.lock();
        let applied = Frames::new(first)
            .try_for_each(|frame| on_frame(&mut core, frame?, &mut wakes, &mut arrived, false));
        drop(core);
        wakes.wake();
        applied
    };
    if let Err(err) = first {
        conn.end_streams("the relay broke the protocol");
        return conn.into_ended(Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            err,
        )));
    }

    let result = std::future::poll_fn(|cx| {
        loop {
            let refusing = stopping.as_mut().poll(cx).is_ready();
            let read = conn.poll_read(cx, &mut |core, frame, wakes| {
                on_frame(core, frame, wakes, &mut arrived, refusing)
            })?;
            for (id, head) in arrived.drain(..) {
                let mut request = Request::new(RecvBody::new(shared.clone(), id));
                *request.method_mut() = head.method;
                *request.uri_mut() = head.uri;
                *request.headers_mut() = head.headers;
                handlers.push(respond(shared.clone(), id, service.call(request)));
            }
            while let Poll::Ready(Some(answered)) = handlers.poll_next_unpin(cx) {
                spent.extend(answered);
            }
            if matches!(read, Read::Over) && conn.link.is_closed() {
                // Nowhere to send the answers: the handlers are dropped (and with them the
                // requests to Ollama).
                return Poll::Ready(Ok(()));
            }
            let written = conn.poll_write(cx)?.is_ready();
            // What the service does when its response is dropped (the daemon writes its log
            // line) comes after the answers went out, not on their way.
            spent.clear();
            let ending = matches!(read, Read::Over) || refusing;
            if ending && handlers.is_empty() && written && conn.idle() {
                return Poll::Ready(Ok(()));
            }
            if !conn.park(cx) {
                return Poll::Pending;
            }
        }
    })
    .await;
    drop(handlers);
    conn.end_streams("the session ended");
    conn.into_ended(result)
}

/// A frame that opens or answers a stream, on the daemon's side: a request head opens one
/// (refused while `refusing` or at the stream limit).
fn on_frame(
    core: &mut Core,
    frame: Frame,
    wakes: &mut Wakes,
    arrived: &mut Vec<(u32, RequestHead)>,
    refusing: bool,
) -> Result<(), ProtocolError> {
    let (id, head, end) = match frame {
        Frame::Request { id, head, end } => (id, head, end),
        Frame::Response { .. } => return Err(ProtocolError("the relay sent a response")),
        other => return on_stream_frame(core, other, wakes),
    };
    if core.streams.contains_key(&id) {
        return Err(ProtocolError("a request on a stream already open"));
    }
    if refusing || core.streams.len() >= MAX_CONCURRENT_STREAMS as usize {
        core.reset(id, Reason::Refused, wakes);
        return Ok(());
    }
    core.streams.insert(id, Stream::new(end, false));
    arrived.push((id, head));
    Ok(())
}

/// Answers stream `id` with what `handler` gives, body included; stops (dropping the handler
/// or the body) as soon as the relay resets the stream. Gives back the spent body of a
/// response it sent whole, for the session to drop once the answer is written.
async fn respond<F, B, E>(shared: Arc<Shared>, id: u32, handler: F) -> Option<Pump<B>>
where
    F: Future<Output = Result<Response<B>, E>>,
    B: Body,
    B::Error: Into<BoxError>,
    E: Into<BoxError>,
{
    let mut answering = Answering {
        shared: shared.clone(),
        id,
        done: false,
    };
    let mut handler = pin!(handler);
    let answered = std::future::poll_fn(|cx| {
        {
            let mut core = shared.lock();
            let ended = core.ended.is_some();
            match core.streams.get_mut(&id) {
                Some(stream) if stream.reset.is_none() && !ended => stream.wait_to_write(cx),
                _ => return Poll::Ready(None),
            }
        }
        handler.as_mut().poll(cx).map(Some)
    })
    .await;
    let response = match answered {
        // Reset by the relay, or the session is over.
        None => return None,
        Some(Ok(response)) => response,
        Some(Err(_)) => {
            answering.reset(Reason::Internal);
            return None;
        }
    };
    let (parts, body) = response.into_parts();
    let end = body.is_end_stream();
    // `None`: the stream is gone.
    let body_follows = answering.head(parts.status, &parts.headers, end)?;
    answering.done = true;
    let mut pump = Pump::new(body);
    if body_follows {
        std::future::poll_fn(|cx| pump.poll_send(cx, &shared, id)).await;
        // Dropped while sending (the session ended): the pump resets nothing; the session's
        // end has already failed the stream at the relay.
    }
    Some(pump)
}

/// A stream being answered; dropped before its head went out, it is reset.
struct Answering {
    shared: Arc<Shared>,
    id: u32,
    done: bool,
}

impl Answering {
    /// Queues the response head: whether its body follows, or `None` if the stream is gone.
    /// A head too large for the tunnel is replaced by a whole 502 that says so.
    fn head(&mut self, status: StatusCode, headers: &http::HeaderMap, end: bool) -> Option<bool> {
        let mut wakes = Wakes::default();
        let mut core = self.shared.lock();
        if !core.streams.contains_key(&self.id) {
            self.done = true;
            return None;
        }
        let id = self.id;
        let mut end = end;
        let sent = core.put(&mut wakes, |out| {
            frame::put_response(out, id, status, headers, end)
        });
        if sent.is_err() {
            let mut plain = http::HeaderMap::new();
            plain.insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("text/plain"),
            );
            let message = b"Ollama's response headers are too large for the tunnel";
            core.put(&mut wakes, |out| {
                let _ = frame::put_response(out, id, StatusCode::BAD_GATEWAY, &plain, false);
                frame::put_data(out, id, message, true);
            });
            end = true;
        }
        if end && let Some(stream) = core.streams.get_mut(&self.id) {
            stream.sent_end = true;
            stream.writer_gone = true;
            core.settle(self.id, &mut wakes);
        }
        drop(core);
        wakes.wake();
        Some(!end)
    }

    fn reset(&mut self, reason: Reason) {
        self.done = true;
        let mut wakes = Wakes::default();
        let mut core = self.shared.lock();
        if let Some(stream) = core.streams.get_mut(&self.id) {
            stream.writer_gone = true;
            if stream.reset.is_none() {
                stream.reset = Some(reason);
                stream.wake_all(&mut wakes);
                core.reset(self.id, reason, &mut wakes);
            }
            core.settle(self.id, &mut wakes);
        }
        drop(core);
        wakes.wake();
    }
}

impl Drop for Answering {
    fn drop(&mut self) {
        if !self.done {
            self.reset(Reason::Cancel);
        }
    }
}
