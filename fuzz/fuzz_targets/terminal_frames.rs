//! What terminals send after the handshake, through the socket core's frame
//! decoder: no input panics it, no message over the limit comes out, and
//! cutting the same bytes into reads of any size gives the same result.
#![no_main]

use imhost::ws::frame::{Decoder, Event};
use libfuzzer_sys::fuzz_target;

const MAX_MESSAGE: usize = 1024;

fn decode(data: &[u8], step: usize) -> (Vec<Event>, Option<String>) {
    let mut decoder = Decoder::new(MAX_MESSAGE);
    let mut events = Vec::new();
    for piece in data.chunks(step.max(1)) {
        if let Err(violation) = decoder.feed(piece, &mut events) {
            return (events, Some(violation.to_string()));
        }
    }
    (events, None)
}

fuzz_target!(|input: &[u8]| {
    let Some((&step, data)) = input.split_first() else {
        return;
    };
    let whole = decode(data, data.len());
    for event in &whole.0 {
        if let Event::Text(text) = event {
            assert!(text.len() <= MAX_MESSAGE);
        }
    }
    assert_eq!(decode(data, usize::from(step)), whole);
});
