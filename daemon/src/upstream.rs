//! The daemon's HTTP/1.1 connections to the local Ollama, kept open between requests.
//!
//! Why not `hyper_util`'s pooled client: per request it parses an absolute URL into a pool key,
//! checks a connection out through a shared pool, and spawns a task that waits for the
//! connection to be ready again before putting it back: about 4 % of the daemon's CPU for a
//! small request (issue 19). Here a request takes the first open connection that is ready for
//! one (hyper's [`SendRequest::is_ready`]), or opens a new one; the connection goes straight
//! back into the list once Ollama's response head has arrived, and becomes ready again when
//! that response's body has ended. So there are as many connections as requests that ran at
//! once, each reused as soon as it is free.
//!
//! A connection Ollama closed while it sat unused is noticed before it is taken
//! ([`SendRequest::is_closed`]). A request hyper could not write at all goes once more on a new
//! connection; one written just as Ollama closed (a close this thread had not read yet) may
//! have reached Ollama, so it is not sent again and fails, as with any HTTP/1 client. A free
//! connection not known busy for [`IDLE_TIMEOUT`] (since its last response began, or since a
//! request found it still answering) is closed at the next request: after a response that
//! streamed longer than that with no other request meanwhile, its connection is replaced once.

use std::sync::Mutex;
use std::time::Duration;

use http::{Request, Response};
use http_body::Body;
use hyper::body::Incoming;
use hyper::client::conn::TrySendError;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::time::Instant;

/// How long a connection may sit unused before the next request closes it: as long as
/// `hyper_util`'s pool keeps one.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(90);

/// Why a request did not reach Ollama or came back without a response.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Connect(std::io::Error),
    #[error("no connection within {0:?}")]
    ConnectTimeout(Duration),
    #[error("{0}")]
    Http(#[from] hyper::Error),
}

/// Connections to one Ollama (see the module docs), for requests with bodies of type `B`.
pub struct Upstream<B> {
    /// `host:port` to connect to.
    address: String,
    connect_timeout: Duration,
    idle_timeout: Duration,
    /// Open connections, busy or not, each with when it was last known busy (handed a request,
    /// or found still answering one).
    connections: Mutex<Vec<(SendRequest<B>, Instant)>>,
}

impl<B> Upstream<B>
where
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    /// Connections to `address` (`host:port`), each opened within `connect_timeout`.
    pub fn new(address: String, connect_timeout: Duration) -> Upstream<B> {
        Upstream {
            address,
            connect_timeout,
            idle_timeout: IDLE_TIMEOUT,
            connections: Mutex::new(Vec::new()),
        }
    }

    /// Closes connections unused for `idle` instead of [`IDLE_TIMEOUT`].
    #[cfg(test)]
    fn with_idle_timeout(mut self, idle: Duration) -> Self {
        self.idle_timeout = idle;
        self
    }

    /// Sends `request` (origin-form URI, `Host` set) on a free connection or a new one.
    pub async fn send(&self, request: Request<B>) -> Result<Response<Incoming>, Error> {
        let request = match self.take_free() {
            None => request,
            Some(sender) => match self.send_on(sender, request).await {
                Ok(response) => return Ok(response),
                // hyper gives a request back when it wrote none of it: the connection closed
                // as it was taken. Once more on a new one, which cannot have.
                Err(mut failed) => match failed.take_message() {
                    Some(unsent) => unsent,
                    None => return Err(Error::Http(failed.into_error())),
                },
            },
        };
        // Boxed: opening a connection is rare, and its state inline would make every request's
        // future (moved into the session's task list) a kilobyte larger.
        let sender = Box::pin(self.connect()).await?;
        self.send_on(sender, request)
            .await
            .map_err(|failed| Error::Http(failed.into_error()))
    }

    /// Sends `request` on `sender`, which goes back into the list once the response head came.
    async fn send_on(
        &self,
        mut sender: SendRequest<B>,
        request: Request<B>,
    ) -> Result<Response<Incoming>, TrySendError<Request<B>>> {
        let response = sender.try_send_request(request).await?;
        self.put_back(sender);
        Ok(response)
    }

    /// Takes the first connection ready for a request, dropping on the way the closed ones and
    /// the free ones not seen busy for the idle timeout.
    fn take_free(&self) -> Option<SendRequest<B>> {
        let now = Instant::now();
        let mut connections = self.connections.lock().unwrap_or_else(|p| p.into_inner());
        connections.retain_mut(|(sender, seen_busy)| {
            if sender.is_closed() {
                return false;
            }
            if !sender.is_ready() {
                // Still sending a response: not idle.
                *seen_busy = now;
                return true;
            }
            now - *seen_busy <= self.idle_timeout
        });
        let free = connections
            .iter()
            .position(|(sender, _)| sender.is_ready())?;
        Some(connections.swap_remove(free).0)
    }

    fn put_back(&self, sender: SendRequest<B>) {
        let mut connections = self.connections.lock().unwrap_or_else(|p| p.into_inner());
        connections.push((sender, Instant::now()));
    }

    /// Opens a connection; its task runs until Ollama or the daemon closes it.
    async fn connect(&self) -> Result<SendRequest<B>, Error> {
        let stream = tokio::time::timeout(self.connect_timeout, TcpStream::connect(&self.address))
            .await
            .map_err(|_| Error::ConnectTimeout(self.connect_timeout))?
            .map_err(Error::Connect)?;
        // Tokens go out as Ollama writes them.
        stream.set_nodelay(true).map_err(Error::Connect)?;
        let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(Error::Http)?;
        tokio::spawn(async move {
            if let Err(err) = connection.await {
                tracing::debug!(error = %err, "connection to Ollama ended");
            }
        });
        Ok(sender)
    }

    /// How many connections are open (busy or free).
    #[cfg(test)]
    fn open(&self) -> usize {
        let connections = self.connections.lock().unwrap_or_else(|p| p.into_inner());
        connections.iter().filter(|(s, _)| !s.is_closed()).count()
    }
}

#[cfg(test)]
mod tests;
