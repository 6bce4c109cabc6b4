//! A plugin's stores and instances: the sandbox each store gets (WASI with
//! nothing open but what the operator grants of what the manifest asks), its memory cap, and the pool
//! of warm instances calls take and give back.
//!
//! Instances are reused: each plugin version keeps up to `pool` warm
//! instances (a store and an instance each). A call takes one, runs with a
//! fresh epoch deadline, and puts it back; after any trap the instance cannot
//! be entered again, so it is dropped and a later call instantiates a new
//! one. Plugin memory therefore survives between some calls and not others:
//! plugins must keep shared state in the host key-value store.

use std::sync::{Arc, Mutex};

use wasmtime::Store;
use wasmtime::component::{Instance, InstancePre, ResourceTable};
use wasmtime_wasi::{FsPerms, WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};

use super::engine::{EPOCH_TICK, Tier, engine};
use super::grants::Effective;
use super::host_api::{CallClock, HostCtx};
use super::manifest::Manifest;

/// Per-store state: WASI, limits and what the host interface needs.
pub struct PluginState {
    wasi: WasiCtx,
    table: ResourceTable,
    pub(super) limiter: MemoryLimiter,
    pub(super) host: Arc<HostCtx>,
    /// The running call's clock, for hooks that may call out (auth,
    /// events); `None` in every other call, whose deadline stays plain.
    pub(super) clock: Option<CallClock>,
}

impl WasiView for PluginState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

/// Caps the memory of a whole store (every linear memory and table of every
/// core instance in the component together, not each on its own: a component
/// with hundreds of memories must not multiply `memory_mb`) and remembers
/// that it did, so the failure is reported as what it is rather than as
/// whatever trap the guest raises next.
pub(super) struct MemoryLimiter {
    max_bytes: usize,
    /// Bytes of linear memory the store holds now, all memories together.
    memory_bytes: usize,
    /// Table elements the store holds now, all tables together.
    table_elements: usize,
    pub(super) hit: bool,
}

/// Table elements a store may hold, all tables together.
const MAX_TABLE_ELEMENTS: usize = 1_000_000;
/// Core instances, memories and tables one store may create (see
/// `share::PER_INSTANCE_MAX`).
const MAX_INSTANCES: usize = super::share::PER_INSTANCE_MAX.core_instances as usize;
const MAX_MEMORIES: usize = super::share::PER_INSTANCE_MAX.memories as usize;
const MAX_TABLES: usize = super::share::PER_INSTANCE_MAX.tables as usize;

impl MemoryLimiter {
    pub(super) fn new(max_bytes: usize) -> Self {
        MemoryLimiter {
            max_bytes,
            memory_bytes: 0,
            table_elements: 0,
            hit: false,
        }
    }
}

impl wasmtime::ResourceLimiter for MemoryLimiter {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        _max: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let total = self
            .memory_bytes
            .saturating_sub(current)
            .saturating_add(desired);
        if total > self.max_bytes {
            self.hit = true;
            wasmtime::bail!(
                "memory limit of {} bytes exceeded (all of the plugin's memories together)",
                self.max_bytes
            );
        }
        self.memory_bytes = total;
        Ok(true)
    }

    fn table_growing(
        &mut self,
        current: usize,
        desired: usize,
        _max: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let total = self
            .table_elements
            .saturating_sub(current)
            .saturating_add(desired);
        if total > MAX_TABLE_ELEMENTS {
            return Ok(false);
        }
        self.table_elements = total;
        Ok(true)
    }

    fn instances(&self) -> usize {
        MAX_INSTANCES
    }

    fn memories(&self) -> usize {
        MAX_MEMORIES
    }

    fn tables(&self) -> usize {
        MAX_TABLES
    }
}

/// A warm instance.
pub struct Warm {
    pub store: Store<PluginState>,
    pub instance: Instance,
}

/// The warm instances of one plugin version.
pub struct InstancePool {
    tier: Tier,
    pre: InstancePre<PluginState>,
    manifest: Manifest,
    host: Arc<HostCtx>,
    idle: Mutex<Vec<Warm>>,
}

impl InstancePool {
    pub fn new(
        tier: Tier,
        pre: InstancePre<PluginState>,
        manifest: Manifest,
        host: Arc<HostCtx>,
    ) -> InstancePool {
        InstancePool {
            tier,
            pre,
            manifest,
            host,
            idle: Mutex::new(Vec::new()),
        }
    }

