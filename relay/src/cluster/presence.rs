//! Presence: which node holds which device, in Redis, under records that expire.
//!
//! A device is recorded when its tunnel registers (one Lua script that also enforces the
//! user's device limit over the whole cluster), refreshed every third of the TTL (one pipeline
//! for every device of the node), and removed when its tunnel ends with a compare-and-delete on
//! the connection's epoch, so a node never deletes the newer record of a device that
//! reconnected elsewhere. A refresh that finds another epoch learns that the device reconnected
//! to another node: the stale local tunnel is closed. A refresh that finds no record (Redis
//! restarted, or was unreachable longer than the TTL) writes it again: presence rebuilds
//! itself. All times come from Redis (`TIME`), so the nodes' clocks do not matter.

use std::sync::{Arc, LazyLock};
use std::time::Duration;

use redis::{Script, Value};
use tokio::sync::mpsc::UnboundedReceiver;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::{Change, Cluster, Held};
use crate::lock;
use crate::registry::Device;

/// A hash of each node's device count at its last refresh, for `cluster status`.
pub(super) const NODE_DEVICES_KEY: &str = "cl:nd";

/// Devices refreshed per pipeline: one round trip each, small enough that Redis never stalls
/// other clients for long.
const REFRESH_BATCH: usize = 1000;

/// The expiry time in milliseconds, from Redis' own clock; shared by the scripts.
const NOW: &str =
    "local t = redis.call('TIME')\nlocal now = t[1] * 1000 + math.floor(t[2] / 1000)\n";

/// KEYS: user set, device record. ARGV: ttl ms, id, max devices, epoch, node, addr, name,
/// models (JSON), load, device key prefix. `{1}` when recorded, else `{0, names…}` of the
/// user's other devices.
const REGISTER: &str = "
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if not redis.call('ZSCORE', KEYS[1], ARGV[2]) then
  local members = redis.call('ZRANGE', KEYS[1], 0, -1)
  if #members >= tonumber(ARGV[3]) then
    local out = {0}
    for _, m in ipairs(members) do
      table.insert(out, redis.call('HGET', ARGV[10] .. m, 'name') or m)
    end
    return out
  end
end
redis.call('DEL', KEYS[2])
redis.call('HSET', KEYS[2], 'epoch', ARGV[4], 'node', ARGV[5], 'addr', ARGV[6], 'name', ARGV[7], 'models', ARGV[8], 'load', ARGV[9])
redis.call('PEXPIRE', KEYS[2], ARGV[1])
redis.call('ZADD', KEYS[1], now + ARGV[1], ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[1])
return {1}
";

/// KEYS: user set, device record. ARGV: as REGISTER's first nine. 1 refreshed, 2 written
/// again (it had expired), 0 another epoch holds the record.
const REFRESH: &str = "
local current = redis.call('HGET', KEYS[2], 'epoch')
if current and current ~= ARGV[4] then return 0 end
redis.call('HSET', KEYS[2], 'epoch', ARGV[4], 'node', ARGV[5], 'addr', ARGV[6], 'name', ARGV[7], 'models', ARGV[8], 'load', ARGV[9])
redis.call('PEXPIRE', KEYS[2], ARGV[1])
redis.call('ZADD', KEYS[1], now + ARGV[1], ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[1])
if current then return 1 end
return 2
";

/// KEYS: user set, device record. ARGV: id, epoch. Deletes the record only if it is still
/// this connection's.
const REMOVE: &str = "
if redis.call('HGET', KEYS[2], 'epoch') == ARGV[2] then
  redis.call('DEL', KEYS[2])
  redis.call('ZREM', KEYS[1], ARGV[1])
  return 1
end
return 0
";

/// KEYS: user set. ARGV: device key prefix. The user's live devices: id, node, addr, name,
/// models, load, seven strings each.
const LIST: &str = "
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local out = {}
for _, id in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  local v = redis.call('HMGET', ARGV[1] .. id, 'node', 'addr', 'name', 'models', 'load', 'epoch')
  if v[1] then
    table.insert(out, id)
    for i = 1, 6 do table.insert(out, v[i] or '') end
  end
