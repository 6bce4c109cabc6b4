//! The `host` interface plugins import: logging into our tracing, their own
//! settings, the namespaced key-value store and acting on the cluster; since
//! ABI 1.1, crypto ([`super::crypto`]), key sets ([`super::key_sets`]) and
//! HTTP requests ([`super::egress`]).
//!
//! Host calls await (Redis, the relay); an epoch deadline only interrupts wasm
//! code, so each awaiting call has its own time limit, the plugin's call
//! timeout, and reports a timeout to the guest as an error value.
//!
//! Key-set lookups and HTTP requests may take longer than a call's deadline:
//! the guest's store is parked on its fiber while they are in flight (no
//! thread waits), and the time spent waiting is not counted against the
//! guest's CPU deadline ([`CallClock`]). Only the auth and events hooks may
//! call out; a filter or inbound call that tries is told so, which is what
//! lets those hooks run exactly as before.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use imhost_client::ClientId;

use super::bindings::imhost::plugin::host::{
    HashAlgorithm, Host, HttpRequest, HttpResponse, Level,
};
use super::bindings::imhost::plugin::types;
use super::crypto::{self, Hash};
use super::egress::{self, Egress};
use super::grants::{Action, Effective};
use super::instance::PluginState;
use super::key_sets::KeySets;
use crate::cluster::kv::PluginKv;

/// What one plugin version's host calls need.
pub struct HostCtx {
    pub name: String,
    pub settings_json: String,
    pub kv: Arc<dyn PluginKv>,
    /// How host calls send; `None` where there is no cluster behind the
    /// plugin (`imhost plugin check`).
    pub outbox: Option<Arc<dyn Cluster>>,
    pub timeout: Duration,
    /// What the operator granted of what the manifest asks: the sandbox's
    /// doors and the host actions this plugin may take.
    pub grants: Arc<Effective>,
    /// HTTP under the operator's rules for this plugin.
    pub egress: Arc<Egress>,
    /// The node's key-set cache.
    pub key_sets: Arc<KeySets>,
}

/// What the host calls of every plugin version of a node are served by.
#[derive(Clone)]
pub struct Services {
    pub kv: Arc<dyn PluginKv>,
    /// None: no cluster behind the plugins (`imhost plugin check`).
    pub outbox: Option<Arc<dyn Cluster>>,
    pub key_sets: Arc<KeySets>,
    pub egress: Arc<egress::EgressByPlugin>,
}

impl Services {
    /// Services with nothing behind them: an in-memory kv, no cluster, a
    /// key-set cache and HTTP of their own (`imhost plugin check`, benches).
    pub fn detached() -> Services {
        let stats = Arc::new(crate::stats::Stats::default());
        Services {
            kv: Arc::new(crate::cluster::kv::EmbeddedKv::default()),
            outbox: None,
            key_sets: Arc::new(KeySets::new(stats.clone())),
            egress: Arc::new(egress::EgressByPlugin::new(stats)),
        }
    }

    /// The host context of one version of plugin `name`.
    pub fn host_ctx(
        &self,
        name: &str,
        settings_json: String,
        timeout: Duration,
        grants: Arc<Effective>,
    ) -> HostCtx {
        HostCtx {
            name: name.to_owned(),
            settings_json,
            kv: self.kv.clone(),
            outbox: self.outbox.clone(),
            timeout,
            egress: self.egress.for_plugin(name, &grants.egress),
            key_sets: self.key_sets.clone(),
            grants,
        }
    }
}

/// Most a single hook call may spend waiting on the network, all its
/// key-set lookups and HTTP requests together.
pub const MAX_WAIT_PER_CALL: Duration = egress::MAX_TIMEOUT;

/// The time of one call that may call out (auth, events): when it started,
/// and how long it waited on the network, so the epoch deadline can charge
/// the guest for its own CPU time only.
#[derive(Debug, Clone, Copy)]
pub struct CallClock {
    started: std::time::Instant,
    budget: Duration,
    waited: Duration,
}

impl CallClock {
    pub fn start(budget: Duration) -> CallClock {
        CallClock {
            started: std::time::Instant::now(),
            budget,
            waited: Duration::ZERO,
        }
    }

    /// What is left of the guest's own time, if anything.
    pub fn remaining(&self) -> Option<Duration> {
        let used = self.started.elapsed().saturating_sub(self.waited);
        self.budget.checked_sub(used).filter(|d| !d.is_zero())
    }
}

impl HostCtx {
    fn key(&self, key: &str) -> String {
        format!("{}:{key}", self.name)
    }

