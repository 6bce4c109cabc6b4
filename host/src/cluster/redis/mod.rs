//! The cluster over Redis, FreeIM v2 compatible (SPEC section 2).
//!
//! # Layout
//! - `presence` — [`RedisPresence`]: tokens, online counts, channels, this
//!   node's own records.
//! - `scripts` — the Lua behind this node's records.
//! - `buckets` — the same records on a Redis Cluster, spread over presence
//!   buckets, with run incarnations so that only the dead are reaped.
//! - `channel_cache` — channel members cached for delivery, invalidated by
//!   keyspace notifications.
//! - `subscriber` — the pub/sub connection feeding the inbox and event stream.
//! - `sharded` — deliveries on a Redis Cluster: sharded pub/sub, kept alive.
//! - `events` — presence events on a Redis Cluster, on their own connection.
//! - `liveness` — node liveness keys and the reaping of dead nodes.
//!
//! Publishing goes through the helper's connection: one multiplexed
//! connection that pipelines concurrent commands and reconnects by itself
//! (on a Redis Cluster, the cluster connection, which follows the slots).

mod buckets;
mod channel_cache;
mod events;
mod liveness;
mod presence;
mod scripts;
mod sharded;
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

/// How long a publish that no node heard is retried before the caller is
/// told: the pauses between attempts, about 1.5 s in all. A node resubscribes
/// within a few milliseconds of Redis coming back, so this covers a restart,
/// and a node that stays silent this long is down.
const UNHEARD_RETRIES: [Duration; 8] = [
    Duration::from_millis(5),
    Duration::from_millis(10),
    Duration::from_millis(25),
    Duration::from_millis(50),
    Duration::from_millis(100),
    Duration::from_millis(200),
    Duration::from_millis(400),
    Duration::from_millis(700),
];

/// Publishes to other nodes and to the event channels.
///
/// Redis pub/sub forgets a message no one is subscribed to, so every publish
/// counts its receivers: 0 on a node channel means the node is not listening
/// (down, or not yet resubscribed after a Redis restart). Such a publish is
/// retried for a short while (re-publishing is safe: no one heard it), and
/// then the call fails naming the node, so an API call never answers 200 for
/// a message that reached no node.
pub struct RedisRelay {
    helper: ImHelper,
    stats: Arc<Stats>,
    /// Woken on every publish that went through: a subscriber waiting out
    /// its reconnect backoff retries at once, because Redis is back.
    redis_up: Arc<tokio::sync::Notify>,
}

impl RedisRelay {
    /// Publishes to `nodes` until each has been heard or the retries run out;
    /// returns the nodes that never were.
    async fn publish_until_heard(
        &self,
        nodes: &[&str],
        message: &ServerMessage,
    ) -> Result<Vec<String>, ClusterError> {
        let mut pending: Vec<&str> = nodes.to_vec();
        let mut pauses = UNHEARD_RETRIES.iter();
        // One id for the publish and all its retries (see Envelope).
        let id = imhost_client::wire::new_delivery_id();
        loop {
            let heard = self
                .helper
                .publish_each_heard_as(&pending, message, id)
                .await?;
            self.redis_up.notify_waiters();
            pending = pending
                .into_iter()
                .zip(heard)
                .filter(|&(_, receivers)| receivers == 0)
                .map(|(node, _)| node)
                .collect();
            if pending.is_empty() {
                return Ok(Vec::new());
            }
            let Some(pause) = pauses.next() else {
                return Ok(pending.into_iter().map(str::to_owned).collect());
            };
            Stats::add(&self.stats.publish_retries, pending.len() as u64);
            // On a Redis Cluster the miss may be ours: a stale map of the
            // slots sends the publish to a demoted master (no-op otherwise).
            for node in &pending {
                if let Err(err) = self.helper.refresh_route(node).await {
                    tracing::debug!(node, cause = %err, "route not refreshed");
                }
            }
            tokio::time::sleep(*pause).await;
        }
    }

    fn unheard(&self, nodes: Vec<String>) -> Result<(), ClusterError> {
        if nodes.is_empty() {
            return Ok(());
        }
        Stats::incr(&self.stats.publish_unheard);
        Err(ClusterError::Unheard(nodes))
    }

    async fn node_alive(&self, node: &str) -> Result<bool, ClusterError> {
        let mut conn = self.helper.connection();
        let alive: bool =
            redis::AsyncCommands::exists(&mut conn, self.helper.keys().node_alive(node)).await?;
        Ok(alive)
    }
}

#[async_trait]
impl Relay for RedisRelay {
    async fn send(&self, node: &str, message: ServerMessage) -> Result<(), ClusterError> {
        let unheard = self.publish_until_heard(&[node], &message).await?;
        self.unheard(unheard)
    }

