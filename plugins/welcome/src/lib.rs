//! `welcome`: greets a client when its first device comes online, and can
//! tell a channel about it.
//!
//! ```toml
//! [settings]
//! text = "Welcome, {client}!"   # {client} and {metadata} are replaced
//! channel = "lobby"             # optional: members get {"type":"joined",…}
//! ```
//!
//! The greeting is the JSON `{"type":"welcome","text":"…"}` from the system
//! sender (0).

use std::fmt::Write as _;
use std::sync::OnceLock;

use imhost_sdk::events::{Events, Presence, PresenceEvent};
use serde::{Deserialize, Serialize};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Settings {
    #[serde(default = "default_text")]
    text: String,
    #[serde(default)]
    channel: Option<String>,
}

fn default_text() -> String {
    "Welcome, {client}!".into()
}

/// The greeting, serialized straight from borrowed fields: it runs on every
/// connect, so no intermediate JSON tree.
#[derive(Serialize)]
struct Greeting<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    text: &'a str,
}

/// What the channel is told.
#[derive(Serialize)]
struct Joined<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    client: i64,
    metadata: Option<&'a str>,
}

/// `template` with `{client}` and `{metadata}` filled in, in one pass: it
/// runs on every connect, and two `str::replace` calls cost more than the
/// rest of the hook (each builds a substring searcher).
fn fill(template: &str, event: &PresenceEvent) -> String {
    let mut out = String::with_capacity(template.len() + 24);
    let mut rest = template;
    while let Some(at) = rest.find('{') {
        out.push_str(&rest[..at]);
        let tail = &rest[at..];
        if let Some(after) = tail.strip_prefix("{client}") {
            // Writing to a String cannot fail.
            let _ = write!(out, "{}", event.client_id);
            rest = after;
        } else if let Some(after) = tail.strip_prefix("{metadata}") {
            out.push_str(event.metadata.as_deref().unwrap_or(""));
            rest = after;
        } else {
            out.push('{');
            rest = &tail[1..];
        }
    }
    out.push_str(rest);
    out
}

struct Welcome;

impl Events for Welcome {
    fn on_presence(event: PresenceEvent) {
        if event.kind != Presence::Online || event.devices != 1 {
            return;
        }
        // Parsed at the instance's first call: settings are fixed for the
        // life of a loaded plugin (a changed manifest loads it anew).
        static SETTINGS: OnceLock<Result<Settings, String>> = OnceLock::new();
        let settings = match SETTINGS.get_or_init(imhost_sdk::host::config) {
            Ok(s) => s,
            Err(err) => return imhost_sdk::host::warn(err),
        };
        let text = fill(&settings.text, &event);
        let greeting = Greeting {
            kind: "welcome",
            text: &text,
        };
        // Serializing borrowed strings and integers cannot fail.
        let greeting = serde_json::to_string(&greeting).unwrap_or_default();
        if let Err(err) = imhost_sdk::host::send_message(0, &[event.client_id], &greeting, false) {
            imhost_sdk::host::warn(&format!("greeting not sent: {err}"));
        }
        if let Some(channel) = &settings.channel {
            let note = Joined {
                kind: "joined",
                client: event.client_id,
                metadata: event.metadata.as_deref(),
            };
            let note = serde_json::to_string(&note).unwrap_or_default();
            if let Err(err) = imhost_sdk::host::send_channel(0, channel, &note) {
                imhost_sdk::host::warn(&format!("channel not told: {err}"));
            }
        }
    }
}

imhost_sdk::export_events!(Welcome);
