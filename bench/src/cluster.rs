//! `cloudllm-bench cluster`: what a relay cluster costs, in one run.
//!
//! A real `redis-server` (loopback, nothing saved), two relay nodes in this process (each on a
//! runtime of its own), one daemon connected to node A, and the fake backend. The same
//! requests go straight to the backend, through node A (the device's node) and through node B
//! (one hop more: B forwards to A over the node-to-node HTTP/2 connection): time to first byte
//! and a 2,000-line stream for each, then requests per second through one node and through the
//! hop. Then a fleet of idle devices connects to node A: Redis memory per device (INFO memory)
//! and the presence operations their refreshes make, with Redis' CPU time per operation
//! (INFO commandstats), from which the operations one Redis core can take follow.
//! Last, idle tunnels at scale ([`idle_spread`]): `--tunnels` of them (10,000 by default)
//! spread over three relay processes of a cluster, and the same number held by one relay
//! process alone, each measured as `cloudllm-bench scale` measures it (the relay's VmRSS
//! before and after, per tunnel), in the same run.

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use cloudllm_proto::Secret;
use cloudllm_relay::config::{ClusterConfig, TierLimits};
use cloudllm_relay::{Keys, RelayConfig, Scope};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

use crate::client::Target;
use crate::relay_host::{self, RelayHost};
use crate::scale;

/// Relay processes the idle tunnels are spread over.
const SPREAD_NODES: usize = 3;

/// How long the idle tunnels may take to show in a relay's gauge once dialled: far above the
/// seconds it takes.
const SPREAD_TIMEOUT: Duration = Duration::from_secs(120);

/// The token secret of the benchmark's relays.
const SECRET: &str = "bench-cluster-secret-bench-cluster-secret";
/// Presence TTL: 3 s, so a refresh round (every second) falls inside a short run.
const TTL: Duration = Duration::from_secs(3);

/// A `redis-server` on a free loopback port, killed when dropped.
struct Redis {
    addr: SocketAddr,
    child: Child,
}

