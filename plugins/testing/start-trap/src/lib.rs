//! Test guest: a valid filter whose start code traps. A component's start
//! function (`_initialize`) executes when it is instantiated, so only a
//! loader that instantiates can refuse it.

use imhost_sdk::filter::{Filter, Message, Verdict};

struct StartTrap;

impl Filter for StartTrap {
    fn check(_message: Message) -> Verdict {
        Verdict::Deliver
    }
}

imhost_sdk::export_filter!(StartTrap);

/// A reactor's `_initialize` is the component's start function: it runs at
/// instantiation, before any hook is called.
#[unsafe(export_name = "_initialize")]
extern "C" fn trap_at_start() {
    core::arch::wasm32::unreachable()
}