    /// The epoch deadline of one call (or instantiation), in ticks.
    pub fn deadline_ticks(&self) -> u64 {
        (self.manifest.timeout().as_millis() / EPOCH_TICK.as_millis()).max(1) as u64 + 1
    }

    /// A warm instance, or a new one. Instantiation runs the guest's start
    /// code, under the same deadline and memory cap as a call.
    ///
    /// # Errors
    /// The instantiation trapped, ran out of time or memory; the store is
    /// returned so the caller can tell which.
    pub async fn checkout(&self) -> Result<Warm, (Store<PluginState>, wasmtime::Error)> {
        let pooled = self.idle.lock().unwrap_or_else(|p| p.into_inner()).pop();
        if let Some(warm) = pooled {
            return Ok(warm);
        }
        let mut store = Store::new(engine(self.tier), self.new_state());
        store.limiter(|state| &mut state.limiter);
        store.set_epoch_deadline(self.deadline_ticks());
        // Reached only when the deadline passes: a call that waited on the
        // network (a clock with time left) gets the rest of its own time;
        // every other call is interrupted, as without a callback.
        store.epoch_deadline_callback(|ctx| match ctx.data().clock.and_then(|c| c.remaining()) {
            Some(left) => Ok(wasmtime::UpdateDeadline::Continue(
                (left.as_millis() / EPOCH_TICK.as_millis()) as u64 + 1,
            )),
            None => Err(wasmtime::Trap::Interrupt.into()),
        });
        let _ticking = super::engine::ticking();
        match self.pre.instantiate_async(&mut store).await {
            Ok(instance) => Ok(Warm { store, instance }),
            Err(err) => Err((store, err)),
        }
    }

    /// Gives back an instance that did not trap.
    pub fn checkin(&self, warm: Warm) {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        if idle.len() < self.manifest.pool {
            idle.push(warm);
        }
    }

    /// A store's WASI context: only what the operator granted of what the
    /// manifest asks (see [`super::grants`]).
    fn new_state(&self) -> PluginState {
        let grants: &Effective = &self.host.grants;
        let mut wasi = WasiCtxBuilder::new();
        // `grants::decide` never grants these; checked again here, where
        // the value is handed over.
        for (var, value) in grants
            .env
            .iter()
            .filter(|(v, _)| !super::manifest::is_protected_env(v))
        {
            wasi.env(var, value);
        }
        for dir in &grants.dirs {
            let guest = dir.to_string_lossy().into_owned();
            if let Err(err) = wasi.preopened_dir(dir, &guest, FsPerms::ReadOnly) {
                tracing::warn!(plugin = %self.host.name, dir = %guest, cause = %err, "granted directory not mounted");
            }
        }
        // Sockets are denied twice by default (no address passes the check,
        // and TCP/UDP are off); a grant lifts both.
        if grants.network {
            wasi.inherit_network();
            wasi.allow_tcp(true);
            wasi.allow_udp(true);
            wasi.allow_ip_name_lookup(true);
        } else {
            wasi.allow_tcp(false);
            wasi.allow_udp(false);
            wasi.allow_ip_name_lookup(false);
        }
        PluginState {
            wasi: wasi.build(),
            table: ResourceTable::new(),
            limiter: MemoryLimiter::new(self.manifest.memory_bytes()),
            host: self.host.clone(),
            clock: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use wasmtime::ResourceLimiter;

    #[test]
    fn the_cap_holds_for_all_memories_together() {
        let mut limiter = MemoryLimiter::new(100);
        assert!(limiter.memory_growing(0, 60, None).is_ok(), "one memory");
        assert!(
            limiter.memory_growing(0, 60, None).is_err(),
            "a second memory of 60 passes 100 together"
        );
        assert!(limiter.hit);
        let mut limiter = MemoryLimiter::new(100);
        assert!(limiter.memory_growing(0, 40, None).is_ok());
        assert!(limiter.memory_growing(40, 70, None).is_ok(), "growing one");
        assert!(limiter.memory_growing(0, 30, None).is_ok(), "70 + 30");
        assert!(limiter.memory_growing(0, 1, None).is_err(), "101");
    }

    #[test]
    fn tables_are_capped_together_too() {
        let mut limiter = MemoryLimiter::new(100);
        assert!(limiter.table_growing(0, 600_000, None).is_ok_and(|ok| ok));
        assert!(limiter.table_growing(0, 600_000, None).is_ok_and(|ok| !ok));
    }
}
