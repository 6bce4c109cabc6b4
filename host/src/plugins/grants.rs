//! What a plugin may touch, decided by the operator: the manifest beside a
//! plugin (`[grants]` in `NAME.toml`, which ships with the plugin) only asks;
//! the node's grants file (`plugin_grants`, outside the plugin directory)
//! decides. A plugin gets what it asks for and is granted, nothing else, and
//! what it asks for and is not granted is reported (`GET /api/v1/plugins`,
//! `imhost plugin check`) and logged.
//!
//! The grants file is TOML, one table per plugin name, `"*"` for every
//! plugin:
//!
//! ```toml
//! ["*"]
//! actions = ["kv"]
//!
//! [welcome]
//! actions = ["send"]
//!
//! [jwt-auth]
//! env = ["JWT_SECRET"]                      # variables of the node's environment
//! secret_files = { JWT_KEY = "/etc/imhost/jwt.key" }   # a file's contents as a variable
//! dirs = ["/etc/imhost/data"]               # read-only, mounted at the same path
//! key_sets = ["https://login.example.com/.well-known/jwks.json"]  # JWKS URLs, whole
//! http = ["https://introspect.example.com"] # origins http-fetch may reach
//! private_networks = ["10.0.0.0/8"]         # internal ranges listed names may resolve to
//! http_timeout_ms = 2000                    # the longest a request may take (at most 10 s)
//! http_max_response_bytes = 1048576         # bigger responses are cut (at most 16 MiB)
//! http_concurrency = 16                     # requests in flight at once
//! network = false                           # raw sockets: see docs/security.md
//! ```
//!
//! Host actions are `send` (messages as any client), `channel` (channel
//! messages), `broadcast`, `force_offline` and `kv` (the plugin's own keys).
//! A manifest that lists `actions` asks for those only; one that does not
//! asks for whatever the operator grants. Environment variables, directories
//! and the network are asked for by name. Key sets and HTTP origins are the
//! operator's alone: a plugin reaches what is listed for it, whatever its
//! settings say (see [`super::egress`]). `IMHOST_*` variables and the
//! compiled-plugin cache are never given, granted or not. The file is read at
//! start and at every reload (`SIGHUP`, `POST /api/v1/plugins/reload`, a
//! change in the plugin directory); a plugin whose grants changed is loaded
//! again with its new grants.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::manifest::{Grants, is_protected_env};

/// Something a plugin can ask the node to do through the `host` interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// Send direct messages, as any client.
    Send,
    /// Send channel messages.
    Channel,
    /// Send to every client.
    Broadcast,
    /// Close every socket of a client.
    ForceOffline,
    /// Read and write the plugin's own keys.
    Kv,
}

impl Action {
    pub const ALL: [Action; 5] = [
        Action::Send,
        Action::Channel,
        Action::Broadcast,
        Action::ForceOffline,
        Action::Kv,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Action::Send => "send",
            Action::Channel => "channel",
            Action::Broadcast => "broadcast",
            Action::ForceOffline => "force_offline",
            Action::Kv => "kv",
        }
    }
}

/// What the operator grants one plugin (or every plugin, under `"*"`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OperatorGrant {
    #[serde(default)]
    pub env: Vec<String>,
    /// Variables whose value is a file's contents (read at each reload).
    #[serde(default)]
    pub secret_files: BTreeMap<String, PathBuf>,
    #[serde(default)]
    pub dirs: Vec<PathBuf>,
    #[serde(default)]
    pub network: bool,
    #[serde(default)]
    pub actions: Vec<Action>,
    /// JWKS URLs `key-set-key` may use.
    #[serde(default)]
    pub key_sets: Vec<String>,
    /// Origins `http-fetch` may reach.
    #[serde(default)]
    pub http: Vec<String>,
    /// Internal networks listed host names may resolve to.
    #[serde(default)]
    pub private_networks: Vec<ipnet::IpNet>,
    #[serde(default)]
    pub http_timeout_ms: Option<u64>,
    #[serde(default)]
    pub http_max_response_bytes: Option<usize>,
    #[serde(default)]
    pub http_concurrency: Option<usize>,
}

/// The operator's grants file, parsed.
#[derive(Debug, Clone, Default)]
pub struct GrantsFile {
    by_plugin: BTreeMap<String, OperatorGrant>,
}

