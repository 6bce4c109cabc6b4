//! Test guest: a filter and an auth hook that misbehave on demand. Content
//! (or a connect token) containing `loop` spins forever, `hog` allocates
//! without bound, `trap` panics, `slow` works for 60 ms of wall-clock time
//! and then goes on; anything else is delivered (or passed on).

use imhost_sdk::auth::{Auth, ConnectRequest, Decision};
use imhost_sdk::filter::{Filter, Message, Verdict};

struct Misbehaving;

fn misbehave(text: &str) {
    if text.contains("loop") {
        let mut n: u64 = 0;
        loop {
            n = std::hint::black_box(n.wrapping_add(1));
        }
    }
    if text.contains("hog") {
        let mut hoard: Vec<Vec<u8>> = Vec::new();
        loop {
            hoard.push(vec![1u8; 1 << 20]);
            std::hint::black_box(&hoard);
        }
    }
    if text.contains("trap") {
        panic!("asked to trap");
    }
    if text.contains("slow") {
        let until = std::time::Instant::now() + std::time::Duration::from_millis(60);
        while std::time::Instant::now() < until {
            std::hint::spin_loop();
        }
    }
}

impl Filter for Misbehaving {
    fn check(message: Message) -> Verdict {
        misbehave(&message.content);
        Verdict::Deliver
    }
}

impl Auth for Misbehaving {
    fn authenticate(request: ConnectRequest) -> Decision {
        misbehave(request.token.as_deref().unwrap_or(""));
        Decision::Pass
    }
}

imhost_sdk::export_filter!(Misbehaving);
imhost_sdk::export_auth!(Misbehaving);
