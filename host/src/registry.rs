//! Local connections: client id → the sockets (devices) it holds on this node,
//! each a [`SocketHandle`] (see `ws::handle`). This module is the map alone:
//! who is connected here, and with which sockets; writing to them is the
//! socket core's (`ws`) and the delivery shards' (`shards`). A socket whose
//! queue is full is a slow consumer and is closed (1013), so one stalled
//! terminal costs at most `outbound_queue` messages of memory and never slows
//! anyone else.
//!
//! Heartbeats are one sweep over this map (see [`Registry::heartbeat`]), not a
//! timer per socket.
//!
//! The map sits behind a `std::sync::Mutex`: every critical section is a few
//! hash-map operations and non-blocking queue pushes, never an `.await`, so an
//! async mutex would only add cost (the reasoning of mini-redis's `Db`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use imhost_client::ClientId;
use smallvec::SmallVec;
use tungstenite::Utf8Bytes;

use crate::audience::{Audience, Audiences, Key};
use crate::stats::Stats;
use crate::ws::handle::{CloseReason, SocketHandle, lock, signal};
use crate::ws::outbound::Pushed;

/// Identifies one socket on this node.
pub type ConnId = u64;

/// What the socket task needs from its registration.
pub struct Registration {
    pub conn: ConnId,
    pub handle: Arc<SocketHandle>,
}

/// Where a message to one client goes on this node.
#[derive(Debug, Clone)]
pub enum Lookup {
    /// The client has no socket on this node.
    NotConnected,
    /// The receiver is the sender with at most one socket: FreeIM's echo rule.
    EchoSkipped,
    /// To these sockets.
    Sockets(Vec<Arc<SocketHandle>>),
}

struct Socket {
    conn: ConnId,
    handle: Arc<SocketHandle>,
}

#[derive(Default)]
struct Clients {
    /// Almost every client holds one socket: it lives in the map's slot,
    /// without an allocation of its own or a pointer to follow on delivery.
    by_id: HashMap<ClientId, SmallVec<[Socket; 1]>>,
    next_conn: ConnId,
    /// Set once the node shuts down: later sockets are closed at once.
    closed: bool,
}

/// Cheap-to-clone handle to this node's connections.
#[derive(Clone)]
pub struct Registry {
    clients: Arc<Mutex<Clients>>,
    stats: Arc<Stats>,
    queue_bound: usize,
    /// Delivery shards the sockets are dealt over, round robin.
    shards: u16,
    /// The clock of `last_heard`: milliseconds since this instant.
    epoch: Instant,
    /// Channel and broadcast audiences resolved from this map, told of
    /// every change to it.
    audiences: Arc<Audiences>,
}

