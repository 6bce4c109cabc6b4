//! What a node says about its plugins: a row of `GET /api/v1/plugins` and of
//! `imhost plugin check` per plugin (its state, hooks, tier, counters, what
//! was withheld, the last failure), and the failures of files that did not
//! load.

use std::time::UNIX_EPOCH;

use serde::Serialize;

use super::engine::Tier;
use super::loaded::Prepared;
use super::manifest::Hook;

/// A file that failed to load.
#[derive(Debug, Clone, Serialize)]
pub struct LoadFailure {
    pub error: String,
    pub at_ms: u64,
}

/// `compiling` details in a row of `GET /api/v1/plugins`.
#[derive(Debug, Clone, Serialize)]
pub struct CompilingInfo {
    /// The tier being compiled.
    pub tier: Tier,
    pub elapsed_ms: u64,
}

/// One row of `GET /api/v1/plugins` and of `imhost plugin check`.
#[derive(Debug, Clone, Serialize)]
pub struct PluginInfo {
    pub name: String,
    /// `active`, `switched_off` (circuit open), `compiling` (no version runs
    /// yet), `failed` (no version runs), or `valid` (`plugin check`).
    pub state: &'static str,
    pub hooks: Vec<Hook>,
    pub exported: Vec<Hook>,
    pub abi: String,
    pub hash: String,
    /// The compiler tier of the running version.
    pub tier: Option<Tier>,
    /// Set while a version (the first, or the optimized one) is compiling.
    pub compiling: Option<CompilingInfo>,
    pub order: i32,
    pub loaded_at_ms: u64,
    /// Milliseconds from the rescan reading the running version's file to
    /// its first build serving (a swap's wait, less the watcher's quiet).
    pub served_after_ms: Option<u64>,
    pub calls: u64,
    pub errors: u64,
    pub timeouts: u64,
    pub memory_limits: u64,
    pub traps: u64,
    /// Calls that found no free instance within their deadline (the node
    /// was busy; not failures of the plugin, not counted by the breaker).
    pub overloaded: u64,
    pub time_spent_us: u64,
    /// Calls per latency bucket (`loaded::LATENCY_BUCKETS_US`, then the rest);
    /// served by `/metrics`, not by the plugins API.
    #[serde(skip)]
    pub latency: Vec<u64>,
    /// The last failed load of this name (the running version, if any, is older).
    pub last_error: Option<String>,
    /// What the manifest asks for and the operator has not granted.
    pub withheld: Vec<String>,
    /// The slots of its engine's pool the running version reserved (`pool`
    /// × one instance's needs).
    pub reserved: Option<super::share::Needs>,
}

pub(super) fn unix_ms(t: std::time::SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl PluginInfo {
    pub(super) fn of(p: &Prepared, failure: Option<&LoadFailure>) -> PluginInfo {
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
            tier: Some(p.tier()),
            compiling: None,
            order: p.manifest.order,
            loaded_at_ms: unix_ms(p.loaded_at),
            served_after_ms: p.served_after.map(|d| d.as_millis() as u64),
            calls: stats.calls,
            errors: stats.errors,
            timeouts: stats.timeouts,
            memory_limits: stats.memory_limits,
            traps: stats.traps,
            overloaded: stats.overloaded,
            time_spent_us: stats.busy_ns / 1000,
            latency: stats.latency.to_vec(),
            last_error: failure.map(|f| f.error.clone()),
            withheld: p.grants.withheld.clone(),
            reserved: Some(p.share.needs),
        }
    }

    pub(super) fn without_version(name: &str, state: &'static str, hooks: Vec<Hook>) -> PluginInfo {
        PluginInfo {
            name: name.to_owned(),
            state,
            hooks,
            exported: Vec::new(),
            abi: String::new(),
            hash: String::new(),
            tier: None,
            compiling: None,
            order: 0,
            loaded_at_ms: 0,
            served_after_ms: None,
            calls: 0,
            errors: 0,
            timeouts: 0,
            memory_limits: 0,
            traps: 0,
            overloaded: 0,
            time_spent_us: 0,
            latency: Vec::new(),
            last_error: None,
            withheld: Vec::new(),
            reserved: None,
        }
    }
}
