//! From a `.wasm` file to code the host can run: compiling (in this process
//! or in a child process of the same binary), checking the component against
//! the ABI, and the artifact cache.
//!
//! # Compiling in a child process
//! Cranelift compiling a 12–18 MB component peaks at 300–480 MB of heap, and
//! the allocator keeps much of it after. Run as `imhost plugin compile
//! --output -`, the compiler's heap is the child's and goes away with it: the
//! server reads the finished artifact from the child's standard output and
//! maps it. The baseline tier (Winch) is what a swap waits for, so it
//! compiles in process, without the child's serialise-and-copy, and the heap
//! is trimmed after (`malloc_trim`). Tests that run a node inside their own
//! process compile both tiers in process (there is no `imhost` binary to call).
//!
//! # The artifact cache, and why it is a trust boundary
//! A compiled artifact is native code that wasmtime runs without checking it
//! (`Component::deserialize` is `unsafe` for that reason). The cache is
//! therefore:
//! - a directory only the server writes, created owner-only (0700), outside
//!   the plugin directory by default, so that whoever may drop plugins (which
//!   run sandboxed) cannot drop native code;
//! - authenticated: each artifact carries an HMAC-SHA256 over the source's
//!   content hash, the tier, the engine's compatibility hash and the
//!   artifact bytes, under a key that lives *beside* the cache directory, not
//!   in it (`DIR.key` next to `DIR`, 0600, owned by the cache directory's
//!   owner, checked at every open), so that write access to the directory
//!   alone does not let anyone sign what they put there. A file that was
//!   altered, copied from another source or made by another engine fails the
//!   check, is deleted, and the plugin is compiled again. A key left inside
//!   the directory by an older version is removed (its artifacts recompile).
//!
//! Whoever can write the cache directory *and* read its key can still run
//! native code in the server: that is the boundary, stated in `docs/plugins.md`.
//! No cache directory is ever made in a shared temporary directory.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};
use wasmtime::component::{Component, InstancePre};

use super::bindings::exports::imhost::plugin::{auth, events, filter, inbound};
use super::engine::{Tier, engine, linker};
use super::instance::PluginState;
use super::manifest::Hook;

/// The ABI major version this host speaks.
pub const ABI_MAJOR: u64 = 1;
const PACKAGE: &str = "imhost:plugin/";
/// First bytes of every artifact file of ours.
const ARTIFACT_MAGIC: &[u8; 8] = b"IMHOSTA1";
const MAC_LEN: usize = 32;

/// Why a file did not become a plugin.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("not a WebAssembly file")]
    NotWasm,
    #[error(
        "this is a core WebAssembly module, not a component: build for wasm32-wasip2 (or wrap it with `wasm-tools component new`)"
    )]
    CoreModule,
    #[error("invalid component: {0}")]
    Invalid(String),
    #[error(
        "built against imhost:plugin@{found}, but this host speaks imhost:plugin@{ABI_MAJOR}.x"
    )]
    UnknownMajor { found: String },
    #[error("exports none of the hooks (auth, filter, events, inbound) of imhost:plugin@1")]
    NoHooks,
    #[error("cannot be linked: {0}")]
    Link(String),
    #[error("bad NAME.toml: {0}")]
    Manifest(String),
    #[error("instantiation failed: {0}")]
    Start(String),
    #[error("compiler process failed: {0}")]
    Compiler(String),
    /// Refused by the compiler process, in its words.
    #[error("{0}")]
    Refused(String),
    /// Over the slots of the engine's pool a plugin may hold (`share`).
    #[error("{0}")]
    Share(String),
}

/// A component compiled and checked against the linker; cheap to clone.
#[derive(Clone)]
pub struct Compiled {
    pub component: Component,
    pub pre: InstancePre<PluginState>,
    pub exported: Vec<Hook>,
    /// The `imhost:plugin` version it was built against, e.g. `1.0.0`.
    pub abi: String,
    pub tier: Tier,
}

