//! FreeIM v2 over Redis, byte for byte (SPEC section 2).
//!
//! A backend running FreeIM's own .NET `ImHelper` against the same Redis must see
//! imhost behave like FreeIM's `ImServer`, so every name and payload here copies
//! FreeIM: Newtonsoft serialises .NET value tuples as `{"Item1":…,"Item2":…}`, keys
//! hang off a prefix derived from the WebSocket path, and control messages are
//! plain strings with a `__FreeIM__(…)` marker in front.

use serde::{Deserialize, Serialize};

use crate::ClientId;

/// A new connect token: 64 random bytes from the OS generator as 128 hex
/// characters, the length FreeIM uses.
pub fn new_token() -> String {
    use rand::RngCore;
    let mut bytes = [0u8; 64];
    rand::rng().fill_bytes(&mut bytes);
    hex::encode(bytes)
}

/// A random id for one delivery (kept across its retries).
pub fn new_delivery_id() -> u64 {
    rand::random()
}

/// imhost-native (Redis Cluster mode): a node message with its delivery id
/// in front, `\u{1}<16 hex digits>\u{1}<message>`, so that a node can drop
/// a retry of a delivery it already handed out. Standalone Redis keeps
/// FreeIM's bare messages.
pub struct Envelope;

impl Envelope {
    const MARK: char = '\u{1}';

    pub fn wrap(id: u64, message: &str) -> String {
        format!("{m}{id:016x}{m}{message}", m = Self::MARK)
    }

    /// The id and the message of an envelope; `None` for a bare message.
    pub fn open(payload: &str) -> Option<(u64, &str)> {
        let rest = payload.strip_prefix(Self::MARK)?;
        let (id, message) = rest.split_once(Self::MARK)?;
        Some((u64::from_str_radix(id, 16).ok()?, message))
    }
}

/// Cheap shape check before any store is asked about a token.
pub fn looks_like_token(token: &str) -> bool {
    token.len() == 128 && token.bytes().all(|b| b.is_ascii_hexdigit())
}

/// The receipt text FreeIM sends back when the receiver got the message.
pub const RECEIPT_DELIVERED: &str = "发送成功";
/// The receipt text FreeIM sends back when the receiver is not connected.
pub const RECEIPT_OFFLINE: &str = "用户不在线";

/// imhost extension: the receipt text when a filter plugin dropped the
/// message; the receipt then also carries `"reason"`.
pub const RECEIPT_FILTERED: &str = "消息被拦截";

const CHAN_MESSAGE_MARKER: &str = "__FreeIM__(ChanMessage)";
const FORCE_OFFLINE_MARKER: &str = "__FreeIM__(ForceOffline)";

/// Redis key and channel names for one deployment, all hanging off the prefix
/// `"im_v2" + path with '/' replaced by '_'` (path `/ws` gives `im_v2_ws`).
///
/// In Redis Cluster mode ([`Keys::for_cluster`], imhost-native) presence is
/// spread over [`CLUSTER_BUCKETS`] hash-tag buckets, `{im_v2_ws:B}`: a
/// client's keys (its socket count in `Online`, its channels, the nodes'
/// records of it) are in bucket [`client_bucket`], a channel's (members,
/// member count) in bucket [`chan_bucket`], so every script touches one
/// slot and the buckets spread over the masters. What has to be read
/// together (node liveness, status reports) is in the control slot
/// `{im_v2_ws}`; each node's delivery channel (`im_v2_ws:Server{NODE}`),
/// each connect token and each plugin's keys carry a tag of their own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Keys {
    prefix: String,
    /// The prefix without braces; `Some` in cluster mode.
    cluster: Option<String>,
}

/// Presence buckets of a deployment on Redis Cluster. Part of the key
/// schema: every node and backend of a deployment must agree on it.
pub const CLUSTER_BUCKETS: u32 = 1024;

/// Shards of the presence events on a Redis Cluster: a connect's or a
/// disconnect's event goes over sharded pub/sub to the channel of shard
/// `client_bucket(id) % EVENT_SHARDS` ([`Keys::online_event_of`]), so the
/// events spread over up to this many masters and none of them is copied
/// to every master by the cluster bus, as a classic `PUBLISH` is. Part of
/// the key schema.
pub const EVENT_SHARDS: u32 = 16;

