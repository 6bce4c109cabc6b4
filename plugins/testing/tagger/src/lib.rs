//! Test guest: tells which version of a hot-swapped plugin handled what.
//!
//! - filter: wraps every message as `{"v":N,"m":<message>}`, N being the
//!   `version` setting, after busy-waiting `filter_delay_us` (a filter of a
//!   known cost, for benchmarks), or `delay_ms` when the message contains
//!   `slow`.
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
    #[serde(default)]
    filter_delay_us: u64,
}

fn settings() -> Settings {
    imhost_sdk::host::config::<Settings>().unwrap_or(Settings {
        version: -1,
        delay_ms: 0,
        notify: 0,
        filter_delay_us: 0,
    })
}

fn spin(duration: std::time::Duration) {
    let until = std::time::Instant::now() + duration;
    while std::time::Instant::now() < until {
        std::hint::spin_loop();
    }
}

struct Tagger;

impl Filter for Tagger {
    fn check(message: Message) -> Verdict {
        let settings = settings();
        let version = settings.version;
        spin(if message.content.contains("slow") {
            std::time::Duration::from_millis(settings.delay_ms)
        } else {
            std::time::Duration::from_micros(settings.filter_delay_us)
        });
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
            ..
        } = settings();
        let started = format!(r#"{{"v":{version},"started":true}}"#);
        if let Err(err) = imhost_sdk::host::send_message(0, &[notify], &started, false) {
            imhost_sdk::host::warn(&err);
        }
        spin(std::time::Duration::from_millis(delay_ms));
        Action::Reply(format!(r#"{{"v":{version},"done":true}}"#))
    }
}

imhost_sdk::export_filter!(Tagger);
imhost_sdk::export_inbound!(Tagger);
