//! JSON Web Tokens signed the way identity providers sign them (RS, PS, ES,
//! EdDSA, HS), and the JWKS documents that publish their keys, for the
//! jwt-auth tests. Signing is `ring`'s; the host verifies with its own code
//! path, so a test passes only when both agree on the standards.

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use ring::rand::SystemRandom;
use ring::signature::{self, EcdsaKeyPair, Ed25519KeyPair, KeyPair, RsaKeyPair};
use serde_json::{Value, json};

/// Two 2048-bit RSA keys (PKCS#1 DER, made with `openssl genpkey` for these
/// tests only): RSA key generation is not something ring does.
const RSA_KEYS: [&str; 2] = [
    "MIIEpAIBAAKCAQEArS2xj2zcU8Wg6HB8Zl0MJeJNqmiJJFt1rBxyQhaTveU0qh6ZQEI9PSj15FX1zy3Og4BQbTGOZdrQ9i4Ud8Y3jasZ/heKoME4I3BG3cv8cYrLCTAUbjWHPp34qSjmjAEduzhYXnIMWeCOjaDfNCT9A1Pqrb71cVSz0nJ/Fkz7VLCr7lCjsi20i+KT0gRcEjmo4dpY5fV/Rgte8O7GM6SNucrhci/LJQLw50SE7qJyQIBkj6KrMQO9dWuBtgSaLJriWKSydaBCHaqj19e+WZrAjqkhiCInPgSxoqpYTE1pO1u6aKSztkIeHA5ENrx5b3I6slwjLwmED8nJ5wLew9W+EwIDAQABAoIBACCp0qizpqbiSqQsuznvaOAoW++9Qciqu3oX73EJoxoZBiLkHJGjLLvBYweLMw69nArvg7vksfACIpGcRV4F8+pzkDZ9qDcD2pvMjIE+/UFJJVx5RhE3ZWfpEcKOJVXYzAvI59oAdtXo5dpOsmq6Y0JibIwSzWZvzG7wC4pgQLNLQ31ryTxVofozkrG/iWnGPlaZsGyT1ukHB0dCDesSq7T9DfEC/Lx3WEtOGOLIWttLGOkJd05JuHWBfUWFPdGmSWIv1P4PtvzvcKF6PKGjCXBnHA9Y8Kkdn26pbp16knhGNkLZvZ45/KRLknT/R57AoEAN/BEdJyqB7HfHMsS0iyECgYEA6OkBvoSz+qepnrmrWps9rNZ2HiBAwMGqC7pWZboFJWy1xfPliFtCn1nIseFu253nPaWri7ph1ogcP7aw+udQWxfU3HoArSexpQqUBmrri9LGg81adEJ7TIoEK76B+LwFpTfsIL4aVnl+hyFGK7G3eycU9X01odXGrLOW8lq4AeMCgYEAvljD1SqEQt9ynfXRnoEpAaO3F0o/GYANkPcnFn7Jvmvszn22L/6U35IIJ0hoQx4oJwPDNz5x4U9P0lPFyn7NKw/T2Za1SQX+WPnl4Lv4xHRMj3ixifma0lZTwxQDpfQwuyQBPKD5JJkCdUT6HKg01dsMm3UJ1AbAl9UtCSNGShECgYEApD/VrA6XgfeFBdt3/PCngODI8ZvbLlQk4BprXVfe0zKjydKjFxMMm6XMg60v6Y6kiXPw0xwAbTMVgNUMYBSKNYNL6KPdID9y5qncE96I99UPi9lgpcZQf3yBTnwN2mR2MrqKOdj2Z+9MDG2pt5yfgSjhffHrxZIlhpsrowPY6fMCgYAez19jca5W5LQ4vUFg1qc8jLNmIa51AjUv8dFx4rPlDrMV+WM0AZE3XvvS3/WAZ7E4H3PJzWHBhoT1Fno9fKjY/4bbAXn2h/HTlR+QcNyjb++0iWSzYKOeyDpmqSauBgidQgaxOZ0aP2oWcUPKv69NrlcsEpW0rCMgcHEJuZv3AQKBgQCXySugS561R7XnOs8vg2FOul3mXBrECJO9OlQ40DZZHABq3Q+U5WPopQyk+HlfaWcIowf2Ut8PW8Q/7lqyoBpMDAjz9YRGGchtBMm2kUIPGco6ptEWAEZt0L5Q1Be6Ou1z6x+RfMYbM0od30mmRKu0uJy38wCrvpQIy9DKOgqv2w==",
    "MIIEpAIBAAKCAQEA65xaXq38c8SH9zmo7IOuNVP6tDdhl4ntB1chFmkbR5k8qve1CnHscERFzAoJG7Cca0Ian4AB5AT7aKOo6A9SQjBEUWSPRTBt1MHksfzSNzO1L1XNEZ13nnGn3GtCJ3GQbiLmGdq5BBUYZVLH+OdxrXuAxl30EZMs/gjOVAbnMb9XIoQLxXdyAXAG3lw3D0zeMzm1x9dTM15m0KMEia5Aon1q+RcM29mWjrojhNghb2VvBcnfjJPFP50bcx3wvXTC/W8dE+nCAL6uv6WxV1UtyctxHOHGDQ2bdhe6Sm5ZSjhsLI8EgICJz96zdljznghOADjT71noWAqttZwOZ7mF7QIDAQABAoIBAAKcjPeL2/voLliha+ZT5FME1LHO2QGovqGW8o/bcjkLhrEKG1iGYD2d/XG68mm7Pf9GBY0F38ooUFATMPys1MzVLktXqcCK06DTgFvaW/XO2H/ckTAUNn6hWbVh/qL4yYYgVBFudkqzCtOZWgw/0Seq3N0grqNLkL4FGM0KIYxl14Ol81va2yhvzN5nbrABGcQGcoMju9VW1AdPG4Wve/JPRcu5G5CnjMsWgbVpi39m4drfa6WUz3CxVjwRbtPcexfEmMo0dc+Cn0LEikMvBZZ/QcYJXqQ8nlvBrnCON0JuoUCe+phG6Sd4Wb8nu/EeFwIssRi0DcG2HdVjo+tknhkCgYEA+iE+FYg5qCUFxuwxugSE1yvbA6dmbKh98oyOkSiNoRXKPDOZThOsluEJk4sksyXqM4+ARHONDOK2mfEyWmAtZYbbbWKjeNRKYqnUfnVBcoJCy9ktbWatpCOygkWJYW6X14oi+9TldQqklhlhh/vysPsl+rIPv1e4dqx+K86WaCkCgYEA8SPhjO+L2AfV5Jk40SySA0i5/MdXGIA/VGmBYIKTQiTstOVrM15DkloXTeWVJ6WIiJSWEq7n4FTfmcT/CUt2E4Pm3Xz4ZY2vjeD3ZVEp7RSqHiCeOmwTdWIuaGwJ1NQeYuoOkWA3Zr+0RHqqB/s78+oSmzFQOVqVgqfrDtgHuCUCgYAFwGvwDNDel/NZDqdaEq6HUB/aJqhJSVqUED1bAya2lIyw87LLw9INKiGRPfrbD70h8GPPrySILlJqmcxBncKNehtjmYgOyDrpp+QWAFY/7tTgYR8VS+4kPxnkuvqcvfFJ6IhDaDLajSMZvH2spdN/1FacPCn2iWrZd7/y++4jeQKBgQDXjLFTX9VreCWUP/pv0B183geSk0WhWxJBDEZf1Jh5abRFR0X6Furj6bAnK2+WjvtqyxcTAFG5T2TIeTVYQ6H6c89scQdBD9O7STsbz99gUzZ108ZchrsmFGtTYC+xlSLMXFhFTvJ24CnthJB0rfi7YaLcIsqJWhWHQz50eFr+GQKBgQCTlsfjyfmz/diw9QyHlzBfWJSjVIVgY9gmns34G8o0Jo/JKLQxh3G6UJAKKQLt/WykEABjtKv0wpKP78kLY3tAAtcYkkHh9nNTz7PQ5vpPU6lt2gZBXuTU17MDyzoLPW0gNYKEGCHW66Bxr+RMCnjPGBgki+Urw1sWy/iCJD06bw==",
];

