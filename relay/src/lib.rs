//! cloudllm-relay: the cloud side of cloudllm.
//!
//! Daemons dial in on `/tunnel` (one WebSocket each, HTTP/2 inside); users call the Ollama API
//! (`/api/*`) and the OpenAI-compatible API (`/v1/*`) with a bearer token, and each request is
//! streamed to one of that user's own devices. The relay stores nothing: its only state is the
//! set of live tunnels (and, with `[jwks]`, a cache of the identity provider's public keys).

pub mod audit;
pub mod auth;
mod client_addr;
pub mod config;
pub mod jwks;
pub mod limits;
pub mod memory;
pub mod metrics;
mod proxy;
pub mod registry;
pub mod tls;
mod tunnel;
mod well_known;

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;

use anyhow::Context;
use axum::Router;
use axum::response::IntoResponse;
use axum::routing::{any, get};
use axum::serve::ListenerExt;
use http::StatusCode;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, info, info_span, warn};

pub use auth::{Keys, Scope, Scopes};
pub use config::{JwksConfig, LoginConfig, RelayConfig, TlsConfig};
use jwks::Jwks;
use registry::Registry;

/// What every request handler shares.
struct AppState {
    config: RelayConfig,
    audit: audit::Audit,
    /// The identity provider's keys, when `[jwks]` is configured (for readiness).
    jwks: Option<Arc<Jwks>>,
    keys: Keys,
    limits: Arc<limits::Limits>,
    metrics: Arc<metrics::Metrics>,
    registry: Arc<Registry>,
    /// Cancelled when the relay starts shutting down.
    shutdown: CancellationToken,
    /// The tunnel tasks, so shutdown can wait for them to drain.
    tasks: TaskTracker,
    /// Gives the memory of closed sessions and tunnels back to the system.
    trimmer: Arc<memory::Trimmer>,
}

impl AppState {
    /// Counts a refusal by a limit in the metrics and the audit log.
    fn record_refusal(
        &self,
        user: Option<&str>,
        addr: Option<std::net::IpAddr>,
        route: &'static str,
        refusal: &limits::Refusal,
    ) {
        self.metrics.limited(refusal.limit);
        self.audit.record(audit::Event::RateLimited {
            user: user.map(str::to_owned),
            limit: refusal.limit.as_str(),
            route,
            addr,
        });
    }
}

/// A running relay.
pub struct Relay {
    /// The address it listens on (useful with port 0).
    pub addr: SocketAddr,
    /// The address `/metrics` is served on when `metrics_listen` is set.
    pub metrics_addr: Option<SocketAddr>,
    /// The connected devices.
    pub registry: Arc<Registry>,
    /// Completes once the relay has shut down and every tunnel has drained.
    pub done: JoinHandle<anyhow::Result<()>>,
    /// The certificate it serves, with `[tls]`: [`tls::Tls::reload`] reads the files again.
    pub tls: Option<tls::Tls>,
}

