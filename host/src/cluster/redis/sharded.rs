//! The node's subscriptions on a Redis Cluster: its delivery channel and
//! the presence events' shard channels over sharded pub/sub (`SSUBSCRIBE`,
//! on the master of each channel's slot), and the two classic event
//! channels (for the rare events told from inside a script: reaps), all on
//! one RESP3 cluster connection.
//!
//! redis-rs resubscribes after a lost connection, but a shard subscription
//! can also end without one: a `CLUSTER FAILOVER` or a slot migration makes
//! the old owner send `SUNSUBSCRIBE`, and the library forgets the channel;
//! after a master is killed the subscription is gone until that process
//! returns. So this keeper does not trust it:
//! - an `SUNSUBSCRIBE` of the node's channel, or a disconnection, makes it
//!   subscribe again at once, on a new connection: the old one's map of the
//!   slots may be stale, and would send the subscription back to a demoted
//!   master, which as a replica accepts it and hears nothing;
//! - a watchdog publishes a ping to the node's own channel every
//!   [`WATCHDOG`] (and to one event shard's channel, in turn) through the
//!   node's command connection, after a write to
//!   the channel's slot that makes that connection find the slot's true
//!   master (`ImHelper::refresh_route`: a publish to a demoted master is
//!   accepted, a write is redirected), so the ping goes where publishers'
//!   messages go, not where the subscription went; when it has not come back
//!   within [`PING_DEADLINE`] the node subscribes again on a new connection:
//!   a silent loss lasts about a second.
//!
//! While the node is not subscribed, `SPUBLISH` to its channel counts no
//! receiver, and the publisher retries (`publish_until_heard`): what is lost
//! is only what a publisher gave up on after its retries, and that call
//! answers 503, never 200 (see docs/cluster.md, "Redis Cluster").
//!
//! A subscription can also land on a replica (right after a failover, a
//! fresh map of the slots may still name the demoted master): it still
//! receives (replication carries shard messages), but `SPUBLISH` on the
//! master does not count it, so publishers retry what was delivered. Hence
//! the watchdog's ping must also be *counted* (else: subscribe again), and
//! every cluster delivery carries an id (`Envelope`) kept across retries:
//! the node drops a copy of an id it has delivered ([`Recent`]).

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use imhost_client::helper::cluster_client;
use imhost_client::wire::{Envelope, ServerMessage};
use redis::{PushKind, Value};
use tokio::sync::{broadcast, mpsc};
use tracing::{info, warn};

use super::presence::RedisPresence;
use crate::cluster::{PresenceChange, PresenceKind, Topology};
use crate::shutdown::Shutdown;
use crate::stats::Stats;

/// How often the watchdog pings the node's own channel.
pub const WATCHDOG: Duration = Duration::from_millis(500);
/// How long a ping may take to come back before the node subscribes again.
pub const PING_DEADLINE: Duration = Duration::from_millis(1000);
/// What a watchdog ping starts with: never the start of a node message
/// (JSON or a `__FreeIM__` marker).
const PING: &str = "\u{0}imhost-watchdog:";

/// Delivery ids remembered to drop retried copies: far more than a retry
/// window (1.5 s) of deliveries to one node at any rate a node takes.
const RECENT_IDS: usize = 1 << 18;

/// The delivery ids this node handed out last, oldest first out.
#[derive(Default)]
struct Recent {
    ids: HashSet<u64>,
    order: VecDeque<u64>,
}

impl Recent {
    /// True the first time `id` is seen (within the window).
    fn first(&mut self, id: u64) -> bool {
        if !self.ids.insert(id) {
            return false;
        }
        self.order.push_back(id);
        if self.order.len() > RECENT_IDS
            && let Some(old) = self.order.pop_front()
        {
            self.ids.remove(&old);
        }
        true
    }
}

const MIN_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// What the subscriber feeds, as in standalone mode.
pub struct ShardedSubscriber {
    pub seeds: Vec<String>,
    pub presence: Arc<RedisPresence>,
    pub topology: Topology,
    pub inbox: mpsc::Sender<ServerMessage>,
    pub events: broadcast::Sender<PresenceChange>,
    pub stats: Arc<Stats>,
    pub shutdown: Shutdown,
}

