//! The files of the plugin directory: which names the server loads
//! (`NAME.wasm` beside an optional `NAME.toml`), reading a file and its
//! manifest as one [`Source`] with the grants the operator gives it, and
//! building a version from it, the one way a load and `imhost plugin check`
//! both do.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

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
    /// When the rescan began to read the file.
    pub read_at: Instant,
    /// From `read_at` to this version's first build serving: set by the
    /// first install, kept by the optimized one (see `Prepared::served_after`).
    pub first_served: OnceLock<Duration>,
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

/// A file's manifest and the grants it runs with, as read now.
struct Described {
    manifest_text: String,
    manifest: Manifest,
    grants: grants::Effective,
}

impl Described {
    /// Reads `NAME.toml` (none: the defaults) and decides the grants;
    /// `None`: the manifest disables the plugin.
    async fn read(
        dir: &Path,
        name: &str,
        protected: &[PathBuf],
        operator: &grants::GrantsFile,
    ) -> Result<Option<Described>, LoadError> {
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
        let grants = grants::decide(&manifest.grants, &operator.for_plugin(name), protected);
        Ok(Some(Described {
            manifest_text,
            manifest,
            grants,
        }))
    }

    /// The version of the file whose content hash is `hash` under this
    /// manifest and these grants. A change of grants is a new version: new
    /// instances, the new sandbox.
    fn version(&self, hash: &str) -> String {
        format!(
            "{hash}:{}:{}",
            compile::content_hash(self.manifest_text.as_bytes()),
            self.grants.fingerprint()
        )
    }
}

/// Reads `NAME.wasm` and `NAME.toml` as a reload does; `None`: disabled.
/// Grants no manifest can have are withheld (see
/// [`manifest::Grants::withhold_protected`]); `protected` lists the
/// directories no plugin may read. With `hashed`, the file's content hash
/// is remembered for [`unchanged_version`].
pub(super) async fn read_source(
    dir: &Path,
    name: &str,
    protected: &[PathBuf],
    operator: &grants::GrantsFile,
    hashed: Option<&Hashed>,
) -> Result<Option<Source>, LoadError> {
    let Some(described) = Described::read(dir, name, protected, operator).await? else {
        return Ok(None);
    };
    for line in &described.grants.withheld {
        warn!(plugin = name, withheld = %line, "the manifest asks for what the operator has not granted");
    }
    let path = dir.join(format!("{name}.wasm"));
    let read_at = Instant::now();
    let before = Fingerprint::of(&path).await;
    let wasm = tokio::fs::read(&path)
        .await
        .map_err(|e| LoadError::Invalid(format!("cannot read: {e}")))?;
    // Hashing and parsing 12-18 MB take tens of milliseconds: not on the
    // async workers, which serve sockets meanwhile.
    let (wasm, hash, per_instance) = tokio::task::spawn_blocking(move || {
        let per_instance = share::Needs::declared(&wasm);
        let hash = compile::content_hash(&wasm);
        (wasm, hash, per_instance)
    })
    .await
    .map_err(|e| LoadError::Invalid(format!("cannot read: {e}")))?;
    let per_instance = per_instance.map_err(LoadError::Share)?;
    if let (Some(hashed), Some(before)) = (hashed, before)
        && Fingerprint::of(&path).await == Some(before)
    {
        hashed.remember(name, before, &hash);
    }
    let version = described.version(&hash);
    let Described {
        manifest, grants, ..
    } = described;
    Ok(Some(Source {
        name: name.to_owned(),
        wasm: wasm.into(),
        hash,
        manifest,
        grants: Arc::new(grants),
        per_instance,
        version,
        read_at,
        first_served: OnceLock::new(),
    }))
}

