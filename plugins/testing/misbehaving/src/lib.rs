//! Test guest: a filter that misbehaves on demand. Content containing
//! `loop` spins forever, `hog` allocates without bound, `trap` panics;
//! anything else is delivered.

use imhost_sdk::filter::{Filter, Message, Verdict};

struct Misbehaving;

impl Filter for Misbehaving {
    fn check(message: Message) -> Verdict {
        if message.content.contains("loop") {
            let mut n: u64 = 0;
            loop {
                n = std::hint::black_box(n.wrapping_add(1));
            }
        }
        if message.content.contains("hog") {
            let mut hoard: Vec<Vec<u8>> = Vec::new();
            loop {
                hoard.push(vec![1u8; 1 << 20]);
                std::hint::black_box(&hoard);
            }
        }
        if message.content.contains("trap") {
            panic!("asked to trap");
        }
        Verdict::Deliver
    }
}

imhost_sdk::export_filter!(Misbehaving);
