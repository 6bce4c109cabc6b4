//! Test guest: plays a plugin that takes URLs from what a terminal sends
//! (the SSRF a host must stop). A connect `/ws?id=N&url=U[&method=M]
//! [&cache=K][&header=name:value][&repeat=R]` makes the host fetch `U` (R
//! times, for the circuit breaker) and is allowed as client `N` with, as its
//! metadata, a JSON report of the last answer: `{"ok":true,"status":…,
//! "len":…,"cached":…,"body":…}` or `{"ok":false,"error":"…"}`.
//! `&jwks=U&kid=K` looks a key up instead. A filter call on the message
//! `"probe-http"` tries `http-fetch` from the filter hook, which the host
//! refuses, and replaces the message with the refusal.

use imhost_sdk::auth::{Auth, ConnectRequest, Decision, Identity, find};
use imhost_sdk::filter::{Filter, Message, Verdict};
use imhost_sdk::host::{crypto, http};
use serde_json::json;

fn report(result: Result<http::Response, String>) -> serde_json::Value {
    match result {
        Ok(r) => json!({
            "ok": true,
            "status": r.status,
            "len": r.body.len(),
            "cached": r.cached,
            "body": String::from_utf8_lossy(&r.body[..r.body.len().min(200)]),
        }),
        Err(error) => json!({"ok": false, "error": error}),
    }
}

struct Probe;

impl Auth for Probe {
    fn authenticate(request: ConnectRequest) -> Decision {
        let q = &request.query;
        let Some(client_id) = find(q, "id").and_then(|id| id.parse().ok()) else {
            return Decision::Pass;
        };
        let outcome = if let Some(set) = find(q, "jwks") {
            match crypto::key_set_key(set, find(q, "kid")) {
                Ok(key) => json!({"ok": true, "key": key}),
                Err(error) => json!({"ok": false, "error": error}),
            }
        } else if let Some(url) = find(q, "url") {
            let mut request = http::request(find(q, "method").unwrap_or("GET"), url);
            if let Some(key) = find(q, "cache") {
                request.cache = Some(http::Cache {
                    key: key.to_owned(),
                    ttl_ms: 60_000,
                });
            }
            if let Some((name, value)) = find(q, "header").and_then(|h| h.split_once(':')) {
                request.headers.push((name.to_owned(), value.to_owned()));
            }
            let repeat: usize = find(q, "repeat").and_then(|r| r.parse().ok()).unwrap_or(1);
            let mut last = report(Err("not sent".into()));
            for _ in 0..repeat.max(1) {
                last = report(http::fetch(&request));
            }
            last
        } else {
            return Decision::Pass;
        };
        Decision::Allow(Identity {
            client_id,
            metadata: Some(outcome.to_string()),
        })
    }
}

impl Filter for Probe {
    fn check(message: Message) -> Verdict {
        if message.content != "\"probe-http\"" {
            return Verdict::Deliver;
        }
        let got = http::fetch(&http::request("GET", "http://127.0.0.1:9/"));
        Verdict::Replace(json!(report(got).to_string()).to_string())
    }
}

imhost_sdk::export_auth!(Probe);
imhost_sdk::export_filter!(Probe);
