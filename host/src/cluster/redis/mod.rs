//! The cluster over Redis, FreeIM v2 compatible (SPEC section 2).
//!
//! # Layout
//! - `presence` — [`RedisPresence`]: tokens, online counts, channels, this
//!   node's own records.
//! - `scripts` — the Lua behind this node's records.
//! - `channel_cache` — channel members cached for delivery, invalidated by
//!   keyspace notifications.
//! - `subscriber` — the pub/sub connection feeding the inbox and event stream.
//! - `liveness` — node liveness keys and the reaping of dead nodes.
//!
//! Publishing goes through the helper's `ConnectionManager`: one multiplexed
//! connection that pipelines concurrent commands and reconnects by itself.

mod channel_cache;
mod liveness;
mod presence;
mod scripts;
mod subscriber;

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use async_trait::async_trait;
use imhost_client::helper::ImHelper;
use imhost_client::wire::{ServerMessage, TokenValue};
use tokio::sync::{broadcast, mpsc};
use tracing::info;

pub use presence::RedisPresence;

use super::{ClusterError, PresenceChange, PresenceKind, Relay, Topology};
use crate::config::WS_PATH;
use crate::shutdown::Shutdown;
use crate::stats::Stats;

/// Publishes to other nodes and to the event channels.
pub struct RedisRelay {
    helper: ImHelper,
}

#[async_trait]
impl Relay for RedisRelay {
    async fn send(&self, node: &str, message: ServerMessage) -> Result<(), ClusterError> {
        Ok(self.helper.publish(node, &message).await?)
    }

    async fn send_all(&self, message: ServerMessage) -> Result<(), ClusterError> {
        Ok(self.helper.publish_all(&message).await?)
    }

    async fn announce(&self, change: PresenceChange) -> Result<(), ClusterError> {
        let keys = self.helper.keys();
        let channel = match change.kind {
            PresenceKind::Online => keys.online_event(),
            PresenceKind::Offline => keys.offline_event(),
        };
        let payload = serde_json::to_string(&TokenValue {
            client_id: change.event.client_id,
            metadata: change.event.metadata,
        })
        .unwrap_or_default();
        let mut conn = self.helper.connection();
        let _: i64 = redis::AsyncCommands::publish(&mut conn, channel, payload).await?;
        Ok(())
    }
}

/// What joining the cluster needs.
pub struct Setup {
    pub url: String,
    pub topology: Topology,
    pub inbox: mpsc::Sender<ServerMessage>,
    pub events: broadcast::Sender<PresenceChange>,
    pub stats: Arc<Stats>,
    pub shutdown: Shutdown,
    pub node_ttl: Duration,
}

/// Connects to Redis, clears this node's records from a previous life, and
/// starts the subscriber and liveness tasks.
///
/// # Errors
/// Redis is unreachable or the URL is invalid.
pub async fn start(setup: Setup) -> anyhow::Result<super::Backends> {
    let helper = ImHelper::connect(&setup.url, setup.topology.servers.clone(), WS_PATH)
        .await
        .with_context(|| format!("cannot connect to redis at {}", setup.url))?;
    let db = helper
        .redis_client()
        .get_connection_info()
        .redis_settings()
        .db();
    let presence = Arc::new(RedisPresence::new(
        helper.clone(),
        setup.topology.me.clone(),
    ));
    let stale = presence
        .reap(&setup.topology.me, true)
        .await
        .context("cannot clear this node's previous presence records")?;
    if stale > 0 {
        info!(
            clients = stale,
            "cleared presence left by this node's previous run"
        );
    }
    presence
        .refresh_alive(setup.node_ttl)
        .await
        .context("cannot write this node's liveness key")?;

    tokio::spawn(
        subscriber::Subscriber {
            presence: presence.clone(),
            topology: setup.topology.clone(),
            inbox: setup.inbox,
            events: setup.events,
            stats: setup.stats,
            shutdown: setup.shutdown.clone(),
            db,
        }
        .run(),
    );
    tokio::spawn(
        liveness::Liveness {
            presence: presence.clone(),
            topology: setup.topology,
            shutdown: setup.shutdown,
            ttl: setup.node_ttl,
        }
        .run(),
    );
    let kv = Arc::new(super::kv::RedisKv::new(
        helper.connection(),
        helper.keys().prefix(),
    ));
    Ok(super::Backends {
        relay: Arc::new(RedisRelay { helper }),
        presence,
        kv,
    })
}
