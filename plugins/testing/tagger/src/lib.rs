//! Test guest: tells which version of a hot-swapped plugin handled what.
//!
//! - filter: wraps every message as `{"v":N,"m":<message>}`, N being the
//!   `version` setting.
//! - inbound: on the frame `slow`, says `{"v":N,"started":true}` to the
//!   client `notify` (through the host: another socket, so it is seen while
//!   this call still runs), busy-waits `delay_ms`, then replies
//!   `{"v":N,"done":true}` on the socket.

use imhost_sdk::filter::{Filter, Message, Verdict};
use imhost_sdk::inbound::{Action, Frame, Inbound};
use serde::Deserialize;

#[derive(Deserialize)]
struct Settings {
    version: i64,
    #[serde(default)]
    delay_ms: u64,
    #[serde(default)]
    notify: i64,
}

fn settings() -> Settings {
    imhost_sdk::host::config::<Settings>().unwrap_or(Settings {
        version: -1,
        delay_ms: 0,
        notify: 0,
    })
}

struct Tagger;

impl Filter for Tagger {
    fn check(message: Message) -> Verdict {
        let version = settings().version;
        Verdict::Replace(format!(r#"{{"v":{version},"m":{}}}"#, message.content))
    }
}

impl Inbound for Tagger {
    fn handle(frame: Frame) -> Action {
        if frame.text != "slow" {
            return Action::Ignore;
        }
        let Settings {
            version,
            delay_ms,
            notify,
        } = settings();
        let started = format!(r#"{{"v":{version},"started":true}}"#);
        if let Err(err) = imhost_sdk::host::send_message(0, &[notify], &started, false) {
            imhost_sdk::host::warn(&err);
        }
        let until = std::time::Instant::now() + std::time::Duration::from_millis(delay_ms);
        while std::time::Instant::now() < until {
            std::hint::spin_loop();
        }
        Action::Reply(format!(r#"{{"v":{version},"done":true}}"#))
    }
}

imhost_sdk::export_filter!(Tagger);
imhost_sdk::export_inbound!(Tagger);
