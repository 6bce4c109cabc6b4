//! `jwt-auth`: terminals connect with a JSON Web Token, from any OpenID
//! Connect provider (RS256/384/512, PS256/384/512, ES256/384, EdDSA against
//! the provider's key set) or from the backend (HS256/384/512 with a shared
//! secret).
//!
//! The token is read from the query parameter `query_param` (default `token`)
//! or from `Authorization: Bearer …`. Something that is not a JWT (not three
//! dot-separated parts) is passed on, so FreeIM-style connect tokens keep
//! working; a JWT that fails any check is denied, saying why (in the log).
//!
//! Checks: the signature, by the host (ABI 1.1 `verify-signature`: native,
//! constant-time where it matters), with the key the header's `kid` names in
//! the key set at `jwks_url` (fetched, cached and rotated by the host; the
//! operator lists the URL under `key_sets` in the grants file) or in the
//! inline set `jwks`; the algorithm against `algorithms` (never `none`, and
//! a key is used only for an algorithm of its type); `exp` and `nbf` with
//! `leeway_secs`; `iss` and `aud` when configured.
//!
//! The client id is the claim `client_id_claim` (default `sub`): a number or
//! a string of digits, or a string mapped by `client_ids` (a table) or, with
//! `client_id_kv = true`, by the key `client:<value>` of the plugin's
//! key-value store (which the backend fills). The metadata is the claim
//! `metadata_claim`, or a JSON object of the claims `metadata_claims`.
//!
//! ```toml
//! [settings]
//! jwks_url = "https://login.example.com/.well-known/jwks.json"
//! issuer = "https://login.example.com/"
//! audience = "imhost"
//! metadata_claims = ["name", "email"]
//! leeway_secs = 30
//! ```
//!
//! docs/plugins.md has settings for Auth0, Keycloak, Okta, Google and Entra ID.

