//! The Lua this node runs in Redis for its own presence records. Each script
//! is atomic, so counts, memberships and events never disagree mid-way.
//!
//! Beyond FreeIM's keys, every node keeps `NodeOnline{node}` (client → sockets
//! it holds) and `NodeMeta{node}` (client → token value). They are what lets
//! another node undo a dead node's share of `Online` exactly, and publish one
//! offline event per client it held.

use std::sync::LazyLock;

use redis::Script;

/// `offline(P, listchan_key, id)` on one Redis: the client leaves every
/// channel (what FreeIM does on disconnect, here only when its last socket
/// goes). The record bodies below call `offline`; on a Redis Cluster the
/// buckets define it otherwise (`super::buckets`).
const LEAVE_ALL: &str = r"
local function offline(P, listchan, id)
  local ckey = P .. 'Client' .. id
  for _, chan in ipairs(redis.call('HKEYS', ckey)) do
    if redis.call('HDEL', P .. 'Chan' .. chan, id) == 1 then
      if redis.call('HINCRBY', listchan, chan, -1) <= 0 then
        redis.call('HDEL', listchan, chan)
      end
    end
  end
  redis.call('DEL', ckey)
end
";

/// One socket of a client gone. KEYS: Online, NodeOnline, NodeMeta, and
/// `offline`'s key. ARGV: id, P. Leaves `c`, the sockets left in the
/// cluster; at 0 the client went `offline`.
pub(super) const DROP_SOCKET: &str = r"
if redis.call('HINCRBY', KEYS[2], ARGV[1], -1) <= 0 then
  redis.call('HDEL', KEYS[2], ARGV[1])
  redis.call('HDEL', KEYS[3], ARGV[1])
end
local c = redis.call('HINCRBY', KEYS[1], ARGV[1], -1)
if c <= 0 then
  redis.call('HDEL', KEYS[1], ARGV[1])
  offline(ARGV[2], KEYS[4], ARGV[1])
end
";

/// Undoes a node's records. KEYS: NodeOnline, NodeMeta, Online, and
/// `offline`'s key. ARGV: P, offline event channel. Publishes one offline
/// event per client, deletes what it undid, leaves `reaped`.
pub(super) const REAP_RECORDS: &str = r#"
local entries = redis.call('HGETALL', KEYS[1])
local reaped = 0
for i = 1, #entries, 2 do
  local id = entries[i]
  local n = tonumber(entries[i + 1]) or 0
  if n > 0 then
    local c = redis.call('HINCRBY', KEYS[3], id, -n)
    if c <= 0 then
      redis.call('HDEL', KEYS[3], id)
      offline(ARGV[1], KEYS[4], id)
    end
  end
  local meta = redis.call('HGET', KEYS[2], id)
  if not meta then meta = '{"Item1":' .. id .. ',"Item2":null}' end
  redis.call('PUBLISH', ARGV[2], meta)
  reaped = reaped + 1
end
redis.call('DEL', KEYS[1], KEYS[2])
"#;

/// Makes a node's records match its sockets. KEYS: NodeOnline, NodeMeta,
/// Online, and `offline`'s key. ARGV: P, the online event channel to
/// announce the clients it had no record of on ('' for none: after the
/// node was reaped while alive, the cluster was told they went offline),
/// then (id, sockets, token value JSON) triples.
pub(super) const RESYNC_RECORDS: &str = r"
local old = {}
local entries = redis.call('HGETALL', KEYS[1])
for i = 1, #entries, 2 do old[entries[i]] = tonumber(entries[i + 1]) or 0 end
for i = 3, #ARGV, 3 do
  local id, n, meta = ARGV[i], tonumber(ARGV[i + 1]), ARGV[i + 2]
  if ARGV[2] ~= '' and not old[id] then redis.call('PUBLISH', ARGV[2], meta) end
  local delta = n - (old[id] or 0)
  if delta ~= 0 then redis.call('HINCRBY', KEYS[3], id, delta) end
  redis.call('HSET', KEYS[1], id, n)
  redis.call('HSET', KEYS[2], id, meta)
  old[id] = nil
end
for id, n in pairs(old) do
  local c = redis.call('HINCRBY', KEYS[3], id, -n)
  if c <= 0 then
    redis.call('HDEL', KEYS[3], id)
    offline(ARGV[1], KEYS[4], id)
  end
  redis.call('HDEL', KEYS[1], id)
  redis.call('HDEL', KEYS[2], id)
end
";

/// KEYS: Online, NodeOnline{me}, NodeMeta{me}. ARGV: id, token value JSON.
/// Returns the client's socket count in the cluster. (The same on a Redis
/// Cluster, with a bucket's keys.)
pub static CONNECTED: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
redis.call('HINCRBY', KEYS[2], ARGV[1], 1)
redis.call('HSET', KEYS[3], ARGV[1], ARGV[2])
return redis.call('HINCRBY', KEYS[1], ARGV[1], 1)",
    )
});

/// KEYS: Online, NodeOnline{me}, NodeMeta{me}, ListChan. ARGV: id, P.
/// Returns the sockets left in the cluster (0: offline, channels left).
pub static DISCONNECTED: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        &[
            LEAVE_ALL,
            DROP_SOCKET,
            "if c < 0 then return 0 end\nreturn c",
        ]
        .concat(),
    )
});

/// Refreshes a node's liveness key: KEYS: Node{me}. ARGV: TTL in ms.
/// Returns 1 when the key still existed (0: it had expired, and the node
/// may have been reaped meanwhile).
pub static ALIVE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local existed = redis.call('EXISTS', KEYS[1])
redis.call('SET', KEYS[1], 1, 'PX', ARGV[1])
return existed",
    )
});

/// Undoes a dead node's presence, once: KEYS: NodeOnline{dead},
/// NodeMeta{dead}, Online, ListChan, Node{dead}. ARGV: P, offline event
/// channel, '1' to skip the liveness check (a node reaping its own past).
/// Returns the clients reaped, or -1 when the node is alive after all.
pub static REAP: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        &[
            LEAVE_ALL,
            "if ARGV[3] ~= '1' and redis.call('EXISTS', KEYS[5]) == 1 then return -1 end",
            REAP_RECORDS,
            "return reaped",
        ]
        .concat(),
    )
});

/// Makes this node's records match its sockets (after Redis came back,
/// perhaps empty, or writes failed): KEYS: NodeOnline{me}, NodeMeta{me},
/// Online, ListChan. ARGV as [`RESYNC_RECORDS`]'s.
pub static RESYNC: LazyLock<Script> =
    LazyLock::new(|| Script::new(&[LEAVE_ALL, RESYNC_RECORDS, "return 0"].concat()));
