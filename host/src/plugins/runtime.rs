//! The wasmtime side: one process-wide `Engine` (pooling allocator, epoch
//! interruption), the `Linker` with WASI and the `host` interface, loading a
//! component into a [`Prepared`] plugin, and calling its hooks with a deadline
//! and a memory cap.
//!
//! Instances are reused: each plugin keeps up to `pool` warm instances (a
//! store and an instance each). A call takes one, runs with a fresh epoch
//! deadline, and puts it back; after any trap the instance cannot be entered
//! again, so it is dropped and the next call instantiates a new one. Plugin
//! memory therefore survives between some calls and not others: plugins must
//! keep shared state in the host key-value store.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use wasmtime::component::{Component, InstancePre, Linker, ResourceTable};
use wasmtime::{Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig, Store};
use wasmtime_wasi::{FsPerms, WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};

use super::bindings::exports::imhost::plugin::{auth, events, filter, inbound};
use super::host_api::HostCtx;
use super::manifest::{Hook, Manifest};

/// How often the epoch advances; deadlines are counted in these ticks.
pub const EPOCH_TICK: Duration = Duration::from_millis(1);
/// The ABI major version this host speaks.
pub const ABI_MAJOR: u64 = 1;
const PACKAGE: &str = "imhost:plugin/";

/// Why a file did not become a plugin.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("not a WebAssembly file")]
    NotWasm,
    #[error(
        "this is a core WebAssembly module, not a component: build for wasm32-wasip2 (or wrap it with `wasm-tools component new`)"
    )]
    CoreModule,
    #[error("invalid component: {0}")]
    Invalid(String),
    #[error(
        "built against imhost:plugin@{found}, but this host speaks imhost:plugin@{ABI_MAJOR}.x"
    )]
    UnknownMajor { found: String },
    #[error("exports none of the hooks (auth, filter, events, inbound) of imhost:plugin@1")]
    NoHooks,
    #[error("cannot be linked: {0}")]
    Link(String),
    #[error("bad NAME.toml: {0}")]
    Manifest(String),
}

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
}

/// Per-store state: WASI, limits and what the host interface needs.
pub struct PluginState {
    wasi: WasiCtx,
    table: ResourceTable,
    limiter: MemoryLimiter,
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
struct MemoryLimiter {
    max_bytes: usize,
    hit: bool,
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

/// The process-wide engine: compiled code is shared by every node in the
/// process, and one epoch ticker serves all deadlines.
pub fn engine() -> &'static Engine {
    static ENGINE: OnceLock<Engine> = OnceLock::new();
    ENGINE.get_or_init(|| {
        let engine = build_engine(true).or_else(|err| {
            tracing::warn!(cause = %err, "pooling allocator unavailable; using on-demand allocation");
            build_engine(false)
        });
        let engine = match engine {
            Ok(engine) => engine,
            Err(err) => panic!("cannot configure wasmtime: {err}"),
        };
        let ticker = engine.weak();
        std::thread::Builder::new()
            .name("imhost-epoch".into())
            .spawn(move || {
                while let Some(engine) = ticker.upgrade() {
                    engine.increment_epoch();
                    drop(engine);
                    std::thread::sleep(EPOCH_TICK);
                }
            })
            .ok();
        engine
    })
}

fn build_engine(pooling: bool) -> wasmtime::Result<Engine> {
    let mut config = Config::new();
    config.wasm_component_model(true);
    config.epoch_interruption(true);
    if pooling {
        let mut pool = PoolingAllocationConfig::default();
        pool.total_component_instances(512);
        pool.total_core_instances(1024);
        pool.total_memories(512);
        pool.total_tables(1024);
        pool.max_memory_size(1 << 30);
        pool.max_component_instance_size(1 << 20);
        pool.max_core_instance_size(1 << 20);
        config.allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
    }
    Engine::new(&config)
}

/// The linker every plugin is instantiated with: WASI (denying what is not
/// granted per store) and the `host` interface. Built once.
fn linker() -> &'static Result<Linker<PluginState>, String> {
    static LINKER: OnceLock<Result<Linker<PluginState>, String>> = OnceLock::new();
    LINKER.get_or_init(|| {
        let mut linker = Linker::new(engine());
        // WASI imports are provided explicitly: a trap stub for unknown imports
        // would shadow newer versions the linker can otherwise match.
        wasmtime_wasi::p2::add_to_linker_async(&mut linker).map_err(|e| e.to_string())?;
        super::bindings::imhost::plugin::host::add_to_linker::<
            _,
            wasmtime::component::HasSelf<PluginState>,
        >(&mut linker, |state| state)
        .map_err(|e| e.to_string())?;
        Ok(linker)
    })
}

