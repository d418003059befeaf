//! The daemon's HTTP/2 service: what the relay may ask through the tunnel.
//!
//! Every request is a user's, checked against the [allowlist](crate::allowlist) and forwarded to the local Ollama with its
//! body streamed both ways. Ollama refuses (403) requests whose `Host` is not local or that
//! carry an `Origin`, so the forwarder sets `Host` to Ollama's address and drops `Origin`,
//! `Referer`, credentials, cookies and hop-by-hop headers. When the relay resets the stream
//! (the user went away), hyper drops the response future or body, which closes the connection
//! to Ollama and stops the generation.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use cloudllm_proto as proto;
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode, header};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tracing::{info, warn};
use url::Url;

use cloudllm_tunnel::coalesce::Coalesce;

use crate::allowlist::{self, Verdict};
use crate::state::State;

/// Response body of the tunnel service.
pub type TunnelBody = BoxBody<Bytes, Box<dyn std::error::Error + Send + Sync>>;

/// Time to open a TCP connection to Ollama: it is local, so 5 s means it is not there.
const OLLAMA_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Request headers never passed to Ollama besides the hop-by-hop ones: the caller's
/// credentials and browser context (Ollama answers 403 to any `Origin` it does not know), and
/// forwarding metadata.
static STRIPPED_HEADERS: [header::HeaderName; 9] = [
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

/// Forwards tunnel requests to the local Ollama.
pub struct Forwarder {
    client: Client<HttpConnector, Incoming>,
    /// Ollama's URL without a trailing slash; request paths are appended to it.
    base: String,
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
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(OLLAMA_CONNECT_TIMEOUT));
        let client = Client::builder(TokioExecutor::new()).build(connector);
        let host = ollama
            .host_str()
            .ok_or_else(|| anyhow::anyhow!("Ollama URL {ollama} has no host"))?;
        let host = match ollama.port() {
            Some(port) => format!("{host}:{port}"),
            None => host.to_owned(),
        };
        Ok(Forwarder {
            client,
            base: ollama.as_str().trim_end_matches('/').to_owned(),
            state,
            ollama_host: HeaderValue::from_str(&host)?,
            ollama,
            allow_management,
            device_name,
        })
    }

    /// Serves one request that came through the tunnel.
    pub async fn serve(
        self: Arc<Self>,
        req: Request<Incoming>,
    ) -> Result<Response<TunnelBody>, std::convert::Infallible> {
        let path = req.uri().path().to_owned();
        match allowlist::check(&path, self.allow_management) {
            Verdict::Allow => Ok(self.forward(req).await),
            Verdict::ManagementDisabled => Ok(error(
                &path,
                StatusCode::FORBIDDEN,
                &format!(
                    "{path} (model management) is disabled on device {:?}; its owner can enable it with \
                     `allow_model_management = true` in cloudllmd's config",
                    self.device_name
                ),
            )),
            Verdict::NotExposed => Ok(error(
                &path,
                StatusCode::FORBIDDEN,
                &format!("{path} is not an endpoint cloudllm exposes"),
            )),
        }
    }

    async fn forward(&self, req: Request<Incoming>) -> Response<TunnelBody> {
        let started = tokio::time::Instant::now();
        let in_flight = self.state.begin_request();
        let (mut parts, body) = req.into_parts();
        let path = parts.uri.path().to_owned();
        let path_and_query = parts.uri.path_and_query().map_or("/", |p| p.as_str());
        parts.uri = match format!("{}{path_and_query}", self.base).parse() {
            Ok(uri) => uri,
            Err(_) => return error(&path, StatusCode::BAD_REQUEST, "malformed request path"),
        };
        parts.version = http::Version::HTTP_11;
        strip(&mut parts.headers);
        parts.headers.insert(header::HOST, self.ollama_host.clone());
        let method = parts.method.clone();

        match self.client.request(Request::from_parts(parts, body)).await {
            Ok(response) => {
                info!(
                    %method,
                    %path,
                    status = response.status().as_u16(),
                    headers_after = ?started.elapsed(),
                    "request"
                );
                let (mut parts, body) = response.into_parts();
                strip(&mut parts.headers);
                // Tokens Ollama produced faster than they are sent go as one frame; the
                // request counts as in flight until its body ends or the caller goes away.
                let body = Coalesce::new(body).map_frame(move |frame| {
                    let _ = &in_flight;
                    frame
                });
                Response::from_parts(parts, body.map_err(Into::into).boxed())
            }
            Err(err) => {
                warn!(%path, error = %err, "Ollama request failed");
                let cause = std::error::Error::source(&err)
                    .map_or_else(|| err.to_string(), ToString::to_string);
                error(
                    &path,
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

fn strip(headers: &mut HeaderMap) {
    cloudllm_tunnel::headers::remove_hop_by_hop(headers);
    for name in &STRIPPED_HEADERS {
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

    #[test]
    fn strip_removes_credentials_browser_context_and_hop_headers() {
        let mut headers = HeaderMap::new();
        for (k, v) in [
            ("authorization", "Bearer x"),
            ("origin", "https://evil.example"),
            ("referer", "https://evil.example/page"),
            ("cookie", "a=b"),
            ("connection", "keep-alive, x-custom-hop"),
            ("x-custom-hop", "1"),
            ("x-cloudllm-device", "laptop"),
            ("content-type", "application/json"),
            ("x-request-id", "abc"),
        ] {
            headers.insert(
                header::HeaderName::from_static(k),
                HeaderValue::from_static(v),
            );
        }
        strip(&mut headers);
        let mut left: Vec<&str> = headers.keys().map(|k| k.as_str()).collect();
        left.sort_unstable();
        assert_eq!(left, ["content-type", "x-request-id"]);
    }

    /// A burst of tokens that Ollama wrote at once leaves the daemon as a few 16 KiB frames,
    /// not one frame (one HTTP/2 frame and one tunnel message) per token, although hyper's
    /// HTTP/1 client hands the body over one chunk at a time. One thread, so that the count
    /// does not depend on how busy the machine is (12 frames here, loaded or not).
    #[tokio::test]
    async fn a_burst_from_ollama_leaves_as_a_few_large_frames() {
        use hyper_util::rt::TokioIo;
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

        // The forwarder behind an HTTP/1 server, so the test can send it a real request.
        let state = State::new("test".to_owned(), "file".to_owned());
        let forwarder =
            Arc::new(Forwarder::new(ollama_url, false, "test".to_owned(), state).unwrap());
        let front = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let front_addr = front.local_addr().unwrap();
        tokio::spawn(async move {
            let (conn, _) = front.accept().await.unwrap();
            let service = hyper::service::service_fn(move |req| forwarder.clone().serve(req));
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(conn), service)
                .await;
        });

        let stream = tokio::net::TcpStream::connect(front_addr).await.unwrap();
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .unwrap();
        tokio::spawn(conn);
        let request = Request::post("/api/generate")
            .header(header::HOST, "daemon")
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
