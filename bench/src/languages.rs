//! Plugins in every language (`--only-languages`), each figure a ratio against
//! a baseline measured in the same run:
//!
//! - compile time per tier (Winch baseline, Cranelift optimized) and the
//!   time to load the optimized artifact from the cache, against compiling it;
//! - instantiation time of a fresh instance;
//! - per-call cost of the same filter (moderation: banned words, a length
//!   cap) in JavaScript and Python against Rust (word-filter), and of an
//!   inbound hook in C against Rust (echo-inbound);
//! - from a file write to serving, per language, against a Rust plugin;
//! - resident memory of a node that compiled four 12–18 MB components
//!   against one that loaded them from the cache;
//! - messages/s through a filter that costs 50 µs, against its pool size.
//!
//! The examples come from `examples/plugins/build`, the Rust guests from
//! `scripts/bench`'s guest build.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use imhost::plugins::compile::{self, ArtifactCache};
use imhost::plugins::engine::Tier;
use imhost::plugins::host_api::Services;
use imhost::plugins::loaded::Prepared;
use imhost::plugins::manifest::Manifest;

use super::{Args, direct_messages, free_addr, rss_bytes, spawn_imhost, wait_serving};

fn example(name: &str) -> PathBuf {
    Path::new("target/plugins/examples").join(format!("{name}.wasm"))
}

fn row(name: &str, a: f64, b: f64, unit: &str) {
    println!("{name:<52}{a:>12.2}{b:>12.2}{:>10.2}  {unit}", a / b);
}

