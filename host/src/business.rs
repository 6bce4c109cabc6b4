//! The business operations a backend asks a node for: FreeIM's `ImHelper`,
//! run inside the node. The HTTP API and the demo backend are thin callers.
//!
//! Any node accepts any call: deliveries are grouped by owning node and handed
//! to the relay, which reaches this node or another one alike.

use imhost_client::ClientId;
use imhost_client::api::{ChannelInfo, ClientInfo, ConnectUrlResponse};
use imhost_client::wire::{ChanMessage, DirectMessage, ServerMessage, TokenValue, group_by_node};

use std::sync::Arc;

use crate::cluster::{ClusterError, Relay, Topology};
use crate::config::WS_PATH;
use crate::node::Node;

/// What sending needs: who owns which client, and the relay to reach them.
/// Built before the node, so the plugins' host calls hold it directly.
#[derive(Clone)]
pub struct Outbox {
    pub topology: Topology,
    pub relay: Arc<dyn Relay>,
    /// Largest content a plugin may send: the API's body limit
    /// (`max_body_bytes`), so a plugin cannot send what a backend could not.
    pub max_content_bytes: usize,
}

/// Why a business operation failed. The HTTP layer maps it to a response;
/// plugins' host calls get its text.
#[derive(Debug, thiserror::Error)]
pub enum BusinessError {
    /// The caller asked for something that cannot be (a bad channel name).
    #[error("{0}")]
    Invalid(String),
    /// The cluster could not do it now.
    #[error(transparent)]
    Cluster(#[from] ClusterError),
}

/// Longest channel name accepted, in bytes.
const MAX_CHANNEL_NAME: usize = 256;

/// The JSON text terminals will receive: compact, keys in the caller's order,
/// non-ASCII kept as UTF-8 (what Newtonsoft writes).
pub fn message_text(message: &serde_json::Value) -> String {
    message.to_string()
}

/// Checks a channel name taken from a URL path.
pub fn check_channel(chan: &str) -> Result<(), BusinessError> {
    if chan.is_empty() || chan.len() > MAX_CHANNEL_NAME {
        return Err(BusinessError::Invalid(format!(
            "channel name must be 1 to {MAX_CHANNEL_NAME} bytes"
        )));
    }
    Ok(())
}

/// Issues a single-use connect URL for `client_id` on the node that owns it.
pub async fn connect_url(
    node: &Node,
    client_id: ClientId,
    metadata: Option<String>,
) -> Result<ConnectUrlResponse, BusinessError> {
    let value = TokenValue {
        client_id,
        metadata,
    };
    let token = node
        .presence
        .issue_token(&value, node.config.limits.token_ttl)
        .await?;
    let server = node.topology.node_for(client_id).to_owned();
    Ok(ConnectUrlResponse {
        url: format!(
            "{}://{server}{WS_PATH}?token={token}",
            node.config.public_scheme
        ),
        server,
    })
}

/// Sends `content` to `receivers`, with receipts back to `sender` when asked.
pub async fn send_message(
    outbox: &Outbox,
    sender: ClientId,
    receivers: &[ClientId],
    mut content: String,
    receipt: bool,
) -> Result<(), BusinessError> {
    let mut groups = group_by_node(receivers, &outbox.topology.servers)
        .into_iter()
        .peekable();
    while let Some((server, ids)) = groups.next() {
        // The last (usually the only) node's message takes the content.
        let content = if groups.peek().is_some() {
            content.clone()
        } else {
            std::mem::take(&mut content)
        };
        let message = ServerMessage::Direct(DirectMessage {
            sender,
            receivers: ids,
            content,
            receipt,
        });
        outbox.relay.send(server, message).await?;
    }
    Ok(())
}

/// Sends `content` to a channel's members (every client when `chan` is `None`).
pub async fn send_chan_message(
    outbox: &Outbox,
    sender: ClientId,
    chan: Option<String>,
    content: String,
) -> Result<(), BusinessError> {
    let message = ServerMessage::Chan(ChanMessage {
        sender,
        chan,
        content,
    });
    outbox.relay.send_all(message).await?;
    Ok(())
}

/// The plugins' host calls act on the cluster through the same operations
/// as the API.
#[async_trait::async_trait]
impl crate::plugins::host_api::Cluster for Outbox {
    fn max_content_bytes(&self) -> usize {
        self.max_content_bytes
    }

    async fn send_message(
        &self,
        sender: ClientId,
        receivers: &[ClientId],
        content: String,
        receipt: bool,
    ) -> Result<(), String> {
        send_message(self, sender, receivers, content, receipt)
            .await
            .map_err(|e| e.to_string())
    }

    async fn send_channel(
        &self,
        sender: ClientId,
        channel: String,
        content: String,
    ) -> Result<(), String> {
        check_channel(&channel).map_err(|e| e.to_string())?;
        send_chan_message(self, sender, Some(channel), content)
            .await
            .map_err(|e| e.to_string())
    }

    async fn broadcast(&self, content: String) -> Result<(), String> {
        send_chan_message(self, 0, None, content)
            .await
            .map_err(|e| e.to_string())
    }

    async fn force_offline(&self, client: ClientId) -> Result<(), String> {
        force_offline(self, client).await.map_err(|e| e.to_string())
    }
}

/// Closes every socket of `client_id`, wherever it is.
pub async fn force_offline(outbox: &Outbox, client_id: ClientId) -> Result<(), BusinessError> {
    let server = outbox.topology.node_for(client_id).to_owned();
    outbox
        .relay
        .send(&server, ServerMessage::ForceOffline { client_id })
        .await?;
    Ok(())
}

/// What the cluster knows about one client.
pub async fn client_info(node: &Node, client_id: ClientId) -> Result<ClientInfo, BusinessError> {
    let connections = node.presence.connections(client_id).await?;
    let channels = node.presence.channels_of(client_id).await?;
    Ok(ClientInfo {
        client_id,
        online: connections > 0,
        connections,
        channels,
    })
}

/// Every channel with its member count.
pub async fn channels(node: &Node) -> Result<Vec<ChannelInfo>, BusinessError> {
    Ok(node.presence.channels().await?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_reach_terminals_as_the_values_sent() {
        // A fuzz find (fuzz/regressions/api_bodies): without correctly
        // rounded parsing, this came back as a different number.
        for text in [
            "26222244444444444444444",
            "1e300",
            "0.1",
            "-2.5e-308",
            "123",
        ] {
            let message: serde_json::Value = serde_json::from_str(text).expect("number");
            let again: serde_json::Value =
                serde_json::from_str(&message_text(&message)).expect("parses");
            assert_eq!(again, message, "{text}");
        }
    }
}
