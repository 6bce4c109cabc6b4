//! This node's presence records on a Redis Cluster, spread over the
//! presence buckets ([`imhost_client::wire::Keys`]) instead of one slot.
//!
//! On one Redis a node's records are two hashes beside FreeIM's `Online`,
//! and every change to them is one script. On a cluster a client's count in
//! `Online` lives in its bucket, so the node keeps its records per bucket too
//! (`NodeOnline`, `NodeMeta`, `NodeLeaving` of that bucket): a connect, a
//! disconnect, a resync or a reap is still one script per bucket, in one slot.
//!
//! Two things no single script can do any more, and how they are done:
//! - **Leaving channels when a client goes offline.** Its channels are in
//!   other buckets. The script that takes it offline moves its channel list
//!   into `NodeLeaving` (same bucket, atomically); the node then removes the
//!   channels' side ([`imhost_client::buckets::leave_chan_side`], idempotent)
//!   and deletes the entry. A node that dies in between leaves the entry to
//!   whoever reaps it; a write that fails leaves it to the resync.
//! - **Reaping only the dead.** "Is the node alive?" (its key in the control
//!   slot) cannot be asked inside a bucket's script. So every run of a node
//!   has an *incarnation*, a random id its bucket records carry in their
//!   names. A reaper atomically checks the liveness key and, if the node is
//!   dead, moves its current incarnation into the node's *past* set; then it
//!   reaps the past incarnations bucket by bucket and forgets each when done.
//!   A node that restarts meanwhile writes under a new incarnation, which no
//!   reaper touches; a node that finds its incarnation taken (it was
//!   declared dead while it was only late) takes a new one and rewrites its
//!   records, and reaps its own past itself.
//!
//! Every step is idempotent, so reapers racing each other, or a reaper and
//! the node's own start, agree.

use std::collections::HashMap;
use std::sync::{LazyLock, Mutex};
use std::time::Duration;

use futures_util::{StreamExt, TryStreamExt};
use imhost_client::ClientId;
use imhost_client::conn::RedisConn;
use imhost_client::wire::{Bucket, Keys, client_bucket};
use redis::{AsyncCommands, Script};

use super::scripts;

/// Buckets a reap or a resync works on at once.
const BUCKET_CONCURRENCY: usize = 64;

/// `offline(P, leaving, id)` in a bucket (P: its tag): the client's last
/// socket is gone; it leaves its bucket's records, and the channels it was
/// in go to the node's `NodeLeaving`. The record bodies are one Redis's
/// ([`super::scripts`]), with this `offline`.
const GO_OFFLINE: &str = r"
local function offline(P, leaving, id)
  local ckey = P .. 'Client' .. id
  local chans = redis.call('HKEYS', ckey)
  redis.call('DEL', ckey)
  if #chans > 0 then redis.call('HSET', leaving, id, cjson.encode(chans)) end
end
";

/// KEYS: Online, NodeOnline, NodeMeta, NodeLeaving. ARGV: id, P. Returns
/// the sockets left in the cluster and, when none is, the JSON list of
/// channels still to leave ('' for none).
static DISCONNECTED: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        &[
            GO_OFFLINE,
            scripts::DROP_SOCKET,
            "if c > 0 then return {c, ''} end\nreturn {0, redis.call('HGET', KEYS[4], ARGV[1]) or ''}",
        ]
        .concat(),
    )
});

/// Undoes one past incarnation's records in one bucket. KEYS: NodeOnline,
/// NodeMeta, Online, NodeLeaving. ARGV: P, offline event channel. Returns
/// the clients reaped, then the bucket's `NodeLeaving` as (id, channels)
/// pairs.
static REAP: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        &[
            GO_OFFLINE,
            scripts::REAP_RECORDS,
            r"local out = {tostring(reaped)}
for _, v in ipairs(redis.call('HGETALL', KEYS[4])) do out[#out + 1] = v end
return out",
        ]
        .concat(),
    )
});

/// Makes this incarnation's records in one bucket match its sockets. KEYS:
/// NodeOnline, NodeMeta, Online, NodeLeaving. ARGV as
/// [`scripts::RESYNC_RECORDS`]'s. Returns `NodeLeaving` as (id, channels)
/// pairs.
static RESYNC: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        &[
            GO_OFFLINE,
            scripts::RESYNC_RECORDS,
            "return redis.call('HGETALL', KEYS[4])",
        ]
        .concat(),
    )
});

/// A run starts (control slot). KEYS: NodeInc, NodePast, Node. ARGV: the
/// new incarnation, liveness TTL in ms. Returns the past incarnations.
static BEGIN: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local old = redis.call('GET', KEYS[1])
if old and old ~= ARGV[1] then redis.call('SADD', KEYS[2], old) end
redis.call('SET', KEYS[1], ARGV[1])
redis.call('SET', KEYS[3], 1, 'PX', ARGV[2])
return redis.call('SMEMBERS', KEYS[2])",
    )
});

