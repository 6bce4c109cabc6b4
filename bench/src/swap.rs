//! A swap while optimized builds run (`imhost-bench --only-swap`): a node
//! with a cold cache loads the four JavaScript and Python examples (12-18 MB
//! components); while their optimized builds are still compiling, a new
//! JavaScript filter is written into the plugin directory (aside, then
//! renamed into place), and the time from that rename to the new filter
//! serving is measured, as is the time from the write's first byte. The same swap on the
//! node once it is idle is the baseline, in the same command. A third copy is
//! compiled into the node's cache first (`imhost plugin compile --cache-dir`,
//! as a deploy that precompiles does) and then renamed into place: the swap
//! that waits for no compiler at all.
//!
//! Also reported: the node's resident memory once the four have loaded cold
//! against a second node that loads them from the cache the first one filled
//! (goal: at most 2×).

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use super::{Args, free_addr, rss_bytes, spawn_imhost_bin, wait_serving};

/// The examples loaded before the swap, and the file swapped in.
const LOADED: [&str; 4] = [
    "js-moderation",
    "js-hmac-auth",
    "py-moderation",
    "py-presence-notify",
];
const SWAPPED: &str = "js-moderation";

pub async fn run(args: &Args) -> anyhow::Result<()> {
    let examples = super::repo_path("target/plugins/examples");
    for name in LOADED {
        if !examples.join(format!("{name}.wasm")).exists() {
            bail!("{name}.wasm not built: run examples/plugins/build first");
        }
    }
    let cache = tempfile::tempdir()?;
    let plugins = tempfile::tempdir()?;
    for name in LOADED {
        copy_example(&examples, plugins.path(), name, name)?;
    }
    let http = reqwest::Client::new();
    let addr = free_addr()?;
    let cache_arg = cache.path().display().to_string();
    let dir_arg = plugins.path().display().to_string();
    let node = spawn_imhost_bin(
        &args.imhost,
        args,
        addr,
        &["--plugins", &dir_arg, "--plugin-cache", &cache_arg],
    )?;
    let pid = node.id().context("node pid")?;
    wait_serving(&http, addr).await?;
    // Every example serves (baseline builds), optimized builds under way.
    wait_for(&http, addr, "the examples serve", |rows| {
        LOADED.iter().all(|n| active(rows, n))
    })
    .await?;
    let building = optimized_builds(&http, addr).await?;
    let busy = swap(&http, addr, &examples, plugins.path(), "swap-busy", None).await?;
    let still_building = optimized_builds(&http, addr).await?;
    wait_for(&http, addr, "the optimized builds finish", all_optimized).await?;
    let idle = swap(&http, addr, &examples, plugins.path(), "swap-idle", None).await?;
    // Idle again: the idle swap's own optimized build done.
    wait_for(
        &http,
        addr,
        "the idle swap's optimized build finishes",
        all_optimized,
    )
    .await?;
    let precompiled = swap(
        &http,
        addr,
        &examples,
        plugins.path(),
        "swap-precompiled",
        Some(Precompile {
            imhost: &args.imhost,
            cache: cache.path(),
        }),
    )
    .await?;
    wait_for(&http, addr, "every optimized build finishes", all_optimized).await?;
    // Seven plugins loaded (the four and two swaps cold, one from the cache).
    let cold_rss = rss_bytes(pid)?;
    drop(node);

    // A second node loads the same files from the cache the first filled.
    let addr = free_addr()?;
    let warm = spawn_imhost_bin(
        &args.imhost,
        args,
        addr,
        &["--plugins", &dir_arg, "--plugin-cache", &cache_arg],
    )?;
    let warm_pid = warm.id().context("node pid")?;
    wait_serving(&http, addr).await?;
    wait_for(&http, addr, "the cached examples serve", |rows| {
        rows.iter().filter(|r| r["tier"] == "optimized").count() >= LOADED.len() + 3
    })
    .await?;
    let cached_rss = rss_bytes(warm_pid)?;
    drop(warm);

    println!(
        "\n{:<58}{:>10}{:>10}{:>10}",
        "a new 12 MB JavaScript filter serves, ms after its", "rename", "1st byte", "node"
    );
    let row = |label: &str, t: &SwapTime| {
        println!(
            "{label:<58}{:>10.0}{:>10.0}{:>10}",
            t.from_rename,
            t.from_first_byte,
            t.node.map_or("-".to_string(), |ms| ms.to_string())
        );
    };
    row(
        &format!("  while optimized builds run ({building} running, {still_building} after)"),
        &busy,
    );
    row("  on the idle node", &idle);
    row("  compiled into the cache first, idle node", &precompiled);
    println!(
        "{:<58}{:>10.2}{:>10.2}",
        "  busy / idle",
        busy.from_rename / idle.from_rename,
        busy.from_first_byte / idle.from_first_byte
    );
    println!(
        "{:<58}{:>10.2}",
        "  precompiled / idle",
        precompiled.from_rename / idle.from_rename
    );
    println!(
        "\nresident memory after loading the four cold: {:.0} MB; from the cache: {:.0} MB; cold/cached {:.2}",
        cold_rss as f64 / 1e6,
        cached_rss as f64 / 1e6,
        cold_rss as f64 / cached_rss as f64
    );
    Ok(())
}

