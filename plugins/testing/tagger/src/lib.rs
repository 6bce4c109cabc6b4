//! Test guest: a filter that wraps every message with the version from its
//! settings, `{"v":N,"m":<message>}`, so a test can tell which version of a
//! hot-swapped plugin handled each message.

use imhost_sdk::filter::{Filter, Message, Verdict};
use serde::Deserialize;

#[derive(Deserialize)]
struct Settings {
    version: i64,
}

struct Tagger;

impl Filter for Tagger {
    fn check(message: Message) -> Verdict {
        let version = imhost_sdk::host::config::<Settings>().map_or(-1, |s| s.version);
        Verdict::Replace(format!(r#"{{"v":{version},"m":{}}}"#, message.content))
    }
}

imhost_sdk::export_filter!(Tagger);
