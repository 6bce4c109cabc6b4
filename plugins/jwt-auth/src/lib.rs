//! `jwt-auth`: lets terminals connect with an HS256 JSON Web Token instead of
//! a connect URL from the backend.
//!
//! The token is read from the query parameter `query_param` (default `token`)
//! or from `Authorization: Bearer …`. Something that is not a JWT (not three
//! dot-separated parts) is passed on, so FreeIM-style connect tokens keep
//! working; a JWT that fails any check is denied. Checks: the HS256 signature
//! (constant-time), `exp` and `nbf` with `leeway_secs`, `iss` and `aud` when
//! configured. The client id is `sub` (a number, or a string of digits); the
//! metadata is the claim named by `metadata_claim`, if set.
//!
//! ```toml
//! [settings]
//! secret = "at least 32 bytes of secret shared with the backend"
//! issuer = "https://auth.example.com"   # optional
//! audience = "imhost"                   # optional
//! metadata_claim = "name"               # optional
//! leeway_secs = 30
//! ```
//!
//! `secret_env = "NAME"` reads the secret from an environment variable
//! instead (grant it: `[grants] env = ["NAME"]`).

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};
use imhost_sdk::auth::{Auth, ConnectRequest, Decision, Identity, find};
use serde::Deserialize;
use serde_json::Value;
use sha2::Sha256;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Settings {
    #[serde(default)]
    secret: Option<String>,
    #[serde(default)]
    secret_env: Option<String>,
    #[serde(default)]
    issuer: Option<String>,
    #[serde(default)]
    audience: Option<String>,
    #[serde(default)]
    metadata_claim: Option<String>,
    #[serde(default = "default_leeway")]
    leeway_secs: i64,
    #[serde(default = "default_param")]
    query_param: String,
    /// Set only by the demo (`scripts/run`): allows the shipped placeholder secret.
    #[serde(default)]
    demo: bool,
}

/// The secret in the shipped `jwt-auth.toml`: public, so refused outside the demo.
const PLACEHOLDER_SECRET: &str = "demo-secret-change-me-demo-secret-change-me";

fn default_leeway() -> i64 {
    30
}

fn default_param() -> String {
    "token".into()
}

impl Settings {
    fn secret(&self) -> Result<Vec<u8>, String> {
        if let Some(secret) = &self.secret {
            if secret == PLACEHOLDER_SECRET && !self.demo {
                return Err(
                    "the shipped placeholder secret is refused outside the demo: set `secret` or `secret_env`"
                        .into(),
                );
            }
            return Ok(secret.as_bytes().to_vec());
        }
        if let Some(var) = &self.secret_env {
            return std::env::var(var)
                .map(String::into_bytes)
                .map_err(|_| format!("environment variable {var} is not granted or not set"));
        }
        Err("no `secret` or `secret_env` configured".into())
    }
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// Checks a compact JWS; returns its claims.
fn verify(token: &str, secret: &[u8]) -> Result<serde_json::Map<String, Value>, String> {
    let mut parts = token.split('.');
    let (Some(header), Some(payload), Some(signature), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err("not a JWT".into());
    };
    let header: Value = serde_json::from_slice(
        &URL_SAFE_NO_PAD
            .decode(header)
            .map_err(|_| "bad header encoding")?,
    )
    .map_err(|_| "bad header JSON")?;
    if header.get("alg").and_then(Value::as_str) != Some("HS256") {
        return Err("only HS256 is accepted".into());
    }
    let signature = URL_SAFE_NO_PAD
        .decode(signature)
        .map_err(|_| "bad signature encoding")?;
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).map_err(|_| "bad secret")?;
    // The signature covers `header.payload`: everything before the last dot.
    let signing_input = token.rfind('.').map_or(token, |dot| &token[..dot]);
    mac.update(signing_input.as_bytes());
    mac.verify_slice(&signature).map_err(|_| "bad signature")?;
    let claims: Value = serde_json::from_slice(
        &URL_SAFE_NO_PAD
            .decode(payload)
            .map_err(|_| "bad payload encoding")?,
    )
    .map_err(|_| "bad payload JSON")?;
    match claims {
        Value::Object(map) => Ok(map),
        _ => Err("claims are not an object".into()),
    }
}

fn check(claims: &serde_json::Map<String, Value>, settings: &Settings) -> Result<Identity, String> {
    let now = now();
    let leeway = settings.leeway_secs;
    if let Some(exp) = claims.get("exp").and_then(Value::as_i64)
        && now > exp + leeway
    {
        return Err("expired".into());
    }
    if let Some(nbf) = claims.get("nbf").and_then(Value::as_i64)
        && now + leeway < nbf
    {
        return Err("not valid yet".into());
    }
    if let Some(issuer) = &settings.issuer
        && claims.get("iss").and_then(Value::as_str) != Some(issuer.as_str())
    {
        return Err("wrong issuer".into());
    }
    if let Some(audience) = &settings.audience {
        let ok = match claims.get("aud") {
            Some(Value::String(aud)) => aud == audience,
            Some(Value::Array(auds)) => auds.iter().any(|a| a.as_str() == Some(audience)),
            _ => false,
        };
        if !ok {
            return Err("wrong audience".into());
        }
    }
    let client_id = match claims.get("sub") {
        Some(Value::Number(n)) => n.as_i64(),
        Some(Value::String(s)) => s.parse().ok(),
        _ => None,
    }
    .ok_or("`sub` is not a client id")?;
    let metadata = settings
        .metadata_claim
        .as_ref()
        .and_then(|claim| match claims.get(claim) {
            Some(Value::String(s)) => Some(s.clone()),
            Some(Value::Null) | None => None,
            Some(other) => Some(other.to_string()),
        });
    Ok(Identity {
        client_id,
        metadata,
    })
}

struct JwtAuth;

impl Auth for JwtAuth {
    fn authenticate(request: ConnectRequest) -> Decision {
        let settings: Settings = match imhost_sdk::host::config() {
            Ok(s) => s,
            Err(err) => return Decision::Deny(err),
        };
        let token = find(&request.query, &settings.query_param)
            .map(str::to_owned)
            .or_else(|| {
                find(&request.headers, "authorization")
                    .and_then(|h| h.strip_prefix("Bearer "))
                    .map(str::to_owned)
            });
        let Some(token) = token else {
            return Decision::Pass;
        };
        if token.split('.').count() != 3 {
            return Decision::Pass;
        }
        let secret = match settings.secret() {
            Ok(secret) => secret,
            Err(err) => return Decision::Deny(err),
        };
        match verify(&token, &secret).and_then(|claims| check(&claims, &settings)) {
            Ok(identity) => Decision::Allow(identity),
            Err(reason) => Decision::Deny(reason),
        }
    }
}

imhost_sdk::export_auth!(JwtAuth);
