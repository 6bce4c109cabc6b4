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
//! - `loader` — rescans, and each version's way from its file to serving.
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
mod loader;
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
use tracing::warn;

use self::bindings::exports::imhost::plugin::{auth, events, filter, inbound};
use self::compile::{ArtifactCache, Compiler};
use self::engine::Tier;
use self::loaded::{CallError, Prepared};
use self::manifest::{Hook, OnError, WhileLoading};
use self::source::Hashed;
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
