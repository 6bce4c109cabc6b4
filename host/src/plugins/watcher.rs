//! Hot reload: a `notify` watcher on the plugin directory.
//!
//! The notify callback runs on its own thread; it only notes whether the
//! event finished a module and pokes a bounded channel of capacity one
//! (`try_send`: a poke already waiting covers this one). The async side
//! debounces (waits for the directory to be quiet) and rescans the whole
//! directory, which is right both for editors that write in place (several
//! events, then quiet; a half-written file fails to compile and the old
//! version keeps running until the next event) and for deploys that rename a
//! finished file into place.
//!
//! How long the quiet must be depends on the last event: after one that
//! finishes a module ([`finishes_a_module`]: the close of a `.wasm` file
//! opened for writing, a rename to a `.wasm` name) the module is whole, and
//! deploys write it last (its manifest first), so [`SETTLED`] only gathers
//! the stragglers of the same deploy; after any other event (a create, a
//! write, a finished manifest) more is likely coming, and [`DEBOUNCE`] waits
//! for it. A swap waits for this quiet, so it is kept short where it can be.
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

/// Quiet time before reloading after any event but one that finished a
/// module.
pub const DEBOUNCE: Duration = Duration::from_millis(50);
/// Quiet time before reloading after an event that finished a module.
pub const SETTLED: Duration = Duration::from_millis(5);

/// Watches the plugin directory until `stop`; returns at once without one.
pub async fn run(plugins: Arc<PluginHost>, stop: CancellationToken) {
    let Some(dir) = plugins.dir().map(ToOwned::to_owned) else {
        return;
    };
    let (poke, mut poked) = mpsc::channel::<()>(1);
    // Whether the latest change finished a module; written before each poke.
    let last_settled = Arc::new(AtomicBool::new(false));
    let settled = last_settled.clone();
    let watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if let Ok(event) = event
            && is_change(&event.kind)
        {
            tracing::trace!(kind = ?event.kind, paths = ?event.paths, "plugin directory changed");
            settled.store(finishes_a_module(&event), Ordering::Release);
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

/// Whether an event leaves a plugin's module whole: the close of a `.wasm`
/// file opened for writing, or a rename whose new name is a `.wasm` file.
fn finishes_a_module(event: &notify::Event) -> bool {
    let finishes = matches!(
        event.kind,
        EventKind::Access(AccessKind::Close(AccessMode::Write))
            | EventKind::Modify(ModifyKind::Name(RenameMode::To | RenameMode::Both))
    );
    // A rename's event names the old path, then the new one.
    let module = event
        .paths
        .last()
        .is_some_and(|path| path.extension().is_some_and(|ext| ext == "wasm"));
    finishes && module
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
    fn a_module_closed_after_writing_or_renamed_into_place_is_finished_and_nothing_else() {
        let event = |kind: EventKind, paths: &[&str]| {
            let mut event = notify::Event::new(kind);
            event.paths = paths.iter().map(std::path::PathBuf::from).collect();
            event
        };
        let close = EventKind::Access(AccessKind::Close(AccessMode::Write));
        let renamed = EventKind::Modify(ModifyKind::Name(RenameMode::Both));
        let finished = [
            event(close, &["/p/a.wasm"]),
            event(
                EventKind::Modify(ModifyKind::Name(RenameMode::To)),
                &["/p/a.wasm"],
            ),
            event(renamed, &["/p/.a.wasm.partial", "/p/a.wasm"]),
        ];
        for e in &finished {
            assert!(finishes_a_module(e), "{e:?}");
        }
        let unfinished = [
            // More of the module is coming.
            event(EventKind::Create(CreateKind::File), &["/p/a.wasm"]),
            event(
                EventKind::Modify(ModifyKind::Data(DataChange::Any)),
                &["/p/a.wasm"],
            ),
            event(EventKind::Modify(ModifyKind::Any), &["/p/a.wasm"]),
            // Written aside, not yet in place.
            event(close, &["/p/.a.wasm.partial"]),
            event(
                EventKind::Modify(ModifyKind::Name(RenameMode::From)),
                &["/p/.a.wasm.partial"],
            ),
            event(renamed, &["/p/a.wasm", "/p/a.wasm.old"]),
            // A manifest comes before its module.
            event(close, &["/p/a.toml"]),
            event(renamed, &["/p/a.partial", "/p/a.toml"]),
            event(EventKind::Remove(RemoveKind::File), &["/p/a.wasm"]),
        ];
        for e in &unfinished {
            assert!(!finishes_a_module(e), "{e:?}");
        }
    }
}
