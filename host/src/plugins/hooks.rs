//! What the rest of the host hands to hooks and gets back, in the host's own
//! types. The WIT-generated types (`bindings`) stay inside `plugins/`: a
//! change of the ABI's Rust shape (a new wit-bindgen, a 1.x addition) is
//! absorbed by the conversions here, not by `ws/` or the dispatcher.

use imhost_client::ClientId;

use super::bindings::exports::imhost::plugin::{auth, events, filter, inbound};
use super::bindings::imhost::plugin::types;
use crate::cluster::PresenceKind;

/// Who a message is for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Direct(Vec<ClientId>),
    Channel(String),
    Broadcast,
}

/// A terminal asking to connect (the auth hook).
#[derive(Debug, Clone)]
pub struct ConnectRequest {
    pub token: Option<String>,
    pub query: Vec<(String, String)>,
    pub headers: Vec<(String, String)>,
    pub remote_addr: String,
    pub node: String,
}

/// A message about to be delivered by this node (the filter hook).
#[derive(Debug, Clone)]
pub struct Outgoing {
    pub sender: ClientId,
    pub target: Target,
    pub content: String,
    pub node: String,
}

/// A socket came or went (the events hook).
#[derive(Debug, Clone)]
pub struct PresenceNotice {
    pub kind: PresenceKind,
    pub client_id: ClientId,
    pub metadata: Option<String>,
    pub node: String,
    /// The client's sockets in the cluster after this change.
    pub devices: u32,
}

/// A text frame a terminal sent (the inbound hook).
#[derive(Debug, Clone)]
pub struct InboundFrame {
    pub client_id: ClientId,
    pub metadata: Option<String>,
    pub node: String,
    pub text: String,
}

/// What an inbound plugin asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InboundAction {
    /// Send this text back on the terminal's own socket.
    Reply(String),
    /// Deliver JSON text like an API call would (filters apply).
    Deliver { target: Target, content: String },
}

impl From<Target> for types::Target {
    fn from(target: Target) -> Self {
        match target {
            Target::Direct(ids) => types::Target::Direct(ids),
            Target::Channel(chan) => types::Target::Channel(chan),
            Target::Broadcast => types::Target::Broadcast,
        }
    }
}

impl From<types::Target> for Target {
    fn from(target: types::Target) -> Self {
        match target {
            types::Target::Direct(ids) => Target::Direct(ids),
            types::Target::Channel(chan) => Target::Channel(chan),
            types::Target::Broadcast => Target::Broadcast,
        }
    }
}

impl From<&ConnectRequest> for auth::ConnectRequest {
    fn from(r: &ConnectRequest) -> Self {
        auth::ConnectRequest {
            token: r.token.clone(),
            query: r.query.clone(),
            headers: r.headers.clone(),
            remote_addr: r.remote_addr.clone(),
            node: r.node.clone(),
        }
    }
}

impl From<Outgoing> for filter::Message {
    fn from(m: Outgoing) -> Self {
        filter::Message {
            sender: m.sender,
            target: m.target.into(),
            content: m.content,
            node: m.node,
        }
    }
}

impl From<PresenceNotice> for events::PresenceEvent {
    fn from(n: PresenceNotice) -> Self {
        events::PresenceEvent {
            kind: match n.kind {
                PresenceKind::Online => events::Presence::Online,
                PresenceKind::Offline => events::Presence::Offline,
            },
            client_id: n.client_id,
            metadata: n.metadata,
            node: n.node,
            devices: n.devices,
        }
    }
}

impl From<&InboundFrame> for inbound::Frame {
    fn from(f: &InboundFrame) -> Self {
        inbound::Frame {
            client_id: f.client_id,
            metadata: f.metadata.clone(),
            node: f.node.clone(),
            text: f.text.clone(),
        }
    }
}

impl InboundAction {
    /// `None` for `ignore`.
    pub(super) fn from_guest(action: inbound::Action) -> Option<InboundAction> {
        match action {
            inbound::Action::Ignore => None,
            inbound::Action::Reply(text) => Some(InboundAction::Reply(text)),
            inbound::Action::Deliver(d) => Some(InboundAction::Deliver {
                target: d.target.into(),
                content: d.content,
            }),
        }
    }
}
