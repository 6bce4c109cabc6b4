//! Heartbeats for every socket of the node from one task.
//!
//! A tokio interval per socket costs a timer entry and wake-ups per socket;
//! here one task sweeps the registry instead. Sockets are split into
//! [`BUCKETS`] by id and one bucket is swept every `interval / BUCKETS`, so
//! each socket is visited once per interval and the pings of a full node are
//! spread over the interval instead of leaving at once. A visit closes a
//! socket silent for `timeout` (1008) and asks the others to ping.
//!
//! The same task closes every socket (1001) when the node starts shutting
//! down.

use std::time::Duration;

use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;

use super::handle::CloseReason;
use crate::registry::Registry;
use crate::stats::Stats;

/// How many slices one heartbeat interval is cut into.
pub const BUCKETS: u64 = 16;

/// Sweeps until `stopping` fires, then closes every socket.
pub async fn run(
    registry: Registry,
    stats: std::sync::Arc<Stats>,
    interval: Duration,
    timeout: Duration,
    stopping: CancellationToken,
) {
    let step = (interval / BUCKETS as u32).max(Duration::from_millis(1));
    let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + step, step);
    ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let timeout_ms = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX);
    let mut bucket = 0;
    loop {
        tokio::select! {
            () = stopping.cancelled() => break,
            _ = ticks.tick() => {
                let deadline = registry.now_ms().saturating_sub(timeout_ms);
                let closed = registry.heartbeat(bucket, BUCKETS, deadline);
                Stats::add(&stats.heartbeat_timeouts, closed as u64);
                bucket = (bucket + 1) % BUCKETS;
            }
        }
    }
    registry.close_all(CloseReason::Shutdown);
}
