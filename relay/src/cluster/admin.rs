//! The operator's view of a cluster, through its Redis alone: `cloudllm-relay cluster status`
//! (the live nodes and how many devices each holds) and `cloudllm-relay cluster drop-user`
//! (every node closes a user's tunnels, over the control channel).
//!
//! These read the same config file as the nodes (its `[cluster]` table) and need no node to
//! answer: an operator can run them from any machine that reaches Redis. Errors say which file
//! and which key, and the Redis password never appears in what is printed.

use std::fmt;
use std::path::Path;
use std::time::Duration;

use anyhow::Context;

use super::presence::{NODE_DEVICES_KEY, user_key};
use super::{Control, REDIS_TIMEOUT, limits::NODES_KEY};
use crate::RelayConfig;
use crate::config::ClusterConfig;

/// One node as Redis knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeStatus {
    /// Its name.
    pub name: String,
    /// Devices it held at its last refresh.
    pub devices: u64,
    /// Whether its presence is current; a node that stopped refreshing (killed, or cut off from
    /// Redis) is listed for an hour as gone.
    pub live: bool,
    /// For a live node, how long its presence lasts without a refresh; for a gone one, how long
    /// ago it expired.
    pub since: Duration,
}

/// What `cluster status` prints.
#[derive(Debug, Clone)]
pub struct ClusterStatus {
    /// The Redis URL, its password masked.
    pub redis: String,
    /// Every node seen in the last hour, live ones first, by name.
    pub nodes: Vec<NodeStatus>,
}

impl fmt::Display for ClusterStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let live: Vec<&NodeStatus> = self.nodes.iter().filter(|n| n.live).collect();
        let devices: u64 = live.iter().map(|n| n.devices).sum();
        write!(
            f,
            "cluster on {}: {} live node(s), {devices} device(s)",
            self.redis,
            live.len()
        )?;
        for node in &self.nodes {
            if node.live {
                write!(
                    f,
                    "\n  {:<24} live  {:>7} device(s)",
                    node.name, node.devices
                )?;
            } else {
                write!(
                    f,
                    "\n  {:<24} gone  (stopped refreshing its presence {} s ago)",
                    node.name,
                    node.since.as_secs()
                )?;
            }
        }
        Ok(())
    }
}

/// What `cluster drop-user` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dropped {
    /// The user.
    pub user: String,
    /// How many nodes heard the order.
    pub nodes: usize,
    /// How many devices the user had connected, by presence, just before.
    pub devices: u64,
}

impl fmt::Display for Dropped {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "dropped {:?}: {} node(s) closed their tunnels ({} device(s) were connected). \
             Their daemons do not redial by themselves (the user reconnects with `cloudllm \
             connect`); to keep them out, stop issuing the user tokens.",
            self.user, self.nodes, self.devices
        )
    }
}

/// The `[cluster]` table of `config`, or an error naming the file.
fn cluster_of<'a>(config: &'a RelayConfig, file: &Path) -> anyhow::Result<&'a ClusterConfig> {
    config.cluster.as_ref().with_context(|| {
        format!(
            "{} has no [cluster] table: these commands act on a cluster through its Redis; \
             pass the config file the nodes run with (--config)",
            file.display()
        )
    })
}

/// `url` with any password masked.
fn masked(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut parsed) if parsed.password().is_some() => {
            let _ = parsed.set_password(Some("***"));
            parsed.to_string()
        }
        Ok(parsed) => parsed.to_string(),
        Err(_) => "(unreadable redis_url)".to_owned(),
    }
}

/// A connection to the cluster's Redis, or an error in the operator's terms.
async fn connect(
    cluster: &ClusterConfig,
    file: &Path,
) -> anyhow::Result<(redis::aio::MultiplexedConnection, String)> {
    let shown = masked(&cluster.redis_url);
    let client = super::redis_client(cluster)
        .with_context(|| format!("in [cluster] of {}", file.display()))?;
    let conn = tokio::time::timeout(REDIS_TIMEOUT, client.get_multiplexed_async_connection())
        .await
        .map_err(|_| anyhow::anyhow!("no answer within {} s", REDIS_TIMEOUT.as_secs()))
        .and_then(|c| c.map_err(anyhow::Error::new))
        .with_context(|| {
            format!(
                "cannot reach Redis at {shown} ([cluster] redis_url in {}): is it running, \
                 and can this machine reach it?",
                file.display()
            )
        })?;
    Ok((conn, shown))
}

