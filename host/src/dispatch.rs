//! Applies what arrives on this node's inbox to its sockets, with FreeIM's
//! delivery rules (SPEC section 2): receipts with FreeIM's exact texts, the
//! sender-echo rule, channel and broadcast fan-out, force-offline.
//!
//! One task drains the inbox in order, so messages published in order by one
//! caller reach a socket in that order. Handing a message to sockets never waits
//! (see [`crate::registry`]), so the task only waits on the presence store.

use axum::extract::ws::Utf8Bytes;
use imhost_client::ClientId;
use imhost_client::wire::{
    ChanMessage, DirectMessage, RECEIPT_DELIVERED, RECEIPT_OFFLINE, ServerMessage, receipt,
};
use tokio::sync::mpsc;
use tracing::{debug, warn};

use crate::node::Node;
use crate::plugins::FilterOutcome;
use crate::plugins::bindings::exports::imhost::plugin::filter;
use crate::plugins::bindings::imhost::plugin::types::Target;
use crate::plugins::manifest::Hook;
use crate::registry::{CloseReason, Delivery};
use crate::stats::Stats;

/// Drains `inbox` until the node has drained its sockets.
pub async fn run(node: Node, mut inbox: mpsc::Receiver<ServerMessage>) {
    loop {
        tokio::select! {
            message = inbox.recv() => match message {
                Some(message) => handle(&node, message).await,
                None => break,
            },
            () = node.shutdown.drained().cancelled() => break,
        }
    }
    debug!("dispatcher stopped");
}

/// Acts on one message addressed to this node.
pub async fn handle(node: &Node, message: ServerMessage) {
    match message {
        ServerMessage::Direct(direct) => deliver_direct(node, direct).await,
        ServerMessage::Chan(chan) => deliver_chan(node, chan).await,
        ServerMessage::ForceOffline { client_id } => {
            let closed = node
                .registry
                .close_client(client_id, CloseReason::ForcedOffline);
            Stats::add(&node.stats.forced_offline, closed as u64);
        }
    }
}

/// Runs the filter chain once for a message on this node; `None`: dropped.
/// The target is only built when a filter is loaded.
async fn filtered(
    node: &Node,
    sender: ClientId,
    target: impl FnOnce() -> Target,
    content: String,
) -> Option<String> {
    if !node.plugins.current().has(Hook::Filter) {
        return Some(content);
    }
    let message = filter::Message {
        sender,
        target: target(),
        content,
        node: node.topology.me.clone(),
    };
    match node.plugins.filter(message).await {
        FilterOutcome::Deliver { content, replaced } => {
            if replaced {
                Stats::incr(&node.stats.filtered_replaced);
            }
            Some(content)
        }
        FilterOutcome::Drop { plugin, reason } => {
            Stats::incr(&node.stats.filtered_dropped);
            debug!(%plugin, %reason, "message dropped by a filter");
            None
        }
    }
}

async fn deliver_direct(node: &Node, msg: DirectMessage) {
    let DirectMessage {
        sender,
        receivers,
        content,
        receipt: receipt_asked,
    } = msg;
    let target = || Target::Direct(receivers.clone());
    let Some(content) = filtered(node, sender, target, content).await else {
        return;
    };
    let wants_receipt = |receiver: ClientId| receipt_asked && sender != 0 && receiver != sender;
    // One buffer for every socket of every receiver (the String moves in).
    let text = Utf8Bytes::from(content);
    for &receiver in &receivers {
        let receipt_text = match node.registry.deliver(receiver, &text, sender) {
            Delivery::NotConnected => RECEIPT_OFFLINE,
            Delivery::EchoSkipped => continue,
            Delivery::Queued(_) => RECEIPT_DELIVERED,
        };
        if wants_receipt(receiver) {
            send_receipt(node, receiver, sender, receipt(text.as_str(), receipt_text)).await;
        }
    }
}

/// FreeIM sends a receipt as a new message from the receiver to the sender.
/// When the sender lives here the relay round trip is skipped.
async fn send_receipt(node: &Node, receiver: ClientId, sender: ClientId, content: String) {
    if node.topology.is_mine(sender) {
        node.registry
            .deliver(sender, &Utf8Bytes::from(content), receiver);
        return;
    }
    let message = ServerMessage::Direct(DirectMessage {
        sender: receiver,
        receivers: vec![sender],
        content,
        receipt: false,
    });
    if let Err(err) = node
        .relay
        .send(node.topology.node_for(sender), message)
        .await
    {
        Stats::incr(&node.stats.dispatch_errors);
        warn!(cause = %err, sender, "receipt not sent");
    }
}

async fn deliver_chan(node: &Node, msg: ChanMessage) {
    let ChanMessage {
        sender,
        chan,
        content,
    } = msg;
    let target = || match &chan {
        Some(chan) => Target::Channel(chan.clone()),
        None => Target::Broadcast,
    };
    let Some(content) = filtered(node, sender, target, content).await else {
        return;
    };
    let text = Utf8Bytes::from(content);
    match &chan {
        None => {
            node.registry.deliver_all(&text, sender);
        }
        Some(chan) => match node.presence.delivery_members(chan).await {
            Ok(members) => {
                node.registry
                    .deliver_many(members.iter().copied(), &text, sender);
            }
            Err(err) => {
                Stats::incr(&node.stats.dispatch_errors);
                warn!(cause = %err, chan, "channel message not delivered");
            }
        },
    }
}
