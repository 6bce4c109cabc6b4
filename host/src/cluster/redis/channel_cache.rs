//! Channel members cached for delivery, so a channel message costs no Redis
//! round trip in the steady state.
//!
//! Correctness rests on two facts. Redis publishes a keyspace notification for
//! every write to a `Chan` hash, whoever makes it (an imhost node or a FreeIM
//! backend's `JoinChan` Lua), and this node receives those notifications on the
//! same pub/sub connection, in the same order, as the channel messages it must
//! deliver: so the invalidation of a membership change is applied before any
//! message published after that change. And a fetch that races an
//! invalidation is not stored: every invalidation bumps an epoch, and a fetch
//! only fills the cache if the epoch it started under is still current.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use imhost_client::ClientId;

/// Channels cached at most; past it the cache starts over (a safety bound,
/// not an eviction policy: a node rarely delivers to that many channels).
const MAX_CHANNELS: usize = 100_000;

#[derive(Default)]
struct Entries {
    epoch: u64,
    members: HashMap<String, Arc<[ClientId]>>,
}

/// Members per channel, valid while keyspace notifications flow.
#[derive(Default)]
pub struct ChannelCache {
    /// Off when keyspace notifications could not be enabled or the pub/sub
    /// connection is down: every lookup then reads Redis.
    enabled: AtomicBool,
    entries: Mutex<Entries>,
}

impl ChannelCache {
    fn lock(&self) -> MutexGuard<'_, Entries> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn set_enabled(&self, on: bool) {
        self.enabled.store(on, Ordering::SeqCst);
        self.clear();
    }

    /// The cached members, and the epoch to pass to [`ChannelCache::fill`]
    /// after a miss.
    pub fn get(&self, chan: &str) -> Result<Arc<[ClientId]>, Option<u64>> {
        if !self.enabled.load(Ordering::SeqCst) {
            return Err(None);
        }
        let entries = self.lock();
        entries
            .members
            .get(chan)
            .cloned()
            .ok_or(Some(entries.epoch))
    }

    /// Stores a fetch begun at `epoch`, unless something was invalidated since.
    pub fn fill(&self, chan: &str, members: Arc<[ClientId]>, epoch: u64) {
        let mut entries = self.lock();
        if entries.epoch != epoch || !self.enabled.load(Ordering::SeqCst) {
            return;
        }
        if entries.members.len() >= MAX_CHANNELS {
            entries.members.clear();
        }
        entries.members.insert(chan.to_owned(), members);
    }

    /// A channel's membership changed.
    pub fn invalidate(&self, chan: &str) {
        let mut entries = self.lock();
        entries.epoch += 1;
        entries.members.remove(chan);
    }

    /// Anything may have changed (reconnected, notifications were off).
    pub fn clear(&self) {
        let mut entries = self.lock();
        entries.epoch += 1;
        entries.members.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fetch_racing_an_invalidation_is_not_stored() {
        let cache = ChannelCache::default();
        cache.set_enabled(true);
        let epoch = cache.get("room").expect_err("miss").expect("enabled");
        cache.invalidate("room");
        cache.fill("room", Arc::from(vec![1]), epoch);
        assert!(cache.get("room").is_err(), "stale fetch dropped");

        let epoch = cache.get("room").expect_err("miss").expect("enabled");
        cache.fill("room", Arc::from(vec![1, 2]), epoch);
        assert_eq!(&*cache.get("room").expect("hit"), &[1, 2]);
        cache.set_enabled(false);
        assert_eq!(cache.get("room").expect_err("off"), None);
    }
}
