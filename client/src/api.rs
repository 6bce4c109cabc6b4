//! Bodies of the business HTTP API (SPEC section 3). JSON, snake_case.
//!
//! Requests reject unknown fields, so a typo in a backend's body is a 400 and not
//! a silently ignored option.

use serde::{Deserialize, Serialize};

use crate::ClientId;

/// `POST /api/v1/connect-url`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConnectUrlRequest {
    pub client_id: ClientId,
    /// Opaque to imhost; handed back in online/offline events.
    #[serde(default)]
    pub metadata: Option<String>,
}

/// Answer of `POST /api/v1/connect-url`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ConnectUrlResponse {
    /// `ws://{server}/ws?token=…`, for the terminal; single use, short-lived.
    pub url: String,
    /// The node that owns this client (FreeIM partitioning).
    pub server: String,
}

/// `POST /api/v1/messages`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SendMessageRequest {
    /// 0 means "the system": no receipts and no echo rule.
    pub sender: ClientId,
    pub receivers: Vec<ClientId>,
    /// Any JSON; serialised once, compactly, and that text is what terminals get.
    pub message: serde_json::Value,
    #[serde(default)]
    pub receipt: bool,
}

/// `POST /api/v1/channels/{chan}/join` and `/leave`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChannelMembersRequest {
    pub client_ids: Vec<ClientId>,
}

/// `POST /api/v1/channels/{chan}/messages`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChannelMessageRequest {
    #[serde(default)]
    pub sender: ClientId,
    pub message: serde_json::Value,
}

/// `POST /api/v1/broadcast`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BroadcastRequest {
    pub message: serde_json::Value,
}

/// `POST /api/v1/batch`: many sends in one request, each with its own
/// result, in order.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchRequest {
    pub items: Vec<BatchItem>,
}

/// One send of a batch: the body of the call it names.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum BatchItem {
    /// `POST /api/v1/messages`.
    Messages(SendMessageRequest),
    /// `POST /api/v1/channels/{channel}/messages`.
    ChannelMessage(BatchChannelMessage),
    /// `POST /api/v1/broadcast`.
    Broadcast(BroadcastRequest),
}

/// A channel message in a batch: [`ChannelMessageRequest`] with its channel.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchChannelMessage {
    pub channel: String,
    #[serde(default)]
    pub sender: ClientId,
    pub message: serde_json::Value,
}

/// Answer of `POST /api/v1/batch`: one result per item, in order.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct BatchResponse {
    pub results: Vec<BatchResult>,
}

/// `{}` when the item was accepted, `{"error":{…}}` when not.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct BatchResult {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorDetail>,
}

/// One row of `GET /api/v1/channels`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChannelInfo {
    pub channel: String,
    /// Members of the channel (FreeIM's ListChan); members leave when their last
    /// device disconnects, so this counts members online.
    pub online: u64,
}

/// Answer of `GET /api/v1/clients/{id}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientInfo {
    pub client_id: ClientId,
    pub online: bool,
    /// Sockets (devices) the client holds across the cluster.
    pub connections: u64,
    pub channels: Vec<String>,
}

/// Data of an `online` / `offline` event on `GET /api/v1/events`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PresenceEvent {
    pub client_id: ClientId,
    pub metadata: Option<String>,
    /// The node that holds (held) the socket.
    pub server: String,
}

/// Every error answer: `{"error":{"code":"…","message":"…"}}`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

/// The inside of [`ErrorBody`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ErrorDetail {
    /// Stable, machine-readable: `unauthorized`, `bad_request`, `not_found`,
    /// `payload_too_large`, `unavailable`, `overloaded` (503 with
    /// `Retry-After`: the node took nothing), `internal`.
    pub code: String,
    /// For people; never carries internal details.
    pub message: String,
}