    async fn send_all(&self, message: ServerMessage) -> Result<(), ClusterError> {
        let nodes: Vec<&str> = self.helper.servers().iter().map(String::as_str).collect();
        let unheard = self.publish_until_heard(&nodes, &message).await?;
        // A node whose liveness key is gone is dead: its clients are offline
        // (or about to be reaped), so a channel message misses no one there.
        let mut alive = Vec::new();
        for node in unheard {
            if self.node_alive(&node).await? {
                alive.push(node);
            }
        }
        self.unheard(alive)
    }

    async fn announce(&self, change: PresenceChange) -> Result<(), ClusterError> {
        let keys = self.helper.keys();
        let client = change.event.client_id;
        let channel = match change.kind {
            PresenceKind::Online => keys.online_event_of(client),
            PresenceKind::Offline => keys.offline_event_of(client),
        };
        let payload = serde_json::to_string(&TokenValue {
            client_id: change.event.client_id,
            metadata: change.event.metadata,
        })
        .unwrap_or_default();
        let mut conn = self.helper.connection();
        // On a cluster, sharded: one master carries it, not all of them.
        let publish = if keys.is_cluster() {
            "SPUBLISH"
        } else {
            "PUBLISH"
        };
        let _: i64 = redis::cmd(publish)
            .arg(channel)
            .arg(payload)
            .query_async(&mut conn)
            .await?;
        Ok(())
    }
}

/// Which Redis the nodes share.
#[derive(Debug, Clone)]
pub enum Connect {
    /// One Redis (or a proxy in front of several): FreeIM's wire format.
    Standalone(String),
    /// A Redis Cluster, by some of its nodes' URLs (imhost-native keys).
    Cluster(Vec<String>),
}

/// What joining the cluster needs.
pub struct Setup {
    pub connect: Connect,
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
    let servers = setup.topology.servers.clone();
    let helper = match &setup.connect {
        Connect::Standalone(url) => {
            let helper = ImHelper::connect(url, servers, WS_PATH)
                .await
                .with_context(|| format!("cannot connect to redis at {url}"))?;
            refuse_cluster_node(&helper, url).await?;
            helper
        }
        Connect::Cluster(seeds) => ImHelper::connect_cluster(seeds, servers, WS_PATH)
            .await
            .with_context(|| {
                format!(
                    "cannot connect to a Redis Cluster through {} (for a single Redis, use --redis)",
                    seeds.join(",")
                )
            })?,
    };
    let presence = Arc::new(RedisPresence::new(
        helper.clone(),
        setup.topology.me.clone(),
        setup.node_ttl,
    ));
    let stale = presence
        .begin(setup.node_ttl)
        .await
        .context("cannot clear this node's previous presence records")?;
    if stale > 0 {
        info!(
            clients = stale,
            "cleared presence left by this node's previous run"
        );
    }

    let redis_up = Arc::new(tokio::sync::Notify::new());
    match helper.target() {
        imhost_client::helper::RedisTarget::Cluster(seeds) => {
            tokio::spawn(
                sharded::ShardedSubscriber {
                    seeds: seeds.clone(),
                    presence: presence.clone(),
                    topology: setup.topology.clone(),
                    inbox: setup.inbox,
                    stats: setup.stats.clone(),
                    shutdown: setup.shutdown.clone(),
                }
                .run(),
            );
            tokio::spawn(
                events::EventSubscriber {
                    seeds: seeds.clone(),
                    presence: presence.clone(),
                    topology: setup.topology.clone(),
                    events: setup.events,
                    stats: setup.stats.clone(),
                    shutdown: setup.shutdown.clone(),
                }
                .run(),
            );
        }
        imhost_client::helper::RedisTarget::Standalone(client) => {
            let db = client.get_connection_info().redis_settings().db();
            tokio::spawn(
                subscriber::Subscriber {
                    redis_up: redis_up.clone(),
                    presence: presence.clone(),
                    topology: setup.topology.clone(),
                    inbox: setup.inbox,
                    events: setup.events,
                    stats: setup.stats.clone(),
                    shutdown: setup.shutdown.clone(),
                    db,
                }
                .run(),
            );
        }
    }
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
        helper.keys().clone(),
    ));
    Ok(super::Backends {
        relay: Arc::new(RedisRelay {
            helper,
            stats: setup.stats,
            redis_up,
        }),
        presence,
        kv,
    })
}

/// A standalone URL that names a Redis Cluster node would misroute every
/// key (MOVED errors, half the data in the wrong place): refused at start.
async fn refuse_cluster_node(helper: &ImHelper, url: &str) -> anyhow::Result<()> {
    let mut conn = helper.connection();
    let info: String = redis::cmd("INFO")
        .arg("cluster")
        .query_async(&mut conn)
        .await
        .unwrap_or_default();
    if info.contains("cluster_enabled:1") {
        anyhow::bail!(
            "{url} is a node of a Redis Cluster: start with --redis-cluster (IMHOST_REDIS_CLUSTER) and its nodes' URLs"
        );
    }
    Ok(())
}