impl GrantsFile {
    /// Reads the grants file at `path`.
    ///
    /// # Errors
    /// The file cannot be read, is not TOML, or has unknown keys or actions.
    pub fn load(path: &Path) -> Result<GrantsFile, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        Self::parse(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// Parses the text of a grants file.
    ///
    /// # Errors
    /// Not TOML, or unknown keys or actions.
    pub fn parse(text: &str) -> Result<GrantsFile, String> {
        let by_plugin: BTreeMap<String, OperatorGrant> =
            toml::from_str(text).map_err(|e| e.to_string())?;
        for (name, grant) in &by_plugin {
            super::egress::validate(&grant.http, &grant.key_sets)
                .map_err(|e| format!("[{name}]: {e}"))?;
        }
        Ok(GrantsFile { by_plugin })
    }

    /// What plugin `name` is granted: its own table and `"*"` together.
    pub fn for_plugin(&self, name: &str) -> OperatorGrant {
        let mut grant = OperatorGrant::default();
        for table in [self.by_plugin.get("*"), self.by_plugin.get(name)]
            .into_iter()
            .flatten()
        {
            grant.env.extend(table.env.iter().cloned());
            grant.secret_files.extend(
                table
                    .secret_files
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone())),
            );
            grant.dirs.extend(table.dirs.iter().cloned());
            grant.network |= table.network;
            grant.actions.extend(table.actions.iter().copied());
            grant.key_sets.extend(table.key_sets.iter().cloned());
            grant.http.extend(table.http.iter().cloned());
            grant
                .private_networks
                .extend(table.private_networks.iter().copied());
            // The plugin's own table overrides `"*"` for the limits.
            grant.http_timeout_ms = table.http_timeout_ms.or(grant.http_timeout_ms);
            grant.http_max_response_bytes = table
                .http_max_response_bytes
                .or(grant.http_max_response_bytes);
            grant.http_concurrency = table.http_concurrency.or(grant.http_concurrency);
        }
        grant
    }
}

/// What one plugin version runs with: its requests that were granted.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Effective {
    /// Variables and their values, read when the version was loaded.
    pub env: Vec<(String, String)>,
    pub dirs: Vec<PathBuf>,
    pub network: bool,
    pub actions: BTreeSet<Action>,
    /// Key sets and HTTP origins, and their limits: the operator's alone.
    pub egress: super::egress::EgressGrant,
    /// What was asked for and not granted, one line each.
    pub withheld: Vec<String>,
}

impl Effective {
    pub fn allows(&self, action: Action) -> bool {
        self.actions.contains(&action)
    }

    /// A digest of what was granted, so that a change of grants loads the
    /// plugin again.
    pub fn fingerprint(&self) -> String {
        use std::hash::{Hash, Hasher};
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        self.hash(&mut hasher);
        format!("{:016x}", hasher.finish())
    }
}

/// Decides what a plugin that asks for `requested` runs with under
/// `granted`; `protected` are the directories never given (the cache).
pub fn decide(requested: &Grants, granted: &OperatorGrant, protected: &[PathBuf]) -> Effective {
    let mut effective = Effective::default();
    for var in &requested.env {
        if is_protected_env(var) {
            effective
                .withheld
                .push(format!("environment variable `{var}` (never granted)"));
        } else if let Some(file) = granted.secret_files.get(var) {
            match std::fs::read_to_string(file) {
                Ok(value) => effective
                    .env
                    .push((var.clone(), value.trim_end_matches(['\r', '\n']).to_owned())),
                Err(err) => effective.withheld.push(format!(
                    "environment variable `{var}` (its secret file {}: {err})",
                    file.display()
                )),
            }
        } else if granted.env.contains(var) {
            if let Ok(value) = std::env::var(var) {
                effective.env.push((var.clone(), value));
            }
        } else {
            effective
                .withheld
                .push(format!("environment variable `{var}`"));
        }
    }
    // The directories alone: variables were decided above.
    let mut dirs = Grants {
        dirs: requested.dirs.clone(),
        ..Grants::default()
    };
    for line in dirs.withhold_protected(protected) {
        effective.withheld.push(format!("{line} (never granted)"));
    }
    let granted_dirs: Vec<PathBuf> = granted.dirs.iter().map(|d| resolved(d)).collect();
    for dir in dirs.dirs {
        if granted_dirs.iter().any(|g| resolved(&dir).starts_with(g)) {
            effective.dirs.push(dir);
        } else {
            effective
                .withheld
                .push(format!("directory `{}`", dir.display()));
        }
    }
    if requested.network {
        if granted.network {
            effective.network = true;
        } else {
            effective.withheld.push("network".into());
        }
    }
    effective.egress = super::egress::EgressGrant {
        http: granted.http.clone(),
        key_sets: granted.key_sets.clone(),
        private_networks: granted.private_networks.clone(),
        timeout: granted
            .http_timeout_ms
            .map(std::time::Duration::from_millis),
        max_response_bytes: granted.http_max_response_bytes,
        concurrency: granted.http_concurrency,
    };
    let asked: BTreeSet<Action> = match &requested.actions {
        Some(list) => list.iter().copied().collect(),
        None => Action::ALL.into_iter().collect(),
    };
    for action in asked {
        if granted.actions.contains(&action) {
            effective.actions.insert(action);
        } else if requested.actions.is_some() {
            effective
                .withheld
                .push(format!("action `{}`", action.name()));
        }
    }
    effective
}

