//! The relay as one node of a cluster: several nodes behind any load balancer, sharing only
//! Redis or Valkey (`[cluster]` in the config). Without `[cluster]` none of this runs.
//!
//! A device's tunnel lands on one node and its user's request may land on another. So each node
//! - records the devices it holds in Redis ([`presence`]): user, device id and name, models,
//!   load, node and a per-connection epoch, under keys that expire unless refreshed;
//! - forwards a request for a device held elsewhere to the node that holds it, over
//!   node-to-node HTTP/2 signed with the shared secret ([`peer`]);
//! - shares its users' limits with the other nodes through Redis counters ([`limits`]);
//! - hears, over PUB/SUB, what every node must know at once ([`control`]).
//!
//! Redis holds routing entries and counters only: no tokens, prompts or completions. When Redis
//! cannot be reached the node is *degraded*: it keeps serving the tunnels it holds, limits fall
//! back to the node's own, `/readyz` and `/metrics` say so, and the presence records are
//! written again as soon as Redis answers (a restarted Redis is empty).
//!
//! Redis keys (one Redis primary, not Redis Cluster: the scripts touch keys they compute):
//! `cl:u:<user>` a sorted set of the user's device ids scored by expiry (Redis 7.0 has no
//! per-field TTL, so entries are pruned by score); `cl:d:<user>:<id>` a hash, the device's
//! record; `cl:n` the live nodes scored by expiry; `cl:c:<user>` requests in flight per node;
//! `cl:r:<user>:<minute>` requests in the current minute; `cl:nd` each node's device count at
//! its last refresh (for `cloudllm-relay cluster status`, [`admin`]); `cl:o:<code>` a
//! `cloudllm open` one-time code's user and tier, for its minute (`open_codes`).

pub mod admin;
mod control;
mod limits;
mod open_codes;
pub mod peer;
mod presence;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, info, info_span, warn};

pub use control::{Control, publish};
pub(crate) use limits::ClusterSlot;
pub use presence::RemoteDevice;

use crate::config::ClusterConfig;
use crate::metrics::Metrics;
use crate::registry::{Device, Registry};

/// How long one Redis command may take before it counts as failed: Redis answers in well under a
/// millisecond, so 2 s means it is unreachable, and a request waits at most this long for it.
const REDIS_TIMEOUT: Duration = Duration::from_secs(2);

/// Longest pause between attempts to reach Redis again.
const REDIS_RETRY_MAX: Duration = Duration::from_secs(2);

/// While degraded, requests skip Redis (and its timeout) unless this long has passed since it
/// last failed: an unreachable Redis costs one request a second a wait, not every request.
const DEGRADED_PROBE: Duration = Duration::from_secs(1);

/// What a node's tunnels tell the presence task (see [`Registry::observe`]).
#[derive(Debug)]
pub enum Change {
    /// A registered tunnel ended (by its id): its record goes, unless a newer one replaced it.
    Down(u64),
    /// A registered device's models changed (by tunnel id).
    Models(u64),
}

/// One device this node holds, as recorded in Redis.
#[derive(Debug)]
struct Held {
    device: Arc<Device>,
    /// This connection's epoch: the record is this node's only while it carries it.
    epoch: String,
}

/// This node's part in the cluster.
pub struct Cluster {
    /// This node's name.
    pub node: String,
    /// The `host:port` other nodes reach this node's peer listener on.
    pub advertise: String,
    redis: ConnectionManager,
    client: redis::Client,
    ttl: Duration,
    /// Devices this node holds and has recorded, by tunnel id.
    held: Mutex<HashMap<u64, Held>>,
    /// Set while Redis cannot be reached.
    degraded: AtomicBool,
    /// When a Redis call last failed, in milliseconds since `born`.
    failed_at: AtomicU64,
    born: std::time::Instant,
    metrics: Arc<Metrics>,
    registry: Arc<Registry>,
    pub(crate) peers: peer::Peers,
}

/// A Redis client for `config`'s `redis_url` (and `ca_file`); connects on first use.
fn redis_client(config: &ClusterConfig) -> anyhow::Result<redis::Client> {
    let url = config.redis_url()?;
    match config.read_ca()? {
        Some(root_cert) => redis::Client::build_with_tls(
            url.as_str(),
            redis::TlsCertificates {
                client_tls: None,
                root_cert: Some(root_cert),
            },
        ),
        None => redis::Client::open(url.as_str()),
    }
    .context("[cluster] redis_url: the Redis client refused it")
}

