//! WebAssembly plugins: the hooks a node runs (auth, filter, events, inbound),
//! loaded from `--plugins DIR` and swapped at run time without dropping a
//! connection.
//!
//! # Layout
//! - [`bindings`] — only `bindgen!`, from `plugin-sdk/wit/`.
//! - [`engine`] — the wasmtime engines (one per compiler tier), epoch ticker, linkers.
//! - [`compile`] — compiling (in a child process), ABI checks, the artifact cache.
//! - [`instance`] — store state, the sandbox, the warm instance pool.
//! - [`loaded`] — one loaded version: circuit breaker and hook calls.
//! - [`hooks`] — the host's own types for what hooks see and answer.
//! - [`host_api`] — the `host` interface plugins import.
//! - [`crypto`] — hashes, HMAC, random bytes and JWS checks for plugins.
//! - [`key_sets`] — the JWKS cache the host keeps for plugins.
//! - [`egress`] — HTTP the host makes for plugins, under the operator's list.
//! - [`manifest`] — `NAME.toml`.
//! - [`grants`] — what the operator grants each plugin.
//! - `source` — the files of the plugin directory, and building a version.
//! - [`report`] — what the node says about its plugins.
//! - `check` — `imhost plugin check`.
//! - [`watcher`] — hot reload on file changes.
//!
//! The loaded set is an immutable snapshot behind an `RwLock<Arc<_>>`: a call
//! clones the `Arc` and runs on that version to the end, while a load builds
//! a new version and swaps it in. A version whose new file fails to load keeps
//! running, and the failure is reported.
//!
//! # Loading never blocks serving
//! Loads run in the background, several at a time. Baseline builds (what a
//! swap waits for) and optimized builds have slots of their own (one per
//! core, and one core fewer), and the optimized ones run in a child process
//! at a lower CPU priority, stopped while any swap's own build runs
//! (`preempt`), so a swap never queues or competes behind them. A new file
//! is served first from the baseline tier (Winch, fast to compile), then
//! swapped for the optimized tier (Cranelift) once that is compiled, in a
//! child process, into the artifact cache; a file whose optimized artifact is
//! cached loads from it at once. Until a plugin has a running version it is
//! `compiling`: `/readyz` answers 503, and while an auth plugin is compiling,
//! `/ws` answers 503 with `Retry-After` (its manifest can choose otherwise).

pub mod bindings;
mod check;
pub mod compile;
pub mod crypto;
pub mod egress;
pub mod engine;
pub mod grants;
pub mod hooks;
pub mod host_api;
pub mod instance;
pub mod key_sets;
pub mod loaded;
pub mod manifest;
pub mod preempt;
pub mod report;
pub mod share;
mod source;
pub mod watcher;

pub use self::check::check_file;
pub use self::report::{CompilingInfo, LoadFailure, PluginInfo};
pub use self::source::plugin_name;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

use imhost_client::wire::TokenValue;
use tokio::sync::{Semaphore, mpsc};
use tracing::{info, warn};

use self::bindings::exports::imhost::plugin::{auth, events, filter, inbound};
use self::compile::{ArtifactCache, Compiler, LoadError};
use self::engine::Tier;
use self::loaded::{CallError, Prepared};
use self::manifest::{Hook, OnError, WhileLoading};
use self::source::{Hashed, Source, read_source, scan, unchanged_version};
use crate::cluster::kv::PluginKv;
use crate::stats::Stats;

/// Presence events waiting for events plugins; beyond it they are counted
/// and dropped, never waited for.
const EVENTS_QUEUE: usize = 4096;

/// The plugins of one moment, in chain order.
#[derive(Default)]
pub struct PluginSet {
    plugins: Vec<Arc<Prepared>>,
}

impl PluginSet {
    fn chain(&self, hook: Hook) -> impl Iterator<Item = &Arc<Prepared>> {
        self.plugins.iter().filter(move |p| p.has(hook))
    }

    pub fn has(&self, hook: Hook) -> bool {
        self.chain(hook).next().is_some()
    }

