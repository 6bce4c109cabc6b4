//! Applies what arrives on this node's inbox to its sockets, with FreeIM's
//! delivery rules (SPEC section 2): receipts with FreeIM's exact texts, the
//! sender-echo rule, channel and broadcast fan-out, force-offline.
//!
//! # Order, and filters on every core
//! Messages reach each socket in the order the inbox received them. Without
//! a filter plugin, one task applies them one by one (handing a message to
//! sockets never waits; see [`crate::registry`]). With filters, the chain of
//! each message runs on a task of its own, so filter calls for different
//! messages use every core and the plugin's warm instances, while their
//! results are applied strictly in arrival order (a `FuturesOrdered`): a slow
//! filter call delays the messages behind it, never reorders them. At most
//! as many messages are in the filter stage as the chain's smallest instance
//! pool allows (each call then finds a warm instance). A message with
//! nothing in the filter stage before it and nothing in the inbox behind it
//! is filtered by the dispatcher itself: there is nothing to overlap it
//! with, and a task of its own would hand the message to another worker
//! thread and its fan-out back (see `docs/operations.md`).
//!
//! # Who a message is for, worked out on arrival
//! A message's audience on this node is resolved when it leaves the inbox,
//! before any filter runs: the sockets of a channel's members or of a
//! broadcast, or whether any receiver of a direct message is connected here.
//! A message nobody here would get (a channel without members on this node, a
//! direct message to clients connected elsewhere, with no receipt to send)
//! is done with at once, without a filter call: filters decide what may be
//! delivered, and here nothing would be. In a cluster every node receives
//! every channel message, so only the nodes that hold members pay for the
//! filter chain. Resolving in arrival order also keeps a membership change
//! and the messages after it in order.
//!
//! # Fan-out
//! Handing a message to a socket is a non-blocking write straight to the
//! kernel (see `ws::outbound`). A channel message or broadcast to more than
//! 1,024 sockets is cut into one slice per worker thread, each written by a
//! task of its own, so every core writes; the next message waits for all of
//! them, so each socket still gets its messages in order. Smaller fan-outs
//! are written by the dispatcher itself: at 1,000 sockets, slices of 256 on
//! four tasks cost more in task switches than they saved. Big audiences come
//! from the registry sorted by address, so the writes walk memory, ours and
//! the kernel's, in the order the sockets were made (see `registry`).

use futures_util::StreamExt;
use futures_util::stream::FuturesOrdered;
use imhost_client::ClientId;
use imhost_client::wire::{
    ChanMessage, DirectMessage, RECEIPT_DELIVERED, RECEIPT_OFFLINE, ServerMessage, is_receipt,
    receipt, receipt_filtered,
};
use std::sync::Arc;

use tokio::sync::mpsc;
use tokio::task::{JoinHandle, JoinSet};
use tracing::{debug, warn};
use tungstenite::Utf8Bytes;

use crate::node::Node;
use crate::plugins::FilterOutcome;
use crate::plugins::hooks::{Outgoing, Target};
use crate::plugins::manifest::Hook;
use crate::registry::{CloseReason, Delivery, SocketHandle};
use crate::stats::Stats;

/// A message with its audience on this node, resolved on arrival.
enum Arrived {
    Direct(DirectMessage),
    /// A channel message or broadcast, with the sockets it goes to here.
    Chan {
        message: ChanMessage,
        sockets: Vec<Arc<SocketHandle>>,
    },
    ForceOffline(ClientId),
}

/// A message through the filter stage, ready to apply.
enum Ready {
    /// Deliver as it is (content possibly replaced by a filter).
    Deliver(Arrived),
    /// A filter dropped it.
    Dropped {
        message: Arrived,
        plugin: String,
        reason: String,
    },
}

