//! Connect tokens: unguessable, single use, short-lived.
//!
//! FreeIM's token is 128 hex characters; we keep the length so a FreeIM backend's
//! URLs and ours look alike, and draw them from the OS generator via `rand`.

use rand::RngCore;

/// Hex text of `bytes` random bytes (`2 * bytes` characters).
pub fn random_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    rand::rng().fill_bytes(&mut buf);
    hex::encode(buf)
}

/// A new connect token: 64 random bytes as 128 hex characters.
pub fn new_connect_token() -> String {
    random_hex(64)
}

/// Cheap shape check before any store is asked about a token.
pub fn looks_like_token(token: &str) -> bool {
    token.len() == 128 && token.bytes().all(|b| b.is_ascii_hexdigit())
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
    }
}
