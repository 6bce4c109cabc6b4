//! [`ImHelper`]: the whole surface of FreeIM's .NET `ImHelper`, in async Rust,
//! over the same Redis keys and channels. A backend can use it to drive an
//! imhost (or FreeIM) cluster directly through Redis; imhost nodes use it for
//! everything they write that a FreeIM backend also writes, so that part of the
//! wire exists once.

use std::time::Duration;

use futures_util::StreamExt;
use redis::{AsyncCommands, Script};
use serde::Serialize;

use crate::ClientId;
use crate::buckets;
pub use crate::conn::RedisConn;
use crate::wire::{
    ChanMessage, DirectMessage, Keys, ServerMessage, TokenValue, group_by_node, node_for,
};

/// FreeIM's token lifetime.
pub const DEFAULT_TOKEN_TTL: Duration = Duration::from_secs(10);

/// `JoinChan` for one client, atomically (FreeIM's Lua).
/// KEYS: Chan{chan}, Client{id}, ListChan. ARGV: id, chan.
const JOIN_CHAN: &str = r"
if redis.call('HSETNX', KEYS[1], ARGV[1], 0) == 1 then
  redis.call('HSET', KEYS[2], ARGV[2], 0)
  redis.call('HINCRBY', KEYS[3], ARGV[2], 1)
end
return 0";

/// `LeaveChan` for one client, atomically (FreeIM's Lua). Same KEYS and ARGV.
const LEAVE_CHAN: &str = r"
if redis.call('HDEL', KEYS[1], ARGV[1]) == 1 then
  redis.call('HDEL', KEYS[2], ARGV[2])
  if redis.call('HINCRBY', KEYS[3], ARGV[2], -1) <= 0 then
    redis.call('HDEL', KEYS[3], ARGV[2])
  end
end
return 0";

/// `ClearChanClient`: every member leaves, atomically.
/// KEYS: Chan{chan}, ListChan. ARGV: prefix..'Client', chan.
const CLEAR_CHAN: &str = r"
local ids = redis.call('HKEYS', KEYS[1])
for _, id in ipairs(ids) do
  redis.call('HDEL', ARGV[1] .. id, ARGV[2])
end
redis.call('DEL', KEYS[1])
redis.call('HDEL', KEYS[2], ARGV[2])
return #ids";

/// Online or offline, as FreeIM's event bus tells them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    Online,
    Offline,
}

/// One event of [`ImHelper::event_bus`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BusEvent {
    pub kind: EventKind,
    pub client: TokenValue,
}