    /// The smallest warm-instance pool in the filter chain (0: no filter).
    pub fn filter_pool(&self) -> usize {
        self.chain(Hook::Filter)
            .map(|p| p.manifest.pool)
            .min()
            .unwrap_or(0)
    }
}

/// What the auth chain decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthOutcome {
    Allow(TokenValue),
    Deny(String),
    /// No plugin decided: use the built-in token store.
    Pass,
    /// This auth plugin had no instance free in time: the node is busy
    /// (`/ws` answers 503 with `Retry-After`).
    Busy(String),
}

/// What the filter chain decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FilterOutcome {
    /// Deliver `content`, which a filter replaced when `replaced`.
    Deliver {
        content: String,
        replaced: bool,
    },
    Drop {
        plugin: String,
        reason: String,
    },
}

/// A plugin whose version is being compiled.
#[derive(Debug, Clone)]
struct Loading {
    since: Instant,
    tier: Tier,
    /// Its hooks as the file declares them (read without compiling).
    hooks: Vec<Hook>,
    while_loading: WhileLoading,
}

/// How a node loads its plugins.
#[derive(Debug, Clone)]
pub struct LoaderConfig {
    /// The plugin directory; none: no plugins.
    pub dir: Option<PathBuf>,
    /// Where compiled artifacts are kept; none: nothing is cached.
    pub cache_dir: Option<PathBuf>,
    pub compiler: Compiler,
    /// Serve a baseline build first, then swap in the optimized one.
    pub tiered: bool,
    /// Artifacts kept in the cache besides the running versions'.
    pub cache_keep: usize,
    /// The operator's grants file (`plugin_grants`), read at every reload;
    /// none: nothing is granted.
    pub grants_file: Option<PathBuf>,
}

/// A node's plugins.
pub struct PluginHost {
    loader: LoaderConfig,
    cache: Option<ArtifactCache>,
    set: RwLock<Arc<PluginSet>>,
    failures: Mutex<BTreeMap<String, LoadFailure>>,
    loading: Mutex<BTreeMap<String, Loading>>,
    /// False until the first scan of the directory has listed its files.
    scanned: AtomicBool,
    /// One reload at a time; the ones that arrive meanwhile wait their turn.
    reloading: tokio::sync::Mutex<()>,
    /// The operator's grants as last read (kept when a later read fails).
    grants: Mutex<grants::GrantsFile>,
    /// What the last rescans hashed: unchanged files are not read again.
    hashed: Hashed,
    /// Baseline builds at once (one per core). A swap waits for its
    /// baseline build only: it never queues behind optimized builds, which
    /// have slots of their own and run at a lower CPU priority.
    baseline_slots: Arc<Semaphore>,
    /// Optimized builds at once: one core fewer than the machine has (at
    /// least one), so a baseline build and serving always have a core.
    optimized_slots: Arc<Semaphore>,
    services: host_api::Services,
    events: mpsc::Sender<events::PresenceEvent>,
    events_rx: Mutex<Option<mpsc::Receiver<events::PresenceEvent>>>,
    stats: Arc<Stats>,
}

/// What a rescan reads each plugin's files with.
#[derive(Clone, Copy)]
struct ScanInputs<'a> {
    dir: &'a Path,
    /// Directories no plugin may read.
    protected: &'a [PathBuf],
    grants: &'a grants::GrantsFile,
}

/// What a rescan has found so far.
#[derive(Default)]
struct Found {
    /// Plugins that stay (running, failed, or with a new version to load).
    keep: Vec<String>,
    /// Why each failed, by name.
    failed: BTreeMap<String, String>,
    /// New versions to load.
    sources: Vec<Source>,
}