impl ShardedSubscriber {
    /// Runs until the node has drained; rebuilds the connection when it fails.
    pub async fn run(self) {
        // No keyspace notifications across shards: channel members are read
        // per message (the cache stays off).
        self.presence.cache.set_enabled(false);
        let mut backoff = MIN_BACKOFF;
        let mut ever_connected = false;
        loop {
            let outcome = tokio::select! {
                outcome = self.listen(&mut ever_connected, &mut backoff) => outcome,
                () = self.shutdown.drained().cancelled() => return,
            };
            if let Err(err) = outcome {
                warn!(cause = %err, retry_in = ?backoff, "redis cluster subscription lost");
            }
            tokio::select! {
                () = tokio::time::sleep(backoff) => {}
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
        let (tx, mut pushes) = tokio::sync::mpsc::unbounded_channel();
        let client = cluster_client(&self.seeds, Some(tx))
            .map_err(|e| redis::RedisError::from(std::io::Error::other(e.to_string())))?;
        let mut conn = client.get_async_connection().await?;
        let channel = keys.server(&self.topology.me);
        let online = keys.online_event();
        let offline = keys.offline_event();
        conn.ssubscribe(&channel).await?;
        conn.subscribe(&online).await?;
        conn.subscribe(&offline).await?;
        let shards = keys.event_shards();
        let mut shard_kinds: HashMap<Vec<u8>, PresenceKind> = HashMap::new();
        for (shard_online, shard_offline) in &shards {
            // Both in one slot: one command.
            conn.ssubscribe(&[shard_online, shard_offline]).await?;
            shard_kinds.insert(shard_online.as_bytes().to_vec(), PresenceKind::Online);
            shard_kinds.insert(shard_offline.as_bytes().to_vec(), PresenceKind::Offline);
        }
        let me = &self.topology.me;
        if *ever_connected {
            info!("redis cluster subscription restored");
            self.presence.mark_dirty();
        }
        *ever_connected = true;
        *backoff = MIN_BACKOFF;

        let mut recent = Recent::default();
        let mut watchdog = tokio::time::interval(WATCHDOG);
        watchdog.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut seq: u64 = 0;
        let mut outstanding: Option<(u64, Instant)> = None;
        // The last ping to an event shard, and when it was sent.
        let mut event_seq: u64 = 0;
        let mut event_outstanding: Option<(String, Instant)> = None;
        loop {
            tokio::select! {
                push = pushes.recv() => {
                    let Some(push) = push else {
                        return Err(closed("push channel closed"));
                    };
                    match (push.kind, push.data.as_slice()) {
                        (PushKind::SMessage, [Value::BulkString(name), Value::BulkString(payload)])
                            if name.as_slice() != channel.as_bytes() =>
                        {
                            let Some(&kind) = shard_kinds.get(name.as_slice()) else {
                                continue;
                            };
                            if payload.starts_with(PING.as_bytes()) {
                                // Every node's pings pass here; ours is
                                // the one the watchdog waits for.
                                if event_outstanding.as_ref().is_some_and(|(ping, _)| payload == ping.as_bytes()) {
                                    event_outstanding = None;
                                }
                                continue;
                            }
                            self.event(kind, payload);
                        }
                        (PushKind::SMessage, [_, Value::BulkString(payload)]) => {
                            if let Some(n) = payload.strip_prefix(PING.as_bytes()) {
                                if outstanding.is_some_and(|(s, _)| n == s.to_string().as_bytes()) {
                                    outstanding = None;
                                }
                                continue;
                            }
                            if !self.deliver(payload, &mut recent).await {
                                return Ok(());
                            }
                        }
                        (PushKind::Message, [Value::BulkString(name), Value::BulkString(payload)]) => {
                            let kind = if name.as_slice() == online.as_bytes() {
                                PresenceKind::Online
                            } else if name.as_slice() == offline.as_bytes() {
                                PresenceKind::Offline
                            } else {
                                continue;
                            };
                            self.event(kind, payload);
                        }
                        (PushKind::SUnsubscribe, [Value::BulkString(name), ..])
                            if name.as_slice() == channel.as_bytes()
                                || shard_kinds.contains_key(name.as_slice()) =>
                        {
                            return Err(self.lost("sunsubscribe"));
                        }
                        (PushKind::Disconnection, _) => {
                            return Err(self.lost("disconnection"));
                        }
                        _ => {}
                    }
                }
                _ = watchdog.tick() => {
                    if let Some((_, sent)) = outstanding
                        && sent.elapsed() > PING_DEADLINE
                    {
                        return Err(self.lost("watchdog: ping lost"));
                    }
                    if let Some((_, sent)) = &event_outstanding
                        && sent.elapsed() > PING_DEADLINE
                    {
                        return Err(self.lost("watchdog: event shard ping lost"));
                    }
                    if event_outstanding.is_none() && !shards.is_empty() {
                        event_seq += 1;
                        let (shard, _) = &shards[(event_seq % shards.len() as u64) as usize];
                        let ping = format!("{PING}{me}:{event_seq}");
                        if !self.ping_event_shard(shard, &ping).await {
                            return Err(self.lost("watchdog: event shard ping not counted"));
                        }
                        event_outstanding = Some((ping, Instant::now()));
                    }
                    if outstanding.is_none() {
                        seq += 1;
                        // Where publishers' messages go: the slot's master
                        // as a write finds it (see `refresh_route`).
                        if let Err(err) = self.presence.helper.refresh_route(&self.topology.me).await {
                            warn!(cause = %err, "watchdog route not refreshed");
                        }
                        let mut publisher = self.presence.helper.connection();
                        let ping: redis::RedisResult<i64> = redis::cmd("SPUBLISH")
                            .arg(&channel)
                            .arg(format!("{PING}{seq}"))
                            .query_async(&mut publisher)
                            .await;
                        match ping {
                            // Not counted by the slot's master: this node
                            // is not subscribed there (perhaps on a replica).
                            Ok(0) => return Err(self.lost("watchdog: not counted")),
                            Ok(_) => {}
                            Err(err) => warn!(cause = %err, "watchdog ping not published"),
                        }
                        outstanding = Some((seq, Instant::now()));
                    }
                }
            }
        }
    }

    /// Publishes the watchdog's `ping` to an event shard's channel, where
    /// publishers' events go; false when its master did not count this
    /// node as subscribed.
    async fn ping_event_shard(&self, shard: &str, ping: &str) -> bool {
        if let Err(err) = self.presence.helper.refresh_route_of(shard).await {
            warn!(cause = %err, "watchdog route not refreshed");
        }
        let mut publisher = self.presence.helper.connection();
        let heard: redis::RedisResult<i64> = redis::cmd("SPUBLISH")
            .arg(shard)
            .arg(ping)
            .query_async(&mut publisher)
            .await;
        match heard {
            Ok(0) => false,
            Ok(_) => true,
            Err(err) => {
                warn!(cause = %err, "watchdog ping not published");
                true
            }
        }
    }

    /// The subscription is lost or in doubt: counted, and `run` subscribes
    /// again on a new connection.
    fn lost(&self, why: &'static str) -> redis::RedisError {
        Stats::incr(&self.stats.shard_resubscribes);
        info!(why, "subscribing to this node's shard channel again");
        closed(why)
    }

    /// Hands a node message to the inbox, once per delivery id; false once
    /// the inbox is closed.
    async fn deliver(&self, payload: &[u8], recent: &mut Recent) -> bool {
        let Ok(mut text) = std::str::from_utf8(payload) else {
            self.skip("payload is not UTF-8");
            return true;
        };
        if let Some((id, message)) = Envelope::open(text) {
            if !recent.first(id) {
                Stats::incr(&self.stats.shard_duplicates_dropped);
                return true;
            }
            text = message;
        }
        match ServerMessage::decode(text) {
            // Bounded: a burst waits here, and Redis buffers for us.
            Ok(message) => self.inbox.send(message).await.is_ok(),
            Err(err) => {
                self.skip(&err.to_string());
                true
            }
        }
    }

    fn event(&self, kind: PresenceKind, payload: &[u8]) {
        match super::subscriber::presence_change(&self.topology, kind, payload) {
            Ok(change) => {
                let _ = self.events.send(change);
            }
            Err(err) => self.skip(&err.to_string()),
        }
    }

    fn skip(&self, why: &str) {
        Stats::incr(&self.stats.dispatch_errors);
        warn!(why, "skipped a malformed message on the node channel");
    }
}

fn closed(why: &str) -> redis::RedisError {
    redis::RedisError::from(std::io::Error::other(why.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_delivery_id_is_handed_out_once_and_forgotten_past_the_window() {
        let mut recent = Recent::default();
        assert!(recent.first(7));
        assert!(!recent.first(7), "a retried copy");
        for id in 100..100 + RECENT_IDS as u64 {
            recent.first(id);
        }
        assert!(recent.first(7), "long gone from the window");
        assert_eq!(recent.order.len(), RECENT_IDS);
    }

    #[test]
    fn an_envelope_opens_to_its_id_and_message_and_a_bare_message_is_bare() {
        let wrapped = Envelope::wrap(0xabc, r#"{"a":1}"#);
        assert_eq!(Envelope::open(&wrapped), Some((0xabc, r#"{"a":1}"#)));
        assert_eq!(Envelope::open(r#"{"a":1}"#), None);
        assert_eq!(Envelope::open("__FreeIM__(ForceOffline)7"), None);
    }
}
