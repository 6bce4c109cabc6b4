//! One loaded version of one plugin: its compiled code, manifest and warm
//! instances, its call counters and circuit breaker, and the hook calls.
//!
//! A version is immutable once built; a reload or a tier upgrade builds a new
//! one and swaps it in, and calls already running finish on the old one,
//! whose code is freed when the last of them returns.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use wasmtime::Store;

use super::bindings::exports::imhost::plugin::{auth, events, filter, inbound};
use super::compile::Compiled;
use super::engine::Tier;
use super::host_api::HostCtx;
use super::instance::{InstancePool, PluginState};
use super::manifest::{Hook, Manifest};

/// Why a call into a plugin failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CallError {
    #[error("deadline of {0:?} exceeded")]
    Timeout(Duration),
    #[error("memory limit exceeded")]
    MemoryLimit,
    #[error("trapped: {0}")]
    Trap(String),
    #[error("switched off after repeated failures")]
    CircuitOpen,
    /// Every instance the plugin may run at once was busy for as long as the
    /// call could wait: the node is overloaded, the plugin did nothing wrong
    /// (not counted by the circuit breaker).
    #[error("no instance free within {0:?}: the node is busy")]
    Busy(Duration),
}

/// Counters of one loaded plugin version.
#[derive(Debug, Default)]
pub struct CallStats {
    /// Calls per latency bucket ([`LATENCY_BUCKETS_US`], then the rest).
    pub latency: [u64; LATENCY_BUCKETS_US.len() + 1],
    pub calls: u64,
    pub errors: u64,
    pub timeouts: u64,
    pub memory_limits: u64,
    pub traps: u64,
    /// Calls that found no free instance in time ([`CallError::Busy`]).
    pub overloaded: u64,
    pub busy_ns: u64,
    pub consecutive_failures: u32,
    /// While set and in the future, calls are refused (circuit open).
    pub open_until: Option<Instant>,
    pub times_opened: u64,
}

/// Upper bounds, in microseconds, of the call-latency buckets kept per plugin
/// (exported as a Prometheus histogram).
pub const LATENCY_BUCKETS_US: [u64; 10] = [
    10, 50, 100, 500, 1_000, 5_000, 10_000, 50_000, 100_000, 1_000_000,
];

/// One version of one plugin, ready to call.
pub struct Prepared {
    pub name: String,
    pub hash: String,
    pub manifest: Manifest,
    pub compiled: Compiled,
    /// Hooks wired: exported, and enabled by the manifest.
    pub hooks: Vec<Hook>,
    pub loaded_at: std::time::SystemTime,
    /// From the rescan reading this version's file to its first build
    /// serving (a swap's wait, less the watcher's quiet): the same for the
    /// baseline build and the optimized one that replaces it. `None` until
    /// installed (`plugin check` builds without serving).
    pub served_after: Option<std::time::Duration>,
    /// Content hash of the wasm and of its manifest: unchanged means reusable.
    source_version: String,
    auth: Option<auth::GuestIndices>,
    filter: Option<filter::GuestIndices>,
    events: Option<events::GuestIndices>,
    inbound: Option<inbound::GuestIndices>,
    instances: InstancePool,
    /// One permit per instance that may run at once (`pool`, at least one):
    /// a burst of calls waits for an instance instead of instantiating past
    /// the pool, and one plugin's burst does not take every core.
    slots: tokio::sync::Semaphore,
    /// What the operator granted this version (and what it withheld).
    pub grants: Arc<super::grants::Effective>,
    pub stats: Mutex<CallStats>,
    /// This version's reserved slots in its engine's pool, held until it is
    /// dropped with its last call.
    pub share: super::share::Share,
}

