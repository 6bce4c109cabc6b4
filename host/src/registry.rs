//! Local connections: client id → the sockets (devices) it holds on this node.
//!
//! Each socket is represented by a bounded outbound queue and a [`Closer`]. The
//! dispatcher pushes with `try_send` and never waits: a socket whose queue is
//! full is a slow consumer and is closed (1013), so one stalled terminal costs at
//! most `outbound_queue` messages of memory and never slows anyone else.
//!
//! The map sits behind a `std::sync::Mutex`: every critical section is a few
//! hash-map operations and non-blocking queue pushes, never an `.await`, so an
//! async mutex would only add cost (the reasoning of mini-redis's `Db`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use axum::extract::ws::Utf8Bytes;
use imhost_client::ClientId;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::stats::Stats;

/// Identifies one socket on this node.
pub type ConnId = u64;

/// Why the server closed a socket; each maps to one WebSocket close code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// The outbound queue filled up: 1013 (try again later).
    SlowConsumer,
    /// No frame or pong within the heartbeat timeout: 1008.
    HeartbeatTimeout,
    /// The terminal sent a message over the size limit: 1009.
    Oversize,
    /// The business backend asked for it: 1008.
    ForcedOffline,
    /// The node is shutting down: 1001.
    Shutdown,
    /// The terminal broke the WebSocket protocol (unmasked or reserved frames,
    /// bad control frames, bad close codes): 1002.
    ProtocolError,
    /// The terminal sent text that is not UTF-8: 1007.
    InvalidData,
}

impl CloseReason {
    pub fn code(self) -> u16 {
        match self {
            CloseReason::SlowConsumer => 1013,
            CloseReason::HeartbeatTimeout | CloseReason::ForcedOffline => 1008,
            CloseReason::Oversize => 1009,
            CloseReason::Shutdown => 1001,
            CloseReason::ProtocolError => 1002,
            CloseReason::InvalidData => 1007,
        }
    }

    pub fn text(self) -> &'static str {
        match self {
            CloseReason::SlowConsumer => "outbound queue full",
            CloseReason::HeartbeatTimeout => "heartbeat timeout",
            CloseReason::Oversize => "message too big",
            CloseReason::ForcedOffline => "forced offline",
            CloseReason::Shutdown => "server shutting down",
            CloseReason::ProtocolError => "protocol error",
            CloseReason::InvalidData => "invalid UTF-8",
        }
    }
}

/// Asks one socket task to close, with the first reason given winning.
#[derive(Debug)]
pub struct Closer {
    reason: OnceLock<CloseReason>,
    /// A child of the node's shutdown token, so shutdown closes every socket.
    token: CancellationToken,
}

impl Closer {
    /// Requests the close; returns false when a close was already requested.
    pub fn close(&self, reason: CloseReason) -> bool {
        let first = self.reason.set(reason).is_ok();
        self.token.cancel();
        first
    }

    /// Resolves once a close was requested or the node is shutting down.
    pub async fn requested(&self) -> CloseReason {
        self.token.cancelled().await;
        self.reason()
    }

    /// The reason given, or [`CloseReason::Shutdown`] when cancelled by shutdown.
    pub fn reason(&self) -> CloseReason {
        self.reason.get().copied().unwrap_or(CloseReason::Shutdown)
    }
}

/// What the socket task needs from its registration.
pub struct Registration {
    pub conn: ConnId,
    pub outbound: mpsc::Receiver<Utf8Bytes>,
    pub closer: Arc<Closer>,
}

/// What happened when a message was handed to one client's sockets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// The client has no socket on this node.
    NotConnected,
    /// The receiver is the sender with at most one socket: FreeIM's echo rule.
    EchoSkipped,
    /// Queued to this many sockets (slow ones among them were closed instead).
    Queued(usize),
}

struct Socket {
    conn: ConnId,
    tx: mpsc::Sender<Utf8Bytes>,
    closer: Arc<Closer>,
}

#[derive(Default)]
struct Clients {
    by_id: HashMap<ClientId, Vec<Socket>>,
    next_conn: ConnId,
}

/// Cheap-to-clone handle to this node's connections.
#[derive(Clone)]
pub struct Registry {
    clients: Arc<Mutex<Clients>>,
    stats: Arc<Stats>,
    queue_bound: usize,
}

