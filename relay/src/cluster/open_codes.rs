//! `cloudllm open`'s one-time codes across nodes: the daemon's `POST /cloudllm/open` lands on
//! one node and the browser's exchange on any other, so with `[cluster]` each code is also kept
//! in Redis under `cl:o:<code>` (for the code's minute) and taken with `GETDEL`, which makes it
//! single-use over every node. Only the user and tier are stored, never a token.

use std::time::Duration;

use redis::AsyncCommands;
use serde::{Deserialize, Serialize};

use super::Cluster;

/// What a code stands for, as stored in Redis.
#[derive(Debug, Serialize, Deserialize)]
struct Stored {
    user: String,
    tier: Option<String>,
}

fn key(code: &str) -> String {
    format!("cl:o:{code}")
}

impl Cluster {
    /// Keeps a freshly minted code for `ttl` where every node finds it. Unreachable Redis:
    /// the code still works on this node.
    pub(crate) async fn put_open_code(
        &self,
        code: &str,
        user: &str,
        tier: Option<&str>,
        ttl: Duration,
    ) {
        if self.skip_redis() {
            return;
        }
        let value = serde_json::json!({ "user": user, "tier": tier }).to_string();
        let result: redis::RedisResult<()> = self
            .conn()
            .set_ex(key(code), value, ttl.as_secs().max(1))
            .await;
        self.noted("open code", result);
    }

    /// Takes a code once, whichever node minted it: the user and tier it stands for, or
    /// `Ok(None)` when no node holds it any more (unknown, expired or used). `Err` when Redis
    /// cannot be asked: the caller falls back to what this node holds.
    pub(crate) async fn take_open_code(
        &self,
        code: &str,
    ) -> Result<Option<(String, Option<String>)>, Unreachable> {
        if self.skip_redis() {
            return Err(Unreachable);
        }
        let result: redis::RedisResult<Option<String>> = self.conn().get_del(key(code)).await;
        let stored = self.noted("open code", result).ok_or(Unreachable)?;
        Ok(stored
            .and_then(|text| serde_json::from_str::<Stored>(&text).ok())
            .map(|stored| (stored.user, stored.tier)))
    }
}

/// Redis could not be asked (the node is degraded).
#[derive(Debug)]
pub(crate) struct Unreachable;
