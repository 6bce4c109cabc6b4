//! Hot reload: a `notify` watcher on the plugin directory.
//!
//! The notify callback runs on its own thread; it only pokes a bounded
//! channel of capacity one (`try_send`: a poke already waiting covers this
//! one). The async side debounces (waits for the directory to be quiet for
//! [`DEBOUNCE`]) and rescans the whole directory, which is right both for
//! editors that write in place (several events, then quiet; a half-written
//! file fails to compile and the old version keeps running until the next
//! event) and for deploys that rename a finished file into place.

use std::sync::Arc;
use std::time::Duration;

use notify::{RecursiveMode, Watcher};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::PluginHost;

/// Quiet time after the last file event before reloading.
pub const DEBOUNCE: Duration = Duration::from_millis(50);

/// Watches the plugin directory until `stop`; returns at once without one.
pub async fn run(plugins: Arc<PluginHost>, stop: CancellationToken) {
    let Some(dir) = plugins.dir().map(ToOwned::to_owned) else {
        return;
    };
    let (poke, mut poked) = mpsc::channel::<()>(1);
    let watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if event.is_ok() {
            let _ = poke.try_send(());
        }
    });
    let mut watcher = match watcher {
        Ok(watcher) => watcher,
        Err(err) => {
            warn!(cause = %err, "cannot watch the plugin directory; use POST /api/v1/plugins/reload or SIGHUP");
            return;
        }
    };
    if let Err(err) = watcher.watch(&dir, RecursiveMode::NonRecursive) {
        warn!(dir = %dir.display(), cause = %err, "cannot watch the plugin directory");
        return;
    }
    info!(dir = %dir.display(), "watching plugins for changes");
    loop {
        tokio::select! {
            got = poked.recv() => if got.is_none() { return },
            () = stop.cancelled() => return,
        }
        // Debounce: wait until no event came for DEBOUNCE.
        loop {
            tokio::select! {
                got = poked.recv() => if got.is_none() { return },
                () = tokio::time::sleep(DEBOUNCE) => break,
                () = stop.cancelled() => return,
            }
        }
        plugins.reload().await;
    }
}