/// Hex SHA-256 of the bytes: the content hash reported and cached by.
pub fn content_hash(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Checks the first bytes: a component, not a core module or anything else.
fn check_header(bytes: &[u8]) -> Result<(), LoadError> {
    match bytes.get(..8) {
        Some([0, b'a', b's', b'm', 1, 0, 0, 0]) => Err(LoadError::CoreModule),
        Some([0, b'a', b's', b'm', _, _, 1, 0]) => Ok(()),
        _ => Err(LoadError::NotWasm),
    }
}

/// The hooks a component's top level exports, read from its export section
/// without compiling anything (milliseconds for a 12 MB component): what the
/// host needs to know before a plugin is ready, e.g. whether it is an auth
/// plugin that connects must wait for.
pub fn declared_hooks(bytes: &[u8]) -> Vec<Hook> {
    let mut hooks = Vec::new();
    let mut depth = 0usize;
    for payload in wasmparser::Parser::new(0).parse_all(bytes) {
        let Ok(payload) = payload else { break };
        match payload {
            wasmparser::Payload::ModuleSection { .. }
            | wasmparser::Payload::ComponentSection { .. } => depth += 1,
            wasmparser::Payload::End(_) => {
                if depth == 0 {
                    break;
                }
                depth -= 1;
            }
            wasmparser::Payload::ComponentExportSection(exports) if depth == 0 => {
                for export in exports.into_iter().flatten() {
                    let name = export.name.name;
                    for hook in Hook::ALL {
                        if name.starts_with(&format!("{PACKAGE}{}@", hook.interface())) {
                            hooks.push(hook);
                        }
                    }
                }
            }
            _ => {}
        }
    }
    hooks
}

/// Compiles and validates a component in this process. CPU-heavy: call off
/// the async workers.
///
/// # Errors
/// [`LoadError`] saying what the file is and why it cannot be a plugin.
pub fn compile(bytes: &[u8], tier: Tier) -> Result<Compiled, LoadError> {
    check_header(bytes)?;
    let component =
        Component::new(engine(tier), bytes).map_err(|e| LoadError::Invalid(format!("{e:#}")))?;
    inspect(component, tier)
}

/// Checks a compiled component: ABI version, linkability, hooks exported.
fn inspect(component: Component, tier: Tier) -> Result<Compiled, LoadError> {
    let engine = engine(tier);
    let ty = component.component_type();
    let mut abi = None;
    let names = ty
        .imports(engine)
        .map(|(name, _)| name.to_owned())
        .chain(ty.exports(engine).map(|(name, _)| name.to_owned()))
        .collect::<Vec<_>>();
    for name in &names {
        if let Some(rest) = name.strip_prefix(PACKAGE)
            && let Some((_, version)) = rest.split_once('@')
        {
            let major = version
                .split('.')
                .next()
                .and_then(|m| m.parse::<u64>().ok());
            if major != Some(ABI_MAJOR) {
                return Err(LoadError::UnknownMajor {
                    found: version.to_owned(),
                });
            }
            abi.get_or_insert_with(|| version.to_owned());
        }
    }
    let linker = linker(tier).map_err(LoadError::Link)?;
    let pre = linker
        .instantiate_pre(&component)
        .map_err(|e| LoadError::Link(link_advice(&format!("{e:#}"))))?;
    let exported: Vec<Hook> = Hook::ALL
        .into_iter()
        .filter(|hook| match hook {
            Hook::Auth => auth::GuestIndices::new(&pre).is_ok(),
            Hook::Filter => filter::GuestIndices::new(&pre).is_ok(),
            Hook::Events => events::GuestIndices::new(&pre).is_ok(),
            Hook::Inbound => inbound::GuestIndices::new(&pre).is_ok(),
        })
        .collect();
    if exported.is_empty() {
        return Err(LoadError::NoHooks);
    }
    Ok(Compiled {
        component,
        pre,
        exported,
        abi: abi.unwrap_or_else(|| "1.0.0".into()),
        tier,
    })
}

/// A link error, with the fix for the common toolchain defaults that cause it.
fn link_advice(error: &str) -> String {
    if error.contains("wasi:http") {
        format!(
            "{error}. Plugins get no wasi:http; componentize-js imports it by default: \
             build with `--disable http fetch-event`"
        )
    } else {
        error.to_owned()
    }
}

/// Makes the cache's key, or reads the one another process made first.
///
/// Nodes and `imhost plugin compile` runs sharing a new cache may open it at
/// the same moment, so the key appears whole or not at all: it is written to
/// a file of this process's own, then hard-linked to `key_path`, which fails
/// if another process linked its key first (and then that one is used).
fn create_key(key_path: &Path) -> std::io::Result<Vec<u8>> {
    let key: [u8; 32] = rand::random();
    let draft = key_path.with_extension(format!(
        "key.{}.{:016x}.tmp",
        std::process::id(),
        rand::random::<u64>()
    ));
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let written = options.open(&draft).and_then(|mut file| {
        file.write_all(&key)?;
        file.sync_all()
    });
    let linked = written.and_then(|()| std::fs::hard_link(&draft, key_path));
    // The draft goes either way; the key, if linked, stays under its name.
    let _ = std::fs::remove_file(&draft);
    match linked {
        Ok(()) => Ok(key.to_vec()),
        Err(err) if err.kind() == std::io::ErrorKind::AlreadyExists => std::fs::read(key_path),
        Err(err) => Err(err),
    }
}

/// Where the key of the cache at `dir` lives: `DIR.key`, beside it.
fn key_path(dir: &Path) -> std::io::Result<PathBuf> {
    let name = dir.file_name().ok_or_else(|| {
        std::io::Error::other(format!(
            "{} has no name to put its key beside",
            dir.display()
        ))
    })?;
    let mut key_name = name.to_owned();
    key_name.push(".key");
    Ok(dir.with_file_name(key_name))
}

/// Refuses a key that others could have written or read: it must belong to
/// the cache directory's owner and be open to nobody else.
fn check_key_file(dir: &Path, key_path: &Path) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        let key = std::fs::metadata(key_path)?;
        let owner = std::fs::metadata(dir)?.uid();
        if key.uid() != owner || key.mode() & 0o077 != 0 {
            return Err(std::io::Error::other(format!(
                "{} must belong to the cache's owner and be readable by nobody else (0600)",
                key_path.display()
            )));
        }
    }
    #[cfg(not(unix))]
    let _ = (dir, key_path);
    Ok(())
}