impl Prepared {
    pub fn new(
        name: String,
        hash: String,
        manifest: Manifest,
        compiled: Compiled,
        host: Arc<HostCtx>,
        source_version: String,
        share: super::share::Share,
    ) -> Prepared {
        let wanted = manifest.hooks.clone();
        let hooks: Vec<Hook> = compiled
            .exported
            .iter()
            .copied()
            .filter(|h| wanted.as_ref().is_none_or(|w| w.contains(h)))
            .collect();
        let has = |h: Hook| hooks.contains(&h);
        let pre = &compiled.pre;
        Prepared {
            auth: has(Hook::Auth)
                .then(|| auth::GuestIndices::new(pre).ok())
                .flatten(),
            filter: has(Hook::Filter)
                .then(|| filter::GuestIndices::new(pre).ok())
                .flatten(),
            events: has(Hook::Events)
                .then(|| events::GuestIndices::new(pre).ok())
                .flatten(),
            inbound: has(Hook::Inbound)
                .then(|| inbound::GuestIndices::new(pre).ok())
                .flatten(),
            grants: host.grants.clone(),
            instances: InstancePool::new(compiled.tier, pre.clone(), manifest.clone(), host),
            slots: tokio::sync::Semaphore::new(manifest.pool.max(1)),
            name,
            hash,
            manifest,
            compiled,
            hooks,
            loaded_at: std::time::SystemTime::now(),
            served_after: None,
            source_version,
            stats: Mutex::new(CallStats::default()),
            share,
        }
    }

    pub fn has(&self, hook: Hook) -> bool {
        self.hooks.contains(&hook)
    }

    pub fn tier(&self) -> Tier {
        self.compiled.tier
    }

    pub fn source_version(&self) -> &str {
        &self.source_version
    }

    fn stats(&self) -> std::sync::MutexGuard<'_, CallStats> {
        self.stats.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Instantiates once, running the guest's start code under the call
    /// limits: what `plugin check` and a load do before serving a version.
    ///
    /// # Errors
    /// The start code trapped, ran out of time or memory.
    pub async fn warm_up(&self) -> Result<(), CallError> {
        match self.instances.checkout().await {
            Ok(warm) => {
                self.instances.checkin(warm);
                Ok(())
            }
            Err((store, err)) => Err(self.classify(&store, err)),
        }
    }

    fn classify(&self, store: &Store<PluginState>, err: wasmtime::Error) -> CallError {
        if store.data().limiter.hit {
            return CallError::MemoryLimit;
        }
        match err.downcast_ref::<wasmtime::Trap>() {
            Some(wasmtime::Trap::Interrupt) => CallError::Timeout(self.manifest.timeout()),
            _ => CallError::Trap(format!("{err:#}")),
        }
    }

    /// Refuses calls while the circuit is open.
    fn admit(&self) -> Result<(), CallError> {
        let mut stats = self.stats();
        match stats.open_until {
            Some(until) if Instant::now() < until => Err(CallError::CircuitOpen),
            Some(_) => {
                // Half-open: let calls through; one more failure re-opens.
                stats.open_until = None;
                stats.consecutive_failures = self.manifest.failure_threshold.saturating_sub(1);
                Ok(())
            }
            None => Ok(()),
        }
    }

    fn record(&self, started: Instant, outcome: Result<(), &CallError>) {
        let mut stats = self.stats();
        let took = started.elapsed();
        stats.calls += 1;
        stats.busy_ns += took.as_nanos() as u64;
        let us = took.as_micros() as u64;
        let bucket = LATENCY_BUCKETS_US.partition_point(|&bound| bound < us);
        stats.latency[bucket] += 1;
        match outcome {
            Ok(()) => stats.consecutive_failures = 0,
            Err(err) => {
                stats.errors += 1;
                match err {
                    CallError::Timeout(_) => stats.timeouts += 1,
                    CallError::MemoryLimit => stats.memory_limits += 1,
                    CallError::Trap(_) => stats.traps += 1,
                    CallError::CircuitOpen | CallError::Busy(_) => {}
                }
                stats.consecutive_failures += 1;
                if stats.consecutive_failures >= self.manifest.failure_threshold {
                    stats.open_until =
                        Some(Instant::now() + Duration::from_millis(self.manifest.cooldown_ms));
                    stats.times_opened += 1;
                    tracing::error!(
                        plugin = %self.name,
                        failures = stats.consecutive_failures,
                        cooldown_ms = self.manifest.cooldown_ms,
                        "plugin switched off after repeated failures"
                    );
                }
            }
        }
    }
}