enum Pair {
    Rsa(RsaKeyPair),
    Ec(EcdsaKeyPair, &'static str),
    Ed(Ed25519KeyPair),
    Hmac(Vec<u8>),
}

/// A signing key with its `kid`.
pub struct Signer {
    pub kid: String,
    pair: Pair,
}

fn b64(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

impl Signer {
    /// RSA key `n` (0 or 1) of [`RSA_KEYS`].
    pub fn rsa(n: usize, kid: &str) -> Signer {
        let der = STANDARD.decode(RSA_KEYS[n]).expect("test key");
        let pair = RsaKeyPair::from_der(&der).expect("rsa key");
        Signer {
            kid: kid.into(),
            pair: Pair::Rsa(pair),
        }
    }

    /// A fresh P-256 (`ES256`) or P-384 (`ES384`) key.
    pub fn ec(alg: &'static str, kid: &str) -> Signer {
        let algorithm = match alg {
            "ES256" => &signature::ECDSA_P256_SHA256_FIXED_SIGNING,
            "ES384" => &signature::ECDSA_P384_SHA384_FIXED_SIGNING,
            other => panic!("no curve for {other}"),
        };
        let rng = SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(algorithm, &rng).expect("ec key");
        let pair = EcdsaKeyPair::from_pkcs8(algorithm, pkcs8.as_ref(), &rng).expect("ec pair");
        Signer {
            kid: kid.into(),
            pair: Pair::Ec(pair, alg),
        }
    }

    /// A fresh Ed25519 key.
    pub fn ed25519(kid: &str) -> Signer {
        let pkcs8 = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new()).expect("ed key");
        Signer {
            kid: kid.into(),
            pair: Pair::Ed(Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).expect("ed pair")),
        }
    }

