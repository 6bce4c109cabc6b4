//! `NAME.toml` beside `NAME.wasm`: a plugin's place in the chain, its hooks,
//! limits, grants and settings. Every key is optional; unknown keys are errors.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

/// The hooks a plugin may export.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Deserialize, serde::Serialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Hook {
    Auth,
    Filter,
    Events,
    Inbound,
}

impl Hook {
    pub const ALL: [Hook; 4] = [Hook::Auth, Hook::Filter, Hook::Events, Hook::Inbound];

    /// The WIT interface name, without version.
    pub fn interface(self) -> &'static str {
        match self {
            Hook::Auth => "auth",
            Hook::Filter => "filter",
            Hook::Events => "events",
            Hook::Inbound => "inbound",
        }
    }
}

/// What a failing filter does to the message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnError {
    /// Fail open: deliver as if the filter said `deliver`.
    #[default]
    Deliver,
    /// Fail closed: drop the message.
    Drop,
}

/// What connects do while an auth plugin has no running version yet (it is
/// compiling at start-up).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WhileLoading {
    /// `/ws` answers 503 with `Retry-After`: nobody gets in unchecked.
    #[default]
    Refuse,
    /// Connects go on through the rest of the chain and the built-in tokens.
    Admit,
}

/// What a plugin asks for (`[grants]` in its manifest): the operator's
/// grants file decides what it gets (see [`super::grants`]).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Grants {
    /// Environment variables the plugin may read (their host values).
    #[serde(default)]
    pub env: Vec<String>,
    /// Host directories the plugin may read, mounted at the same path.
    #[serde(default)]
    pub dirs: Vec<PathBuf>,
    /// Outbound network access (TCP/UDP, name lookup).
    #[serde(default)]
    pub network: bool,
    /// Host actions asked for (`send`, `channel`, `broadcast`,
    /// `force_offline`, `kv`); absent: whatever the operator grants.
    #[serde(default)]
    pub actions: Option<Vec<super::grants::Action>>,
}

/// Environment variables no plugin is ever given: the node's own settings
/// (`IMHOST_API_KEY`, `IMHOST_REDIS` with its password, ...).
const PROTECTED_ENV_PREFIX: &str = "IMHOST_";

impl Grants {
    /// Takes out what no manifest can be granted, whatever it asks: the
    /// node's own `IMHOST_*` variables, and any directory that is, holds or
    /// lies inside one of `protected` (the compiled-plugin cache and its
    /// key). Returns what was withheld, one line each, for the log.
    pub fn withhold_protected(&mut self, protected: &[PathBuf]) -> Vec<String> {
        let mut withheld = Vec::new();
        self.env.retain(|var| {
            let allowed = !is_protected_env(var);
            if !allowed {
                withheld.push(format!("environment variable `{var}`"));
            }
            allowed
        });
        let protected: Vec<PathBuf> = protected.iter().map(|p| resolved(p)).collect();
        self.dirs.retain(|dir| {
            let dir_resolved = resolved(dir);
            let overlaps = protected
                .iter()
                .any(|p| dir_resolved.starts_with(p) || p.starts_with(&dir_resolved));
            if overlaps {
                withheld.push(format!("directory `{}`", dir.display()));
            }
            !overlaps
        });
        withheld
    }
}

/// Whether `var` names one of the node's own variables.
pub fn is_protected_env(var: &str) -> bool {
    var.len() >= PROTECTED_ENV_PREFIX.len()
        && var.as_bytes()[..PROTECTED_ENV_PREFIX.len()]
            .eq_ignore_ascii_case(PROTECTED_ENV_PREFIX.as_bytes())
}

