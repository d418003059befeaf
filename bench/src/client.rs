//! The load generator's HTTP client: one hyper 1 HTTP/1 connection per [`Conn`], kept alive,
//! with `TCP_NODELAY`. No pool and no client library in the measurement path, so both the
//! direct and the tunnelled figures carry exactly the same client cost.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::time::{Instant, timeout};

/// Bound on every single step of a request (connect, handshake, headers, one body chunk):
/// 10 s, orders of magnitude above any healthy step on loopback.
pub const STEP: Duration = Duration::from_secs(10);

/// Largest error body read into an error message.
const MAX_ERROR_BODY: usize = 4 * 1024;

/// Largest `/api/version` body accepted.
const MAX_SMALL_BODY: usize = 64 * 1024;

/// Where requests go: the fake backend itself, or the relay with a client token.
#[derive(Clone)]
pub struct Target {
    addr: SocketAddr,
    host: HeaderValue,
    authorization: Option<HeaderValue>,
    /// `x-cloudllm-device`: which of the user's devices serves the requests.
    device: Option<HeaderValue>,
}

impl Target {
    /// Straight to the backend at `addr`.
    pub fn direct(addr: SocketAddr) -> anyhow::Result<Target> {
        Ok(Target {
            addr,
            host: HeaderValue::from_str(&addr.to_string())?,
            authorization: None,
            device: None,
        })
    }

    /// Through the relay at `addr`, as the user of `client_token`.
    pub fn through(addr: SocketAddr, client_token: &str) -> anyhow::Result<Target> {
        let mut authorization = HeaderValue::from_str(&format!("Bearer {client_token}"))
            .context("client token is not a valid header value")?;
        authorization.set_sensitive(true);
        Ok(Target {
            authorization: Some(authorization),
            ..Target::direct(addr)?
        })
    }

    /// The same target, asking the relay for the device named `device`.
    pub fn with_device(mut self, device: &str) -> anyhow::Result<Target> {
        self.device = Some(HeaderValue::from_str(device).context("device name")?);
        Ok(self)
    }

    /// Opens one keep-alive connection.
    pub async fn connect(&self) -> anyhow::Result<Conn> {
        let tcp = timeout(STEP, TcpStream::connect(self.addr))
            .await
            .with_context(|| format!("connecting to {} timed out", self.addr))?
            .with_context(|| format!("connecting to {}", self.addr))?;
        tcp.set_nodelay(true)?;
        let (sender, connection) = timeout(
            STEP,
            hyper::client::conn::http1::handshake(TokioIo::new(tcp)),
        )
        .await
        .context("HTTP/1 handshake timed out")?
        .context("HTTP/1 handshake")?;
        // Ends when the sender is dropped or the peer closes.
        tokio::spawn(async move {
            let _ = connection.await;
        });
        Ok(Conn {
            target: self.clone(),
            sender,
        })
    }
}

/// One keep-alive HTTP/1 connection; requests on it run one after the other.
pub struct Conn {
    target: Target,
    sender: SendRequest<Full<Bytes>>,
}

impl Conn {
    /// `GET /api/version`, body read to the end.
    pub async fn version(&mut self) -> anyhow::Result<()> {
        let response = self.send(Method::GET, "/api/version", Bytes::new()).await?;
        let body = timeout(
            STEP,
            Limited::new(response.into_body(), MAX_SMALL_BODY).collect(),
        )
        .await
        .context("reading /api/version timed out")?
        .map_err(|err| anyhow::anyhow!("reading /api/version: {err}"))?
        .to_bytes();
        ensure!(!body.is_empty(), "/api/version answered an empty body");
        Ok(())
    }

