//! `imhost-sdk`: write imhost plugins in Rust.
//!
//! A plugin is a WebAssembly component (built for `wasm32-wasip2`) that exports
//! any non-empty subset of the hooks of the `imhost:plugin@1.1.0` ABI and may
//! call the host's functions. This crate is a thin layer over wit-bindgen: one
//! module per hook with its types and its `Guest` trait, an export macro per
//! hook, and the host functions with typed configuration.
//!
//! A complete filter plugin:
//!
//! ```ignore
//! use imhost_sdk::filter::{Filter, Message, Verdict};
//!
//! struct NoShouting;
//!
//! impl Filter for NoShouting {
//!     fn check(message: Message) -> Verdict {
//!         if message.content.chars().any(|c| c.is_uppercase()) {
//!             Verdict::Replace(message.content.to_lowercase())
//!         } else {
//!             Verdict::Deliver
//!         }
//!     }
//! }
//!
//! imhost_sdk::export_filter!(NoShouting);
//! ```
//!
//! Build it with `cargo build --target wasm32-wasip2 --release` and drop the
//! `.wasm` into the host's plugin directory. `plugins/template` in the imhost
//! repository is a starting point; docs/plugins.md is the full guide.
//!
//! # Layout
//! - [`auth`], [`filter`], [`events`], [`inbound`] — one hook each: its types,
//!   its trait, and its `export_*!` macro.
//! - [`host`] — logging, configuration, the key-value store, acting on the
//!   cluster; since ABI 1.1 [`host::crypto`] (signatures, key sets) and
//!   [`host::http`].
//! - [`bindings`] — what wit-bindgen generated, for anything the layer hides.
#![deny(missing_docs)]

/// Raw wit-bindgen output. The host functions are generated once (in
/// `host_only`) and every hook module reuses them, so types such as
/// [`Target`] are the same type everywhere.
#[allow(missing_docs, clippy::all)]
pub mod bindings {
    /// The host interface and shared types.
    pub mod host_only {
        wit_bindgen::generate!({
            path: "wit",
            world: "host-only",
            generate_all,
        });
    }
    /// The `auth` hook.
    pub mod auth {
        wit_bindgen::generate!({
            path: "wit",
            world: "auth-plugin",
            with: {
                "imhost:plugin/host@1.1.0": crate::bindings::host_only::imhost::plugin::host,
                "imhost:plugin/types@1.1.0": crate::bindings::host_only::imhost::plugin::types,
            },
            pub_export_macro: true,
            export_macro_name: "export_auth_hook",
            default_bindings_module: "imhost_sdk::bindings::auth",
        });
    }
    /// The `filter` hook.
    pub mod filter {
        wit_bindgen::generate!({
            path: "wit",
            world: "filter-plugin",
            with: {
                "imhost:plugin/host@1.1.0": crate::bindings::host_only::imhost::plugin::host,
                "imhost:plugin/types@1.1.0": crate::bindings::host_only::imhost::plugin::types,
            },
            pub_export_macro: true,
            export_macro_name: "export_filter_hook",
            default_bindings_module: "imhost_sdk::bindings::filter",
        });
    }
    /// The `events` hook.
    pub mod events {
        wit_bindgen::generate!({
            path: "wit",
            world: "events-plugin",
            with: {
                "imhost:plugin/host@1.1.0": crate::bindings::host_only::imhost::plugin::host,
                "imhost:plugin/types@1.1.0": crate::bindings::host_only::imhost::plugin::types,
            },
            pub_export_macro: true,
            export_macro_name: "export_events_hook",
            default_bindings_module: "imhost_sdk::bindings::events",
        });
    }
    /// The `inbound` hook.
    pub mod inbound {
        wit_bindgen::generate!({
            path: "wit",
            world: "inbound-plugin",
            with: {
                "imhost:plugin/host@1.1.0": crate::bindings::host_only::imhost::plugin::host,
                "imhost:plugin/types@1.1.0": crate::bindings::host_only::imhost::plugin::types,
            },
            pub_export_macro: true,
            export_macro_name: "export_inbound_hook",
            default_bindings_module: "imhost_sdk::bindings::inbound",
        });
    }
}

