//! `GET /metrics`: the node in the Prometheus text format.
//!
//! One `prometheus::Registry` per node (several nodes may share a process, in
//! tests), holding collectors that read what the node already keeps at scrape
//! time, so nothing is counted twice:
//! - [`Stats`]: every counter as `imhost_<name>_total`, and
//!   `imhost_connections` as a gauge; the HELP text is the counter's doc.
//! - the plugins (`PluginHost::list`): per plugin, calls, errors, timeouts,
//!   memory-limit hits and traps as counters, a call-latency histogram, and
//!   its state. A swap starts the new version's counters at zero (Prometheus
//!   reads that as a counter reset); `imhost_plugin_loaded_timestamp_seconds`
//!   says when the running version came, and
//!   `imhost_plugin_served_after_seconds` how long it took from the rescan
//!   reading its file to serving; node-wide, the optimized builds
//!   stopped for a swap (`imhost_plugin_builds_paused_total`).
//! - Redis (cluster mode): `imhost_redis_up` and a round-trip histogram, from
//!   a PING every few seconds ([`run_redis_probe`]).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use prometheus::core::{Collector, Desc};
use prometheus::proto::{self, LabelPair, MetricFamily, MetricType};
use prometheus::{Encoder, Histogram, HistogramOpts, IntGauge, Registry, TextEncoder};
use tokio_util::sync::CancellationToken;

use crate::cluster::Presence;
use crate::plugins::PluginHost;
use crate::plugins::loaded::LATENCY_BUCKETS_US;
use crate::stats::Stats;

/// How often the Redis probe pings.
const REDIS_PROBE_INTERVAL: Duration = Duration::from_secs(5);

/// The node's metrics; see the module docs.
pub struct Metrics {
    registry: Registry,
    redis_up: IntGauge,
    redis_rtt: Histogram,
}

impl Metrics {
    pub fn new(stats: Arc<Stats>, plugins: Arc<PluginHost>) -> Self {
        let registry = Registry::new();
        let redis_up = IntGauge::new(
            "imhost_redis_up",
            "1 when the last PING to Redis was answered (cluster mode)",
        )
        .expect("valid metric name");
        let redis_rtt = Histogram::with_opts(
            HistogramOpts::new(
                "imhost_redis_rtt_seconds",
                "Round trip of a PING to Redis (cluster mode)",
            )
            .buckets(vec![
                0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0,
            ]),
        )
        .expect("valid metric name");
        for collector in [
            Box::new(StatsCollector::new(stats)) as Box<dyn Collector>,
            Box::new(PluginCollector::new(plugins)),
            Box::new(redis_up.clone()),
            Box::new(redis_rtt.clone()),
        ] {
            registry
                .register(collector)
                .expect("metric names are unique");
        }
        Self {
            registry,
            redis_up,
            redis_rtt,
        }
    }

    /// The Prometheus text exposition of everything.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        if let Err(err) = TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            tracing::warn!(cause = %err, "metrics not encoded");
        }
        String::from_utf8(out).unwrap_or_default()
    }
}

/// Content type of [`Metrics::render`].
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4";

/// Pings Redis every few seconds for `imhost_redis_up` and the round-trip
/// histogram, until `stop`.
pub async fn run_redis_probe(
    metrics: Arc<Metrics>,
    presence: Arc<dyn Presence>,
    stop: CancellationToken,
) {
    let mut ticks = tokio::time::interval(REDIS_PROBE_INTERVAL);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = ticks.tick() => {
                let started = Instant::now();
                let answered = tokio::time::timeout(REDIS_PROBE_INTERVAL, presence.ping()).await;
                if matches!(answered, Ok(Ok(()))) {
                    metrics.redis_up.set(1);
                    metrics.redis_rtt.observe(started.elapsed().as_secs_f64());
                } else {
                    metrics.redis_up.set(0);
                }
            }
        }
    }
}

fn family(name: String, help: &str, kind: MetricType, metrics: Vec<proto::Metric>) -> MetricFamily {
    let mut family = MetricFamily::default();
    family.set_name(name);
    family.set_help(help.to_owned());
    family.set_field_type(kind);
    family.set_metric(metrics);
    family
}