use std::collections::BTreeMap;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use imhost_sdk::auth::{Auth, ConnectRequest, Decision, Identity, find};
use imhost_sdk::host::{crypto, kv};
use serde::Deserialize;
use serde_json::Value;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Settings {
    /// HS* secret.
    #[serde(default)]
    secret: Option<String>,
    #[serde(default)]
    secret_env: Option<String>,
    /// A JWKS URL the host fetches (listed by the operator under `key_sets`).
    #[serde(default)]
    jwks_url: Option<String>,
    /// A JWKS document, inline (JSON text).
    #[serde(default)]
    jwks: Option<String>,
    /// Accepted `alg` values; absent: HS* with a secret, the asymmetric
    /// ones with a key set.
    #[serde(default)]
    algorithms: Option<Vec<String>>,
    #[serde(default)]
    issuer: Option<String>,
    #[serde(default)]
    audience: Option<String>,
    #[serde(default = "default_client_id_claim")]
    client_id_claim: String,
    #[serde(default)]
    client_ids: BTreeMap<String, i64>,
    #[serde(default)]
    client_id_kv: bool,
    #[serde(default)]
    metadata_claim: Option<String>,
    #[serde(default)]
    metadata_claims: Vec<String>,
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

const HMAC_ALGS: [&str; 3] = ["HS256", "HS384", "HS512"];
const KEY_SET_ALGS: [&str; 9] = [
    "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "EdDSA",
];

fn default_leeway() -> i64 {
    30
}

fn default_param() -> String {
    "token".into()
}

fn default_client_id_claim() -> String {
    "sub".into()
}

impl Settings {
    fn secret(&self) -> Result<Option<Vec<u8>>, String> {
        if let Some(secret) = &self.secret {
            if secret == PLACEHOLDER_SECRET && !self.demo {
                return Err(
                    "the shipped placeholder secret is refused outside the demo: set `secret` or `secret_env`"
                        .into(),
                );
            }
            return Ok(Some(secret.as_bytes().to_vec()));
        }
        if let Some(var) = &self.secret_env {
            return std::env::var(var)
                .map(|s| Some(s.into_bytes()))
                .map_err(|_| format!("environment variable {var} is not granted or not set"));
        }
        Ok(None)
    }

    fn has_key_set(&self) -> bool {
        self.jwks_url.is_some() || self.jwks.is_some()
    }

    fn accepts(&self, alg: &str, has_secret: bool) -> bool {
        match &self.algorithms {
            Some(list) => list.iter().any(|a| a == alg),
            None => {
                (has_secret && HMAC_ALGS.contains(&alg))
                    || (self.has_key_set() && KEY_SET_ALGS.contains(&alg))
            }
        }
    }
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

fn decode_json(part: &str, what: &str) -> Result<Value, String> {
    let bytes = URL_SAFE_NO_PAD
        .decode(part)
        .map_err(|_| format!("bad {what} encoding"))?;
    serde_json::from_slice(&bytes).map_err(|_| format!("bad {what} JSON"))
}

/// The key for `kid` in an inline JWKS document.
fn inline_key(jwks: &str, kid: Option<&str>) -> Result<Option<String>, String> {
    let doc: Value = serde_json::from_str(jwks).map_err(|e| format!("`jwks` is not JSON: {e}"))?;
    let keys = doc
        .get("keys")
        .and_then(Value::as_array)
        .ok_or("`jwks` has no `keys` array")?;
    let signing: Vec<&Value> = keys
        .iter()
        .filter(|k| {
            k.get("use")
                .and_then(Value::as_str)
                .is_none_or(|u| u == "sig")
        })
        .collect();
    let found = match kid {
        Some(kid) => signing
            .iter()
            .find(|k| k.get("kid").and_then(Value::as_str) == Some(kid)),
        None if signing.len() == 1 => signing.first(),
        None => None,
    };
    Ok(found.map(|k| k.to_string()))
}

/// The key that should have signed a token of this header.
fn key_for(
    header: &Value,
    alg: &str,
    settings: &Settings,
    secret: Option<&[u8]>,
) -> Result<String, String> {
    if HMAC_ALGS.contains(&alg) {
        let secret = secret.ok_or("no `secret` for an HMAC token")?;
        return Ok(
            serde_json::json!({"kty": "oct", "k": URL_SAFE_NO_PAD.encode(secret)}).to_string(),
        );
    }
    let kid = header.get("kid").and_then(Value::as_str);
    if let Some(jwks) = &settings.jwks
        && let Some(key) = inline_key(jwks, kid)?
    {
        return Ok(key);
    }
    if let Some(url) = &settings.jwks_url {
        // The host fetches and caches the set, and refetches it (rate
        // limited) for a `kid` it does not hold: a rotation needs nothing
        // here. The URL is the operator-listed setting, never token content.
        if let Some(key) = crypto::key_set_key(url, kid)? {
            return Ok(key);
        }
    }
    Err(format!(
        "no key `{}` in the key set",
        kid.unwrap_or("(none)")
    ))
}

/// Checks a compact JWS; returns its claims.
fn verify(token: &str, settings: &Settings) -> Result<serde_json::Map<String, Value>, String> {
    let mut parts = token.split('.');
    let (Some(header), Some(payload), Some(signature), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err("not a JWT".into());
    };
    let header = decode_json(header, "header")?;
    if header.get("crit").is_some() {
        return Err("critical header extensions are not supported".into());
    }
    let alg = header
        .get("alg")
        .and_then(Value::as_str)
        .ok_or("no `alg` in the header")?;
    let secret = settings.secret()?;
    if alg == "none" || !settings.accepts(alg, secret.is_some()) {
        return Err(format!("algorithm `{alg}` is not accepted"));
    }
    let signature = URL_SAFE_NO_PAD
        .decode(signature)
        .map_err(|_| "bad signature encoding")?;
    let key = key_for(&header, alg, settings, secret.as_deref())?;
    // The signature covers `header.payload`: everything before the last dot.
    let signing_input = token.rfind('.').map_or(token, |dot| &token[..dot]);
    if !crypto::verify_signature(alg, &key, signing_input.as_bytes(), &signature)? {
        return Err("bad signature".into());
    }
    match decode_json(payload, "payload")? {
        Value::Object(map) => Ok(map),
        _ => Err("claims are not an object".into()),
    }
}

fn client_id(claims: &serde_json::Map<String, Value>, settings: &Settings) -> Result<i64, String> {
    let claim = settings.client_id_claim.as_str();
    let value = match claims.get(claim) {
        Some(Value::Number(n)) => return n.as_i64().ok_or(format!("`{claim}` is not a client id")),
        Some(Value::String(s)) => s,
        _ => return Err(format!("no `{claim}` claim")),
    };
    if let Ok(id) = value.parse() {
        return Ok(id);
    }
    if let Some(id) = settings.client_ids.get(value) {
        return Ok(*id);
    }
    if settings.client_id_kv
        && let Some(id) = kv::get(&format!("client:{value}"))?
    {
        return id
            .parse()
            .map_err(|_| format!("client:{value} in the store is not a number"));
    }
    Err(format!("`{claim}` is not a client id and is not mapped"))
}

fn metadata(claims: &serde_json::Map<String, Value>, settings: &Settings) -> Option<String> {
    if !settings.metadata_claims.is_empty() {
        let picked: serde_json::Map<String, Value> = settings
            .metadata_claims
            .iter()
            .filter_map(|c| claims.get(c).map(|v| (c.clone(), v.clone())))
            .collect();
        return Some(Value::Object(picked).to_string());
    }
    settings
        .metadata_claim
        .as_ref()
        .and_then(|claim| match claims.get(claim) {
            Some(Value::String(s)) => Some(s.clone()),
            Some(Value::Null) | None => None,
            Some(other) => Some(other.to_string()),
        })
}

fn check(claims: &serde_json::Map<String, Value>, settings: &Settings) -> Result<Identity, String> {
    let now = now();
    let leeway = settings.leeway_secs;
    if let Some(exp) = claims.get("exp") {
        let exp = exp.as_i64().ok_or("`exp` is not a number")?;
        if now > exp + leeway {
            return Err("expired".into());
        }
    }
    if let Some(nbf) = claims.get("nbf") {
        let nbf = nbf.as_i64().ok_or("`nbf` is not a number")?;
        if now + leeway < nbf {
            return Err("not valid yet".into());
        }
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
    Ok(Identity {
        client_id: client_id(claims, settings)?,
        metadata: metadata(claims, settings),
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
        match verify(&token, &settings).and_then(|claims| check(&claims, &settings)) {
            Ok(identity) => Decision::Allow(identity),
            Err(reason) => Decision::Deny(reason),
        }
    }
}

imhost_sdk::export_auth!(JwtAuth);
