//! A plugin's stores and instances: the sandbox each store gets (WASI with
//! nothing open unless the manifest grants it), its memory cap, and the pool
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
use super::host_api::HostCtx;
use super::manifest::Manifest;

/// Per-store state: WASI, limits and what the host interface needs.
pub struct PluginState {
    wasi: WasiCtx,
    table: ResourceTable,
    pub(super) limiter: MemoryLimiter,
    pub(super) host: Arc<HostCtx>,
}

impl WasiView for PluginState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

/// Caps linear memory and remembers that it did, so the failure is reported
/// as what it is rather than as whatever trap the guest raises next.
pub(super) struct MemoryLimiter {
    max_bytes: usize,
    pub(super) hit: bool,
}

impl wasmtime::ResourceLimiter for MemoryLimiter {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _max: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.max_bytes {
            self.hit = true;
            wasmtime::bail!("memory limit of {} bytes exceeded", self.max_bytes);
        }
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _max: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= 100_000)
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

    /// A store's WASI context: only what `[grants]` opens.
    fn new_state(&self) -> PluginState {
        let grants = &self.manifest.grants;
        let mut wasi = WasiCtxBuilder::new();
        // `Grants::withhold_protected` took these out on load; checked
        // again here, where the value is read.
        for var in grants
            .env
            .iter()
            .filter(|v| !super::manifest::is_protected_env(v))
        {
            if let Ok(value) = std::env::var(var) {
                wasi.env(var, value);
            }
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
            limiter: MemoryLimiter {
                max_bytes: self.manifest.memory_bytes(),
                hit: false,
            },
            host: self.host.clone(),
        }
    }
}
