//! cloudllm-relay: the cloud side of cloudllm.
//!
//! Daemons dial in on `/tunnel` (one WebSocket each, HTTP/2 inside); users call the Ollama API
//! (`/api/*`) and the OpenAI-compatible API (`/v1/*`) with a bearer token, and each request is
//! streamed to one of that user's own devices. The relay stores nothing: its only state is the
//! set of live tunnels (and, with `[jwks]`, a cache of the identity provider's public keys).
//!
//! The modules, in the order a request meets them:
//! - `server` accepts connections ([`tls`] terminates TLS) under the caps on unauthenticated
//!   connections ([`connections`]) and serves HTTP/1.1 on them, plain TCP thread-per-core
//!   with each request on the thread of the tunnel or lane that carries it (`shards`);
//!   `client_addr` finds the client's address behind trusted proxies, `request_id` tags every
//!   request (an in-place layer, `around`, as `cors` is).
//! - `admission` lets a caller in, the same way on every route: the address's failure budget
//!   ([`limits`]), the token ([`auth`], with an identity provider's keys from [`jwks`]), the
//!   tier ([`config`]).
//! - `tunnel` serves `/tunnel`: daemons' tunnels, kept in the [`registry`] of devices, and
//!   busy tunnels' lanes (one more connection per thread).
//! - `proxy` serves `/api/*` and `/v1/*`: each request routed to one of the caller's devices
//!   (taken from the connection straight to `proxy::ApiEntry`, not through axum's router).
//! - [`web`] serves the web page at `/` ([`cors`] opens the API to other origins), and
//!   `well_known` tells clients how to log in.
//! - Beside them: the [`audit`] log, [`metrics`], and [`memory`], which gives freed memory back.
//! - With `[cluster]`, [`cluster`] makes the relay one node of several sharing Redis/Valkey:
//!   presence of the devices each node holds, node-to-node forwarding (`cluster::peer`),
//!   cluster-wide limits and a PUB/SUB control channel. Without it nothing of it runs.
//!
//! This file wires them together: [`serve`] starts a relay and the router maps routes to them.

mod admission;
mod around;
pub mod audit;
pub mod auth;
mod client_addr;
pub mod cluster;
pub mod config;
pub mod connections;
pub mod cors;
pub mod jwks;
pub mod limits;
pub mod memory;
pub mod metrics;
mod proxy;
pub mod registry;
mod request_id;
mod server;
mod shards;
pub mod tls;
mod tunnel;
pub mod web;
mod well_known;

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;

use anyhow::Context;
use axum::Router;
use axum::response::IntoResponse;
use axum::routing::get;
use http::StatusCode;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, info, info_span, warn};

