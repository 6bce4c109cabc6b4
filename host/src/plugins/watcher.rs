//! Hot reload: a `notify` watcher on the plugin directory.
//!
//! The notify callback runs on its own thread; it only pokes a bounded
//! channel of capacity one (`try_send`: a poke already waiting covers this
//! one). The async side debounces (waits for the directory to be quiet for
//! [`DEBOUNCE`]) and rescans the whole directory, which is right both for
//! editors that write in place (several events, then quiet; a half-written
//! file fails to compile and the old version keeps running until the next
//! event) and for deploys that rename a finished file into place.
//!
//! Only changes count ([`is_change`]): a rescan reads every plugin file, and
//! reads raise access events, so a watcher that woke on them rescanned
//! itself about twenty times a second, forever, on an idle node.

use std::sync::Arc;
use std::time::Duration;

use notify::event::{AccessKind, AccessMode, EventKind};
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
        if event.is_ok_and(|event| is_change(&event.kind)) {
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

/// Whether an event may have changed the directory's contents: anything but
/// an access, except the close of a file opened for writing (an editor's
/// in-place save ends with it).
fn is_change(kind: &EventKind) -> bool {
    match kind {
        EventKind::Access(access) => *access == AccessKind::Close(AccessMode::Write),
        _ => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use notify::event::{CreateKind, ModifyKind, RemoveKind, RenameMode};

    #[test]
    fn reads_are_not_changes_and_writes_are() {
        for read in [
            AccessKind::Open(AccessMode::Read),
            AccessKind::Open(AccessMode::Any),
            AccessKind::Read,
            AccessKind::Close(AccessMode::Read),
            AccessKind::Any,
        ] {
            assert!(!is_change(&EventKind::Access(read)), "{read:?}");
        }
        for change in [
            EventKind::Access(AccessKind::Close(AccessMode::Write)),
            EventKind::Create(CreateKind::File),
            EventKind::Modify(ModifyKind::Name(RenameMode::To)),
            EventKind::Modify(ModifyKind::Any),
            EventKind::Remove(RemoveKind::File),
        ] {
            assert!(is_change(&change), "{change:?}");
        }
    }
}
