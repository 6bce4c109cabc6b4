//! JSON Web Key Sets the host fetches and caches for plugins (ABI 1.1
//! `key-set-key`), shared by every plugin of the node and every version of
//! each, so a swap refetches nothing.
//!
//! What Envoy's `jwt_authn` does, the behaviour operators already expect:
//! - a set is kept for its lifetime (`Cache-Control: max-age`, bounded to
//!   [`MIN_LIFETIME`]..[`MAX_LIFETIME`], [`DEFAULT_LIFETIME`] without one);
//! - after three quarters of it, the next lookup starts a refresh in the
//!   background and is answered from the cached set: a connect never waits
//!   for a refresh;
//! - a `kid` the set does not hold refetches it (a provider rotated its
//!   keys), at most once per [`UNKNOWN_KID_REFETCH`];
//! - one fetch at a time per set: concurrent lookups of a cold set share it
//!   (a thousand connects, one request);
//! - a failed fetch is retried by the next lookup after [`RETRY_AFTER`];
//!   until then lookups that need the set fail at once, never hanging;
//! - when the provider is down, the cached set serves until its lifetime
//!   ends, then lookups fail closed with the last error.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::egress::{Egress, EgressError, Request};
use crate::stats::Stats;

pub const DEFAULT_LIFETIME: Duration = Duration::from_secs(600);
pub const MIN_LIFETIME: Duration = Duration::from_secs(1);
pub const MAX_LIFETIME: Duration = Duration::from_secs(24 * 3600);
pub const UNKNOWN_KID_REFETCH: Duration = Duration::from_secs(10);
pub const RETRY_AFTER: Duration = Duration::from_secs(1);
/// Keys kept of one set.
const MAX_KEYS: usize = 64;
/// Sets kept by the node.
const MAX_SETS: usize = 256;

/// One set as last fetched.
#[derive(Debug, Default)]
struct Entry {
    /// Signing keys, as JSON text, with their `kid`.
    keys: Vec<(Option<String>, String)>,
    fetched: Option<Instant>,
    expires: Option<Instant>,
    refreshing: bool,
    last_attempt: Option<Instant>,
    last_error: Option<String>,
    /// Fetches completed (success or not): tells a waiter whether the fetch
    /// it queued behind already happened.
    generation: u64,
}

/// The node's key sets.
pub struct KeySets {
    sets: Mutex<HashMap<String, Arc<Set>>>,
    stats: Arc<Stats>,
}

struct Set {
    url: String,
    entry: Mutex<Entry>,
    /// Held by the one fetch in progress.
    fetching: tokio::sync::Mutex<()>,
}

/// What a lookup found.
enum Found {
    Key(String),
    /// The set is current and has no such key.
    Missing {
        refetch: bool,
    },
    /// No usable set: fetch (or fail with the last error).
    Stale,
    Failed(String),
}

impl KeySets {
    pub fn new(stats: Arc<Stats>) -> KeySets {
        KeySets {
            sets: Mutex::default(),
            stats,
        }
    }

    fn set(&self, url: &str) -> Arc<Set> {
        let mut sets = self.sets.lock().unwrap_or_else(|p| p.into_inner());
        if sets.len() >= MAX_SETS && !sets.contains_key(url) {
            // Only the operator's lists name sets; past the bound, forget
            // the idle ones rather than grow.
            sets.retain(|_, set| Arc::strong_count(set) > 1);
        }
        sets.entry(url.to_owned())
            .or_insert_with(|| {
                Arc::new(Set {
                    url: url.to_owned(),
                    entry: Mutex::default(),
                    fetching: tokio::sync::Mutex::new(()),
                })
            })
            .clone()
    }

    /// The key `kid` of the set at `url`, fetched through `egress` (the
    /// asking plugin's rules) when it must be.
    ///
    /// # Errors
    /// The URL is not granted, or no current copy of the set can be had.
    pub async fn key(
        &self,
        url: &str,
        kid: Option<&str>,
        egress: &Arc<Egress>,
    ) -> Result<Option<String>, String> {
        if !egress.allows_key_set(url) {
            Stats::incr(&self.stats.plugin_http_refused);
            return Err(format!(
                "key set {url} is not on plugin {}'s `key_sets` list in the grants file",
                egress.plugin()
            ));
        }
        let set = self.set(url);
        let mut fetched_once = false;
        loop {
            let (found, generation) = set.lookup(kid, egress, &self.stats);
            match found {
                Found::Key(jwk) => return Ok(Some(jwk)),
                Found::Missing { refetch: false } => return Ok(None),
                Found::Failed(why) => return Err(why),
                Found::Missing { refetch: true } | Found::Stale if !fetched_once => {
                    fetched_once = true;
                    set.fetch_once(generation, egress, &self.stats).await;
                }
                Found::Missing { .. } => return Ok(None),
                Found::Stale => {
                    let last = set.entry().last_error.clone();
                    return Err(last.unwrap_or_else(|| format!("key set {url} unavailable")));
                }
            }
        }
    }
}

