//! Who a channel message or a broadcast reaches on this node, worked out once
//! per change instead of once per message.
//!
//! Resolving a channel's audience means taking its members, looking each up
//! in the registry's map under its lock, taking a reference to each of their
//! sockets, sorting them into memory order and dealing them out to the
//! delivery shards: per message, work and cache misses in proportion to the
//! audience. In a fan-out to 10,000 sockets that was a third of the node's
//! CPU (`docs/operations.md`, "Every core"). An [`Audience`] is that result,
//! immutable and shared: every message to the same channel takes the same
//! one, and the shards read their part of it without copying it.
//!
//! # When a cached audience is still right
//! - **Members.** The presence store hands out a channel's member list as an
//!   `Arc` that stays the same until the membership changes (the embedded
//!   store's own cache, Redis's epoch cache). An entry remembers the list it
//!   was made from and is used only for that very list (`Arc::ptr_eq`; the
//!   entry holds the list, so its address cannot be reused while it lives).
//! - **Sockets.** A socket that comes or goes changes only the audiences of
//!   its own client: the broadcast, and the channels that list the client
//!   among their members. Every register and unregister in the registry
//!   tells the cache which client changed ([`Audiences::changed`], under the
//!   registry's lock): it advances the cache's generation, notes the client
//!   in a short history of changes, and drops the broadcast and every entry
//!   whose members include the client (found by binary search: an entry
//!   keeps a sorted copy of a member list that is not already sorted). Entries of other channels stay: a node with clients coming
//!   and going all the time keeps its big channels' audiences, which it
//!   did not when every change emptied the cache.
//!
//!   A resolution remembers the generation it read under the registry's
//!   lock and is stored only if none of the changes since concern it (not
//!   the broadcast, no member of its channel), checked under the cache's
//!   lock against the history; if the history no longer reaches back that
//!   far, it is not stored. So an audience made before one of its sockets
//!   came or went never outlives the change, and a closed socket's handle
//!   (and its descriptor) is never kept alive by the cache.
//!
//! # The sender-echo rule
//! FreeIM does not echo a message to a sender with one connection. The
//! cached audience is the whole channel; the sender's socket, when it is the
//! only one and a member's, is left out at delivery ([`Audience::contains`]
//! finds it, the shards skip it).
//!
//! # Bounds
//! Only audiences of at least [`CACHE_FROM`] sockets are kept (smaller ones
//! cost little to resolve), and no more than [`MAX_CACHED_SOCKETS`] handles and
//! member ids in all: past that the cache is emptied and refills with what
//! is in use. The history holds the last [`HISTORY`] changes.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use imhost_client::ClientId;
use smallvec::SmallVec;

use crate::ws::handle::SocketHandle;

/// Audiences smaller than this are resolved per message and not kept.
pub const CACHE_FROM: usize = 64;
/// Socket references and member ids the cache holds at most, over all its
/// audiences.
pub const MAX_CACHED_SOCKETS: usize = 1 << 20;
/// Changes remembered for resolutions running while they happen: a
/// resolution that more changes than this overtook is not stored.
pub const HISTORY: usize = 256;

/// A message's sockets on this node, grouped by delivery shard, each group
/// in memory order. Immutable.
///
/// Memory order is the order of the handles' addresses, which follows the
/// order the sockets were made, as do the kernel's objects for them
/// (descriptor, socket and, on loopback, the peer's socket). Written in hash
/// order, every write of a broadcast to 19,000 sockets touched memory far
/// from the previous one, the kernel's as much as ours; in this order
/// neighbours share pages and cache lines: 6 to 11 % less CPU per delivery
/// (see `docs/operations.md`).
#[derive(Debug)]
pub struct Audience {
    sockets: Box<[Arc<SocketHandle>]>,
    /// Where each shard's group starts in `sockets`, then its length.
    starts: SmallVec<[u32; 17]>,
}