impl PluginHost {
    /// A node's plugin host: `outbox` is how the plugins' host calls send
    /// (none: they are told there is no cluster).
    pub fn new(
        loader: LoaderConfig,
        kv: Arc<dyn PluginKv>,
        outbox: Option<Arc<dyn host_api::Cluster>>,
        stats: Arc<Stats>,
    ) -> PluginHost {
        let (events, events_rx) = mpsc::channel(EVENTS_QUEUE);
        let cache = loader
            .cache_dir
            .as_deref()
            .and_then(|dir| match ArtifactCache::open(dir) {
                Ok(cache) => Some(cache),
                Err(err) => {
                    warn!(dir = %dir.display(), cause = %err, "plugin cache unusable; compiling every load");
                    None
                }
            });
        let cores = std::thread::available_parallelism().map_or(1, usize::from);
        PluginHost {
            scanned: AtomicBool::new(loader.dir.is_none()),
            loader,
            cache,
            set: RwLock::default(),
            failures: Mutex::default(),
            loading: Mutex::default(),
            reloading: tokio::sync::Mutex::new(()),
            grants: Mutex::default(),
            hashed: Hashed::default(),
            baseline_slots: Arc::new(Semaphore::new(cores)),
            optimized_slots: Arc::new(Semaphore::new(cores.saturating_sub(1).max(1))),
            services: host_api::Services {
                kv,
                outbox,
                key_sets: Arc::new(key_sets::KeySets::new(stats.clone())),
                egress: Arc::new(egress::EgressByPlugin::new(stats.clone())),
            },
            events,
            events_rx: Mutex::new(Some(events_rx)),
            stats,
        }
    }

    /// The operator's grants file, read anew; the last good one (and a
    /// failure under the name `plugin_grants`) when it cannot be read.
    fn read_grants(&self, failed: &mut BTreeMap<String, String>) -> grants::GrantsFile {
        let mut last = self.grants.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(path) = &self.loader.grants_file {
            match grants::GrantsFile::load(path) {
                Ok(read) => *last = read,
                Err(err) => {
                    warn!(cause = %err, "plugin grants not read; the last ones read stay in force");
                    failed.insert("plugin_grants".into(), err);
                }
            }
        }
        last.clone()
    }

    pub fn dir(&self) -> Option<&Path> {
        self.loader.dir.as_deref()
    }