fn resolved(path: &Path) -> PathBuf {
    std::fs::canonicalize(path)
        .unwrap_or_else(|_| std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grants(text: &str) -> GrantsFile {
        GrantsFile::parse(text).expect("grants")
    }

    fn asks(env: &[&str], actions: Option<&[Action]>) -> Grants {
        Grants {
            env: env.iter().map(|s| s.to_string()).collect(),
            dirs: Vec::new(),
            network: false,
            actions: actions.map(<[Action]>::to_vec),
        }
    }

    #[test]
    fn a_plugin_gets_what_it_asks_for_and_is_granted_and_no_more() {
        let file = grants(
            "[\"*\"]\nactions = [\"kv\"]\n[welcome]\nactions = [\"send\"]\nenv = [\"HOME\"]\n",
        );
        let welcome = file.for_plugin("welcome");
        let got = decide(
            &asks(
                &["HOME", "IMHOST_API_KEY", "USER"],
                Some(&[Action::Send, Action::ForceOffline]),
            ),
            &welcome,
            &[],
        );
        assert_eq!(got.actions, [Action::Send].into_iter().collect());
        assert_eq!(
            got.env.iter().map(|(k, _)| k.as_str()).collect::<Vec<_>>(),
            ["HOME"]
        );
        assert_eq!(
            got.withheld,
            [
                "environment variable `IMHOST_API_KEY` (never granted)",
                "environment variable `USER`",
                "action `force_offline`",
            ]
        );
        // A manifest that lists no actions gets whatever the operator grants.
        let other = decide(&asks(&[], None), &file.for_plugin("other"), &[]);
        assert_eq!(other.actions, [Action::Kv].into_iter().collect());
        assert!(other.withheld.is_empty());
        // Nothing granted: nothing.
        let none = decide(
            &asks(&[], None),
            &GrantsFile::default().for_plugin("x"),
            &[],
        );
        assert!(none.actions.is_empty());
    }

    #[test]
    fn a_secret_file_becomes_a_variable_and_a_change_is_seen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let secret = dir.path().join("jwt.secret");
        std::fs::write(&secret, "s3cret\n").expect("write");
        let file = grants(&format!(
            "[jwt-auth]\nsecret_files = {{ JWT_SECRET = {:?} }}\n",
            secret.display().to_string()
        ));
        let got = decide(
            &asks(&["JWT_SECRET"], Some(&[])),
            &file.for_plugin("jwt-auth"),
            &[],
        );
        assert_eq!(got.env, [("JWT_SECRET".to_string(), "s3cret".to_string())]);
        std::fs::write(&secret, "rotated").expect("write");
        let again = decide(
            &asks(&["JWT_SECRET"], Some(&[])),
            &file.for_plugin("jwt-auth"),
            &[],
        );
        assert_ne!(
            got.fingerprint(),
            again.fingerprint(),
            "a new secret reloads"
        );
    }

    #[test]
    fn unknown_actions_and_keys_are_errors() {
        assert!(GrantsFile::parse("[a]\nactions = [\"launch\"]\n").is_err());
        assert!(GrantsFile::parse("[a]\nenvs = []\n").is_err());
    }
}