/// The bucket of a client's presence keys on a Redis Cluster: its id modulo
/// [`CLUSTER_BUCKETS`], never negative.
pub fn client_bucket(client_id: ClientId) -> u32 {
    client_id.rem_euclid(i64::from(CLUSTER_BUCKETS)) as u32
}

fn event_shard(client_id: ClientId) -> u32 {
    client_bucket(client_id) % EVENT_SHARDS
}

/// The bucket of a channel's keys on a Redis Cluster: the 32-bit FNV-1a hash
/// of its UTF-8 name modulo [`CLUSTER_BUCKETS`] (a hash any backend language
/// can compute in three lines).
pub fn chan_bucket(chan: &str) -> u32 {
    let hash = chan.bytes().fold(0x811c_9dc5_u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    });
    hash % CLUSTER_BUCKETS
}

/// The keys of one presence bucket on a Redis Cluster (all in one slot).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bucket {
    tag: String,
}

impl Bucket {
    /// The hash tag, `{im_v2_ws:B}`: every key of the bucket starts with it.
    pub fn tag(&self) -> &str {
        &self.tag
    }

    /// Hash `client id → sockets in the cluster` of the bucket's clients.
    pub fn online(&self) -> String {
        format!("{}Online", self.tag)
    }

    /// Hash of a client's channels (`channel → 0`).
    pub fn client(&self, client_id: ClientId) -> String {
        format!("{}Client{client_id}", self.tag)
    }

    /// Hash of a channel's members (`client id → 0`).
    pub fn chan(&self, chan: &str) -> String {
        format!("{}Chan{chan}", self.tag)
    }

    /// Hash `channel → member count` of the bucket's channels.
    pub fn list_chan(&self) -> String {
        format!("{}ListChan", self.tag)
    }

    /// Hash `client id → sockets` that run `incarnation` of node `node`
    /// holds, of this bucket's clients.
    pub fn node_online(&self, node: &str, incarnation: &str) -> String {
        format!("{}NodeOnline{node}@{incarnation}", self.tag)
    }

    /// Hash `client id → token value JSON`, beside [`Bucket::node_online`].
    pub fn node_meta(&self, node: &str, incarnation: &str) -> String {
        format!("{}NodeMeta{node}@{incarnation}", self.tag)
    }

    /// Hash `client id → JSON list of channels` that went offline through
    /// that node run and whose channels (in other buckets) still list them:
    /// the leaves left to do, finished by the node or by whoever reaps it.
    pub fn node_leaving(&self, node: &str, incarnation: &str) -> String {
        format!("{}NodeLeaving{node}@{incarnation}", self.tag)
    }
}

impl Keys {
    /// Names for the WebSocket path terminals connect to, e.g. `/ws`.
    pub fn for_path(path: &str) -> Self {
        Self {
            prefix: format!("im_v2{}", path.replace('/', "_")),
            cluster: None,
        }
    }

    /// Names for a deployment on Redis Cluster (not FreeIM-compatible: its
    /// .NET helper cannot run against a cluster).
    pub fn for_cluster(path: &str) -> Self {
        let bare = format!("im_v2{}", path.replace('/', "_"));
        Self {
            prefix: format!("{{{bare}}}"),
            cluster: Some(bare),
        }
    }

    /// Whether these are Redis Cluster names.
    pub fn is_cluster(&self) -> bool {
        self.cluster.is_some()
    }

    /// The prefix itself, `im_v2_ws` for `/ws` (`{im_v2_ws}`, the control
    /// slot, on a cluster).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Presence bucket `bucket` (cluster mode; on one Redis, FreeIM's keys
    /// are not bucketed and this names no key anyone reads).
    pub fn bucket(&self, bucket: u32) -> Bucket {
        let bare = self.cluster.as_deref().unwrap_or(&self.prefix);
        Bucket {
            tag: format!("{{{bare}:{bucket}}}"),
        }
    }