/// A failure talking to the cluster through Redis.
#[derive(Debug, thiserror::Error)]
pub enum HelperError {
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("message is not serialisable to JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("the cluster has no servers")]
    NoServers,
}

/// Where the cluster's Redis is.
#[derive(Clone)]
pub enum RedisTarget {
    Standalone(redis::Client),
    /// Redis Cluster: its seed URLs (imhost-native mode).
    Cluster(Vec<String>),
}

/// Talks to an imhost/FreeIM cluster through its Redis, as FreeIM's `ImHelper`.
#[derive(Clone)]
pub struct ImHelper {
    target: RedisTarget,
    conn: RedisConn,
    keys: Keys,
    servers: Vec<String>,
    path: String,
    token_ttl: Duration,
}

impl ImHelper {
    /// Connects to Redis at `redis_url`, for a cluster of `servers` serving
    /// WebSockets at `path` (FreeIM's default: `/ws`).
    ///
    /// # Errors
    /// The URL is invalid, Redis is unreachable, or `servers` is empty.
    pub async fn connect(
        redis_url: &str,
        servers: Vec<String>,
        path: &str,
    ) -> Result<Self, HelperError> {
        let client = redis::Client::open(redis_url)?;
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(2)))
            .set_response_timeout(Some(Duration::from_secs(2)))
            .set_number_of_retries(2)
            .set_max_delay(Duration::from_secs(2));
        let conn = client.get_connection_manager_with_config(config).await?;
        Self::with_connection(client, conn, servers, path)
    }

    /// Connects to a Redis Cluster through `seeds` (`redis://host:port`
    /// URLs of some of its nodes), for a cluster of `servers` serving
    /// WebSockets at `path`. Keys are [`Keys::for_cluster`]'s, deliveries
    /// go over sharded pub/sub (`SPUBLISH`).
    ///
    /// # Errors
    /// No seed answers as a cluster node, or `servers` is empty.
    pub async fn connect_cluster(
        seeds: &[String],
        servers: Vec<String>,
        path: &str,
    ) -> Result<Self, HelperError> {
        if servers.is_empty() {
            return Err(HelperError::NoServers);
        }
        let conn = cluster_client(seeds, None)?.get_async_connection().await?;
        Ok(Self {
            target: RedisTarget::Cluster(seeds.to_vec()),
            conn: RedisConn::Cluster(std::sync::Arc::new(crate::conn::ClusterHandle::new(
                seeds.to_vec(),
                conn,
            ))),
            keys: Keys::for_cluster(path),
            servers,
            path: path.to_owned(),
            token_ttl: DEFAULT_TOKEN_TTL,
        })
    }

    /// Builds a helper over connections the caller already has.
    ///
    /// # Errors
    /// `servers` is empty.
    pub fn with_connection(
        client: redis::Client,
        conn: redis::aio::ConnectionManager,
        servers: Vec<String>,
        path: &str,
    ) -> Result<Self, HelperError> {
        if servers.is_empty() {
            return Err(HelperError::NoServers);
        }
        Ok(Self {
            target: RedisTarget::Standalone(client),
            conn: RedisConn::Standalone(conn),
            keys: Keys::for_path(path),
            servers,
            path: path.to_owned(),
            token_ttl: DEFAULT_TOKEN_TTL,
        })
    }

    /// Changes how long connect tokens live (FreeIM: 10 s).
    pub fn with_token_ttl(mut self, ttl: Duration) -> Self {
        self.token_ttl = ttl;
        self
    }

    /// The key names this helper uses.
    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    /// The cluster's nodes, in partition order.
    pub fn servers(&self) -> &[String] {
        &self.servers
    }

    /// A multiplexed connection for commands (cheap to clone).
    pub fn connection(&self) -> RedisConn {
        self.conn.clone()
    }

    /// Where Redis is, for dedicated (pub/sub) connections.
    pub fn target(&self) -> &RedisTarget {
        &self.target
    }

    /// `PUBLISH`, or `SPUBLISH` on a cluster (a node's channel is in its
    /// own slot: it reaches the node's subscriber on that slot's master).
    fn publish_cmd(&self, channel: String, payload: &str) -> redis::Cmd {
        let mut cmd = redis::cmd(if self.conn.is_cluster() {
            "SPUBLISH"
        } else {
            "PUBLISH"
        });
        cmd.arg(channel).arg(payload);
        cmd
    }

    /// On a cluster, makes the command connection learn where `node`'s
    /// channel lives now: a short-lived write to a key of that channel's
    /// slot. A publish is not a write, so a connection whose map of the
    /// slots went stale in a failover would keep sending it to the demoted
    /// master, which accepts it and has no subscriber; a write is answered
    /// `MOVED` there, and the connection refreshes its map. A no-op on
    /// standalone Redis.
    ///
    /// # Errors
    /// Redis failed.
    pub async fn refresh_route(&self, node: &str) -> Result<(), HelperError> {
        self.refresh_route_of(&self.keys.server(node)).await
    }

    /// [`ImHelper::refresh_route`] for any sharded channel: the key of the
    /// same name is in the channel's slot.
    ///
    /// # Errors
    /// Redis failed.
    pub async fn refresh_route_of(&self, channel: &str) -> Result<(), HelperError> {
        if !self.conn.is_cluster() {
            return Ok(());
        }
        let mut conn = self.conn.clone();
        let () = redis::cmd("SET")
            .arg(channel)
            .arg(1)
            .arg("PX")
            .arg(1000)
            .query_async(&mut conn)
            .await?;
        Ok(())
    }

    /// Publishes each `(node, payload)`, returning how many heard each: in
    /// one pipeline on standalone Redis; concurrently on a cluster, where a
    /// pipeline may not span slots.
    async fn publish_many(&self, items: Vec<(&str, String)>) -> Result<Vec<i64>, HelperError> {
        self.publish_many_as(items, crate::wire::new_delivery_id())
            .await
    }

    /// [`ImHelper::publish_many`] with the deliveries' id: on a cluster
    /// the payload carries it ([`crate::wire::Envelope`]), so a retry of the
    /// same publish is recognised and dropped by the node.
    async fn publish_many_as(
        &self,
        items: Vec<(&str, String)>,
        id: u64,
    ) -> Result<Vec<i64>, HelperError> {
        if self.conn.is_cluster() {
            let calls = items.into_iter().map(|(node, payload)| {
                let payload = crate::wire::Envelope::wrap(id, &payload);
                let cmd = self.publish_cmd(self.keys.server(node), &payload);
                let mut conn = self.conn.clone();
                async move { cmd.query_async::<i64>(&mut conn).await }
            });
            return Ok(futures_util::future::try_join_all(calls).await?);
        }
        let mut pipe = redis::pipe();
        for (node, payload) in &items {
            pipe.publish(self.keys.server(node), payload);
        }
        let mut conn = self.conn.clone();
        Ok(pipe.query_async(&mut conn).await?)
    }

    /// Stores `value` under `token` for `ttl`.
    ///
    /// # Errors
    /// Redis failed.
    pub async fn issue_token(
        &self,
        value: &TokenValue,
        token: &str,
        ttl: Duration,
    ) -> Result<(), HelperError> {
        let json = serde_json::to_string(value)?;
        let ttl = ttl.as_millis().max(1) as u64;
        let mut conn = self.conn.clone();
        let () = redis::cmd("SET")
            .arg(self.keys.token(token))
            .arg(json)
            .arg("PX")
            .arg(ttl)
            .query_async(&mut conn)
            .await?;
        Ok(())
    }

    /// `PrevConnectServer`: a single-use connect URL for `client_id` on the node
    /// that owns it.
    ///
    /// # Errors
    /// Redis failed.
    pub async fn prev_connect_server(
        &self,
        client_id: ClientId,
        metadata: Option<String>,
    ) -> Result<String, HelperError> {
        let token = crate::wire::new_token();
        self.issue_token(
            &TokenValue {
                client_id,
                metadata,
            },
            &token,
            self.token_ttl,
        )
        .await?;
        let server = node_for(client_id, &self.servers);
        Ok(format!("ws://{server}{}?token={token}", self.path))
    }

    /// Publishes `message` to one node's channel.
    ///
    /// # Errors
    /// Redis failed.
    pub async fn publish(&self, node: &str, message: &ServerMessage) -> Result<(), HelperError> {
        self.publish_heard(node, message).await.map(|_| ())
    }

    /// [`ImHelper::publish`], returning how many subscribers heard it: 0 means
    /// node `node` is not listening (down, or resubscribing after a Redis
    /// restart), and the message reached no one.
    ///
    /// # Errors
    /// Redis failed.
    pub async fn publish_heard(
        &self,
        node: &str,
        message: &ServerMessage,
    ) -> Result<i64, HelperError> {
        Ok(self
            .publish_many(vec![(node, message.encode())])
            .await?
            .first()
            .copied()
            .unwrap_or(0))
    }

    /// Publishes `message` to each of `nodes` in one pipeline and returns how
    /// many subscribers heard it, node by node.
    ///
    /// # Errors
    /// Redis failed.
    pub async fn publish_each_heard(
        &self,
        nodes: &[&str],
        message: &ServerMessage,
    ) -> Result<Vec<i64>, HelperError> {
        self.publish_each_heard_as(nodes, message, crate::wire::new_delivery_id())
            .await
    }

    /// [`ImHelper::publish_each_heard`] under a delivery id the caller keeps
    /// across its retries: on a cluster, where a message may be heard by a
    /// subscriber the reply does not count (one on a replica), the node
    /// drops the second copy of an id it already delivered.
    ///
    /// # Errors
    /// Redis failed.
    pub async fn publish_each_heard_as(
        &self,
        nodes: &[&str],
        message: &ServerMessage,
        id: u64,
    ) -> Result<Vec<i64>, HelperError> {
        let payload = message.encode();
        self.publish_many_as(nodes.iter().map(|n| (*n, payload.clone())).collect(), id)
            .await
    }

    /// Publishes `message` to every node in one pipeline.
    ///
    /// # Errors
    /// Redis failed.
    pub async fn publish_all(&self, message: &ServerMessage) -> Result<(), HelperError> {
        let payload = message.encode();
        self.publish_many(
            self.servers
                .iter()
                .map(|n| (n.as_str(), payload.clone()))
                .collect(),
        )
        .await?;
        Ok(())
    }

    /// `SendMessage`: `message` (any serialisable value) from `sender` to
    /// `receivers`, one publish per owning node, in one pipeline.
    ///
    /// # Errors
    /// Redis failed or `message` is not serialisable.
    pub async fn send_message(
        &self,
        sender: ClientId,
        receivers: &[ClientId],
        message: &impl Serialize,
        receipt: bool,
    ) -> Result<(), HelperError> {
        let content = serde_json::to_string(message)?;
        self.send_message_text(sender, receivers, content, receipt)
            .await
    }

    /// [`ImHelper::send_message`] with the message already as JSON text.
    ///
    /// # Errors
    /// Redis failed.
    pub async fn send_message_text(
        &self,
        sender: ClientId,
        receivers: &[ClientId],
        content: String,
        receipt: bool,
    ) -> Result<(), HelperError> {
        let items = group_by_node(receivers, &self.servers)
            .into_iter()
            .map(|(node, ids)| {
                let message = ServerMessage::Direct(DirectMessage {
                    sender,
                    receivers: ids,
                    content: content.clone(),
                    receipt,
                });
                (node, message.encode())
            })
            .collect();
        self.publish_many(items).await?;
        Ok(())
    }

    /// `GetClientListByOnline`: every client with a socket.
    ///
    /// # Errors
    /// Redis failed.
    pub async fn get_client_list_by_online(&self) -> Result<Vec<ClientId>, HelperError> {
        if self.keys.is_cluster() {
            return Ok(buckets::online_clients(&self.conn, &self.keys).await?);
        }
        let mut conn = self.conn.clone();
        Ok(conn.hkeys(self.keys.online(0)).await?)
    }

    /// `HasOnline` for one client.
    ///
    /// # Errors
    /// Redis failed.
    pub async fn has_online(&self, client_id: ClientId) -> Result<bool, HelperError> {
        Ok(self.online_count(client_id).await? > 0)
    }

    /// `HasOnline` for many clients, in one round trip, in the order given.
    ///
    /// # Errors
    /// Redis failed.
    pub async fn has_online_many(&self, client_ids: &[ClientId]) -> Result<Vec<bool>, HelperError> {
        if client_ids.is_empty() {
            return Ok(Vec::new());
        }
        if self.keys.is_cluster() {
            let counts = buckets::online_counts(&self.conn, &self.keys, client_ids).await?;
            return Ok(counts.into_iter().map(|c| c > 0).collect());
        }
        let mut conn = self.conn.clone();
        let counts: Vec<Option<i64>> = redis::cmd("HMGET")
            .arg(self.keys.online(0))
            .arg(client_ids)
            .query_async(&mut conn)
            .await?;
        Ok(counts.into_iter().map(|c| c.unwrap_or(0) > 0).collect())
    }

    /// Sockets `client_id` holds in the cluster (FreeIM's `Online` hash).
    ///
    /// # Errors
    /// Redis failed.
    pub async fn online_count(&self, client_id: ClientId) -> Result<u64, HelperError> {
        let mut conn = self.conn.clone();
        let count: Option<i64> = conn.hget(self.keys.online(client_id), client_id).await?;
        Ok(count.unwrap_or(0).max(0) as u64)
    }

    /// `ForceOffline`: closes every socket of `client_id`.
    ///
    /// # Errors
    /// Redis failed.
    pub async fn force_offline(&self, client_id: ClientId) -> Result<(), HelperError> {
        let node = node_for(client_id, &self.servers).to_owned();
        self.publish(&node, &ServerMessage::ForceOffline { client_id })
            .await
    }

    /// `EventBus`: online and offline events of the whole cluster, on a
    /// dedicated connection. The stream ends when that connection is lost;
    /// payloads that are not FreeIM token values are skipped.
    ///
    /// # Errors
    /// The subscription could not be made.
    pub async fn event_bus(
        &self,
    ) -> Result<futures_util::stream::BoxStream<'static, BusEvent>, HelperError> {
        let offline = self.keys.offline_event();
        // Every event channel, classic or sharded, ends with its kind.
        let event = move |channel: &[u8], payload: &[u8]| {
            let kind = if channel.ends_with(b"Online") {
                EventKind::Online
            } else {
                EventKind::Offline
            };
            serde_json::from_slice(payload)
                .ok()
                .map(|client| BusEvent { kind, client })
        };
        match &self.target {
            RedisTarget::Standalone(client) => {
                let mut pubsub = client.get_async_pubsub().await?;
                pubsub.subscribe(self.keys.online_event()).await?;
                pubsub.subscribe(&offline).await?;
                Ok(pubsub
                    .into_on_message()
                    .filter_map(move |msg| {
                        std::future::ready(event(
                            msg.get_channel_name().as_bytes(),
                            msg.get_payload_bytes(),
                        ))
                    })
                    .boxed())
            }
            RedisTarget::Cluster(seeds) => {
                // A connect's or a disconnect's event is on its event
                // shard's sharded channel; a reap's on the classic channel.
                let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
                let mut conn = cluster_client(seeds, Some(tx))?
                    .get_async_connection()
                    .await?;
                conn.subscribe(self.keys.online_event()).await?;
                conn.subscribe(&offline).await?;
                for (online, offline) in self.keys.event_shards() {
                    conn.ssubscribe(&[online, offline]).await?;
                }
                // An event shard moved (failover, migration): the stream
                // ends, as on a lost connection, and the caller subscribes
                // again.
                let events =
                    futures_util::stream::unfold((rx, conn), move |(mut rx, conn)| async move {
                        loop {
                            let push = rx.recv().await?;
                            match (push.kind, push.data.as_slice()) {
                                (
                                    redis::PushKind::Message | redis::PushKind::SMessage,
                                    [
                                        redis::Value::BulkString(channel),
                                        redis::Value::BulkString(payload),
                                    ],
                                ) => {
                                    if let Some(found) = event(channel, payload) {
                                        return Some((found, (rx, conn)));
                                    }
                                }
                                (
                                    redis::PushKind::SUnsubscribe | redis::PushKind::Disconnection,
                                    _,
                                ) => {
                                    return None;
                                }
                                _ => {}
                            }
                        }
                    });
                Ok(events.boxed())
            }
        }
    }

    /// `JoinChan`: clients join `chan` (idempotent), each atomically on one
    /// Redis; on a cluster each side of it atomically ([`crate::buckets`]).
    ///
    /// # Errors
    /// Redis failed.
    pub async fn join_chan(&self, chan: &str, client_ids: &[ClientId]) -> Result<(), HelperError> {
        if self.keys.is_cluster() {
            return Ok(buckets::join(&self.conn, &self.keys, chan, client_ids).await?);
        }
        self.per_client_script(JOIN_CHAN, chan, client_ids).await
    }

    /// `LeaveChan(chan, ids)`: clients leave `chan` (idempotent), each
    /// atomically on one Redis; on a cluster each side of it atomically.
    ///
    /// # Errors
    /// Redis failed.
    pub async fn leave_chan(&self, chan: &str, client_ids: &[ClientId]) -> Result<(), HelperError> {
        if self.keys.is_cluster() {
            return Ok(buckets::leave(&self.conn, &self.keys, chan, client_ids).await?);
        }
        self.per_client_script(LEAVE_CHAN, chan, client_ids).await
    }

    /// `LeaveChan(id, chans)`: one client leaves several channels.
    ///
    /// # Errors
    /// Redis failed.
    pub async fn leave_chans(
        &self,
        client_id: ClientId,
        chans: &[String],
    ) -> Result<(), HelperError> {
        for chan in chans {
            self.leave_chan(chan, &[client_id]).await?;
        }
        Ok(())
    }

    async fn per_client_script(
        &self,
        source: &str,
        chan: &str,
        client_ids: &[ClientId],
    ) -> Result<(), HelperError> {
        let script = Script::new(source);
        // Concurrent invocations on one multiplexed connection are pipelined.
        let calls = client_ids.iter().map(|&id| {
            let mut invocation = script.prepare_invoke();
            invocation
                .key(self.keys.chan(chan))
                .key(self.keys.client(id))
                .key(self.keys.list_chan(chan))
                .arg(id)
                .arg(chan);
            let mut conn = self.conn.clone();
            async move { invocation.invoke_async::<i64>(&mut conn).await }
        });
        futures_util::future::try_join_all(calls).await?;
        Ok(())
    }

    /// `GetChanClientList`: members of `chan`.
    ///
    /// # Errors
    /// Redis failed.
    pub async fn get_chan_client_list(&self, chan: &str) -> Result<Vec<ClientId>, HelperError> {
        let mut conn = self.conn.clone();
        Ok(conn.hkeys(self.keys.chan(chan)).await?)
    }

    /// `ClearChanClient`: every member leaves `chan`, atomically on one
    /// Redis; on a cluster the channel first, then each member's record.
    ///
    /// # Errors
    /// Redis failed.
    pub async fn clear_chan_client(&self, chan: &str) -> Result<(), HelperError> {
        if self.keys.is_cluster() {
            return Ok(buckets::clear(&self.conn, &self.keys, chan).await?);
        }
        let mut conn = self.conn.clone();
        let _: i64 = Script::new(CLEAR_CHAN)
            .key(self.keys.chan(chan))
            .key(self.keys.list_chan(chan))
            .arg(format!("{}Client", self.keys.prefix()))
            .arg(chan)
            .invoke_async(&mut conn)
            .await?;
        Ok(())
    }

    /// `GetChanList`: every channel with its member count.
    ///
    /// # Errors
    /// Redis failed.
    pub async fn get_chan_list(&self) -> Result<Vec<(String, i64)>, HelperError> {
        let mut list: Vec<(String, i64)> = if self.keys.is_cluster() {
            buckets::chan_list(&self.conn, &self.keys).await?
        } else {
            let mut conn = self.conn.clone();
            conn.hgetall(self.keys.list_chan("")).await?
        };
        list.sort();
        Ok(list)
    }

    /// `GetChanListByClientId`: the channels of `client_id`.
    ///
    /// # Errors
    /// Redis failed.
    pub async fn get_chan_list_by_client_id(
        &self,
        client_id: ClientId,
    ) -> Result<Vec<String>, HelperError> {
        let mut conn = self.conn.clone();
        let mut chans: Vec<String> = conn.hkeys(self.keys.client(client_id)).await?;
        chans.sort();
        Ok(chans)
    }

    /// `GetChanOnline`: member count of `chan`.
    ///
    /// # Errors
    /// Redis failed.
    pub async fn get_chan_online(&self, chan: &str) -> Result<i64, HelperError> {
        let mut conn = self.conn.clone();
        let count: Option<i64> = conn.hget(self.keys.list_chan(chan), chan).await?;
        Ok(count.unwrap_or(0))
    }

    /// `SendChanMessage`: `message` to every member of `chan`, on every node.
    ///
    /// # Errors
    /// Redis failed or `message` is not serialisable.
    pub async fn send_chan_message(
        &self,
        sender: ClientId,
        chan: &str,
        message: &impl Serialize,
    ) -> Result<(), HelperError> {
        let content = serde_json::to_string(message)?;
        self.publish_all(&ServerMessage::Chan(ChanMessage {
            sender,
            chan: Some(chan.to_owned()),
            content,
        }))
        .await
    }

    /// `SendBroadcastMessage`: `message` to every client of every node.
    ///
    /// # Errors
    /// Redis failed or `message` is not serialisable.
    pub async fn send_broadcast_message(
        &self,
        message: &impl Serialize,
    ) -> Result<(), HelperError> {
        let content = serde_json::to_string(message)?;
        self.publish_all(&ServerMessage::Chan(ChanMessage {
            sender: 0,
            chan: None,
            content,
        }))
        .await
    }
}

/// A Redis Cluster client over `seeds`: RESP3 with `push` for connections
/// that subscribe, short timeouts for commands.
///
/// # Errors
/// A seed is not a valid URL.
pub fn cluster_client(
    seeds: &[String],
    push: Option<tokio::sync::mpsc::UnboundedSender<redis::PushInfo>>,
) -> Result<redis::cluster::ClusterClient, HelperError> {
    let mut builder = redis::cluster::ClusterClientBuilder::new(seeds.to_vec())
        .connection_timeout(Duration::from_secs(2))
        .response_timeout(Duration::from_secs(2))
        .retries(3);
    if let Some(push) = push {
        builder = builder
            .use_protocol(redis::ProtocolVersion::RESP3)
            .push_sender(push);
    }
    Ok(builder.build()?)
}