/// How long a call waits for a free instance.
#[derive(Debug, Clone, Copy)]
enum Wait {
    /// At most the call's own deadline, then [`CallError::Busy`].
    Deadline,
    /// As long as it takes.
    Turn,
}

impl Prepared {
    /// A permit to run one instance, waited for as `wait` says.
    async fn slot(&self, wait: Wait) -> Result<tokio::sync::SemaphorePermit<'_>, CallError> {
        if let Ok(permit) = self.slots.try_acquire() {
            return Ok(permit);
        }
        let acquired = match wait {
            Wait::Turn => self.slots.acquire().await.ok(),
            Wait::Deadline => tokio::time::timeout(self.manifest.timeout(), self.slots.acquire())
                .await
                .ok()
                .and_then(Result::ok),
        };
        acquired.ok_or_else(|| {
            self.stats().overloaded += 1;
            CallError::Busy(self.manifest.timeout())
        })
    }
}

/// Generates the per-hook call method: take a warm instance, set the
/// deadline, call, classify, count, and return the instance unless it trapped.
/// `$calls_out`: the hook may wait on key sets and HTTP (it runs with a
/// [`super::host_api::CallClock`]); the others run as they always did.
macro_rules! hook_call {
    ($fn_name:ident, $field:ident, $module:ident, $call:ident, $arg:ty, $ret:ty, $waits:expr, $calls_out:expr) => {
        impl Prepared {
            pub async fn $fn_name(&self, arg: &$arg) -> Result<$ret, CallError> {
                let Some(indices) = self.$field.as_ref() else {
                    return Err(CallError::Trap("hook not exported".into()));
                };
                self.admit()?;
                // Waiting for an instance is the node's time, not the
                // guest's: the deadline starts once one is ours.
                let _slot = self.slot($waits).await?;
                let started = Instant::now();
                let result = async {
                    let mut warm = match self.instances.checkout().await {
                        Ok(warm) => warm,
                        Err((store, err)) => return Err(self.classify(&store, err)),
                    };
                    warm.store
                        .set_epoch_deadline(self.instances.deadline_ticks());
                    warm.store.data_mut().clock = $calls_out
                        .then(|| super::host_api::CallClock::start(self.manifest.timeout()));
                    let _ticking = super::engine::ticking();
                    let called = match indices.load(&mut warm.store, &warm.instance) {
                        Ok(guest) => guest.$call(&mut warm.store, arg).await,
                        Err(err) => Err(err),
                    };
                    match called {
                        Ok(value) => {
                            self.instances.checkin(warm);
                            Ok(value)
                        }
                        Err(err) => Err(self.classify(&warm.store, err)),
                    }
                }
                .await;
                self.record(started, result.as_ref().map(|_| ()));
                if let Err(err) = &result {
                    tracing::warn!(plugin = %self.name, hook = stringify!($module), cause = %err, "plugin call failed");
                }
                result
            }
        }
    };
}

// A connect waits for an auth instance at most one call's deadline, then
// is answered 503 (fail closed, but honest); the other hooks wait their
// turn: a filter that could not run must not let a message through.
hook_call!(
    call_auth,
    auth,
    auth,
    call_authenticate,
    auth::ConnectRequest,
    auth::Decision,
    Wait::Deadline,
    true
);
hook_call!(
    call_filter,
    filter,
    filter,
    call_check,
    filter::Message,
    filter::Verdict,
    Wait::Turn,
    false
);
hook_call!(
    call_events,
    events,
    events,
    call_on_presence,
    events::PresenceEvent,
    (),
    Wait::Turn,
    true
);
hook_call!(
    call_inbound,
    inbound,
    inbound,
    call_handle,
    inbound::Frame,
    inbound::Action,
    Wait::Turn,
    false
);
