//! The `host` interface plugins import: logging into our tracing, their own
//! settings, the namespaced key-value store and acting on the cluster.
//!
//! Host calls await (Redis, the relay); an epoch deadline only interrupts wasm
//! code, so each awaiting call has its own time limit, the plugin's call
//! timeout, and reports a timeout to the guest as an error value.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use imhost_client::ClientId;

use super::bindings::imhost::plugin::host::{Host, Level};
use super::bindings::imhost::plugin::types;
use super::grants::{Action, Effective};
use super::instance::PluginState;
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
