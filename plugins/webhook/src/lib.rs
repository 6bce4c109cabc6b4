//! `webhook`: posts every presence event (a socket came or went) to a
//! backend URL, signed, and retries a receiver that fails.
//!
//! Each event is one `POST` of JSON:
//! `{"event":"online","client_id":7,"metadata":…,"node":"…","devices":1,
//! "id":"…","timestamp":1733356800000}` with the headers
//! `X-Imhost-Signature: sha256=<hex HMAC-SHA256(secret, timestamp + "." + body)>`
//! and `X-Imhost-Timestamp: <the same timestamp>`, so the receiver can check
//! it came from this node and refuse replays (the scheme of Stripe's and
//! GitHub's webhooks). `id` is unique per event: a receiver that sees it
//! twice (a retry after a lost answer) can ignore the second.
//!
//! A 2xx answer is delivery. Anything else (an error status, a timeout, a
//! refused connection) is retried at once, up to `attempts` times in all;
//! what still fails is kept in the plugin's key-value store and sent again,
//! oldest first, before the next event (at most `backlog` events are kept;
//! beyond that the oldest are dropped and logged). The HTTP request is the
//! host's (ABI 1.1 `http-fetch`), to an origin the operator lists for this
//! plugin; the HMAC is the host's too.
//!
//! ```toml
//! [settings]
//! url = "https://backend.example.com/imhost/presence"
//! secret_env = "WEBHOOK_SECRET"   # or `secret = "…"`
//! attempts = 3
//! backlog = 1000
//! ```

use imhost_sdk::events::{Events, Presence, PresenceEvent};
use imhost_sdk::host::{self, crypto, http, kv};
use serde::Deserialize;
use serde_json::json;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Settings {
    url: String,
    #[serde(default)]
    secret: Option<String>,
    #[serde(default)]
    secret_env: Option<String>,
    #[serde(default = "default_attempts")]
    attempts: u32,
    #[serde(default = "default_backlog")]
    backlog: i64,
    #[serde(default)]
    timeout_ms: u32,
}

fn default_attempts() -> u32 {
    3
}

fn default_backlog() -> i64 {
    1000
}

impl Settings {
    fn secret(&self) -> Result<Vec<u8>, String> {
        if let Some(secret) = &self.secret {
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

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Posts one event body, signed; `Ok` once a 2xx came back.
fn post(settings: &Settings, secret: &[u8], body: &str) -> Result<(), String> {
    let timestamp = now_ms().to_string();
    let signed = format!("{timestamp}.{body}");
    let mac = crypto::hmac(crypto::HashAlgorithm::Sha256, secret, signed.as_bytes());
    let mut request = http::request("POST", &settings.url);
    request.timeout_ms = settings.timeout_ms;
    request.headers = vec![
        ("content-type".into(), "application/json".into()),
        ("x-imhost-timestamp".into(), timestamp),
        (
            "x-imhost-signature".into(),
            format!("sha256={}", hex::encode(mac)),
        ),
    ];
    request.body = Some(body.as_bytes().to_vec());
    let mut last = String::new();
    for _ in 0..settings.attempts.max(1) {
        match http::fetch(&request) {
            Ok(response) if (200..300).contains(&response.status) => return Ok(()),
            Ok(response) => last = format!("answered {}", response.status),
            Err(err) => last = err,
        }
    }
    Err(last)
}

/// The backlog is a queue in the key-value store: `head` and `tail`
/// counters and one key per event between them.
fn backlog_push(settings: &Settings, body: &str) -> Result<(), String> {
    let tail = kv::incr("tail", 1, 0)?;
    kv::set(&format!("event:{tail}"), body, 0)?;
    let head = kv::get("head")?
        .and_then(|h| h.parse::<i64>().ok())
        .unwrap_or(0);
    if tail - head > settings.backlog {
        kv::delete(&format!("event:{}", head + 1))?;
        kv::incr("head", 1, 0)?;
        host::warn("webhook backlog full: the oldest event was dropped");
    }
    Ok(())
}

/// Sends what is waiting, oldest first; stops at the first failure.
fn backlog_flush(settings: &Settings, secret: &[u8]) -> Result<(), String> {
    loop {
        let head = kv::get("head")?
            .and_then(|h| h.parse::<i64>().ok())
            .unwrap_or(0);
        let tail = kv::get("tail")?
            .and_then(|t| t.parse::<i64>().ok())
            .unwrap_or(0);
        if head >= tail {
            return Ok(());
        }
        let key = format!("event:{}", head + 1);
        if let Some(body) = kv::get(&key)? {
            post(settings, secret, &body)?;
        }
        kv::delete(&key)?;
        kv::incr("head", 1, 0)?;
    }
}

struct Webhook;

impl Events for Webhook {
    fn on_presence(event: PresenceEvent) {
        let settings: Settings = match host::config() {
            Ok(s) => s,
            Err(err) => return host::warn(&err),
        };
        let secret = match settings.secret() {
            Ok(secret) => secret,
            Err(err) => return host::warn(&format!("webhook: {err}")),
        };
        let id = hex::encode(crypto::random_bytes(12));
        let body = json!({
            "event": match event.kind { Presence::Online => "online", Presence::Offline => "offline" },
            "client_id": event.client_id,
            "metadata": event.metadata,
            "node": event.node,
            "devices": event.devices,
            "id": id,
            "timestamp": now_ms(),
        })
        .to_string();
        let sent = backlog_flush(&settings, &secret).and_then(|()| post(&settings, &secret, &body));
        if let Err(err) = sent {
            host::warn(&format!(
                "webhook delivery failed ({err}); kept for the next event"
            ));
            if let Err(err) = backlog_push(&settings, &body) {
                host::warn(&format!("webhook backlog unavailable ({err}); event lost"));
            }
        }
    }
}

imhost_sdk::export_events!(Webhook);
