//! WebAssembly plugins: the hooks a node runs (auth, filter, events, inbound),
//! loaded from `--plugins DIR` and swapped at run time without dropping a
//! connection.
//!
//! # Layout
//! - [`bindings`] — only `bindgen!`, from `plugin-sdk/wit/`.
//! - [`runtime`] — engine, linker, compiling, warm instances, deadlines, limits.
//! - [`host_api`] — the `host` interface plugins import.
//! - [`manifest`] — `NAME.toml`.
//! - [`watcher`] — hot reload on file changes.
//!
//! The loaded set is an immutable snapshot behind an `RwLock<Arc<_>>`: a call
//! clones the `Arc` and runs on that version to the end, while a reload builds
//! a new snapshot and swaps it in. A version whose new file fails to load keeps
//! running, and the failure is reported.

pub mod bindings;
pub mod host_api;
pub mod manifest;
pub mod runtime;
pub mod watcher;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::{Duration, UNIX_EPOCH};

use imhost_client::wire::TokenValue;
use serde::Serialize;
use tokio::sync::mpsc;
use tracing::{info, warn};

use self::bindings::exports::imhost::plugin::{auth, events, filter, inbound};
use self::host_api::HostCtx;
use self::manifest::{Hook, Manifest, OnError};
use self::runtime::{Compiled, LoadError, Prepared};
use crate::cluster::kv::PluginKv;
use crate::node::WeakNode;
use crate::stats::Stats;

/// Compiled artifacts are kept in `DIR/.cache`, by content and engine hash.
pub const CACHE_DIR: &str = ".cache";

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
}

/// What the auth chain decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthOutcome {
    Allow(TokenValue),
    Deny(String),
    /// No plugin decided: use the built-in token store.
    Pass,
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

/// A file that failed to load.
#[derive(Debug, Clone, Serialize)]
pub struct LoadFailure {
    pub error: String,
    pub at_ms: u64,
}

/// One row of `GET /api/v1/plugins` and of `imhost plugin check`.
#[derive(Debug, Clone, Serialize)]
pub struct PluginInfo {
    pub name: String,
    /// `active`, `switched_off` (circuit open) or `failed` (no version runs).
    pub state: &'static str,
    pub hooks: Vec<Hook>,
    pub exported: Vec<Hook>,
    pub abi: String,
    pub hash: String,
    pub order: i32,
    pub loaded_at_ms: u64,
    pub calls: u64,
    pub errors: u64,
    pub timeouts: u64,
    pub memory_limits: u64,
    pub traps: u64,
    pub time_spent_us: u64,
    /// The last failed load of this name (the running version, if any, is older).
    pub last_error: Option<String>,
}

