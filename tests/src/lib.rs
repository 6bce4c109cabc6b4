//! Test support for imhost's black-box tests: real servers (in process or as
//! real `imhost` processes), real WebSocket clients, a real HTTP client, and
//! bounded waits instead of sleeps.
//!
//! # Layout
//! - [`api`] — the business API of one node, with assertions.
//! - [`redis`] — a real `redis-server` on a free port.
//! - [`cluster`] — several real `imhost` processes on one Redis.
//! - [`plugins`] — the guest plugins, built by build.rs, and a plugin directory.
//! - [`host`] — start an imhost node in this process on a free loopback port.
//! - [`process`] — run the real `imhost` binary as a child process.
//! - [`terminal`] — a WebSocket terminal with deadline-bounded reads.
//! - [`sse`] — a reader of the `/api/v1/events` stream.
//! - [`eventually`] — poll a condition until it holds or a deadline passes.

pub mod api;
pub mod cluster;
pub mod host;
pub mod idp;
pub mod jwt;
pub mod plugins;
pub mod process;
pub mod redis;
pub mod redis_cluster;
pub mod sse;
pub mod terminal;

use std::future::Future;
use std::time::Duration;

/// How long any single expectation may take before the test fails. Generous:
/// CI machines are small, and nothing waits this long when things work.
pub const DEADLINE: Duration = Duration::from_secs(10);

/// The compiled-plugin cache every test node shares (in `target/`, so a
/// plugin compiled once is not compiled again by later tests or runs).
pub fn plugin_cache() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("target")
        .join("plugin-cache")
}

/// The operator grants test nodes run with unless a test says otherwise:
/// every host action to every plugin, and no variable, directory or
/// network (those, tests grant one by one). Written once into `target/`.
pub fn test_grants() -> std::path::PathBuf {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("target")
        .join("test-plugin-grants.toml");
    const TEXT: &str =
        "[\"*\"]\nactions = [\"send\", \"channel\", \"broadcast\", \"force_offline\", \"kv\"]\n";
    if std::fs::read_to_string(&path).ok().as_deref() != Some(TEXT) {
        // Written aside and renamed: tests starting at once see it whole.
        static DRAFTS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = DRAFTS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let draft = path.with_extension(format!("{}.{n}.tmp", std::process::id()));
        std::fs::write(&draft, TEXT).expect("write the test grants");
        std::fs::rename(&draft, &path).expect("place the test grants");
    }
    path
}

/// How long waiting for plugins to compile may take (see
/// `Api::wait_plugins_settled`).
pub const COMPILE_DEADLINE: Duration = Duration::from_secs(120);

/// Polls `check` until it returns `Some`, or panics with `what` after `DEADLINE`.
pub async fn eventually<T, F, Fut>(what: &str, check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    eventually_within(what, DEADLINE, check).await
}

/// [`eventually`] with a deadline of its own.
pub async fn eventually_within<T, F, Fut>(what: &str, within: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
