//! The daemon's service: what the relay may ask through the tunnel.
//!
//! Every request is a user's, checked against the [allowlist](crate::allowlist) (endpoint,
//! method, path parameter) and forwarded to the local Ollama with its body streamed both ways.
//! The query string is dropped: Ollama's API reads none, so it could only carry something
//! nobody has reviewed. Request headers pass by an allowlist ([`FORWARDED_HEADERS`]): Ollama
//! reads the body and nothing else, and refuses (403) requests whose `Host` is not local or that
//! carry an `Origin`, so the forwarder sets `Host` to Ollama's address and lets nothing else of
//! the caller's through. When the relay resets the stream (the user went away), hyper drops the
//! response future or body, which closes the connection to Ollama and stops the generation.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use cloudllm_proto as proto;
use cloudllm_tunnel::mux::RecvBody;
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode, header};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use tracing::{info, warn};
use url::Url;

use cloudllm_tunnel::coalesce::Coalesce;

use crate::allowlist::{self, Verdict};
use crate::config::DaemonConfig;
use crate::state::State;
use crate::upstream::{self, Upstream};

/// Response body of the tunnel service.
pub type TunnelBody = BoxBody<Bytes, Box<dyn std::error::Error + Send + Sync>>;

/// Time to open a TCP connection to Ollama: it is local, so 5 s means it is not there.
const OLLAMA_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The only request headers passed to Ollama (besides `Host`, which the forwarder sets).
///
/// - `content-type`, `content-length`: what the body is and how long; Ollama decodes JSON
///   whatever the type says, but the length frames the body on the HTTP/1.1 connection.
/// - `accept`: content negotiation, harmless, and kept so that a future Ollama that negotiates
///   (JSON or a stream) answers clients as it would locally.
/// - `x-request-id`: the id the relay checked or made, so that Ollama's side of a request can
///   be matched with the relay's and the caller's logs.
///
/// Everything else stays behind: credentials (`Authorization`, cookies, `X-Api-Key`), browser
/// context (`Origin`, `Referer`, which Ollama answers with 403), forwarding metadata
/// (`Forwarded`, `X-Forwarded-*`, `X-Real-IP`), method and URL overrides
/// (`X-HTTP-Method-Override`, `X-Original-URL`), the relay's own `x-cloudllm-*`, `Expect`,
/// `TE`, `User-Agent` (Ollama ignores it; it only tells the device about the caller), and
/// `Accept-Encoding`: Ollama does not compress, and a compressed stream would hold tokens back
/// in the compressor.
static FORWARDED_HEADERS: [header::HeaderName; 4] = [
    header::CONTENT_TYPE,
    header::CONTENT_LENGTH,
    header::ACCEPT,
    header::HeaderName::from_static(proto::HEADER_REQUEST_ID),
];

/// Response headers not passed back besides the hop-by-hop ones and the relay's own
/// `x-cloudllm-*`: credentials, browser context and forwarding metadata have no place in
/// Ollama's answer.
static STRIPPED_RESPONSE_HEADERS: [header::HeaderName; 9] = [
    header::AUTHORIZATION,
    header::COOKIE,
    header::FORWARDED,
    header::HOST,
    header::ORIGIN,
    header::REFERER,
    header::HeaderName::from_static("x-forwarded-for"),
    header::HeaderName::from_static("x-forwarded-host"),
    header::HeaderName::from_static("x-forwarded-proto"),
];

/// Longest part of a caller's method or path quoted back in an error message: enough to
/// recognise it, and a 5,000-byte method does not come back 5,000 bytes long.
const MAX_QUOTED_BYTES: usize = 64;

/// Forwards tunnel requests to the local Ollama.
pub struct Forwarder {
    upstream: Upstream<RecvBody>,
    /// The path of Ollama's URL without a trailing slash (usually empty); request paths are
    /// appended to it.
    base_path: String,
    state: Arc<State>,
    ollama: Url,
    /// `Host` header Ollama accepts: its own address.
    ollama_host: HeaderValue,
    allow_management: bool,
    device_name: String,
}

