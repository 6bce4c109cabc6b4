//! How a node reaches the rest of the cluster, behind two traits.
//!
//! - [`Relay`]: "deliver this to node X / to every node", and presence events.
//! - [`Presence`]: connect tokens, online counts and channel membership, the
//!   state FreeIM keeps in Redis hashes.
//!
//! [`embedded`] implements both in process for a single node; the Redis
//! implementations slot in beside it without the rest of the host changing,
//! because everything else only sees `Arc<dyn Relay>` and `Arc<dyn Presence>`.
//! Messages cross the relay as the typed [`ServerMessage`] of the FreeIM wire,
//! so the Redis relay is an encode/decode away from the embedded one.

pub mod embedded;
pub mod kv;
pub mod redis;

use std::time::Duration;

use async_trait::async_trait;
use imhost_client::ClientId;
use imhost_client::api::{ChannelInfo, PresenceEvent};
use imhost_client::wire::{ServerMessage, TokenValue};

/// The cluster's shared state or transport could not be reached.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// The backing store is unreachable or overloaded; retrying later may work.
    #[error("cluster store unavailable: {0}")]
    Unavailable(String),
    /// These nodes did not hear a message published to them (down, or not yet
    /// resubscribed after a Redis restart), however often it was retried.
    #[error("node {} is not listening; the message did not reach it", .0.join(", "))]
    Unheard(Vec<String>),
    /// The node's delivery backlog is full: it took nothing; retry later.
    #[error("this node's delivery backlog is full; retry later")]
    Overloaded,
}

/// Where a relay hands messages for this node when it can act on them in
/// the caller's task (embedded mode: the API's request task), instead of
/// queueing them for the dispatcher.
#[async_trait]
pub trait LocalDelivery: Send + Sync {
    /// Acts on `message` now; [`ClusterError::Overloaded`] when the node
    /// cannot take it.
    async fn deliver(&self, message: ServerMessage) -> Result<(), ClusterError>;
}

/// A socket came or went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PresenceKind {
    Online,
    Offline,
}

/// One online/offline event, as the event stream serves it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PresenceChange {
    pub kind: PresenceKind,
    pub event: PresenceEvent,
}

/// Names of this node and its cluster, and who owns which client.
#[derive(Debug, Clone)]
pub struct Topology {
    pub me: String,
    pub servers: Vec<String>,
}

impl Topology {
    /// The node that owns `client` (FreeIM partitioning).
    pub fn node_for(&self, client: ClientId) -> &str {
        imhost_client::wire::node_for(client, &self.servers)
    }

    pub fn is_mine(&self, client: ClientId) -> bool {
        self.node_for(client) == self.me
    }
}

/// The shared-state implementations a node runs with.
pub struct Backends {
    pub relay: std::sync::Arc<dyn Relay>,
    pub presence: std::sync::Arc<dyn Presence>,
    pub kv: std::sync::Arc<dyn kv::PluginKv>,
}

/// What taking a connect token found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenClaim {
    /// The token was valid and is now used up.
    Taken(TokenValue),
    /// No such token: never issued, already used, or expired.
    Unknown,
    /// The token is valid but its client belongs to another node; the token is
    /// left unused so the terminal can still connect there.
    Misdirected { owner: String },
}

/// Carries node commands and presence events between nodes.
#[async_trait]
pub trait Relay: Send + Sync {
    /// Hands `message` to node `node` (possibly this one).
    async fn send(&self, node: &str, message: ServerMessage) -> Result<(), ClusterError>;
    /// Hands `message` to every node of the cluster.
    async fn send_all(&self, message: ServerMessage) -> Result<(), ClusterError>;
    /// Tells every event subscriber of the cluster that a socket came or went.
    async fn announce(&self, change: PresenceChange) -> Result<(), ClusterError>;
}

/// Tokens, online counts and channels, shared by every node.
#[async_trait]
pub trait Presence: Send + Sync {
    /// Stores `value` under a new single-use token that lives for `ttl`.
    async fn issue_token(&self, value: &TokenValue, ttl: Duration) -> Result<String, ClusterError>;
    /// Takes a token atomically when its client belongs to this node
    /// (`topology`): a second take of the same token finds it unknown.
    async fn take_token(
        &self,
        token: &str,
        topology: &Topology,
    ) -> Result<TokenClaim, ClusterError>;
    /// Counts one more socket for `client` on this node; returns its socket
    /// count in the cluster.
    async fn connected(&self, client: &TokenValue) -> Result<u64, ClusterError>;
    /// Counts one socket less; at zero the client is offline and leaves every
    /// channel. Returns the sockets left in the cluster.
    async fn disconnected(&self, client: &TokenValue) -> Result<u64, ClusterError>;
    /// Sockets `client` holds in the cluster.
    async fn connections(&self, client: ClientId) -> Result<u64, ClusterError>;
    /// Every client with at least one socket, in id order.
    async fn online(&self) -> Result<Vec<ClientId>, ClusterError>;
    /// Adds clients to a channel (idempotent).
    async fn join(&self, chan: &str, clients: &[ClientId]) -> Result<(), ClusterError>;
    /// Removes clients from a channel (idempotent).
    async fn leave(&self, chan: &str, clients: &[ClientId]) -> Result<(), ClusterError>;
    /// Members of a channel, read from the store.
    async fn members(&self, chan: &str) -> Result<Vec<ClientId>, ClusterError>;
    /// Members of a channel for delivering a message: may come from a cache
    /// that is invalidated before any later message is delivered.
    async fn delivery_members(
        &self,
        chan: &str,
    ) -> Result<std::sync::Arc<[ClientId]>, ClusterError> {
        Ok(self.members(chan).await?.into())
    }
    /// Every channel with its member count.
    async fn channels(&self) -> Result<Vec<ChannelInfo>, ClusterError>;
    /// The channels `client` belongs to.
    async fn channels_of(&self, client: ClientId) -> Result<Vec<String>, ClusterError>;
    /// Whether the store answers (readiness).
    async fn ping(&self) -> Result<(), ClusterError> {
        Ok(())
    }
    /// Publishes this node's status report (`crate::status`), kept for `ttl`.
    /// Embedded, there is no one to tell.
    async fn publish_status(&self, _report: &str, _ttl: Duration) -> Result<(), ClusterError> {
        Ok(())
    }
    /// The latest status report of each of `servers`, in that order (`None`
    /// for a node with none). Embedded, none are stored.
    async fn statuses(&self, _servers: &[String]) -> Result<Vec<Option<String>>, ClusterError> {
        Ok(Vec::new())
    }
}
