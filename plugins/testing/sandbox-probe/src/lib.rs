//! Test guest: reports what the sandbox lets it reach. Every message is
//! replaced by `{"env":…,"file":…,"net":…}`: the value of the environment
//! variable `env`, the contents of the file `file` (each `null` when
//! refused), and `true` when a TCP connect to `addr` succeeds or the error
//! text when it does not, per its settings.

use imhost_sdk::filter::{Filter, Message, Verdict};
use serde::Deserialize;
use serde_json::json;

#[derive(Deserialize)]
struct Settings {
    env: String,
    file: String,
    addr: String,
}

struct Probe;

impl Filter for Probe {
    fn check(_message: Message) -> Verdict {
        let Ok(s) = imhost_sdk::host::config::<Settings>() else {
            return Verdict::Drop("bad settings".into());
        };
        let env = std::env::var(&s.env).ok();
        let file = std::fs::read_to_string(&s.file).ok();
        let net = match std::net::TcpStream::connect(&s.addr) {
            Ok(_) => json!(true),
            Err(err) => json!(err.to_string()),
        };
        Verdict::Replace(json!({"env": env, "file": file, "net": net}).to_string())
    }
}

imhost_sdk::export_filter!(Probe);
