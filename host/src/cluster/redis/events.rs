//! Presence events on a Redis Cluster, on a connection and a keeper of
//! their own.
//!
//! A connect's or a disconnect's event is published with `SPUBLISH` to the
//! channel of its event shard (`Keys::online_event_of`), so that one master
//! carries it instead of the cluster bus copying it to every master; the
//! rare events told from inside a bucket's script (a reap, a late node's
//! clients announced again) stay on the two classic channels. This keeper
//! subscribes to all of them and feeds the node's event stream.
//!
//! Events are at most once, as on one Redis, so this keeper may rebuild
//! its connection freely, dropping what was in flight: on an `SUNSUBSCRIBE`
//! of a shard's channel (a failover or a slot migration moved it), on a
//! disconnection, and when its watchdog's ping to one shard's channel (a
//! different shard each [`WATCHDOG`]) is not counted by that shard's master
//! or does not come back within a second. Deliveries are on
//! another connection ([`super::sharded`]), which none of this disturbs.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use imhost_client::helper::cluster_client;
use redis::{PushKind, Value};
use tokio::sync::broadcast;
use tracing::{info, warn};

use super::presence::RedisPresence;
use super::sharded::{
    MAX_BACKOFF, MIN_BACKOFF, PING, PING_DEADLINE, WATCHDOG, closed, ping_counted,
};
use crate::cluster::{PresenceChange, PresenceKind, Topology};
use crate::shutdown::Shutdown;
use crate::stats::Stats;

pub struct EventSubscriber {
    pub seeds: Vec<String>,
    pub presence: Arc<RedisPresence>,
    pub topology: Topology,
    pub events: broadcast::Sender<PresenceChange>,
    pub stats: Arc<Stats>,
    pub shutdown: Shutdown,
}

impl EventSubscriber {
    /// Runs until the node has drained; rebuilds the connection when it fails.
    pub async fn run(self) {
        let mut backoff = MIN_BACKOFF;
        loop {
            let outcome = tokio::select! {
                outcome = self.listen(&mut backoff) => outcome,
                () = self.shutdown.drained().cancelled() => return,
            };
            if let Err(err) = outcome {
                warn!(cause = %err, retry_in = ?backoff, "redis cluster event subscription lost");
            }
            tokio::select! {
                () = tokio::time::sleep(backoff) => {}
                () = self.shutdown.drained().cancelled() => return,
            }
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }

    async fn listen(&self, backoff: &mut Duration) -> redis::RedisResult<()> {
        let keys = self.presence.keys().clone();
        let (tx, mut pushes) = tokio::sync::mpsc::unbounded_channel();
        let client = cluster_client(&self.seeds, Some(tx))
            .map_err(|e| redis::RedisError::from(std::io::Error::other(e.to_string())))?;
        let mut conn = client.get_async_connection().await?;
        let mut kinds: HashMap<Vec<u8>, PresenceKind> = HashMap::new();
        let (online, offline) = (keys.online_event(), keys.offline_event());
        conn.subscribe(&online).await?;
        conn.subscribe(&offline).await?;
        kinds.insert(online.into_bytes(), PresenceKind::Online);
        kinds.insert(offline.into_bytes(), PresenceKind::Offline);
        let shards = keys.event_shards();
        for (online, offline) in &shards {
            // Both in one slot: one command.
            conn.ssubscribe(&[online, offline]).await?;
            kinds.insert(online.as_bytes().to_vec(), PresenceKind::Online);
            kinds.insert(offline.as_bytes().to_vec(), PresenceKind::Offline);
        }
        *backoff = MIN_BACKOFF;

        let me = &self.topology.me;
        let mut watchdog = tokio::time::interval(WATCHDOG);
        watchdog.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut seq: u64 = 0;
        let mut outstanding: Option<(String, Instant)> = None;
        loop {
            tokio::select! {
                push = pushes.recv() => {
                    let Some(push) = push else {
                        return Err(closed("push channel closed"));
                    };
                    match (push.kind, push.data.as_slice()) {
                        (
                            PushKind::Message | PushKind::SMessage,
                            [Value::BulkString(name), Value::BulkString(payload)],
                        ) => {
                            let Some(&kind) = kinds.get(name.as_slice()) else {
                                continue;
                            };
                            if payload.starts_with(PING.as_bytes()) {
                                // Every node's pings pass here; ours is the
                                // one the watchdog waits for.
                                if outstanding.as_ref().is_some_and(|(ping, _)| payload == ping.as_bytes()) {
                                    outstanding = None;
                                }
                                continue;
                            }
                            self.event(kind, payload);
                        }
                        (PushKind::SUnsubscribe, [Value::BulkString(name), ..])
                            if kinds.contains_key(name.as_slice()) =>
                        {
                            return Err(self.lost("sunsubscribe"));
                        }
                        (PushKind::Disconnection, _) => return Err(self.lost("disconnection")),
                        _ => {}
                    }
                }
                _ = watchdog.tick() => {
                    if let Some((_, sent)) = &outstanding
                        && sent.elapsed() > PING_DEADLINE
                    {
                        return Err(self.lost("watchdog: ping lost"));
                    }
                    if outstanding.is_none() && !shards.is_empty() {
                        seq += 1;
                        let (shard, _) = &shards[(seq % shards.len() as u64) as usize];
                        let ping = format!("{PING}{me}:{seq}");
                        if !ping_counted(&self.presence.helper, shard, &ping).await {
                            return Err(self.lost("watchdog: ping not counted"));
                        }
                        outstanding = Some((ping, Instant::now()));
                    }
                }
            }
        }
    }

    fn lost(&self, why: &'static str) -> redis::RedisError {
        Stats::incr(&self.stats.shard_resubscribes);
        info!(why, "subscribing to the presence event shards again");
        closed(why)
    }

    fn event(&self, kind: PresenceKind, payload: &[u8]) {
        match super::subscriber::presence_change(&self.topology, kind, payload) {
            Ok(change) => {
                let _ = self.events.send(change);
            }
            Err(err) => {
                Stats::incr(&self.stats.dispatch_errors);
                warn!(cause = %err, "skipped a malformed presence event");
            }
        }
    }
}