/// Starts the relay on `config.listen` and runs it until `shutdown` is cancelled. Then it stops
/// accepting, asks every daemon to drain, and lets in-flight streams finish within
/// `config.shutdown_grace`.
///
/// Refuses to start without a way to verify tokens (a secret or `[jwks]`). With `[jwks]`, the
/// identity provider's keys are fetched in the background: the relay starts even while the
/// provider is unreachable.
pub async fn serve(mut config: RelayConfig, shutdown: CancellationToken) -> anyhow::Result<Relay> {
    config.apply_presets()?;
    config.validate()?;
    let jwks = config.jwks.as_ref().map(Jwks::new).transpose()?;
    let keys =
        Keys::verifying(config.secret.as_ref(), jwks.clone()).with_rules(config.claim_rules());
    if let Some(jwks_config) = &config.jwks
        && jwks_config.url.scheme() == "http"
        && !jwks_config.url.host_str().is_some_and(is_loopback)
    {
        warn!(url = %jwks_config.url, "[jwks] url is plain http: anyone on the path can swap the keys; use https");
    }
    let tls = config.tls.as_ref().map(tls::Tls::new).transpose()?;
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("listening on {}", config.listen))?;
    let addr = listener.local_addr()?;
    let metrics_listener = match config.metrics_listen {
        Some(metrics_addr) => Some(
            tokio::net::TcpListener::bind(metrics_addr)
                .await
                .with_context(|| format!("listening on {metrics_addr} (metrics_listen)"))?,
        ),
        None => None,
    };
    let grace = config.shutdown_grace;
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(config.tcp_keepalive)
        .with_interval(config.tcp_keepalive);
    let registry = Arc::new(Registry::default());
    let (audit, audit_writer) = match &config.audit_log {
        Some(target) => {
            let (audit, writer) = audit::Audit::open(&audit::Target::parse(target)).await?;
            (audit, Some(writer))
        }
        None => (audit::Audit::disabled(), None),
    };
    let limits = Arc::new(limits::Limits::new(&config));
    let state = Arc::new(AppState {
        config,
        audit,
        jwks: jwks.clone(),
        keys,
        limits: limits.clone(),
        metrics: Arc::default(),
        registry: registry.clone(),
        shutdown: shutdown.clone(),
        tasks: TaskTracker::new(),
        trimmer: Arc::default(),
    });
    state
        .tasks
        .spawn(state.trimmer.clone().run(shutdown.clone()));
    if let Some(jwks) = jwks {
        state
            .tasks
            .spawn(jwks.run(shutdown.clone()).instrument(info_span!("jwks")));
    }
    state.tasks.spawn(prune(limits, shutdown.clone()));
    let metrics_addr = match metrics_listener {
        Some(metrics_listener) => {
            let metrics_addr = metrics_listener.local_addr()?;
            let app = Router::new()
                .route("/metrics", get(metrics))
                .with_state(state.clone());
            let stop = shutdown.clone();
            state.tasks.spawn(async move {
                let served = axum::serve(metrics_listener, app)
                    .with_graceful_shutdown(stop.cancelled_owned())
                    .await;
                if let Err(err) = served {
                    warn!(error = %err, "metrics listener failed");
                }
            });
            info!(addr = %metrics_addr, "metrics listening");
            Some(metrics_addr)
        }
        None => None,
    };
    let app = router(state.clone(), metrics_addr.is_none());
    let read_timeout = state.config.client_read_timeout;
    let server: Pin<Box<dyn Future<Output = std::io::Result<()>> + Send>> = match &tls {
        Some(tls) => Box::pin(serve_http(
            tls.listener(listener, keepalive)?,
            app,
            read_timeout,
            shutdown.clone(),
        )),
        None => Box::pin(serve_http(
            listener.tap_io(move |tcp| tune_socket(tcp, &keepalive)),
            app,
            read_timeout,
            shutdown.clone(),
        )),
    };
    let done = tokio::spawn(async move {
        let tunnels = async {
            state.shutdown.cancelled().await;
            state.tasks.close();
            state.tasks.wait().await;
        };
        let (served, ()) = tokio::join!(async { server.await.context("serving") }, async {
            // Tunnel tasks bound their own drain by the grace period; this is a backstop.
            let _ = tokio::time::timeout(grace * 2, tunnels).await;
        });
        // Every handle to the audit log is gone with the state: the writer flushes and ends.
        drop(state);
        if let Some(writer) = audit_writer {
            let _ = tokio::time::timeout(std::time::Duration::from_secs(5), writer).await;
        }
        info!("relay stopped");
        served
    });
    info!(%addr, tls = tls.is_some(), "relay listening");
    Ok(Relay {
        addr,
        metrics_addr,
        registry,
        done,
        tls,
    })
}

