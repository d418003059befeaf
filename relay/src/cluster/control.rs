//! The control channel: what every node must hear at once, over Redis PUB/SUB.
//!
//! - `replaced`: a device registered on one node; the node that still holds an older tunnel of
//!   it closes that one now instead of at its next refresh.
//! - `drop_user`: every node closes the tunnels of a user (an operator revoking an account:
//!   [`publish`] from any tool that can reach Redis).
//! - `models`: a device's model list changed (its presence record already says so).
//!
//! PUB/SUB delivers only to those listening: a node that lost its subscription (Redis restarted
//! or unreachable) subscribes again with backoff and then refreshes its presence, which catches
//! up on anything a missed `replaced` would have said.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt as _;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::{Cluster, REDIS_RETRY_MAX, REDIS_TIMEOUT};

/// The channel every node listens on.
pub const CHANNEL: &str = "cl:control";

/// Largest control message read: they are a user and a device id.
const MAX_MESSAGE_BYTES: usize = 4096;

/// A message on the control channel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Control {
    /// `node` now holds `user`'s device `id`: any other node's tunnel of it is stale.
    Replaced {
        /// The user.
        user: String,
        /// The device id.
        id: String,
        /// The node that holds it now.
        node: String,
    },
    /// Every node closes `user`'s tunnels.
    DropUser {
        /// The user.
        user: String,
    },
    /// One of `user`'s devices has a new model list.
    Models {
        /// The user.
        user: String,
    },
}

/// Publishes `message` to every node of the cluster on `redis_url` (`redis://`, `valkey://` …).
/// Returns how many nodes heard it.
pub async fn publish(redis_url: &str, message: &Control) -> anyhow::Result<usize> {
    let url = crate::config::normalize_redis_url(redis_url)?;
    let client = redis::Client::open(url.as_str())?;
    let mut conn = tokio::time::timeout(REDIS_TIMEOUT, client.get_multiplexed_async_connection())
        .await
        .map_err(|_| anyhow::anyhow!("Redis did not answer within {REDIS_TIMEOUT:?}"))??;
    let heard: usize = redis::cmd("PUBLISH")
        .arg(CHANNEL)
        .arg(serde_json::to_string(message)?)
        .query_async(&mut conn)
        .await?;
    Ok(heard)
}

impl Cluster {
    /// Publishes `message` on the control channel (best effort: a missed message is caught up
    /// by the next refresh).
    pub(super) async fn publish_local(&self, message: &Control) {
        let Ok(text) = serde_json::to_string(message) else {
            return;
        };
        let result: redis::RedisResult<i64> = redis::cmd("PUBLISH")
            .arg(CHANNEL)
            .arg(text)
            .query_async(&mut self.conn())
            .await;
        self.noted("publish", result);
    }

    fn heard(&self, message: Control) {
        match message {
            Control::Replaced { user, id, node } if node != self.node => {
                let stale = self
                    .registry
                    .devices_of(&user)
                    .into_iter()
                    .find(|d| d.id == id);
                if let Some(device) = stale {
                    self.superseded(&device);
                }
            }
            Control::Replaced { .. } => {}
            Control::DropUser { user } => {
                let dropped = self.registry.drop_user(&user);
                info!(
                    dropped,
                    "dropped a user's tunnels on the control channel's word"
                );
            }
            Control::Models { .. } => debug!("a device's models changed on another node"),
        }
    }
}

/// Listens on the control channel until `shutdown`, subscribing again whenever the
/// subscription is lost.
pub(super) async fn run(cluster: Arc<Cluster>, shutdown: CancellationToken) {
    let mut backoff = Duration::from_millis(100);
    loop {
        let subscribed = async {
            let mut pubsub = tokio::time::timeout(REDIS_TIMEOUT, cluster.client.get_async_pubsub())
                .await
                .map_err(|_| {
                    redis::RedisError::from(std::io::Error::from(std::io::ErrorKind::TimedOut))
                })??;
            pubsub.subscribe(CHANNEL).await?;
            Ok::<_, redis::RedisError>(pubsub)
        };
        let pubsub = tokio::select! {
            pubsub = subscribed => pubsub,
            () = shutdown.cancelled() => return,
        };
        match cluster.noted("subscribe", pubsub) {
            Some(pubsub) => {
                backoff = Duration::from_millis(100);
                debug!("subscribed to the control channel");
                // Catch up on what was missed while not subscribed.
                cluster.refresh().await;
                let mut messages = pubsub.into_on_message();
                loop {
                    tokio::select! {
                        message = messages.next() => match message {
                            Some(message) => {
                                let payload = message.get_payload_bytes();
                                if payload.len() > MAX_MESSAGE_BYTES {
                                    continue;
                                }
                                match serde_json::from_slice::<Control>(payload) {
                                    Ok(control) => cluster.heard(control),
                                    Err(_) => debug!("ignored an unreadable control message"),
                                }
                            }
                            None => break,
                        },
                        () = shutdown.cancelled() => return,
                    }
                }
                warn!("control channel lost: subscribing again");
            }
            None => backoff = (backoff * 2).min(REDIS_RETRY_MAX),
        }
        tokio::select! {
            () = tokio::time::sleep(backoff) => {}
            () = shutdown.cancelled() => return,
        }
    }
}
