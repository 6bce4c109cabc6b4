//! Loading: a rescan of the plugin directory, and the life of each new
//! version from its file to serving (baseline build, install, optimized
//! build, install again), with the failures recorded on the way.
//!
//! A rescan reads only what changed (`Hashed`), starts the builds of new
//! files before it reads files that were too fresh to trust, and unloads
//! what is gone. A load holds the optimized builds stopped until its version
//! serves (`preempt`), and hands the memory it freed back only after.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use tracing::{info, warn};

use super::compile::{self, LoadError};
use super::engine::Tier;
use super::loaded::Prepared;
use super::source::{Source, read_source, scan, unchanged_version};
use super::{LoadFailure, Loading, PluginHost, PluginSet, grants, preempt, report};

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
        let mut prepared = source.build(compiled, &self.services).await?;
        // Swapped in the next moment: the first build's wait ends here.
        let served_after = *source.first_served.get_or_init(|| source.read_at.elapsed());
        prepared.served_after = Some(served_after);
        let prepared = Arc::new(prepared);
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
        info!(
            plugin = %source.name,
            hash = %&source.hash[..12],
            tier = tier.as_str(),
            served_after_ms = served_after.as_millis() as u64,
            "plugin loaded"
        );
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
}

/// Hands the memory a load freed back to the system ([`compile::trim_heap`])
/// on a blocking thread, once the version it loaded serves: 10-40 ms of
/// `madvise` that a swap does not wait for.
fn trim_heap_later() {
    drop(tokio::task::spawn_blocking(compile::trim_heap));
}