/// The version `NAME.wasm` and `NAME.toml` make now, without reading the
/// wasm file, when it is the very file hashed before (see [`Hashed`]);
/// `None` when that is not known (or the manifest does not read): the
/// caller reads it with [`read_source`].
pub(super) async fn unchanged_version(
    dir: &Path,
    name: &str,
    protected: &[PathBuf],
    operator: &grants::GrantsFile,
    hashed: &Hashed,
) -> Option<String> {
    let described = Described::read(dir, name, protected, operator)
        .await
        .ok()??;
    let now = Fingerprint::of(&dir.join(format!("{name}.wasm"))).await?;
    let hash = hashed.hash_of(name, now)?;
    Some(described.version(&hash))
}

/// The content hashes of the plugin files a rescan read, each with the
/// file's identity, size and timestamps at the time, so that the next rescan
/// (every SIGHUP, every change in the directory) need not read and hash
/// every unchanged 12-18 MB file again: 60 ms with four such plugins, the
/// CPU of a swap's wait.
///
/// A file rewritten in place keeps its inode but changes its modification
/// and change times; a file renamed into place is another inode. Timestamps
/// are only as fine as the kernel's clock tick (or a network file system's
/// second), so, as git's index does for "racy" entries, a hash is trusted
/// only for a file whose timestamps were already [`SETTLED`] in the past
/// when it was read: a file written just before a rescan is read again by
/// the next one. Such a file is remembered as unverified
/// ([`Hashed::unverified`]): the rescan reads it after the files it has not
/// seen, so that a new plugin's build does not wait for files that were
/// only written shortly before.
pub(super) struct Hashed {
    /// Per plugin: the file's fingerprint when hashed, the hash, and whether
    /// its timestamps were settled then (the hash is trusted only if so).
    files: std::sync::Mutex<HashMap<String, (Fingerprint, String, bool)>>,
    /// [`SETTLED`], except in tests.
    settled: Duration,
}

/// How old a file's timestamps must be for its hash to be trusted later.
const SETTLED: Duration = Duration::from_secs(2);

impl Default for Hashed {
    fn default() -> Self {
        Hashed {
            files: std::sync::Mutex::default(),
            settled: SETTLED,
        }
    }
}

impl Hashed {
    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<String, (Fingerprint, String, bool)>> {
        self.files
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn remember(&self, name: &str, fingerprint: Fingerprint, hash: &str) {
        let settled = fingerprint.settled(self.settled);
        self.map()
            .insert(name.to_owned(), (fingerprint, hash.to_owned(), settled));
    }

    /// The hash remembered for `name` if the file is still the one hashed
    /// and its timestamps were settled then.
    fn hash_of(&self, name: &str, now: Fingerprint) -> Option<String> {
        self.map()
            .get(name)
            .filter(|(then, _, settled)| *then == now && *settled)
            .map(|(_, hash, _)| hash.clone())
    }

    /// Whether `NAME.wasm` in `dir` looks like the file hashed last, which
    /// was too fresh then for its hash to be trusted: most likely unchanged,
    /// but to be read again.
    pub(super) async fn unverified(&self, dir: &Path, name: &str) -> bool {
        let Some(now) = Fingerprint::of(&dir.join(format!("{name}.wasm"))).await else {
            return false;
        };
        self.map()
            .get(name)
            .is_some_and(|(then, _, settled)| *then == now && !*settled)
    }

    /// Forgets the files that are gone.
    pub(super) fn retain(&self, names: &[String]) {
        self.map().retain(|name, _| names.contains(name));
    }
}

/// What identifies one state of a file without reading it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Fingerprint {
    dev: u64,
    ino: u64,
    len: u64,
    modified: SystemTime,
    /// The inode's change time (`ctime`), which no one can set back.
    changed: SystemTime,
}