impl Forwarder {
    /// A forwarder to the Ollama at `ollama`.
    pub fn new(
        ollama: Url,
        allow_management: bool,
        device_name: String,
        state: Arc<State>,
    ) -> anyhow::Result<Self> {
        // The config's validation keeps `ollama_url` http:// with a host.
        let host = ollama
            .host_str()
            .ok_or_else(|| anyhow::anyhow!("Ollama URL {ollama} has no host"))?;
        let address = format!("{host}:{}", ollama.port_or_known_default().unwrap_or(80));
        // `Host` names the port only when the URL does, as a browser would.
        let host = if ollama.port().is_some() {
            &address
        } else {
            host
        };
        Ok(Forwarder {
            base_path: ollama.path().trim_end_matches('/').to_owned(),
            state,
            ollama_host: HeaderValue::from_str(host)?,
            upstream: Upstream::new(address, OLLAMA_CONNECT_TIMEOUT),
            ollama,
            allow_management,
            device_name,
        })
    }

    /// The forwarder the daemon's settings describe (Ollama's URL, model management, the
    /// device's name).
    pub fn for_config(config: &DaemonConfig, state: Arc<State>) -> anyhow::Result<Self> {
        Forwarder::new(
            config.ollama_url.clone(),
            config.allow_model_management,
            config.device_name.clone(),
            state,
        )
    }

