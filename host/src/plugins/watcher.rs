//! Hot reload: a `notify` watcher on the plugin directory.
//!
//! The notify callback runs on its own thread; it only notes whether the
//! event finished a file and pokes a bounded channel of capacity one
//! (`try_send`: a poke already waiting covers this one). The async side
//! debounces (waits for the directory to be quiet) and rescans the whole
//! directory, which is right both for editors that write in place (several
//! events, then quiet; a half-written file fails to compile and the old
//! version keeps running until the next event) and for deploys that rename a
//! finished file into place.
//!
//! How long the quiet must be depends on the last event: after one that
//! finishes a file ([`finishes_a_file`]: the close of a file opened for
//! writing, a rename into place) the file is whole, and [`SETTLED`] only
//! gathers the events of the same deploy (a manifest and its module); after
//! any other (a create, a write) more is coming, and [`DEBOUNCE`] waits for
//! it. A swap waits for this quiet, so it is kept short where it can be.
//!
//! Only changes count ([`is_change`]): a rescan reads every plugin file, and
//! reads raise access events, so a watcher that woke on them rescanned
//! itself about twenty times a second, forever, on an idle node.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use notify::event::{AccessKind, AccessMode, EventKind, ModifyKind, RenameMode};
use notify::{RecursiveMode, Watcher};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::PluginHost;

/// Quiet time before reloading after an event that leaves a file unfinished.
pub const DEBOUNCE: Duration = Duration::from_millis(50);
/// Quiet time before reloading after an event that finished a file.
pub const SETTLED: Duration = Duration::from_millis(5);

/// Watches the plugin directory until `stop`; returns at once without one.
pub async fn run(plugins: Arc<PluginHost>, stop: CancellationToken) {
    let Some(dir) = plugins.dir().map(ToOwned::to_owned) else {
        return;
    };
    let (poke, mut poked) = mpsc::channel::<()>(1);
    // Whether the latest change finished a file; written before each poke.
    let last_settled = Arc::new(AtomicBool::new(false));
    let settled = last_settled.clone();
    let watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if let Ok(event) = event
            && is_change(&event.kind)
        {
            tracing::trace!(kind = ?event.kind, paths = ?event.paths, "plugin directory changed");
            settled.store(finishes_a_file(&event.kind), Ordering::Release);
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
        // Debounce: wait until no event came for the quiet the last one asks.
        loop {
            let quiet = if last_settled.load(Ordering::Acquire) {
                SETTLED
            } else {
                DEBOUNCE
            };
            tokio::select! {
                got = poked.recv() => if got.is_none() { return },
                () = tokio::time::sleep(quiet) => break,
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

/// Whether an event leaves a file whole: the close of a file opened for
/// writing, or a rename (the new name of a file written aside).
fn finishes_a_file(kind: &EventKind) -> bool {
    matches!(
        kind,
        EventKind::Access(AccessKind::Close(AccessMode::Write))
            | EventKind::Modify(ModifyKind::Name(RenameMode::To | RenameMode::Both))
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use notify::event::{CreateKind, DataChange, RemoveKind};

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

    #[test]
    fn a_close_after_writing_and_a_rename_into_place_finish_a_file_and_others_do_not() {
        for finished in [
            EventKind::Access(AccessKind::Close(AccessMode::Write)),
            EventKind::Modify(ModifyKind::Name(RenameMode::To)),
            EventKind::Modify(ModifyKind::Name(RenameMode::Both)),
        ] {
            assert!(finishes_a_file(&finished), "{finished:?}");
        }
        for unfinished in [
            EventKind::Create(CreateKind::File),
            EventKind::Modify(ModifyKind::Data(DataChange::Any)),
            EventKind::Modify(ModifyKind::Any),
            EventKind::Modify(ModifyKind::Name(RenameMode::From)),
            EventKind::Remove(RemoveKind::File),
        ] {
            assert!(!finishes_a_file(&unfinished), "{unfinished:?}");
        }
    }
}