    /// Every presence bucket: [`CLUSTER_BUCKETS`] on a cluster, none on one
    /// Redis.
    pub fn buckets(&self) -> impl Iterator<Item = Bucket> + '_ {
        let count = if self.is_cluster() {
            CLUSTER_BUCKETS
        } else {
            0
        };
        (0..count).map(|b| self.bucket(b))
    }

    /// String key holding a connect token's [`TokenValue`] for a few seconds.
    pub fn token(&self, token: &str) -> String {
        match &self.cluster {
            Some(bare) => format!("{bare}:Token{{{token}}}"),
            None => format!("{}Token{token}", self.prefix),
        }
    }

    /// Hash `client id → number of sockets` over the whole cluster (on a
    /// Redis Cluster, the part of it in `client_id`'s bucket).
    pub fn online(&self, client_id: ClientId) -> String {
        match self.cluster {
            Some(_) => self.bucket(client_bucket(client_id)).online(),
            None => format!("{}Online", self.prefix),
        }
    }

    /// Pub/sub channel a node listens on for deliveries and control messages.
    pub fn server(&self, node: &str) -> String {
        match &self.cluster {
            // A hash tag per node: its deliveries go to its own shard.
            Some(bare) => format!("{bare}:Server{{{node}}}"),
            None => format!("{}Server{node}", self.prefix),
        }
    }

    /// Hash of a channel's members (`client id → 0`).
    pub fn chan(&self, chan: &str) -> String {
        match self.cluster {
            Some(_) => self.bucket(chan_bucket(chan)).chan(chan),
            None => format!("{}Chan{chan}", self.prefix),
        }
    }

    /// Hash of a client's channels (`channel → 0`).
    pub fn client(&self, client_id: ClientId) -> String {
        match self.cluster {
            Some(_) => self.bucket(client_bucket(client_id)).client(client_id),
            None => format!("{}Client{client_id}", self.prefix),
        }
    }

    /// Hash `channel → member count` (on a Redis Cluster, the part of it in
    /// `chan`'s bucket).
    pub fn list_chan(&self, chan: &str) -> String {
        match self.cluster {
            Some(_) => self.bucket(chan_bucket(chan)).list_chan(),
            None => format!("{}ListChan", self.prefix),
        }
    }

    /// imhost extension: string key that exists while node `node` is alive
    /// (refreshed by the node, with a TTL).
    pub fn node_alive(&self, node: &str) -> String {
        format!("{}Node{node}", self.prefix)
    }

    /// imhost extension, cluster mode: the id of node `node`'s current run
    /// (its records in the buckets carry it).
    pub fn node_incarnation(&self, node: &str) -> String {
        format!("{}NodeInc{node}", self.prefix)
    }

    /// imhost extension, cluster mode: set of node `node`'s past runs whose
    /// records are still to be reaped.
    pub fn node_past(&self, node: &str) -> String {
        format!("{}NodePast{node}", self.prefix)
    }

    /// imhost extension: hash `client id → sockets` held on node `node`, what
    /// that node contributed to [`Keys::online`], so others can undo it if the
    /// node dies (one Redis; see [`Bucket::node_online`] on a cluster).
    pub fn node_online(&self, node: &str) -> String {
        format!("{}NodeOnline{node}", self.prefix)
    }

    /// imhost extension: hash `client id → token value JSON` of the clients on
    /// node `node`, for their offline events if the node dies.
    pub fn node_meta(&self, node: &str) -> String {
        format!("{}NodeMeta{node}", self.prefix)
    }

    /// imhost extension: a plugin's key-value entry, `plugin_key` being
    /// `NAME:KEY`. On a cluster each plugin's keys carry its name as their
    /// hash tag, so one plugin's counters stay together and plugins spread.
    pub fn plugin(&self, plugin_key: &str) -> String {
        match (&self.cluster, plugin_key.split_once(':')) {
            (Some(bare), Some((name, key))) => format!("{bare}:Plugin{{{name}}}:{key}"),
            _ => format!("{}Plugin{plugin_key}", self.prefix),
        }
    }

    /// Pub/sub channel of online events (payload: a [`TokenValue`]). On a
    /// Redis Cluster the classic channel, for the rare events told from
    /// inside a bucket's script (a reap, a node announcing its clients
    /// again); a connect's event goes to [`Keys::online_event_of`].
    pub fn online_event(&self) -> String {
        format!("evt_{}Online", self.prefix)
    }

    /// Pub/sub channel of offline events; see [`Keys::online_event`].
    pub fn offline_event(&self) -> String {
        format!("evt_{}Offline", self.prefix)
    }

    /// The channel of `client_id`'s online event on a connect: on one
    /// Redis FreeIM's; on a cluster the sharded channel of its event shard
    /// (publish with `SPUBLISH`).
    pub fn online_event_of(&self, client_id: ClientId) -> String {
        match &self.cluster {
            Some(bare) => format!("evt_{{{bare}:e{}}}Online", event_shard(client_id)),
            None => self.online_event(),
        }
    }

    /// The channel of `client_id`'s offline event on a disconnect; see
    /// [`Keys::online_event_of`].
    pub fn offline_event_of(&self, client_id: ClientId) -> String {
        match &self.cluster {
            Some(bare) => format!("evt_{{{bare}:e{}}}Offline", event_shard(client_id)),
            None => self.offline_event(),
        }
    }

    /// Every sharded event channel, `(online, offline)` per shard: what a
    /// subscriber to a cluster's events listens to (with `SSUBSCRIBE`)
    /// beside the two classic channels. None on one Redis.
    pub fn event_shards(&self) -> Vec<(String, String)> {
        let Some(bare) = &self.cluster else {
            return Vec::new();
        };
        (0..EVENT_SHARDS)
            .map(|e| {
                (
                    format!("evt_{{{bare}:e{e}}}Online"),
                    format!("evt_{{{bare}:e{e}}}Offline"),
                )
            })
            .collect()
    }
}