pub async fn compare(args: &Args) -> anyhow::Result<()> {
    println!(
        "\n{:<52}{:>12}{:>12}{:>10}",
        "plugins in every language", "measured", "baseline", "ratio"
    );
    compile_and_instantiate(args)?;
    call_costs(args).await?;
    write_to_serving(args).await?;
    memory_after_loading(args).await?;
    filter_pool_throughput(args).await?;
    Ok(())
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

/// Compile per tier and load from the cache, in this process.
fn compile_and_instantiate(args: &Args) -> anyhow::Result<()> {
    let cache_dir = tempfile::tempdir()?;
    let cache = ArtifactCache::open(cache_dir.path())?;
    let runtime = tokio::runtime::Handle::current();
    for (label, path) in [
        ("javascript moderation (12 MB)", example("js-moderation")),
        ("python moderation (18 MB)", example("py-moderation")),
        ("c commands", example("c-commands")),
        ("rust word-filter", args.guests.join("word_filter.wasm")),
    ] {
        let wasm = std::fs::read(&path).with_context(|| format!("read {}", path.display()))?;
        let hash = compile::content_hash(&wasm);
        let started = Instant::now();
        let baseline = compile::compile(&wasm, Tier::Baseline)?;
        let winch = started.elapsed();
        let started = Instant::now();
        let optimized = compile::compile(&wasm, Tier::Optimized)?;
        let cranelift = started.elapsed();
        let artifact = optimized
            .component
            .serialize()
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        cache.store(&hash, Tier::Optimized, &artifact)?;
        let started = Instant::now();
        let loaded = cache
            .load(&hash, Tier::Optimized)
            .context("artifact missing")??;
        let from_cache = started.elapsed();
        row(
            &format!("s compile, baseline vs optimized: {label}"),
            secs(winch),
            secs(cranelift),
            "s",
        );
        row(
            &format!("s load from cache vs compile: {label}"),
            secs(from_cache),
            secs(cranelift),
            "s",
        );
        let per_instance =
            imhost::plugins::share::Needs::declared(&wasm).map_err(anyhow::Error::msg)?;
        let instantiate = |compiled: compile::Compiled| -> anyhow::Result<Duration> {
            let share = imhost::plugins::share::reserve(compiled.tier, "bench", per_instance, 1)
                .map_err(anyhow::Error::msg)?;
            let prepared = Prepared::new(
                "bench".into(),
                hash.clone(),
                Manifest::default(),
                compiled,
                Arc::new(Services::detached().host_ctx(
                    "bench",
                    "{}".into(),
                    Duration::from_secs(5),
                    Arc::default(),
                )),
                String::new(),
                share,
            );
            let started = Instant::now();
            tokio::task::block_in_place(|| runtime.block_on(prepared.warm_up()))?;
            Ok(started.elapsed())
        };
        let (b, o) = (instantiate(baseline)?, instantiate(loaded)?);
        row(
            &format!("ms instantiate, baseline vs optimized: {label}"),
            secs(b) * 1e3,
            secs(o) * 1e3,
            "ms",
        );
    }
    Ok(())
}

/// Mean µs per hook call in this process, warm instances, optimized tier.
async fn call_costs(args: &Args) -> anyhow::Result<()> {
    let filter_manifest =
        "pool = 1\n[settings]\nbanned = [\"darn\", \"heck\"]\nmax_length = 4096\n";
    let rust = super::plugins::filter_call_us(
        &args.guests.join("word_filter.wasm"),
        "pool = 1\n[settings]\nwords = [\"darn\", \"heck\"]\n",
    )
    .await?;
    for (label, file) in [("javascript", "js-moderation"), ("python", "py-moderation")] {
        let us = super::plugins::filter_call_us(&example(file), filter_manifest).await?;
        row(
            &format!("µs per filter call, {label} vs rust"),
            us,
            rust,
            "µs",
        );
    }
    let c = super::plugins::inbound_call_us(&example("c-commands"), "pool = 1\n").await?;
    let rust_inbound =
        super::plugins::inbound_call_us(&args.guests.join("echo_inbound.wasm"), "pool = 1\n")
            .await?;
    row("µs per inbound call, c vs rust", c, rust_inbound, "µs");
    Ok(())
}

/// Writes a plugin into a running node's directory (cold cache) and times
/// until it serves (first version) and until its optimized build serves.
async fn write_to_serving(args: &Args) -> anyhow::Result<()> {
    let http = reqwest::Client::new();
    let mut rust_first = None;
    for (label, path) in [
        ("rust word-filter", args.guests.join("word_filter.wasm")),
        ("javascript moderation", example("js-moderation")),
        ("python moderation", example("py-moderation")),
        ("c commands", example("c-commands")),
    ] {
        let dir = tempfile::tempdir()?;
        let cache = tempfile::tempdir()?;
        let addr = free_addr()?;
        let cache_arg = cache.path().to_string_lossy().into_owned();
        let plugins_arg = dir.path().to_string_lossy().into_owned();
        let _node = spawn_imhost(
            args,
            addr,
            &["--plugins", &plugins_arg, "--plugin-cache", &cache_arg],
        )?;
        wait_serving(&http, addr).await?;
        let tmp = dir.path().join("p.partial");
        std::fs::copy(&path, &tmp)?;
        let started = Instant::now();
        std::fs::rename(&tmp, dir.path().join("p.wasm"))?;
        let mut first = None;
        let optimized = loop {
            let rows = super::plugins::plugin_rows(&http, addr).await?;
            if let Some(row) = rows.iter().find(|r| r["name"] == "p") {
                if row["state"] == "active" && first.is_none() {
                    first = Some(started.elapsed());
                }
                if row["tier"] == "optimized" && row["compiling"].is_null() {
                    break started.elapsed();
                }
            }
            anyhow::ensure!(
                started.elapsed() < Duration::from_secs(120),
                "{label} never served"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        let first = first.unwrap_or(optimized);
        let rust = *rust_first.get_or_insert(first);
        row(
            &format!("s write → serving (first tier) vs rust: {label}"),
            secs(first),
            secs(rust),
            "s",
        );
        row(
            &format!("s write → optimized serving vs first: {label}"),
            secs(optimized),
            secs(first),
            "s",
        );
    }
    Ok(())
}

/// RSS of a node that compiled four large components (in child processes)
/// against one that loaded the same four from the cache.
async fn memory_after_loading(args: &Args) -> anyhow::Result<()> {
    let http = reqwest::Client::new();
    let dir = tempfile::tempdir()?;
    for name in [
        "js-hmac-auth",
        "js-moderation",
        "py-moderation",
        "py-presence-notify",
    ] {
        std::fs::copy(example(name), dir.path().join(format!("{name}.wasm")))?;
        std::fs::copy(
            Path::new("target/plugins/examples").join(format!("{name}.toml")),
            dir.path().join(format!("{name}.toml")),
        )?;
    }
    let cache = tempfile::tempdir()?;
    let mut rss = Vec::new();
    for _ in ["cold", "warm"] {
        let addr = free_addr()?;
        let node = spawn_imhost(
            args,
            addr,
            &[
                "--plugins",
                &dir.path().to_string_lossy(),
                "--plugin-cache",
                &cache.path().to_string_lossy(),
            ],
        )?;
        wait_serving(&http, addr).await?;
        super::plugins::wait_plugins(&http, addr, 4).await?;
        rss.push(rss_bytes(node.id().context("pid")?)? as f64 / 1e6);
    }
    row(
        "MB RSS, 4 components compiled vs loaded from cache",
        rss[0],
        rss[1],
        "MB",
    );
    Ok(())
}

/// Messages/s through a filter that busy-waits 50 µs, pool 1 against 4.
async fn filter_pool_throughput(args: &Args) -> anyhow::Result<()> {
    let http = reqwest::Client::new();
    let mut rates = Vec::new();
    for pool in [1, 2, 4] {
        let dir = tempfile::tempdir()?;
        std::fs::copy(
            args.guests.join("tagger.wasm"),
            dir.path().join("slow.wasm"),
        )?;
        std::fs::write(
            dir.path().join("slow.toml"),
            format!("pool = {pool}\n[settings]\nversion = 1\nfilter_delay_us = 50\n"),
        )?;
        let addr = free_addr()?;
        let _node = spawn_imhost(args, addr, &["--plugins", &dir.path().to_string_lossy()])?;
        wait_serving(&http, addr).await?;
        super::plugins::wait_plugins(&http, addr, 1).await?;
        rates.push((pool, direct_messages(&http, addr, args.messages / 2).await?));
    }
    let one = rates[0].1;
    for (pool, rate) in &rates[1..] {
        row(
            &format!("messages/s, 50 µs filter, pool {pool} vs pool 1"),
            *rate,
            one,
            "msg/s",
        );
    }
    println!("{:<52}{one:>12.0}", "messages/s, 50 µs filter, pool 1");
    Ok(())
}
