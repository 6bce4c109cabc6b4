//! A terminal's life on this node: registration, the online event, the
//! socket core until the socket ends, the offline event. Text frames go to the
//! inbound plugins when one is loaded, in the socket's task, so one
//! terminal's frames are handled in order.

use hyper::upgrade::OnUpgrade;
use imhost_client::api::PresenceEvent;
use tokio::sync::OwnedSemaphorePermit;
use tracing::{debug, error, warn};

use super::Session;
use super::handle::CloseReason;
use super::handshake;
use super::socket::{self, Limits, Terminal};
use crate::cluster::{PresenceChange, PresenceKind};
use crate::node::Node;
use crate::plugins::hooks::{InboundAction, InboundFrame, PresenceNotice, Target};
use crate::plugins::manifest::Hook;
use crate::registry::Registration;
use crate::stats::Stats;

/// Runs a socket, registered before its upgrade, from the upgrade's
/// completion to the offline event; holds its connection slot until then.
///
/// A plain fn returning an async block, not an `async fn`, for the reason
/// [`socket::run`] gives: this future is most of an idle socket's task.
#[allow(
    clippy::manual_async_fn,
    reason = "an async fn stores its arguments twice"
)]
pub fn serve(
    on_upgrade: OnUpgrade,
    registration: Registration,
    node: Node,
    session: Session,
    slot: OwnedSemaphorePermit,
) -> impl Future<Output = ()> {
    async move {
        let Some((stream, read_ahead)) = handshake::take_stream(on_upgrade).await else {
            node.registry
                .unregister(session.client.client_id, registration.conn);
            error!(
                "an upgrade did not complete, or its connection is neither TCP nor TLS over TCP; dropped"
            );
            return;
        };
        // In the handle: deliveries write to it from other tasks (see
        // `outbound`). A fresh handle has none yet, so this cannot fail.
        registration.handle.attach(stream);
        Stats::incr(&node.stats.connections);
        Stats::incr(&node.stats.connections_opened);
        presence_changed(&node, &session, PresenceKind::Online).await;
        debug!(conn = registration.conn, "connected");

        let limits = &node.config.limits;
        let limits = Limits {
            max_message: limits.max_frame_bytes,
            max_batch_bytes: limits.max_body_bytes,
            max_unsent: super::max_unsent_bytes(limits.max_body_bytes),
        };
        let terminal = Inbound {
            node: &node,
            session: &session,
        };
        let end = socket::run(
            read_ahead,
            &registration.handle,
            &node.registry,
            limits,
            &terminal,
        )
        .await;

        node.registry
            .unregister(session.client.client_id, registration.conn);
        Stats::decr(&node.stats.connections);
        presence_changed(&node, &session, PresenceKind::Offline).await;
        debug!(conn = registration.conn, ?end, "disconnected");
        // The socket counted against the node's cap until now.
        drop(slot);
    }
}

/// What a terminal's messages do: go to the inbound plugins, if any.
struct Inbound<'a> {
    node: &'a Node,
    session: &'a Session,
}

impl Terminal for Inbound<'_> {
    async fn on_text(&self, text: String) -> Option<String> {
        // The keep-alive probe (docs/http-api.md): browsers cannot see pings,
        // so a terminal that wants to notice a dead link sends an empty text
        // frame and waits for the empty one this answers. Never a plugin's.
        if text.is_empty() {
            Stats::incr(&self.node.stats.keepalive_probes);
            return Some(text);
        }
        if !self.node.plugins.current().has(Hook::Inbound) {
            Stats::incr(&self.node.stats.inbound_ignored);
            return None;
        }
        // Boxed: the plugin call's future is large, and inlined it would grow
        // every socket task, plugins or not.
        Box::pin(handle_inbound(self.node, self.session, text)).await
    }

    fn on_ignored(&self) {
        Stats::incr(&self.node.stats.inbound_ignored);
    }

    fn on_violation(&self, reason: CloseReason) {
        let counter = match reason {
            CloseReason::Oversize => &self.node.stats.oversize_closed,
            _ => &self.node.stats.protocol_errors,
        };
        Stats::incr(counter);
    }
}

/// Records a socket coming or going in the presence store, then tells the
/// events plugins and the cluster's event subscribers.
async fn presence_changed(node: &Node, session: &Session, kind: PresenceKind) {
    let counted = match kind {
        PresenceKind::Online => node.presence.connected(&session.client).await,
        PresenceKind::Offline => node.presence.disconnected(&session.client).await,
    };
    let devices = counted.unwrap_or_else(|err| {
        warn!(cause = %err, "online count not updated");
        node.registry.sockets(session.client.client_id) as u64
    });
    announce(node, session, kind, devices).await;
}

async fn announce(node: &Node, session: &Session, kind: PresenceKind, devices: u64) {
    node.plugins.presence(PresenceNotice {
        kind,
        client_id: session.client.client_id,
        metadata: session.client.metadata.clone(),
        node: node.topology.me.clone(),
        devices: u32::try_from(devices).unwrap_or(u32::MAX),
    });
    let change = PresenceChange {
        kind,
        event: PresenceEvent {
            client_id: session.client.client_id,
            metadata: session.client.metadata.clone(),
            server: node.topology.me.clone(),
        },
    };
    if let Err(err) = node.relay.announce(change).await {
        warn!(cause = %err, ?kind, "presence event not published");
    }
}

/// Hands a terminal's text frame to the inbound plugins; returns a reply for
/// this socket, if the plugin gave one. Deliveries go through the normal path
/// (and so through the filter chain on the delivery nodes).
async fn handle_inbound(node: &Node, session: &Session, text: String) -> Option<String> {
    let frame = InboundFrame {
        client_id: session.client.client_id,
        metadata: session.client.metadata.clone(),
        node: node.topology.me.clone(),
        text,
    };
    let Some(action) = node.plugins.inbound(&frame).await else {
        Stats::incr(&node.stats.inbound_ignored);
        return None;
    };
    Stats::incr(&node.stats.inbound_handled);
    let sender = session.client.client_id;
    let (target, content) = match action {
        InboundAction::Reply(reply) if reply.len() > node.config.limits.max_body_bytes => {
            Stats::incr(&node.stats.oversize_replies);
            warn!(
                bytes = reply.len(),
                limit = node.config.limits.max_body_bytes,
                "inbound plugin reply over max_body_bytes; dropped"
            );
            return None;
        }
        InboundAction::Reply(reply) => return Some(reply),
        InboundAction::Deliver { target, content } => (target, content),
    };
    if serde_json::from_str::<serde::de::IgnoredAny>(&content).is_err() {
        warn!("inbound plugin delivered content that is not JSON; dropped");
        return None;
    }
    let result = match target {
        Target::Direct(receivers) => {
            crate::business::send_message(&node.outbox, sender, &receivers, content, false).await
        }
        Target::Channel(chan) => match crate::business::check_channel(&chan) {
            Ok(()) => {
                crate::business::send_chan_message(&node.outbox, sender, Some(chan), content).await
            }
            Err(err) => Err(err),
        },
        Target::Broadcast => {
            crate::business::send_chan_message(&node.outbox, sender, None, content).await
        }
    };
    if let Err(err) = result {
        warn!(cause = %err, "inbound plugin delivery failed");
    }
    None
}
