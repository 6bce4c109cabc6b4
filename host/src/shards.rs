//! Delivery ordered per socket, not per node: the node's sockets are dealt
//! over shards (one per worker thread by default), each with its own queue
//! and its own task, so every core writes and no message waits for another
//! message's writes on other shards.
//!
//! # Order
//! SPEC promises each socket its messages in the order the node received
//! them, and nothing across sockets. A socket belongs to one shard for its
//! life ([`SocketHandle::shard`]); a message's audience is split by shard and
//! appended to each shard's queue in the order messages are submitted, and a
//! shard writes its queue in order. A force-offline travels the same queues,
//! so it closes a socket after the messages accepted before it.
//!
//! # Direct writes when idle, batched writes under load
//! A small audience whose shards have nothing queued, and nobody else
//! writing, is written by the caller at once (the non-blocking write of
//! `ws::outbound`): no queue, no wake-up, no task switch, the latency and
//! cost of a node at rest. Anything else is queued: messages that arrive
//! while a caller writes line up behind it. The Redis dispatcher, one task
//! for the node's whole stream, writes at once only when nothing waits
//! behind the message ([`Admission::WaitQueued`] otherwise). A shard task takes up to [`PASS`] messages at a time;
//! when it took several, it first gathers each socket's frames of the pass
//! (the socket's [`SocketHandle::slot`] says where, without a hash map) and
//! then writes each socket once, all its frames in one `writev`. Under load
//! a socket then gets one system call and one TCP segment for many messages,
//! where it got one each. A pass is written in slices (`SLICE`), with the
//! worker thread's other tasks run between them.
//!
//! A channel message or broadcast comes with its [`Audience`], already
//! grouped by shard and shared by every message to the same channel: each
//! shard's job points at its part, nothing is copied per message.
//!
//! # Backpressure
//! Queued deliveries hold permits of one semaphore, the node's delivery
//! backlog (`--delivery-backlog`, in deliveries: one message to one socket),
//! shared out to the message's jobs on each shard and given back as the
//! shard writes them, slice by slice: the queue refills during a long pass. The HTTP API takes permits
//! without waiting and answers 503 `overloaded` with `Retry-After` when there
//! are none ([`Admission::Try`]); the Redis subscriber's dispatcher waits for
//! them ([`Admission::Wait`]), so it stops reading from Redis while the node
//! is behind. Either way, what the node accepted is delivered within the
//! time it takes to write one backlog, and no terminal is cut off for the
//! node's own slowness: the slow-consumer cut-off (`--outbound-queue`) still
//! judges each socket by what it has not read itself.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use smallvec::SmallVec;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use tracing::debug;
use tungstenite::Utf8Bytes;

use crate::audience::Audience;
use crate::registry::Registry;
use crate::ws::handle::{CloseReason, NOT_STAGED, SocketHandle};

/// Messages a shard takes from its queue in one pass: under load a socket
/// gets up to this many frames in one `writev`, as many as its own task
/// writes at once (`ws::outbound::WRITE_BATCH`); 64 delivered 1.12x what 16
/// did at saturation on one core (docs/operations.md, "Every core").
pub const PASS: usize = 64;

/// Frames a shard task writes between two chances for the other tasks of
/// its worker thread to run. A pass to 10,000 sockets takes tens of
/// milliseconds; written in one go, the API requests and socket reads that
/// share its thread would wait for all of it, and then find the shard task
/// first in line again (tokio runs a task woken from a yield before the
/// tasks the I/O driver just woke): the node took a few new messages per
/// pass, though its callers had many waiting, and wrote each socket a few
/// frames per system call where it could have written dozens.
const SLICE: usize = 4096;

/// Audiences up to this size are written by the caller when their shards
/// are idle: at 1,000 sockets, handing the writes to shard tasks costs more
/// in wake-ups than the caller's own pass does.
const INLINE_MAX: usize = 1024;