    async fn bounded<T, E: std::fmt::Display>(
        &self,
        work: impl Future<Output = Result<T, E>>,
    ) -> Result<T, String> {
        match tokio::time::timeout(self.timeout, work).await {
            Ok(result) => result.map_err(|e| e.to_string()),
            Err(_) => Err(format!("host call exceeded {:?}", self.timeout)),
        }
    }

    /// Refuses a host action the operator did not grant.
    fn allowed(&self, action: Action) -> Result<(), String> {
        if self.grants.allows(action) {
            Ok(())
        } else {
            Err(format!(
                "host action `{}` not granted to plugin {} (the operator grants it in the node's plugin_grants file)",
                action.name(),
                self.name
            ))
        }
    }

    fn outbox(&self) -> Result<&Arc<dyn Cluster>, String> {
        self.outbox
            .as_ref()
            .ok_or_else(|| "no cluster to send to (plugin check)".to_owned())
    }
}

/// How the plugins' host calls act on the cluster. The node's business
/// operations implement it (`crate::business::Outbox`), so the plugin host
/// needs nothing of the node: the dependency runs from the node to the
/// plugins, never back.
#[async_trait::async_trait]
pub trait Cluster: Send + Sync {
    /// Largest content a plugin may send (the API's body limit).
    fn max_content_bytes(&self) -> usize;
    async fn send_message(
        &self,
        sender: ClientId,
        receivers: &[ClientId],
        content: String,
        receipt: bool,
    ) -> Result<(), String>;
    /// Checks the channel's name as the API does, then sends.
    async fn send_channel(
        &self,
        sender: ClientId,
        channel: String,
        content: String,
    ) -> Result<(), String>;
    async fn broadcast(&self, content: String) -> Result<(), String>;
    async fn force_offline(&self, client: ClientId) -> Result<(), String>;
}

/// What the HTTP API checks of a message, checked of a plugin's: at most
/// the API's body limit, and JSON.
fn check_content(max_content_bytes: usize, content: &str) -> Result<(), String> {
    if content.len() > max_content_bytes {
        return Err(format!(
            "content is {} bytes; at most {max_content_bytes} (max_body_bytes)",
            content.len()
        ));
    }
    serde_json::from_str::<serde::de::IgnoredAny>(content)
        .map(|_| ())
        .map_err(|e| format!("content is not JSON: {e}"))
}

fn ttl(ms: u64) -> Option<Duration> {
    (ms > 0).then(|| Duration::from_millis(ms))
}

impl types::Host for PluginState {}

impl Host for PluginState {
    async fn log(&mut self, level: Level, message: String) {
        let plugin = self.host.name.as_str();
        match level {
            Level::Trace => tracing::trace!(plugin, "{message}"),
            Level::Debug => tracing::debug!(plugin, "{message}"),
            Level::Info => tracing::info!(plugin, "{message}"),
            Level::Warn => tracing::warn!(plugin, "{message}"),
            Level::Error => tracing::error!(plugin, "{message}"),
        }
    }

    async fn config(&mut self) -> String {
        self.host.settings_json.clone()
    }

    async fn kv_get(&mut self, key: String) -> Result<Option<String>, String> {
        let host = self.host.clone();
        host.allowed(Action::Kv)?;
        host.bounded(host.kv.get(&host.key(&key))).await
    }

    async fn kv_set(&mut self, key: String, value: String, ttl_ms: u64) -> Result<(), String> {
        let host = self.host.clone();
        host.allowed(Action::Kv)?;
        host.bounded(host.kv.set(&host.key(&key), &value, ttl(ttl_ms)))
            .await
    }

    async fn kv_incr(&mut self, key: String, delta: i64, ttl_ms: u64) -> Result<i64, String> {
        let host = self.host.clone();
        host.allowed(Action::Kv)?;
        host.bounded(host.kv.incr(&host.key(&key), delta, ttl(ttl_ms)))
            .await
    }

    async fn kv_delete(&mut self, key: String) -> Result<(), String> {
        let host = self.host.clone();
        host.allowed(Action::Kv)?;
        host.bounded(host.kv.delete(&host.key(&key))).await
    }

    async fn send_message(
        &mut self,
        sender: ClientId,
        receivers: Vec<ClientId>,
        content: String,
        receipt: bool,
    ) -> Result<(), String> {
        let host = self.host.clone();
        host.allowed(Action::Send)?;
        let cluster = host.outbox()?;
        check_content(cluster.max_content_bytes(), &content)?;
        host.bounded(cluster.send_message(sender, &receivers, content, receipt))
            .await
    }

    async fn send_channel(
        &mut self,
        sender: ClientId,
        channel: String,
        content: String,
    ) -> Result<(), String> {
        let host = self.host.clone();
        host.allowed(Action::Channel)?;
        let cluster = host.outbox()?;
        check_content(cluster.max_content_bytes(), &content)?;
        host.bounded(cluster.send_channel(sender, channel, content))
            .await
    }