impl Fingerprint {
    async fn of(path: &Path) -> Option<Fingerprint> {
        use std::os::unix::fs::MetadataExt;
        let meta = tokio::fs::metadata(path).await.ok()?;
        let changed = UNIX_EPOCH.checked_add(Duration::new(
            u64::try_from(meta.ctime()).ok()?,
            u32::try_from(meta.ctime_nsec()).ok()?,
        ))?;
        Some(Fingerprint {
            dev: meta.dev(),
            ino: meta.ino(),
            len: meta.len(),
            modified: meta.modified().ok()?,
            changed,
        })
    }

    /// Whether both timestamps lie at least `margin` in the past.
    fn settled(&self, margin: Duration) -> bool {
        SystemTime::now()
            .checked_sub(margin)
            .is_some_and(|before| self.modified < before && self.changed < before)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An empty component whose custom section says `tag` (same-length
    /// tags make same-length files).
    fn component(tag: &str) -> Vec<u8> {
        wat::parse_str(format!("(component (@custom \"imhost-test\" \"{tag}\"))"))
            .expect("a component")
    }

    async fn read(dir: &Path, hashed: &Hashed) -> Source {
        let operator = grants::GrantsFile::default();
        read_source(dir, "p", &[], &operator, Some(hashed))
            .await
            .expect("reads")
            .expect("enabled")
    }

    async fn unchanged(dir: &Path, hashed: &Hashed) -> Option<String> {
        unchanged_version(dir, "p", &[], &grants::GrantsFile::default(), hashed).await
    }

    #[tokio::test]
    async fn a_file_written_just_now_is_read_again_even_when_rewritten_in_place_at_its_size() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("p.wasm");
        std::fs::write(&path, component("a")).expect("write");
        let hashed = Hashed::default();
        assert!(!hashed.unverified(dir.path(), "p").await, "never read");
        let first = read(dir.path(), &hashed).await;
        // Its timestamps are not settled: nothing is trusted without reading,
        // and the file is unverified (read after the others).
        assert_eq!(unchanged(dir.path(), &hashed).await, None);
        assert!(hashed.unverified(dir.path(), "p").await);
        // The same size, the same inode, within the same clock tick maybe.
        std::fs::write(&path, component("b")).expect("rewrite");
        let second = read(dir.path(), &hashed).await;
        assert_ne!(first.hash, second.hash);
        assert_eq!(unchanged(dir.path(), &hashed).await, None);
        // Another file renamed into place: not the one hashed.
        let aside = dir.path().join(".p.wasm.partial");
        std::fs::write(&aside, component("c")).expect("write aside");
        std::fs::rename(&aside, &path).expect("rename");
        assert!(!hashed.unverified(dir.path(), "p").await);
    }

    #[tokio::test]
    async fn a_settled_file_is_known_without_reading_until_it_or_its_manifest_changes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("p.wasm");
        std::fs::write(&path, component("a")).expect("write");
        let hashed = Hashed {
            settled: Duration::ZERO,
            ..Hashed::default()
        };
        let first = read(dir.path(), &hashed).await;
        assert_eq!(
            unchanged(dir.path(), &hashed).await,
            Some(first.version.clone())
        );

        // A manifest of its own: another version, known without the wasm.
        std::fs::write(dir.path().join("p.toml"), "pool = 2\n").expect("manifest");
        let with_manifest = unchanged(dir.path(), &hashed).await.expect("known");
        assert_ne!(with_manifest, first.version);
        assert_eq!(with_manifest, read(dir.path(), &hashed).await.version);

        // A new file renamed into place: another inode, read again.
        let aside = dir.path().join(".p.wasm.partial");
        std::fs::write(&aside, component("b")).expect("write aside");
        std::fs::rename(&aside, &path).expect("rename");
        assert_eq!(unchanged(dir.path(), &hashed).await, None);
        let second = read(dir.path(), &hashed).await;
        assert_ne!(second.hash, first.hash);
        assert_eq!(unchanged(dir.path(), &hashed).await, Some(second.version));

        // A file that is gone is forgotten.
        hashed.retain(&[]);
        assert_eq!(unchanged(dir.path(), &hashed).await, None);
    }
}