    /// The service a tunnel's sessions (and its lanes') call for each request:
    /// [`Forwarder::serve`] in a span that names the request id.
    pub fn service(
        self: Arc<Self>,
    ) -> impl hyper::service::Service<
        Request<RecvBody>,
        Response = Response<TunnelBody>,
        Error = std::convert::Infallible,
        Future: Send,
    > + Send
    + 'static {
        hyper::service::service_fn(move |req: Request<RecvBody>| {
            // At debug level: the forwarder's own lines name the request id, and a span per
            // request at info cost every request allocations and formatting in both log
            // layers even when nothing inside it logs (issue 19).
            let span = tracing::debug_span!(
                "stream",
                request_id = %req
                    .headers()
                    .get(proto::HEADER_REQUEST_ID)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("-")
            );
            tracing::Instrument::instrument(self.clone().serve(req), span)
        })
    }

    /// Serves one request that came through the tunnel.
    pub async fn serve(
        self: Arc<Self>,
        req: Request<RecvBody>,
    ) -> Result<Response<TunnelBody>, std::convert::Infallible> {
        let path = req.uri().path();
        let refusal = match allowlist::check(req.method().as_str(), path, self.allow_management) {
            Verdict::Allow(target) => {
                // Owned, so that the request can move on (the log line keeps it).
                let target = target.into_owned();
                return Ok(self.forward(req, target).await);
            }
            Verdict::ManagementDisabled => error(
                path,
                StatusCode::FORBIDDEN,
                &format!(
                    "{} (model management) is disabled on device {:?}; its owner can enable it with \
                     `allow_model_management = true` in cloudllmd's config",
                    quoted(path),
                    self.device_name
                ),
            ),
            Verdict::MethodNotAllowed(methods) => {
                let allow = methods.join(", ");
                let mut response = error(
                    path,
                    StatusCode::METHOD_NOT_ALLOWED,
                    &format!(
                        "{} does not take {}; it takes {allow}",
                        quoted(path),
                        quoted(req.method().as_str())
                    ),
                );
                if let Ok(value) = HeaderValue::from_str(&allow) {
                    response.headers_mut().insert(header::ALLOW, value);
                }
                response
            }
            Verdict::BadParam(err) => error(
                path,
                StatusCode::BAD_REQUEST,
                &format!("{} is not a valid request: {err}", quoted(path)),
            ),
            Verdict::NotExposed => error(
                path,
                StatusCode::FORBIDDEN,
                &format!("{} is not an endpoint cloudllm exposes", quoted(path)),
            ),
        };
        // The caller's method and path, escaped: they have not passed the allowlist.
        info!(
            request_id = req
                .headers()
                .get(proto::HEADER_REQUEST_ID)
                .and_then(|id| id.to_str().ok())
                .unwrap_or("-"),
            method = ?quoted(req.method().as_str()),
            path = ?quoted(path),
            status = refusal.status().as_u16(),
            "request refused"
        );
        Ok(refusal)
    }

    /// Forwards `req` to Ollama's `target` path (the allowlist's checked form, no query).
    async fn forward(&self, req: Request<RecvBody>, target: String) -> Response<TunnelBody> {
        let started = tokio::time::Instant::now();
        let in_flight = self.state.begin_request();
        let (mut parts, body) = req.into_parts();
        parts.uri = match format!("{}{target}", self.base_path).parse() {
            Ok(uri) => uri,
            Err(_) => return error(&target, StatusCode::BAD_REQUEST, "malformed request path"),
        };
        parts.version = http::Version::HTTP_11;
        parts.headers = forwarded_headers(std::mem::take(&mut parts.headers));
        parts.headers.insert(header::HOST, self.ollama_host.clone());
        let request_id = parts
            .headers
            .get(proto::HEADER_REQUEST_ID)
            .cloned()
            .unwrap_or(HeaderValue::from_static("-"));
        let mut line = RequestLine {
            request_id,
            method: parts.method.clone(),
            path: target,
            status: 0,
            started,
            headers_after: Duration::ZERO,
            bytes: 0,
            _in_flight: in_flight,
        };

        match self.upstream.send(Request::from_parts(parts, body)).await {
            Ok(response) => {
                line.status = response.status().as_u16();
                line.headers_after = started.elapsed();
                let (mut parts, body) = response.into_parts();
                strip_response(&mut parts.headers);
                // Tokens Ollama produced faster than they are sent go as one frame; the
                // request counts as in flight, and is logged, once its body ends or the caller
                // goes away.
                let body = Coalesce::new(body).map_frame(move |frame| {
                    // The whole line moves into the closure, not just the field it counts in.
                    let line = &mut line;
                    if let Some(data) = frame.data_ref() {
                        line.bytes += data.len() as u64;
                    }
                    frame
                });
                Response::from_parts(parts, body.map_err(Into::into).boxed())
            }
            Err(err) => {
                line.status = StatusCode::BAD_GATEWAY.as_u16();
                warn!(request_id = line.id(), path = %line.path, error = %err, "Ollama request failed");
                let cause = match &err {
                    upstream::Error::Http(err) => std::error::Error::source(err)
                        .map_or_else(|| err.to_string(), ToString::to_string),
                    other => other.to_string(),
                };
                error(
                    &line.path,
                    StatusCode::BAD_GATEWAY,
                    &format!(
                        "cannot reach Ollama at {} on device {:?} ({cause}). Start Ollama there (`ollama serve`) \
                         or point cloudllmd at it with CLOUDLLM_OLLAMA_URL",
                        self.ollama, self.device_name
                    ),
                )
            }
        }
    }
}

/// The log line of one forwarded request, written when it is dropped: once its response has
/// ended or the caller went away. The session writes a response's last frames before it drops
/// the response (see `mux::server`), so formatting the line never delays them: inline, before
/// the answer went out, it was the largest single cost on a request's path through the daemon
/// (issue 19).
struct RequestLine {
    request_id: HeaderValue,
    method: http::Method,
    path: String,
    /// Ollama's status; 0 until it answered.
    status: u16,
    started: tokio::time::Instant,
    /// Until Ollama's response head.
    headers_after: Duration,
    /// Response body bytes passed on.
    bytes: u64,
    /// The request counts as in flight as long as its line is not written.
    _in_flight: crate::state::RequestGuard,
}

impl RequestLine {
    /// The request id, visible ASCII only (`to_str`), so it cannot break a log line.
    fn id(&self) -> &str {
        self.request_id.to_str().unwrap_or("-")
    }
}

impl Drop for RequestLine {
    fn drop(&mut self) {
        info!(
            request_id = self.id(),
            method = %self.method,
            path = %self.path,
            status = self.status,
            bytes = self.bytes,
            headers_after = ?self.headers_after,
            took = ?self.started.elapsed(),
            "request"
        );
    }
}

