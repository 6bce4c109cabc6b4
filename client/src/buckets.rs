//! Channels and presence on a Redis Cluster, where a client's keys and a
//! channel's keys live in different buckets ([`crate::wire::Keys`]) and so,
//! in general, in different slots: no one script can cover both sides of a
//! membership, as FreeIM's `JoinChan` does on one Redis.
//!
//! Each side is changed by its own atomic step, idempotent, in an order
//! that keeps what a failure in between leaves harmless and repairable:
//! - a join writes the client's side first, then the channel's: stopped in
//!   between, the client lists a channel that does not list it; its leave
//!   (or its going offline) removes the channel side whether or not it was
//!   there, and a retried join completes it;
//! - a leave removes the channel's side first, then the client's: stopped in
//!   between, the client lists a channel it is no longer a member of, which
//!   nothing delivers on and the next leave or disconnect clears.
//!
//! So a channel never keeps a member that its client's record does not
//! name, which is what a client going offline relies on: it leaves every
//! channel its record lists (the host keeps that list in Redis until the
//! leaves are done, see the host's presence records).
//!
//! Listings (`Online`, `ListChan`) are the union of the buckets' parts, read
//! concurrently.

use std::collections::HashMap;
use std::sync::LazyLock;

use futures_util::{StreamExt, TryStreamExt};
use redis::{AsyncCommands, Script};

use crate::ClientId;
use crate::conn::RedisConn;
use crate::wire::{Bucket, Keys, client_bucket};

/// How many bucket reads a listing keeps in flight.
const LISTING_CONCURRENCY: usize = 64;

/// A channel's side of a join. KEYS: Chan{chan}, ListChan of its bucket.
/// ARGV: chan, ids… Returns the members added.
const JOIN_CHAN_SIDE: &str = r"
local added = 0
for i = 2, #ARGV do
  added = added + redis.call('HSETNX', KEYS[1], ARGV[i], 0)
end
if added > 0 then redis.call('HINCRBY', KEYS[2], ARGV[1], added) end
return added";

/// A channel's side of a leave. Same KEYS and ARGV. Returns the members
/// removed.
const LEAVE_CHAN_SIDE: &str = r"
local removed = 0
for i = 2, #ARGV do
  removed = removed + redis.call('HDEL', KEYS[1], ARGV[i])
end
if removed > 0 and redis.call('HINCRBY', KEYS[2], ARGV[1], -removed) <= 0 then
  redis.call('HDEL', KEYS[2], ARGV[1])
end
return removed";

/// Empties a channel. KEYS: Chan{chan}, ListChan. ARGV: chan. Returns the
/// members it had.
const CLEAR_CHAN_SIDE: &str = r"
local ids = redis.call('HKEYS', KEYS[1])
redis.call('DEL', KEYS[1])
redis.call('HDEL', KEYS[2], ARGV[1])
return ids";

static JOIN: LazyLock<Script> = LazyLock::new(|| Script::new(JOIN_CHAN_SIDE));
static LEAVE: LazyLock<Script> = LazyLock::new(|| Script::new(LEAVE_CHAN_SIDE));
static CLEAR: LazyLock<Script> = LazyLock::new(|| Script::new(CLEAR_CHAN_SIDE));

/// `script` on `chan`'s keys for `ids`.
fn chan_side(
    script: &'static Script,
    keys: &Keys,
    chan: &str,
    ids: &[ClientId],
) -> redis::ScriptInvocation<'static> {
    let mut invocation = script.prepare_invoke();
    invocation
        .key(keys.chan(chan))
        .key(keys.list_chan(chan))
        .arg(chan)
        .arg(ids);
    invocation
}

/// Runs one command per item concurrently on the multiplexed connection
/// (each may go to another master).
async fn each<T, F, Fut>(items: impl IntoIterator<Item = T>, call: F) -> redis::RedisResult<()>
where
    F: Fn(T) -> Fut,
    Fut: std::future::Future<Output = redis::RedisResult<()>>,
{
    futures_util::stream::iter(items.into_iter().map(call))
        .buffer_unordered(LISTING_CONCURRENCY)
        .try_collect::<Vec<()>>()
        .await
        .map(drop)
}

/// `ids` join `chan`: their records first, then the channel's.
///
/// # Errors
/// Redis failed; a retry completes what was done.
pub async fn join(
    conn: &RedisConn,
    keys: &Keys,
    chan: &str,
    ids: &[ClientId],
) -> redis::RedisResult<()> {
    each(ids.iter().copied(), |id| {
        let mut conn = conn.clone();
        let key = keys.client(id);
        async move { conn.hset::<_, _, _, ()>(key, chan, 0).await }
    })
    .await?;
    let mut conn = conn.clone();
    chan_side(&JOIN, keys, chan, ids)
        .invoke_async::<i64>(&mut conn)
        .await
        .map(drop)
}

