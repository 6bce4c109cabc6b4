//! Loading: `plugin check`, and the compiled-artifact cache.

use super::*;

#[tokio::test]
async fn plugin_check_prints_hooks_or_the_reason() {
    let bin = imhost_tests::process::imhost_bin();
    let ok = std::process::Command::new(&bin)
        .args(["plugin", "check", guests::WELCOME])
        .output()
        .expect("run check");
    assert!(ok.status.success());
    let info: Value = serde_json::from_slice(&ok.stdout).expect("json");
    assert_eq!(info["hooks"], json!(["events"]));
    assert_eq!(info["abi"], "1.1.0");
    assert_eq!(info["hash"].as_str().map(str::len), Some(64));

    // Two export macros in one crate make one component with both hooks.
    let both = std::process::Command::new(&bin)
        .args(["plugin", "check", guests::TEMPLATE])
        .output()
        .expect("run check");
    assert!(both.status.success());
    let info: Value = serde_json::from_slice(&both.stdout).expect("json");
    assert_eq!(info["hooks"], json!(["filter", "events"]));

    let refused = std::process::Command::new(&bin)
        .args(["plugin", "check", guests::FUTURE_MAJOR])
        .output()
        .expect("run check");
    assert_eq!(refused.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&refused.stderr).contains("imhost:plugin@2.0.0"));
}

fn artifacts(cache: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut found: Vec<_> = std::fs::read_dir(cache)
        .expect("cache dir")
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "cwasm"))
        .collect();
    found.sort();
    found
}

#[tokio::test]
async fn compiled_plugins_are_cached_outside_the_plugin_dir_and_reused() {
    let dir = PluginDir::new();
    let cache = tempfile::tempdir().expect("cache dir");
    let cache_dir = cache.path().join("imhost");
    dir.install(
        "word-filter",
        guests::WORD_FILTER,
        "[settings]\nwords = [\"x\"]\n",
    );
    let options = || Options {
        plugins: Some(dir.path().to_owned()),
        plugin_cache: Some(cache_dir.clone()),
        ..Options::default()
    };
    let first = TestHost::start(options()).await;
    first
        .plugin_where("word-filter", "optimized", |p| p["tier"] == "optimized")
        .await;
    assert_eq!(artifacts(&cache_dir).len(), 1, "one optimized artifact");
    assert!(
        std::fs::read_dir(dir.path()).expect("plugin dir").all(|e| e
            .expect("entry")
            .path()
            .extension()
            .is_some_and(|x| x == "wasm" || x == "toml")),
        "nothing but plugins in the plugin directory"
    );
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&cache_dir)
            .expect("meta")
            .permissions()
            .mode();
        assert_eq!(mode & 0o077, 0, "the cache is owner-only: {mode:o}");
    }
    first.stop().await.expect("stopped");

    // A new node loads the artifact straight into the optimized tier.
    let second = TestHost::start(options()).await;
    let row = second
        .plugin_where("word-filter", "loaded", |p| p["state"] == "active")
        .await;
    assert_eq!(row["tier"], "optimized");
    let mut t = second.terminal(1).await;
    second.send(0, &[1], json!("x marks"), false).await;
    assert_eq!(t.next_text().await, r#""* marks""#);
    second.stop().await.expect("stopped");

    // A tampered artifact is refused, deleted and compiled again.
    let artifact = artifacts(&cache_dir).pop().expect("artifact");
    let mut bytes = std::fs::read(&artifact).expect("read");
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0xff;
    std::fs::write(&artifact, &bytes).expect("tamper");
    let third = TestHost::start(options()).await;
    third
        .plugin_where("word-filter", "recompiled", |p| p["tier"] == "optimized")
        .await;
    assert_ne!(
        std::fs::read(&artifact).expect("rewritten"),
        bytes,
        "the tampered file was replaced"
    );
    let mut t = third.terminal(1).await;
    third.send(0, &[1], json!("x again"), false).await;
    assert_eq!(t.next_text().await, r#""* again""#);
}

/// The deploy of docs/plugins.md, "A swap that waits for no compiler": the
/// module compiled into the node's cache while it is still aside, then
/// renamed into place. The node's first version of it is the optimized
/// build, loaded, not compiled: the artifact is still the very file the
/// deploy wrote (a node that compiled would have written its own).
#[tokio::test]
async fn a_module_compiled_into_the_cache_before_it_is_placed_serves_optimized_at_once() {
    use std::os::unix::fs::MetadataExt;

    let dir = PluginDir::new();
    let cache = tempfile::tempdir().expect("cache dir");
    let cache_dir = cache.path().join("imhost");
    let cache_arg = cache_dir.display().to_string();
    let (_process, api) = imhost_tests::process::ImhostProcess::serving_plugins(
        dir.path(),
        &["--plugin-cache", &cache_arg],
    )
    .await;

    std::fs::write(
        dir.path().join("word-filter.toml"),
        "[settings]\nwords = [\"x\"]\n",
    )
    .expect("manifest");
    let aside = dir.path().join(".word-filter.wasm.partial");
    std::fs::copy(guests::WORD_FILTER, &aside).expect("copy aside");
    let compiled = std::process::Command::new(imhost_tests::process::imhost_bin())
        .args(["plugin", "compile", "--cache-dir", &cache_arg])
        .arg(&aside)
        .output()
        .expect("run plugin compile");
    assert!(
        compiled.status.success(),
        "{}",
        String::from_utf8_lossy(&compiled.stderr)
    );
    let deployed = artifacts(&cache_dir);
    assert_eq!(deployed.len(), 1, "{deployed:?}");
    let inode = |path: &std::path::Path| std::fs::metadata(path).expect("artifact").ino();
    let deployed_inode = inode(&deployed[0]);
    // The file aside is not a plugin: nothing loads it.
    assert!(api.plugins().await.is_empty());

    std::fs::rename(&aside, dir.path().join("word-filter.wasm")).expect("place");
    let first = imhost_tests::eventually_within(
        "word-filter serves",
        imhost_tests::COMPILE_DEADLINE,
        || async {
            api.plugins()
                .await
                .into_iter()
                .find(|p| p["name"] == "word-filter" && p["state"] == "active")
        },
    )
    .await;
    assert_eq!(first["tier"], "optimized", "{first}");
    assert!(
        first["compiling"].is_null(),
        "nothing left to build: {first}"
    );
    assert_eq!(artifacts(&cache_dir), deployed);
    assert_eq!(
        inode(&deployed[0]),
        deployed_inode,
        "the node compiled nothing"
    );

    let mut t = api.terminal(1).await;
    api.send(0, &[1], json!("x marks"), false).await;
    assert_eq!(t.next_text().await, r#""* marks""#);
}
