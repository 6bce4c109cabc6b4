//! The node's delivery subscription on a Redis Cluster: its channel over
//! sharded pub/sub (`SSUBSCRIBE`, on the master of the channel's slot), on a
//! RESP3 cluster connection of its own. Presence events have their own
//! connection and keeper ([`super::events`]): rebuilding a connection drops
//! what was in flight on it, which events may lose (they are at most once)
//! and deliveries answered 200 may not, so trouble with an event shard on
//! another master never rebuilds this one.
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
//!   [`WATCHDOG`] through the node's command connection, after a write to
//!   the channel's slot that makes that connection find the slot's true
//!   master (`ImHelper::refresh_route`: a publish to a demoted master is
//!   accepted, a write is redirected), so the ping goes where publishers'
//!   messages go, not where the subscription went; when it has not come back
//!   within [`PING_DEADLINE`] the node subscribes again on a new connection:
//!   a silent loss lasts about a second.
//!
//! Subscribing again is made before broken: the new subscription is made
//! first, then the old one is ended with `SUNSUBSCRIBE` and what it had
//! received is delivered before it is dropped ([`ShardedSubscriber::retire`]),
//! so a subscription that was only in doubt (a ping late on a busy machine)
//! loses none of the messages it was counted for; copies both got are
//! dropped by their delivery id.
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

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use imhost_client::helper::{ImHelper, cluster_client};
use imhost_client::wire::{Envelope, ServerMessage};
use redis::{PushKind, Value};
use tokio::sync::mpsc;
use tracing::{info, warn};

use super::presence::RedisPresence;
use crate::cluster::Topology;
use crate::shutdown::Shutdown;
use crate::stats::Stats;

/// How often the watchdog pings the node's own channel.
pub const WATCHDOG: Duration = Duration::from_millis(500);
/// How long a ping may take to come back before the node subscribes again.
pub const PING_DEADLINE: Duration = Duration::from_millis(1000);
/// What a watchdog ping starts with: never the start of a node message
/// (JSON or a `__FreeIM__` marker).
pub(super) const PING: &str = "\u{0}imhost-watchdog:";

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

/// How long a replaced subscription's `SUNSUBSCRIBE` may take.
const RETIRE_WITHIN: Duration = Duration::from_secs(1);

/// A subscription: its connection and the pushes it receives.
struct Subscription {
    conn: redis::cluster_async::ClusterConnection,
    pushes: tokio::sync::mpsc::UnboundedReceiver<redis::PushInfo>,
}

/// Why a subscription ended, and the subscription itself while it may
/// still hold messages (see [`ShardedSubscriber::retire`]).
struct Lost {
    cause: redis::RedisError,
    subscription: Option<Subscription>,
}

pub(super) const MIN_BACKOFF: Duration = Duration::from_millis(100);
pub(super) const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// What the subscriber feeds, as in standalone mode.
pub struct ShardedSubscriber {
    pub seeds: Vec<String>,
    pub presence: Arc<RedisPresence>,
    pub topology: Topology,
    pub inbox: mpsc::Sender<ServerMessage>,
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
        let mut recent = Recent::default();
        let mut old: Option<Subscription> = None;
        loop {
            let outcome = tokio::select! {
                outcome = self.listen(&mut ever_connected, &mut backoff, &mut recent, old.take()) => outcome,
                () = self.shutdown.drained().cancelled() => return,
            };
            match outcome {
                Ok(()) => return,
                Err(Lost {
                    cause,
                    subscription,
                }) => {
                    warn!(cause = %cause, retry_in = ?backoff, "redis cluster subscription lost");
                    old = subscription;
                }
            }
            tokio::select! {
                () = tokio::time::sleep(backoff) => {}
                () = self.shutdown.drained().cancelled() => return,
            }
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }

