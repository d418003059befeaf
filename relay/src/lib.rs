//! cloudllm-relay: the cloud side of cloudllm.
//!
//! Daemons dial in on `/tunnel` (one WebSocket each, HTTP/2 inside); users call the Ollama API
//! (`/api/*`) and the OpenAI-compatible API (`/v1/*`) with a bearer token, and each request is
//! streamed to one of that user's own devices. The relay stores nothing: its only state is the
//! set of live tunnels (and, with `[jwks]`, a cache of the identity provider's public keys).

pub mod audit;
pub mod auth;
pub mod config;
pub mod jwks;
mod proxy;
pub mod registry;
pub mod tls;
mod tunnel;
mod well_known;

use std::future::{Future, IntoFuture};
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
    registry: Arc<Registry>,
    /// Cancelled when the relay starts shutting down.
    shutdown: CancellationToken,
    /// The tunnel tasks, so shutdown can wait for them to drain.
    tasks: TaskTracker,
}

/// A running relay.
pub struct Relay {
    /// The address it listens on (useful with port 0).
    pub addr: SocketAddr,
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
pub async fn serve(config: RelayConfig, shutdown: CancellationToken) -> anyhow::Result<Relay> {
    config.validate()?;
    let jwks = config.jwks.as_ref().map(Jwks::new).transpose()?;
    let keys = Keys::verifying(config.secret.as_ref(), jwks.clone());
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
    let grace = config.shutdown_grace;
    let registry = Arc::new(Registry::default());
    let (audit, audit_writer) = match &config.audit_log {
        Some(target) => {
            let (audit, writer) = audit::Audit::open(&audit::Target::parse(target)).await?;
            (audit, Some(writer))
        }
        None => (audit::Audit::disabled(), None),
    };
    let state = Arc::new(AppState {
        config,
        audit,
        jwks: jwks.clone(),
        keys,
        registry: registry.clone(),
        shutdown: shutdown.clone(),
        tasks: TaskTracker::new(),
    });
    if let Some(jwks) = jwks {
        state
            .tasks
            .spawn(jwks.run(shutdown.clone()).instrument(info_span!("jwks")));
    }
    let app = router(state.clone()).into_make_service_with_connect_info::<SocketAddr>();
    let stop_accepting = shutdown.clone().cancelled_owned();
    // `tap_io` also gives the connection's peer address to `ConnectInfo` for any listener.
    let server: Pin<Box<dyn Future<Output = std::io::Result<()>> + Send>> = match &tls {
        Some(tls) => Box::pin(
            axum::serve(tls.listener(listener)?.tap_io(|_| {}), app)
                .with_graceful_shutdown(stop_accepting)
                .into_future(),
        ),
        None => Box::pin(
            axum::serve(
                listener.tap_io(|tcp| {
                    // Without it, the last small write of each stream waits ~40 ms for Nagle.
                    let _ = tcp.set_nodelay(true);
                }),
                app,
            )
            .with_graceful_shutdown(stop_accepting)
            .into_future(),
        ),
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
        registry,
        done,
        tls,
    })
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

fn router(state: Arc<AppState>) -> Router {
    Router::new()
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
