//! The loopback listener of the browser login (RFC 8252 §7.3): the local HTTP server at
//! `http://127.0.0.1:PORT/callback` that the identity provider sends the browser back to.
//!
//! It is apart from the grant ([`super::browser`]) because it is the login's one exposed
//! surface: every local process and every page the browser loads can reach it. So it answers
//! only a redirect that carries this login's `state` (a 400 for any other, a 404 for other
//! paths), bounds each connection's head in size and time, serves a bounded number of
//! connections at once, and lets a newcomer push out an idle one so that idle connections
//! cannot keep the browser out.

use std::collections::VecDeque;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};
use tokio::task::{AbortHandle, JoinSet};
use tokio::time::timeout;
use tracing::{Instrument, debug, debug_span, warn};

use super::{LoginError, Tokens};

/// Connections the loopback listener serves at once: a browser opens a few (page, favicon,
/// speculative preconnects); more is not a browser. When all are taken, the oldest one that has
/// not sent its request yet makes room for the newcomer (see [`CallbackConnections`]), so idle
/// connections opened by another local process cannot keep the browser out.
const MAX_CALLBACK_CONNECTIONS: usize = 16;

/// Time a connection to the loopback listener has to send its request headers: a browser sends
/// them at once; 10 s also covers a browser busy starting up, and a silent connection does not
/// hold one of the [`MAX_CALLBACK_CONNECTIONS`] for long.
const CALLBACK_HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// Largest request head (request line with the query, and headers) the loopback listener
/// reads: a redirect's query is a code, a state and an issuer (under 2 KiB even for providers
/// with long codes) and a browser's headers a few KiB more.
const MAX_CALLBACK_HEAD_BYTES: usize = 16 * 1024;

/// Time one connection to the loopback listener may stay open: the callback's answer waits for
/// the code exchange, which is bounded by [`HTTP_TIMEOUT`](super::http::HTTP_TIMEOUT).
const CALLBACK_CONNECTION_TIMEOUT: Duration = Duration::from_secs(45);

/// The path of the loopback redirect URI.
pub(super) const CALLBACK_PATH: &str = "/callback";

/// Time given to the page that ends the browser login to reach the browser before the listener
/// closes.
const PAGE_FLUSH_TIMEOUT: Duration = Duration::from_secs(2);

/// The query parameters of the browser's redirect (RFC 6749 §4.1.2, RFC 9207).
#[derive(Debug, Default)]
pub(super) struct CallbackParams {
    pub(super) code: Option<String>,
    pub(super) state: Option<String>,
    pub(super) error: Option<String>,
    pub(super) error_description: Option<String>,
    pub(super) iss: Option<String>,
}

impl CallbackParams {
    /// The redirect's parameters from its query string; unknown ones are ignored.
    pub(super) fn parse(query: &str) -> CallbackParams {
        let mut params = CallbackParams::default();
        for (key, value) in url::form_urlencoded::parse(query.as_bytes()) {
            let slot = match key.as_ref() {
                "code" => &mut params.code,
                "state" => &mut params.state,
                "error" => &mut params.error,
                "error_description" => &mut params.error_description,
                "iss" => &mut params.iss,
                _ => continue,
            };
            // A repeated parameter is ambiguous; the first one counts, like most servers.
            slot.get_or_insert_with(|| value.into_owned());
        }
        params
    }
}

/// A redirect that reached the loopback listener, and where to send the page the browser shows.
pub(super) struct Callback {
    /// What the redirect says.
    pub(super) params: CallbackParams,
    page: oneshot::Sender<String>,
}

impl Callback {
    /// Shows the browser how the login ended.
    pub(super) fn answer(self, outcome: &Result<Tokens, LoginError>) {
        // The browser waits for its page; a closed tab is no reason to fail.
        let _ = self.page.send(page(outcome));
    }
}

/// The loopback listener of one browser login and the connections it serves.
pub(super) struct CallbackListener {
    listener: TcpListener,
    callbacks: mpsc::Sender<Callback>,
    received: mpsc::Receiver<Callback>,
    gate: Arc<Gate>,
    connections: CallbackConnections,
}

impl CallbackListener {
    /// Serves `listener` for the login whose `state` is given.
    pub(super) fn new(listener: TcpListener, state: &str) -> CallbackListener {
        let (callbacks, received) = mpsc::channel::<Callback>(MAX_CALLBACK_CONNECTIONS);
        CallbackListener {
            listener,
            callbacks,
            received,
            gate: Arc::new(Gate {
                state: state.to_owned(),
                refused: AtomicUsize::new(0),
            }),
            connections: CallbackConnections::default(),
        }
    }