end
return out
";

/// A script with the clock prelude.
fn script(body: &str) -> Script {
    Script::new(&format!("{NOW}{body}"))
}

static REGISTER_SCRIPT: LazyLock<Script> = LazyLock::new(|| script(REGISTER));
static REFRESH_SCRIPT: LazyLock<Script> = LazyLock::new(|| script(REFRESH));
static REMOVE_SCRIPT: LazyLock<Script> = LazyLock::new(|| script(REMOVE));
static LIST_SCRIPT: LazyLock<Script> = LazyLock::new(|| script(LIST));

/// The key of `user`'s set of devices. Lengths keep users apart whatever their names hold.
pub(super) fn user_key(user: &str) -> String {
    format!("cl:u:{}:{user}", user.len())
}

/// The prefix of `user`'s device records; the device id follows.
fn device_prefix(user: &str) -> String {
    format!("cl:d:{}:{user}:", user.len())
}

/// A device held by another node, as its presence record says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteDevice {
    /// The daemon's device id.
    pub id: String,
    /// The node that holds its tunnel.
    pub node: String,
    /// Where that node's peer listener is.
    pub addr: String,
    /// The device's name.
    pub name: String,
    /// Its models, as last recorded.
    pub models: Vec<String>,
    /// Its requests in flight at the last refresh.
    pub load: usize,
}

impl RemoteDevice {
    /// Whether it has `model` (`x` and `x:latest` are one model).
    pub fn has_model(&self, model: &str) -> bool {
        let wanted = crate::registry::canonical_model(model);
        self.models
            .iter()
            .any(|m| crate::registry::canonical_model(m) == wanted)
    }
}

impl Cluster {
    /// The arguments REGISTER and REFRESH share: ttl, id, max, epoch, node, addr, name,
    /// models, load.
    fn record_args(&self, device: &Device, epoch: &str, max: usize) -> Vec<String> {
        let models = serde_json::to_string(&device.models()).unwrap_or_else(|_| "[]".into());
        vec![
            self.ttl.as_millis().to_string(),
            device.id.clone(),
            max.to_string(),
            epoch.to_owned(),
            self.node.clone(),
            self.advertise.clone(),
            device.name.clone(),
            models,
            device.in_flight().to_string(),
        ]
    }

    /// Records a device that has just registered here, unless its user already has `max`
    /// other devices in the cluster: then the names of those. With Redis unreachable it is
    /// recorded later, by the refresh, and only the node's own count applied.
    pub(crate) async fn register(
        &self,
        device: &Arc<Device>,
        max: usize,
    ) -> Result<(), Vec<String>> {
        let epoch = uuid::Uuid::new_v4().simple().to_string();
        if self.skip_redis() {
            // Recorded by the next refresh once Redis answers; the node's own limit applies.
            lock(&self.held).insert(
                device.tunnel_id,
                Held {
                    device: device.clone(),
                    epoch,
                },
            );
            return Ok(());
        }
        let mut invocation = REGISTER_SCRIPT.prepare_invoke();
        invocation.key(user_key(&device.user)).key(format!(
            "{}{}",
            device_prefix(&device.user),
            device.id
        ));
        for arg in self.record_args(device, &epoch, max) {
            invocation.arg(arg);
        }
        invocation.arg(device_prefix(&device.user));
        let result: redis::RedisResult<Vec<Value>> =
            invocation.invoke_async(&mut self.conn()).await;
        self.metrics.presence_ops.inc();
        let recorded = match self.noted("register", result) {
            Some(reply) if reply.first() == Some(&Value::Int(0)) => {
                let names = reply[1..]
                    .iter()
                    .filter_map(|v| redis::from_redis_value_ref::<String>(v).ok())
                    .collect();
                return Err(names);
            }
            Some(_) => true,
            None => false,
        };
        debug!(
            recorded,
            tunnel = device.tunnel_id,
            "device recorded in presence"
        );
        lock(&self.held).insert(
            device.tunnel_id,
            Held {
                device: device.clone(),
                epoch,
            },
        );
        if recorded {
            self.publish_local(&super::Control::Replaced {
                user: device.user.clone(),
                id: device.id.clone(),
                node: self.node.clone(),
            })
            .await;
        }
        // The tunnel may have ended while Redis answered.
        if device.is_replaced() || !self.registry.holds(device) {
            self.remove(device.tunnel_id).await;
        }
        Ok(())
    }

