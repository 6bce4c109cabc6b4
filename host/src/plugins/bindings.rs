//! Only `bindgen!`: the host side of `imhost:plugin@1.1.0`, from the one copy
//! of the WIT in `plugin-sdk/wit/`.
//!
//! Imports and exports are async: host functions such as `kv-incr` await Redis,
//! and calls into guests run under `call_async` so epoch deadlines can stop
//! them. The world binds every hook; which ones a plugin really exports is
//! found per interface (`GuestIndices::new`), so a filter-only plugin loads.

wasmtime::component::bindgen!({
    path: "../plugin-sdk/wit",
    world: "plugin",
    imports: { default: async },
    exports: { default: async },
});