impl Set {
    fn entry(&self) -> std::sync::MutexGuard<'_, Entry> {
        self.entry.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Looks `kid` up in the cached copy, starting a background refresh
    /// when it is due.
    fn lookup(
        self: &Arc<Self>,
        kid: Option<&str>,
        egress: &Arc<Egress>,
        stats: &Arc<Stats>,
    ) -> (Found, u64) {
        let now = Instant::now();
        let mut entry = self.entry();
        let generation = entry.generation;
        let current = entry.expires.is_some_and(|e| now < e);
        if !current {
            let retry_due = entry
                .last_attempt
                .is_none_or(|at| now.duration_since(at) >= RETRY_AFTER);
            if entry.last_error.is_some() && !retry_due {
                let why = entry.last_error.clone().unwrap_or_default();
                return (Found::Failed(why), generation);
            }
            return (Found::Stale, generation);
        }
        if let (Some(fetched), Some(expires)) = (entry.fetched, entry.expires) {
            let refresh_at = fetched + (expires - fetched) * 3 / 4;
            let retry_due = entry
                .last_attempt
                .is_none_or(|at| now.duration_since(at) >= RETRY_AFTER);
            if now >= refresh_at && !entry.refreshing && retry_due {
                entry.refreshing = true;
                let (set, egress, stats) = (self.clone(), egress.clone(), stats.clone());
                tokio::spawn(async move {
                    set.fetch_once(generation, &egress, &stats).await;
                    set.entry().refreshing = false;
                });
            }
        }
        let key = entry
            .keys
            .iter()
            .find(|(k, _)| match kid {
                Some(kid) => k.as_deref() == Some(kid),
                None => entry.keys.len() == 1,
            })
            .map(|(_, jwk)| jwk.clone());
        match key {
            Some(jwk) => (Found::Key(jwk), generation),
            None => {
                let refetch = kid.is_some()
                    && entry
                        .fetched
                        .is_none_or(|f| now.duration_since(f) >= UNKNOWN_KID_REFETCH);
                (Found::Missing { refetch }, generation)
            }
        }
    }

    /// Fetches the set unless a fetch finished since `seen` (then whoever
    /// waited here uses its result).
    async fn fetch_once(&self, seen: u64, egress: &Egress, stats: &Stats) {
        let _one = self.fetching.lock().await;
        if self.entry().generation != seen {
            return;
        }
        Stats::incr(&stats.key_set_fetches);
        let result = egress.fetch(Request::get(&self.url), true).await;
        let parsed = match result {
            Ok(response) if response.status == 200 => {
                parse(&response.body).map(|keys| (keys, lifetime(response.header("cache-control"))))
            }
            Ok(response) => Err(format!("{} answered {}", self.url, response.status)),
            Err(EgressError::Refused(why) | EgressError::Failed(why)) => {
                Err(format!("key set {}: {why}", self.url))
            }
        };
        let now = Instant::now();
        let mut entry = self.entry();
        entry.generation += 1;
        entry.last_attempt = Some(now);
        match parsed {
            Ok((keys, lifetime)) => {
                entry.keys = keys;
                entry.fetched = Some(now);
                entry.expires = Some(now + lifetime);
                entry.last_error = None;
            }
            Err(why) => {
                Stats::incr(&stats.key_set_fetch_failures);
                tracing::warn!(url = %self.url, cause = %why, "key set not fetched; the cached copy serves until it expires");
                entry.last_error = Some(why);
            }
        }
    }
}

/// The signing keys of a JWKS document (RFC 7517 §5): keys for another
/// `use` are left out.
fn parse(body: &[u8]) -> Result<Vec<(Option<String>, String)>, String> {
    let doc: Value = serde_json::from_slice(body).map_err(|e| format!("not a JWKS: {e}"))?;
    let keys = doc
        .get("keys")
        .and_then(Value::as_array)
        .ok_or("not a JWKS: no `keys` array")?;
    Ok(keys
        .iter()
        .filter(|k| k.get("kty").and_then(Value::as_str).is_some())
        .filter(|k| {
            k.get("use")
                .and_then(Value::as_str)
                .is_none_or(|u| u == "sig")
        })
        .take(MAX_KEYS)
        .map(|k| {
            let kid = k.get("kid").and_then(Value::as_str).map(str::to_owned);
            (kid, k.to_string())
        })
        .collect())
}

/// A set's lifetime from its `Cache-Control`, bounded.
fn lifetime(cache_control: Option<&str>) -> Duration {
    cache_control
        .and_then(|cc| {
            cc.split(',').find_map(|d| {
                let d = d.trim();
                d.strip_prefix("max-age=")
                    .or_else(|| d.strip_prefix("s-maxage="))
                    .and_then(|secs| secs.trim_matches('"').parse::<u64>().ok())
            })
        })
        .map(Duration::from_secs)
        .unwrap_or(DEFAULT_LIFETIME)
        .clamp(MIN_LIFETIME, MAX_LIFETIME)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sets_lifetime_is_its_max_age_within_bounds() {
        assert_eq!(lifetime(None), DEFAULT_LIFETIME);
        assert_eq!(
            lifetime(Some("public, max-age=300")),
            Duration::from_secs(300)
        );
        assert_eq!(lifetime(Some("max-age=0")), MIN_LIFETIME);
        assert_eq!(lifetime(Some("max-age=99999999")), MAX_LIFETIME);
        assert_eq!(lifetime(Some("no-cache")), DEFAULT_LIFETIME);
    }

    #[test]
    fn only_signing_keys_are_kept() {
        let keys = parse(
            br#"{"keys":[{"kty":"RSA","kid":"a","n":"x","e":"AQAB"},{"kty":"RSA","kid":"b","use":"enc"},{"kid":"c"}]}"#,
        )
        .expect("jwks");
        assert_eq!(keys.len(), 1);
        assert_eq!(keys[0].0.as_deref(), Some("a"));
        assert!(parse(b"{}").is_err());
        assert!(parse(b"<html>").is_err());
    }
}