    /// A shared secret (HS256).
    pub fn hmac(secret: &[u8]) -> Signer {
        Signer {
            kid: String::new(),
            pair: Pair::Hmac(secret.to_vec()),
        }
    }

    /// The public key as a JWK (what a provider publishes).
    pub fn jwk(&self) -> Value {
        match &self.pair {
            Pair::Rsa(pair) => {
                let public = signature::RsaPublicKeyComponents::<Vec<u8>>::from(pair.public());
                json!({
                    "kty": "RSA", "kid": self.kid, "use": "sig",
                    "n": b64(&public.n), "e": b64(&public.e),
                })
            }
            Pair::Ec(pair, alg) => {
                let point = pair.public_key().as_ref();
                let half = (point.len() - 1) / 2;
                let crv = if *alg == "ES256" { "P-256" } else { "P-384" };
                json!({
                    "kty": "EC", "kid": self.kid, "crv": crv, "alg": alg,
                    "x": b64(&point[1..1 + half]), "y": b64(&point[1 + half..]),
                })
            }
            Pair::Ed(pair) => json!({
                "kty": "OKP", "kid": self.kid, "crv": "Ed25519",
                "x": b64(pair.public_key().as_ref()),
            }),
            Pair::Hmac(_) => panic!("a shared secret is not published"),
        }
    }

    /// A compact JWS of `claims` under `alg`, naming this key's `kid`.
    pub fn sign(&self, alg: &str, claims: &Value) -> String {
        let mut header = json!({"alg": alg, "typ": "JWT"});
        if !self.kid.is_empty() {
            header["kid"] = json!(self.kid);
        }
        self.sign_with_header(&header, claims)
    }

    /// A compact JWS with this exact header (its `alg` picks the scheme).
    pub fn sign_with_header(&self, header: &Value, claims: &Value) -> String {
        let alg = header["alg"].as_str().expect("alg");
        let input = format!(
            "{}.{}",
            b64(header.to_string().as_bytes()),
            b64(claims.to_string().as_bytes())
        );
        let rng = SystemRandom::new();
        let signature = match &self.pair {
            Pair::Rsa(pair) => {
                let padding: &dyn signature::RsaEncoding = match alg {
                    "RS256" => &signature::RSA_PKCS1_SHA256,
                    "RS384" => &signature::RSA_PKCS1_SHA384,
                    "RS512" => &signature::RSA_PKCS1_SHA512,
                    "PS256" => &signature::RSA_PSS_SHA256,
                    "PS384" => &signature::RSA_PSS_SHA384,
                    "PS512" => &signature::RSA_PSS_SHA512,
                    other => panic!("RSA cannot sign {other}"),
                };
                let mut sig = vec![0; pair.public().modulus_len()];
                pair.sign(padding, &rng, input.as_bytes(), &mut sig)
                    .expect("rsa sign");
                sig
            }
            Pair::Ec(pair, _) => pair
                .sign(&rng, input.as_bytes())
                .expect("ec sign")
                .as_ref()
                .to_vec(),
            Pair::Ed(pair) => pair.sign(input.as_bytes()).as_ref().to_vec(),
            Pair::Hmac(secret) => {
                let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret);
                ring::hmac::sign(&key, input.as_bytes()).as_ref().to_vec()
            }
        };
        format!("{input}.{}", b64(&signature))
    }
}

/// A JWKS document publishing these keys.
pub fn jwks(signers: &[&Signer]) -> Value {
    json!({"keys": signers.iter().map(|s| s.jwk()).collect::<Vec<_>>()})
}