/// Compiled artifacts on disk: see the module docs.
#[derive(Clone)]
pub struct ArtifactCache {
    dir: PathBuf,
    key: [u8; 32],
}

impl ArtifactCache {
    /// Opens (creating owner-only) the cache at `dir` and its key.
    ///
    /// # Errors
    /// The directory or key cannot be created or read, or the directory is
    /// open to other users.
    pub fn open(dir: &Path) -> std::io::Result<ArtifactCache> {
        std::fs::create_dir_all(dir)?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
        }
        // An older version kept its key inside the directory, where whoever
        // writes the directory could read or replace it.
        match std::fs::remove_file(dir.join("key")) {
            Ok(()) => {
                tracing::warn!(dir = %dir.display(), "removed the key kept inside the plugin cache; cached plugins compile again")
            }
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
            Err(err) => return Err(err),
        }
        let key_path = key_path(dir)?;
        let key = match std::fs::read(&key_path) {
            Ok(key) => {
                check_key_file(dir, &key_path)?;
                key
            }
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => create_key(&key_path)?,
            Err(err) => return Err(err),
        };
        let key: [u8; 32] = key.try_into().map_err(|_| {
            std::io::Error::other(format!("{} is not a 32-byte key", key_path.display()))
        })?;
        Ok(ArtifactCache {
            dir: dir.to_owned(),
            key,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Where the artifact of `hash` for `tier` lives: named by the source's
    /// content hash and the engine's compatibility hash.
    pub fn path(&self, hash: &str, tier: Tier) -> PathBuf {
        self.dir.join(format!(
            "{hash}-{}-{}.cwasm",
            engine_id(tier),
            tier.as_str()
        ))
    }

    fn mac(&self, hash: &str, tier: Tier, artifact: &[u8]) -> Hmac<Sha256> {
        let mut mac =
            <Hmac<Sha256> as Mac>::new_from_slice(&self.key).unwrap_or_else(|_| unreachable!());
        mac.update(hash.as_bytes());
        mac.update(b"\0");
        mac.update(tier.as_str().as_bytes());
        mac.update(b"\0");
        mac.update(engine_id(tier).as_bytes());
        mac.update(b"\0");
        mac.update(artifact);
        mac
    }

    /// Writes `artifact` (wasmtime's serialized component) for `hash` and
    /// `tier`, atomically.
    ///
    /// # Errors
    /// The file cannot be written.
    pub fn store(&self, hash: &str, tier: Tier, artifact: &[u8]) -> std::io::Result<()> {
        let tag = self.mac(hash, tier, artifact).finalize().into_bytes();
        let path = self.path(hash, tier);
        let tmp = path.with_extension(format!("partial-{}", std::process::id()));
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(ARTIFACT_MAGIC)?;
        file.write_all(&tag)?;
        file.write_all(artifact)?;
        file.sync_all()?;
        std::fs::rename(&tmp, &path)
    }

    /// Loads the artifact of `hash` for `tier`: `None` when there is none or
    /// it fails its check (then it is deleted and counted as refused).
    pub fn load(&self, hash: &str, tier: Tier) -> Option<Result<Compiled, LoadError>> {
        let path = self.path(hash, tier);
        let bytes = std::fs::read(&path).ok()?;
        // Used now: pruning keeps the most recently used.
        if let Ok(file) = std::fs::File::options().append(true).open(&path) {
            let _ = file.set_modified(std::time::SystemTime::now());
        }
        let artifact = bytes
            .strip_prefix(ARTIFACT_MAGIC)
            .and_then(|rest| rest.split_at_checked(MAC_LEN));
        let genuine = artifact.is_some_and(|(tag, artifact)| {
            self.mac(hash, tier, artifact).verify_slice(tag).is_ok()
        });
        let Some((_, artifact)) = artifact.filter(|_| genuine) else {
            tracing::warn!(file = %path.display(), "refusing a cached artifact that fails its check; compiling again");
            let _ = std::fs::remove_file(&path);
            return None;
        };
        // SAFETY: `deserialize` trusts its input to be wasmtime's own output
        // for this engine. The bytes carry a MAC, under a key only this cache
        // holds, over exactly these bytes, this source hash, tier and engine.
        #[allow(unsafe_code)]
        let component = unsafe { Component::deserialize(engine(tier), artifact) };
        match component {
            Ok(component) => Some(inspect(component, tier)),
            Err(err) => {
                tracing::warn!(file = %path.display(), cause = %err, "ignoring unusable compiled plugin");
                let _ = std::fs::remove_file(&path);
                None
            }
        }
    }

    /// Deletes artifacts that are neither of a hash in `active` nor among the
    /// `keep` most recently used.
    pub fn prune(&self, active: &[String], keep: usize) {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return;
        };
        let mut others: Vec<(std::time::SystemTime, PathBuf)> = entries
            .flatten()
            .filter_map(|entry| {
                let path = entry.path();
                let name = path.file_name()?.to_str()?.to_owned();
                if !name.ends_with(".cwasm") || active.iter().any(|h| name.starts_with(h)) {
                    return None;
                }
                Some((entry.metadata().ok()?.modified().ok()?, path))
            })
            .collect();
        others.sort_by_key(|entry| std::cmp::Reverse(entry.0));
        for (_, path) in others.into_iter().skip(keep) {
            if std::fs::remove_file(&path).is_ok() {
                tracing::debug!(file = %path.display(), "pruned a compiled plugin");
            }
        }
    }
}

/// A short id of the engine's compatibility hash (wasmtime version, compiler,
/// settings, CPU features): another engine never reads this one's files.
fn engine_id(tier: Tier) -> String {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    engine(tier)
        .precompile_compatibility_hash()
        .hash(&mut hasher);
    format!("{:016x}", hasher.finish())
}

/// How plugins are compiled.
#[derive(Debug, Clone)]
pub enum Compiler {
    /// In this process, on a blocking thread.
    InProcess,
    /// By `BIN plugin compile`, a child process of the same binary.
    Child(PathBuf),
}

impl Compiler {
    /// A child of this binary when it is `imhost`, else in process.
    pub fn for_this_process() -> Compiler {
        match std::env::current_exe() {
            Ok(exe) if exe.file_stem().is_some_and(|s| s == "imhost") => Compiler::Child(exe),
            _ => Compiler::InProcess,
        }
    }
}

/// Compiles `wasm` (content hash `hash`) for `tier`: from the cache when it
/// holds a genuine artifact, else by `compiler`, storing the optimized tier in
/// the cache. The memory it freed is not handed back here: a node does that
/// once the version serves ([`trim_heap`], 10-40 ms a swap need not wait for).
/// Blocking: call off the async workers.
///
/// # Errors
/// As [`compile`], or the compiler process failed.
pub fn compile_cached(
    compiler: &Compiler,
    cache: Option<&ArtifactCache>,
    wasm: &[u8],
    hash: &str,
    tier: Tier,
) -> Result<Compiled, LoadError> {
    check_header(wasm)?;
    if let Some(cache) = cache
        && let Some(loaded) = cache.load(hash, tier)
    {
        return loaded;
    }
    let (compiled, artifact) = match compiler {
        // The baseline tier is what a swap waits for: compiled here, without
        // the child's serialise-and-copy (a tenth of a second for 12 MB of
        // JavaScript). Winch's heap is the smaller one; Cranelift's goes
        // to the child.
        Compiler::Child(_) if tier == Tier::Baseline => (compile(wasm, tier)?, None),
        Compiler::Child(bin) => {
            let artifact = compile_in_child(bin, wasm, tier)?;
            // SAFETY: `deserialize` trusts its input to be wasmtime's own
            // output for this engine: these bytes are, made by this very
            // binary in a child process and handed over on a private pipe.
            #[allow(unsafe_code)]
            let component = unsafe { Component::deserialize(engine(tier), &artifact) }
                .map_err(|e| LoadError::Compiler(format!("unusable artifact: {e}")))?;
            (inspect(component, tier)?, Some(artifact))
        }
        Compiler::InProcess => (compile(wasm, tier)?, None),
    };
    if let Some(cache) = cache {
        let stored = match artifact {
            Some(artifact) => cache.store(hash, tier, &artifact),
            None => compiled
                .component
                .serialize()
                .map_err(std::io::Error::other)
                .and_then(|artifact| cache.store(hash, tier, &artifact)),
        };
        if let Err(err) = stored {
            tracing::warn!(dir = %cache.dir().display(), cause = %err, "cannot cache the compiled plugin");
        }
    }
    Ok(compiled)
}

/// Gives the allocators' free memory back to the system: a compile frees
/// hundreds of MB at once, and loading an artifact frees its file's bytes
/// (12-50 MB), which neither allocator hands back by itself soon enough:
/// glibc keeps freed heap in its arenas, and mimalloc (the `imhost`
/// binary's allocator) purges freed memory only when the thread that
/// freed it allocates again, and a blocking-pool thread may never.
/// Both calls are harmless where that allocator holds nothing.
pub fn trim_heap() {
    // mimalloc's free pages are per thread: those of wasmtime's compiler
    // threads (rayon's pool) are collected on each of them.
    let collect = || {
        // SAFETY: mi_collect frees only memory mimalloc holds unused; it
        // touches no live allocation.
        #[allow(unsafe_code)]
        unsafe {
            libmimalloc_sys::mi_collect(true);
        }
    };
    rayon::broadcast(|_| collect());
    collect();
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free memory to the kernel; it touches
    // no live allocation.
    #[allow(unsafe_code)]
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Lowers this thread's CPU priority (and that of the threads it starts):
/// an optimized build in a child process is background work, and must not
/// slow a baseline build that a swap waits for, or the node's serving.
pub fn lower_priority() {
    // SAFETY: setpriority takes plain integers and touches no memory of
    // ours; on Linux, PRIO_PROCESS with 0 means the calling thread, whose
    // later threads (the compiler's) inherit the value.
    #[allow(unsafe_code)]
    let done = unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, BACKGROUND_NICE) };
    if done != 0 {
        tracing::debug!("could not lower the compiler's priority");
    }
}