/// The caller's headers that Ollama may see: [`FORWARDED_HEADERS`], nothing else.
fn forwarded_headers(mut headers: HeaderMap) -> HeaderMap {
    cloudllm_tunnel::headers::remove_hop_by_hop(&mut headers);
    cloudllm_tunnel::headers::keep_only(&mut headers, &FORWARDED_HEADERS);
    headers
}

/// `text` cut to [`MAX_QUOTED_BYTES`] for an error message (the JSON encoder escapes it).
fn quoted(text: &str) -> Cow<'_, str> {
    if text.len() <= MAX_QUOTED_BYTES {
        return Cow::Borrowed(text);
    }
    let mut end = MAX_QUOTED_BYTES;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    Cow::Owned(format!("{}…", &text[..end]))
}

/// Removes from Ollama's response the headers that never go back to the caller.
fn strip_response(headers: &mut HeaderMap) {
    cloudllm_tunnel::headers::remove_hop_by_hop(headers);
    for name in &STRIPPED_RESPONSE_HEADERS {
        headers.remove(name);
    }
    if headers
        .keys()
        .any(|k| k.as_str().starts_with("x-cloudllm-"))
    {
        let ours: Vec<header::HeaderName> = headers
            .keys()
            .filter(|k| k.as_str().starts_with("x-cloudllm-"))
            .cloned()
            .collect();
        for name in ours {
            headers.remove(name);
        }
    }
}

