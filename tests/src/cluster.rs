//! A relay cluster for the tests: nodes sharing one real Redis ([`crate::redis`]), each on a
//! runtime of its own so that a node can be lost like a process killed with SIGKILL (every task
//! dropped at once, sockets closed, nothing cleaned up), and a load-balancer stand-in that
//! sends each new connection to the first node that accepts it.
//!
//! [`TestCluster::start`] is the set-up every cluster test shares (skip without Redis, logs, a
//! fresh Redis, nodes on it); [`Node::connect`] and [`laptop_and_desktop`] put devices on the
//! nodes and wait until they are there.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cloudllm_relay::cluster::Cluster;
use cloudllm_relay::config::ClusterConfig;
use cloudllm_relay::registry::Registry;
use cloudllm_relay::{RelayConfig, Scope};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use url::Url;

use crate::redis::RedisServer;
use crate::{
    FakeOllama, STEP, TestDaemon, client, init_logs, own_runtime, relay_config, token, wait_for,
};

/// How often a test looks at a node's devices again while it waits for them.
const DEVICES_EVERY: Duration = Duration::from_millis(10);

/// How often a test asks Redis (through a node) for remote devices while it waits for them.
const REMOTE_EVERY: Duration = Duration::from_millis(20);

/// The secret the test nodes share.
pub const CLUSTER_SECRET: &str = "cluster-secret-cluster-secret-0123456789";

/// A file holding [`CLUSTER_SECRET`].
pub fn secret_file() -> PathBuf {
    let path = crate::scratch_dir().join("cluster.secret");
    std::fs::write(&path, CLUSTER_SECRET).expect("write the cluster secret");
    path
}

/// A `[cluster]` table for node `node` on `redis_url`, its peer listener on port 0.
pub fn cluster_config(redis_url: &str, node: &str) -> ClusterConfig {
    ClusterConfig {
        redis_url: redis_url.to_owned(),
        node: node.to_owned(),
        peer_listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        advertise: None,
        secret_file: secret_file(),
        ca_file: None,
        presence_ttl: Duration::from_secs(30),
    }
}