/// The node says it is alive (control slot). KEYS: Node, NodeInc. ARGV:
/// TTL in ms, its incarnation. Returns 1 while that incarnation is current,
/// 0 once it was reaped.
static ALIVE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
redis.call('SET', KEYS[1], 1, 'PX', ARGV[1])
if redis.call('GET', KEYS[2]) == ARGV[2] then return 1 end
return 0",
    )
});

/// Is the node dead? (control slot). KEYS: Node, NodeInc, NodePast.
/// Returns the incarnations to reap: none while the node is alive.
static DEAD: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if redis.call('EXISTS', KEYS[1]) == 1 then return {} end
local current = redis.call('GET', KEYS[2])
if current then
  redis.call('SADD', KEYS[3], current)
  redis.call('DEL', KEYS[2])
end
return redis.call('SMEMBERS', KEYS[3])",
    )
});

fn new_incarnation() -> String {
    format!("{:016x}", rand::random::<u64>())
}

/// Channels still to leave, per client, as Redis returns them (pairs of id
/// and JSON list). Entries that do not parse are dropped: they could only
/// have been written by something else than these scripts.
fn leaving(pairs: &[String]) -> Vec<(ClientId, Vec<String>)> {
    pairs
        .chunks_exact(2)
        .filter_map(|pair| {
            let id = pair[0].parse().ok()?;
            let chans = serde_json::from_str(&pair[1]).ok()?;
            Some((id, chans))
        })
        .collect()
}

/// This node's records in the presence buckets.
pub struct BucketRecords {
    conn: RedisConn,
    keys: Keys,
    me: String,
    /// How long the liveness key lives without a refresh.
    ttl: Duration,
    /// This run's id; replaced when the run was reaped while alive.
    incarnation: Mutex<String>,
}

impl BucketRecords {
    pub fn new(conn: RedisConn, keys: Keys, me: String, ttl: Duration) -> Self {
        Self {
            conn,
            keys,
            me,
            ttl,
            incarnation: Mutex::new(new_incarnation()),
        }
    }

