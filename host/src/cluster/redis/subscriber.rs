//! The node's dedicated pub/sub connection: deliveries addressed to this node,
//! the cluster's presence events, and keyspace notifications of channel
//! membership changes, all on one connection so they arrive in publish order.
//!
//! Shaped like a supervisor over `listen`: a bad message is logged and skipped;
//! a lost connection returns `Err`, and the supervisor reconnects with backoff,
//! resubscribes, clears the channel cache (notifications may have been missed)
//! and asks for a presence resync (Redis may have restarted empty). The
//! backoff ends early when a publish goes through (Redis is back): until this
//! node has resubscribed, messages published to it reach no one.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use imhost_client::api::PresenceEvent;
use imhost_client::wire::{ServerMessage, TokenValue};
use tokio::sync::{broadcast, mpsc};
use tracing::{info, warn};

use super::presence::RedisPresence;
use crate::cluster::{PresenceChange, PresenceKind, Topology};
use crate::shutdown::Shutdown;
use crate::stats::Stats;

const MIN_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// What the subscriber feeds.
pub struct Subscriber {
    pub presence: Arc<RedisPresence>,
    pub topology: Topology,
    pub inbox: mpsc::Sender<ServerMessage>,
    pub events: broadcast::Sender<PresenceChange>,
    pub stats: Arc<Stats>,
    pub shutdown: Shutdown,
    /// Redis logical database, for keyspace notification channel names.
    pub db: i64,
    /// Notified when a publish went through: Redis is back, so reconnect now
    /// rather than at the end of the backoff.
    pub redis_up: Arc<tokio::sync::Notify>,
}

