//! The process-wide wasmtime engines, their epoch ticker and linkers.
//!
//! Two engines, one per compiler tier, because a compiled component belongs
//! to the engine (and so the compiler) that made it:
//!
//! - [`Tier::Baseline`] (Winch, wasmtime's single-pass compiler) compiles a
//!   12 MB JavaScript component about five times faster than Cranelift, and
//!   its code runs slower. A new plugin serves from it first.
//! - [`Tier::Optimized`] (Cranelift) is compiled in the background and swapped
//!   in when ready; it is what the artifact cache keeps.
//!
//! Both use the pooling allocator (instances reuse pre-reserved slots, so a
//! warm-up is a few page faults, not an mmap) and epoch interruption: one
//! ticker thread advances both engines every [`EPOCH_TICK`], and a call's
//! deadline is counted in ticks. The ticker advances the epoch only while
//! plugin code runs (a [`Ticking`] guard is held around every call and
//! instantiation, which costs the call an atomic increment and nothing
//! else). In between it dozes, looking every [`DOZE`] for running code, and
//! after [`PARK_AFTER`] without any it parks until the next call wakes it:
//! - an idle node does not wake for it at all;
//! - a busy node pays at most a hundred wake-ups a second for it, not a
//!   thousand (ticking on between calls) nor one per call (parking between
//!   calls: a futex wake and a context switch each, 3 % of a node's CPU in a
//!   connect storm with two plugin calls per connect);
//! - a runaway call is interrupted at most [`DOZE`] after its deadline.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use serde::Serialize;
use wasmtime::component::Linker;
use wasmtime::{Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig, Strategy};

use super::instance::PluginState;

/// How often the epoch advances; deadlines are counted in these ticks.
pub const EPOCH_TICK: Duration = Duration::from_millis(1);

/// Which compiler made a plugin's code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Tier {
    /// Winch: compiles fast, runs slower. Served first, never cached.
    Baseline,
    /// Cranelift: compiles slower, runs fast. Cached on disk.
    Optimized,
}

impl Tier {
    pub fn as_str(self) -> &'static str {
        match self {
            Tier::Baseline => "baseline",
            Tier::Optimized => "optimized",
        }
    }
}

impl std::str::FromStr for Tier {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "baseline" => Ok(Tier::Baseline),
            "optimized" => Ok(Tier::Optimized),
            other => Err(format!("unknown tier {other:?} (baseline or optimized)")),
        }
    }
}

/// The engine of `tier`, built on first use.
pub fn engine(tier: Tier) -> &'static Engine {
    cell(tier).get_or_init(|| {
        start_ticker();
        let engine = build_engine(tier, true).or_else(|err| {
            tracing::warn!(cause = %err, "pooling allocator unavailable; using on-demand allocation");
            build_engine(tier, false)
        });
        match engine {
            Ok(engine) => engine,
            Err(err) => panic!("cannot configure wasmtime ({}): {err}", tier.as_str()),
        }
    })
}

/// While no plugin code runs, how often the ticker looks for some.
const DOZE: Duration = Duration::from_millis(10);
/// The ticker parks after this long without plugin code running.
const PARK_AFTER: Duration = Duration::from_secs(1);

/// Plugin calls and instantiations running now, in the whole process.
static RUNNING: AtomicUsize = AtomicUsize::new(0);
/// The ticker waits for [`WAKE`] (set under [`WAKE_LOCK`]).
static PARKED: AtomicBool = AtomicBool::new(false);
/// Wakes the parked ticker; the mutex makes the check-then-wait atomic.
static WAKE_LOCK: Mutex<()> = Mutex::new(());
static WAKE: Condvar = Condvar::new();

/// Held while plugin code runs: the epoch ticker ticks while any is held.
#[must_use = "the ticker stops when the guard is dropped"]
pub struct Ticking(());

/// Starts (or keeps) the epoch ticking until the guard drops.
pub fn ticking() -> Ticking {
    // With the ticker's store of PARKED and load of RUNNING (both SeqCst),
    // either it sees this call running and does not park, or this sees it
    // parked and wakes it.
    RUNNING.fetch_add(1, Ordering::SeqCst);
    if PARKED.load(Ordering::SeqCst) {
        let _parked = WAKE_LOCK.lock().unwrap_or_else(|p| p.into_inner());
        WAKE.notify_one();
    }
    Ticking(())
}

impl Drop for Ticking {
    fn drop(&mut self) {
        RUNNING.fetch_sub(1, Ordering::SeqCst);
    }
}