    /// Serves connections until one brings a redirect with this login's `state`, and returns
    /// it; its connection waits for [`Callback::answer`]. Other requests are answered by their
    /// connection and never end the wait.
    pub(super) async fn next(&mut self) -> Callback {
        let CallbackListener {
            listener,
            callbacks,
            received,
            gate,
            connections,
        } = self;
        loop {
            tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok((stream, peer)) => {
                        let span = debug_span!("login_callback", %peer);
                        let requested = Arc::new(AtomicBool::new(false));
                        let serve = serve_callback_connection(
                            stream,
                            callbacks.clone(),
                            gate.clone(),
                            requested.clone(),
                        );
                        connections.admit(serve.instrument(span), requested);
                    }
                    Err(e) => {
                        // Transient (e.g. out of file descriptors): pause instead of spinning.
                        warn!(error = %e, "accepting a connection for the browser login");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                },
                Some(_) = connections.set.join_next(), if !connections.set.is_empty() => {}
                Some(callback) = received.recv() => return callback,
            }
        }
    }

    /// Closes the listener once its connections are done, waiting at most
    /// [`PAGE_FLUSH_TIMEOUT`] so the final page reaches the browser. Returns how many
    /// redirects were refused for a wrong or missing `state`.
    pub(super) async fn close(mut self) -> usize {
        let _ = timeout(PAGE_FLUSH_TIMEOUT, async {
            while self.connections.set.join_next().await.is_some() {}
        })
        .await;
        self.gate.refused.load(Ordering::Relaxed)
    }
}

/// What the loopback listener's connections check a redirect against.
struct Gate {
    /// This login's `state`.
    state: String,
    /// Redirects refused for a wrong or missing `state` (for the log).
    refused: AtomicUsize,
}

/// The loopback listener's connections: at most [`MAX_CALLBACK_CONNECTIONS`], each bounded by
/// [`CALLBACK_CONNECTION_TIMEOUT`].
#[derive(Default)]
struct CallbackConnections {
    set: JoinSet<()>,
    /// Oldest first: each connection's task, and whether it has sent its request.
    order: VecDeque<(AbortHandle, Arc<AtomicBool>)>,
}

impl CallbackConnections {
    /// Starts serving a new connection. When all slots are taken, the oldest connection still
    /// waiting for its request is closed to make room: a browser sends its request as soon as
    /// it connects, so only a connection kept idle on purpose (or a browser's unused
    /// preconnect) loses its place. With no such connection the new one is dropped.
    fn admit(
        &mut self,
        serve: impl Future<Output = ()> + Send + 'static,
        requested: Arc<AtomicBool>,
    ) {
        self.order.retain(|(task, _)| !task.is_finished());
        if self.order.len() >= MAX_CALLBACK_CONNECTIONS {
            let idle = self
                .order
                .iter()
                .position(|(_, requested)| !requested.load(Ordering::Acquire));
            match idle.and_then(|index| self.order.remove(index)) {
                Some((task, _)) => {
                    debug!("the login listener is full: closing its oldest idle connection");
                    task.abort();
                }
                None => {
                    debug!("the login listener is full: one connection dropped");
                    return;
                }
            }
        }
        let task = self.set.spawn(serve);
        self.order.push_back((task, requested));
    }
}

/// Serves one browser connection to the loopback listener: `GET /callback` with this login's
/// `state` is handed to [`CallbackListener::next`]'s caller, which answers with the final page; one with another
/// `state` gets a 400, anything else a 404. The request head is bounded in size
/// ([`MAX_CALLBACK_HEAD_BYTES`]) and time ([`CALLBACK_HEADER_TIMEOUT`]); the whole connection
/// by [`CALLBACK_CONNECTION_TIMEOUT`].
async fn serve_callback_connection(
    stream: tokio::net::TcpStream,
    callbacks: mpsc::Sender<Callback>,
    gate: Arc<Gate>,
    requested: Arc<AtomicBool>,
) {
    let service = hyper::service::service_fn(move |request: Request<Incoming>| {
        requested.store(true, Ordering::Release);
        let callbacks = callbacks.clone();
        let gate = gate.clone();
        async move {
            Ok::<_, std::convert::Infallible>(answer_callback(request, callbacks, &gate).await)
        }
    });
    let connection = hyper::server::conn::http1::Builder::new()
        .keep_alive(false)
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(CALLBACK_HEADER_TIMEOUT)
        .max_header_size(MAX_CALLBACK_HEAD_BYTES)
        .max_buf_size(MAX_CALLBACK_HEAD_BYTES * 2)
        .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
    match timeout(CALLBACK_CONNECTION_TIMEOUT, connection).await {
        Ok(Ok(())) => debug!("login listener connection closed"),
        Ok(Err(e)) => debug!(error = %e, "login listener connection failed"),
        Err(_) => debug!("login listener connection timed out"),
    }
}

