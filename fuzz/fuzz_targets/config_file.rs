//! The `--config` TOML file: parse and resolve, or refuse naming the key;
//! never panic.
#![no_main]

use imhost::config::Options;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(options) = toml::from_str::<Options>(text) {
        let _ = options.resolve();
    }
});