/// One thread advances the epoch of every engine built so far, while plugin
/// code runs.
fn start_ticker() {
    static TICKER: OnceLock<()> = OnceLock::new();
    TICKER.get_or_init(|| {
        std::thread::Builder::new()
            .name("imhost-epoch".into())
            .spawn(|| {
                let mut idle_since: Option<Instant> = None;
                loop {
                    if RUNNING.load(Ordering::SeqCst) == 0 {
                        let idle = *idle_since.get_or_insert_with(Instant::now);
                        if idle.elapsed() < PARK_AFTER {
                            std::thread::sleep(DOZE);
                            continue;
                        }
                        let mut parked = WAKE_LOCK.lock().unwrap_or_else(|p| p.into_inner());
                        PARKED.store(true, Ordering::SeqCst);
                        while RUNNING.load(Ordering::SeqCst) == 0 {
                            parked = WAKE.wait(parked).unwrap_or_else(|p| p.into_inner());
                        }
                        PARKED.store(false, Ordering::SeqCst);
                    }
                    idle_since = None;
                    // Only engines already built: ticking must not build one.
                    for tier in [Tier::Baseline, Tier::Optimized] {
                        if let Some(engine) = cell(tier).get() {
                            engine.increment_epoch();
                        }
                    }
                    std::thread::sleep(EPOCH_TICK);
                }
            })
            .ok();
    });
}

/// Where the engine of `tier` lives once built.
fn cell(tier: Tier) -> &'static OnceLock<Engine> {
    static BASELINE: OnceLock<Engine> = OnceLock::new();
    static OPTIMIZED: OnceLock<Engine> = OnceLock::new();
    match tier {
        Tier::Baseline => &BASELINE,
        Tier::Optimized => &OPTIMIZED,
    }
}

fn build_engine(tier: Tier, pooling: bool) -> wasmtime::Result<Engine> {
    let mut config = Config::new();
    config.wasm_component_model(true);
    config.epoch_interruption(true);
    config.strategy(match tier {
        Tier::Baseline => Strategy::Winch,
        Tier::Optimized => Strategy::Cranelift,
    });
    if tier == Tier::Baseline {
        // The baseline build serves for seconds, until the optimized one is
        // ready: trap messages without wasm offsets are a fair price for a
        // smaller artifact that is quicker to hand over.
        config.generate_address_map(false);
        // Winch compiles the plugin's functions, but the trampolines the
        // host calls them through (one per function a table or an export
        // lets escape: thousands in a JavaScript engine) are Cranelift's,
        // and were a third of a baseline build's CPU. They are a few
        // moves and a call each: built without optimisation and with the
        // single-pass register allocator, a 12 MB JavaScript build takes
        // 12 % less time (`imhost-bench --only-swap`, docs/plugins.md).
        config.cranelift_opt_level(wasmtime::OptLevel::None);
        config.cranelift_regalloc_algorithm(wasmtime::RegallocAlgorithm::SinglePass);
        // Unwind tables only serve native unwinders walking through guest
        // frames; wasmtime's own backtraces and traps do not use them.
        config.native_unwind_info(false);
    }
    if std::env::var_os("IMHOST_WASM_PROFILER").is_some_and(|v| v == "perfmap") {
        // /tmp/perf-PID.map, so `perf report` names plugin functions
        // (docs/operations.md, "Profiling plugins").
        config.profiler(wasmtime::ProfilingStrategy::PerfMap);
    }
    if pooling {
        let mut pool = PoolingAllocationConfig::default();
        // Shared by the plugins of this tier, each within its reserved
        // share (`share`).
        let total = super::share::TOTAL;
        pool.total_component_instances(total.component_instances);
        pool.total_core_instances(total.core_instances);
        pool.total_memories(total.memories);
        pool.total_tables(total.tables);
        pool.max_memory_size(1 << 30);
        pool.max_component_instance_size(1 << 20);
        pool.max_core_instance_size(1 << 20);
        config.allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
    }
    Engine::new(&config)
}

/// The linker plugins of `tier` are instantiated with: WASI (denying what is
/// not granted per store) and the `host` interface. Built once per engine.
pub fn linker(tier: Tier) -> Result<&'static Linker<PluginState>, String> {
    static BASELINE: OnceLock<Result<Linker<PluginState>, String>> = OnceLock::new();
    static OPTIMIZED: OnceLock<Result<Linker<PluginState>, String>> = OnceLock::new();
    let cell = match tier {
        Tier::Baseline => &BASELINE,
        Tier::Optimized => &OPTIMIZED,
    };
    cell.get_or_init(|| {
        let mut linker = Linker::new(engine(tier));
        // WASI imports are provided explicitly: a trap stub for unknown imports
        // would shadow newer versions the linker can otherwise match.
        wasmtime_wasi::p2::add_to_linker_async(&mut linker).map_err(|e| e.to_string())?;
        super::bindings::imhost::plugin::host::add_to_linker::<
            _,
            wasmtime::component::HasSelf<PluginState>,
        >(&mut linker, |state| state)
        .map_err(|e| e.to_string())?;
        Ok(linker)
    })
    .as_ref()
    .map_err(Clone::clone)
}
