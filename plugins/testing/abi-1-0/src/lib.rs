//! Test guest: a filter built against the WIT of `imhost:plugin@1.0.0`
//! exactly as it was released (`wit/plugin.wit`, never edited). It appends
//! ` [1.0]` to string messages and logs through the 1.0 `host` interface,
//! so a test can see it load and run on a 1.x host.

wit_bindgen::generate!({ path: "wit", world: "filter-plugin", generate_all });

use exports::imhost::plugin::filter::{Guest, Message, Verdict};
use imhost::plugin::host::{Level, log};

struct Abi10;

impl Guest for Abi10 {
    fn check(message: Message) -> Verdict {
        log(Level::Debug, "abi-1-0 filter called");
        match message.content.strip_suffix('"') {
            Some(text) if text.starts_with('"') => Verdict::Replace(format!("{text} [1.0]\"")),
            _ => Verdict::Deliver,
        }
    }
}

export!(Abi10);