impl Subscriber {
    /// Runs until the node has drained; reconnects whenever the connection drops.
    pub async fn run(self) {
        let mut backoff = MIN_BACKOFF;
        let mut ever_connected = false;
        loop {
            let outcome = tokio::select! {
                outcome = self.listen(&mut ever_connected, &mut backoff) => outcome,
                () = self.shutdown.drained().cancelled() => return,
            };
            if let Err(err) = outcome {
                warn!(cause = %err, retry_in = ?backoff, "redis subscription lost");
            }
            self.presence.cache.set_enabled(false);
            tokio::select! {
                () = tokio::time::sleep(backoff) => {}
                () = self.redis_up.notified() => {}
                () = self.shutdown.drained().cancelled() => return,
            }
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }

    async fn listen(
        &self,
        ever_connected: &mut bool,
        backoff: &mut Duration,
    ) -> redis::RedisResult<()> {
        let keys = self.presence.keys().clone();
        let imhost_client::helper::RedisTarget::Standalone(client) = self.presence.helper.target()
        else {
            return Err(redis::RedisError::from(std::io::Error::other(
                "the standalone subscriber needs a standalone Redis",
            )));
        };
        let mut pubsub = client.get_async_pubsub().await?;
        let server_channel = keys.server(&self.topology.me);
        pubsub.subscribe(&server_channel).await?;
        pubsub.subscribe(keys.online_event()).await?;
        pubsub.subscribe(keys.offline_event()).await?;
        let keyspace_prefix = format!("__keyspace@{}__:{}", self.db, keys.chan(""));
        let cache_on = enable_keyspace_events(&self.presence).await;
        if cache_on {
            pubsub.psubscribe(format!("{keyspace_prefix}*")).await?;
        }
        // Subscribed: from here on nothing is missed, so start the cache afresh.
        self.presence.cache.set_enabled(cache_on);
        if *ever_connected {
            info!("redis subscription restored");
            self.presence.mark_dirty();
        }
        *ever_connected = true;
        *backoff = MIN_BACKOFF;

        let online = keys.online_event();
        let offline = keys.offline_event();
        let mut messages = pubsub.into_on_message();
        while let Some(msg) = messages.next().await {
            let channel = msg.get_channel_name();
            if channel == server_channel {
                let Ok(payload) = std::str::from_utf8(msg.get_payload_bytes()) else {
                    self.skip("payload is not UTF-8");
                    continue;
                };
                match ServerMessage::decode(payload) {
                    // Bounded: a burst waits here, and Redis buffers for us.
                    Ok(message) => {
                        if self.inbox.send(message).await.is_err() {
                            return Ok(());
                        }
                    }
                    Err(err) => self.skip(&err.to_string()),
                }
            } else if channel == online || channel == offline {
                let kind = if channel == online {
                    PresenceKind::Online
                } else {
                    PresenceKind::Offline
                };
                match presence_change(&self.topology, kind, msg.get_payload_bytes()) {
                    Ok(change) => {
                        let _ = self.events.send(change);
                    }
                    Err(err) => self.skip(&err.to_string()),
                }
            } else if let Some(chan) = channel.strip_prefix(&keyspace_prefix) {
                self.presence.cache.invalidate(chan);
            }
        }
        Err(redis::RedisError::from(std::io::Error::other(
            "pub/sub connection closed",
        )))
    }

    fn skip(&self, why: &str) {
        Stats::incr(&self.stats.dispatch_errors);
        warn!(why, "skipped a malformed message on the node channel");
    }
}

/// A presence event as it comes over pub/sub (a FreeIM token value), with
/// the node that holds the client: shared by both subscribers.
pub(super) fn presence_change(
    topology: &Topology,
    kind: PresenceKind,
    payload: &[u8],
) -> Result<PresenceChange, serde_json::Error> {
    let value: TokenValue = serde_json::from_slice(payload)?;
    Ok(PresenceChange {
        kind,
        event: PresenceEvent {
            client_id: value.client_id,
            server: topology.node_for(value.client_id).to_owned(),
            metadata: value.metadata,
        },
    })
}

/// Waits before asking again over a command connection that failed at the
/// connection level (see [`enable_keyspace_events`]): 50, 100, 200, 400 ms.
const CONFIG_RETRIES: [Duration; 4] = [
    Duration::from_millis(50),
    Duration::from_millis(100),
    Duration::from_millis(200),
    Duration::from_millis(400),
];

/// Turns on keyspace notifications for hash and generic commands, keeping
/// flags already set; returns whether the channel cache may be on. False
/// where CONFIG is not allowed (Redis refuses it: asked once).
///
/// Asked over the shared command connection, which after a Redis restart
/// may still hold the socket of the Redis that went away: this subscriber
/// reconnects first, and the connection manager only notices at its next
/// command, which fails ("broken pipe") while it reconnects. So a failure at
/// the connection level is asked again a few times ([`CONFIG_RETRIES`])
/// before the cache is given up until the next subscription; giving it up
/// at the first one left every node after a Redis restart reading each
/// channel's members from Redis per message, for good (`scripts/soak` found
/// it).
async fn enable_keyspace_events(presence: &RedisPresence) -> bool {
    let mut retries = CONFIG_RETRIES.iter();
    loop {
        match keyspace_events_on(presence).await {
            Ok(()) => return true,
            Err(err) if connection_failed(&err) => {
                if let Some(wait) = retries.next() {
                    tokio::time::sleep(*wait).await;
                    continue;
                }
                warn!(cause = %err, "cannot reach Redis to enable keyspace notifications; channel cache off");
            }
            Err(err) => {
                warn!(cause = %err, "cannot enable keyspace notifications; channel cache off");
            }
        }
        return false;
    }
}

/// `CONFIG GET`, then `CONFIG SET` if the flags the cache needs are missing.
async fn keyspace_events_on(presence: &RedisPresence) -> redis::RedisResult<()> {
    let mut conn = presence.helper.connection();
    let (_, flags): (String, String) = redis::cmd("CONFIG")
        .arg("GET")
        .arg("notify-keyspace-events")
        .query_async(&mut conn)
        .await?;
    let has = |c: char| flags.contains(c);
    if has('K') && (has('A') || (has('h') && has('g'))) {
        return Ok(());
    }
    let mut wanted = flags.clone();
    for c in ['K', 'h', 'g'] {
        if !wanted.contains(c) {
            wanted.push(c);
        }
    }
    redis::cmd("CONFIG")
        .arg("SET")
        .arg("notify-keyspace-events")
        .arg(&wanted)
        .query_async(&mut conn)
        .await
}

/// The command never got an answer from Redis (as opposed to Redis
/// refusing it).
fn connection_failed(err: &redis::RedisError) -> bool {
    err.is_io_error()
        || err.is_connection_dropped()
        || err.is_connection_refusal()
        || err.is_timeout()
}
