//! Secrets the node makes: connect tokens (FreeIM's shape, made by
//! `imhost_client::wire::new_token`) and generated API keys.

use rand::RngCore;

pub use imhost_client::wire::{looks_like_token, new_token as new_connect_token};

/// Hex text of `bytes` random bytes (`2 * bytes` characters).
pub fn random_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    rand::rng().fill_bytes(&mut buf);
    hex::encode(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_128_hex_and_distinct() {
        let a = new_connect_token();
        assert!(looks_like_token(&a));
        assert_ne!(a, new_connect_token());
        assert!(!looks_like_token("abc"));
        assert_eq!(random_hex(32).len(), 64);
    }
}