pub use bindings::host_only::imhost::plugin::types::{ClientId, Target};

/// Connect-time authentication, before the WebSocket upgrade.
pub mod auth {
    pub use crate::bindings::auth::exports::imhost::plugin::auth::{
        ConnectRequest, Decision, Guest as Auth, Identity,
    };

    /// Looks up a header (names are lower case) or query parameter.
    pub fn find<'a>(pairs: &'a [(String, String)], name: &str) -> Option<&'a str> {
        pairs
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// The message filter chain.
pub mod filter {
    pub use crate::Target;
    pub use crate::bindings::filter::exports::imhost::plugin::filter::{
        Guest as Filter, Message, Verdict,
    };
}

/// Online/offline notifications.
pub mod events {
    pub use crate::bindings::events::exports::imhost::plugin::events::{
        Guest as Events, Presence, PresenceEvent,
    };
}

/// Text frames terminals send.
pub mod inbound {
    pub use crate::Target;
    pub use crate::bindings::inbound::exports::imhost::plugin::inbound::{
        Action, Delivery, Frame, Guest as Inbound,
    };
}

/// Exports a type implementing [`auth::Auth`] as this plugin's `auth` hook.
#[macro_export]
macro_rules! export_auth {
    ($t:ident) => {
        $crate::bindings::auth::export_auth_hook!($t with_types_in $crate::bindings::auth);
    };
}

/// Exports a type implementing [`filter::Filter`] as this plugin's `filter` hook.
#[macro_export]
macro_rules! export_filter {
    ($t:ident) => {
        $crate::bindings::filter::export_filter_hook!($t with_types_in $crate::bindings::filter);
    };
}

/// Exports a type implementing [`events::Events`] as this plugin's `events` hook.
#[macro_export]
macro_rules! export_events {
    ($t:ident) => {
        $crate::bindings::events::export_events_hook!($t with_types_in $crate::bindings::events);
    };
}

/// Exports a type implementing [`inbound::Inbound`] as this plugin's `inbound` hook.
#[macro_export]
macro_rules! export_inbound {
    ($t:ident) => {
        $crate::bindings::inbound::export_inbound_hook!($t with_types_in $crate::bindings::inbound);
    };
}

/// What the host offers: logging, configuration, a key-value store shared by
/// the cluster, and acting on the cluster.
pub mod host {
    use serde::de::DeserializeOwned;

    use crate::ClientId;
    use crate::bindings::host_only::imhost::plugin::host as raw;

    pub use raw::Level;

    /// Logs into the host's log, tagged with this plugin's name.
    pub fn log(level: Level, message: &str) {
        raw::log(level, message);
    }

    /// Logs at info level.
    pub fn info(message: &str) {
        raw::log(Level::Info, message);
    }

    /// Logs at warn level.
    pub fn warn(message: &str) {
        raw::log(Level::Warn, message);
    }

    /// This plugin's `[settings]` as JSON text (`{}` when there are none).
    pub fn config_json() -> String {
        raw::config()
    }

    /// This plugin's `[settings]`, deserialised.
    ///
    /// # Errors
    /// The settings do not match `T`; the message names the problem.
    pub fn config<T: DeserializeOwned>() -> Result<T, String> {
        serde_json::from_str(&raw::config()).map_err(|e| format!("bad plugin settings: {e}"))
    }

    /// The key-value store, namespaced to this plugin.
    pub mod kv {
        use super::raw;

        /// Reads a value.
        ///
        /// # Errors
        /// The store is unavailable.
        pub fn get(key: &str) -> Result<Option<String>, String> {
            raw::kv_get(key)
        }

        /// Writes a value; `ttl_ms` 0 keeps it forever.
        ///
        /// # Errors
        /// The store is unavailable.
        pub fn set(key: &str, value: &str, ttl_ms: u64) -> Result<(), String> {
            raw::kv_set(key, value, ttl_ms)
        }

        /// Adds `delta` atomically; the TTL applies when the key is created.
        ///
        /// # Errors
        /// The store is unavailable or the value is not a number.
        pub fn incr(key: &str, delta: i64, ttl_ms: u64) -> Result<i64, String> {
            raw::kv_incr(key, delta, ttl_ms)
        }