impl Audience {
    /// `sockets` grouped for `shards` delivery shards.
    pub fn new(mut sockets: Vec<Arc<SocketHandle>>, shards: usize) -> Self {
        let shards = shards.max(1);
        sockets.sort_unstable_by_key(|s| (s.shard() % shards, Arc::as_ptr(s) as usize));
        let mut starts = SmallVec::with_capacity(shards + 1);
        let mut at = 0;
        for shard in 0..shards {
            starts.push(u32::try_from(at).unwrap_or(u32::MAX));
            while at < sockets.len() && sockets[at].shard() % shards == shard {
                at += 1;
            }
        }
        starts.push(u32::try_from(sockets.len()).unwrap_or(u32::MAX));
        Audience {
            sockets: sockets.into_boxed_slice(),
            starts,
        }
    }

    pub fn len(&self) -> usize {
        self.sockets.len()
    }

    pub fn is_empty(&self) -> bool {
        self.sockets.is_empty()
    }

    /// How many shards it was grouped for.
    pub fn shards(&self) -> usize {
        self.starts.len() - 1
    }

    /// Every socket, shard by shard.
    pub fn all(&self) -> &[Arc<SocketHandle>] {
        &self.sockets
    }

    /// The sockets of `shard`.
    pub fn of_shard(&self, shard: usize) -> &[Arc<SocketHandle>] {
        match (self.starts.get(shard), self.starts.get(shard + 1)) {
            (Some(&from), Some(&to)) => &self.sockets[from as usize..to as usize],
            _ => &[],
        }
    }

    /// Whether `socket` is one of them.
    pub fn contains(&self, socket: &Arc<SocketHandle>) -> bool {
        let group = self.of_shard(socket.shard() % self.shards());
        group
            .binary_search_by_key(&(Arc::as_ptr(socket) as usize), |s| Arc::as_ptr(s) as usize)
            .is_ok()
    }
}

/// What a cached audience was made for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Key<'a> {
    Channel(&'a str),
    Broadcast,
}

struct Entry {
    /// The member list it was resolved from (`None`: a broadcast).
    members: Option<Arc<[ClientId]>>,
    /// The same members sorted, when the list is not already (the embedded
    /// store's is): whether a client that came or went is one of them.
    sorted: Option<Box<[ClientId]>>,
    audience: Arc<Audience>,
}

impl Entry {
    fn new(members: Option<Arc<[ClientId]>>, audience: Arc<Audience>) -> Entry {
        let sorted = members
            .as_deref()
            .filter(|members| !members.is_sorted())
            .map(|members| {
                let mut sorted = members.to_vec();
                sorted.sort_unstable();
                sorted.into_boxed_slice()
            });
        Entry {
            members,
            sorted,
            audience,
        }
    }

    /// The members, sorted.
    fn member_ids(&self) -> &[ClientId] {
        self.sorted
            .as_deref()
            .or(self.members.as_deref())
            .unwrap_or_default()
    }

    /// What it holds, against [`MAX_CACHED_SOCKETS`].
    fn weight(&self) -> usize {
        self.audience.len() + self.member_ids().len()
    }

    /// Whether a socket of `client` coming or going changes it.
    fn concerns(&self, client: ClientId) -> bool {
        self.members.is_none() || self.member_ids().binary_search(&client).is_ok()
    }
}

#[derive(Default)]
struct Cache {
    channels: HashMap<Box<str>, Entry>,
    broadcast: Option<Entry>,
    /// Socket references and member ids held by the entries.
    held: usize,
    /// The last [`HISTORY`] changes: the generation each made, and whose.
    history: VecDeque<(u64, ClientId)>,
}

impl Cache {
    fn entry(&self, key: Key<'_>) -> Option<&Entry> {
        match key {
            Key::Channel(chan) => self.channels.get(chan),
            Key::Broadcast => self.broadcast.as_ref(),
        }
    }

    /// Whether any change after `generation` concerns `entry`; also when the
    /// history does not reach back to it.
    fn overtaken(&self, generation: u64, entry: &Entry) -> bool {
        match self.history.front() {
            Some(&(oldest, _)) if oldest <= generation + 1 => self
                .history
                .iter()
                .filter(|(made, _)| *made > generation)
                .any(|(_, client)| entry.concerns(*client)),
            _ => true,
        }
    }
}

