//! Business API bodies: every request type parses or refuses without
//! panicking, and a message is re-serialised to text that parses back to the
//! same value (what terminals receive).
#![no_main]

use imhost_client::api::{
    BroadcastRequest, ChannelMembersRequest, ChannelMessageRequest, ConnectUrlRequest,
    SendMessageRequest,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = serde_json::from_slice::<ConnectUrlRequest>(data);
    let _ = serde_json::from_slice::<ChannelMembersRequest>(data);
    let _ = serde_json::from_slice::<ChannelMessageRequest>(data);
    let _ = serde_json::from_slice::<BroadcastRequest>(data);
    if let Ok(request) = serde_json::from_slice::<SendMessageRequest>(data) {
        let text = imhost::business::message_text(&request.message);
        let back: serde_json::Value = serde_json::from_str(&text).expect("message text parses");
        assert_eq!(back, request.message);
    }
});