fn counter(value: f64, labels: Vec<LabelPair>) -> proto::Metric {
    let mut counter = proto::Counter::default();
    counter.set_value(value);
    let mut metric = proto::Metric::default();
    metric.set_counter(counter);
    metric.set_label(labels);
    metric
}

fn gauge(value: f64, labels: Vec<LabelPair>) -> proto::Metric {
    let mut gauge = proto::Gauge::default();
    gauge.set_value(value);
    let mut metric = proto::Metric::from_gauge(gauge);
    metric.set_label(labels);
    metric
}

fn label(name: &str, value: &str) -> LabelPair {
    let mut pair = LabelPair::default();
    pair.set_name(name.to_owned());
    pair.set_value(value.to_owned());
    pair
}

/// The gauges among [`Stats`] (the rest are counters).
const STATS_GAUGES: [&str; 1] = ["connections"];

/// [`Stats`], read at scrape time.
struct StatsCollector {
    stats: Arc<Stats>,
    descs: Vec<Desc>,
}

impl StatsCollector {
    fn new(stats: Arc<Stats>) -> Self {
        let descs = stats
            .each()
            .into_iter()
            .map(|(name, help, _)| {
                Desc::new(
                    stats_metric_name(name),
                    help.trim().to_owned(),
                    Vec::new(),
                    HashMap::new(),
                )
                .expect("valid metric name")
            })
            .collect();
        Self { stats, descs }
    }
}

fn stats_metric_name(name: &str) -> String {
    if STATS_GAUGES.contains(&name) {
        format!("imhost_{name}")
    } else {
        format!("imhost_{name}_total")
    }
}

impl Collector for StatsCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        self.stats
            .each()
            .into_iter()
            .map(|(name, help, value)| {
                let (kind, metric) = if STATS_GAUGES.contains(&name) {
                    (MetricType::GAUGE, gauge(value as f64, vec![]))
                } else {
                    (MetricType::COUNTER, counter(value as f64, vec![]))
                };
                family(stats_metric_name(name), help.trim(), kind, vec![metric])
            })
            .collect()
    }
}

/// The plugins' rows, read at scrape time.
struct PluginCollector {
    plugins: Arc<PluginHost>,
    descs: Vec<Desc>,
}

/// (name, help) of the per-plugin counters, read from `PluginInfo`.
const PLUGIN_COUNTERS: [(&str, &str); 5] = [
    (
        "imhost_plugin_calls_total",
        "Calls to the running version of a plugin",
    ),
    (
        "imhost_plugin_errors_total",
        "Calls that failed (any reason)",
    ),
    (
        "imhost_plugin_timeouts_total",
        "Calls stopped at the plugin's time limit",
    ),
    (
        "imhost_plugin_memory_limits_total",
        "Calls stopped at the plugin's memory limit",
    ),
    ("imhost_plugin_traps_total", "Calls that trapped"),
];
const PLUGIN_STATE: &str = "imhost_plugin_state";
const PLUGIN_LOADED: &str = "imhost_plugin_loaded_timestamp_seconds";
const PLUGIN_SERVED_AFTER: &str = "imhost_plugin_served_after_seconds";
const PLUGIN_SERVED_AFTER_HELP: &str =
    "From reading the running version's file to its first build serving (a swap's wait)";
const PLUGIN_LATENCY: &str = "imhost_plugin_call_duration_seconds";
const BUILDS_PAUSED: &str = "imhost_plugin_builds_paused_total";
const BUILDS_PAUSED_HELP: &str = "Optimized plugin builds stopped while a swap's own build ran";
/// Every state a plugin row can have (`PluginInfo::state`).
const PLUGIN_STATES: [&str; 4] = ["active", "switched_off", "compiling", "failed"];

impl PluginCollector {
    fn new(plugins: Arc<PluginHost>) -> Self {
        let mut descs: Vec<Desc> = PLUGIN_COUNTERS
            .iter()
            .map(|(name, help)| plugin_desc(name, help))
            .collect();
        descs.push(plugin_desc(
            PLUGIN_STATE,
            "1 for the plugin's current state (active, switched_off, compiling, failed)",
        ));
        descs.push(plugin_desc(
            PLUGIN_LOADED,
            "When the running version was loaded",
        ));
        descs.push(plugin_desc(PLUGIN_SERVED_AFTER, PLUGIN_SERVED_AFTER_HELP));
        descs.push(plugin_desc(
            PLUGIN_LATENCY,
            "Duration of calls to the running version",
        ));
        descs.push(
            Desc::new(
                BUILDS_PAUSED.to_owned(),
                BUILDS_PAUSED_HELP.to_owned(),
                Vec::new(),
                HashMap::new(),
            )
            .expect("a valid metric name"),
        );
        Self { plugins, descs }
    }
}