/// The niceness of background (optimized) builds.
const BACKGROUND_NICE: libc::c_int = 10;

/// Runs `BIN plugin compile --tier T --output - -` with `wasm` on its
/// standard input, so it compiles exactly these bytes, and returns the
/// artifact it writes to its standard output. The compiler's heap is the
/// child's and goes away with it.
fn compile_in_child(bin: &Path, wasm: &[u8], tier: Tier) -> Result<Vec<u8>, LoadError> {
    use std::io::Read;
    let mut child = std::process::Command::new(bin)
        .args([
            "plugin",
            "compile",
            "--tier",
            tier.as_str(),
            "--output",
            "-",
            "-",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn_compiler()
        .map_err(|e| LoadError::Compiler(format!("cannot start {}: {e}", bin.display())))?;
    let background = super::preempt::Background::register(child.id());
    let (stdin, stdout, stderr) = (child.stdin.take(), child.stdout.take(), child.stderr.take());
    let talked = std::thread::scope(|scope| {
        let said = scope.spawn(|| {
            let mut said = Vec::new();
            if let Some(mut stderr) = stderr {
                let _ = stderr.read_to_end(&mut said);
            }
            said
        });
        // The child reads all of its input before it writes anything.
        let handed = match stdin {
            Some(mut stdin) => stdin.write_all(wasm),
            None => Ok(()),
        };
        let mut artifact = Vec::new();
        let read = match stdout {
            Some(mut stdout) => stdout.read_to_end(&mut artifact).map(|_| ()),
            None => Ok(()),
        };
        let said = said.join().unwrap_or_default();
        (handed, read.map(|()| artifact), said)
    });
    // Deregistered before it is reaped, so it is never signalled by a PID
    // that may have been reused.
    drop(background);
    let status = child
        .wait()
        .map_err(|e| LoadError::Compiler(e.to_string()))?;
    let (handed, artifact, said) = talked;
    handed.map_err(|e| LoadError::Compiler(format!("cannot hand the file over: {e}")))?;
    let artifact = artifact.map_err(|e| LoadError::Compiler(e.to_string()))?;
    if status.success() {
        return Ok(artifact);
    }
    let said = String::from_utf8_lossy(&said);
    // The child prints the refusal as the server would word it.
    let reason = said
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("no reason given");
    Err(LoadError::Refused(
        reason.trim_start_matches("refused: ").to_owned(),
    ))
}

/// Spawning a compiler child that never outlives the server.
trait SpawnCompiler {
    fn spawn_compiler(&mut self) -> std::io::Result<std::process::Child>;
}

impl SpawnCompiler for std::process::Command {
    /// Spawns with `PR_SET_PDEATHSIG`: the child is killed when the thread
    /// that started it ends, which is when the server dies (that thread waits
    /// for the child to the end). A compiler stopped by `preempt` would
    /// otherwise stay stopped forever, and a running one would burn its
    /// seconds of CPU for nobody.
    fn spawn_compiler(&mut self) -> std::io::Result<std::process::Child> {
        #[cfg(target_os = "linux")]
        {
            use std::os::unix::process::CommandExt;
            let parent = libc::pid_t::try_from(std::process::id()).unwrap_or(0);
            // SAFETY: runs in the child between fork and exec, where only
            // async-signal-safe calls are allowed: prctl and getppid are.
            #[allow(unsafe_code)]
            unsafe {
                self.pre_exec(move || {
                    if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    // The server died before the line above took effect.
                    if libc::getppid() != parent {
                        return Err(std::io::Error::other("the server is gone"));
                    }
                    Ok(())
                });
            }
        }
        self.spawn()
    }
}

/// `imhost plugin compile --output -`: the artifact of `wasm` for `tier`.
///
/// # Errors
/// As [`compile`].
pub fn compile_to_bytes(wasm: &[u8], tier: Tier) -> Result<Vec<u8>, LoadError> {
    let compiled = compile(wasm, tier)?;
    compiled
        .component
        .serialize()
        .map_err(|e| LoadError::Compiler(e.to_string()))
}

/// `imhost plugin compile`: compile `wasm` for `tier` into `cache`.
///
/// # Errors
/// As [`compile`]; or the artifact cannot be written.
pub fn compile_into_cache(
    cache: &ArtifactCache,
    wasm: &[u8],
    tier: Tier,
) -> Result<(String, Vec<Hook>), LoadError> {
    let hash = content_hash(wasm);
    let compiled = compile(wasm, tier)?;
    let artifact = compiled
        .component
        .serialize()
        .map_err(|e| LoadError::Compiler(e.to_string()))?;
    cache
        .store(&hash, tier, &artifact)
        .map_err(|e| LoadError::Compiler(format!("cannot write the artifact: {e}")))?;
    Ok((hash, compiled.exported))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_open_to_others_is_refused_and_a_key_inside_is_removed() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let cache = dir.path().join("cache");
        let first = ArtifactCache::open(&cache).expect("open").key;
        std::fs::write(cache.join("key"), [7u8; 32]).expect("an old key inside");
        let again = ArtifactCache::open(&cache).expect("reopen").key;
        assert_eq!(again, first, "the key beside is the key");
        assert!(!cache.join("key").exists(), "the key inside is gone");
        let key = dir.path().join("cache.key");
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        let refused = ArtifactCache::open(&cache).err().expect("refused");
        assert!(refused.to_string().contains("0600"), "{refused}");
    }

    /// Many openers of one new cache at once (nodes starting together, or
    /// parallel `imhost plugin compile` runs) all get the same, whole key.
    #[test]
    fn a_new_cache_opened_at_once_by_many_has_one_key() {
        for _ in 0..20 {
            let dir = tempfile::tempdir().expect("tempdir");
            let cache = dir.path().join("cache");
            let barrier = std::sync::Barrier::new(8);
            let keys: Vec<[u8; 32]> = std::thread::scope(|scope| {
                let openers: Vec<_> = (0..8)
                    .map(|_| {
                        scope.spawn(|| {
                            barrier.wait();
                            ArtifactCache::open(&cache).map(|c| c.key)
                        })
                    })
                    .collect();
                openers
                    .into_iter()
                    .map(|t| t.join().expect("opener").expect("open"))
                    .collect()
            });
            assert!(keys.iter().all(|k| *k == keys[0]), "keys differ");
            let left: Vec<_> = std::fs::read_dir(&cache)
                .expect("read_dir")
                .map(|e| e.expect("entry").file_name())
                .collect();
            assert!(left.is_empty(), "the key is not inside: {left:?}");
            let beside: Vec<_> = std::fs::read_dir(dir.path())
                .expect("read_dir")
                .map(|e| e.expect("entry").file_name())
                .collect();
            let mut beside: Vec<_> = beside.iter().map(|n| n.to_string_lossy()).collect();
            beside.sort();
            assert_eq!(beside, ["cache", "cache.key"], "drafts left behind");
        }
    }
}