/// Drains `inbox` until the node has drained its sockets.
pub async fn run(node: Node, mut inbox: mpsc::Receiver<ServerMessage>) {
    let mut filtering: FuturesOrdered<JoinHandle<Ready>> = FuturesOrdered::new();
    let mut open = true;
    while open || !filtering.is_empty() {
        let room = filtering.len() < filter_concurrency(&node);
        tokio::select! {
            biased;
            Some(done) = filtering.next(), if !filtering.is_empty() => match done {
                Ok(ready) => apply(&node, ready).await,
                Err(err) => {
                    Stats::incr(&node.stats.dispatch_errors);
                    warn!(cause = %err, "a filter task failed; its message is lost");
                }
            },
            message = inbox.recv(), if open && room => match message {
                Some(message) => {
                    let Some(message) = resolve(&node, message).await else {
                        continue;
                    };
                    if filtering.is_empty() && (inbox.is_empty() || !has_filter(&node)) {
                        // No filter, or nothing waits behind it: a task of
                        // its own would only hop to another worker and back.
                        filter_and_apply(&node, message).await;
                    } else {
                        let node = node.clone();
                        filtering.push_back(tokio::spawn(async move { filter_stage(&node, message).await }));
                    }
                }
                None => open = false,
            },
            () = node.shutdown.drained().cancelled() => break,
        }
    }
    debug!("dispatcher stopped");
}

fn has_filter(node: &Node) -> bool {
    node.plugins.current().has(Hook::Filter)
}

/// Messages allowed in the filter stage at once: the smallest warm pool of
/// the filter chain (at least 1).
fn filter_concurrency(node: &Node) -> usize {
    node.plugins.current().filter_pool().max(1)
}

/// Acts on one message addressed to this node, filters included (for callers
/// outside the dispatcher, such as benchmarks).
pub async fn handle(node: &Node, message: ServerMessage) {
    let Some(message) = resolve(node, message).await else {
        return;
    };
    filter_and_apply(node, message).await;
}

/// Runs the filter chain, if there is one, then applies the message.
async fn filter_and_apply(node: &Node, message: Arrived) {
    let ready = if has_filter(node) {
        filter_stage(node, message).await
    } else {
        Ready::Deliver(message)
    };
    apply(node, ready).await;
}

/// Who on this node `message` reaches; `None` when nobody here would get
/// anything from it (see the module docs).
async fn resolve(node: &Node, message: ServerMessage) -> Option<Arrived> {
    match message {
        ServerMessage::Direct(d) => {
            let receipts = d.receipt && d.sender != 0;
            (receipts || node.registry.any_connected(&d.receivers)).then_some(Arrived::Direct(d))
        }
        ServerMessage::Chan(message) => {
            let sockets = match &message.chan {
                None => node.registry.all_sockets(message.sender),
                Some(chan) => match node.presence.delivery_members(chan).await {
                    Ok(members) => node
                        .registry
                        .sockets_of(members.iter().copied(), message.sender),
                    Err(err) => {
                        Stats::incr(&node.stats.dispatch_errors);
                        warn!(cause = %err, chan, "channel message not delivered");
                        return None;
                    }
                },
            };
            (!sockets.is_empty()).then_some(Arrived::Chan { message, sockets })
        }
        ServerMessage::ForceOffline { client_id } => Some(Arrived::ForceOffline(client_id)),
    }
}

