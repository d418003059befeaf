//! The relay's end of a session: [`connect`] gives a [`Client`] that sends requests and the
//! connection future that carries them.

use std::future::Future;
use std::sync::Arc;
use std::task::Poll;

use http::{Request, Response};
use http_body::Body;
use tokio::io::{AsyncRead, AsyncWrite};

use super::conn::{Conn, Ended, Read};
use super::frame::{self, Frame, ProtocolError, Reason};
use super::stream::{Pump, Stream};
use super::{BoxError, Core, Error, RecvBody, Shared, Wakes};
use crate::MAX_CONCURRENT_STREAMS;
use crate::link::Link;

/// Sends requests on one session. Clones share it; the session ends once every clone is gone
/// and its streams have ended.
#[derive(Clone)]
pub struct Client {
    shared: Arc<Shared>,
    _handle: Arc<Handle>,
}

/// Shared by a session's clients: dropping the last tells the connection no new streams will
/// come.
struct Handle(Arc<Shared>);

impl Drop for Handle {
    fn drop(&mut self) {
        let mut core = self.0.lock();
        core.released = true;
        let driver = core.driver.take();
        drop(core);
        if let Some(driver) = driver {
            driver.wake();
        }
    }
}

/// Ends a session at once (see [`connect`]).
pub struct Cut(Arc<Shared>);

impl Cut {
    /// Resets every stream still open and makes the connection future return.
    pub fn cut(&self) {
        let mut wakes = Wakes::default();
        let mut core = self.0.lock();
        let ids: Vec<u32> = core.streams.keys().copied().collect();
        for id in ids {
            if let Some(stream) = core.streams.get_mut(&id)
                && stream.reset.is_none()
            {
                stream.reset = Some(Reason::Cancel);
                stream.wake_all(&mut wakes);
                core.reset(id, Reason::Cancel, &mut wakes);
            }
        }
        core.cut = true;
        core.end(Arc::from("the relay cut the session"), &mut wakes);
        wakes.driver = wakes.driver.take().or_else(|| core.driver.take());
        drop(core);
        wakes.wake();
    }
}

/// Starts a session on `link`, which this end opens: the client, a handle that cuts the
/// session short, and the connection future to run (in a task of its own) until it returns
/// the link.
pub fn connect<S>(link: Link<S>) -> (Client, Cut, impl Future<Output = Ended<S>> + Send)
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let shared = Shared::new();
    let client = Client {
        shared: shared.clone(),
        _handle: Arc::new(Handle(shared.clone())),
    };
    (client, Cut(shared.clone()), run(Conn::new(link, shared)))
}

async fn run<S>(mut conn: Conn<S>) -> Ended<S>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let result = std::future::poll_fn(|cx| {
        loop {
            if conn.shared.lock().cut {
                // The resets go out if the socket takes them now; the session is over anyway.
                let _ = conn.poll_write(cx);
                return Poll::Ready(Ok(()));
            }
            let over = matches!(conn.poll_read(cx, &mut on_head)?, Read::Over);
            if over {
                let why = if conn.peer_ended {
                    "the device ended the session"
                } else {
                    "the tunnel closed"
                };
                conn.end_streams(why);
            }
            let written = conn.poll_write(cx)?.is_ready();
            if written && conn.idle() {
                let core = conn.shared.lock();
                let quiet = core.streams.is_empty() && (core.released || core.ended.is_some());
                drop(core);
                if over || quiet {
                    return Poll::Ready(Ok(()));
                }
            }
            if !conn.park(cx) {
                return Poll::Pending;
            }
        }
    })
    .await;
    conn.end_streams("the session ended");
    conn.into_ended(result)
}

/// A response head from the daemon: it answers a stream this end opened.
fn on_head(core: &mut Core, frame: Frame, wakes: &mut Wakes) -> Result<(), ProtocolError> {
    let Frame::Response { id, head, end } = frame else {
        return Err(ProtocolError("the device sent a request"));
    };
    // A stream this end has let go of: the response crossed a reset.
    let Some(stream) = core.streams.get_mut(&id) else {
        return Ok(());
    };
    if stream.answered {
        return Err(ProtocolError("two response heads on one stream"));
    }
    stream.answered = true;
    stream.head = Some(head);
    stream.recv_end = end;
    stream.wake_all(wakes);
    Ok(())
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("closed", &self.is_closed())
            .finish()
    }
}

