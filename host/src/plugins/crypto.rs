//! Cryptography the host runs for plugins (ABI 1.1): SHA-2, HMAC, secure
//! random bytes and JWS signature checks with a key given as a JWK.
//!
//! Everything is `ring` (the library rustls is built on): no arithmetic of
//! our own, constant-time comparisons where a secret is involved. A plugin in
//! any language gets RS/PS/ES/EdDSA verification without carrying a bignum
//! library, and at native speed.
//!
//! A key's type and curve must fit the algorithm asked for: an RSA or EC
//! public key is never used as an HMAC secret (the classic JWT algorithm
//! confusion), and a JWK that names its own `alg` is used for that algorithm
//! only.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::signature::{self, UnparsedPublicKey};
use serde::Deserialize;

/// The SHA-2 functions offered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hash {
    Sha256,
    Sha384,
    Sha512,
}

impl Hash {
    fn digest_algorithm(self) -> &'static ring::digest::Algorithm {
        match self {
            Hash::Sha256 => &ring::digest::SHA256,
            Hash::Sha384 => &ring::digest::SHA384,
            Hash::Sha512 => &ring::digest::SHA512,
        }
    }

    fn hmac_algorithm(self) -> ring::hmac::Algorithm {
        match self {
            Hash::Sha256 => ring::hmac::HMAC_SHA256,
            Hash::Sha384 => ring::hmac::HMAC_SHA384,
            Hash::Sha512 => ring::hmac::HMAC_SHA512,
        }
    }
}

pub fn digest(hash: Hash, data: &[u8]) -> Vec<u8> {
    ring::digest::digest(hash.digest_algorithm(), data)
        .as_ref()
        .to_vec()
}

pub fn hmac(hash: Hash, key: &[u8], data: &[u8]) -> Vec<u8> {
    let key = ring::hmac::Key::new(hash.hmac_algorithm(), key);
    ring::hmac::sign(&key, data).as_ref().to_vec()
}

/// Constant-time: `ring::hmac::verify`.
pub fn hmac_verify(hash: Hash, key: &[u8], data: &[u8], tag: &[u8]) -> bool {
    let key = ring::hmac::Key::new(hash.hmac_algorithm(), key);
    ring::hmac::verify(&key, data, tag).is_ok()
}

/// Most bytes one `random-bytes` call returns.
pub const MAX_RANDOM_BYTES: u32 = 1024;

/// # Errors
/// More than [`MAX_RANDOM_BYTES`], or the system's source failed.
pub fn random_bytes(len: u32) -> Result<Vec<u8>, String> {
    if len > MAX_RANDOM_BYTES {
        return Err(format!("at most {MAX_RANDOM_BYTES} random bytes per call"));
    }
    let mut bytes = vec![0; len as usize];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes)
        .map_err(|_| "the system's random source failed".to_owned())?;
    Ok(bytes)
}

/// The members of a JWK this module reads (RFC 7517, 7518 §6, 8037).
#[derive(Debug, Deserialize)]
struct Jwk {
    kty: String,
    #[serde(default)]
    alg: Option<String>,
    #[serde(default, rename = "use")]
    use_: Option<String>,
    #[serde(default)]
    crv: Option<String>,
    #[serde(default)]
    n: Option<String>,
    #[serde(default)]
    e: Option<String>,
    #[serde(default)]
    x: Option<String>,
    #[serde(default)]
    y: Option<String>,
    #[serde(default)]
    k: Option<String>,
}

/// A member of a JWK, base64url-decoded.
fn member(value: &Option<String>, name: &str) -> Result<Vec<u8>, String> {
    let text = value
        .as_deref()
        .ok_or_else(|| format!("the key has no `{name}`"))?;
    URL_SAFE_NO_PAD
        .decode(text.trim_end_matches('='))
        .map_err(|_| format!("the key's `{name}` is not base64url"))
}

