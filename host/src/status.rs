//! What the live status page (`GET /status`) shows: one report per node of the
//! cluster, made by each node about itself once a second.
//!
//! A node knows only its own counters, so each node publishes its report to
//! the cluster store (Redis, under `<prefix>Status<node>`, expiring after
//! [`REPORT_TTL`]) and the page's stream reads every node's from there. A node
//! that stops reporting shows as stale, then disappears when its report
//! expires. Embedded, the node's own report is the whole cluster.
//!
//! Rates (messages and connects per second) are differences between two
//! samples of [`Stats`]; plugin latencies are read off the per-plugin
//! histogram buckets, so a p99 is the upper bound of the bucket it falls in.
//! Swaps are noticed as a plugin's hash changing between samples.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use tracing::debug;

use crate::node::Node;
use crate::plugins::PluginInfo;
use crate::plugins::loaded::LATENCY_BUCKETS_US;
use crate::stats::StatsSnapshot;

/// How often a node samples itself and publishes its report.
pub const REPORT_INTERVAL: Duration = Duration::from_secs(1);
/// How long a published report lives in the store.
pub const REPORT_TTL: Duration = Duration::from_secs(30);
/// Swaps a node remembers for the page.
const RECENT_SWAPS: usize = 20;

/// One node's report, as the page receives it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct NodeReport {
    pub server: String,
    /// When the report was made (Unix ms).
    pub at_ms: u64,
    pub uptime_s: u64,
    pub connections: u64,
    /// Frames written to sockets per second over the last interval.
    pub messages_per_s: f64,
    pub connects_per_s: f64,
    pub plugins: Vec<PluginRow>,
    /// Newest first.
    pub swaps: Vec<Swap>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PluginRow {
    pub name: String,
    pub state: String,
    /// The first 12 hex digits of the running version's hash.
    pub version: String,
    pub calls: u64,
    /// Errors, timeouts, memory-limit hits and traps together.
    pub errors: u64,
    /// Bucket upper bounds in µs; `None` before the first call or past the
    /// last bucket.
    pub p50_us: Option<u64>,
    pub p99_us: Option<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Swap {
    pub at_ms: u64,
    pub plugin: String,
    /// Versions (hash prefixes); `None` when the plugin came or went.
    pub from: Option<String>,
    pub to: Option<String>,
}

/// A node's memory between samples: its last counters and plugin versions,
/// its recent swaps and its latest report.
#[derive(Default)]
pub struct Board {
    inner: Mutex<BoardState>,
}

#[derive(Default)]
struct BoardState {
    previous: Option<(Instant, StatsSnapshot)>,
    versions: Vec<(String, String)>,
    swaps: VecDeque<Swap>,
    latest: Option<NodeReport>,
}

impl Board {
    /// The report made at the last sample.
    pub fn latest(&self) -> Option<NodeReport> {
        self.lock().latest.clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BoardState> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes a sample and returns the report it makes.
    pub fn sample(
        &self,
        server: &str,
        uptime: Duration,
        now: Instant,
        stats: StatsSnapshot,
        plugins: &[PluginInfo],
    ) -> NodeReport {
        let at_ms = unix_ms();
        let mut state = self.lock();
        let (messages_per_s, connects_per_s) = match &state.previous {
            Some((then, before)) => {
                let secs = now.duration_since(*then).as_secs_f64().max(1e-3);
                (
                    stats.frames_queued.saturating_sub(before.frames_queued) as f64 / secs,
                    stats
                        .connections_opened
                        .saturating_sub(before.connections_opened) as f64
                        / secs,
                )
            }
            None => (0.0, 0.0),
        };
        let versions: Vec<(String, String)> = plugins
            .iter()
            .filter(|p| !p.hash.is_empty())
            .map(|p| (p.name.clone(), short(&p.hash)))
            .collect();
        if state.previous.is_some() {
            for swap in swaps_between(&state.versions, &versions, at_ms) {
                state.swaps.push_front(swap);
            }
            state.swaps.truncate(RECENT_SWAPS);
        }
        let report = NodeReport {
            server: server.to_owned(),
            at_ms,
            uptime_s: uptime.as_secs(),
            connections: stats.connections,
            messages_per_s,
            connects_per_s,
            plugins: plugins.iter().map(plugin_row).collect(),
            swaps: state.swaps.iter().cloned().collect(),
        };
        state.previous = Some((now, stats));
        state.versions = versions;
        state.latest = Some(report.clone());
        report
    }
}

fn short(hash: &str) -> String {
    hash.chars().take(12).collect()
}

fn plugin_row(p: &PluginInfo) -> PluginRow {
    PluginRow {
        name: p.name.clone(),
        state: p.state.to_owned(),
        version: short(&p.hash),
        calls: p.calls,
        errors: p.errors + p.timeouts + p.memory_limits + p.traps,
        p50_us: quantile_us(&p.latency, 0.50),
        p99_us: quantile_us(&p.latency, 0.99),
    }
}

/// The upper bound of the latency bucket holding quantile `q`.
fn quantile_us(buckets: &[u64], q: f64) -> Option<u64> {
    let total: u64 = buckets.iter().sum();
    if total == 0 {
        return None;
    }
    let rank = (q * total as f64).ceil().max(1.0) as u64;
    let mut seen = 0;
    for (i, count) in buckets.iter().enumerate() {
        seen += count;
        if seen >= rank {
            return LATENCY_BUCKETS_US.get(i).copied();
        }
    }
    None
}

/// The swaps that turn `before` into `after` (name → version lists).
fn swaps_between(before: &[(String, String)], after: &[(String, String)], at_ms: u64) -> Vec<Swap> {
    let find = |list: &[(String, String)], name: &str| {
        list.iter().find(|(n, _)| n == name).map(|(_, v)| v.clone())
    };
    let mut swaps = Vec::new();
    for (name, version) in after {
        let from = find(before, name);
        if from.as_ref() != Some(version) {
            swaps.push(Swap {
                at_ms,
                plugin: name.clone(),
                from,
                to: Some(version.clone()),
            });
        }
    }
    for (name, version) in before {
        if find(after, name).is_none() {
            swaps.push(Swap {
                at_ms,
                plugin: name.clone(),
                from: Some(version.clone()),
                to: None,
            });
        }
    }
    swaps
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Samples the node every [`REPORT_INTERVAL`] and publishes its report to the
/// cluster store, until `stop`.
pub async fn run(node: Node, stop: CancellationToken) {
    let started = Instant::now();
    let mut ticks = tokio::time::interval(REPORT_INTERVAL);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            () = stop.cancelled() => return,
        }
        let report = node.status.sample(
            &node.topology.me,
            started.elapsed(),
            Instant::now(),
            node.stats.snapshot(),
            &node.plugins.list(),
        );
        let Ok(text) = serde_json::to_string(&report) else {
            continue;
        };
        if let Err(err) = node.presence.publish_status(&text, REPORT_TTL).await {
            debug!(cause = %err, "status report not published");
        }
    }
}

/// Every node's latest report, in the topology's order: this node's from
/// memory, the others' from the store. A node whose report is missing (never
/// sent, or expired) is left out.
pub async fn cluster(node: &Node) -> Vec<NodeReport> {
    let servers = &node.topology.servers;
    let stored = node.presence.statuses(servers).await.unwrap_or_else(|err| {
        debug!(cause = %err, "status reports not read");
        Vec::new()
    });
    let mut reports = Vec::with_capacity(servers.len());
    for (i, server) in servers.iter().enumerate() {
        if *server == node.topology.me {
            reports.extend(node.status.latest());
            continue;
        }
        let report = stored
            .get(i)
            .and_then(Option::as_deref)
            .and_then(|text| serde_json::from_str::<NodeReport>(text).ok());
        reports.extend(report);
    }
    reports
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_are_bucket_upper_bounds() {
        let mut buckets = vec![0u64; LATENCY_BUCKETS_US.len() + 1];
        assert_eq!(quantile_us(&buckets, 0.5), None);
        buckets[0] = 98; // ≤ 10 µs
        buckets[4] = 2; // ≤ 1 ms
        assert_eq!(quantile_us(&buckets, 0.5), Some(10));
        assert_eq!(quantile_us(&buckets, 0.99), Some(1_000));
        buckets[LATENCY_BUCKETS_US.len()] = 100; // past the last bucket
        assert_eq!(quantile_us(&buckets, 0.99), None);
    }

    #[test]
    fn swaps_are_version_changes_arrivals_and_departures() {
        let v = |pairs: &[(&str, &str)]| -> Vec<(String, String)> {
            pairs
                .iter()
                .map(|(n, h)| (n.to_string(), h.to_string()))
                .collect()
        };
        let swaps = swaps_between(
            &v(&[("a", "1"), ("b", "2")]),
            &v(&[("a", "3"), ("c", "4")]),
            7,
        );
        let seen: Vec<_> = swaps
            .iter()
            .map(|s| (s.plugin.as_str(), s.from.as_deref(), s.to.as_deref()))
            .collect();
        assert_eq!(
            seen,
            vec![
                ("a", Some("1"), Some("3")),
                ("c", None, Some("4")),
                ("b", Some("2"), None)
            ]
        );
        assert!(swaps_between(&v(&[("a", "1")]), &v(&[("a", "1")]), 7).is_empty());
    }
}