    async fn broadcast(&mut self, content: String) -> Result<(), String> {
        let host = self.host.clone();
        host.allowed(Action::Broadcast)?;
        let cluster = host.outbox()?;
        check_content(cluster.max_content_bytes(), &content)?;
        host.bounded(cluster.broadcast(content)).await
    }

    async fn force_offline(&mut self, client: ClientId) -> Result<(), String> {
        let host = self.host.clone();
        host.allowed(Action::ForceOffline)?;
        let cluster = host.outbox()?;
        host.bounded(cluster.force_offline(client)).await
    }

    async fn digest(&mut self, algorithm: HashAlgorithm, data: Vec<u8>) -> Vec<u8> {
        crypto::digest(algorithm.into(), &data)
    }

    async fn hmac(&mut self, algorithm: HashAlgorithm, key: Vec<u8>, data: Vec<u8>) -> Vec<u8> {
        crypto::hmac(algorithm.into(), &key, &data)
    }

    async fn hmac_verify(
        &mut self,
        algorithm: HashAlgorithm,
        key: Vec<u8>,
        data: Vec<u8>,
        tag: Vec<u8>,
    ) -> bool {
        crypto::hmac_verify(algorithm.into(), &key, &data, &tag)
    }

    async fn random_bytes(&mut self, len: u32) -> Vec<u8> {
        // Over the cap: the most the call gives, not a trap.
        crypto::random_bytes(len.min(crypto::MAX_RANDOM_BYTES)).unwrap_or_default()
    }

    async fn verify_signature(
        &mut self,
        alg: String,
        jwk: String,
        signed: Vec<u8>,
        signature: Vec<u8>,
    ) -> Result<bool, String> {
        crypto::verify_signature(&alg, &jwk, &signed, &signature)
    }

    async fn key_set_key(
        &mut self,
        url: String,
        kid: Option<String>,
    ) -> Result<Option<String>, String> {
        let host = self.host.clone();
        self.waiting(host.key_sets.key(&url, kid.as_deref(), &host.egress))
            .await
    }

    async fn http_fetch(&mut self, request: HttpRequest) -> Result<HttpResponse, String> {
        let host = self.host.clone();
        let request = egress::Request {
            method: request.method.to_ascii_uppercase(),
            url: request.url,
            headers: request.headers,
            body: request.body,
            timeout: Duration::from_millis(u64::from(request.timeout_ms)),
            cache: request
                .cache
                .map(|c| (c.key, Duration::from_millis(c.ttl_ms))),
        };
        let fetched = self.waiting(async move {
            host.egress
                .fetch(request, false)
                .await
                .map_err(|e| e.to_string())
        });
        let response = fetched.await?;
        Ok(HttpResponse {
            status: response.status,
            headers: response.headers,
            body: response.body,
            cached: response.cached,
        })
    }
}

impl From<HashAlgorithm> for Hash {
    fn from(algorithm: HashAlgorithm) -> Hash {
        match algorithm {
            HashAlgorithm::Sha256 => Hash::Sha256,
            HashAlgorithm::Sha384 => Hash::Sha384,
            HashAlgorithm::Sha512 => Hash::Sha512,
        }
    }
}

impl PluginState {
    /// Runs `work`, a wait on the network, charging it to the call's wait
    /// budget and not to the guest's deadline.
    async fn waiting<T>(
        &mut self,
        work: impl Future<Output = Result<T, String>>,
    ) -> Result<T, String> {
        let Some(clock) = self.clock else {
            return Err(format!(
                "plugin {}: only the auth and events hooks may use key sets and HTTP",
                self.host.name
            ));
        };
        let left = MAX_WAIT_PER_CALL.saturating_sub(clock.waited);
        if left.is_zero() {
            return Err(format!(
                "this call already waited {MAX_WAIT_PER_CALL:?} on the network"
            ));
        }
        let began = std::time::Instant::now();
        let result = match tokio::time::timeout(left, work).await {
            Ok(result) => result,
            Err(_) => Err(format!(
                "this call waited {MAX_WAIT_PER_CALL:?} on the network"
            )),
        };
        if let Some(clock) = &mut self.clock {
            clock.waited += began.elapsed();
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_plugins_content_passes_the_apis_checks() {
        assert!(check_content(16, r#"{"a":1}"#).is_ok());
        let too_big = check_content(16, &format!("\"{}\"", "x".repeat(20)));
        assert!(too_big.is_err_and(|e| e.contains("at most 16")));
        let not_json = check_content(16, "{oops");
        assert!(not_json.is_err_and(|e| e.contains("not JSON")));
    }
}