/// How long a swap took to serve, in milliseconds.
struct SwapTime {
    /// From the rename that put the finished file in place: the node's time.
    from_rename: f64,
    /// From the first byte of the manifest written: the deploy's write of
    /// 12 MB (tens of ms on a slow disk) included, and its compile when it
    /// precompiles.
    from_first_byte: f64,
    /// The node's own `served_after_ms` for the version: from its read of
    /// the file to serving (the watcher's quiet before the read excluded).
    node: Option<u64>,
}

/// A deploy that compiles the file into the node's cache before placing it.
struct Precompile<'a> {
    imhost: &'a Path,
    cache: &'a Path,
}

/// Writes a copy of the JavaScript moderation filter as `name` (made a
/// file of its own, so that it compiles rather than loading another copy's
/// cached build), compiled into the node's cache before it is renamed into
/// place when `precompile` says so, and returns how long until it runs.
async fn swap(
    http: &reqwest::Client,
    addr: std::net::SocketAddr,
    examples: &Path,
    plugins: &Path,
    name: &str,
    precompile: Option<Precompile<'_>>,
) -> anyhow::Result<SwapTime> {
    let mut wasm = std::fs::read(examples.join(format!("{SWAPPED}.wasm")))?;
    // A custom section naming the copy: the same code, another content hash.
    let section = b"imhost-bench-copy";
    anyhow::ensure!(section.len() + name.len() < 127, "name too long");
    wasm.extend([
        0,
        (1 + section.len() + name.len()) as u8,
        section.len() as u8,
    ]);
    wasm.extend(section);
    wasm.extend(name.as_bytes());
    let started = Instant::now();
    std::fs::copy(
        examples.join(format!("{SWAPPED}.toml")),
        plugins.join(format!("{name}.toml")),
    )?;
    let aside = plugins.join(format!(".{name}.wasm.partial"));
    std::fs::write(&aside, &wasm)?;
    if let Some(Precompile { imhost, cache }) = precompile {
        let status = tokio::process::Command::new(imhost)
            .args(["plugin", "compile", "--cache-dir"])
            .arg(cache)
            .arg(&aside)
            .stdout(std::process::Stdio::null())
            .status()
            .await
            .context("run imhost plugin compile")?;
        anyhow::ensure!(status.success(), "imhost plugin compile failed: {status}");
    }
    std::fs::rename(&aside, plugins.join(format!("{name}.wasm")))?;
    let placed = Instant::now();
    // Polled often: the poll's period is part of what is measured.
    let rows = poll_until(
        http,
        addr,
        "the new filter serves",
        Duration::from_millis(1),
        |rows| active(rows, name),
    )
    .await?;
    let (from_rename, from_first_byte) = (
        placed.elapsed().as_secs_f64() * 1000.0,
        started.elapsed().as_secs_f64() * 1000.0,
    );
    let node = rows
        .iter()
        .find(|r| r["name"] == name)
        .and_then(|r| r["served_after_ms"].as_u64());
    Ok(SwapTime {
        from_rename,
        from_first_byte,
        node,
    })
}

/// Copies example `from` into `plugins` as `to`, the way deploys do: written
/// aside, then renamed into place, manifest first.
fn copy_example(examples: &Path, plugins: &Path, from: &str, to: &str) -> anyhow::Result<()> {
    for ext in ["toml", "wasm"] {
        let aside = plugins.join(format!(".{to}.{ext}.partial"));
        std::fs::copy(examples.join(format!("{from}.{ext}")), &aside)
            .with_context(|| format!("copy {from}.{ext}"))?;
        std::fs::rename(&aside, plugins.join(format!("{to}.{ext}")))?;
    }
    Ok(())
}

/// Every plugin serves its optimized build, and none is compiling: the node
/// is idle.
fn all_optimized(rows: &[serde_json::Value]) -> bool {
    rows.iter()
        .all(|r| r["compiling"].is_null() && r["tier"] == "optimized")
}

fn active(rows: &[serde_json::Value], name: &str) -> bool {
    rows.iter()
        .any(|r| r["name"] == name && r["state"] == "active")
}

/// Optimized builds running now.
async fn optimized_builds(
    http: &reqwest::Client,
    addr: std::net::SocketAddr,
) -> anyhow::Result<usize> {
    let rows = super::plugins::plugin_rows(http, addr).await?;
    Ok(rows
        .iter()
        .filter(|r| r["compiling"]["tier"] == "optimized")
        .count())
}

/// Polls the plugin list every 10 ms until `done`.
async fn wait_for(
    http: &reqwest::Client,
    addr: std::net::SocketAddr,
    what: &str,
    done: impl Fn(&[serde_json::Value]) -> bool,
) -> anyhow::Result<()> {
    poll_until(http, addr, what, Duration::from_millis(10), done)
        .await
        .map(drop)
}

/// Polls the plugin list every `every` until `done`, within 600 s; returns
/// the list that satisfied it.
async fn poll_until(
    http: &reqwest::Client,
    addr: std::net::SocketAddr,
    what: &str,
    every: Duration,
    done: impl Fn(&[serde_json::Value]) -> bool,
) -> anyhow::Result<Vec<serde_json::Value>> {
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let rows = super::plugins::plugin_rows(http, addr).await?;
        if done(&rows) {
            return Ok(rows);
        }
        if Instant::now() > deadline {
            bail!("{what}: not within 600 s: {rows:?}");
        }
        tokio::time::sleep(every).await;
    }
}