    /// The current snapshot.
    pub fn current(&self) -> Arc<PluginSet> {
        self.set.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn failures(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, LoadFailure>> {
        self.failures.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn loading(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Loading>> {
        self.loading.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether every enabled plugin runs a version: `Err` says which do not.
    ///
    /// # Errors
    /// The plugins still compiling or failed with no running version.
    /// Readiness for `/readyz`: which plugins are not active yet (compiling,
    /// or failed to load), never why (that is behind the API key).
    pub fn ready(&self) -> Result<(), String> {
        if !self.scanned.load(Ordering::Acquire) {
            return Err("plugins not yet scanned".into());
        }
        let set = self.current();
        let running = |name: &str| set.plugins.iter().any(|p| p.name == name);
        let mut waiting: Vec<String> = self
            .loading()
            .keys()
            .filter(|name| !running(name))
            .map(|name| format!("{name} compiling"))
            .collect();
        waiting.extend(
            self.failures()
                .iter()
                .filter(|(name, _)| !running(name))
                // Which, not why: /readyz needs no key, and a load error can
                // name paths and settings. The reason is at GET /api/v1/plugins.
                .map(|(name, _)| format!("{name} failed to load")),
        );
        if waiting.is_empty() {
            Ok(())
        } else {
            Err(format!("plugins not active: {}", waiting.join("; ")))
        }
    }

    /// Whether connects must wait: an auth plugin has no running version yet
    /// (and its manifest does not say to admit connects meanwhile), or the
    /// directory has not been scanned yet.
    pub fn auth_pending(&self) -> bool {
        if !self.scanned.load(Ordering::Acquire) {
            return true;
        }
        let set = self.current();
        self.loading().iter().any(|(name, loading)| {
            loading.hooks.contains(&Hook::Auth)
                && loading.while_loading == WhileLoading::Refuse
                && !set.plugins.iter().any(|p| &p.name == name)
        })
    }

    /// Rescans the directory: loads new and changed files, unloads deleted or
    /// disabled ones, keeps the running version of any file that fails.
    /// New versions are swapped in one by one as they are ready; returns when
    /// every file has a first version (or failed), with the failures.
    pub async fn reload(self: &Arc<Self>) -> BTreeMap<String, String> {
        let _one_at_a_time = self.reloading.lock().await;
        tracing::debug!("rescanning the plugin directory");
        let mut failed = BTreeMap::new();
        let Some(dir) = self.loader.dir.clone() else {
            return failed;
        };
        let names = match scan(&dir).await {
            Ok(names) => names,
            Err(err) => {
                warn!(dir = %dir.display(), cause = %err, "cannot read the plugin directory");
                failed.insert(String::new(), err.to_string());
                self.scanned.store(true, Ordering::Release);
                return failed;
            }
        };
        // Failures of files that are gone are no longer news.
        self.failures().retain(|name, _| names.contains(name));
        self.hashed.retain(&names);
        let protected: Vec<PathBuf> = self.loader.cache_dir.iter().cloned().collect();
        let grants = self.read_grants(&mut failed);
        let inputs = ScanInputs {
            dir: &dir,
            protected: &protected,
            grants: &grants,
        };
        let mut found = Found {
            failed,
            ..Found::default()
        };
        // Files hashed before but too fresh then to trust the hash (most
        // likely unchanged) are read after the others, whose builds start
        // first: a new plugin's build does not wait for them.
        let mut unverified = Vec::new();
        for name in &names {
            // The running version's file, untouched since it was read: not
            // read again.
            if let Some(version) =
                unchanged_version(&dir, name, &protected, &grants, &self.hashed).await
                && self.runs(name, &version)
            {
                found.keep.push(name.clone());
                self.failures().remove(name);
                continue;
            }
            if self.hashed.unverified(&dir, name).await {
                unverified.push(name);
                continue;
            }
            self.scan_one(&inputs, name, &mut found).await;
        }
        let first = self.load_all(std::mem::take(&mut found.sources));
        let rest = async {
            for name in unverified {
                self.scan_one(&inputs, name, &mut found).await;
            }
            self.uninstall_except(&found.keep);
            self.scanned.store(true, Ordering::Release);
            self.load_all(std::mem::take(&mut found.sources)).await
        };
        let (first, rest) = tokio::join!(first, rest);
        let mut failed = found.failed;
        failed.extend(first.into_iter().chain(rest));
        self.prune_cache();
        failed
    }

    /// Reads one plugin's files for a rescan: kept, failed, or a new
    /// version to load.
    async fn scan_one(&self, inputs: &ScanInputs<'_>, name: &String, found: &mut Found) {
        let ScanInputs {
            dir,
            protected,
            grants,
        } = *inputs;
        let Found {
            keep,
            failed,
            sources,
        } = found;
        match read_source(dir, name, protected, grants, Some(&self.hashed)).await {
            Ok(Some(source)) => {
                keep.push(name.clone());
                if self.runs(&source.name, &source.version) {
                    self.failures().remove(name);
                } else {
                    self.loading().insert(
                        name.clone(),
                        Loading {
                            since: Instant::now(),
                            tier: self.first_tier(),
                            hooks: source
                                .manifest
                                .hooks
                                .clone()
                                .unwrap_or_else(|| compile::declared_hooks(&source.wasm)),
                            while_loading: source.manifest.while_loading,
                        },
                    );
                    sources.push(source);
                }
            }
            Ok(None) => {
                self.failures().remove(name);
            }
            Err(err) => {
                keep.push(name.clone());
                self.fail(name, &err);
                failed.insert(name.clone(), err.to_string());
            }
        }
    }

    /// Loads `sources` side by side; the failures, by name.
    async fn load_all(self: &Arc<Self>, sources: Vec<Source>) -> Vec<(String, String)> {
        let loads = sources.into_iter().map(|source| {
            let host = self.clone();
            async move {
                let name = source.name.clone();
                (name, host.load(source).await)
            }
        });
        futures_util::future::join_all(loads)
            .await
            .into_iter()
            .filter_map(|(name, result)| result.err().map(|err| (name, err)))
            .collect()
    }

    /// Whether version `version` of plugin `name` is the one running.
    fn runs(&self, name: &str, version: &str) -> bool {
        self.current()
            .plugins
            .iter()
            .any(|p| p.name == name && p.source_version() == version)
    }

    fn first_tier(&self) -> Tier {
        if self.loader.tiered {
            Tier::Baseline
        } else {
            Tier::Optimized
        }
    }

    fn fail(&self, name: &str, err: &LoadError) {
        warn!(plugin = %name, cause = %err, "plugin not loaded; any running version stays");
        self.failures().insert(
            name.to_owned(),
            LoadFailure {
                error: err.to_string(),
                at_ms: report::unix_ms(std::time::SystemTime::now()),
            },
        );
    }

    /// Loads one file's new version and swaps it in; with tiering, serves a
    /// baseline build first and schedules the optimized one.
    async fn load(self: &Arc<Self>, source: Source) -> Result<(), String> {
        let source = Arc::new(source);
        // Until this version serves, optimized builds running in child
        // processes are stopped (see `preempt`). Not when the first build is
        // itself one of them.
        let _foreground = (self.first_tier() == Tier::Baseline
            && matches!(self.loader.compiler, compile::Compiler::Child(_)))
        .then(preempt::Foreground::hold);
        // A genuine optimized artifact in the cache beats any compile.
        let cached = match &self.cache {
            Some(cache) => {
                let (cache, source2) = (cache.clone(), source.clone());
                tokio::task::spawn_blocking(move || cache.load(&source2.hash, Tier::Optimized))
                    .await
                    .ok()
                    .flatten()
            }
            None => None,
        };
        let (compiled, upgrade) = match cached {
            Some(compiled) => (compiled, false),
            None => {
                let tier = self.first_tier();
                (self.compile(&source, tier).await, tier == Tier::Baseline)
            }
        };
        let outcome = match compiled {
            Ok(compiled) => self.install(&source, compiled).await,
            Err(err) => Err(err),
        };
        trim_heap_later();
        match outcome {
            Ok(()) => {
                self.failures().remove(&source.name);
                if upgrade {
                    if let Some(loading) = self.loading().get_mut(&source.name) {
                        loading.tier = Tier::Optimized;
                        loading.since = Instant::now();
                    }
                    let host = self.clone();
                    tokio::spawn(async move { host.optimize(source).await });
                } else {
                    self.loading().remove(&source.name);
                }
                Ok(())
            }
            Err(err) => {
                self.loading().remove(&source.name);
                self.fail(&source.name, &err);
                Err(err.to_string())
            }
        }
    }

    /// Compiles the optimized tier of a version that serves from the
    /// baseline, and swaps it in if that version still runs.
    async fn optimize(self: Arc<Self>, source: Arc<Source>) {
        let compiled = self.compile(&source, Tier::Optimized).await;
        let still_running = || self.runs(&source.name, &source.version);
        match compiled {
            Ok(compiled) if still_running() => {
                if let Err(err) = self.install(&source, compiled).await {
                    warn!(plugin = %source.name, cause = %err, "optimized build not swapped in; the baseline build keeps serving");
                }
            }
            Ok(_) => {}
            Err(err) => {
                warn!(plugin = %source.name, cause = %err, "optimized build failed; the baseline build keeps serving");
            }
        }
        trim_heap_later();
        let mut loading = self.loading();
        if loading
            .get(&source.name)
            .is_some_and(|l| l.tier == Tier::Optimized)
            && still_running()
        {
            loading.remove(&source.name);
        }
    }

    /// Compiles `source` for `tier` on a blocking thread (or in a child
    /// process), within that tier's own slots (see `baseline_slots`).
    async fn compile(
        &self,
        source: &Arc<Source>,
        tier: Tier,
    ) -> Result<compile::Compiled, LoadError> {
        let slots = match tier {
            Tier::Baseline => &self.baseline_slots,
            Tier::Optimized => &self.optimized_slots,
        };
        let _slot = slots
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| LoadError::Compiler("shutting down".into()))?;
        let (compiler, cache, source) = (
            self.loader.compiler.clone(),
            // The baseline tier is quick to redo and never cached.
            self.cache.clone().filter(|_| tier == Tier::Optimized),
            source.clone(),
        );
        // Only the optimized tier is looked up in and stored to the cache.
        let started = Instant::now();
        tracing::debug!(plugin = %source.name, tier = tier.as_str(), "compiling a plugin");
        let compiled = tokio::task::spawn_blocking(move || {
            compile::compile_cached(&compiler, cache.as_ref(), &source.wasm, &source.hash, tier)
        })
        .await
        .map_err(|e| LoadError::Compiler(format!("compiler task failed: {e}")))?;
        if compiled.is_ok() {
            tracing::debug!(tier = tier.as_str(), elapsed = ?started.elapsed(), "plugin compiled");
        }
        compiled
    }

    /// Builds a version from `compiled`, runs its start code once, and swaps
    /// it in place of the running version of the same name.
    async fn install(&self, source: &Source, compiled: compile::Compiled) -> Result<(), LoadError> {
        let tier = compiled.tier;
        let prepared = Arc::new(source.build(compiled, &self.services).await?);
        let mut set = self.set.write().unwrap_or_else(|p| p.into_inner());
        let mut plugins: Vec<Arc<Prepared>> = set
            .plugins
            .iter()
            .filter(|p| p.name != source.name)
            .cloned()
            .collect();
        plugins.push(prepared);
        plugins.sort_by(|a, b| (a.manifest.order, &a.name).cmp(&(b.manifest.order, &b.name)));
        *set = Arc::new(PluginSet { plugins });
        info!(plugin = %source.name, hash = %&source.hash[..12], tier = tier.as_str(), "plugin loaded");
        Ok(())
    }

    /// Unloads every plugin whose name is not in `keep`.
    fn uninstall_except(&self, keep: &[String]) {
        let mut set = self.set.write().unwrap_or_else(|p| p.into_inner());
        if set.plugins.iter().all(|p| keep.contains(&p.name)) {
            return;
        }
        for plugin in set.plugins.iter().filter(|p| !keep.contains(&p.name)) {
            info!(plugin = %plugin.name, "plugin unloaded");
        }
        let plugins = set
            .plugins
            .iter()
            .filter(|p| keep.contains(&p.name))
            .cloned()
            .collect();
        *set = Arc::new(PluginSet { plugins });
        self.loading().retain(|name, _| keep.contains(name));
    }

    /// Keeps on disk what runs, plus a few recent versions.
    fn prune_cache(&self) {
        if let Some(cache) = &self.cache {
            let active: Vec<String> = self
                .current()
                .plugins
                .iter()
                .map(|p| p.hash.clone())
                .collect();
            cache.prune(&active, self.loader.cache_keep);
        }
    }

    /// Every plugin, running, compiling or failed.
    pub fn list(&self) -> Vec<PluginInfo> {
        let failures = self.failures().clone();
        let loading = self.loading().clone();
        let set = self.current();
        let compiling = |name: &str| {
            loading.get(name).map(|l| CompilingInfo {
                tier: l.tier,
                elapsed_ms: l.since.elapsed().as_millis() as u64,
            })
        };
        let mut rows: Vec<PluginInfo> = set
            .plugins
            .iter()
            .map(|p| PluginInfo {
                compiling: compiling(&p.name),
                ..PluginInfo::of(p, failures.get(&p.name))
            })
            .collect();
        for (name, l) in &loading {
            if !set.plugins.iter().any(|p| &p.name == name) {
                rows.push(PluginInfo {
                    compiling: compiling(name),
                    ..PluginInfo::without_version(name, "compiling", l.hooks.clone())
                });
            }
        }
        for (name, failure) in &failures {
            if !set.plugins.iter().any(|p| &p.name == name) && !loading.contains_key(name) {
                rows.push(PluginInfo {
                    last_error: Some(failure.error.clone()),
                    ..PluginInfo::without_version(name, "failed", Vec::new())
                });
            }
        }
        rows
    }

    /// Runs the auth chain. Auth fails closed: a plugin that errs denies.
    pub async fn authenticate(&self, request: &hooks::ConnectRequest) -> AuthOutcome {
        let request = auth::ConnectRequest::from(request);
        let request = &request;
        let set = self.current();
        for plugin in set.chain(Hook::Auth) {
            match plugin.call_auth(request).await {
                Ok(auth::Decision::Allow(identity)) => {
                    return AuthOutcome::Allow(TokenValue {
                        client_id: identity.client_id,
                        metadata: identity.metadata,
                    });
                }
                Ok(auth::Decision::Deny(reason)) => return AuthOutcome::Deny(reason),
                Ok(auth::Decision::Pass) => {}
                // Fail closed, but say so honestly: the plugin was not
                // asked, so the terminal is not told it was refused.
                Err(CallError::Busy(_)) => {
                    return AuthOutcome::Busy(plugin.name.clone());
                }
                Err(err) => {
                    return AuthOutcome::Deny(format!("auth plugin {} failed: {err}", plugin.name));
                }
            }
        }
        AuthOutcome::Pass
    }

    /// Runs the filter chain; each filter sees what the previous one left.
    pub async fn filter(&self, message: hooks::Outgoing) -> FilterOutcome {
        let set = self.current();
        let mut message = filter::Message::from(message);
        let mut replaced = false;
        for plugin in set.chain(Hook::Filter) {
            match plugin.call_filter(&message).await {
                Ok(filter::Verdict::Deliver) => {}
                Ok(filter::Verdict::Replace(content)) => {
                    message.content = content;
                    replaced = true;
                }
                Ok(filter::Verdict::Drop(reason)) => {
                    return FilterOutcome::Drop {
                        plugin: plugin.name.clone(),
                        reason,
                    };
                }
                Err(err) => {
                    if plugin.manifest.on_error == OnError::Drop {
                        return FilterOutcome::Drop {
                            plugin: plugin.name.clone(),
                            reason: format!("filter failed: {err}"),
                        };
                    }
                }
            }
        }
        FilterOutcome::Deliver {
            content: message.content,
            replaced,
        }
    }

    /// Queues a presence event for the events plugins; never waits.
    pub fn presence(&self, event: hooks::PresenceNotice) {
        if !self.current().has(Hook::Events) {
            return;
        }
        if self.events.try_send(event.into()).is_err() {
            Stats::incr(&self.stats.plugin_events_dropped);
        }
    }

    /// Runs the events worker until the queue closes or `stop` fires.
    pub async fn run_events(self: Arc<Self>, stop: tokio_util::sync::CancellationToken) {
        let Some(mut rx) = self
            .events_rx
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        else {
            return;
        };
        loop {
            let event = tokio::select! {
                event = rx.recv() => match event { Some(e) => e, None => return },
                () = stop.cancelled() => return,
            };
            let set = self.current();
            for plugin in set.chain(Hook::Events) {
                let _ = plugin.call_events(&event).await;
            }
        }
    }

    /// Runs the inbound chain: the first plugin that does not ignore the
    /// frame decides. A failing plugin counts as ignoring it.
    pub async fn inbound(&self, frame: &hooks::InboundFrame) -> Option<hooks::InboundAction> {
        let frame = inbound::Frame::from(frame);
        let set = self.current();
        for plugin in set.chain(Hook::Inbound) {
            match plugin.call_inbound(&frame).await {
                Ok(inbound::Action::Ignore) | Err(_) => {}
                Ok(action) => return hooks::InboundAction::from_guest(action),
            }
        }
        None
    }
}

/// Hands the memory a load freed back to the system ([`compile::trim_heap`])
/// on a blocking thread, once the version it loaded serves: 10-40 ms of
/// `madvise` that a swap does not wait for.
fn trim_heap_later() {
    drop(tokio::task::spawn_blocking(compile::trim_heap));
}