/// Entries let go of outside the locks (the last reference to a closed
/// socket's handle closes its descriptor).
#[must_use = "drop it after the registry's lock is released"]
pub struct Dropped(#[allow(dead_code, reason = "held only to be dropped later")] Vec<Entry>);

/// The cache of audiences; see the module docs. Owned by the registry,
/// which tells it of every change to its map.
#[derive(Default)]
pub struct Audiences {
    cache: Mutex<Cache>,
    generation: AtomicU64,
}

impl Audiences {
    /// A socket of `client` came or went. Called under the registry's lock,
    /// so that changes and the generations resolutions read are in one
    /// order; what it returns is dropped after that lock is released.
    pub fn changed(&self, client: ClientId) -> Dropped {
        let mut cache = self.lock();
        let generation = self.generation.fetch_add(1, Ordering::AcqRel) + 1;
        if cache.history.len() == HISTORY {
            cache.history.pop_front();
        }
        cache.history.push_back((generation, client));
        let mut dropped: Vec<Entry> = cache.broadcast.take().into_iter().collect();
        let concerned: Vec<Box<str>> = cache
            .channels
            .iter()
            .filter(|(_, entry)| entry.concerns(client))
            .map(|(chan, _)| chan.clone())
            .collect();
        for chan in concerned {
            dropped.extend(cache.channels.remove(&chan));
        }
        cache.held -= dropped.iter().map(Entry::weight).sum::<usize>();
        Dropped(dropped)
    }

    /// The generation a resolution reads under the registry's lock.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// The audience cached for `key` and made from `members`, if any.
    pub fn get(&self, key: Key<'_>, members: Option<&Arc<[ClientId]>>) -> Option<Arc<Audience>> {
        let cache = self.lock();
        let entry = cache.entry(key)?;
        let same = match (&entry.members, members) {
            (Some(a), Some(b)) => Arc::ptr_eq(a, b),
            (None, None) => true,
            _ => false,
        };
        same.then(|| entry.audience.clone())
    }

    /// Keeps `audience`, made from `members` at `generation`, unless a
    /// change since concerns it or it is too small to be worth it.
    pub fn put(
        &self,
        key: Key<'_>,
        members: Option<Arc<[ClientId]>>,
        audience: &Arc<Audience>,
        generation: u64,
    ) {
        if audience.len() < CACHE_FROM {
            return;
        }
        let entry = Entry::new(members, audience.clone());
        let mut cache = self.lock();
        if self.generation() != generation && cache.overtaken(generation, &entry) {
            return;
        }
        let mut full = None;
        if cache.held + entry.weight() > MAX_CACHED_SOCKETS {
            let history = std::mem::take(&mut cache.history);
            full = Some(std::mem::replace(
                &mut *cache,
                Cache {
                    history,
                    ..Cache::default()
                },
            ));
        }
        cache.held += entry.weight();
        let old = match key {
            Key::Channel(chan) => cache.channels.insert(chan.into(), entry),
            Key::Broadcast => cache.broadcast.replace(entry),
        };
        if let Some(old) = &old {
            cache.held -= old.weight();
        }
        drop(cache);
        drop((old, full));
    }

    /// How many audiences are cached.
    pub fn cached(&self) -> usize {
        let cache = self.lock();
        cache.channels.len() + usize::from(cache.broadcast.is_some())
    }

    fn lock(&self) -> MutexGuard<'_, Cache> {
        crate::ws::handle::lock(&self.cache)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn handles(n: usize, shards: usize) -> Vec<Arc<SocketHandle>> {
        (0..n)
            .map(|i| Arc::new(SocketHandle::new(0, (i % shards) as u16)))
            .collect()
    }

    #[test]
    fn an_audience_is_grouped_by_shard_in_memory_order() {
        let sockets = handles(10, 3);
        let audience = Audience::new(sockets.iter().rev().cloned().collect(), 3);
        assert_eq!(audience.len(), 10);
        let mut seen = 0;
        for shard in 0..3 {
            let group = audience.of_shard(shard);
            assert!(group.iter().all(|s| s.shard() == shard));
            assert!(group.is_sorted_by_key(|s| Arc::as_ptr(s) as usize));
            seen += group.len();
        }
        assert_eq!(seen, 10);
        assert!(sockets.iter().all(|s| audience.contains(s)));
        let stranger = Arc::new(SocketHandle::new(0, 1));
        assert!(!audience.contains(&stranger));
        assert!(audience.of_shard(3).is_empty());
    }

    #[test]
    fn a_cached_audience_serves_only_its_member_list_and_generation() {
        let cache = Audiences::default();
        let members: Arc<[ClientId]> = (1..=100).collect();
        let key = Key::Channel("a");
        let audience = Arc::new(Audience::new(handles(100, 2), 2));
        let generation = cache.generation();
        cache.put(key, Some(members.clone()), &audience, generation);
        let hit = cache.get(key, Some(&members)).expect("cached");
        assert!(Arc::ptr_eq(&hit, &audience));
        // The same members in another list: a changed membership.
        let other: Arc<[ClientId]> = (1..=100).collect();
        assert!(cache.get(key, Some(&other)).is_none());
        assert!(cache.get(Key::Broadcast, None).is_none());

        // A member's socket came or went: dropped, and a resolution made
        // before the change is not kept.
        drop(cache.changed(7));
        assert!(cache.get(key, Some(&members)).is_none());
        cache.put(key, Some(members.clone()), &audience, generation);
        assert_eq!(cache.cached(), 0);
        // Too small to keep.
        let small = Arc::new(Audience::new(handles(CACHE_FROM - 1, 2), 2));
        cache.put(Key::Broadcast, None, &small, cache.generation());
        assert_eq!(cache.cached(), 0);
    }

    #[test]
    fn a_change_drops_only_what_it_concerns() {
        let cache = Audiences::default();
        let evens: Arc<[ClientId]> = (1..=100).map(|c| c * 2).rev().collect();
        let odds: Arc<[ClientId]> = (1..=100).map(|c| c * 2 - 1).collect();
        let audience = Arc::new(Audience::new(handles(100, 2), 2));
        let generation = cache.generation();
        cache.put(
            Key::Channel("evens"),
            Some(evens.clone()),
            &audience,
            generation,
        );
        cache.put(
            Key::Channel("odds"),
            Some(odds.clone()),
            &audience,
            generation,
        );
        cache.put(Key::Broadcast, None, &audience, generation);
        assert_eq!(cache.cached(), 3);

        // An odd client: the odd channel and the broadcast go, the even
        // channel stays.
        drop(cache.changed(3));
        assert!(cache.get(Key::Channel("odds"), Some(&odds)).is_none());
        assert!(cache.get(Key::Broadcast, None).is_none());
        assert!(cache.get(Key::Channel("evens"), Some(&evens)).is_some());
        // A client in neither: only the broadcast (already gone).
        drop(cache.changed(1_000));
        assert!(cache.get(Key::Channel("evens"), Some(&evens)).is_some());
        drop(cache.changed(200));
        assert_eq!(cache.cached(), 0);
    }

    #[test]
    fn a_resolution_overtaken_by_changes_is_kept_only_if_none_concerns_it() {
        let cache = Audiences::default();
        let members: Arc<[ClientId]> = (1..=100).collect();
        let key = Key::Channel("a");
        let audience = Arc::new(Audience::new(handles(100, 2), 2));

        // Resolved, then a stranger came: still right, kept.
        let generation = cache.generation();
        drop(cache.changed(500));
        cache.put(key, Some(members.clone()), &audience, generation);
        assert!(cache.get(key, Some(&members)).is_some());
        // The broadcast is every socket: any change concerns it.
        cache.put(Key::Broadcast, None, &audience, generation);
        assert!(cache.get(Key::Broadcast, None).is_none());

        // Resolved, then a stranger and a member came: not kept.
        let generation = cache.generation();
        drop(cache.changed(500));
        drop(cache.changed(42));
        cache.put(key, Some(members.clone()), &audience, generation);
        assert!(cache.get(key, Some(&members)).is_none());

        // Resolved, then more strangers came than the history holds: not
        // kept, since a member may have been among those forgotten.
        let generation = cache.generation();
        for stranger in 0..=HISTORY as ClientId {
            drop(cache.changed(1_000 + stranger));
        }
        cache.put(key, Some(members.clone()), &audience, generation);
        assert!(cache.get(key, Some(&members)).is_none());
        // Made now: kept.
        cache.put(key, Some(members.clone()), &audience, cache.generation());
        assert!(cache.get(key, Some(&members)).is_some());
    }
}
