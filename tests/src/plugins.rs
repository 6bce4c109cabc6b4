//! The guest plugins (really compiled to wasm32-wasip2 by `build.rs`) and a
//! plugin directory to install them into, as an operator would.

use std::path::{Path, PathBuf};

use serde_json::Value;
use tempfile::TempDir;

use crate::api::Api;

/// Paths of the built guests: `WORD_FILTER`, `JWT_AUTH`, `RATE_LIMIT`,
/// `WELCOME`, `TEMPLATE`, and the test-only `MISBEHAVING`, `TAGGER`, `ECHO_INBOUND`,
/// `FUTURE_MAJOR`, `SANDBOX_PROBE`.
pub mod guests {
    include!(concat!(env!("OUT_DIR"), "/guests.rs"));
}

/// Path of a plugin example built by `examples/plugins/build` (JavaScript,
/// Python, C), e.g. `example("js-moderation")`.
pub fn example(name: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../target/plugins/examples")
        .join(format!("{name}.wasm"));
    assert!(
        path.exists(),
        "{} not built: run examples/plugins/build first (scripts/test does)",
        path.display()
    );
    path.to_string_lossy().into_owned()
}

/// The component at `path` with a custom section `imhost-test-variant`
/// holding `n` appended: the same code under another content hash, so that
/// it is compiled (and cached) as a plugin of its own.
pub fn variant(path: &str, n: u8) -> Vec<u8> {
    let mut wasm = std::fs::read(path).expect("read guest");
    let name = b"imhost-test-variant";
    // A custom section: id 0, its size, then the name (length-prefixed) and
    // the payload. Every size here is below 128, one LEB128 byte.
    let size = 1 + name.len() + 1;
    wasm.extend([0, size as u8, name.len() as u8]);
    wasm.extend(name);
    wasm.push(n);
    wasm
}

/// An operator's grants file (`--plugin-grants`), in a directory of its own,
/// outside any plugin directory.
pub struct GrantsFile {
    _dir: TempDir,
    pub path: PathBuf,
}

impl GrantsFile {
    pub fn new(text: &str) -> GrantsFile {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = GrantsFile {
            path: dir.path().join("grants.toml"),
            _dir: dir,
        };
        file.set(text);
        file
    }

    /// Rewrites the file (a reload reads it again).
    pub fn set(&self, text: &str) {
        std::fs::write(&self.path, text).expect("write the grants file");
    }
}

/// A plugin directory in a temp dir.
pub struct PluginDir {
    dir: TempDir,
}

impl Default for PluginDir {
    fn default() -> Self {
        Self::new()
    }
}

impl PluginDir {
    pub fn new() -> PluginDir {
        PluginDir {
            dir: tempfile::tempdir().expect("tempdir"),
        }
    }

    /// A directory holding only the word filter, set to drop messages with
    /// any of `words` (a dropped direct message gets a "filtered" receipt).
    pub fn dropping(words: &[&str]) -> PluginDir {
        let dir = PluginDir::new();
        let words: Vec<String> = words.iter().map(|w| format!("{w:?}")).collect();
        dir.install(
            "word-filter",
            guests::WORD_FILTER,
            &format!(
                "[settings]\nwords = [{}]\naction = \"drop\"\n",
                words.join(", ")
            ),
        );
        dir
    }

    /// The directory, as the `--plugins` argument of a node process.
    pub fn arg(&self) -> String {
        self.dir.path().to_str().expect("UTF-8 path").to_owned()
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    fn file(&self, name: &str, ext: &str) -> PathBuf {
        self.dir.path().join(format!("{name}.{ext}"))
    }

    /// Installs `wasm` as `name` with `manifest` the way deploys do: write
    /// aside, then rename into place (manifest first).
    pub fn install(&self, name: &str, wasm: &str, manifest: &str) {
        self.install_bytes(name, &std::fs::read(wasm).expect("read guest"), manifest);
    }

    pub fn install_bytes(&self, name: &str, wasm: &[u8], manifest: &str) {
        self.rename_into_place(&self.file(name, "toml"), manifest.as_bytes());
        self.rename_into_place(&self.file(name, "wasm"), wasm);
    }

    /// Rewrites only the manifest (rename into place).
    pub fn set_manifest(&self, name: &str, manifest: &str) {
        self.rename_into_place(&self.file(name, "toml"), manifest.as_bytes());
    }

    /// Overwrites the wasm file in place, as an editor or `cp` does.
    pub fn write_in_place(&self, name: &str, bytes: &[u8]) {
        std::fs::write(self.file(name, "wasm"), bytes).expect("write in place");
    }

    pub fn remove(&self, name: &str) {
        std::fs::remove_file(self.file(name, "wasm")).expect("remove");
    }

    fn rename_into_place(&self, dest: &Path, bytes: &[u8]) {
        let tmp = dest.with_extension("partial");
        std::fs::write(&tmp, bytes).expect("write");
        std::fs::rename(&tmp, dest).expect("rename");
    }
}

impl Api {
    /// `GET /api/v1/plugins`.
    pub async fn plugins(&self) -> Vec<Value> {
        let (status, body) = self.get("/plugins").await;
        assert_eq!(status, 200, "{body}");
        serde_json::from_value(body).expect("plugin list")
    }

    /// Waits until the node has scanned its plugins and none is compiling
    /// (neither a first version nor the optimized one).
    /// Compiling is slow but finite: a cold optimized compile of a 12–18 MB
    /// JavaScript or Python component takes seconds on a small machine, more
    /// with other tests compiling beside it, so this waits up to two minutes.
    pub async fn wait_plugins_settled(&self) {
        crate::eventually_within("plugins settled", crate::COMPILE_DEADLINE, || async {
            let ready = self.http.get(self.url("/readyz")).send().await.ok()?;
            let status = ready.status();
            let text = ready.text().await.ok()?;
            if status != 200 && (text.contains("not yet scanned") || text.contains("compiling")) {
                return None;
            }
            let compiling = self
                .plugins()
                .await
                .iter()
                .any(|p| !p["compiling"].is_null());
            (!compiling).then_some(())
        })
        .await;
    }

    /// The row of plugin `name`, once `check` accepts it and nothing of it
    /// is compiling any more.
    pub async fn plugin_where(
        &self,
        name: &str,
        what: &str,
        check: impl Fn(&Value) -> bool,
    ) -> Value {
        let what = format!("plugin {name}: {what}");
        crate::eventually_within(&what, crate::COMPILE_DEADLINE, || async {
            self.plugins()
                .await
                .into_iter()
                .find(|p| p["name"] == name && p["compiling"].is_null() && check(p))
        })
        .await
    }
}