/// `path` with links and `..` resolved where it exists, as given otherwise
/// (then made absolute against the working directory).
fn resolved(path: &std::path::Path) -> PathBuf {
    std::fs::canonicalize(path)
        .unwrap_or_else(|_| std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf()))
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Position in each chain: lower runs first; ties go by name.
    #[serde(default = "defaults::order")]
    pub order: i32,
    /// False: the file is ignored.
    #[serde(default = "defaults::yes")]
    pub enabled: bool,
    /// Hooks to wire; default: every hook the component exports.
    #[serde(default)]
    pub hooks: Option<Vec<Hook>>,
    /// Deadline of one call, in milliseconds.
    #[serde(default = "defaults::timeout_ms")]
    pub timeout_ms: u64,
    /// Linear memory an instance may grow to, in MiB.
    #[serde(default = "defaults::memory_mb")]
    pub memory_mb: u64,
    /// Warm instances kept for reuse.
    #[serde(default = "defaults::pool")]
    pub pool: usize,
    /// Filter only: what a failed call does to the message.
    #[serde(default)]
    pub on_error: OnError,
    /// Consecutive failures that switch the plugin off for `cooldown_ms`.
    #[serde(default = "defaults::failure_threshold")]
    pub failure_threshold: u32,
    #[serde(default = "defaults::cooldown_ms")]
    pub cooldown_ms: u64,
    #[serde(default)]
    pub grants: Grants,
    /// Auth only: connects while this plugin is still compiling.
    #[serde(default)]
    pub while_loading: WhileLoading,
    /// Free-form; the plugin reads it as JSON through `host.config()`.
    #[serde(default)]
    pub settings: toml::Table,
}

mod defaults {
    pub fn order() -> i32 {
        100
    }
    pub fn yes() -> bool {
        true
    }
    pub fn timeout_ms() -> u64 {
        100
    }
    pub fn memory_mb() -> u64 {
        64
    }
    pub fn pool() -> usize {
        4
    }
    pub fn failure_threshold() -> u32 {
        5
    }
    pub fn cooldown_ms() -> u64 {
        30_000
    }
}

impl Default for Manifest {
    fn default() -> Self {
        toml::from_str("").unwrap_or_else(|_| unreachable!("empty manifest parses"))
    }
}

impl Manifest {
    /// Parses `NAME.toml`.
    ///
    /// # Errors
    /// The text is not TOML, has unknown keys or out-of-range values.
    pub fn parse(text: &str) -> Result<Manifest, String> {
        let manifest: Manifest = toml::from_str(text).map_err(|e| e.to_string())?;
        if !(1..=60_000).contains(&manifest.timeout_ms) {
            return Err("`timeout_ms` must be between 1 and 60000".into());
        }
        // The pooling allocator's slots are 1 GiB: nothing can grow past that.
        if !(1..=1024).contains(&manifest.memory_mb) {
            return Err("`memory_mb` must be between 1 and 1024".into());
        }
        if manifest.pool > 256 {
            return Err("`pool` must be at most 256".into());
        }
        Ok(manifest)
    }

    pub fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms)
    }

    pub fn memory_bytes(&self) -> usize {
        usize::try_from(self.memory_mb * 1024 * 1024).unwrap_or(usize::MAX)
    }

    /// The settings as JSON text.
    pub fn settings_json(&self) -> String {
        serde_json::to_string(&self.settings).unwrap_or_else(|_| "{}".into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_nodes_own_variables_and_the_cache_are_withheld() {
        let cache = tempfile::tempdir().expect("tempdir");
        let inside = cache.path().join("artifacts");
        let mut grants = Grants {
            env: vec![
                "IMHOST_API_KEY".into(),
                "imhost_redis".into(),
                "HOME".into(),
            ],
            dirs: vec![
                cache.path().to_path_buf(),
                inside,
                cache.path().parent().expect("parent").to_path_buf(),
                "/usr/share".into(),
            ],
            network: false,
            actions: None,
        };
        let withheld = grants.withhold_protected(&[cache.path().to_path_buf()]);
        assert_eq!(grants.env, vec!["HOME".to_string()]);
        assert_eq!(grants.dirs, vec![PathBuf::from("/usr/share")]);
        assert_eq!(withheld.len(), 5, "{withheld:?}");
    }
}