impl Cluster {
    /// Joins the cluster: connects to Redis lazily (a node starts while Redis is down, degraded),
    /// and starts the presence and control tasks on `tasks` until `shutdown`. `advertise` is
    /// where the other nodes reach this node's peer listener.
    pub(crate) fn start(
        config: &ClusterConfig,
        advertise: String,
        registry: Arc<Registry>,
        metrics: Arc<Metrics>,
        (tasks, shutdown): (&TaskTracker, &CancellationToken),
    ) -> anyhow::Result<Arc<Cluster>> {
        let client = redis_client(config)?;
        let manager_config = ConnectionManagerConfig::new()
            .set_response_timeout(Some(REDIS_TIMEOUT))
            .set_connection_timeout(Some(REDIS_TIMEOUT))
            .set_number_of_retries(1)
            .set_max_delay(REDIS_RETRY_MAX);
        let redis = ConnectionManager::new_lazy_with_config(client.clone(), manager_config)
            .context("[cluster] connecting to Redis")?;
        let secret = config.read_secret()?;
        let (changes, events) = tokio::sync::mpsc::unbounded_channel();
        registry.observe(changes);
        let cluster = Arc::new(Cluster {
            node: config.node.clone(),
            advertise,
            redis,
            client,
            ttl: config.presence_ttl,
            held: Mutex::default(),
            degraded: AtomicBool::new(false),
            failed_at: AtomicU64::new(0),
            born: std::time::Instant::now(),
            metrics,
            registry,
            peers: peer::Peers::new(&secret, config.node.clone()),
        });
        let span = info_span!("cluster", node = %cluster.node);
        tasks.spawn(
            presence::run(cluster.clone(), events, shutdown.clone()).instrument(span.clone()),
        );
        tasks.spawn(control::run(cluster.clone(), shutdown.clone()).instrument(span));
        info!(node = %cluster.node, advertise = %cluster.advertise, "cluster node started");
        Ok(cluster)
    }

    /// Whether Redis cannot be reached now (the node serves its own tunnels only).
    pub fn is_degraded(&self) -> bool {
        self.degraded.load(Ordering::Relaxed)
    }

    /// Whether a request should do without Redis now: it is unreachable and was tried less
    /// than [`DEGRADED_PROBE`] ago. Background tasks always try.
    fn skip_redis(&self) -> bool {
        self.is_degraded()
            && self.born.elapsed().as_millis()
                < u128::from(self.failed_at.load(Ordering::Relaxed)) + DEGRADED_PROBE.as_millis()
    }

    /// Notes the outcome of a Redis call: errors make the node degraded until one succeeds.
    fn noted<T>(&self, what: &'static str, result: redis::RedisResult<T>) -> Option<T> {
        match result {
            Ok(value) => {
                if self.degraded.swap(false, Ordering::Relaxed) {
                    info!("Redis answers again: cluster no longer degraded");
                    self.metrics.cluster_degraded.set(0);
                }
                Some(value)
            }
            Err(err) => {
                self.metrics.redis_errors.inc();
                let now = u64::try_from(self.born.elapsed().as_millis()).unwrap_or(u64::MAX);
                self.failed_at.store(now, Ordering::Relaxed);
                if !self.degraded.swap(true, Ordering::Relaxed) {
                    warn!(error = %err, what, "Redis unreachable: cluster degraded, serving local tunnels only");
                    self.metrics.cluster_degraded.set(1);
                }
                None
            }
        }
    }

    /// A handle on the Redis connection (cheap: one shared multiplexed connection).
    fn conn(&self) -> ConnectionManager {
        self.redis.clone()
    }
}

impl crate::AppState {
    /// Registers a device whose tunnel said hello: in this node's registry (which may replace
    /// an older tunnel of it) and, in a cluster, in presence, which applies the user's device
    /// limit over every node at once. Refused: the names of the user's other devices.
    pub(crate) async fn register(
        &self,
        device: Arc<Device>,
        max_devices: usize,
    ) -> Result<Option<Arc<Device>>, Vec<String>> {
        let replaced = self.registry.insert(device.clone(), max_devices)?;
        if let Some(cluster) = &self.cluster
            && let Err(others) = cluster.register(&device, max_devices).await
        {
            self.registry.remove(&device);
            return Err(others);
        }
        Ok(replaced)
    }

    /// The names of `user`'s connected devices other than `device_id`, on every node.
    pub(crate) async fn device_others(&self, user: &str, device_id: &str) -> Vec<String> {
        let mut others = self.registry.others(user, device_id);
        if let Some(cluster) = &self.cluster {
            for remote in cluster.remote_devices(user).await {
                if remote.id != device_id && !others.contains(&remote.name) {
                    others.push(remote.name);
                }
            }
        }
        others
    }
}