    /// `POST /api/generate` for `lines` lines `delay` apart. Returns when each line arrived
    /// (lines that came in one chunk share an instant). Fails unless exactly `lines` lines came.
    pub async fn generate(
        &mut self,
        lines: usize,
        delay: Duration,
    ) -> anyhow::Result<Vec<Instant>> {
        let body = serde_json::json!({
            "model": "bench",
            "prompt": "bench",
            "stream": true,
            "lines": lines,
            "delay_ms": delay.as_millis(),
        });
        let response = self.start("/api/generate", &body, None).await?;
        // A paced stream legitimately pauses `delay` between chunks.
        let arrivals = read_lines(response, STEP + delay, |_| Ok(())).await?;
        ensure!(
            arrivals.len() == lines,
            "stream ended after {} of {lines} lines",
            arrivals.len()
        );
        Ok(arrivals)
    }

    /// `POST path` with a JSON body (and an `x-request-id` if given); returns the response
    /// once its headers are in, failing unless it is 200.
    pub async fn start(
        &mut self,
        path: &str,
        body: &serde_json::Value,
        request_id: Option<&str>,
    ) -> anyhow::Result<Response<Incoming>> {
        let id = request_id
            .map(HeaderValue::from_str)
            .transpose()
            .context("request id")?;
        self.send_with(Method::POST, path, Bytes::from(body.to_string()), id)
            .await
    }

    async fn send(
        &mut self,
        method: Method,
        path: &str,
        body: Bytes,
    ) -> anyhow::Result<Response<Incoming>> {
        self.send_with(method, path, body, None).await
    }

    async fn send_with(
        &mut self,
        method: Method,
        path: &str,
        body: Bytes,
        request_id: Option<HeaderValue>,
    ) -> anyhow::Result<Response<Incoming>> {
        let mut request = Request::builder()
            .method(method)
            .uri(path)
            .header(header::HOST, self.target.host.clone());
        if !body.is_empty() {
            request = request.header(header::CONTENT_TYPE, "application/json");
        }
        if let Some(authorization) = &self.target.authorization {
            request = request.header(header::AUTHORIZATION, authorization.clone());
        }
        if let Some(device) = &self.target.device {
            request = request.header(cloudllm_proto::HEADER_DEVICE, device.clone());
        }
        if let Some(id) = request_id {
            request = request.header(cloudllm_proto::HEADER_REQUEST_ID, id);
        }
        let request = request.body(Full::new(body))?;
        timeout(STEP, self.sender.ready())
            .await
            .context("waiting for the connection timed out")?
            .context("connection closed")?;
        let response = timeout(STEP, self.sender.send_request(request))
            .await
            .with_context(|| format!("{path}: no response headers within {STEP:?}"))?
            .with_context(|| format!("{path}: request failed"))?;
        if response.status() != StatusCode::OK {
            let status = response.status();
            let text = match timeout(
                STEP,
                Limited::new(response.into_body(), MAX_ERROR_BODY).collect(),
            )
            .await
            {
                Ok(Ok(body)) => String::from_utf8_lossy(&body.to_bytes()).into_owned(),
                _ => String::from("(body unreadable)"),
            };
            bail!("{path}: HTTP {status}: {text}");
        }
        Ok(response)
    }
}

/// Reads a streamed body to its end, noting when each line arrived (lines that came in one
/// chunk share an instant) and handing each chunk to `check`. Fails if a chunk takes longer
/// than `per_chunk`, the body breaks, or `check` fails.
pub async fn read_lines(
    response: Response<Incoming>,
    per_chunk: Duration,
    mut check: impl FnMut(&[u8]) -> anyhow::Result<()>,
) -> anyhow::Result<Vec<Instant>> {
    let mut body = response.into_body();
    let mut arrivals = Vec::new();
    while let Some(frame) = timeout(per_chunk, body.frame())
        .await
        .with_context(|| format!("stream stalled after {} lines", arrivals.len()))?
    {
        let frame =
            frame.with_context(|| format!("stream broke after {} lines", arrivals.len()))?;
        if let Some(data) = frame.data_ref() {
            let now = Instant::now();
            let newlines = data.iter().filter(|&&b| b == b'\n').count();
            arrivals.extend(std::iter::repeat_n(now, newlines));
            check(data)?;
        }
    }
    Ok(arrivals)
}