/// How a submission waits for room in the backlog.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Refuse with [`Overloaded`] when the backlog is full (the HTTP API).
    Try,
    /// Wait for room (the Redis subscriber's dispatcher: it stops reading).
    Wait,
    /// As [`Admission::Wait`], and never written by the caller, even to an
    /// idle shard: the dispatcher with more messages waiting behind this one
    /// hands the writes to the shards and goes on.
    WaitQueued,
    /// Take no permit: a receipt of a message already accepted.
    Always,
}

/// The node's delivery backlog is full; retry later.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("this node's delivery backlog is full; retry later")]
pub struct Overloaded;

/// What a queued job does to its sockets.
#[derive(Clone)]
enum Work {
    Write(Utf8Bytes),
    Close(CloseReason),
}

/// One message's share of one shard.
struct Job {
    work: Work,
    sockets: Recipients,
    /// This share's backlog permits, one per delivery: given back as the
    /// shard writes them.
    permit: Option<OwnedSemaphorePermit>,
}

/// The sockets of one shard a job is for.
enum Recipients {
    /// Looked up for this message alone.
    Listed(Vec<Arc<SocketHandle>>),
    /// The shard's part of an audience shared by every message to it, less
    /// `except` (the sender-echo rule).
    Shared {
        audience: Arc<Audience>,
        shard: usize,
        except: Option<Arc<SocketHandle>>,
    },
}

impl Recipients {
    /// How many sockets.
    fn len(&self) -> usize {
        match self {
            Recipients::Listed(sockets) => sockets.len(),
            Recipients::Shared {
                audience,
                shard,
                except,
            } => {
                // `except` is one of the audience's, when set.
                let here = except
                    .as_ref()
                    .is_some_and(|e| e.shard() % audience.shards() == *shard);
                audience.of_shard(*shard).len() - usize::from(here)
            }
        }
    }

    /// The sockets, and the one among them to leave out.
    fn parts(&self) -> (&[Arc<SocketHandle>], Option<&Arc<SocketHandle>>) {
        match self {
            Recipients::Listed(sockets) => (sockets, None),
            Recipients::Shared {
                audience,
                shard,
                except,
            } => (audience.of_shard(*shard), except.as_ref()),
        }
    }
}

/// `sockets` but `except`.
fn but<'a>(
    sockets: &'a [Arc<SocketHandle>],
    except: Option<&'a Arc<SocketHandle>>,
) -> impl Iterator<Item = &'a Arc<SocketHandle>> {
    sockets
        .iter()
        .filter(move |s| except.is_none_or(|e| !Arc::ptr_eq(e, s)))
}

struct Queue {
    tx: mpsc::UnboundedSender<Job>,
    /// Jobs sent and not yet done, plus callers writing to this shard's
    /// sockets themselves: zero means every message accepted before now has
    /// been handed to them.
    pending: AtomicUsize,
}

/// The node's delivery shards; cheap to clone.
#[derive(Clone)]
pub struct Shards {
    inner: Arc<Inner>,
}

struct Inner {
    queues: Box<[Queue]>,
    backlog: Arc<Semaphore>,
    capacity: usize,
    registry: Registry,
}

/// The receiving ends, for [`Shards::spawn`].
pub struct Receivers(Vec<mpsc::UnboundedReceiver<Job>>);

impl Shards {
    /// `count` shards (the registry must deal its sockets over as many)
    /// with a backlog of `capacity` deliveries.
    pub fn new(count: usize, capacity: usize, registry: Registry) -> (Shards, Receivers) {
        let capacity = capacity.clamp(1, Semaphore::MAX_PERMITS);
        let (queues, receivers): (Vec<_>, Vec<_>) = (0..count.max(1))
            .map(|_| {
                let (tx, rx) = mpsc::unbounded_channel();
                let queue = Queue {
                    tx,
                    pending: AtomicUsize::new(0),
                };
                (queue, rx)
            })
            .unzip();
        let shards = Shards {
            inner: Arc::new(Inner {
                queues: queues.into(),
                backlog: Arc::new(Semaphore::new(capacity)),
                capacity,
                registry,
            }),
        };
        (shards, Receivers(receivers))
    }