impl Redis {
    async fn start() -> anyhow::Result<Redis> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting redis-server (Debian: apt install redis-server)")?;
        let redis = Redis {
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            child,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while redis.info("server").await.is_err() {
            anyhow::ensure!(Instant::now() < deadline, "redis-server did not answer");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(redis)
    }

    /// `INFO section`, the bulk string's text.
    async fn info(&self, section: &str) -> anyhow::Result<String> {
        let mut stream = tokio::net::TcpStream::connect(self.addr).await?;
        let request = format!("*2\r\n$4\r\nINFO\r\n${}\r\n{section}\r\n", section.len());
        stream.write_all(request.as_bytes()).await?;
        let mut reply = Vec::new();
        let mut buf = [0; 16 * 1024];
        loop {
            let n = tokio::time::timeout(Duration::from_secs(2), stream.read(&mut buf)).await??;
            anyhow::ensure!(n > 0, "redis closed the connection");
            reply.extend_from_slice(&buf[..n]);
            let text = String::from_utf8_lossy(&reply);
            if let Some((head, body)) = text.split_once("\r\n") {
                let len: usize = head.trim_start_matches('$').parse()?;
                if body.len() >= len {
                    return Ok(body[..len].to_owned());
                }
            }
        }
    }

    /// A numeric field of an `INFO` section, e.g. `used_memory`.
    async fn field(&self, section: &str, name: &str) -> anyhow::Result<f64> {
        let text = self.info(section).await?;
        text.lines()
            .find_map(|line| line.strip_prefix(name)?.strip_prefix(':')?.parse().ok())
            .with_context(|| format!("INFO {section} has no {name}"))
    }

    /// Calls and microseconds of every script run (`EVAL` and `EVALSHA`) so far.
    async fn script_stats(&self) -> anyhow::Result<(f64, f64)> {
        let text = self.info("commandstats").await?;
        let mut totals = (0.0, 0.0);
        for line in text.lines() {
            let Some(stats) = line
                .strip_prefix("cmdstat_evalsha:")
                .or_else(|| line.strip_prefix("cmdstat_eval:"))
            else {
                continue;
            };
            for pair in stats.split(',') {
                match pair.split_once('=') {
                    Some(("calls", n)) => totals.0 += n.parse::<f64>().unwrap_or(0.0),
                    Some(("usec", n)) => totals.1 += n.parse::<f64>().unwrap_or(0.0),
                    _ => {}
                }
            }
        }
        Ok(totals)
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A relay node on its own runtime.
struct Node {
    addr: SocketAddr,
    _runtime: Background,
    shutdown: CancellationToken,
}

impl Node {
    async fn start(
        name: &str,
        redis: &Redis,
        secret_file: &std::path::Path,
    ) -> anyhow::Result<Node> {
        let mut config = RelayConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            secret: Some(Secret::new(SECRET)),
            auth_failures_per_minute: 0,
            ..RelayConfig::default()
        };
        // Every tier generous: the benchmark measures cost, not limits.
        let unlimited = TierLimits {
            requests_per_minute: 100_000_000,
            concurrent_requests: 1_000_000,
            devices: 100,
            ..TierLimits::premium()
        };
        for tier in config.tiers.values_mut() {
            *tier = unlimited.clone();
        }
        config.cluster = Some(ClusterConfig {
            redis_url: format!("redis://{}", redis.addr),
            node: name.to_owned(),
            peer_listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            advertise: None,
            secret_file: secret_file.to_owned(),
            ca_file: None,
            presence_ttl: TTL,
        });
        let runtime = Background::new(2)?;
        let shutdown = CancellationToken::new();
        let relay = runtime
            .handle()
            .spawn(cloudllm_relay::serve(config, shutdown.clone()))
            .await??;
        Ok(Node {
            addr: relay.addr,
            _runtime: runtime,
            shutdown,
        })
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// A runtime shut down without waiting when dropped (also on an early error return, inside
/// the benchmark's own runtime, where a plain drop would panic).
struct Background(Option<tokio::runtime::Runtime>);

impl Background {
    fn new(workers: usize) -> anyhow::Result<Background> {
        Ok(Background(Some(
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(workers)
                .enable_all()
                .build()?,
        )))
    }

    fn handle(&self) -> &tokio::runtime::Handle {
        self.0.as_ref().map(|r| r.handle()).expect("running")
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        if let Some(runtime) = self.0.take() {
            runtime.shutdown_background();
        }
    }
}

fn median(mut values: Vec<Duration>) -> Duration {
    values.sort();
    values.get(values.len() / 2).copied().unwrap_or_default()
}

/// Time to the first line of a one-line answer, median of `reps`.
async fn first_byte(target: &Target, reps: usize) -> anyhow::Result<Duration> {
    let mut conn = target.connect().await?;
    let mut times = Vec::new();
    for _ in 0..reps {
        let started = Instant::now();
        let arrivals = conn.generate(1, Duration::ZERO).await?;
        times.push(arrivals[0].into_std().saturating_duration_since(started));
    }
    Ok(median(times))
}

/// A 2,000-line stream read to its end, median of `reps`.
async fn stream(target: &Target, reps: usize) -> anyhow::Result<Duration> {
    let mut conn = target.connect().await?;
    let mut times = Vec::new();
    for _ in 0..reps {
        let started = Instant::now();
        conn.generate(2000, Duration::ZERO).await?;
        times.push(started.elapsed());
    }
    Ok(median(times))
}

/// `GET /api/version` on `connections` keep-alive connections for `length`: requests/s.
async fn rate(target: &Target, connections: usize, length: Duration) -> anyhow::Result<f64> {
    let done = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + length;
    let mut tasks = Vec::new();
    for _ in 0..connections {
        let mut conn = target.connect().await?;
        let done = done.clone();
        tasks.push(tokio::spawn(async move {
            while Instant::now() < deadline {
                conn.version().await?;
                done.fetch_add(1, Ordering::Relaxed);
            }
            anyhow::Ok(())
        }));
    }
    for task in tasks {
        task.await??;
    }
    Ok(done.load(Ordering::Relaxed) as f64 / length.as_secs_f64())
}

/// Dials `count` idle tunnels spread over `relays` (users in turn), waits until each relay
/// counts its share, and returns the relays' RSS growth per tunnel (KiB) and their total RSS
/// with every tunnel connected (MiB).
async fn fill(relays: &[RelayHost], count: usize) -> anyhow::Result<(f64, f64)> {
    tokio::time::sleep(scale::SETTLE).await;
    let rss = |relays: &[RelayHost]| -> anyhow::Result<u64> {
        relays
            .iter()
            .map(|r| r.rss_kib().context("reading a relay's VmRSS"))
            .sum()
    };
    let before = rss(relays)?;
    let stats = Arc::new(crate::fleet::Stats::default());
    let stop = CancellationToken::new();
    let mut devices = tokio::task::JoinSet::new();
    let addrs: Vec<SocketAddr> = relays.iter().map(|r| r.addr).collect();
    let dialled = scale::dial_idle(&addrs, count, &stats, &stop, &mut devices).await;
    let counted = async {
        dialled?;
        for (i, relay) in relays.iter().enumerate() {
            let share = scale::dialled_to(relays.len(), i, count) as u64;
            relay
                .wait_devices(share, Duration::from_millis(100), SPREAD_TIMEOUT)
                .await?;
        }
        tokio::time::sleep(scale::SETTLE).await;
        rss(relays)
    }
    .await;
    stop.cancel();
    if tokio::time::timeout(Duration::from_secs(30), async {
        while devices.join_next().await.is_some() {}
    })
    .await
    .is_err()
    {
        devices.abort_all();
    }
    let after = counted?;
    Ok((
        after.saturating_sub(before) as f64 / count as f64,
        after as f64 / 1024.0,
    ))
}

/// Relay RSS per idle tunnel with `count` tunnels over [`SPREAD_NODES`] relay processes of a
/// cluster on `redis`, then with one relay process holding all of them: table rows and JSON.
async fn idle_spread(
    redis: &Redis,
    secret_file: &std::path::Path,
    count: usize,
) -> anyhow::Result<(Vec<String>, serde_json::Value)> {
    let binary = relay_host::relay_binary()?;
    crate::progress(&format!(
        "{count} idle tunnels over {SPREAD_NODES} cluster nodes"
    ));
    let mut nodes = Vec::new();
    for i in 0..SPREAD_NODES {
        let table = format!(
            "\n[cluster]\nredis_url = \"redis://{}\"\nnode = \"spread-{i}\"\n\
             peer_listen = \"127.0.0.1:0\"\nsecret_file = {:?}\n",
            redis.addr,
            secret_file.display().to_string()
        );
        nodes.push(RelayHost::spawn_with(&binary, relay_host::SESSION_IDLE, &table).await?);
    }
    let redis_before = redis.field("memory", "used_memory").await?;
    let (cluster_kib, cluster_mib) = fill(&nodes, count).await?;
    let redis_after = redis.field("memory", "used_memory").await?;
    for node in nodes {
        node.stop().await?;
    }
    crate::progress(&format!("{count} idle tunnels on one relay"));
    let one = RelayHost::spawn(&binary, relay_host::SESSION_IDLE).await?;
    let (one_kib, one_mib) = fill(std::slice::from_ref(&one), count).await?;
    one.stop().await?;
    let rows = vec![
        format!(
            "idle tunnels     {count} over {SPREAD_NODES} nodes: {cluster_kib:.1} KiB relay RSS per tunnel \
             ({cluster_mib:.1} MiB in all)   one relay: {one_kib:.1} KiB per tunnel ({one_mib:.1} MiB)"
        ),
        format!(
            "                 Redis memory with them: {:.0} bytes per device",
            (redis_after - redis_before) / count as f64
        ),
    ];
    let json = serde_json::json!({
        "tunnels": count,
        "cluster_nodes": SPREAD_NODES,
        "cluster_kib_per_tunnel": cluster_kib,
        "cluster_rss_mib": cluster_mib,
        "one_relay_kib_per_tunnel": one_kib,
        "one_relay_rss_mib": one_mib,
        "redis_bytes_per_device": (redis_after - redis_before) / count as f64,
    });
    Ok((rows, json))
}

/// Runs the cluster benchmark, `tunnels` idle tunnels in its scale part (0 skips it); returns
/// the printed table and its JSON.
pub fn run(quick: bool, tunnels: usize) -> anyhow::Result<(String, serde_json::Value)> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(measure(quick, tunnels))
}

async fn measure(quick: bool, tunnels: usize) -> anyhow::Result<(String, serde_json::Value)> {
    let (reps, devices, length) = if quick {
        (5, 200, Duration::from_secs(1))
    } else {
        (30, 2000, Duration::from_secs(5))
    };
    let redis = Redis::start().await?;
    let dir = std::env::temp_dir().join(format!("cloudllm-bench-cluster-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let secret_file = dir.join("cluster.secret");
    std::fs::write(&secret_file, "bench-node-secret-bench-node-secret-0123")?;
    let a = Node::start("a", &redis, &secret_file).await?;
    let b = Node::start("b", &redis, &secret_file).await?;
    let stop = CancellationToken::new();
    let backend_runtime = Background::new(1)?;
    let backend = backend_runtime
        .handle()
        .spawn(crate::backend::serve(stop.clone()))
        .await??;
    let keys = Keys::new(&Secret::new(SECRET));
    let hour = Duration::from_secs(3600);
    let daemon_config = cloudllm_daemon::DaemonConfig {
        relay_url: Some(format!("http://{}", a.addr).parse()?),
        ollama_url: format!("http://{backend}").parse()?,
        token: Some(Secret::new(keys.issue(
            "bench",
            Scope::Agent,
            None,
            hour,
        )?)),
        device_name: "bench".to_owned(),
        device_id: Some("bench".to_owned()),
        socket_path: Some(dir.join("d.sock")),
        state_dir: Some(dir.join("state")),
        credential_store: cloudllm_daemon::config::StoreChoice::File,
        file: Some(dir.join("cloudllmd.toml")),
        ..cloudllm_daemon::DaemonConfig::default()
    };
    let daemon_runtime = Background::new(2)?;
    daemon_runtime
        .handle()
        .spawn(cloudllm_daemon::run(daemon_config, stop.clone()));
    let client = keys.issue("bench", Scope::Client, None, hour)?;
    let direct = Target::direct(backend)?;
    let local = Target::through(a.addr, &client)?.with_device("bench")?;
    let hop = Target::through(b.addr, &client)?.with_device("bench")?;
    // Wait until the device answers through the hop (registered, and seen by node B).
    let deadline = Instant::now() + Duration::from_secs(30);
    while async { hop.connect().await?.version().await }
        .await
        .is_err()
    {
        anyhow::ensure!(
            Instant::now() < deadline,
            "the device never answered through node B"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut rows = Vec::new();
    let mut json = serde_json::Map::new();
    for (name, target) in [
        ("direct", &direct),
        ("one node", &local),
        ("through a hop", &hop),
    ] {
        let ttfb = first_byte(target, reps).await?;
        let lines = stream(target, reps.min(10)).await?;
        rows.push(format!(
            "{name:<16} time to first byte {:>8.3} ms   2,000-line stream {:>8.2} ms",
            ttfb.as_secs_f64() * 1e3,
            lines.as_secs_f64() * 1e3
        ));
        json.insert(
            name.to_owned(),
            serde_json::json!({"ttfb_ms": ttfb.as_secs_f64() * 1e3, "stream_2000_ms": lines.as_secs_f64() * 1e3}),
        );
    }
    let one_node = rate(&local, 16, length).await?;
    let through_hop = rate(&hop, 16, length).await?;
    rows.push(format!(
        "requests/s @16   one node {one_node:>9.0}   through a hop {through_hop:>9.0} ({:.2}×)",
        through_hop / one_node
    ));
    json.insert("rps_one_node".into(), one_node.into());
    json.insert("rps_hop".into(), through_hop.into());

    // A fleet of idle devices on node A, one user each.
    let memory_before = redis.field("memory", "used_memory").await?;
    let stats = Arc::new(crate::fleet::Stats::default());
    let fleet_runtime = Background::new(1)?;
    for i in 0..devices {
        let device = crate::fleet::Device {
            relay: a.addr,
            token: keys.issue(&format!("fleet-{i}"), Scope::Agent, None, hour)?,
            id: format!("fleet-{i}"),
        };
        fleet_runtime
            .handle()
            .spawn(crate::fleet::run(device, stats.clone(), stop.clone()));
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while crate::fleet::Stats::get(&stats.registered) < devices as u64 {
        anyhow::ensure!(
            Instant::now() < deadline,
            "the fleet did not connect: {} of {devices} registered, {} dials, {} refused, {} unreachable",
            crate::fleet::Stats::get(&stats.registered),
            crate::fleet::Stats::get(&stats.dials),
            crate::fleet::Stats::get(&stats.refused),
            crate::fleet::Stats::get(&stats.unreachable),
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Two refresh rounds so every record is written, then a window of refreshes alone.
    tokio::time::sleep(TTL).await;
    let memory_after = redis.field("memory", "used_memory").await?;
    let (calls_before, usec_before) = redis.script_stats().await?;
    let window = TTL * 2;
    tokio::time::sleep(window).await;
    let (calls_after, usec_after) = redis.script_stats().await?;
    let per_device = (memory_after - memory_before) / devices as f64;
    let ops = (calls_after - calls_before) / window.as_secs_f64();
    let usec_per_op = (usec_after - usec_before) / (calls_after - calls_before).max(1.0);
    rows.push(format!(
        "presence         {devices} devices refreshed every {:?}: {ops:.0} ops/s, Redis CPU {usec_per_op:.1} µs/op (≈{:.0} ops/s per Redis core)",
        TTL / 3,
        1e6 / usec_per_op.max(0.001)
    ));
    rows.push(format!(
        "Redis memory     {per_device:.0} bytes per device ({devices} devices, used_memory {:.1} MiB)",
        memory_after / 1048576.0
    ));
    json.insert("presence_ops_per_s".into(), ops.into());
    json.insert("redis_usec_per_op".into(), usec_per_op.into());
    json.insert("redis_bytes_per_device".into(), per_device.into());
    stop.cancel();
    drop((fleet_runtime, daemon_runtime, backend_runtime, a, b));
    if tunnels > 0 {
        match idle_spread(&redis, &secret_file, tunnels).await {
            Ok((spread_rows, spread_json)) => {
                rows.extend(spread_rows);
                json.insert("idle_spread".into(), spread_json);
            }
            Err(err) => rows.push(format!(
                "idle tunnels     {tunnels} did not complete: {err:#} (try a smaller --tunnels)"
            )),
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    let text = format!(
        "cloudllm-bench cluster (two nodes and one Redis; idle tunnels over three nodes)\n{}\n",
        rows.join("\n")
    );
    Ok((text, serde_json::Value::Object(json)))
}