fn json(status: StatusCode, body: Bytes) -> Response<TunnelBody> {
    let mut response = Response::new(Full::new(body).map_err(|never| match never {}).boxed());
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

fn error(path: &str, status: StatusCode, message: &str) -> Response<TunnelBody> {
    let body = proto::api_error_body(path, status.is_server_error(), message);
    json(status, Bytes::from(body))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A header map of `(name, value)` pairs, in order, repeated names kept.
    fn header_map<const N: usize>(pairs: [(&'static str, &'static str); N]) -> HeaderMap {
        pairs
            .into_iter()
            .map(|(k, v)| {
                (
                    header::HeaderName::from_static(k),
                    HeaderValue::from_static(v),
                )
            })
            .collect()
    }

    #[test]
    fn only_the_allowlisted_request_headers_reach_ollama() {
        let kept = forwarded_headers(header_map([
            ("authorization", "Bearer x"),
            ("origin", "https://evil.example"),
            ("referer", "https://evil.example/page"),
            ("cookie", "a=b"),
            ("cookie2", "$Version=1"),
            ("connection", "keep-alive, x-custom-hop"),
            ("x-custom-hop", "1"),
            ("x-cloudllm-device", "laptop"),
            ("x-real-ip", "10.0.0.1"),
            ("x-api-key", "secret"),
            ("x-http-method-override", "DELETE"),
            ("x-original-url", "/api/delete"),
            ("x-forwarded-for", "10.0.0.1"),
            ("user-agent", "curl/8"),
            ("accept-encoding", "gzip"),
            ("expect", "100-continue"),
            ("content-type", "application/json"),
            ("content-length", "2"),
            ("accept", "application/x-ndjson"),
            ("x-request-id", "abc"),
        ]));
        let mut left: Vec<&str> = kept.keys().map(|k| k.as_str()).collect();
        left.sort_unstable();
        assert_eq!(
            left,
            ["accept", "content-length", "content-type", "x-request-id"]
        );
        assert_eq!(kept["x-request-id"], "abc");
    }

    #[test]
    fn response_headers_lose_hop_headers_and_the_relays_own() {
        let mut headers = header_map([
            ("connection", "close"),
            ("transfer-encoding", "chunked"),
            ("x-cloudllm-device", "spoofed"),
            ("content-type", "application/x-ndjson"),
            ("date", "Mon, 01 Jan 2026 00:00:00 GMT"),
        ]);
        strip_response(&mut headers);
        let mut left: Vec<&str> = headers.keys().map(|k| k.as_str()).collect();
        left.sort_unstable();
        assert_eq!(left, ["content-type", "date"]);
    }

    #[test]
    fn quoted_text_is_cut_on_a_char_boundary() {
        assert_eq!(quoted("TRACE"), "TRACE");
        let long = "X".repeat(5_000);
        assert_eq!(quoted(&long).len(), MAX_QUOTED_BYTES + '…'.len_utf8());
        let accents = "é".repeat(MAX_QUOTED_BYTES);
        assert!(quoted(&accents).ends_with('…'));
    }

    /// A burst of tokens that Ollama wrote at once leaves the daemon as a few 16 KiB frames,
    /// not one frame (one tunnel frame) per token, although hyper's
    /// HTTP/1 client hands the body over one chunk at a time. One thread, so that the count
    /// does not depend on how busy the machine is (12 frames here, loaded or not).
    #[tokio::test]
    async fn a_burst_from_ollama_leaves_as_a_few_large_frames() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};

        const LINES: usize = 2_000;
        let line = "{\"model\":\"m\",\"response\":\"token\",\"done\":false}\n";
        // An "Ollama" that answers with every line at once, each its own chunk.
        let ollama = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let ollama_url: Url = format!("http://{}", ollama.local_addr().unwrap())
            .parse()
            .unwrap();
        let mut response = String::from(
            "HTTP/1.1 200 OK\r\ncontent-type: application/x-ndjson\r\ntransfer-encoding: chunked\r\n\r\n",
        );
        for _ in 0..LINES {
            response.push_str(&format!("{:x}\r\n{line}\r\n", line.len()));
        }
        response.push_str("0\r\n\r\n");
        tokio::spawn(async move {
            let (mut conn, _) = ollama.accept().await.unwrap();
            let mut head = Vec::new();
            let mut byte = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") {
                conn.read_exact(&mut byte).await.unwrap();
                head.push(byte[0]);
            }
            conn.write_all(response.as_bytes()).await.unwrap();
            // Keep the connection open until the daemon has read it all.
            let _ = conn.read(&mut byte).await;
        });

        // The forwarder behind a real tunnel session over an in-memory WebSocket, as the
        // relay reaches it.
        let state = State::new("test".to_owned(), "file".to_owned());
        let forwarder =
            Arc::new(Forwarder::new(ollama_url, false, "test".to_owned(), state).unwrap());
        let (relay_end, daemon_end) = tokio::io::duplex(1 << 20);
        let relay_ws = tokio_tungstenite::WebSocketStream::from_raw_socket(
            relay_end,
            tokio_tungstenite::tungstenite::protocol::Role::Server,
            None,
        )
        .await;
        let daemon_ws = tokio_tungstenite::WebSocketStream::from_raw_socket(
            daemon_end,
            tokio_tungstenite::tungstenite::protocol::Role::Client,
            None,
        )
        .await;
        let liveness = cloudllm_tunnel::Liveness::default();
        let daemon_link = cloudllm_tunnel::Link::new(daemon_ws, liveness, Box::new(|_| {}));
        let stop = tokio_util::sync::CancellationToken::new();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| forwarder.clone().serve(req));
            let _ = cloudllm_tunnel::server::serve(daemon_link, service, &stop).await;
        });
        let relay_link = cloudllm_tunnel::Link::new(relay_ws, liveness, Box::new(|_| {}));
        let (sender, _cut, session) = cloudllm_tunnel::mux::client::connect(relay_link);
        tokio::spawn(session);
        let request = Request::post("/api/generate")
            .body(http_body_util::Empty::<Bytes>::new())
            .unwrap();
        let mut body = sender.send_request(request).await.unwrap().into_body();
        let (mut frames, mut bytes) = (0usize, 0usize);
        while let Some(frame) = body.frame().await {
            if let Ok(data) = frame.unwrap().into_data() {
                frames += 1;
                bytes += data.len();
            }
        }
        assert_eq!(bytes, LINES * line.len(), "every byte arrives");
        // 92 KB in 16 KiB frames is 6, more as the socket delivers it in pieces; one frame per
        // line would be 2,000.
        assert!(
            frames <= 100,
            "{LINES} lines came as {frames} frames: the burst was not merged"
        );
    }
}