/// A component compiled and checked against the linker; cheap to clone.
#[derive(Clone)]
pub struct Compiled {
    pub component: Component,
    pub pre: InstancePre<PluginState>,
    pub exported: Vec<Hook>,
    /// The `imhost:plugin` version it was built against, e.g. `1.0.0`.
    pub abi: String,
}

/// Hex SHA-256 of the bytes: the content hash reported and cached by.
pub fn content_hash(bytes: &[u8]) -> String {
    let digest = Sha256::digest(bytes);
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// Compiles and validates a component. CPU-heavy: call off the async workers.
///
/// # Errors
/// [`LoadError`] saying what the file is and why it cannot be a plugin.
pub fn compile(bytes: &[u8]) -> Result<Compiled, LoadError> {
    match bytes.get(..8) {
        Some([0, b'a', b's', b'm', 1, 0, 0, 0]) => return Err(LoadError::CoreModule),
        Some([0, b'a', b's', b'm', _, _, 1, 0]) => {}
        _ => return Err(LoadError::NotWasm),
    }
    let component =
        Component::new(engine(), bytes).map_err(|e| LoadError::Invalid(format!("{e:#}")))?;
    inspect(component)
}

/// Where a compiled artifact of `hash` lives in `cache_dir`: the name carries
/// the engine's compatibility hash, so a different wasmtime or CPU never reads
/// another's code.
pub fn cached_path(cache_dir: &Path, hash: &str) -> PathBuf {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    engine().precompile_compatibility_hash().hash(&mut hasher);
    cache_dir.join(format!("{hash}-{:016x}.cwasm", hasher.finish()))
}

/// Compiles `bytes`, or loads the artifact compiled earlier for the same
/// content and engine from `cache_dir` (0.2 ms instead of tens of ms), and
/// stores a new artifact there. Blocking: call off the async workers.
///
/// # Errors
/// As [`compile`].
pub fn compile_cached(
    bytes: &[u8],
    hash: &str,
    cache_dir: Option<&Path>,
) -> Result<Compiled, LoadError> {
    let Some(cache_dir) = cache_dir else {
        return compile(bytes);
    };
    let path = cached_path(cache_dir, hash);
    if path.exists() {
        // SAFETY: `deserialize_file` trusts the file to be wasmtime's own
        // output for this engine. The cache directory is written only by this
        // host, sits inside the plugin directory (whose contents run as code
        // anyway), and its names carry the engine's compatibility hash.
        #[allow(unsafe_code)]
        let loaded = unsafe { Component::deserialize_file(engine(), &path) };
        match loaded {
            Ok(component) => return inspect(component),
            Err(err) => {
                tracing::warn!(file = %path.display(), cause = %err, "ignoring unusable compiled plugin")
            }
        }
    }
    let compiled = compile(bytes)?;
    let stored = compiled
        .component
        .serialize()
        .map_err(std::io::Error::other)
        .and_then(|artifact| {
            std::fs::create_dir_all(cache_dir)?;
            let tmp = path.with_extension("partial");
            std::fs::write(&tmp, artifact)?;
            std::fs::rename(&tmp, &path)
        });
    if let Err(err) = stored {
        tracing::warn!(dir = %cache_dir.display(), cause = %err, "cannot cache the compiled plugin");
    }
    Ok(compiled)
}

/// Checks a compiled component: ABI version, linkability, hooks exported.
fn inspect(component: Component) -> Result<Compiled, LoadError> {
    let engine = engine();
    let ty = component.component_type();
    let mut abi = None;
    let names = ty
        .imports(engine)
        .map(|(name, _)| name.to_owned())
        .chain(ty.exports(engine).map(|(name, _)| name.to_owned()))
        .collect::<Vec<_>>();
    for name in &names {
        if let Some(rest) = name.strip_prefix(PACKAGE)
            && let Some((_, version)) = rest.split_once('@')
        {
            let major = version
                .split('.')
                .next()
                .and_then(|m| m.parse::<u64>().ok());
            if major != Some(ABI_MAJOR) {
                return Err(LoadError::UnknownMajor {
                    found: version.to_owned(),
                });
            }
            abi.get_or_insert_with(|| version.to_owned());
        }
    }
    let linker = linker().as_ref().map_err(|e| LoadError::Link(e.clone()))?;
    let pre = linker
        .instantiate_pre(&component)
        .map_err(|e| LoadError::Link(format!("{e:#}")))?;
    let exported: Vec<Hook> = Hook::ALL
        .into_iter()
        .filter(|hook| match hook {
            Hook::Auth => auth::GuestIndices::new(&pre).is_ok(),
            Hook::Filter => filter::GuestIndices::new(&pre).is_ok(),
            Hook::Events => events::GuestIndices::new(&pre).is_ok(),
            Hook::Inbound => inbound::GuestIndices::new(&pre).is_ok(),
        })
        .collect();
    if exported.is_empty() {
        return Err(LoadError::NoHooks);
    }
    Ok(Compiled {
        component,
        pre,
        exported,
        abi: abi.unwrap_or_else(|| "1.0.0".into()),
    })
}

/// A warm instance.
struct Warm {
    store: Store<PluginState>,
    instance: wasmtime::component::Instance,
}

/// Counters of one loaded plugin version.
#[derive(Debug, Default)]
pub struct CallStats {
    pub calls: u64,
    pub errors: u64,
    pub timeouts: u64,
    pub memory_limits: u64,
    pub traps: u64,
    pub busy_ns: u64,
    pub consecutive_failures: u32,
    /// While set and in the future, calls are refused (circuit open).
    pub open_until: Option<Instant>,
    pub times_opened: u64,
}

/// One version of one plugin, ready to call.
pub struct Prepared {
    pub name: String,
    pub hash: String,
    pub manifest: Manifest,
    pub compiled: Compiled,
    /// Hooks wired: exported, and enabled by the manifest.
    pub hooks: Vec<Hook>,
    pub loaded_at: std::time::SystemTime,
    /// Content hash of the wasm and of its manifest: unchanged means reusable.
    source_version: String,
    host: Arc<HostCtx>,
    auth: Option<auth::GuestIndices>,
    filter: Option<filter::GuestIndices>,
    events: Option<events::GuestIndices>,
    inbound: Option<inbound::GuestIndices>,
    pool: Mutex<Vec<Warm>>,
    pub stats: Mutex<CallStats>,
}

impl Prepared {
    pub fn new(
        name: String,
        hash: String,
        manifest: Manifest,
        compiled: Compiled,
        host: Arc<HostCtx>,
        source_version: String,
    ) -> Prepared {
        let wanted = manifest.hooks.clone();
        let hooks: Vec<Hook> = compiled
            .exported
            .iter()
            .copied()
            .filter(|h| wanted.as_ref().is_none_or(|w| w.contains(h)))
            .collect();
        let has = |h: Hook| hooks.contains(&h);
        Prepared {
            auth: has(Hook::Auth)
                .then(|| auth::GuestIndices::new(&compiled.pre).ok())
                .flatten(),
            filter: has(Hook::Filter)
                .then(|| filter::GuestIndices::new(&compiled.pre).ok())
                .flatten(),
            events: has(Hook::Events)
                .then(|| events::GuestIndices::new(&compiled.pre).ok())
                .flatten(),
            inbound: has(Hook::Inbound)
                .then(|| inbound::GuestIndices::new(&compiled.pre).ok())
                .flatten(),
            name,
            hash,
            manifest,
            compiled,
            hooks,
            loaded_at: std::time::SystemTime::now(),
            source_version,
            host,
            pool: Mutex::new(Vec::new()),
            stats: Mutex::new(CallStats::default()),
        }
    }

    pub fn has(&self, hook: Hook) -> bool {
        self.hooks.contains(&hook)
    }

    pub fn source_version(&self) -> &str {
        &self.source_version
    }

    fn stats(&self) -> std::sync::MutexGuard<'_, CallStats> {
        self.stats.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn new_state(&self) -> PluginState {
        let grants = &self.manifest.grants;
        let mut wasi = WasiCtxBuilder::new();
        for var in &grants.env {
            if let Ok(value) = std::env::var(var) {
                wasi.env(var, value);
            }
        }
        for dir in &grants.dirs {
            let guest = dir.to_string_lossy().into_owned();
            if let Err(err) = wasi.preopened_dir(dir, &guest, FsPerms::ReadOnly) {
                tracing::warn!(plugin = %self.name, dir = %guest, cause = %err, "granted directory not mounted");
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

    async fn checkout(&self) -> Result<Warm, CallError> {
        let pooled = self.pool.lock().unwrap_or_else(|p| p.into_inner()).pop();
        if let Some(warm) = pooled {
            return Ok(warm);
        }
        let mut store = Store::new(engine(), self.new_state());
        store.limiter(|state| &mut state.limiter);
        // Instantiation runs guest start code: it gets a deadline too.
        store.set_epoch_deadline(self.deadline_ticks());
        let instance = self
            .compiled
            .pre
            .instantiate_async(&mut store)
            .await
            .map_err(|e| self.classify(&store, e))?;
        Ok(Warm { store, instance })
    }

    fn checkin(&self, warm: Warm) {
        let mut pool = self.pool.lock().unwrap_or_else(|p| p.into_inner());
        if pool.len() < self.manifest.pool {
            pool.push(warm);
        }
    }

    fn deadline_ticks(&self) -> u64 {
        (self.manifest.timeout().as_millis() / EPOCH_TICK.as_millis()).max(1) as u64 + 1
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
        stats.calls += 1;
        stats.busy_ns += started.elapsed().as_nanos() as u64;
        match outcome {
            Ok(()) => stats.consecutive_failures = 0,
            Err(err) => {
                stats.errors += 1;
                match err {
                    CallError::Timeout(_) => stats.timeouts += 1,
                    CallError::MemoryLimit => stats.memory_limits += 1,
                    CallError::Trap(_) => stats.traps += 1,
                    CallError::CircuitOpen => {}
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

/// Generates the per-hook call method: take a warm instance, set the
/// deadline, call, classify, count, and return the instance unless it trapped.
macro_rules! hook_call {
    ($fn_name:ident, $field:ident, $module:ident, $call:ident, $arg:ty, $ret:ty) => {
        impl Prepared {
            pub async fn $fn_name(&self, arg: &$arg) -> Result<$ret, CallError> {
                let Some(indices) = self.$field.as_ref() else {
                    return Err(CallError::Trap("hook not exported".into()));
                };
                self.admit()?;
                let started = Instant::now();
                let result = async {
                    let mut warm = self.checkout().await?;
                    warm.store.set_epoch_deadline(self.deadline_ticks());
                    let called = match indices.load(&mut warm.store, &warm.instance) {
                        Ok(guest) => guest.$call(&mut warm.store, arg).await,
                        Err(err) => Err(err),
                    };
                    match called {
                        Ok(value) => {
                            self.checkin(warm);
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

hook_call!(
    call_auth,
    auth,
    auth,
    call_authenticate,
    auth::ConnectRequest,
    auth::Decision
);
hook_call!(
    call_filter,
    filter,
    filter,
    call_check,
    filter::Message,
    filter::Verdict
);
hook_call!(
    call_events,
    events,
    events,
    call_on_presence,
    events::PresenceEvent,
    ()
);
hook_call!(
    call_inbound,
    inbound,
    inbound,
    call_handle,
    inbound::Frame,
    inbound::Action
);