/// Answers one request to the loopback listener.
async fn answer_callback(
    request: Request<Incoming>,
    callbacks: mpsc::Sender<Callback>,
    gate: &Gate,
) -> Response<Full<Bytes>> {
    if request.method() != hyper::Method::GET || request.uri().path() != CALLBACK_PATH {
        return html(StatusCode::NOT_FOUND, "Not found".to_owned());
    }
    let params = CallbackParams::parse(request.uri().query().unwrap_or(""));
    if !params
        .state
        .as_deref()
        .is_some_and(|state| same_secret(state, &gate.state))
    {
        // Anyone on this machine can reach the listener: a wrong state is someone else's
        // request, not the login's end. Logged once per login, so a flood does not fill the log.
        if gate.refused.fetch_add(1, Ordering::Relaxed) == 0 {
            warn!(
                "the browser login's listener got a redirect that belongs to no login (state mismatch): answered 400 and still waiting for the real one"
            );
        }
        return html(
            StatusCode::BAD_REQUEST,
            page_html(
                "This answer does not belong to the cloudllm login in progress (state mismatch), \
                 so it was ignored. If you are logging in, finish in the page that \
                 <code>cloudllm login</code> opened.",
            ),
        );
    }
    let (page, ready) = oneshot::channel();
    if callbacks.send(Callback { params, page }).await.is_err() {
        return html(
            StatusCode::GONE,
            page_html("This login is over. Run <code>cloudllm login</code> again if you need to."),
        );
    }
    match ready.await {
        Ok(body) => html(StatusCode::OK, body),
        Err(_) => html(
            StatusCode::GONE,
            page_html("This login is over. Run <code>cloudllm login</code> again if you need to."),
        ),
    }
}

/// Compares a received `state` with the login's in time that depends only on their lengths,
/// so a local process timing the listener's answers learns nothing about the secret.
fn same_secret(received: &str, expected: &str) -> bool {
    let (a, b) = (received.as_bytes(), expected.as_bytes());
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |diff, (x, y)| diff | (x ^ y)) == 0
}

/// The page the browser shows at the end of the login.
fn page(outcome: &Result<Tokens, LoginError>) -> String {
    match outcome {
        Ok(_) => page_html("You are logged in to cloudllm. You can close this tab."),
        Err(e) => page_html(&format!(
            "The cloudllm login failed: {}. You can close this tab.",
            escape_html(&e.to_string())
        )),
    }
}

/// A minimal page with `message` (already HTML).
fn page_html(message: &str) -> String {
    format!(
        "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>cloudllm login</title></head>\
         <body style=\"font-family:sans-serif;margin:4em auto;max-width:32em\"><p>{message}</p></body></html>\n"
    )
}

/// An HTML answer that no cache keeps.
fn html(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/html; charset=utf-8"),
    );
    headers.insert(
        http::header::CACHE_CONTROL,
        http::HeaderValue::from_static("no-store"),
    );
    response
}

/// `text` made safe to put in HTML.
fn escape_html(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn callback_params_are_parsed_and_first_wins() {
        let p = CallbackParams::parse("code=a%2Bb&state=s&state=t&iss=http%3A%2F%2Fx&other=1");
        assert_eq!(p.code.as_deref(), Some("a+b"));
        assert_eq!(p.state.as_deref(), Some("s"));
        assert_eq!(p.iss.as_deref(), Some("http://x"));
        assert!(p.error.is_none());
    }

    #[test]
    fn pages_escape_messages() {
        let page = page(&Err(LoginError::Provider("<script>".into())));
        assert!(page.contains("&lt;script&gt;"));
        assert!(!page.contains("<script>"));
    }

    #[test]
    fn states_compare_whole() {
        assert!(same_secret("abc", "abc"));
        assert!(!same_secret("abd", "abc"));
        assert!(!same_secret("ab", "abc"));
        assert!(!same_secret("", "abc"));
    }
}
