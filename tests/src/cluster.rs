//! A relay cluster for the tests: nodes sharing one real Redis ([`crate::redis`]), each on a
//! runtime of its own so that a node can be lost like a process killed with SIGKILL (every task
//! dropped at once, sockets closed, nothing cleaned up), and a load-balancer stand-in that
//! sends each new connection to the first node that accepts it.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cloudllm_relay::RelayConfig;
use cloudllm_relay::cluster::Cluster;
use cloudllm_relay::config::ClusterConfig;
use cloudllm_relay::registry::Registry;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use url::Url;

use crate::STEP;

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
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("node runtime");
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

    /// Its base URL.
    pub fn url(&self) -> Url {
        Url::parse(&format!("http://{}", self.addr)).expect("node URL")
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
        let deadline = tokio::time::Instant::now() + STEP;
        while self.registry.devices_of(user).len() != count {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{user} has {} devices on {}, expected {count}",
                self.registry.devices_of(user).len(),
                self.name
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Waits until this node sees `user`'s devices on the other nodes as `names` (sorted).
    pub async fn wait_for_remote(&self, user: &str, names: &[&str]) {
        let deadline = tokio::time::Instant::now() + STEP;
        loop {
            let mut seen: Vec<String> = self
                .cluster
                .remote_devices(user)
                .await
                .into_iter()
                .map(|d| d.name)
                .collect();
            seen.sort();
            if seen == names {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{} sees {user}'s remote devices {seen:?}, expected {names:?}",
                self.name
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
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