pub(crate) use admission::Denied;
pub use auth::{Keys, Scope, Scopes};
pub use config::{JwksConfig, LoginConfig, RelayConfig, TlsConfig, WebLoginConfig};
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
    /// This node's part in a cluster, with `[cluster]`.
    cluster: Option<Arc<cluster::Cluster>>,
    /// The shards busy devices are asked to open lanes to (`tunnel::lane`): the shard count
    /// when plain HTTP is served on more than one and the relay runs alone, else 0.
    lanes: usize,
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
    /// With `[cluster]`: this node's part in the cluster, and where its peer listener is.
    pub cluster: Option<(Arc<cluster::Cluster>, SocketAddr)>,
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
    let max_unauthenticated =
        connections::unauthenticated_cap(config.max_unauthenticated_connections);
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
    let audit = match &config.cluster {
        Some(cluster) => audit.with_node(&cluster.node),
        None => audit,
    };
    let limits = Arc::new(limits::Limits::new(&config));
    let mut counters = metrics::Metrics::default();
    if config.cluster.is_some() {
        counters.register_cluster();
    }
    let counters = Arc::new(counters);
    let gate = connections::Gate::new(
        config.max_unauthenticated_connections_per_address,
        max_unauthenticated,
        config.trusted_proxies.clone(),
        counters.clone(),
    );
    let tasks = TaskTracker::new();
    let cluster = match &config.cluster {
        Some(cluster_config) => {
            let listener = cluster::peer::bind(cluster_config.peer_listen).await?;
            let peer_addr = listener.local_addr()?;
            let advertise = cluster_config.advertised(peer_addr)?;
            let cluster = cluster::Cluster::start(
                cluster_config,
                advertise,
                registry.clone(),
                counters.clone(),
                (&tasks, &shutdown),
            )?;
            Some((cluster, listener, peer_addr))
        }
        None => None,
    };
    let (cluster, peer) = match cluster {
        Some((cluster, listener, addr)) => (Some(cluster), Some((listener, addr))),
        None => (None, None),
    };
    // Plain TCP is served thread-per-core (`shards`); TLS on this runtime.
    let threads = match (&tls, config.threads) {
        (Some(_), _) => 0,
        (None, 0) => std::thread::available_parallelism().map_or(1, usize::from),
        (None, threads) => threads,
    };
    // In a cluster a lane's upgrade could reach another node than its tunnel's.
    let lanes = if threads > 1 && cluster.is_none() {
        threads
    } else {
        0
    };
    let state = Arc::new(AppState {
        lanes,
        config,
        audit,
        jwks: jwks.clone(),
        keys,
        limits: limits.clone(),
        metrics: counters,
        registry: registry.clone(),
        shutdown: shutdown.clone(),
        tasks,
        trimmer: Arc::default(),
        cluster: cluster.clone(),
    });
    let peer_addr = match peer {
        Some((listener, addr)) => {
            state.tasks.spawn(cluster::peer::serve(
                state.clone(),
                listener,
                shutdown.clone(),
            ));
            info!(%addr, "peer listener for the other nodes");
            Some(addr)
        }
        None => None,
    };
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
    let cors = Arc::new(cors::Cors::new(&state.config.allowed_origins)?);
    let api = proxy::ApiEntry::new(state.clone(), cors);
    let app = router(state.clone(), metrics_addr.is_none())?;
    let read_timeout = state.config.client_read_timeout;
    let http = server::Http {
        app,
        api: Some(api),
        read_timeout,
        stop: shutdown.clone(),
    };
    let (server, shards): (Pin<Box<dyn Future<Output = std::io::Result<()>> + Send>>, _) =
        match &tls {
            Some(tls) => (
                Box::pin(http.serve(tls.listener(listener, keepalive, gate))),
                None,
            ),
            None => {
                let shards = Arc::new(shards::Shards::start(threads).context("starting threads")?);
                info!(threads = shards.len(), "serving plain HTTP thread-per-core");
                let listener = server::PlainListener::new(listener, keepalive, gate);
                (
                    Box::pin(http.serve_sharded(listener, shards.clone(), registry.clone())),
                    Some(shards),
                )
            }
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
        // Nothing runs on the shards any more: their threads end.
        drop(shards);
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
        cluster: cluster.zip(peer_addr),
    })
}

/// Locks `mutex`, poisoned or not. Only for state whose every update is finished before the
/// lock is released (the relay's maps and caches): a panicking holder cannot have left a
/// half-made change, so the state is as good after a panic as before.
pub(crate) fn lock<T>(mutex: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
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
        // Degraded still takes traffic: its own tunnels serve, and taking every node out of
        // the balancer because Redis is down would turn a partial outage into a whole one.
        None if state.cluster.as_ref().is_some_and(|c| c.is_degraded()) => (
            StatusCode::OK,
            "ready, cluster degraded: Redis/Valkey unreachable, serving this node's own tunnels only\n",
        )
            .into_response(),
        None => (StatusCode::OK, "ready\n").into_response(),
    }
}

fn router(state: Arc<AppState>, with_metrics: bool) -> anyhow::Result<Router> {
    let router = if with_metrics {
        Router::new().route("/metrics", get(metrics))
    } else {
        Router::new()
    };
    // The API (`/api/…`, `/v1/…`) does not pass through the router: `proxy::ApiEntry`.
    let site = web::Site::new(&state.config)?;
    Ok(router
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route(cloudllm_proto::WELL_KNOWN_PATH, get(well_known::get))
        .route(cloudllm_proto::TUNNEL_PATH, get(tunnel::accept))
        .merge(web::routes(site))
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
        .layer(around::AroundLayer(request_id::Tag))
        .layer(axum::Extension(Arc::new(web::OpenCodes::default())))
        .with_state(state))
}

fn is_loopback(host: &str) -> bool {
    host == "localhost"
        || host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}