/// What a connect token stands for, and the payload of online/offline events:
/// FreeIM's `(long clientId, string clientMetaData)`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenValue {
    #[serde(rename = "Item1")]
    pub client_id: ClientId,
    #[serde(rename = "Item2")]
    pub metadata: Option<String>,
}

/// A point-to-point delivery to the receivers that live on one node:
/// FreeIM's `(long sender, long[] receivers, string content, bool receipt)`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirectMessage {
    #[serde(rename = "Item1")]
    pub sender: ClientId,
    #[serde(rename = "Item2")]
    pub receivers: Vec<ClientId>,
    /// The message as JSON text, sent to terminals exactly as it is.
    #[serde(rename = "Item3")]
    pub content: String,
    #[serde(rename = "Item4")]
    pub receipt: bool,
}

/// A delivery to a channel's members on one node, or to every client of the node
/// when `chan` is `None` (broadcast): FreeIM's `(long sender, string chan, string content)`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChanMessage {
    #[serde(rename = "Item1")]
    pub sender: ClientId,
    #[serde(rename = "Item2")]
    pub chan: Option<String>,
    #[serde(rename = "Item3")]
    pub content: String,
}

/// Everything a node can be asked to do on its `P+"Server"+node` channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerMessage {
    Direct(DirectMessage),
    Chan(ChanMessage),
    ForceOffline { client_id: ClientId },
}

/// A payload on a node's channel that is not a FreeIM message.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("malformed {kind} payload: {source}")]
    Json {
        kind: &'static str,
        #[source]
        source: serde_json::Error,
    },
    #[error("malformed ForceOffline payload: {0:?} is not a client id")]
    ClientId(String),
}

impl ServerMessage {
    /// The exact text FreeIM publishes for this message.
    pub fn encode(&self) -> String {
        // Serialising these plain structs cannot fail: no maps with non-string
        // keys, no custom serialisers.
        match self {
            ServerMessage::Direct(msg) => serde_json::to_string(msg).unwrap_or_default(),
            ServerMessage::Chan(msg) => format!(
                "{CHAN_MESSAGE_MARKER}{}",
                serde_json::to_string(msg).unwrap_or_default()
            ),
            ServerMessage::ForceOffline { client_id } => {
                format!("{FORCE_OFFLINE_MARKER}{client_id}")
            }
        }
    }

    /// Reads a payload published by an imhost node or by FreeIM's `ImHelper`.
    ///
    /// # Errors
    /// [`DecodeError`] when the payload is none of the three FreeIM shapes.
    pub fn decode(payload: &str) -> Result<Self, DecodeError> {
        if let Some(rest) = payload.strip_prefix(CHAN_MESSAGE_MARKER) {
            serde_json::from_str(rest)
                .map(ServerMessage::Chan)
                .map_err(|source| DecodeError::Json {
                    kind: "ChanMessage",
                    source,
                })
        } else if let Some(rest) = payload.strip_prefix(FORCE_OFFLINE_MARKER) {
            rest.trim()
                .parse()
                .map(|client_id| ServerMessage::ForceOffline { client_id })
                .map_err(|_| DecodeError::ClientId(rest.to_owned()))
        } else {
            serde_json::from_str(payload)
                .map(ServerMessage::Direct)
                .map_err(|source| DecodeError::Json {
                    kind: "message",
                    source,
                })
        }
    }
}