impl Registry {
    pub fn new(queue_bound: usize, stats: Arc<Stats>) -> Self {
        Self {
            clients: Arc::default(),
            stats,
            queue_bound,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Clients> {
        // A panic while holding this lock cannot leave the map half-updated in a
        // way later users could trip on, so a poisoned lock is still usable.
        self.clients.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds a socket for `client`; returns its id, queue and closer. `parent`
    /// is the shutdown token the closer hangs off.
    pub fn register(&self, client: ClientId, parent: &CancellationToken) -> Registration {
        let (tx, outbound) = mpsc::channel(self.queue_bound);
        let closer = Arc::new(Closer {
            reason: OnceLock::new(),
            token: parent.child_token(),
        });
        let mut clients = self.lock();
        clients.next_conn += 1;
        let conn = clients.next_conn;
        clients.by_id.entry(client).or_default().push(Socket {
            conn,
            tx,
            closer: closer.clone(),
        });
        Registration {
            conn,
            outbound,
            closer,
        }
    }

    /// Removes a socket; returns how many sockets `client` still holds here.
    pub fn unregister(&self, client: ClientId, conn: ConnId) -> usize {
        let mut clients = self.lock();
        let Some(sockets) = clients.by_id.get_mut(&client) else {
            return 0;
        };
        sockets.retain(|s| s.conn != conn);
        let left = sockets.len();
        if left == 0 {
            clients.by_id.remove(&client);
        }
        left
    }

    /// Sockets `client` holds on this node.
    pub fn sockets(&self, client: ClientId) -> usize {
        self.lock().by_id.get(&client).map_or(0, Vec::len)
    }

    /// Clients with at least one socket on this node.
    pub fn clients(&self) -> Vec<ClientId> {
        self.lock().by_id.keys().copied().collect()
    }

    /// Queues `text` to every socket of `client`, applying the echo rule when the
    /// client is `sender`.
    pub fn deliver(&self, client: ClientId, text: &Utf8Bytes, sender: ClientId) -> Delivery {
        let clients = self.lock();
        match clients.by_id.get(&client) {
            None => Delivery::NotConnected,
            Some(sockets) => self.push(client, sockets, text, sender),
        }
    }

    /// [`Registry::deliver`] to each of `targets`, under one lock; returns the
    /// number of sockets queued to.
    pub fn deliver_many(
        &self,
        targets: impl IntoIterator<Item = ClientId>,
        text: &Utf8Bytes,
        sender: ClientId,
    ) -> usize {
        let clients = self.lock();
        targets
            .into_iter()
            .filter_map(|id| clients.by_id.get(&id).map(|s| (id, s)))
            .map(|(id, sockets)| match self.push(id, sockets, text, sender) {
                Delivery::Queued(n) => n,
                _ => 0,
            })
            .sum()
    }

    /// [`Registry::deliver`] to every client of this node (broadcast).
    pub fn deliver_all(&self, text: &Utf8Bytes, sender: ClientId) -> usize {
        let clients = self.lock();
        clients
            .by_id
            .iter()
            .map(
                |(&id, sockets)| match self.push(id, sockets, text, sender) {
                    Delivery::Queued(n) => n,
                    _ => 0,
                },
            )
            .sum()
    }

    /// Closes every socket of `client`; returns how many were asked to close.
    pub fn close_client(&self, client: ClientId, reason: CloseReason) -> usize {
        let clients = self.lock();
        let sockets = clients.by_id.get(&client).map_or(&[][..], Vec::as_slice);
        for socket in sockets {
            socket.closer.close(reason);
        }
        sockets.len()
    }

    fn push(
        &self,
        client: ClientId,
        sockets: &[Socket],
        text: &Utf8Bytes,
        sender: ClientId,
    ) -> Delivery {
        if client == sender && sockets.len() <= 1 {
            return Delivery::EchoSkipped;
        }
        let mut queued = 0;
        for socket in sockets {
            match socket.tx.try_send(text.clone()) {
                Ok(()) => queued += 1,
                Err(mpsc::error::TrySendError::Full(_)) => {
                    if socket.closer.close(CloseReason::SlowConsumer) {
                        Stats::incr(&self.stats.slow_consumers_closed);
                    }
                }
                // The socket task is already on its way out.
                Err(mpsc::error::TrySendError::Closed(_)) => {}
            }
        }
        Stats::add(&self.stats.frames_queued, queued as u64);
        Delivery::Queued(queued)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn registry(bound: usize) -> Registry {
        Registry::new(bound, Arc::default())
    }

    #[test]
    fn echo_rule_skips_a_single_device_sender() {
        let reg = registry(4);
        let root = CancellationToken::new();
        let mut a = reg.register(1, &root);
        let text = Utf8Bytes::from("hi");
        assert_eq!(reg.deliver(1, &text, 1), Delivery::EchoSkipped);
        assert_eq!(reg.deliver(2, &text, 1), Delivery::NotConnected);
        let mut b = reg.register(1, &root);
        assert_eq!(reg.deliver(1, &text, 1), Delivery::Queued(2));
        assert_eq!(a.outbound.try_recv().ok(), Some(text.clone()));
        assert_eq!(b.outbound.try_recv().ok(), Some(text));
    }

    #[test]
    fn a_full_queue_closes_that_socket_only() {
        let reg = registry(1);
        let root = CancellationToken::new();
        let slow = reg.register(1, &root);
        let mut fast = reg.register(2, &root);
        let text = Utf8Bytes::from("x");
        reg.deliver_many([1, 2], &text, 0);
        fast.outbound.try_recv().ok();
        reg.deliver_many([1, 2], &text, 0);
        assert!(slow.closer.token.is_cancelled());
        assert_eq!(slow.closer.reason(), CloseReason::SlowConsumer);
        assert!(!fast.closer.token.is_cancelled());
        assert_eq!(reg.stats.snapshot().slow_consumers_closed, 1);
    }

    #[test]
    fn unregister_tracks_remaining_devices() {
        let reg = registry(1);
        let root = CancellationToken::new();
        let a = reg.register(9, &root);
        let b = reg.register(9, &root);
        assert_eq!(reg.unregister(9, a.conn), 1);
        assert_eq!(reg.unregister(9, b.conn), 0);
        assert!(reg.clients().is_empty());
        root.cancel();
        assert_eq!(a.closer.reason(), CloseReason::Shutdown);
    }
}