impl Registry {
    /// A registry whose sockets are dealt over `shards` delivery shards.
    pub fn new(queue_bound: usize, shards: usize, stats: Arc<Stats>) -> Self {
        Self {
            clients: Arc::default(),
            stats,
            queue_bound,
            shards: u16::try_from(shards.clamp(1, usize::from(u16::MAX))).unwrap_or(1),
            epoch: Instant::now(),
            audiences: Arc::default(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Clients> {
        lock(&self.clients)
    }

    /// The node's counters.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// Now, on the clock of [`SocketHandle::heard`].
    pub fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Adds a socket for `client`, its stream to be attached when the
    /// upgrade hands it over ([`SocketHandle::attach`]; until then, or
    /// without one in unit tests, everything is queued for the socket's
    /// task); returns its id and handle.
    pub fn register(&self, client: ClientId) -> Registration {
        let mut clients = self.lock();
        clients.next_conn += 1;
        let conn = clients.next_conn;
        let shard = u16::try_from(conn % u64::from(self.shards)).unwrap_or(0);
        let handle = Arc::new(SocketHandle::new(self.now_ms(), shard));
        if clients.closed {
            handle.close(CloseReason::Shutdown);
        }
        clients.by_id.entry(client).or_default().push(Socket {
            conn,
            handle: handle.clone(),
        });
        let dropped = self.audiences.changed(client);
        drop(clients);
        drop(dropped);
        Registration { conn, handle }
    }

    /// Closes every socket, now and from now on (the node is shutting down).
    pub fn close_all(&self, reason: CloseReason) {
        let mut clients = self.lock();
        clients.closed = true;
        for socket in clients.by_id.values().flatten() {
            socket.handle.close(reason);
        }
    }

    /// One heartbeat round over the sockets whose id falls in `bucket` of
    /// `buckets`: those silent since `deadline_ms` are closed, the others
    /// asked to ping. Returns how many were closed.
    pub fn heartbeat(&self, bucket: u64, buckets: u64, deadline_ms: u64) -> usize {
        let clients = self.lock();
        let mut closed = 0;
        for socket in clients.by_id.values().flatten() {
            if socket.conn % buckets != bucket {
                continue;
            }
            if socket.handle.last_heard() < deadline_ms {
                if socket.handle.close(CloseReason::HeartbeatTimeout) {
                    closed += 1;
                }
            } else {
                socket.handle.raise(signal::PING);
            }
        }
        closed
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
        let dropped = self.audiences.changed(client);
        drop(clients);
        drop(dropped);
        left
    }

    /// Sockets `client` holds on this node.
    pub fn sockets(&self, client: ClientId) -> usize {
        self.lock().by_id.get(&client).map_or(0, SmallVec::len)
    }

    /// Whether any of `clients` has a socket on this node.
    pub fn any_connected(&self, clients: &[ClientId]) -> bool {
        let clients_here = self.lock();
        clients.iter().any(|id| clients_here.by_id.contains_key(id))
    }

    /// Clients with at least one socket on this node.
    pub fn clients(&self) -> Vec<ClientId> {
        self.lock().by_id.keys().copied().collect()
    }

    /// Where a message from `sender` to `client` goes, the echo rule applied.
    pub fn lookup(&self, client: ClientId, sender: ClientId) -> Lookup {
        let clients = self.lock();
        match clients.by_id.get(&client) {
            None => Lookup::NotConnected,
            Some(sockets) if client == sender && sockets.len() <= 1 => Lookup::EchoSkipped,
            Some(sockets) => Lookup::Sockets(handles(sockets).collect()),
        }
    }

    /// Every socket of `client` on this node.
    pub fn client_sockets(&self, client: ClientId) -> Vec<Arc<SocketHandle>> {
        self.lock()
            .by_id
            .get(&client)
            .map(|sockets| handles(sockets).collect())
            .unwrap_or_default()
    }

    /// The sockets of `members` here: the cached audience while neither
    /// the member list nor this map changed (see [`crate::audience`]).
    pub fn channel_audience(&self, chan: &str, members: &Arc<[ClientId]>) -> Arc<Audience> {
        self.audience(Key::Channel(chan), Some(members))
    }

    /// Every socket here, for a broadcast; cached like a channel's.
    pub fn broadcast_audience(&self) -> Arc<Audience> {
        self.audience(Key::Broadcast, None)
    }

    /// The audience kept for `key` and `members` (every socket when
    /// `None`), or resolved from the map and offered to the cache.
    fn audience(&self, key: Key<'_>, members: Option<&Arc<[ClientId]>>) -> Arc<Audience> {
        if let Some(audience) = self.audiences.get(key, members) {
            Stats::incr(&self.stats.audiences_reused);
            return audience;
        }
        Stats::incr(&self.stats.audiences_resolved);
        let clients = self.lock();
        let generation = self.audiences.generation();
        let sockets = match members {
            Some(members) => members
                .iter()
                .filter_map(|id| clients.by_id.get(id))
                .flat_map(|sockets| handles(sockets))
                .collect(),
            None => clients.by_id.values().flat_map(|s| handles(s)).collect(),
        };
        drop(clients);
        let audience = Arc::new(Audience::new(sockets, self.shards.into()));
        self.audiences
            .put(key, members.cloned(), &audience, generation);
        audience
    }

    /// The one socket `client` holds here, if it holds exactly one: the
    /// socket FreeIM's echo rule leaves out of the client's own channel
    /// messages and broadcasts.
    pub fn sole_socket(&self, client: ClientId) -> Option<Arc<SocketHandle>> {
        match &self.lock().by_id.get(&client)?[..] {
            [only] => Some(only.handle.clone()),
            _ => None,
        }
    }

    /// Hands `text` to `sockets`, outside the registry's lock (a push may
    /// write to the kernel); returns how many took it. A full queue closes
    /// its socket as a slow consumer. A handle given by value is let go of
    /// right after its push, while its cache line is still at hand.
    pub fn push_all<S: AsRef<SocketHandle>>(
        &self,
        sockets: impl IntoIterator<Item = S>,
        text: &Utf8Bytes,
    ) -> usize {
        let mut taken = 0;
        for socket in sockets {
            taken += usize::from(self.push_one(socket.as_ref(), &[text]));
        }
        Stats::add(&self.stats.frames_queued, taken as u64);
        taken
    }

    /// Hands `texts` to one socket in order (one `writev` when it can take
    /// them at once); whether it took them. A full queue closes it as a
    /// slow consumer.
    pub fn push_many(&self, socket: &SocketHandle, texts: &[&Utf8Bytes]) -> bool {
        let taken = self.push_one(socket, texts);
        if taken {
            Stats::add(&self.stats.frames_queued, texts.len() as u64);
        }
        taken
    }

    fn push_one(&self, socket: &SocketHandle, texts: &[&Utf8Bytes]) -> bool {
        match socket.push(texts, self.queue_bound) {
            Pushed::Written | Pushed::Queued => true,
            Pushed::Full => {
                if socket.close(CloseReason::SlowConsumer) {
                    Stats::incr(&self.stats.slow_consumers_closed);
                }
                false
            }
            // On its way out: nothing more is written to it.
            Pushed::Closed => false,
        }
    }
}

/// The handles of one client's sockets.
fn handles(sockets: &[Socket]) -> impl Iterator<Item = Arc<SocketHandle>> + '_ {
    sockets.iter().map(|s| s.handle.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn registry(bound: usize) -> Registry {
        Registry::new(bound, 1, Arc::default())
    }

    /// What `lookup` then `push_all` make of a message to `client`.
    fn deliver(reg: &Registry, client: ClientId, text: &Utf8Bytes, sender: ClientId) -> Lookup {
        match reg.lookup(client, sender) {
            Lookup::Sockets(sockets) => {
                let n = sockets.len();
                reg.push_all(sockets.clone(), text);
                assert_eq!(sockets.len(), n);
                Lookup::Sockets(sockets)
            }
            other => other,
        }
    }

    fn queued(handle: &SocketHandle) -> Vec<Utf8Bytes> {
        handle.out().take_queue()
    }

    #[test]
    fn audiences_are_cached_until_the_members_or_the_map_change() {
        let reg = Registry::new(4, 3, Arc::default());
        let count = crate::audience::CACHE_FROM as ClientId + 10;
        let handles: Vec<_> = (1..=count).map(|c| reg.register(c).handle).collect();
        let members: Arc<[ClientId]> = (1..=count).rev().collect();
        let first = reg.channel_audience("a", &members);
        assert_eq!(first.len(), handles.len());
        assert!(handles.iter().all(|h| first.contains(h)));
        assert!(Arc::ptr_eq(&first, &reg.channel_audience("a", &members)));
        let all = reg.broadcast_audience();
        assert_eq!(all.len(), handles.len());
        assert!(Arc::ptr_eq(&all, &reg.broadcast_audience()));

        // A new member list: resolved again.
        let fewer: Arc<[ClientId]> = (2..=count).collect();
        let second = reg.channel_audience("a", &fewer);
        assert_eq!(second.len(), handles.len() - 1);
        assert!(!second.contains(&handles[0]));

        // A socket of a client outside the channel keeps the channel's
        // audience; the broadcast's is every socket, so it is made again.
        let late = reg.register(1);
        assert!(Arc::ptr_eq(&second, &reg.channel_audience("a", &fewer)));
        assert!(reg.broadcast_audience().contains(&late.handle));
        let weak = Arc::downgrade(&late.handle);
        reg.unregister(1, late.conn);
        drop(late);
        assert!(weak.upgrade().is_none(), "the cache let go of it");
        assert_eq!(reg.channel_audience("a", &members).len(), handles.len());
        // A member's: made again, with the new socket in it.
        let member = reg.register(3);
        let third = reg.channel_audience("a", &fewer);
        assert!(!Arc::ptr_eq(&second, &third));
        assert!(third.contains(&member.handle));
        assert_eq!(third.len(), handles.len());
        drop(third);
        let weak = Arc::downgrade(&member.handle);
        reg.unregister(3, member.conn);
        drop(member);
        assert!(weak.upgrade().is_none(), "the cache let go of it");
        assert_eq!(reg.channel_audience("a", &fewer).len(), handles.len() - 1);
        assert!(
            reg.sole_socket(2)
                .is_some_and(|h| Arc::ptr_eq(&h, &handles[1]))
        );
        let _second_device = reg.register(2);
        assert!(reg.sole_socket(2).is_none());
        assert!(reg.sole_socket(count + 1).is_none());
    }

    #[test]
    fn echo_rule_skips_a_single_device_sender() {
        let reg = registry(4);
        let a = reg.register(1);
        let text = Utf8Bytes::from("hi");
        assert!(matches!(deliver(&reg, 1, &text, 1), Lookup::EchoSkipped));
        assert!(matches!(deliver(&reg, 2, &text, 1), Lookup::NotConnected));
        let b = reg.register(1);
        assert!(matches!(deliver(&reg, 1, &text, 1), Lookup::Sockets(s) if s.len() == 2));
        assert_eq!(queued(&a.handle), vec![text.clone()]);
        assert_eq!(queued(&b.handle), vec![text]);
    }

    #[test]
    fn a_full_queue_closes_that_socket_only() {
        let reg = registry(1);
        let slow = reg.register(1);
        let fast = reg.register(2);
        let text = Utf8Bytes::from("x");
        let both = || [reg.client_sockets(1), reg.client_sockets(2)].concat();
        reg.push_all(both(), &text);
        queued(&fast.handle);
        reg.push_all(both(), &text);
        assert_eq!(slow.handle.close_reason(), Some(CloseReason::SlowConsumer));
        assert_eq!(fast.handle.close_reason(), None);
        assert_eq!(reg.stats.snapshot().slow_consumers_closed, 1);
        // A closing socket is queued nothing more.
        assert_eq!(reg.push_all(reg.client_sockets(1), &text), 0);
    }

    #[test]
    fn the_first_close_reason_wins() {
        let reg = registry(1);
        let a = reg.register(1);
        assert!(a.handle.close(CloseReason::ForcedOffline));
        assert!(!a.handle.close(CloseReason::Shutdown));
        assert_eq!(a.handle.close_reason(), Some(CloseReason::ForcedOffline));
        for reason in CloseReason::ALL {
            let b = reg.register(2);
            b.handle.close(reason);
            assert_eq!(b.handle.close_reason(), Some(reason));
        }
    }

    #[test]
    fn heartbeat_rounds_ping_the_live_and_close_the_silent() {
        let reg = registry(1);
        let silent = reg.register(1);
        let live = reg.register(2);
        assert_eq!((silent.conn, live.conn), (1, 2));
        silent.handle.heard(1_000);
        live.handle.heard(5_000);
        // A round touches only its bucket: id 2 is in bucket 0 of 2.
        assert_eq!(reg.heartbeat(0, 2, 2_000), 0);
        assert_eq!(silent.handle.close_reason(), None);
        assert_ne!(live.handle.raised() & signal::PING, 0);
        assert_eq!(reg.heartbeat(1, 2, 2_000), 1);
        assert_eq!(
            silent.handle.close_reason(),
            Some(CloseReason::HeartbeatTimeout)
        );
        assert_eq!(live.handle.close_reason(), None);
    }

    #[test]
    fn unregister_tracks_remaining_devices_and_shutdown_closes_late_sockets() {
        let reg = registry(1);
        let a = reg.register(9);
        let b = reg.register(9);
        assert_eq!(reg.unregister(9, a.conn), 1);
        reg.close_all(CloseReason::Shutdown);
        assert_eq!(b.handle.close_reason(), Some(CloseReason::Shutdown));
        assert_eq!(reg.unregister(9, b.conn), 0);
        assert!(reg.clients().is_empty());
        let late = reg.register(10);
        assert_eq!(late.handle.close_reason(), Some(CloseReason::Shutdown));
    }
}