/// Serves HTTP/1.1 (with upgrades, for `/tunnel`) on `listener` until `stop`, then lets open
/// connections finish their requests, as `axum::serve`'s graceful shutdown does. Unlike
/// `axum::serve`, it bounds slow clients: a connection that has not sent a whole request head
/// within `read_timeout` (a slowloris, or an idle keep-alive connection) is closed.
async fn serve_http<L>(
    mut listener: L,
    app: Router,
    read_timeout: std::time::Duration,
    stop: CancellationToken,
) -> std::io::Result<()>
where
    L: axum::serve::Listener<Addr = SocketAddr>,
{
    use hyper_util::rt::{TokioIo, TokioTimer};
    let connections = TaskTracker::new();
    loop {
        let (io, peer) = tokio::select! {
            accepted = listener.accept() => accepted,
            () = stop.cancelled() => break,
        };
        // The handlers read the peer address as `ConnectInfo`, as with axum's own server.
        let service = hyper_util::service::TowerToHyperService::new(
            app.clone()
                .layer(axum::Extension(axum::extract::ConnectInfo(peer))),
        );
        let stop = stop.clone();
        connections.spawn(async move {
            // HTTP/1.1 only (TLS offers no other protocol either): hyper-util's automatic
            // version detection would wait for the first bytes without any timeout.
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(read_timeout)
                .serve_connection(TokioIo::new(io), service)
                .with_upgrades();
            tokio::pin!(connection);
            let served = tokio::select! {
                served = connection.as_mut() => served,
                () = stop.cancelled() => {
                    connection.as_mut().graceful_shutdown();
                    connection.await
                }
            };
            if let Err(err) = served {
                tracing::debug!(error = %err, %peer, "connection ended with an error");
            }
        });
    }
    drop(listener);
    connections.close();
    connections.wait().await;
    Ok(())
}

/// Socket options for every accepted connection, plain or TLS.
fn tune_socket(tcp: &tokio::net::TcpStream, keepalive: &socket2::TcpKeepalive) {
    // Without it, the last small write of each stream waits ~40 ms for Nagle.
    let _ = tcp.set_nodelay(true);
    // Probes keep NAT and firewall state alive while a request waits for its first token.
    let _ = socket2::SockRef::from(tcp).set_tcp_keepalive(keepalive);
}

/// Prunes idle limiter state every [`limits::PRUNE_INTERVAL`] until shutdown.
async fn prune(limits: Arc<limits::Limits>, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(limits::PRUNE_INTERVAL);
    loop {
        tokio::select! {
            _ = tick.tick() => limits.prune(),
            () = shutdown.cancelled() => return,
        }
    }
}

/// `GET /metrics`: Prometheus text.
async fn metrics(
    axum::extract::State(state): axum::extract::State<Arc<AppState>>,
) -> axum::response::Response {
    let text = state.metrics.encode(state.registry.len());
    ([(http::header::CONTENT_TYPE, metrics::CONTENT_TYPE)], text).into_response()
}

/// `GET /readyz`: 200 while the relay takes traffic; 503 once it is draining, or while the
/// identity provider's keys have not been fetched yet (every provider token would fail).
async fn readyz(
    axum::extract::State(state): axum::extract::State<Arc<AppState>>,
) -> axum::response::Response {
    let not_ready = if state.shutdown.is_cancelled() {
        Some("draining: shutting down\n")
    } else if state.jwks.as_ref().is_some_and(|jwks| jwks.is_empty()) {
        Some("waiting for the identity provider's keys ([jwks] url)\n")
    } else {
        None
    };
    match not_ready {
        Some(reason) => (StatusCode::SERVICE_UNAVAILABLE, reason).into_response(),
        None => (StatusCode::OK, "ready\n").into_response(),
    }
}

fn router(state: Arc<AppState>, with_metrics: bool) -> Router {
    let router = if with_metrics {
        Router::new().route("/metrics", get(metrics))
    } else {
        Router::new()
    };
    router
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route(cloudllm_proto::WELL_KNOWN_PATH, get(well_known::get))
        .route(cloudllm_proto::TUNNEL_PATH, get(tunnel::accept))
        .route("/api/{*rest}", any(proxy::forward))
        .route("/v1/{*rest}", any(proxy::forward))
        .fallback(|| async {
            (
                StatusCode::NOT_FOUND,
                [(http::header::CONTENT_TYPE, "application/json")],
                cloudllm_proto::ollama_error(
                    "not found: this relay serves the Ollama API under /api/ and the OpenAI API under /v1/",
                ),
            )
                .into_response()
        })
        .with_state(state)
}

fn is_loopback(host: &str) -> bool {
    host == "localhost"
        || host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}
