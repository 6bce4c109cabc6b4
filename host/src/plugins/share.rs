//! Each plugin's share of the engine's pooled slots.
//!
//! The pooling allocator pre-reserves a fixed number of component instances,
//! core instances, memories and tables per engine ([`TOTAL`]), shared by
//! every plugin of that compiler tier. Left first-come, first-served, one
//! plugin with a large `pool` (or a component of many memories) could take
//! them all, and every other plugin's next instantiation, an auth call
//! included, would fail. So a version *reserves* what its `pool` of
//! instances can ever hold (`pool` × what one instance of the component
//! needs) when it is built, and is refused, with the figures, when that does
//! not fit beside the other plugins' reservations; a running version never
//! lacks a slot because of another plugin.
//!
//! Only three quarters of the pool can be reserved: the rest is headroom
//! for the old version of a plugin whose calls are still finishing after a
//! swap (a new version's reservation replaces its predecessor's, see
//! [`reserve`]).
//!
//! What one instance needs is read from the component's sections before it
//! is compiled (core instantiations, memories and tables of its modules),
//! and raised to what wasmtime counts once it is (`resources_required`). A
//! component over the per-instance caps that the store enforces anyway
//! (`MAX_*` in `instance`) is refused at once, with its figure, rather than
//! at its first call.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use wasmtime::component::Component;

use super::engine::Tier;

/// Slots of each kind of the pooling allocator.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Needs {
    pub component_instances: u32,
    pub core_instances: u32,
    pub memories: u32,
    pub tables: u32,
}

/// The pooling allocator's totals, per engine (one engine per tier).
pub const TOTAL: Needs = Needs {
    component_instances: 512,
    core_instances: 16384,
    memories: 512,
    tables: 2048,
};

/// What one instance of a component may create at most (the store's
/// limits: far more than the supported toolchains emit; a Python component
/// has a few dozen core modules).
pub const PER_INSTANCE_MAX: Needs = Needs {
    component_instances: 1,
    core_instances: 256,
    memories: 64,
    tables: 256,
};

impl Needs {
    /// What one instance of the component `wasm` creates, as its sections
    /// declare: read before anything is compiled (milliseconds for 12 MB).
    ///
    /// # Errors
    /// The component needs more than [`PER_INSTANCE_MAX`] of something.
    pub fn declared(wasm: &[u8]) -> Result<Needs, String> {
        let mut needs = Needs {
            component_instances: 1,
            ..Needs::default()
        };
        for payload in wasmparser::Parser::new(0).parse_all(wasm) {
            match payload {
                Ok(wasmparser::Payload::InstanceSection(s)) => {
                    needs.core_instances = needs.core_instances.saturating_add(s.count());
                }
                Ok(wasmparser::Payload::MemorySection(s)) => {
                    needs.memories = needs.memories.saturating_add(s.count());
                }
                Ok(wasmparser::Payload::TableSection(s)) => {
                    needs.tables = needs.tables.saturating_add(s.count());
                }
                _ => {}
            }
        }
        for ((what, n), max) in KINDS
            .iter()
            .zip(needs.counts())
            .zip(PER_INSTANCE_MAX.counts())
        {
            if n > max {
                return Err(format!(
                    "one instance would create {n} {what}; a plugin may have at most {max}"
                ));
            }
        }
        Ok(needs)
    }

    /// These needs, raised to what wasmtime counts for the compiled
    /// `component` (a module instantiated twice counts twice there).
    pub fn at_least_required_by(self, component: &Component) -> Needs {
        let Some(required) = component.resources_required() else {
            // Only for components that import core modules, which no
            // plugin can: take the caps.
            return Needs {
                component_instances: 1,
                ..PER_INSTANCE_MAX
            };
        };
        Needs {
            memories: self.memories.max(required.num_memories),
            tables: self.tables.max(required.num_tables),
            ..self
        }
    }

    fn times(self, n: u32) -> Needs {
        Needs {
            component_instances: self.component_instances.saturating_mul(n),
            core_instances: self.core_instances.saturating_mul(n),
            memories: self.memories.saturating_mul(n),
            tables: self.tables.saturating_mul(n),
        }
    }

    fn plus(self, other: Needs) -> Needs {
        Needs {
            component_instances: self.component_instances + other.component_instances,
            core_instances: self.core_instances + other.core_instances,
            memories: self.memories + other.memories,
            tables: self.tables + other.tables,
        }
    }

    /// The four counts, in the order of [`KINDS`].
    fn counts(self) -> [u32; 4] {
        [
            self.component_instances,
            self.core_instances,
            self.memories,
            self.tables,
        ]
    }
}

/// What each of [`Needs::counts`] counts.
const KINDS: [&str; 4] = [
    "component instances",
    "core instances",
    "memories",
    "tables",
];