impl Client {
    /// Whether the session takes no more requests (it ended, or is ending).
    pub fn is_closed(&self) -> bool {
        self.shared.lock().ended.is_some()
    }

    /// Sends `request` (its path and query, method, headers and body) and waits for the
    /// response head; the response body streams after. Dropping the future before the head
    /// arrives, or the body before its end, resets the stream.
    pub async fn send_request<B>(&self, request: Request<B>) -> Result<Response<RecvBody>, Error>
    where
        B: Body + Send + 'static,
        B::Error: Into<BoxError>,
    {
        let (parts, body) = request.into_parts();
        let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
        let end = body.is_end_stream();
        let id = self.open(&parts.method, path, &parts.headers, end)?;
        let mut waiting = Waiting {
            shared: self.shared.clone(),
            id,
            pump: (!end).then(|| Pump::new(body)),
            answered: false,
        };
        let head = std::future::poll_fn(|cx| {
            if let Some(pump) = &mut waiting.pump
                && pump.poll_send(cx, &waiting.shared, id).is_ready()
            {
                waiting.pump = None;
            }
            let mut core = waiting.shared.lock();
            let ended = core.closed();
            let Some(stream) = core.streams.get_mut(&id) else {
                return Poll::Ready(Err(ended.unwrap_or(Error::Reset(Reason::Cancel))));
            };
            if let Some(head) = stream.head.take() {
                return Poll::Ready(Ok(head));
            }
            if let Some(reason) = stream.reset {
                return Poll::Ready(Err(Error::Reset(reason)));
            }
            if let Some(ended) = ended {
                return Poll::Ready(Err(ended));
            }
            stream.wait_to_read(cx);
            Poll::Pending
        })
        .await?;
        waiting.answered = true;
        if let Some(pump) = waiting.pump.take() {
            // The device answered before the whole body went: send the rest on the side.
            let mut sending = Sending {
                pump,
                shared: self.shared.clone(),
                id,
            };
            tokio::spawn(async move {
                std::future::poll_fn(|cx| {
                    let Sending { pump, shared, id } = &mut sending;
                    pump.poll_send(cx, shared, *id)
                })
                .await;
            });
        }
        let mut response = Response::new(RecvBody::new(self.shared.clone(), id));
        *response.status_mut() = head.status;
        *response.headers_mut() = head.headers;
        Ok(response)
    }

    /// Opens a stream and queues its head.
    fn open(
        &self,
        method: &http::Method,
        path: &str,
        headers: &http::HeaderMap,
        end: bool,
    ) -> Result<u32, Error> {
        let mut wakes = Wakes::default();
        let mut core = self.shared.lock();
        if let Some(ended) = core.closed() {
            return Err(ended);
        }
        if core.streams.len() >= MAX_CONCURRENT_STREAMS as usize {
            return Err(Error::Busy);
        }
        let mut id = core.next_id;
        while core.streams.contains_key(&id) {
            id = id.wrapping_add(1).max(1);
        }
        core.next_id = id.wrapping_add(1).max(1);
        core.put(&mut wakes, |out| {
            frame::put_request(out, id, method, path, headers, end)
        })
        .map_err(|_| Error::HeadTooLarge)?;
        core.streams.insert(id, Stream::new(false, end));
        drop(core);
        wakes.wake();
        Ok(id)
    }
}

/// A request waiting for its response head; dropped before it, the stream is reset.
struct Waiting<B> {
    shared: Arc<Shared>,
    id: u32,
    pump: Option<Pump<B>>,
    answered: bool,
}

impl<B> Drop for Waiting<B> {
    fn drop(&mut self) {
        if self.answered {
            return;
        }
        let mut wakes = Wakes::default();
        let mut core = self.shared.lock();
        if let Some(stream) = core.streams.get_mut(&self.id) {
            stream.reader_gone = true;
            stream.writer_gone = true;
            if stream.reset.is_none() {
                stream.reset = Some(Reason::Cancel);
                core.reset(self.id, Reason::Cancel, &mut wakes);
            }
            core.settle(self.id, &mut wakes);
        }
        drop(core);
        wakes.wake();
    }
}

/// The rest of a request body, sent after the response head came.
struct Sending<B> {
    pump: Pump<B>,
    shared: Arc<Shared>,
    id: u32,
}

impl<B> Drop for Sending<B> {
    fn drop(&mut self) {
        self.pump.abandon(&self.shared, self.id);
    }
}