    /// Starts one task per shard; they stop with `stop`.
    pub fn spawn(&self, receivers: Receivers, stop: CancellationToken) {
        for (index, rx) in receivers.0.into_iter().enumerate() {
            let shards = self.clone();
            let stop = stop.clone();
            tokio::spawn(async move {
                tokio::select! {
                    () = shards.run(index, rx) => {}
                    () = stop.cancelled() => {}
                }
                debug!(shard = index, "delivery shard stopped");
            });
        }
    }

    pub fn count(&self) -> usize {
        self.inner.queues.len()
    }

    /// Deliveries the backlog holds at most.
    pub fn capacity(&self) -> usize {
        self.inner.capacity
    }

    /// Deliveries queued and not yet written.
    pub fn backlog(&self) -> usize {
        self.inner.capacity - self.inner.backlog.available_permits()
    }

    /// Whether the backlog is full: new messages from the API are refused.
    pub fn is_full(&self) -> bool {
        self.inner.backlog.available_permits() == 0
    }

    /// Hands `text` to `sockets`, each in its place in its shard's order.
    ///
    /// # Errors
    /// [`Overloaded`] with [`Admission::Try`] when the backlog has no room
    /// for it; nothing was delivered then.
    pub async fn write(
        &self,
        sockets: Vec<Arc<SocketHandle>>,
        text: Utf8Bytes,
        admission: Admission,
    ) -> Result<(), Overloaded> {
        if sockets.is_empty() {
            return Ok(());
        }
        if sockets.len() <= INLINE_MAX
            && admission != Admission::WaitQueued
            && let Some(claim) = self.claim_idle(&sockets)
        {
            self.inner.registry.push_all(sockets, &text);
            drop(claim);
            return Ok(());
        }
        self.submit(Work::Write(text), sockets, admission).await
    }

    /// Hands `text` to `audience` but `except`, as [`Shards::write`] does.
    ///
    /// # Errors
    /// As [`Shards::write`].
    pub async fn write_to(
        &self,
        audience: Arc<Audience>,
        except: Option<Arc<SocketHandle>>,
        text: Utf8Bytes,
        admission: Admission,
    ) -> Result<(), Overloaded> {
        let except = except.filter(|e| audience.contains(e));
        let sockets = audience.all();
        let count = sockets.len() - usize::from(except.is_some());
        if count == 0 {
            return Ok(());
        }
        if count <= INLINE_MAX
            && admission != Admission::WaitQueued
            && let Some(claim) = self.claim_idle(sockets)
        {
            self.inner
                .registry
                .push_all(but(sockets, except.as_ref()), &text);
            drop(claim);
            return Ok(());
        }
        let permit = self.admit(count, admission).await?;
        let shards = self.inner.queues.len();
        if audience.shards() != shards {
            // Grouped for another shard count (never, in a running node).
            let sockets = but(sockets, except.as_ref()).cloned().collect();
            self.enqueue(Work::Write(text), self.split(sockets), permit);
            return Ok(());
        }
        let parts = (0..shards).map(|shard| {
            let part = Recipients::Shared {
                audience: audience.clone(),
                shard,
                except: except.clone(),
            };
            (part.len() > 0).then_some(part)
        });
        self.enqueue(Work::Write(text), parts, permit);
        Ok(())
    }

    /// Closes `sockets` with `reason` after what was queued for them.
    pub async fn close(&self, sockets: Vec<Arc<SocketHandle>>, reason: CloseReason) {
        if sockets.is_empty() {
            return;
        }
        if let Some(claim) = self.claim_idle(&sockets) {
            close_all(&sockets, reason);
            drop(claim);
            return;
        }
        // Takes no permit: it cannot be refused.
        let _ = self
            .submit(Work::Close(reason), sockets, Admission::Always)
            .await;
    }