/// Three quarters of [`TOTAL`]: what reservations may hold together.
fn reservable() -> Needs {
    let three_quarters = |n: u32| n - n / 4;
    Needs {
        component_instances: three_quarters(TOTAL.component_instances),
        core_instances: three_quarters(TOTAL.core_instances),
        memories: three_quarters(TOTAL.memories),
        tables: three_quarters(TOTAL.tables),
    }
}

struct Reservation {
    tier: Tier,
    name: String,
    id: u64,
    needs: Needs,
}

static RESERVED: Mutex<Vec<Reservation>> = Mutex::new(Vec::new());
static NEXT_ID: AtomicU64 = AtomicU64::new(0);

/// A version's reserved slots, released when it is dropped (with the
/// version's last call).
#[derive(Debug)]
pub struct Share {
    id: u64,
    pub needs: Needs,
}

/// Reserves `pool` instances' worth of `per_instance` for plugin `name` in
/// `tier`. Versions of the same name do not count against it: a new version
/// replaces the old, which finishes its calls in the headroom.
///
/// # Errors
/// It does not fit beside the other plugins' reservations (the message has
/// the figures).
pub fn reserve(tier: Tier, name: &str, per_instance: Needs, pool: usize) -> Result<Share, String> {
    let pool = u32::try_from(pool.max(1)).unwrap_or(u32::MAX);
    let needs = per_instance.times(pool);
    let mut reserved = RESERVED.lock().unwrap_or_else(|p| p.into_inner());
    let others = reserved
        .iter()
        .filter(|r| r.tier == tier && r.name != name)
        .fold(Needs::default(), |sum, r| sum.plus(r.needs));
    let room = KINDS
        .iter()
        .zip(needs.counts())
        .zip(others.counts())
        .zip(reservable().counts());
    for (((what, need), used), max) in room {
        if used.saturating_add(need) > max {
            return Err(format!(
                "no room in the engine's pool: `pool` = {pool} instances need {need} {what}, \
                 and {} of {max} are left beside the other plugins; lower `pool` or \
                 unload a plugin",
                max.saturating_sub(used)
            ));
        }
    }
    let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
    reserved.push(Reservation {
        tier,
        name: name.to_owned(),
        id,
        needs,
    });
    Ok(Share { id, needs })
}

impl Drop for Share {
    fn drop(&mut self) {
        let mut reserved = RESERVED.lock().unwrap_or_else(|p| p.into_inner());
        reserved.retain(|r| r.id != self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ONE_MEMORY: Needs = Needs {
        component_instances: 1,
        core_instances: 3,
        memories: 1,
        tables: 1,
    };

    /// A component of `n` core modules, each with a memory, each instantiated.
    fn memories(n: usize) -> String {
        let modules: String = (0..n)
            .map(|i| format!("(core module $m{i} (memory 1)) (core instance (instantiate $m{i}))"))
            .collect();
        format!("(component {modules})")
    }

    #[test]
    fn an_instance_is_measured_and_one_of_too_many_memories_is_refused() {
        let wasm = wat::parse_str(memories(3)).expect("wat");
        let needs = Needs::declared(&wasm).expect("fits");
        assert_eq!((needs.memories, needs.core_instances), (3, 3));
        let engine = super::super::engine::engine(Tier::Baseline);
        let component = Component::new(engine, &wasm).expect("component");
        assert_eq!(needs.at_least_required_by(&component), needs);
        let wasm = wat::parse_str(memories(PER_INSTANCE_MAX.memories as usize + 6)).expect("wat");
        let refused = Needs::declared(&wasm).expect_err("too many");
        assert!(refused.contains("70 memories"), "{refused}");
    }

    #[test]
    fn a_plugin_cannot_reserve_what_others_hold_and_a_new_version_replaces_its_own() {
        // Names of this test only: the table is process-wide.
        let tier = Tier::Baseline;
        let max = reservable();
        let hog = reserve(tier, "share-test-hog", ONE_MEMORY, 150).expect("fits");
        let second = reserve(tier, "share-test-other", ONE_MEMORY, 150).expect("fits");
        let refused = reserve(tier, "share-test-third", ONE_MEMORY, 150).expect_err("full");
        assert!(refused.contains("component instances"), "{refused}");
        assert!(
            refused.contains(&format!("of {}", max.component_instances)),
            "{refused}"
        );
        // A new version of a plugin does not count its old version.
        let new_version = reserve(tier, "share-test-hog", ONE_MEMORY, 150).expect("replaces");
        // The other tier has pools of its own.
        let other_tier =
            reserve(Tier::Optimized, "share-test-third", ONE_MEMORY, 150).expect("own pool");
        drop((hog, second, new_version, other_tier));
        reserve(tier, "share-test-third", ONE_MEMORY, 150).expect("released");
    }
}
