//! FreeIM payloads as they arrive on a node's Redis channel (any publisher
//! can write there): decoding never panics, and what decodes re-encodes to
//! something that decodes to the same message.
#![no_main]

use imhost_client::wire::ServerMessage;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(message) = ServerMessage::decode(text) {
        let again = ServerMessage::decode(&message.encode()).expect("re-encoded payload decodes");
        assert_eq!(again, message);
    }
});