    /// Subscribes on a new connection, then retires `old` (made before
    /// broken: see [`ShardedSubscriber::retire`]), then delivers until the
    /// subscription is lost or in doubt, handing it back to be retired.
    /// `Ok` once the inbox is closed.
    async fn listen(
        &self,
        ever_connected: &mut bool,
        backoff: &mut Duration,
        recent: &mut Recent,
        old: Option<Subscription>,
    ) -> Result<(), Lost> {
        let keys = self.presence.keys().clone();
        let channel = keys.server(&self.topology.me);
        let failed = |cause: redis::RedisError, old: Option<Subscription>| Lost {
            cause,
            subscription: old,
        };
        let (tx, mut pushes) = tokio::sync::mpsc::unbounded_channel();
        let client = match cluster_client(&self.seeds, Some(tx)) {
            Ok(client) => client,
            Err(err) => return Err(failed(closed(&err.to_string()), old)),
        };
        let mut conn = match client.get_async_connection().await {
            Ok(conn) => conn,
            Err(err) => return Err(failed(err, old)),
        };
        if let Err(err) = conn.ssubscribe(&channel).await {
            return Err(failed(err, old));
        }
        if let Some(old) = old
            && !self.retire(old, &channel, recent).await
        {
            return Ok(());
        }
        if *ever_connected {
            info!("redis cluster subscription restored");
            self.presence.mark_dirty();
        }
        *ever_connected = true;
        *backoff = MIN_BACKOFF;
        let lost = |cause: redis::RedisError, conn, pushes| Lost {
            cause,
            subscription: Some(Subscription { conn, pushes }),
        };

        let mut watchdog = tokio::time::interval(WATCHDOG);
        watchdog.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut seq: u64 = 0;
        let mut outstanding: Option<(u64, Instant)> = None;
        loop {
            tokio::select! {
                push = pushes.recv() => {
                    let Some(push) = push else {
                        return Err(lost(closed("push channel closed"), conn, pushes));
                    };
                    match (push.kind, push.data.as_slice()) {
                        (PushKind::SMessage, [_, Value::BulkString(payload)]) => {
                            if let Some(n) = payload.strip_prefix(PING.as_bytes()) {
                                if outstanding.is_some_and(|(s, _)| n == s.to_string().as_bytes()) {
                                    outstanding = None;
                                }
                                continue;
                            }
                            if !self.deliver(payload, recent).await {
                                return Ok(());
                            }
                        }
                        (PushKind::SUnsubscribe, [Value::BulkString(name), ..])
                            if name.as_slice() == channel.as_bytes() =>
                        {
                            return Err(lost(self.lost("sunsubscribe"), conn, pushes));
                        }
                        (PushKind::Disconnection, _) => {
                            return Err(lost(self.lost("disconnection"), conn, pushes));
                        }
                        _ => {}
                    }
                }
                _ = watchdog.tick() => {
                    if let Some((_, sent)) = outstanding
                        && sent.elapsed() > PING_DEADLINE
                    {
                        return Err(lost(self.lost("watchdog: ping lost"), conn, pushes));
                    }
                    if outstanding.is_none() {
                        seq += 1;
                        // Not counted by the slot's master: this node is
                        // not subscribed there (perhaps on a replica).
                        if !ping_counted(&self.presence.helper, &channel, &format!("{PING}{seq}")).await {
                            return Err(lost(self.lost("watchdog: not counted"), conn, pushes));
                        }
                        outstanding = Some((seq, Instant::now()));
                    }
                }
            }
        }
    }

    /// Ends a subscription that a new one has replaced, losing nothing it
    /// was counted for: `SUNSUBSCRIBE` on it (Redis sends every message it
    /// counted for the subscription before the reply, and the connection
    /// hands pushes over in order), then what it received is delivered
    /// (copies the new subscription also got are dropped by their delivery
    /// id), then it is dropped. On a dead connection the unsubscribe fails
    /// at once or within [`RETIRE_WITHIN`]: nothing more can come. False
    /// once the inbox is closed.
    async fn retire(&self, old: Subscription, channel: &str, recent: &mut Recent) -> bool {
        let Subscription {
            mut conn,
            mut pushes,
        } = old;
        let _ = tokio::time::timeout(RETIRE_WITHIN, conn.sunsubscribe(channel)).await;
        while let Ok(push) = pushes.try_recv() {
            if let (PushKind::SMessage, [_, Value::BulkString(payload)]) =
                (push.kind, push.data.as_slice())
                && !payload.starts_with(PING.as_bytes())
                && !self.deliver(payload, recent).await
            {
                return false;
            }
        }
        true
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

    fn skip(&self, why: &str) {
        Stats::incr(&self.stats.dispatch_errors);
        warn!(why, "skipped a malformed message on the node channel");
    }
}

/// Publishes a watchdog `ping` to `channel` where publishers' messages go:
/// the slot's master as a write finds it (see `ImHelper::refresh_route`).
/// False when that master did not count a subscriber; a publish that failed
/// proves nothing and counts as heard (the ping's deadline still applies).
pub(super) async fn ping_counted(helper: &ImHelper, channel: &str, ping: &str) -> bool {
    if let Err(err) = helper.refresh_route_of(channel).await {
        warn!(cause = %err, "watchdog route not refreshed");
    }
    let heard: redis::RedisResult<i64> = redis::cmd("SPUBLISH")
        .arg(channel)
        .arg(ping)
        .query_async(&mut helper.connection())
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

pub(super) fn closed(why: &str) -> redis::RedisError {
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
