//! `rate-limit`: at most `limit` messages per sender per `window_ms`, counted
//! in the host key-value store, so the limit holds across the cluster.
//!
//! Fixed windows: the first message of a window creates a counter that
//! expires with the window. The system sender (0) is never limited. Filters
//! run once per message on each delivery node, so a channel message or a
//! broadcast counts once per node that delivers it; direct messages count once
//! per node that holds receivers.
//!
//! ```toml
//! [settings]
//! limit = 20
//! window_ms = 10000
//! ```

use imhost_sdk::filter::{Filter, Message, Verdict};
use serde::Deserialize;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Settings {
    #[serde(default = "default_limit")]
    limit: i64,
    #[serde(default = "default_window")]
    window_ms: u64,
}

fn default_limit() -> i64 {
    20
}

fn default_window() -> u64 {
    10_000
}

struct RateLimit;

impl Filter for RateLimit {
    fn check(message: Message) -> Verdict {
        if message.sender == 0 {
            return Verdict::Deliver;
        }
        let settings: Settings = match imhost_sdk::host::config() {
            Ok(s) => s,
            Err(err) => {
                imhost_sdk::host::warn(&err);
                return Verdict::Deliver;
            }
        };
        match imhost_sdk::host::kv::incr(&message.sender.to_string(), 1, settings.window_ms) {
            Ok(count) if count > settings.limit => Verdict::Drop(format!(
                "sender {} over {} messages per {} ms",
                message.sender, settings.limit, settings.window_ms
            )),
            Ok(_) => Verdict::Deliver,
            Err(err) => {
                // The store is unavailable: do not punish senders for it.
                imhost_sdk::host::warn(&format!("rate-limit store unavailable: {err}"));
                Verdict::Deliver
            }
        }
    }
}

imhost_sdk::export_filter!(RateLimit);