    /// Marks the shards of `sockets` busy if none of them has anything
    /// queued or being written, so that the caller may write at once: a
    /// message submitted meanwhile queues behind this one instead of
    /// passing it. `None` when one of them is busy.
    fn claim_idle(&self, sockets: &[Arc<SocketHandle>]) -> Option<Claim<'_>> {
        let all = &self.inner.queues[..];
        let queues = if all.len() == 1 || sockets.len() == 1 {
            let shard = sockets[0].shard() % all.len();
            &all[shard..=shard]
        } else {
            all
        };
        let taken = queues
            .iter()
            .take_while(|q| {
                q.pending
                    .compare_exchange(0, 1, Ordering::AcqRel, Ordering::Acquire)
                    .is_ok()
            })
            .count();
        if taken == queues.len() {
            return Some(Claim(queues));
        }
        for q in &queues[..taken] {
            q.pending.fetch_sub(1, Ordering::AcqRel);
        }
        None
    }

    async fn submit(
        &self,
        work: Work,
        sockets: Vec<Arc<SocketHandle>>,
        admission: Admission,
    ) -> Result<(), Overloaded> {
        let permit = self.admit(sockets.len(), admission).await?;
        self.enqueue(work, self.split(sockets), permit);
        Ok(())
    }

    /// `sockets` by shard, for [`Shards::enqueue`].
    fn split(&self, sockets: Vec<Arc<SocketHandle>>) -> impl Iterator<Item = Option<Recipients>> {
        let n = self.inner.queues.len();
        let mut split: SmallVec<[Vec<Arc<SocketHandle>>; 16]> = SmallVec::new();
        if n == 1 {
            split.push(sockets);
        } else {
            let each = sockets.len() / n + 1;
            split.resize_with(n, || Vec::with_capacity(each));
            for socket in sockets {
                let shard = socket.shard() % n;
                split[shard].push(socket);
            }
        }
        split
            .into_iter()
            .map(|sockets| (!sockets.is_empty()).then_some(Recipients::Listed(sockets)))
    }

    /// Appends one job to each shard's queue that `parts` names
    /// recipients for (one item per shard, in shard order), each with its
    /// share of `permit` (the last one with what is left: a message bigger
    /// than the backlog holds all of it, not one permit per delivery).
    fn enqueue(
        &self,
        work: Work,
        parts: impl Iterator<Item = Option<Recipients>>,
        mut permit: Option<OwnedSemaphorePermit>,
    ) {
        let parts: SmallVec<[(usize, Recipients); 16]> = parts
            .enumerate()
            .filter_map(|(shard, part)| Some((shard, part?)))
            .collect();
        let last = parts.len().saturating_sub(1);
        for (i, (shard, sockets)) in parts.into_iter().enumerate() {
            let queue = &self.inner.queues[shard];
            let share = if i == last {
                permit.take()
            } else {
                permit.as_mut().and_then(|p| {
                    let n = sockets.len().min(p.num_permits());
                    p.split(n)
                })
            };
            queue.pending.fetch_add(1, Ordering::AcqRel);
            let job = Job {
                // The text is shared, not copied.
                work: work.clone(),
                sockets,
                permit: share,
            };
            if queue.tx.send(job).is_err() {
                // The shard stopped: the node is shutting down and its
                // sockets are closing.
                queue.pending.fetch_sub(1, Ordering::AcqRel);
            }
        }
    }

    /// Takes `deliveries` permits of the backlog as `admission` says (a
    /// message bigger than the whole backlog takes all of it).
    async fn admit(
        &self,
        deliveries: usize,
        admission: Admission,
    ) -> Result<Option<OwnedSemaphorePermit>, Overloaded> {
        let n = u32::try_from(deliveries.clamp(1, self.inner.capacity)).unwrap_or(u32::MAX);
        let backlog = self.inner.backlog.clone();
        match admission {
            Admission::Always => Ok(None),
            Admission::Try => backlog
                .try_acquire_many_owned(n)
                .map(Some)
                .map_err(|_| Overloaded),
            Admission::Wait | Admission::WaitQueued => match backlog
                .clone()
                .try_acquire_many_owned(n)
            {
                Ok(permit) => Ok(Some(permit)),
                Err(_) => {
                    crate::stats::Stats::incr(&self.inner.registry.stats().dispatch_backlog_waits);
                    // The semaphore is never closed.
                    Ok(backlog.acquire_many_owned(n).await.ok())
                }
            },
        }
    }

    /// One shard's task: its queue, in order, a pass at a time.
    async fn run(self, index: usize, mut rx: mpsc::UnboundedReceiver<Job>) {
        let mut jobs = Vec::with_capacity(PASS);
        let mut staging = Staging::default();
        let registry = &self.inner.registry;
        let queue = &self.inner.queues[index];
        while rx.recv_many(&mut jobs, PASS).await > 0 {
            let done = jobs.len();
            // The pass's permits, given back as its frames are written: the
            // API can take new messages while a long pass goes on, so the
            // queue does not run dry behind it.
            let mut held: Option<OwnedSemaphorePermit> = None;
            for permit in jobs.iter_mut().filter_map(|job| job.permit.take()) {
                match &mut held {
                    Some(held) => held.merge(permit),
                    None => held = Some(permit),
                }
            }
            if let [job] = &jobs[..] {
                let (sockets, except) = job.sockets.parts();
                match &job.work {
                    Work::Write(text) => {
                        for slice in sockets.chunks(SLICE) {
                            registry.push_all(but(slice, except), text);
                            if slice.len() == SLICE {
                                give_back(&mut held, slice.len());
                                tokio::task::yield_now().await;
                            }
                        }
                    }
                    Work::Close(reason) => close_all(but(sockets, except), *reason),
                }
            } else {
                for job in &jobs {
                    let (sockets, except) = job.sockets.parts();
                    match &job.work {
                        Work::Write(text) => staging.add(but(sockets, except), text.clone()),
                        Work::Close(reason) => {
                            staging.write(registry, &mut held).await;
                            close_all(but(sockets, except), *reason);
                        }
                    }
                }
                staging.write(registry, &mut held).await;
            }
            drop(held);
            // Written: their permits go back, and the shard counts as idle
            // again once nothing else was queued meanwhile.
            jobs.clear();
            queue.pending.fetch_sub(done, Ordering::AcqRel);
            // Let the other tasks of this worker run between passes.
            tokio::task::yield_now().await;
        }
    }
}