/// Runs the filter chain over a message's content.
async fn filter_stage(node: &Node, message: Arrived) -> Ready {
    let (sender, target, content) = match &message {
        Arrived::Direct(d) => (d.sender, Target::Direct(d.receivers.clone()), &d.content),
        Arrived::Chan { message: c, .. } => (
            c.sender,
            match &c.chan {
                Some(chan) => Target::Channel(chan.clone()),
                None => Target::Broadcast,
            },
            &c.content,
        ),
        Arrived::ForceOffline(_) => return Ready::Deliver(message),
    };
    // A receipt crossing nodes arrives as a direct message; it echoes what
    // the sender wrote and was filtered, or not, on its way out. Filtering it
    // again would lose the receipt of a dropped message whenever sender and
    // receiver live on different nodes.
    if let Arrived::Direct(d) = &message
        && !d.receipt
        && is_receipt(content)
    {
        return Ready::Deliver(message);
    }
    let outcome = node
        .plugins
        .filter(Outgoing {
            sender,
            target,
            content: content.clone(),
            node: node.topology.me.clone(),
        })
        .await;
    match outcome {
        FilterOutcome::Deliver { content, replaced } => {
            if !replaced {
                return Ready::Deliver(message);
            }
            Stats::incr(&node.stats.filtered_replaced);
            Ready::Deliver(match message {
                Arrived::Direct(d) => Arrived::Direct(DirectMessage { content, ..d }),
                Arrived::Chan { message, sockets } => Arrived::Chan {
                    message: ChanMessage { content, ..message },
                    sockets,
                },
                other => other,
            })
        }
        FilterOutcome::Drop { plugin, reason } => {
            Stats::incr(&node.stats.filtered_dropped);
            debug!(%plugin, %reason, "message dropped by a filter");
            Ready::Dropped {
                message,
                plugin,
                reason,
            }
        }
    }
}

/// Applies a message that went through the filter stage.
async fn apply(node: &Node, ready: Ready) {
    match ready {
        Ready::Deliver(Arrived::Direct(direct)) => deliver_direct(node, direct).await,
        Ready::Deliver(Arrived::Chan { message, sockets }) => {
            fan_out(node, sockets, Utf8Bytes::from(message.content)).await;
        }
        Ready::Deliver(Arrived::ForceOffline(client_id)) => {
            let closed = node
                .registry
                .close_client(client_id, CloseReason::ForcedOffline);
            Stats::add(&node.stats.forced_offline, closed as u64);
        }
        Ready::Dropped {
            message: Arrived::Direct(direct),
            plugin,
            reason,
        } => {
            // A sender who asked for receipts learns that, and why: a
            // rate-limited user must not believe the message went through.
            if direct.receipt && direct.sender != 0 {
                let why = format!("{plugin}: {reason}");
                for &receiver in &direct.receivers {
                    if receiver != direct.sender {
                        let text = receipt_filtered(&direct.content, &why);
                        send_receipt(node, receiver, direct.sender, text).await;
                    }
                }
            }
        }
        Ready::Dropped { .. } => {}
    }
}

async fn deliver_direct(node: &Node, msg: DirectMessage) {
    let DirectMessage {
        sender,
        receivers,
        content,
        receipt: receipt_asked,
    } = msg;
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

/// A fan-out slice holds at least this many sockets: writing fewer takes
/// less time than handing them to another worker thread costs.
const MIN_FAN_OUT_SLICE: usize = 1024;

/// Hands `text` to `sockets`. A delivery is a non-blocking write per socket
/// (see `ws::outbound`). A big fan-out is cut into one slice per worker
/// thread, each written by a task of its own, so every core writes. None is
/// written here: tokio runs the task spawned last on this worker next (its
/// LIFO slot, which other workers cannot steal from), so a slice written
/// here first would hold that task back until it is done. All slices finish
/// before the next message is applied, which keeps each socket's messages
/// in order.
async fn fan_out(node: &Node, mut sockets: Vec<Arc<SocketHandle>>, text: Utf8Bytes) {
    if sockets.len() <= MIN_FAN_OUT_SLICE {
        node.registry.push_all(sockets, &text);
        return;
    }
    let workers = tokio::runtime::Handle::current().metrics().num_workers();
    let slice = MIN_FAN_OUT_SLICE.max(sockets.len().div_ceil(workers.max(1)));
    let mut slices = JoinSet::new();
    while !sockets.is_empty() {
        let rest = sockets.split_off(sockets.len().saturating_sub(slice));
        let (registry, text) = (node.registry.clone(), text.clone());
        slices.spawn(async move { registry.push_all(rest, &text) });
    }
    while let Some(done) = slices.join_next().await {
        if let Err(err) = done {
            Stats::incr(&node.stats.dispatch_errors);
            warn!(cause = %err, "a fan-out slice failed");
        }
    }
}
