//! Node liveness: each node refreshes a key with a TTL; every node checks the
//! others' and reaps a dead node's presence (its clients leave `Online` and,
//! when that was their last socket, their channels; one offline event each).
//! The reap is one Lua script that deletes what it undoes (on a Redis
//! Cluster, one per presence bucket, for the dead run's incarnations), so
//! however many nodes notice a death at once, it happens exactly once.
//!
//! The same task rewrites this node's own records when they may be wrong
//! (Redis came back, a write failed).

use std::sync::Arc;
use std::time::Duration;

use tracing::{info, warn};

use super::presence::RedisPresence;
use crate::cluster::Topology;
use crate::shutdown::Shutdown;

pub struct Liveness {
    pub presence: Arc<RedisPresence>,
    pub topology: Topology,
    pub shutdown: Shutdown,
    /// How long a node's liveness key lives without a refresh.
    pub ttl: Duration,
}

impl Liveness {
    /// Runs until shutdown; then withdraws this node's liveness key.
    pub async fn run(self) {
        let period = self.ttl / 3;
        loop {
            self.beat().await;
            tokio::select! {
                () = tokio::time::sleep(period) => {}
                () = self.presence.resync_due.notified() => {}
                () = self.shutdown.drained().cancelled() => break,
            }
        }
        if let Err(err) = self.presence.withdraw().await {
            warn!(cause = %err, "could not withdraw the liveness key");
        }
    }

    async fn beat(&self) {
        if let Err(err) = self.presence.refresh_alive(self.ttl).await {
            warn!(cause = %err, "could not refresh the liveness key");
            self.presence.mark_dirty();
            return;
        }
        if self.presence.take_dirty() {
            match self.presence.resync().await {
                Ok(()) => info!("presence records resynchronised"),
                Err(err) => warn!(cause = %err, "presence resync failed; will retry"),
            }
        }
        for node in &self.topology.servers {
            if *node == self.topology.me {
                continue;
            }
            match self.presence.reap(node).await {
                Ok(0) => {}
                Ok(clients) => warn!(
                    node,
                    clients, "node is gone; its clients were taken offline"
                ),
                Err(err) => warn!(cause = %err, node, "could not check node liveness"),
            }
        }
    }
}