/// The node that owns `client_id`: `servers[client_id mod len]`, with a
/// non-negative modulo so negative ids land somewhere too.
///
/// # Panics
/// When `servers` is empty; a cluster always has at least one node.
pub fn node_for(client_id: ClientId, servers: &[String]) -> &str {
    let len = i64::try_from(servers.len()).unwrap_or(i64::MAX);
    let index = client_id.rem_euclid(len) as usize;
    &servers[index]
}

/// Receivers de-duplicated (first occurrence kept) and grouped by owning node,
/// in the order nodes first appear: what `ImHelper.SendMessage` publishes.
pub fn group_by_node<'a>(
    receivers: &[ClientId],
    servers: &'a [String],
) -> Vec<(&'a str, Vec<ClientId>)> {
    // One receiver (a greeting, a reply) needs no de-duplication.
    if let [id] = receivers {
        return vec![(node_for(*id, servers), vec![*id])];
    }
    let mut groups: Vec<(&str, Vec<ClientId>)> = Vec::new();
    let mut seen = std::collections::HashSet::with_capacity(receivers.len());
    for &id in receivers {
        if !seen.insert(id) {
            continue;
        }
        let node = node_for(id, servers);
        match groups.iter_mut().find(|(n, _)| *n == node) {
            Some((_, ids)) => ids.push(id),
            None => groups.push((node, vec![id])),
        }
    }
    groups
}

/// The receipt for a message a filter dropped: FreeIM's shape with the
/// [`RECEIPT_FILTERED`] text and a `reason` beside it.
pub fn receipt_filtered(content: &str, reason: &str) -> String {
    #[derive(Serialize)]
    struct Receipt<'a> {
        content: &'a str,
        receipt: &'a str,
        reason: &'a str,
    }
    serde_json::to_string(&Receipt {
        content,
        receipt: RECEIPT_FILTERED,
        reason,
    })
    .unwrap_or_default()
}

/// Whether `text` is a receipt this module wrote ([`receipt`] or
/// [`receipt_filtered`]): exactly those keys, with one of the known receipt
/// texts. Receipts echo what the sender wrote and skip the filter chain, on
/// whichever node they arrive.
pub fn is_receipt(text: &str) -> bool {
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Receipt {
        #[serde(rename = "content")]
        _content: String,
        receipt: String,
        #[serde(default, rename = "reason")]
        _reason: Option<String>,
    }
    // Every receipt starts so (see `receipt`): most messages are told apart
    // here, without a parse that fails and formats its error.
    if !text.starts_with(r#"{"content":"#) {
        return false;
    }
    serde_json::from_str::<Receipt>(text).is_ok_and(|r| {
        [RECEIPT_DELIVERED, RECEIPT_OFFLINE, RECEIPT_FILTERED].contains(&r.receipt.as_str())
    })
}

