//! The one place that defines how tasks learn about shutdown.
//!
//! Shutdown has two phases because SSE streams must outlive sockets: when the
//! node stops, every socket closes with 1001 and its offline event is published,
//! and only then do the event streams end, so a subscriber sees those events.
//! Upgraded WebSockets escape axum's graceful drain (tokio-rs/axum#3003), so
//! socket tasks are tracked here, not by the HTTP server.

use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Cheap to clone; every long-lived task holds one.
#[derive(Clone, Debug, Default)]
pub struct Shutdown {
    /// Cancelled when the node starts shutting down: stop accepting, close sockets.
    stopping: CancellationToken,
    /// Cancelled once sockets are gone (or the grace period ran out): end streams.
    drained: CancellationToken,
    /// Socket and background tasks whose end shutdown waits for.
    tasks: TaskTracker,
}

impl Shutdown {
    pub fn new() -> Self {
        Self::default()
    }

    /// The token cancelled when shutdown begins.
    pub fn stopping(&self) -> &CancellationToken {
        &self.stopping
    }

    /// The token cancelled when sockets have drained.
    pub fn drained(&self) -> &CancellationToken {
        &self.drained
    }

    /// Tracker for tasks that must finish before the node exits.
    pub fn tasks(&self) -> &TaskTracker {
        &self.tasks
    }

    /// Begins shutdown, waits up to `grace` for tracked tasks, then ends streams.
    /// Returns false when the grace period ran out first.
    pub async fn drain(&self, grace: Duration) -> bool {
        self.stopping.cancel();
        self.tasks.close();
        let finished = tokio::time::timeout(grace, self.tasks.wait()).await.is_ok();
        self.drained.cancel();
        finished
    }
}