/// Checks a JWS signature over `signed` with `jwk` (JSON text) under `alg`.
///
/// # Errors
/// An unknown algorithm, a key that is not JSON, lacks a member, or whose
/// type, curve, `alg` or `use` does not fit `alg`. A signature that does not
/// verify is `Ok(false)`.
pub fn verify_signature(
    alg: &str,
    jwk: &str,
    signed: &[u8],
    signature_bytes: &[u8],
) -> Result<bool, String> {
    let key: Jwk = serde_json::from_str(jwk).map_err(|e| format!("the key is not a JWK: {e}"))?;
    if let Some(own) = &key.alg
        && own != alg
    {
        return Err(format!("the key is for {own}, not {alg}"));
    }
    if let Some(use_) = &key.use_
        && use_ != "sig"
    {
        return Err(format!("the key's use is `{use_}`, not `sig`"));
    }
    let expect_kty = |kty: &str| {
        if key.kty == kty {
            Ok(())
        } else {
            Err(format!("{alg} needs a key of type {kty}, not {}", key.kty))
        }
    };
    let expect_crv = |crv: &str| {
        if key.crv.as_deref() == Some(crv) {
            Ok(())
        } else {
            Err(format!(
                "{alg} needs curve {crv}, not {}",
                key.crv.as_deref().unwrap_or("none")
            ))
        }
    };
    let rsa = |params: &'static signature::RsaParameters| -> Result<bool, String> {
        expect_kty("RSA")?;
        let components = signature::RsaPublicKeyComponents {
            n: member(&key.n, "n")?,
            e: member(&key.e, "e")?,
        };
        Ok(components.verify(params, signed, signature_bytes).is_ok())
    };
    let point = |algorithm: &'static signature::EcdsaVerificationAlgorithm,
                 crv: &str,
                 coordinate_len: usize|
     -> Result<bool, String> {
        expect_kty("EC")?;
        expect_crv(crv)?;
        let (x, y) = (member(&key.x, "x")?, member(&key.y, "y")?);
        if x.len() != coordinate_len || y.len() != coordinate_len {
            return Err(format!("{crv} coordinates are {coordinate_len} bytes"));
        }
        // SEC 1 uncompressed point: 0x04 || x || y.
        let mut public = Vec::with_capacity(1 + 2 * coordinate_len);
        public.push(4);
        public.extend_from_slice(&x);
        public.extend_from_slice(&y);
        Ok(UnparsedPublicKey::new(algorithm, public)
            .verify(signed, signature_bytes)
            .is_ok())
    };
    let mac = |hash: Hash| -> Result<bool, String> {
        expect_kty("oct")?;
        let secret = member(&key.k, "k")?;
        Ok(hmac_verify(hash, &secret, signed, signature_bytes))
    };
    match alg {
        "RS256" => rsa(&signature::RSA_PKCS1_2048_8192_SHA256),
        "RS384" => rsa(&signature::RSA_PKCS1_2048_8192_SHA384),
        "RS512" => rsa(&signature::RSA_PKCS1_2048_8192_SHA512),
        "PS256" => rsa(&signature::RSA_PSS_2048_8192_SHA256),
        "PS384" => rsa(&signature::RSA_PSS_2048_8192_SHA384),
        "PS512" => rsa(&signature::RSA_PSS_2048_8192_SHA512),
        "ES256" => point(&signature::ECDSA_P256_SHA256_FIXED, "P-256", 32),
        "ES384" => point(&signature::ECDSA_P384_SHA384_FIXED, "P-384", 48),
        "EdDSA" => {
            expect_kty("OKP")?;
            expect_crv("Ed25519")?;
            let x = member(&key.x, "x")?;
            Ok(UnparsedPublicKey::new(&signature::ED25519, x)
                .verify(signed, signature_bytes)
                .is_ok())
        }
        "HS256" => mac(Hash::Sha256),
        "HS384" => mac(Hash::Sha384),
        "HS512" => mac(Hash::Sha512),
        other => Err(format!(
            "algorithm `{other}` is not supported (RS256/384/512, PS256/384/512, ES256/384, EdDSA, HS256/384/512)"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ring::signature::{EcdsaKeyPair, Ed25519KeyPair, KeyPair};

    fn b64(bytes: &[u8]) -> String {
        URL_SAFE_NO_PAD.encode(bytes)
    }

    #[test]
    fn es256_and_eddsa_verify_and_tampering_does_not() {
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&signature::ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
            .expect("key");
        let pair = EcdsaKeyPair::from_pkcs8(
            &signature::ECDSA_P256_SHA256_FIXED_SIGNING,
            pkcs8.as_ref(),
            &rng,
        )
        .expect("pair");
        let public = pair.public_key().as_ref();
        let jwk = serde_json::json!({
            "kty": "EC", "crv": "P-256",
            "x": b64(&public[1..33]), "y": b64(&public[33..]),
        })
        .to_string();
        let sig = pair.sign(&rng, b"header.payload").expect("sign");
        assert_eq!(
            verify_signature("ES256", &jwk, b"header.payload", sig.as_ref()),
            Ok(true)
        );
        assert_eq!(
            verify_signature("ES256", &jwk, b"header.payloaD", sig.as_ref()),
            Ok(false)
        );
        assert!(
            verify_signature("ES384", &jwk, b"x", sig.as_ref()).is_err_and(|e| e.contains("P-384"))
        );
        assert!(
            verify_signature("RS256", &jwk, b"x", sig.as_ref())
                .is_err_and(|e| e.contains("type RSA"))
        );

        let pkcs8 = Ed25519KeyPair::generate_pkcs8(&rng).expect("key");
        let pair = Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).expect("pair");
        let jwk = serde_json::json!({"kty": "OKP", "crv": "Ed25519", "x": b64(pair.public_key().as_ref())})
            .to_string();
        let sig = pair.sign(b"m");
        assert_eq!(
            verify_signature("EdDSA", &jwk, b"m", sig.as_ref()),
            Ok(true)
        );
        assert_eq!(
            verify_signature("EdDSA", &jwk, b"n", sig.as_ref()),
            Ok(false)
        );
    }

    #[test]
    fn a_public_key_is_never_an_hmac_secret_and_a_key_keeps_to_its_alg() {
        let rsa = r#"{"kty":"RSA","n":"AQAB","e":"AQAB"}"#;
        assert!(verify_signature("HS256", rsa, b"m", b"t").is_err_and(|e| e.contains("type oct")));
        let pinned = r#"{"kty":"oct","k":"c2VjcmV0","alg":"HS512"}"#;
        assert!(
            verify_signature("HS256", pinned, b"m", b"t").is_err_and(|e| e.contains("for HS512"))
        );
        let enc = r#"{"kty":"oct","k":"c2VjcmV0","use":"enc"}"#;
        assert!(verify_signature("HS256", enc, b"m", b"t").is_err());
        assert!(verify_signature("none", r#"{"kty":"oct","k":""}"#, b"m", b"").is_err());
        let oct = r#"{"kty":"oct","k":"c2VjcmV0"}"#;
        let tag = hmac(Hash::Sha256, b"secret", b"m");
        assert_eq!(verify_signature("HS256", oct, b"m", &tag), Ok(true));
        assert_eq!(verify_signature("HS256", oct, b"n", &tag), Ok(false));
    }

    #[test]
    fn digests_and_macs_match_known_answers() {
        // FIPS 180-2 "abc" and RFC 4231 test case 2.
        assert_eq!(
            hex::encode(digest(Hash::Sha256, b"abc")),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        let tag = hmac(Hash::Sha256, b"Jefe", b"what do ya want for nothing?");
        assert_eq!(
            hex::encode(&tag),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        assert!(hmac_verify(
            Hash::Sha256,
            b"Jefe",
            b"what do ya want for nothing?",
            &tag
        ));
        assert!(!hmac_verify(
            Hash::Sha256,
            b"Jefe",
            b"what do ya want for nothing!",
            &tag
        ));
        assert_eq!(random_bytes(32).map(|b| b.len()), Ok(32));
        assert!(random_bytes(MAX_RANDOM_BYTES + 1).is_err());
    }
}