/// Gives `n` of `held`'s permits back to the backlog (fewer if it holds
/// fewer).
fn give_back(held: &mut Option<OwnedSemaphorePermit>, n: usize) {
    if let Some(held) = held {
        drop(held.split(n.min(held.num_permits())));
    }
}

/// Shards marked busy by [`Shards::claim_idle`], until dropped.
struct Claim<'a>(&'a [Queue]);

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        for q in self.0 {
            q.pending.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

fn close_all<'a>(sockets: impl IntoIterator<Item = &'a Arc<SocketHandle>>, reason: CloseReason) {
    for socket in sockets {
        socket.close(reason);
    }
}

/// One pass's frames, gathered per socket.
#[derive(Default)]
struct Staging {
    texts: Vec<Utf8Bytes>,
    /// Each socket of the pass with the indices of its frames in `texts`.
    sockets: Vec<(Arc<SocketHandle>, SmallVec<[u16; PASS]>)>,
}

impl Staging {
    /// Adds one message for `sockets`.
    fn add<'a>(&mut self, sockets: impl Iterator<Item = &'a Arc<SocketHandle>>, text: Utf8Bytes) {
        let index = u16::try_from(self.texts.len()).unwrap_or(u16::MAX);
        self.texts.push(text);
        for socket in sockets {
            let slot = socket.slot().load(Ordering::Relaxed);
            match self.sockets.get_mut(slot as usize) {
                Some((_, frames)) if slot != NOT_STAGED => frames.push(index),
                _ => {
                    let slot = u32::try_from(self.sockets.len()).unwrap_or(NOT_STAGED);
                    socket.slot().store(slot, Ordering::Relaxed);
                    let mut frames = SmallVec::new();
                    frames.push(index);
                    self.sockets.push((socket.clone(), frames));
                }
            }
        }
    }

    /// Writes each staged socket's frames at once, in order, and empties;
    /// after every [`SLICE`] frames' worth, gives back as many of `held`'s
    /// permits as frames were written and lets the thread's other tasks run.
    async fn write(&mut self, registry: &Registry, held: &mut Option<OwnedSemaphorePermit>) {
        let mut cost = 0;
        let mut written = 0;
        for (socket, frames) in self.sockets.drain(..) {
            socket.slot().store(NOT_STAGED, Ordering::Relaxed);
            let texts: SmallVec<[&Utf8Bytes; PASS]> = frames
                .iter()
                .filter_map(|&i| self.texts.get(usize::from(i)))
                .collect();
            registry.push_many(&socket, &texts);
            drop(texts);
            // A system call costs about what a few frames do.
            cost += frames.len() + 4;
            written += frames.len();
            if cost >= SLICE {
                give_back(held, std::mem::take(&mut written));
                cost = 0;
                tokio::task::yield_now().await;
            }
        }
        self.texts.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use imhost_client::ClientId;

    fn setup(shards: usize, backlog: usize) -> (Registry, Shards, Receivers) {
        let registry = Registry::new(64, shards, Arc::default());
        let (s, rx) = Shards::new(shards, backlog, registry.clone());
        (registry, s, rx)
    }

    /// Makes every shard look busy, so that writes queue instead of going
    /// inline, until [`release`].
    fn hold(shards: &Shards) {
        for q in shards.inner.queues.iter() {
            q.pending.fetch_add(1, Ordering::AcqRel);
        }
    }

    fn release(shards: &Shards) {
        for q in shards.inner.queues.iter() {
            q.pending.fetch_sub(1, Ordering::AcqRel);
        }
    }

    /// Starts the shards and waits until they have written everything.
    async fn drain(shards: &Shards, rx: Receivers) -> CancellationToken {
        let stop = CancellationToken::new();
        shards.spawn(rx, stop.clone());
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
        while shards.backlog() > 0
            || shards
                .inner
                .queues
                .iter()
                .any(|q| q.pending.load(Ordering::Acquire) > 0)
        {
            assert!(tokio::time::Instant::now() < deadline, "shards drained");
            tokio::task::yield_now().await;
        }
        stop
    }

    fn queued(handle: &SocketHandle) -> Vec<String> {
        handle
            .out()
            .take_queue()
            .into_iter()
            .map(|t| t.as_str().to_owned())
            .collect()
    }

    #[tokio::test]
    async fn every_socket_gets_its_messages_in_order_across_shards() {
        let (registry, shards, rx) = setup(3, 1_000_000);
        let handles: Vec<_> = (1..=10).map(|c| registry.register(c).handle).collect();
        let closing = registry.register(11).handle;
        hold(&shards);
        for i in 0..40 {
            let audience: Vec<_> = handles
                .iter()
                .enumerate()
                .filter(|(n, _)| (n + i) % 3 != 0)
                .map(|(_, h)| h.clone())
                .collect();
            let text = Utf8Bytes::from(format!("m{i}"));
            shards
                .write(audience, text, Admission::Wait)
                .await
                .expect("admitted");
            if i == 20 {
                shards
                    .close(vec![closing.clone()], CloseReason::ForcedOffline)
                    .await;
            }
        }
        assert!(closing.close_reason().is_none(), "the close waits its turn");
        release(&shards);
        let stop = drain(&shards, rx).await;
        for (n, handle) in handles.iter().enumerate() {
            let want: Vec<String> = (0..40)
                .filter(|i| (n + i) % 3 != 0)
                .map(|i| format!("m{i}"))
                .collect();
            assert_eq!(queued(handle), want, "socket {n}");
        }
        assert_eq!(closing.close_reason(), Some(CloseReason::ForcedOffline));
        stop.cancel();
    }

    #[tokio::test]
    async fn a_full_backlog_refuses_tries_and_writing_gives_it_back() {
        let (registry, shards, rx) = setup(2, 4);
        let handles: Vec<_> = (1..=3).map(|c| registry.register(c).handle).collect();
        let text = Utf8Bytes::from("x");
        hold(&shards);
        shards
            .write(handles.clone(), text.clone(), Admission::Try)
            .await
            .expect("3 of 4");
        assert_eq!(shards.backlog(), 3);
        assert!(!shards.is_full());
        let refused = shards
            .write(handles.clone(), text.clone(), Admission::Try)
            .await;
        assert!(refused.is_err());
        assert_eq!(shards.backlog(), 3, "a refusal takes nothing");
        shards
            .write(handles.clone(), text.clone(), Admission::Always)
            .await
            .expect("always");
        release(&shards);
        let stop = drain(&shards, rx).await;
        for handle in &handles {
            assert_eq!(queued(handle), vec!["x", "x"]);
        }
        stop.cancel();
    }

    #[tokio::test]
    async fn a_shared_audience_reaches_all_but_the_sender_in_order() {
        let (registry, shards, rx) = setup(3, 1_000_000);
        let handles: Vec<_> = (1..=70).map(|c| registry.register(c).handle).collect();
        let members: Arc<[ClientId]> = (1..=70).collect();
        let audience = registry.channel_audience("a", &members);
        let sender = handles[4].clone();
        // Idle: written by the caller.
        shards
            .write_to(
                audience.clone(),
                Some(sender.clone()),
                "m0".into(),
                Admission::Try,
            )
            .await
            .expect("inline");
        assert_eq!(shards.backlog(), 0);
        // Busy: queued on every shard, permits held until written.
        hold(&shards);
        for m in ["m1", "m2"] {
            shards
                .write_to(
                    audience.clone(),
                    Some(sender.clone()),
                    m.into(),
                    Admission::Try,
                )
                .await
                .expect("admitted");
        }
        assert_eq!(shards.backlog(), 2 * 69);
        // A stranger to the audience is no exception: everyone gets it.
        let stranger = registry.register(99).handle;
        shards
            .write_to(
                audience.clone(),
                Some(stranger.clone()),
                "m3".into(),
                Admission::Try,
            )
            .await
            .expect("admitted");
        release(&shards);
        let stop = drain(&shards, rx).await;
        for (n, handle) in handles.iter().enumerate() {
            let want: &[&str] = if Arc::ptr_eq(handle, &sender) {
                &["m3"]
            } else {
                &["m0", "m1", "m2", "m3"]
            };
            assert_eq!(queued(handle), want, "socket {n}");
        }
        assert!(queued(&stranger).is_empty());
        stop.cancel();
    }

    #[tokio::test]
    async fn idle_shards_take_small_audiences_inline() {
        let (registry, shards, _rx) = setup(2, 4);
        let a = registry.register(1).handle;
        shards
            .write(vec![a.clone()], Utf8Bytes::from("now"), Admission::Try)
            .await
            .expect("inline");
        // Written by the caller: no task ran, nothing held in the backlog.
        assert_eq!(queued(&a), vec!["now"]);
        assert_eq!(shards.backlog(), 0);
    }
}