    /// Removes a tunnel's record, if it is still this connection's.
    async fn remove(&self, tunnel_id: u64) {
        let Some(held) = lock(&self.held).remove(&tunnel_id) else {
            return;
        };
        let device = &held.device;
        let result: redis::RedisResult<i64> = REMOVE_SCRIPT
            .key(user_key(&device.user))
            .key(format!("{}{}", device_prefix(&device.user), device.id))
            .arg(&device.id)
            .arg(&held.epoch)
            .invoke_async(&mut self.conn())
            .await;
        self.metrics.presence_ops.inc();
        self.noted("remove", result);
    }

    /// `user`'s devices held by other nodes. Empty when Redis is unreachable.
    pub async fn remote_devices(&self, user: &str) -> Vec<RemoteDevice> {
        if self.skip_redis() {
            return Vec::new();
        }
        let result: redis::RedisResult<Vec<String>> = LIST_SCRIPT
            .key(user_key(user))
            .arg(device_prefix(user))
            .invoke_async(&mut self.conn())
            .await;
        let Some(flat) = self.noted("list", result) else {
            return Vec::new();
        };
        flat.chunks_exact(7)
            .filter(|f| f[1] != self.node)
            .map(|f| RemoteDevice {
                id: f[0].clone(),
                node: f[1].clone(),
                addr: f[2].clone(),
                name: f[3].clone(),
                models: serde_json::from_str(&f[4]).unwrap_or_default(),
                load: f[5].parse().unwrap_or(0),
            })
            .collect()
    }

    /// Refreshes every record this node holds (and this node's own liveness), in pipelines.
    /// Records found missing are written again; records another node now holds close the
    /// local tunnel, whose device reconnected there.
    pub(super) async fn refresh(&self) {
        let held: Vec<(Arc<Device>, String)> = lock(&self.held)
            .values()
            .map(|h| (h.device.clone(), h.epoch.clone()))
            .collect();
        let ttl = self.ttl.as_millis().to_string();
        let alive: redis::RedisResult<()> = script(
            "redis.call('ZADD', KEYS[1], now + ARGV[1], ARGV[2])\nredis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - 3600000)\nredis.call('HSET', KEYS[2], ARGV[2], ARGV[3])\nreturn 0",
        )
        .key(super::limits::NODES_KEY)
        .key(NODE_DEVICES_KEY)
        .arg(&ttl)
        .arg(&self.node)
        .arg(held.len())
        .invoke_async(&mut self.conn())
        .await;
        if self.noted("node heartbeat", alive).is_none() {
            return;
        }
        let refresh = &*REFRESH_SCRIPT;
        let (mut rebuilt, mut lost) = (0, Vec::new());
        for batch in held.chunks(REFRESH_BATCH) {
            let mut pipe = redis::pipe();
            pipe.cmd("SCRIPT")
                .arg("LOAD")
                .arg(format!("{NOW}{REFRESH}"))
                .ignore();
            for (device, epoch) in batch {
                pipe.cmd("EVALSHA")
                    .arg(refresh.get_hash())
                    .arg(2)
                    .arg(user_key(&device.user))
                    .arg(format!("{}{}", device_prefix(&device.user), device.id))
                    .arg(self.record_args(device, epoch, 0));
            }
            let result: redis::RedisResult<Vec<i64>> = pipe.query_async(&mut self.conn()).await;
            self.metrics.presence_ops.inc_by(batch.len() as u64);
            let Some(outcomes) = self.noted("refresh", result) else {
                return;
            };
            for ((device, _), outcome) in batch.iter().zip(outcomes) {
                match outcome {
                    0 => lost.push(device.clone()),
                    2 => rebuilt += 1,
                    _ => {}
                }
            }
        }
        if rebuilt > 0 {
            info!(
                rebuilt,
                "presence records written again (Redis had lost them)"
            );
        }
        for device in lost {
            self.superseded(&device);
        }
    }