/// The text a sender gets back as a receipt: `{"content":"<content>","receipt":"…"}`,
/// where the delivered JSON text is embedded as a JSON string.
pub fn receipt(content: &str, text: &str) -> String {
    #[derive(Serialize)]
    struct Receipt<'a> {
        content: &'a str,
        receipt: &'a str,
    }
    serde_json::to_string(&Receipt {
        content,
        receipt: text,
    })
    .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_follow_freeim_naming() {
        let keys = Keys::for_path("/ws");
        assert_eq!(keys.prefix(), "im_v2_ws");
        assert_eq!(keys.token("ab"), "im_v2_wsTokenab");
        assert_eq!(keys.online(7), "im_v2_wsOnline");
        assert_eq!(
            keys.server("127.0.0.1:6001"),
            "im_v2_wsServer127.0.0.1:6001"
        );
        assert_eq!(keys.chan("room"), "im_v2_wsChanroom");
        assert_eq!(keys.client(7), "im_v2_wsClient7");
        assert_eq!(keys.list_chan("room"), "im_v2_wsListChan");
        assert_eq!(keys.online_event(), "evt_im_v2_wsOnline");
        assert_eq!(keys.offline_event(), "evt_im_v2_wsOffline");
        assert_eq!(keys.buckets().count(), 0, "one Redis has no buckets");
        assert_eq!(keys.online_event_of(7), keys.online_event());
        assert!(keys.event_shards().is_empty());
    }

    #[test]
    fn cluster_keys_put_a_client_and_a_channel_in_their_buckets() {
        let keys = Keys::for_cluster("/ws");
        assert_eq!(keys.buckets().count(), CLUSTER_BUCKETS as usize);
        assert_eq!(client_bucket(1030), 6);
        assert_eq!(client_bucket(-1), CLUSTER_BUCKETS - 1, "never negative");
        assert_eq!(keys.online(1030), "{im_v2_ws:6}Online");
        assert_eq!(keys.client(1030), "{im_v2_ws:6}Client1030");
        // FNV-1a 32 of "room" is 0x37fd327a (as any implementation computes).
        let room = 0x37fd_327a % CLUSTER_BUCKETS;
        assert_eq!(chan_bucket("room"), room);
        assert_eq!(keys.chan("room"), format!("{{im_v2_ws:{room}}}Chanroom"));
        assert_eq!(
            keys.list_chan("room"),
            format!("{{im_v2_ws:{room}}}ListChan")
        );
        assert_eq!(
            keys.bucket(3).node_online("n1", "abc"),
            "{im_v2_ws:3}NodeOnlinen1@abc"
        );
        assert_eq!(keys.token("ab"), "im_v2_ws:Token{ab}", "a slot per token");
        assert_eq!(keys.node_alive("n1"), "{im_v2_ws}Noden1");
        assert_eq!(keys.node_incarnation("n1"), "{im_v2_ws}NodeIncn1");
        assert_eq!(keys.online_event_of(1030), "evt_{im_v2_ws:e6}Online");
        assert_eq!(keys.offline_event_of(1030), "evt_{im_v2_ws:e6}Offline");
        assert_eq!(keys.event_shards().len(), EVENT_SHARDS as usize);
        assert_eq!(keys.online_event(), "evt_{im_v2_ws}Online", "classic");
    }

    #[test]
    fn messages_round_trip_as_freeim_writes_them() {
        let direct = r#"{"Item1":1,"Item2":[2,3],"Item3":"{\"a\":1}","Item4":true}"#;
        let msg = ServerMessage::decode(direct).expect("direct");
        assert_eq!(msg.encode(), direct);

        let chan = r#"__FreeIM__(ChanMessage){"Item1":0,"Item2":null,"Item3":"\"hi\""}"#;
        let msg = ServerMessage::decode(chan).expect("chan");
        assert!(matches!(&msg, ServerMessage::Chan(c) if c.chan.is_none()));
        assert_eq!(msg.encode(), chan);

        let kick = "__FreeIM__(ForceOffline)42";
        assert_eq!(
            ServerMessage::decode(kick).expect("kick"),
            ServerMessage::ForceOffline { client_id: 42 }
        );
        assert_eq!(ServerMessage::ForceOffline { client_id: 42 }.encode(), kick);
    }

    #[test]
    fn garbage_is_a_decode_error() {
        assert!(ServerMessage::decode("hello").is_err());
        assert!(ServerMessage::decode("__FreeIM__(ForceOffline)x").is_err());
        assert!(ServerMessage::decode("__FreeIM__(ChanMessage){").is_err());
    }

    #[test]
    fn partitioning_uses_a_non_negative_modulo() {
        let servers: Vec<String> = ["a", "b", "c"].map(String::from).into();
        assert_eq!(node_for(4, &servers), "b");
        assert_eq!(node_for(-1, &servers), "c");
        let groups = group_by_node(&[1, 4, 2, 1, 3], &servers);
        assert_eq!(
            groups,
            vec![("b", vec![1, 4]), ("c", vec![2]), ("a", vec![3])]
        );
        assert_eq!(group_by_node(&[-1], &servers), vec![("c", vec![-1])]);
    }

    #[test]
    fn receipts_are_told_from_messages() {
        assert!(is_receipt(&receipt(r#"{"t":1}"#, RECEIPT_DELIVERED)));
        assert!(is_receipt(&receipt_filtered("x", "word-filter: no")));
        assert!(!is_receipt(&receipt("x", "some other text")));
        assert!(!is_receipt(
            r#"{"content":"x","receipt":"发送成功","more":1}"#
        ));
        assert!(!is_receipt(r#"{"t":1}"#));
        assert!(!is_receipt("not json"));
    }

    #[test]
    fn receipt_embeds_content_as_a_string() {
        assert_eq!(
            receipt(r#"{"t":"你好"}"#, RECEIPT_DELIVERED),
            r#"{"content":"{\"t\":\"你好\"}","receipt":"发送成功"}"#
        );
    }
}