fn unix_ms(t: std::time::SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl PluginInfo {
    fn of(p: &Prepared, failure: Option<&LoadFailure>) -> PluginInfo {
        let stats = p.stats.lock().unwrap_or_else(|e| e.into_inner());
        let open = stats
            .open_until
            .is_some_and(|until| std::time::Instant::now() < until);
        PluginInfo {
            name: p.name.clone(),
            state: if open { "switched_off" } else { "active" },
            hooks: p.hooks.clone(),
            exported: p.compiled.exported.clone(),
            abi: p.compiled.abi.clone(),
            hash: p.hash.clone(),
            order: p.manifest.order,
            loaded_at_ms: unix_ms(p.loaded_at),
            calls: stats.calls,
            errors: stats.errors,
            timeouts: stats.timeouts,
            memory_limits: stats.memory_limits,
            traps: stats.traps,
            time_spent_us: stats.busy_ns / 1000,
            last_error: failure.map(|f| f.error.clone()),
        }
    }
}

/// A node's plugins.
pub struct PluginHost {
    dir: Option<PathBuf>,
    set: RwLock<Arc<PluginSet>>,
    failures: Mutex<BTreeMap<String, LoadFailure>>,
    /// Compiled components by content hash: re-adding a known file is instant.
    compiled: Mutex<HashMap<String, Compiled>>,
    /// One reload at a time; the ones that arrive meanwhile wait their turn.
    reloading: tokio::sync::Mutex<()>,
    kv: Arc<dyn PluginKv>,
    node: Arc<OnceLock<WeakNode>>,
    events: mpsc::Sender<events::PresenceEvent>,
    events_rx: Mutex<Option<mpsc::Receiver<events::PresenceEvent>>>,
    stats: Arc<Stats>,
}

/// A plugin name is its file stem: letters, digits, `-` and `_`, so it can
/// namespace keys and log fields safely.
fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

impl PluginHost {
    pub fn new(dir: Option<PathBuf>, kv: Arc<dyn PluginKv>, stats: Arc<Stats>) -> PluginHost {
        let (events, events_rx) = mpsc::channel(EVENTS_QUEUE);
        PluginHost {
            dir,
            set: RwLock::default(),
            failures: Mutex::default(),
            compiled: Mutex::default(),
            reloading: tokio::sync::Mutex::new(()),
            kv,
            node: Arc::default(),
            events,
            events_rx: Mutex::new(Some(events_rx)),
            stats,
        }
    }

    pub fn dir(&self) -> Option<&Path> {
        self.dir.as_deref()
    }

    /// Gives host calls their way to the node.
    pub fn attach(&self, node: WeakNode) {
        let _ = self.node.set(node);
    }

    /// The current snapshot.
    pub fn current(&self) -> Arc<PluginSet> {
        self.set.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Rescans the directory: loads new and changed files, unloads deleted or
    /// disabled ones, keeps the running version of any file that fails.
    /// Returns the failures of this pass.
    pub async fn reload(&self) -> BTreeMap<String, String> {
        let _one_at_a_time = self.reloading.lock().await;
        let mut failed = BTreeMap::new();
        let Some(dir) = self.dir.clone() else {
            return failed;
        };
        let names = match scan(&dir).await {
            Ok(names) => names,
            Err(err) => {
                warn!(dir = %dir.display(), cause = %err, "cannot read the plugin directory");
                failed.insert(String::new(), err.to_string());
                return failed;
            }
        };
        let old = self.current();
        // Failures of files that are gone are no longer news.
        self.failures
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|name, _| names.contains(name));
        let mut next = Vec::new();
        for name in names {
            match self.load_one(&dir, &name, &old).await {
                Ok(Some(plugin)) => {
                    self.failures
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .remove(&name);
                    next.push(plugin);
                }
                Ok(None) => {
                    self.failures
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .remove(&name);
                }
                Err(err) => {
                    warn!(plugin = %name, cause = %err, "plugin not loaded; any running version stays");
                    if let Some(running) = old.plugins.iter().find(|p| p.name == name) {
                        next.push(running.clone());
                    }
                    self.failures
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert(
                            name.clone(),
                            LoadFailure {
                                error: err.to_string(),
                                at_ms: unix_ms(std::time::SystemTime::now()),
                            },
                        );
                    failed.insert(name, err.to_string());
                }
            }
        }
        next.sort_by(|a, b| (a.manifest.order, &a.name).cmp(&(b.manifest.order, &b.name)));
        for plugin in &next {
            if !old.plugins.iter().any(|p| Arc::ptr_eq(p, plugin)) {
                info!(plugin = %plugin.name, hash = %&plugin.hash[..12], hooks = ?plugin.hooks, "plugin loaded");
            }
        }
        for plugin in &old.plugins {
            if !next.iter().any(|p| p.name == plugin.name) {
                info!(plugin = %plugin.name, "plugin unloaded");
            }
        }
        *self.set.write().unwrap_or_else(|p| p.into_inner()) =
            Arc::new(PluginSet { plugins: next });
        failed
    }

    /// Loads `name`, reusing the running version when nothing changed.
    async fn load_one(
        &self,
        dir: &Path,
        name: &str,
        old: &PluginSet,
    ) -> Result<Option<Arc<Prepared>>, LoadError> {
        let wasm = tokio::fs::read(dir.join(format!("{name}.wasm")))
            .await
            .map_err(|e| LoadError::Invalid(format!("cannot read: {e}")))?;
        let manifest_text = match tokio::fs::read_to_string(dir.join(format!("{name}.toml"))).await
        {
            Ok(text) => text,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(err) => return Err(LoadError::Manifest(err.to_string())),
        };
        let manifest = Manifest::parse(&manifest_text).map_err(LoadError::Manifest)?;
        if !manifest.enabled {
            return Ok(None);
        }
        let hash = runtime::content_hash(&wasm);
        let version = format!("{hash}:{}", runtime::content_hash(manifest_text.as_bytes()));
        if let Some(running) = old
            .plugins
            .iter()
            .find(|p| p.name == name && p.source_version() == version)
        {
            return Ok(Some(running.clone()));
        }
        let cached = self
            .compiled
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&hash)
            .cloned();
        let compiled = match cached {
            Some(compiled) => compiled,
            None => {
                let cache_dir = dir.join(CACHE_DIR);
                let key = hash.clone();
                let compiled = tokio::task::spawn_blocking(move || {
                    runtime::compile_cached(&wasm, &key, Some(&cache_dir))
                })
                .await
                .map_err(|e| LoadError::Invalid(format!("compiler task failed: {e}")))??;
                self.compiled
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(hash.clone(), compiled.clone());
                compiled
            }
        };
        let host = Arc::new(HostCtx {
            name: name.to_owned(),
            settings_json: manifest.settings_json(),
            kv: self.kv.clone(),
            node: self.node.clone(),
            timeout: manifest.timeout(),
        });
        Ok(Some(Arc::new(Prepared::new(
            name.to_owned(),
            hash,
            manifest,
            compiled,
            host,
            version,
        ))))
    }

    /// Every plugin, running or failed.
    pub fn list(&self) -> Vec<PluginInfo> {
        let failures = self
            .failures
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let set = self.current();
        let mut rows: Vec<PluginInfo> = set
            .plugins
            .iter()
            .map(|p| PluginInfo::of(p, failures.get(&p.name)))
            .collect();
        for (name, failure) in &failures {
            if !set.plugins.iter().any(|p| &p.name == name) {
                rows.push(PluginInfo {
                    name: name.clone(),
                    state: "failed",
                    hooks: Vec::new(),
                    exported: Vec::new(),
                    abi: String::new(),
                    hash: String::new(),
                    order: 0,
                    loaded_at_ms: 0,
                    calls: 0,
                    errors: 0,
                    timeouts: 0,
                    memory_limits: 0,
                    traps: 0,
                    time_spent_us: 0,
                    last_error: Some(failure.error.clone()),
                });
            }
        }
        rows
    }

    /// Runs the auth chain. Auth fails closed: a plugin that errs denies.
    pub async fn authenticate(&self, request: &auth::ConnectRequest) -> AuthOutcome {
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
                Err(err) => {
                    return AuthOutcome::Deny(format!("auth plugin {} failed: {err}", plugin.name));
                }
            }
        }
        AuthOutcome::Pass
    }

    /// Runs the filter chain; each filter sees what the previous one left.
    pub async fn filter(&self, message: filter::Message) -> FilterOutcome {
        let set = self.current();
        let mut message = message;
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
    pub fn presence(&self, event: events::PresenceEvent) {
        if !self.current().has(Hook::Events) {
            return;
        }
        if self.events.try_send(event).is_err() {
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
    pub async fn inbound(&self, frame: &inbound::Frame) -> Option<inbound::Action> {
        let set = self.current();
        for plugin in set.chain(Hook::Inbound) {
            match plugin.call_inbound(frame).await {
                Ok(inbound::Action::Ignore) | Err(_) => {}
                Ok(action) => return Some(action),
            }
        }
        None
    }
}

async fn scan(dir: &Path) -> std::io::Result<Vec<String>> {
    let mut names = Vec::new();
    let mut entries = tokio::fs::read_dir(dir).await?;
    while let Some(entry) = entries.next_entry().await? {
        let path = entry.path();
        if path.extension().is_some_and(|e| e == "wasm")
            && let Some(stem) = path.file_stem().and_then(|s| s.to_str())
        {
            if valid_name(stem) {
                names.push(stem.to_owned());
            } else {
                warn!(file = %path.display(), "ignored: plugin names are letters, digits, - and _");
            }
        }
    }
    names.sort();
    Ok(names)
}

/// `imhost plugin check FILE.wasm`: what the host would make of a file.
///
/// # Errors
/// Why the file cannot be a plugin.
pub fn check_file(path: &Path) -> Result<PluginInfo, LoadError> {
    let bytes = std::fs::read(path).map_err(|e| LoadError::Invalid(format!("cannot read: {e}")))?;
    let manifest_path = path.with_extension("toml");
    let manifest = match std::fs::read_to_string(&manifest_path) {
        Ok(text) => Manifest::parse(&text).map_err(LoadError::Manifest)?,
        Err(_) => Manifest::default(),
    };
    let compiled = runtime::compile(&bytes)?;
    let name = path
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or("plugin")
        .to_owned();
    let host = Arc::new(HostCtx {
        name: name.clone(),
        settings_json: manifest.settings_json(),
        kv: Arc::new(crate::cluster::kv::EmbeddedKv::default()),
        node: Arc::default(),
        timeout: Duration::from_millis(manifest.timeout_ms),
    });
    let hash = runtime::content_hash(&bytes);
    let prepared = Prepared::new(name, hash, manifest, compiled, host, String::new());
    Ok(PluginInfo::of(&prepared, None))
}
