//! The handles one node's tasks share: configuration, local connections, the
//! cluster traits, counters and shutdown. Cheap to clone; it is axum's state.

use std::sync::{Arc, Weak};

use tokio::sync::{Semaphore, broadcast};

use crate::cluster::{Presence, PresenceChange, Relay, Topology};
use crate::config::Config;
use crate::registry::Registry;
use crate::shutdown::Shutdown;
use crate::stats::Stats;

/// Everything a request handler, socket task or dispatcher needs.
#[derive(Clone)]
pub struct Node {
    inner: Arc<Inner>,
}

/// The parts of a [`Node`], given to [`Node::new`].
pub struct Inner {
    pub config: Config,
    pub topology: Topology,
    pub registry: Registry,
    /// Writes to the sockets, in order per socket, on every core.
    pub shards: crate::shards::Shards,
    pub presence: Arc<dyn Presence>,
    pub relay: Arc<dyn Relay>,
    /// Where presence events of the whole cluster arrive for local subscribers
    /// (the SSE stream). A lagging subscriber skips ahead and is told so.
    pub events: broadcast::Sender<PresenceChange>,
    pub stats: Arc<Stats>,
    /// The WebAssembly plugins (auth, filter, events, inbound hooks).
    pub plugins: Arc<crate::plugins::PluginHost>,
    pub shutdown: Shutdown,
    /// One permit per open socket: the node's connection cap.
    pub connection_slots: Arc<Semaphore>,
    /// The cap itself, for logs and stats.
    pub max_connections: usize,
    /// Connects per second per client address.
    pub connect_rate: crate::ws::connect_rate::ConnectRate,
    /// How business operations send (the plugins hold the same one).
    pub outbox: crate::business::Outbox,
    /// `GET /metrics`.
    pub metrics: Arc<crate::metrics::Metrics>,
    /// This node's status reports for `GET /status`.
    pub status: crate::status::Board,
}

impl Node {
    pub fn new(inner: Inner) -> Self {
        Self {
            inner: Arc::new(inner),
        }
    }

    /// A handle that does not keep the node alive (for what the node itself
    /// holds, such as the embedded relay's way back in).
    pub fn downgrade(&self) -> Weak<Inner> {
        Arc::downgrade(&self.inner)
    }

    /// The node behind `weak`, while it lives.
    pub fn upgrade(weak: &Weak<Inner>) -> Option<Node> {
        weak.upgrade().map(|inner| Node { inner })
    }
}

impl std::ops::Deref for Node {
    type Target = Inner;

    fn deref(&self) -> &Inner {
        &self.inner
    }
}