fn plugin_desc(name: &str, help: &str) -> Desc {
    Desc::new(
        name.to_owned(),
        help.to_owned(),
        vec!["plugin".to_owned()],
        HashMap::new(),
    )
    .expect("valid metric name")
}

impl Collector for PluginCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let rows = self.plugins.list();
        let mut families = Vec::new();
        for (i, (name, help)) in PLUGIN_COUNTERS.iter().enumerate() {
            let metrics = rows
                .iter()
                .map(|row| {
                    let value = [
                        row.calls,
                        row.errors,
                        row.timeouts,
                        row.memory_limits,
                        row.traps,
                    ][i];
                    counter(value as f64, vec![label("plugin", &row.name)])
                })
                .collect();
            families.push(family(
                (*name).to_owned(),
                help,
                MetricType::COUNTER,
                metrics,
            ));
        }
        let states = rows
            .iter()
            .flat_map(|row| {
                PLUGIN_STATES.iter().map(move |state| {
                    gauge(
                        f64::from(u8::from(row.state == *state)),
                        vec![label("plugin", &row.name), label("state", state)],
                    )
                })
            })
            .collect();
        families.push(family(
            PLUGIN_STATE.to_owned(),
            "1 for the plugin's current state (active, switched_off, compiling, failed)",
            MetricType::GAUGE,
            states,
        ));
        let loaded = rows
            .iter()
            .filter(|row| row.loaded_at_ms > 0)
            .map(|row| {
                gauge(
                    row.loaded_at_ms as f64 / 1000.0,
                    vec![label("plugin", &row.name)],
                )
            })
            .collect();
        families.push(family(
            PLUGIN_LOADED.to_owned(),
            "When the running version was loaded",
            MetricType::GAUGE,
            loaded,
        ));
        let served_after = rows
            .iter()
            .filter_map(|row| {
                let ms = row.served_after_ms?;
                Some(gauge(ms as f64 / 1000.0, vec![label("plugin", &row.name)]))
            })
            .collect();
        families.push(family(
            PLUGIN_SERVED_AFTER.to_owned(),
            PLUGIN_SERVED_AFTER_HELP,
            MetricType::GAUGE,
            served_after,
        ));
        let latency = rows
            .iter()
            .filter(|row| !row.latency.is_empty())
            .map(|row| {
                histogram(
                    &row.latency,
                    row.time_spent_us,
                    vec![label("plugin", &row.name)],
                )
            })
            .collect();
        families.push(family(
            PLUGIN_LATENCY.to_owned(),
            "Duration of calls to the running version",
            MetricType::HISTOGRAM,
            latency,
        ));
        families.push(family(
            BUILDS_PAUSED.to_owned(),
            BUILDS_PAUSED_HELP,
            MetricType::COUNTER,
            vec![counter(
                crate::plugins::preempt::pauses() as f64,
                Vec::new(),
            )],
        ));
        families
    }
}

/// A histogram from per-bucket counts (the last one past every bound).
fn histogram(per_bucket: &[u64], sum_us: u64, labels: Vec<LabelPair>) -> proto::Metric {
    let mut cumulative = 0;
    let buckets = LATENCY_BUCKETS_US
        .iter()
        .zip(per_bucket)
        .map(|(bound_us, count)| {
            cumulative += count;
            let mut bucket = proto::Bucket::default();
            bucket.set_upper_bound(*bound_us as f64 / 1e6);
            bucket.set_cumulative_count(cumulative);
            bucket
        })
        .collect();
    let total: u64 = per_bucket.iter().sum();
    let mut histogram = proto::Histogram::default();
    histogram.set_bucket(buckets);
    histogram.set_sample_count(total);
    histogram.set_sample_sum(sum_us as f64 / 1e6);
    let mut metric = proto::Metric::default();
    metric.set_histogram(histogram);
    metric.set_label(labels);
    metric
}