    fn incarnation(&self) -> String {
        self.incarnation
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Starts this run: records its incarnation and says it is alive, then
    /// reaps what earlier runs left. Returns the clients reaped.
    ///
    /// # Errors
    /// Redis failed.
    pub async fn begin(&self) -> redis::RedisResult<u64> {
        let past: Vec<String> = BEGIN
            .key(self.keys.node_incarnation(&self.me))
            .key(self.keys.node_past(&self.me))
            .key(self.keys.node_alive(&self.me))
            .arg(self.incarnation())
            .arg(self.ttl.as_millis().max(1) as u64)
            .invoke_async(&mut self.conn.clone())
            .await?;
        self.reap_incarnations(&self.me, past).await
    }

    /// Refreshes the liveness key. Returns `false` when this run was reaped
    /// meanwhile (declared dead while late): its records must be rewritten.
    ///
    /// # Errors
    /// Redis failed.
    pub async fn refresh_alive(&self) -> redis::RedisResult<bool> {
        let current: i64 = ALIVE
            .key(self.keys.node_alive(&self.me))
            .key(self.keys.node_incarnation(&self.me))
            .arg(self.ttl.as_millis().max(1) as u64)
            .arg(self.incarnation())
            .invoke_async(&mut self.conn.clone())
            .await?;
        Ok(current == 1)
    }

    /// One more socket of `id`. Returns its sockets in the cluster.
    ///
    /// # Errors
    /// Redis failed.
    pub async fn connected(&self, id: ClientId, value: &str) -> redis::RedisResult<u64> {
        let bucket = self.keys.bucket(client_bucket(id));
        let incarnation = self.incarnation();
        let count: i64 = scripts::CONNECTED
            .key(bucket.online())
            .key(bucket.node_online(&self.me, &incarnation))
            .key(bucket.node_meta(&self.me, &incarnation))
            .arg(id)
            .arg(value)
            .invoke_async(&mut self.conn.clone())
            .await?;
        Ok(count.max(0) as u64)
    }

    /// One socket of `id` less; when that was its last in the cluster, it
    /// leaves its channels. Returns its sockets left.
    ///
    /// # Errors
    /// Redis failed (a resync finishes what was left).
    pub async fn disconnected(&self, id: ClientId) -> redis::RedisResult<u64> {
        let bucket = self.keys.bucket(client_bucket(id));
        let incarnation = self.incarnation();
        let (left, chans): (i64, String) = DISCONNECTED
            .key(bucket.online())
            .key(bucket.node_online(&self.me, &incarnation))
            .key(bucket.node_meta(&self.me, &incarnation))
            .key(bucket.node_leaving(&self.me, &incarnation))
            .arg(id)
            .arg(bucket.tag())
            .invoke_async(&mut self.conn.clone())
            .await?;
        if left <= 0 && !chans.is_empty() {
            let pending = leaving(&[id.to_string(), chans]);
            self.finish_leaves(&bucket.node_leaving(&self.me, &incarnation), pending)
                .await?;
        }
        Ok(left.max(0) as u64)
    }

    /// Rewrites this run's records from `local` (client → sockets, token
    /// value JSON), bucket by bucket, and finishes the leaves left pending.
    /// A run that was reaped while alive (`reaped`: its refresh found its
    /// incarnation gone) takes a new incarnation first (and reaps the old
    /// one: no one else will, since the node is alive), and announces its
    /// clients online again: the cluster was told they went offline, and
    /// they left their channels.
    ///
    /// # Errors
    /// Redis failed.
    pub async fn resync(
        &self,
        local: &HashMap<ClientId, (u64, String)>,
        reaped: bool,
    ) -> redis::RedisResult<()> {
        let mut announce = String::new();
        if reaped {
            *self.incarnation.lock().unwrap_or_else(|p| p.into_inner()) = new_incarnation();
            self.begin().await?;
            announce = self.keys.online_event();
        }
        let incarnation = self.incarnation();
        let mut by_bucket: HashMap<u32, Vec<ClientId>> = HashMap::new();
        for &id in local.keys() {
            by_bucket.entry(client_bucket(id)).or_default().push(id);
        }
        let buckets: Vec<(u32, Bucket)> = (0..imhost_client::wire::CLUSTER_BUCKETS)
            .map(|b| (b, self.keys.bucket(b)))
            .collect();
        futures_util::stream::iter(buckets.into_iter().map(|(b, bucket)| {
            let mut invocation = RESYNC.prepare_invoke();
            let leaving_key = bucket.node_leaving(&self.me, &incarnation);
            invocation
                .key(bucket.node_online(&self.me, &incarnation))
                .key(bucket.node_meta(&self.me, &incarnation))
                .key(bucket.online())
                .key(&leaving_key)
                .arg(bucket.tag())
                .arg(&announce);
            for id in by_bucket.get(&b).into_iter().flatten() {
                if let Some((sockets, value)) = local.get(id) {
                    invocation.arg(id).arg(sockets).arg(value);
                }
            }
            let mut conn = self.conn.clone();
            async move {
                let pending: Vec<String> = invocation.invoke_async(&mut conn).await?;
                self.finish_leaves(&leaving_key, leaving(&pending)).await
            }
        }))
        .buffer_unordered(BUCKET_CONCURRENCY)
        .try_collect::<Vec<()>>()
        .await
        .map(drop)
    }

    /// Reaps node `node` if it is dead: every past incarnation, bucket by
    /// bucket. Returns the clients reaped.
    ///
    /// # Errors
    /// Redis failed (the incarnations stay in the past set for the next try).
    pub async fn reap(&self, node: &str) -> redis::RedisResult<u64> {
        let past: Vec<String> = DEAD
            .key(self.keys.node_alive(node))
            .key(self.keys.node_incarnation(node))
            .key(self.keys.node_past(node))
            .invoke_async(&mut self.conn.clone())
            .await?;
        self.reap_incarnations(node, past).await
    }

    async fn reap_incarnations(&self, node: &str, past: Vec<String>) -> redis::RedisResult<u64> {
        let mut reaped = 0;
        for incarnation in past {
            reaped += self.reap_incarnation(node, &incarnation).await?;
            let () = self
                .conn
                .clone()
                .srem(self.keys.node_past(node), &incarnation)
                .await?;
        }
        Ok(reaped)
    }

    async fn reap_incarnation(&self, node: &str, incarnation: &str) -> redis::RedisResult<u64> {
        let offline = self.keys.offline_event();
        let counts: Vec<u64> = futures_util::stream::iter(self.keys.buckets().map(|bucket| {
            let leaving_key = bucket.node_leaving(node, incarnation);
            let mut invocation = REAP.prepare_invoke();
            invocation
                .key(bucket.node_online(node, incarnation))
                .key(bucket.node_meta(node, incarnation))
                .key(bucket.online())
                .key(&leaving_key)
                .arg(bucket.tag())
                .arg(&offline);
            let mut conn = self.conn.clone();
            async move {
                let reply: Vec<String> = invocation.invoke_async(&mut conn).await?;
                let reaped = reply.first().and_then(|n| n.parse().ok()).unwrap_or(0);
                self.finish_leaves(&leaving_key, leaving(reply.get(1..).unwrap_or_default()))
                    .await?;
                Ok::<u64, redis::RedisError>(reaped)
            }
        }))
        .buffer_unordered(BUCKET_CONCURRENCY)
        .try_collect()
        .await?;
        Ok(counts.into_iter().sum())
    }

    /// Removes the channels' side of each pending leave, then the entries.
    async fn finish_leaves(
        &self,
        leaving_key: &str,
        pending: Vec<(ClientId, Vec<String>)>,
    ) -> redis::RedisResult<()> {
        if pending.is_empty() {
            return Ok(());
        }
        for (id, chans) in &pending {
            for chan in chans {
                imhost_client::buckets::leave_chan_side(&self.conn, &self.keys, chan, &[*id])
                    .await?;
            }
        }
        let ids: Vec<ClientId> = pending.iter().map(|(id, _)| *id).collect();
        let () = self.conn.clone().hdel(leaving_key, ids).await?;
        Ok(())
    }
}
