//! One socket's handle: the side of a socket that the rest of the node
//! touches (deliveries, the heartbeat sweep, force-offline), shared with the
//! socket's own task. See the module docs of [`super`] for the invariants
//! that hold across the socket core.

use std::sync::atomic::{AtomicU8, AtomicU32, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, OnceLock};

use futures_util::task::AtomicWaker;
use tungstenite::Utf8Bytes;

use super::outbound::{Outbound, Pushed};
use super::transport::Transport;

/// Why the server closed a socket; each maps to one WebSocket close code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// The outbound queue filled up: 1013 (try again later).
    SlowConsumer,
    /// No frame or pong within the heartbeat timeout: 1001, not 1008 (policy),
    /// because a terminal that sees it (one that slept through its pings)
    /// should reconnect, and clients do not reconnect on 1008.
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
    /// Every reason, in declaration order (`reason as usize` indexes it).
    pub(crate) const ALL: [CloseReason; 7] = [
        CloseReason::SlowConsumer,
        CloseReason::HeartbeatTimeout,
        CloseReason::Oversize,
        CloseReason::ForcedOffline,
        CloseReason::Shutdown,
        CloseReason::ProtocolError,
        CloseReason::InvalidData,
    ];

    pub fn code(self) -> u16 {
        match self {
            CloseReason::SlowConsumer => 1013,
            CloseReason::ForcedOffline => 1008,
            CloseReason::Oversize => 1009,
            CloseReason::Shutdown | CloseReason::HeartbeatTimeout => 1001,
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

/// The side of one socket that the rest of the node touches: its outbound
/// side (see [`Outbound`]: direct writes, the queue, unsent bytes), its close
/// request, its heartbeat clock, and the waker of its task.
///
/// An idle socket's queue allocates nothing; pushes never wait, and the
/// socket task is woken only when its flags change.
///
/// Laid out in declaration order (`repr(C)`), what a delivery touches first:
/// after the `Arc`'s counts come the stream and the outbound lock with its
/// two words, 80 bytes from the allocation's start, so a delivery reads two
/// cache lines of the handle wherever the allocator put it (it used to read
/// three, most of the time). The heartbeat clock and the waker come after.
#[derive(Debug)]
#[repr(C)]
pub struct SocketHandle {
    /// What the socket's bytes travel on, set once the upgrade hands it over
    /// (never, in unit tests). The socket is registered before its `101`
    /// goes out, so a message sent the moment the terminal sees its connect
    /// succeed is queued until then instead of missing the socket. Inline,
    /// not behind another pointer: delivery reaches it from the handle, one
    /// cache line less per socket per message.
    stream: OnceLock<Transport>,
    out: Mutex<Outbound>,
    /// [`signal`] bits the socket task has not seen yet.
    flags: AtomicU8,
    /// The first close reason given (0: none), as `CloseReason as u8 + 1`.
    close_reason: AtomicU8,
    /// The delivery shard that writes to this socket (see [`crate::shards`]),
    /// fixed at registration.
    shard: u16,
    /// Where this socket's frames of the current pass wait in its shard's
    /// staging (`NOT_STAGED` between passes). Only its shard's task touches
    /// it. With `flags`, `close_reason` and `shard` it fills the padding
    /// before `last_heard`: the handle did not grow.
    slot: AtomicU32,
    /// When a frame last arrived, in milliseconds of the registry's clock.
    last_heard: AtomicU64,
    waker: AtomicWaker,
}

/// The bits of [`SocketHandle::flags`].
pub mod signal {
    /// Messages were queued.
    pub const QUEUED: u8 = 1;
    /// The heartbeat wants a ping sent.
    pub const PING: u8 = 2;
    /// A close was requested.
    pub const CLOSE: u8 = 4;
}

/// [`SocketHandle::slot`] between passes.
pub const NOT_STAGED: u32 = u32::MAX;

impl SocketHandle {
    pub(crate) fn new(now_ms: u64, shard: u16) -> Self {
        Self {
            stream: OnceLock::new(),
            out: Mutex::default(),
            flags: AtomicU8::new(0),
            close_reason: AtomicU8::new(0),
            shard,
            slot: AtomicU32::new(NOT_STAGED),
            last_heard: AtomicU64::new(now_ms),
            waker: AtomicWaker::new(),
        }
    }

    /// Requests the close; returns false when a close was already requested.
    pub fn close(&self, reason: CloseReason) -> bool {
        let first = self
            .close_reason
            .compare_exchange(0, reason as u8 + 1, Ordering::AcqRel, Ordering::Acquire)
            .is_ok();
        self.raise(signal::CLOSE);
        first
    }

    /// The close reason given, if any.
    pub fn close_reason(&self) -> Option<CloseReason> {
        CloseReason::ALL
            .get(usize::from(self.close_reason.load(Ordering::Acquire)).checked_sub(1)?)
            .copied()
    }

    /// Sets `bits` and wakes the task unless they were all set already (then
    /// it has a wake-up pending).
    pub(crate) fn raise(&self, bits: u8) {
        if self.flags.fetch_or(bits, Ordering::AcqRel) & bits != bits {
            self.waker.wake();
        }
    }

    /// Registers the task's waker and takes the raised bits, for the socket
    /// task's poll. Registering first means a raise after the take wakes it.
    pub fn take_signals(&self, cx: &std::task::Context<'_>) -> u8 {
        self.waker.register(cx.waker());
        self.flags.swap(0, Ordering::AcqRel)
    }

    /// The outbound side, locked (never across an `.await`).
    pub fn out(&self) -> MutexGuard<'_, Outbound> {
        lock(&self.out)
    }

    /// The stream the outbound side writes to (`None` until attached).
    pub fn stream(&self) -> Option<&Transport> {
        self.stream.get()
    }

    /// Gives the socket its stream, once the upgrade has handed it over.
    /// What was queued before waits for the socket's task, and a later push
    /// does not write past it: a push writes at once only when nothing is
    /// queued. False when it already had one.
    pub fn attach(&self, stream: Transport) -> bool {
        self.stream.set(stream).is_ok()
    }

    /// Sends a whole frame (a control frame or a reply); see
    /// [`Outbound::send`].
    pub fn send(&self, frame: &[u8]) {
        self.out().send(self.stream(), frame);
    }

    /// When a frame last arrived, on the registry's clock.
    pub fn last_heard(&self) -> u64 {
        self.last_heard.load(Ordering::Relaxed)
    }

    /// The signal bits raised and not yet taken (for tests).
    #[cfg(test)]
    pub fn raised(&self) -> u8 {
        self.flags.load(Ordering::Relaxed)
    }

    /// Answers a ping, unless a pong already waits for the kernel (then
    /// that one answers it, and this is counted in `stats`).
    pub fn send_pong(&self, pong: &[u8], stats: &crate::stats::Stats) {
        if !self.out().send_pong(self.stream(), pong) {
            crate::stats::Stats::incr(&stats.pongs_coalesced);
        }
    }

    /// Notes that a frame arrived now.
    pub fn heard(&self, now_ms: u64) {
        self.last_heard.store(now_ms, Ordering::Relaxed);
    }

    /// The delivery shard this socket belongs to.
    pub fn shard(&self) -> usize {
        usize::from(self.shard)
    }

    /// The socket's place in its shard's staging, for [`crate::shards`].
    pub fn slot(&self) -> &AtomicU32 {
        &self.slot
    }

    /// Hands `texts` to the socket in order (written at once, as one
    /// `writev` when several, or queued and the task woken).
    pub(crate) fn push(&self, texts: &[&Utf8Bytes], bound: usize) -> Pushed {
        let pushed = self.out().push_many(self.stream(), texts, bound);
        if pushed == Pushed::Queued {
            self.raise(signal::QUEUED);
        }
        pushed
    }
}

pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section here is a few collection operations or one
    // non-blocking write: a panic inside one cannot leave the data
    // half-updated, so poison is ignored.
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}
