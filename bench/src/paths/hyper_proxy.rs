//! The reference the relay and the daemon are held to: a minimal HTTP/1 reverse proxy on hyper
//! (the library cloudllm is built on), two of them chained. Each accepts HTTP/1 connections
//! (`TCP_NODELAY`), hands every request to a pooled hyper client (`TCP_NODELAY`, keep-alive)
//! for its upstream, and streams the answer back: the HTTP work that the relay and the daemon
//! each do per request, without auth, limits, routing or a tunnel.
//!
//! [`serve`] is the proxy; `cloudllm-bench-proxy` runs it in a process of its own, and
//! [`start_pair`] chains two such processes in front of the backend.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode, Uri};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::TcpListener;
use tokio::process::Command;
use tokio::time::timeout;

use super::{Kind, Process, Running, START_TIMEOUT};
use crate::client::Target;
use crate::scratch::Scratch;

/// What the proxy prints on stdout, followed by its address, once it listens.
pub const READY_PREFIX: &str = "listening on ";

/// Pause after a failed `accept` (out of file descriptors, say) before the next one.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(10);

/// The proxy's answer body: the upstream's, streamed, or its own error.
type ProxyBody = Either<Incoming, Full<Bytes>>;

/// Serves HTTP/1 on `listener`, forwarding every request to `upstream`, until the process
/// ends.
pub async fn serve(listener: TcpListener, upstream: SocketAddr) {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    let client: Client<HttpConnector, Incoming> =
        Client::builder(TokioExecutor::new()).build(connector);
    let authority = upstream.to_string();
    loop {
        let tcp = match listener.accept().await {
            Ok((tcp, _)) => tcp,
            Err(err) => {
                tracing::warn!(error = %err, "accept failed");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let (client, authority) = (client.clone(), authority.clone());
        tokio::spawn(async move {
            let service = service_fn(move |req| forward(req, client.clone(), authority.clone()));
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tcp), service)
                .await;
        });
    }
}

/// Sends `req` to the upstream at `authority` and returns its answer (502 if it failed).
async fn forward(
    mut req: Request<Incoming>,
    client: Client<HttpConnector, Incoming>,
    authority: String,
) -> Result<Response<ProxyBody>, Infallible> {
    let path = req.uri().path_and_query().map_or("/", |p| p.as_str());
    let uri = Uri::builder()
        .scheme("http")
        .authority(authority.as_str())
        .path_and_query(path)
        .build();
    let Ok(uri) = uri else {
        return Ok(error(StatusCode::BAD_REQUEST));
    };
    *req.uri_mut() = uri;
    Ok(match client.request(req).await {
        Ok(response) => response.map(Either::Left),
        Err(_) => error(StatusCode::BAD_GATEWAY),
    })
}

fn error(status: StatusCode) -> Response<ProxyBody> {
    let mut response = Response::new(Either::Right(Full::new(Bytes::new())));
    *response.status_mut() = status;
    response
}

/// Starts two proxy processes (`binary`, i.e. `cloudllm-bench-proxy`) chained in front of
/// `backend` and waits until a request goes through both.
pub async fn start_pair(binary: &Path, backend: SocketAddr) -> anyhow::Result<Running> {
    let scratch = Scratch::create("compare-hyper")?;
    let (back, back_addr) = start_one(binary, "hyper proxy 2 (back)", backend, &scratch.0).await?;
    let (front, front_addr) =
        start_one(binary, "hyper proxy 1 (front)", back_addr, &scratch.0).await?;
    Running {
        kind: Kind::Hyper,
        target: Target::direct(front_addr)?,
        processes: vec![front, back],
        about: "HTTP/1 server → pooled hyper client, TCP_NODELAY, 2 tokio workers each".into(),
        scratch: Some(scratch),
    }
    .ready()
    .await
}

/// Starts one proxy to `upstream` on a port of its choosing; returns it and its address.
async fn start_one(
    binary: &Path,
    label: &str,
    upstream: SocketAddr,
    dir: &Path,
) -> anyhow::Result<(Process, SocketAddr)> {
    let log = dir.join(format!("proxy-{}.log", upstream.port()));
    let mut command = Command::new(binary);
    command
        .arg("--listen")
        .arg("127.0.0.1:0")
        .arg("--upstream")
        .arg(upstream.to_string());
    let mut process = Process::spawn_piped(label, &mut command, &log)?;
    let stdout = process.stdout().context("the proxy's stdout")?;
    let mut line = String::new();
    let read = timeout(START_TIMEOUT, BufReader::new(stdout).read_line(&mut line)).await;
    let addr = line
        .trim()
        .strip_prefix(READY_PREFIX)
        .and_then(|a| a.parse::<SocketAddr>().ok());
    match (read, addr) {
        (Ok(Ok(_)), Some(addr)) => Ok((process, addr)),
        _ => anyhow::bail!(
            "{label} did not report its address within {START_TIMEOUT:?}; its log:\n{}",
            process.log_tail()
        ),
    }
}

#[cfg(test)]
mod tests {
    use tokio_util::sync::CancellationToken;

    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn two_chained_proxies_carry_requests_and_streams() {
        let stop = CancellationToken::new();
        let backend = crate::backend::serve(stop.clone()).await.unwrap();
        let mut upstream = backend;
        for _ in 0..2 {
            let listener = TcpListener::bind(("127.0.0.1", 0)).await.unwrap();
            let addr = listener.local_addr().unwrap();
            tokio::spawn(serve(listener, upstream));
            upstream = addr;
        }
        let mut conn = Target::direct(upstream).unwrap().connect().await.unwrap();
        timeout(Duration::from_secs(10), async {
            conn.version().await.unwrap();
            let lines = conn.generate(50, Duration::ZERO).await.unwrap();
            assert_eq!(lines.len(), 50);
            conn.version().await.unwrap();
        })
        .await
        .expect("requests through two proxies finished");
        stop.cancel();
    }
}