/// `ids` leave `chan`: the channel's side first, then their records.
///
/// # Errors
/// Redis failed; a retry completes what was done.
pub async fn leave(
    conn: &RedisConn,
    keys: &Keys,
    chan: &str,
    ids: &[ClientId],
) -> redis::RedisResult<()> {
    leave_chan_side(conn, keys, chan, ids).await?;
    each(ids.iter().copied(), |id| {
        let mut conn = conn.clone();
        let key = keys.client(id);
        async move { conn.hdel::<_, _, ()>(key, chan).await }
    })
    .await
}

/// The channel's side of a leave alone: what is left to do for clients
/// whose own records are already gone (they went offline).
///
/// # Errors
/// Redis failed.
pub async fn leave_chan_side(
    conn: &RedisConn,
    keys: &Keys,
    chan: &str,
    ids: &[ClientId],
) -> redis::RedisResult<()> {
    let mut conn = conn.clone();
    chan_side(&LEAVE, keys, chan, ids)
        .invoke_async::<i64>(&mut conn)
        .await
        .map(drop)
}

/// Every member leaves `chan`: the channel first, then each member's record.
///
/// # Errors
/// Redis failed.
pub async fn clear(conn: &RedisConn, keys: &Keys, chan: &str) -> redis::RedisResult<()> {
    let ids: Vec<ClientId> = {
        let mut conn = conn.clone();
        chan_side(&CLEAR, keys, chan, &[])
            .invoke_async(&mut conn)
            .await?
    };
    each(ids, |id| {
        let mut conn = conn.clone();
        let key = keys.client(id);
        async move { conn.hdel::<_, _, ()>(key, chan).await }
    })
    .await
}

/// The union of one read per bucket, `LISTING_CONCURRENCY` at a time.
async fn union<T: redis::FromRedisValue>(
    conn: &RedisConn,
    keys: &Keys,
    read: impl Fn(&Bucket) -> redis::Cmd,
) -> redis::RedisResult<Vec<T>> {
    let parts: Vec<Vec<T>> = futures_util::stream::iter(keys.buckets().map(|bucket| {
        let mut conn = conn.clone();
        let cmd = read(&bucket);
        async move { cmd.query_async(&mut conn).await }
    }))
    .buffer_unordered(LISTING_CONCURRENCY)
    .try_collect()
    .await?;
    Ok(parts.into_iter().flatten().collect())
}

/// Every client with a socket: the union of the buckets' `Online`.
///
/// # Errors
/// Redis failed.
pub async fn online_clients(conn: &RedisConn, keys: &Keys) -> redis::RedisResult<Vec<ClientId>> {
    union(conn, keys, |bucket| redis::Cmd::hkeys(bucket.online())).await
}

/// Every channel with its member count: the union of the buckets'
/// `ListChan`.
///
/// # Errors
/// Redis failed.
pub async fn chan_list(conn: &RedisConn, keys: &Keys) -> redis::RedisResult<Vec<(String, i64)>> {
    union(conn, keys, |bucket| redis::Cmd::hgetall(bucket.list_chan())).await
}

/// The socket counts of `ids`, in their order: one `HMGET` per bucket.
///
/// # Errors
/// Redis failed.
pub async fn online_counts(
    conn: &RedisConn,
    keys: &Keys,
    ids: &[ClientId],
) -> redis::RedisResult<Vec<i64>> {
    let mut by_bucket: HashMap<u32, Vec<usize>> = HashMap::new();
    for (i, &id) in ids.iter().enumerate() {
        by_bucket.entry(client_bucket(id)).or_default().push(i);
    }
    let parts: Vec<(Vec<usize>, Vec<Option<i64>>)> =
        futures_util::stream::iter(by_bucket.into_iter().map(|(bucket, at)| {
            let mut conn = conn.clone();
            let key = keys.bucket(bucket).online();
            let asked: Vec<ClientId> = at.iter().map(|&i| ids[i]).collect();
            async move {
                let counts: Vec<Option<i64>> = redis::cmd("HMGET")
                    .arg(key)
                    .arg(asked)
                    .query_async(&mut conn)
                    .await?;
                Ok::<_, redis::RedisError>((at, counts))
            }
        }))
        .buffer_unordered(LISTING_CONCURRENCY)
        .try_collect()
        .await?;
    let mut counts = vec![0; ids.len()];
    for (at, found) in parts {
        for (i, count) in at.into_iter().zip(found) {
            counts[i] = count.unwrap_or(0);
        }
    }
    Ok(counts)
}