/// Runs `cmd` with the command timeout, saying which Redis failed.
async fn query<T: redis::FromRedisValue>(
    cmd: impl std::future::Future<Output = redis::RedisResult<T>>,
    shown: &str,
) -> anyhow::Result<T> {
    tokio::time::timeout(REDIS_TIMEOUT, cmd)
        .await
        .map_err(|_| anyhow::anyhow!("no answer within {} s", REDIS_TIMEOUT.as_secs()))
        .and_then(|r| r.map_err(anyhow::Error::new))
        .with_context(|| format!("Redis at {shown} refused the query"))
}

/// The live nodes, their device counts, and nodes gone within the hour, from Redis.
pub async fn status(config: &RelayConfig, file: &Path) -> anyhow::Result<ClusterStatus> {
    let cluster = cluster_of(config, file)?;
    let (mut conn, shown) = connect(cluster, file).await?;
    let script = redis::Script::new(
        "local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local out = {tostring(now)}
local nodes = redis.call('ZRANGE', KEYS[1], 0, -1, 'WITHSCORES')
for i = 1, #nodes, 2 do
  table.insert(out, nodes[i])
  table.insert(out, nodes[i + 1])
  table.insert(out, redis.call('HGET', KEYS[2], nodes[i]) or '0')
end
return out",
    );
    let mut invocation = script.key(NODES_KEY);
    invocation.key(NODE_DEVICES_KEY);
    let flat: Vec<String> = query(invocation.invoke_async(&mut conn), &shown).await?;
    let now: f64 = flat.first().and_then(|t| t.parse().ok()).unwrap_or(0.0);
    let mut nodes: Vec<NodeStatus> = flat
        .get(1..)
        .unwrap_or_default()
        .chunks_exact(3)
        .map(|f| {
            let expires: f64 = f[1].parse().unwrap_or(0.0);
            let live = expires > now;
            let gap = Duration::from_millis((expires - now).abs() as u64);
            NodeStatus {
                name: f[0].clone(),
                devices: f[2].parse().unwrap_or(0),
                live,
                since: gap,
            }
        })
        .collect();
    nodes.sort_by(|a, b| b.live.cmp(&a.live).then_with(|| a.name.cmp(&b.name)));
    Ok(ClusterStatus {
        redis: shown,
        nodes,
    })
}

/// Tells every node to close `user`'s tunnels; returns how many nodes heard it.
pub async fn drop_user(config: &RelayConfig, file: &Path, user: &str) -> anyhow::Result<Dropped> {
    anyhow::ensure!(!user.is_empty(), "--user is empty: name the user to drop");
    let cluster = cluster_of(config, file)?;
    let (mut conn, shown) = connect(cluster, file).await?;
    let count = redis::Script::new(
        "local t = redis.call('TIME')
return redis.call('ZCOUNT', KEYS[1], t[1] * 1000 + math.floor(t[2] / 1000), '+inf')",
    );
    let devices: u64 = query(count.key(user_key(user)).invoke_async(&mut conn), &shown).await?;
    let message = serde_json::to_string(&Control::DropUser {
        user: user.to_owned(),
    })?;
    let mut publish = redis::cmd("PUBLISH");
    publish.arg(super::control::CHANNEL).arg(message);
    let nodes: usize = query(publish.query_async(&mut conn), &shown).await?;
    Ok(Dropped {
        user: user.to_owned(),
        nodes,
        devices,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_password_is_never_shown() {
        assert_eq!(
            masked("redis://:hunter2@redis.internal:6379/0"),
            "redis://:***@redis.internal:6379/0"
        );
        assert_eq!(masked("redis://h:1"), "redis://h:1");
    }

    #[test]
    fn a_config_without_cluster_is_explained() {
        let err = cluster_of(&RelayConfig::default(), Path::new("/etc/relay.toml"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("/etc/relay.toml") && err.contains("[cluster]"),
            "{err}"
        );
    }
}
