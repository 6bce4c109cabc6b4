//! The files of the plugin directory: which names the server loads
//! (`NAME.wasm` beside an optional `NAME.toml`), reading a file and its
//! manifest as one [`Source`] with the grants the operator gives it, and
//! building a version from it, the one way a load and `imhost plugin check`
//! both do.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tracing::warn;

use super::compile::{self, Compiled, LoadError};
use super::grants;
use super::host_api::Services;
use super::loaded::Prepared;
use super::manifest::Manifest;
use super::share;

/// Everything one load of one file needs, owned, so it can move to a task.
pub(super) struct Source {
    pub name: String,
    pub wasm: Arc<[u8]>,
    pub hash: String,
    pub manifest: Manifest,
    /// What the operator granted of what the manifest asks.
    pub grants: Arc<grants::Effective>,
    /// What one instance creates, as its sections declare (see `share`).
    pub per_instance: share::Needs,
    /// Content hashes of the wasm and the manifest, and the grants' digest:
    /// unchanged means the running version is this one.
    pub version: String,
}

impl Source {
    /// Builds the version of this file from `compiled` and runs its start
    /// code once, as a load and `plugin check` both do: the same host
    /// context, sandbox and limits. `outbox`: how its host calls send (none
    /// for `plugin check`, where they are told there is no cluster).
    ///
    /// # Errors
    /// The start code trapped, ran out of time or memory.
    pub(super) async fn build(
        &self,
        compiled: Compiled,
        services: &Services,
    ) -> Result<Prepared, LoadError> {
        let per_instance = self.per_instance.at_least_required_by(&compiled.component);
        let share = share::reserve(compiled.tier, &self.name, per_instance, self.manifest.pool)
            .map_err(LoadError::Share)?;
        let host = Arc::new(services.host_ctx(
            &self.name,
            self.manifest.settings_json(),
            self.manifest.timeout(),
            self.grants.clone(),
        ));
        let prepared = Prepared::new(
            self.name.clone(),
            self.hash.clone(),
            self.manifest.clone(),
            compiled,
            host,
            self.version.clone(),
            share,
        );
        prepared
            .warm_up()
            .await
            .map_err(|e| LoadError::Start(e.to_string()))?;
        Ok(prepared)
    }
}

/// A plugin name is its file stem: letters, digits, `-` and `_`, so it can
/// namespace keys and log fields safely.
pub(super) fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// The plugin name of `path`, if the server would load it: `NAME.wasm`.
///
/// # Errors
/// Why the server would ignore the file.
pub fn plugin_name(path: &Path) -> Result<String, String> {
    if path.extension().is_none_or(|e| e != "wasm") {
        return Err("plugin files are named NAME.wasm".into());
    }
    match path.file_stem().and_then(|s| s.to_str()) {
        Some(stem) if valid_name(stem) => Ok(stem.to_owned()),
        _ => Err(
            "plugin names are 1 to 64 letters, digits, - and _ (no dots): the server ignores this file"
                .into(),
        ),
    }
}

pub(super) async fn scan(dir: &Path) -> std::io::Result<Vec<String>> {
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

/// Reads `NAME.wasm` and `NAME.toml` as a reload does; `None`: disabled.
/// Grants no manifest can have are withheld (see
/// [`manifest::Grants::withhold_protected`]); `protected` lists the
/// directories no plugin may read.
pub(super) async fn read_source(
    dir: &Path,
    name: &str,
    protected: &[PathBuf],
    operator: &grants::GrantsFile,
) -> Result<Option<Source>, LoadError> {
    let wasm = tokio::fs::read(dir.join(format!("{name}.wasm")))
        .await
        .map_err(|e| LoadError::Invalid(format!("cannot read: {e}")))?;
    let manifest_text = match tokio::fs::read_to_string(dir.join(format!("{name}.toml"))).await {
        Ok(text) => text,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(err) => return Err(LoadError::Manifest(err.to_string())),
    };
    let manifest = Manifest::parse(&manifest_text).map_err(LoadError::Manifest)?;
    if !manifest.enabled {
        return Ok(None);
    }
    let grants = grants::decide(&manifest.grants, &operator.for_plugin(name), protected);
    for line in &grants.withheld {
        warn!(plugin = name, withheld = %line, "the manifest asks for what the operator has not granted");
    }
    let per_instance = share::Needs::declared(&wasm).map_err(LoadError::Share)?;
    let hash = compile::content_hash(&wasm);
    // A change of grants is a new version: new instances, the new sandbox.
    let version = format!(
        "{hash}:{}:{}",
        compile::content_hash(manifest_text.as_bytes()),
        grants.fingerprint()
    );
    Ok(Some(Source {
        name: name.to_owned(),
        wasm: wasm.into(),
        hash,
        manifest,
        grants: Arc::new(grants),
        per_instance,
        version,
    }))
}
