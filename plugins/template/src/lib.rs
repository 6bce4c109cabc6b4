//! A starting point for an imhost plugin: copy this folder, rename the
//! package, keep the hooks you need and delete the others.
//!
//! Build: `cargo build --release --target wasm32-wasip2`, then
//! `imhost plugin check target/wasm32-wasip2/release/template.wasm`, then copy
//! the `.wasm` (and a `template.toml`) into the server's plugin directory.
//!
//! This template exports two hooks:
//! - `filter`: tags messages from senders listed in the settings;
//! - `events`: logs online/offline.

use imhost_sdk::events::{Events, Presence, PresenceEvent};
use imhost_sdk::filter::{Filter, Message, Verdict};
use serde::Deserialize;

/// `[settings]` of template.toml.
#[derive(Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
struct Settings {
    /// Senders whose messages get a `"tagged": true` field.
    tagged_senders: Vec<i64>,
}

struct Template;

impl Filter for Template {
    fn check(message: Message) -> Verdict {
        let settings: Settings = imhost_sdk::host::config().unwrap_or_default();
        if !settings.tagged_senders.contains(&message.sender) {
            return Verdict::Deliver;
        }
        match serde_json::from_str::<serde_json::Value>(&message.content) {
            Ok(serde_json::Value::Object(mut map)) => {
                map.insert("tagged".into(), true.into());
                Verdict::Replace(serde_json::Value::Object(map).to_string())
            }
            _ => Verdict::Deliver,
        }
    }
}

impl Events for Template {
    fn on_presence(event: PresenceEvent) {
        let what = if event.kind == Presence::Online {
            "online"
        } else {
            "offline"
        };
        imhost_sdk::host::info(&format!(
            "client {} {what} on {} ({} devices)",
            event.client_id, event.node, event.devices
        ));
    }
}

imhost_sdk::export_filter!(Template);
imhost_sdk::export_events!(Template);