        /// Deletes a key.
        ///
        /// # Errors
        /// The store is unavailable.
        pub fn delete(key: &str) -> Result<(), String> {
            raw::kv_delete(key)
        }
    }

    /// Sends `content` (JSON text) from `sender` to `receivers`.
    ///
    /// # Errors
    /// The cluster is unavailable.
    pub fn send_message(
        sender: ClientId,
        receivers: &[ClientId],
        content: &str,
        receipt: bool,
    ) -> Result<(), String> {
        raw::send_message(sender, receivers, content, receipt)
    }

    /// Sends `content` (JSON text) to a channel's members.
    ///
    /// # Errors
    /// The cluster is unavailable.
    pub fn send_channel(sender: ClientId, channel: &str, content: &str) -> Result<(), String> {
        raw::send_channel(sender, channel, content)
    }

    /// Sends `content` (JSON text) to every client.
    ///
    /// # Errors
    /// The cluster is unavailable.
    pub fn broadcast(content: &str) -> Result<(), String> {
        raw::broadcast(content)
    }

    /// Closes every socket of `client`.
    ///
    /// # Errors
    /// The cluster is unavailable.
    pub fn force_offline(client: ClientId) -> Result<(), String> {
        raw::force_offline(client)
    }

    /// Hashes, HMAC, random bytes and signature checks, run by the host
    /// (ABI 1.1): audited native code, no crypto in the plugin.
    pub mod crypto {
        use super::raw;

        pub use raw::HashAlgorithm;

        /// The SHA-2 digest of `data`.
        pub fn digest(algorithm: HashAlgorithm, data: &[u8]) -> Vec<u8> {
            raw::digest(algorithm, data)
        }

        /// HMAC of `data` under `key`.
        pub fn hmac(algorithm: HashAlgorithm, key: &[u8], data: &[u8]) -> Vec<u8> {
            raw::hmac(algorithm, key, data)
        }

        /// Whether `tag` is the HMAC of `data` under `key` (constant time).
        pub fn hmac_verify(algorithm: HashAlgorithm, key: &[u8], data: &[u8], tag: &[u8]) -> bool {
            raw::hmac_verify(algorithm, key, data, tag)
        }

        /// `len` secure random bytes (at most 1024).
        pub fn random_bytes(len: u32) -> Vec<u8> {
            raw::random_bytes(len)
        }

        /// Checks a JWS signature with a JWK (JSON text): `Ok(true)` valid,
        /// `Ok(false)` not.
        ///
        /// # Errors
        /// The algorithm is unknown or the key cannot be used for it.
        pub fn verify_signature(
            alg: &str,
            jwk: &str,
            signed: &[u8],
            signature: &[u8],
        ) -> Result<bool, String> {
            raw::verify_signature(alg, jwk, signed, signature)
        }

        /// The key `kid` of the JWKS at `url` (which the operator must list
        /// under `key_sets` for this plugin), fetched and cached by the host.
        ///
        /// # Errors
        /// Not granted, or the set cannot be had.
        pub fn key_set_key(url: &str, kid: Option<&str>) -> Result<Option<String>, String> {
            raw::key_set_key(url, kid)
        }
    }

    /// HTTP requests the host makes for the plugin (ABI 1.1), to origins
    /// the operator lists under `http` for it. Auth and events hooks only.
    pub mod http {
        use super::raw;

        pub use raw::{HttpCache as Cache, HttpRequest as Request, HttpResponse as Response};

        /// Sends `request` and waits for the response (the call's deadline
        /// does not run meanwhile).
        ///
        /// # Errors
        /// Refused by the operator's rules, or failed; an HTTP error status
        /// is a response.
        pub fn fetch(request: &Request) -> Result<Response, String> {
            raw::http_fetch(request)
        }

        /// A request with no headers, body or cache, and the default timeout.
        pub fn request(method: &str, url: &str) -> Request {
            Request {
                method: method.to_owned(),
                url: url.to_owned(),
                headers: Vec::new(),
                body: None,
                timeout_ms: 0,
                cache: None,
            }
        }
    }
}
