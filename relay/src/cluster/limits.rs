//! A user's request limits over the whole cluster, in Redis: requests per minute and requests
//! in flight. The node's own in-memory limits ([`crate::limits`]) still apply first; these add
//! what the other nodes count.
//!
//! How exact each is: requests in flight are counted per node in one hash per user and checked
//! and taken in one Lua script, so the bound is exact while Redis answers, except that a node
//! that died keeps its count until its liveness entry expires (the presence TTL). Requests per
//! minute use a fixed one-minute window (Redis' clock): at most the tier's number in each
//! calendar minute, so up to twice that within 60 s straddling a minute's turn. With Redis
//! unreachable each node applies its own limits only (degraded).

use std::sync::{Arc, LazyLock};
use std::time::Duration;

use redis::Script;

use super::Cluster;
use crate::config::TierLimits;
use crate::limits::{Limit, Refusal};

/// The sorted set of live nodes, scored by the expiry of their last heartbeat.
pub(super) const NODES_KEY: &str = "cl:n";

/// How long a user's in-flight hash outlives its last change: a day, far past any stream.
const IN_FLIGHT_KEY_TTL_SECS: u64 = 86_400;

/// KEYS: the user's minute counter prefix. ARGV: the limit. 0 when admitted, else the seconds
/// until the next minute.
const RATE: &str = "
local t = redis.call('TIME')
local key = KEYS[1] .. ':' .. math.floor(t[1] / 60)
local n = redis.call('INCR', key)
if n == 1 then redis.call('EXPIRE', key, 120) end
if n > tonumber(ARGV[1]) then return 60 - (t[1] % 60) end
return 0
";

/// KEYS: the user's in-flight hash, the live nodes. ARGV: this node, the limit, key TTL.
/// Counts of dead nodes are dropped. 1 when taken, 0 when full.
const ACQUIRE: &str = "
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local fields = redis.call('HGETALL', KEYS[1])
local sum = 0
for i = 1, #fields, 2 do
  local node = fields[i]
  local alive = node == ARGV[1]
  if not alive then
    local until_ms = redis.call('ZSCORE', KEYS[2], node)
    alive = until_ms and tonumber(until_ms) > now
  end
  if alive then sum = sum + tonumber(fields[i + 1]) else redis.call('HDEL', KEYS[1], node) end
end
if sum >= tonumber(ARGV[2]) then return 0 end
redis.call('HINCRBY', KEYS[1], ARGV[1], 1)
redis.call('EXPIRE', KEYS[1], ARGV[3])
return 1
";

/// KEYS: the user's in-flight hash. ARGV: this node.
const RELEASE: &str = "
if redis.call('HINCRBY', KEYS[1], ARGV[1], -1) <= 0 then redis.call('HDEL', KEYS[1], ARGV[1]) end
return 0
";

static RATE_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(RATE));
static ACQUIRE_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(ACQUIRE));
static RELEASE_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(RELEASE));

fn in_flight_key(user: &str) -> String {
    format!("cl:c:{}:{user}", user.len())
}

fn rate_key(user: &str) -> String {
    format!("cl:r:{}:{user}", user.len())
}

/// One request counted in its user's cluster-wide in-flight count until dropped.
pub(crate) struct ClusterSlot {
    cluster: Arc<Cluster>,
    user: String,
}

impl Drop for ClusterSlot {
    fn drop(&mut self) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let cluster = self.cluster.clone();
        let user = std::mem::take(&mut self.user);
        runtime.spawn(async move {
            let result: redis::RedisResult<i64> = RELEASE_SCRIPT
                .key(in_flight_key(&user))
                .arg(&cluster.node)
                .invoke_async(&mut cluster.conn())
                .await;
            cluster.noted("release", result);
        });
    }
}

impl Cluster {
    /// Admits one request of `user` against the cluster-wide limits of `tier` (`tier_name`).
    /// `Ok(None)` when Redis cannot say (degraded: the node's own limits alone apply).
    pub(crate) async fn admit(
        self: &Arc<Self>,
        user: &str,
        tier_name: &str,
        tier: &TierLimits,
    ) -> Result<Option<ClusterSlot>, Refusal> {
        if self.skip_redis() {
            return Ok(None);
        }
        let acquired: redis::RedisResult<i64> = ACQUIRE_SCRIPT
            .key(in_flight_key(user))
            .key(NODES_KEY)
            .arg(&self.node)
            .arg(tier.concurrent_requests)
            .arg(IN_FLIGHT_KEY_TTL_SECS)
            .invoke_async(&mut self.conn())
            .await;
        match self.noted("concurrency", acquired) {
            None => return Ok(None),
            Some(0) => {
                return Err(Refusal {
                    limit: Limit::ConcurrentRequests,
                    retry_after: Duration::from_secs(1),
                    message: format!(
                        "too many requests at once: the {tier_name} tier allows {} in flight; wait for one to finish",
                        tier.concurrent_requests
                    ),
                });
            }
            Some(_) => {}
        }
        let slot = ClusterSlot {
            cluster: self.clone(),
            user: user.to_owned(),
        };
        let rate: redis::RedisResult<u64> = RATE_SCRIPT
            .key(rate_key(user))
            .arg(tier.requests_per_minute)
            .invoke_async(&mut self.conn())
            .await;
        match self.noted("rate", rate) {
            Some(wait) if wait > 0 => Err(Refusal {
                limit: Limit::RequestsPerMinute,
                retry_after: Duration::from_secs(wait),
                message: format!(
                    "rate limit: the {tier_name} tier allows {} requests per minute; try again in {wait} s",
                    tier.requests_per_minute
                ),
            }),
            _ => Ok(Some(slot)),
        }
    }
}
