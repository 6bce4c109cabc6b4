//! Background builds yield to swaps.
//!
//! A hot swap waits for the new version's baseline build; an optimized
//! build of another plugin (Cranelift, seconds to tens of seconds for a
//! JavaScript or Python component) is background work. A lower CPU priority
//! is not enough on a small machine: with as many compiler threads as cores,
//! a niced compiler still takes a share of every core, and a 12 MB swap that
//! takes 0.2 s on an idle node took 1.5 s behind one. So while any
//! foreground build runs ([`Foreground`]), every optimized build running in
//! a child process is stopped (`SIGSTOP`), and continued (`SIGCONT`) when the
//! last foreground build is done. The child keeps its progress; only its
//! wall time grows.
//!
//! Signals go only to children this process started and has not reaped: a
//! child is registered from its spawn until its output has been read to the
//! end, and is deregistered (and continued, if stopped) *before* it is
//! waited for, so its PID can never have been reused when it is signalled.
//!
//! A node killed while a child is stopped leaves no stopped orphan: the
//! child is started with a parent-death signal (`SIGKILL`, which ends a
//! stopped process too; `compile::SpawnCompiler`).

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

struct Gate {
    /// Foreground builds running now.
    foreground: usize,
    /// PIDs of the background compilers running now.
    children: Vec<u32>,
}

static GATE: Mutex<Gate> = Mutex::new(Gate {
    foreground: 0,
    children: Vec::new(),
});

/// Times a background build was stopped for a foreground one.
static PAUSES: AtomicU64 = AtomicU64::new(0);

fn gate() -> std::sync::MutexGuard<'static, Gate> {
    GATE.lock().unwrap_or_else(|p| p.into_inner())
}

/// Background builds stopped for a foreground build since start (a
/// counter for `/metrics`).
pub fn pauses() -> u64 {
    PAUSES.load(Ordering::Relaxed)
}

fn signal(pid: u32, signal: libc::c_int) {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return;
    };
    // SAFETY: kill takes plain integers and touches no memory of ours; the
    // PID is a child of ours that has not been reaped (see the module doc).
    #[allow(unsafe_code)]
    let done = unsafe { libc::kill(pid, signal) };
    if done != 0 {
        tracing::debug!(pid, signal, "could not signal a background compiler");
    }
}

/// Held while a build that a swap waits for runs: background builds are
/// stopped from the first such hold until the last one is dropped.
#[must_use = "background builds are continued when this is dropped"]
pub struct Foreground(());

impl Foreground {
    pub fn hold() -> Foreground {
        let mut gate = gate();
        gate.foreground += 1;
        if gate.foreground == 1 {
            for &pid in &gate.children {
                signal(pid, libc::SIGSTOP);
                PAUSES.fetch_add(1, Ordering::Relaxed);
            }
        }
        Foreground(())
    }
}

impl Drop for Foreground {
    fn drop(&mut self) {
        let mut gate = gate();
        gate.foreground -= 1;
        if gate.foreground == 0 {
            for &pid in &gate.children {
                signal(pid, libc::SIGCONT);
            }
        }
    }
}

/// A background compiler process, registered so foreground builds can stop
/// it. Drop it once the child's output is read to the end, before waiting
/// for the child.
pub struct Background {
    pid: u32,
}

impl Background {
    /// Registers the child `pid`, stopping it at once if a foreground build
    /// is running.
    pub fn register(pid: u32) -> Background {
        let mut gate = gate();
        gate.children.push(pid);
        if gate.foreground > 0 {
            signal(pid, libc::SIGSTOP);
            PAUSES.fetch_add(1, Ordering::Relaxed);
        }
        Background { pid }
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        let mut gate = gate();
        gate.children.retain(|&pid| pid != self.pid);
        // A child stopped after it closed its output would never exit.
        if gate.foreground > 0 {
            signal(self.pid, libc::SIGCONT);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The state letter of `pid` in `/proc/PID/stat` (`T`: stopped).
    fn state(pid: u32) -> char {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
        // "PID (COMM) S ...": the state follows the last ')'.
        let after = &stat[stat.rfind(')').expect("comm") + 2..];
        after.chars().next().expect("state")
    }

    fn wait_for_state(pid: u32, stopped: bool) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while (state(pid) == 'T') != stopped {
            assert!(
                std::time::Instant::now() < deadline,
                "pid {pid} never became {}",
                if stopped { "stopped" } else { "running" }
            );
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }

    #[test]
    fn a_background_child_is_stopped_while_a_foreground_build_runs() {
        let mut early = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("sleep");
        let early_bg = Background::register(early.id());
        assert_ne!(state(early.id()), 'T');
        let before = pauses();

        let first = Foreground::hold();
        wait_for_state(early.id(), true);
        // A child started during a foreground build is stopped at once.
        let mut late = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("sleep");
        let late_bg = Background::register(late.id());
        wait_for_state(late.id(), true);
        // A second foreground build overlapping the first keeps them stopped
        // when the first ends.
        let second = Foreground::hold();
        drop(first);
        assert_eq!(state(early.id()), 'T');
        drop(second);
        wait_for_state(early.id(), false);
        wait_for_state(late.id(), false);
        assert!(pauses() >= before + 2);

        // Deregistered while stopped: continued, so it can be waited for.
        let third = Foreground::hold();
        wait_for_state(late.id(), true);
        drop(late_bg);
        wait_for_state(late.id(), false);
        drop(third);

        drop(early_bg);
        for child in [&mut early, &mut late] {
            child.kill().expect("kill");
            child.wait().expect("reap");
        }
    }
}