    /// A device of this node reconnected to another node: its tunnel here is stale.
    pub(super) fn superseded(&self, device: &Arc<Device>) {
        info!(
            tunnel = device.tunnel_id,
            "the device reconnected to another node: closing its tunnel here"
        );
        lock(&self.held).remove(&device.tunnel_id);
        self.registry.replace(device);
    }

    /// Removes every record this node holds at once (graceful shutdown), and this node from
    /// the live nodes.
    async fn remove_all(&self) {
        let ids: Vec<u64> = lock(&self.held).keys().copied().collect();
        let removed = futures_util::future::join_all(ids.into_iter().map(|id| self.remove(id)));
        let _ = tokio::time::timeout(Duration::from_secs(5), removed).await;
        let mut conn = self.conn();
        let _: redis::RedisResult<()> = redis::pipe()
            .cmd("ZREM")
            .arg(super::limits::NODES_KEY)
            .arg(&self.node)
            .ignore()
            .cmd("HDEL")
            .arg(NODE_DEVICES_KEY)
            .arg(&self.node)
            .ignore()
            .query_async(&mut conn)
            .await;
    }

    /// The devices this node has recorded, for tests and `/metrics`.
    pub fn held(&self) -> usize {
        lock(&self.held).len()
    }
}

/// The presence task: refreshes every `ttl / 3`, removes the records of tunnels that end, and
/// on shutdown removes every record of this node at once.
pub(super) async fn run(
    cluster: Arc<Cluster>,
    mut changes: UnboundedReceiver<Change>,
    shutdown: CancellationToken,
) {
    let mut tick = tokio::time::interval(cluster.ttl / 3);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => cluster.refresh().await,
            change = changes.recv() => match change {
                Some(Change::Down(tunnel_id)) => cluster.remove(tunnel_id).await,
                Some(Change::Models(tunnel_id)) => cluster.models_changed(tunnel_id).await,
                None => break,
            },
            () = shutdown.cancelled() => break,
        }
    }
    // Tunnels drain after shutdown begins; their records go now, so that no node sends this
    // one new requests.
    cluster.remove_all().await;
    info!("presence removed");
    if cluster.held() > 0 {
        warn!(
            left = cluster.held(),
            "some presence records could not be removed: they expire"
        );
    }
}

impl Cluster {
    /// A device's models changed: its record now, and every node told.
    async fn models_changed(&self, tunnel_id: u64) {
        let Some((device, epoch)) = lock(&self.held)
            .get(&tunnel_id)
            .map(|h| (h.device.clone(), h.epoch.clone()))
        else {
            return;
        };
        let mut invocation = REFRESH_SCRIPT.prepare_invoke();
        invocation.key(user_key(&device.user)).key(format!(
            "{}{}",
            device_prefix(&device.user),
            device.id
        ));
        for arg in self.record_args(&device, &epoch, 0) {
            invocation.arg(arg);
        }
        let result: redis::RedisResult<i64> = invocation.invoke_async(&mut self.conn()).await;
        self.metrics.presence_ops.inc();
        if self.noted("models", result).is_some() {
            self.publish_local(&super::Control::Models {
                user: device.user.clone(),
            })
            .await;
        }
    }
}
