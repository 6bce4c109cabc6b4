//! `NAME.toml` plugin manifests: parse or refuse with a message, never panic;
//! an accepted manifest's settings always serialise to JSON for the plugin.
#![no_main]

use imhost::plugins::manifest::Manifest;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(manifest) = Manifest::parse(text) {
        let json: serde_json::Value =
            serde_json::from_str(&manifest.settings_json()).expect("settings are JSON");
        assert!(json.is_object());
        let _ = manifest.timeout();
        let _ = manifest.memory_bytes();
    }
});