/// One relay node on a runtime of its own.
pub struct Node {
    /// Its name.
    pub name: String,
    /// Its public address (users and daemons).
    pub addr: SocketAddr,
    /// Its peer listener (other nodes).
    pub peer_addr: SocketAddr,
    /// Its connected devices.
    pub registry: Arc<Registry>,
    /// Its part in the cluster.
    pub cluster: Arc<Cluster>,
    shutdown: CancellationToken,
    done: Option<JoinHandle<anyhow::Result<()>>>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl Node {
    /// Starts a node with `config` (which must have `[cluster]`).
    pub async fn start(config: RelayConfig) -> Node {
        let name = config
            .cluster
            .as_ref()
            .expect("a [cluster] table")
            .node
            .clone();
        let runtime = own_runtime();
        let shutdown = CancellationToken::new();
        let started = runtime.spawn(cloudllm_relay::serve(config, shutdown.clone()));
        let relay = tokio::time::timeout(STEP, started)
            .await
            .expect("node start timed out")
            .expect("node task")
            .expect("node start");
        let (cluster, peer_addr) = relay.cluster.clone().expect("a cluster node");
        Node {
            name,
            addr: relay.addr,
            peer_addr,
            registry: relay.registry.clone(),
            cluster,
            shutdown,
            done: Some(relay.done),
            runtime: Some(runtime),
        }
    }

    /// Starts node `name` on the Redis at `redis_url`, with the test relay config and its
    /// `[cluster]` table (see [`cluster_config`]) changed by `adjust` first.
    pub async fn on(
        redis_url: &str,
        name: &str,
        adjust: impl FnOnce(&mut RelayConfig, &mut ClusterConfig),
    ) -> Node {
        let mut config = relay_config();
        let mut cluster = cluster_config(redis_url, name);
        adjust(&mut config, &mut cluster);
        config.cluster = Some(cluster);
        Node::start(config).await
    }

    /// Its base URL.
    pub fn url(&self) -> Url {
        Url::parse(&format!("http://{}", self.addr)).expect("node URL")
    }

    /// A `POST /api/generate` on this node as `user`'s API client, with `body`.
    pub fn generate(&self, user: &str, body: &serde_json::Value) -> reqwest::RequestBuilder {
        client()
            .post(self.api("/api/generate"))
            .bearer_auth(token(user, Scope::Client))
            .json(body)
    }

    /// Its `/metrics` text.
    pub async fn metrics(&self) -> String {
        crate::metrics::scrape(self.addr).await
    }

    /// The value of `series` in its `/metrics` now; a series not written yet reads 0.
    pub async fn metric(&self, series: &str) -> f64 {
        crate::metrics::metric_value(&self.metrics().await, series).unwrap_or(0.0)
    }

    /// Starts `user`'s daemon for `device`, dialling this node and forwarding to `backend`;
    /// returns once this node holds the device.
    pub async fn connect(&self, user: &str, device: &str, backend: &FakeOllama) -> TestDaemon {
        let daemon = TestDaemon::dial(&self.url(), user, device, backend);
        wait_for(DEVICES_EVERY, async || {
            let held: Vec<String> = self
                .registry
                .devices_of(user)
                .iter()
                .map(|d| d.name.clone())
                .collect();
            if held.iter().any(|name| name == device) {
                Ok(())
            } else {
                Err(format!(
                    "{user}'s {device} is not on {}, which holds {held:?}",
                    self.name
                ))
            }
        })
        .await;
        daemon
    }

    /// The URL of `path` on it.
    pub fn api(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Loses the node like a process killed with SIGKILL: every task dropped, no cleanup.
    pub fn kill(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }

    /// Starts a graceful shutdown (like SIGTERM) and waits until it has stopped.
    pub async fn stop(&mut self) {
        self.shutdown.cancel();
        if let Some(done) = self.done.take() {
            tokio::time::timeout(STEP * 2, done)
                .await
                .expect("node shutdown timed out")
                .expect("node task")
                .expect("node result");
        }
    }

    /// Waits until `user` has `count` devices on this node.
    pub async fn wait_for_devices(&self, user: &str, count: usize) {
        wait_for(DEVICES_EVERY, async || {
            match self.registry.devices_of(user).len() {
                held if held == count => Ok(()),
                held => Err(format!(
                    "{user} has {held} devices on {}, expected {count}",
                    self.name
                )),
            }
        })
        .await
    }

    /// Waits until this node sees `user`'s devices on the other nodes as `names` (sorted).
    pub async fn wait_for_remote(&self, user: &str, names: &[&str]) {
        wait_for(REMOTE_EVERY, async || {
            let mut seen: Vec<String> = self
                .cluster
                .remote_devices(user)
                .await
                .into_iter()
                .map(|d| d.name)
                .collect();
            seen.sort();
            if seen == names {
                Ok(())
            } else {
                Err(format!(
                    "{} sees {user}'s remote devices {seen:?}, expected {names:?}",
                    self.name
                ))
            }
        })
        .await
    }
}

/// A cluster for one test: a fresh Redis and relay nodes on it.
pub struct TestCluster {
    /// The nodes, in the order of their names.
    pub nodes: Vec<Node>,
    /// The Redis they share; dropped after them.
    pub redis: RedisServer,
}

impl TestCluster {
    /// The set-up of a cluster test: `None` when cluster tests are skipped (see
    /// [`RedisServer::available`]); otherwise the test's logs, a fresh Redis, and one node per
    /// name in `names` on it (see [`Node::on`], `adjust` applied to each).
    pub async fn start(
        names: &[&str],
        adjust: impl Fn(&mut RelayConfig, &mut ClusterConfig),
    ) -> Option<TestCluster> {
        if !RedisServer::available() {
            return None;
        }
        init_logs();
        let redis = RedisServer::start().await;
        let mut nodes = Vec::new();
        for name in names {
            nodes.push(Node::on(&redis.url("redis"), name, &adjust).await);
        }
        Some(TestCluster { nodes, redis })
    }
}

/// alice's laptop on the first of `nodes` and her desktop on the second, both forwarding to
/// `backend`; returns once every node sees both (the first two each hold theirs, the others
/// see both as remote devices).
pub async fn laptop_and_desktop(nodes: &[Node], backend: &FakeOllama) -> [TestDaemon; 2] {
    let laptop = nodes[0].connect("alice", "laptop", backend).await;
    let desktop = nodes[1].connect("alice", "desktop", backend).await;
    for node in &nodes[2..] {
        node.wait_for_remote("alice", &["desktop", "laptop"]).await;
    }
    [laptop, desktop]
}

impl Drop for Node {
    fn drop(&mut self) {
        self.shutdown.cancel();
        self.kill();
    }
}

/// A load-balancer stand-in: each new TCP connection goes to the first backend (in order) that
/// accepts it, so daemons land on the first live node and move on when it dies.
pub struct Balancer {
    /// Its address.
    pub addr: SocketAddr,
    backends: Arc<Mutex<Vec<SocketAddr>>>,
    task: JoinHandle<()>,
}

impl Balancer {
    /// Starts a balancer over `backends`.
    pub async fn start(backends: Vec<SocketAddr>) -> Balancer {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind balancer");
        let addr = listener.local_addr().expect("balancer address");
        let backends = Arc::new(Mutex::new(backends));
        let list = backends.clone();
        let task = tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                let order = list.lock().unwrap().clone();
                tokio::spawn(async move {
                    for backend in order {
                        let connect = tokio::net::TcpStream::connect(backend);
                        if let Ok(Ok(mut server)) =
                            tokio::time::timeout(Duration::from_secs(1), connect).await
                        {
                            let _ = server.set_nodelay(true);
                            let _ = client.set_nodelay(true);
                            let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                            return;
                        }
                    }
                });
            }
        });
        Balancer {
            addr,
            backends,
            task,
        }
    }

    /// Its URL.
    pub fn url(&self) -> Url {
        Url::parse(&format!("http://{}", self.addr)).expect("balancer URL")
    }

    /// Replaces the backends, in order of preference.
    pub fn set_backends(&self, backends: Vec<SocketAddr>) {
        *self.backends.lock().unwrap() = backends;
    }
}

impl Drop for Balancer {
    fn drop(&mut self) {
        self.task.abort();
    }
}
