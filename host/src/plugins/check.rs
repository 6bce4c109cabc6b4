//! `imhost plugin check FILE.wasm`: what a server's loader makes of a file,
//! offline, for CI: the same name rules, manifest, grants (against none:
//! the report lists what the operator would have to grant), compile and
//! start, through the same version builder as a load.

use std::path::{Path, PathBuf};

use super::compile::{self, ArtifactCache, Compiler, LoadError};
use super::engine::Tier;
use super::grants;
use super::host_api::Services;
use super::report::PluginInfo;
use super::source::{plugin_name, read_source};

/// `imhost plugin check FILE.wasm`: what the server's loader makes of a file.
/// The same name rules and manifest, a compile of `tier`, and one
/// instantiation (the guest's start code) in a sandboxed store, with no node
/// behind its host calls. With `cache`, the optimized artifact is stored
/// there for servers using the same cache.
///
/// # Errors
/// Why the server would refuse or ignore the file.
pub async fn check_file(
    path: &Path,
    tier: Tier,
    cache: Option<&ArtifactCache>,
) -> Result<PluginInfo, LoadError> {
    let name = plugin_name(path).map_err(LoadError::Invalid)?;
    let dir = path.parent().unwrap_or(Path::new("."));
    let protected: Vec<PathBuf> = cache.iter().map(|c| c.dir().to_path_buf()).collect();
    // What a node without grants for it would give: the report says what
    // the operator would have to grant.
    let operator = grants::GrantsFile::default();
    let Some(source) = read_source(dir, &name, &protected, &operator, None).await? else {
        return Err(LoadError::Manifest(
            "`enabled = false`: the server would not load it".into(),
        ));
    };
    let (wasm, hash) = (source.wasm.clone(), source.hash.clone());
    let cache = cache.cloned().filter(|_| tier == Tier::Optimized);
    let compiled = tokio::task::spawn_blocking(move || {
        compile::compile_cached(&Compiler::InProcess, cache.as_ref(), &wasm, &hash, tier)
    })
    .await
    .map_err(|e| LoadError::Compiler(e.to_string()))??;
    let prepared = source.build(compiled, &Services::detached()).await?;
    Ok(PluginInfo {
        state: "valid",
        ..PluginInfo::of(&prepared, None)
    })
}
