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
//! # Two ways in
//! What arrives from Redis comes through one inbox in the order Redis
//! delivered it: [`run`] resolves, filters (side by side, applied in order)
//! and hands each message to the delivery shards, waiting for room in the
//! node's backlog when it is full, so the subscriber stops reading. What the
//! node's own API sends in embedded mode is handled by [`handle`] in the
//! caller's task, on whatever core serves the request, and refused with
//! [`Overloaded`] when the backlog is full (the API answers 503).
//!
//! # Fan-out
//! Applying a message never writes to more than a small idle audience
//! itself: it hands the audience to the delivery shards (see
//! [`crate::shards`]), which keep each socket's order and write on every
//! core, so the next message does not wait for this one's writes.

use futures_util::StreamExt;
use futures_util::stream::FuturesOrdered;
use imhost_client::ClientId;
use imhost_client::wire::{
    ChanMessage, DirectMessage, RECEIPT_DELIVERED, RECEIPT_OFFLINE, ServerMessage, is_receipt,
    receipt, receipt_filtered,
};
use std::sync::{Arc, Weak};

use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tracing::{debug, warn};
use tungstenite::Utf8Bytes;

use crate::audience::Audience;
use crate::cluster::{ClusterError, LocalDelivery};
use crate::node::Node;
use crate::plugins::FilterOutcome;
use crate::plugins::hooks::{Outgoing, Target};
use crate::plugins::manifest::Hook;
use crate::registry::Lookup;
use crate::shards::{Admission, Overloaded};
use crate::stats::Stats;
use crate::ws::handle::{CloseReason, SocketHandle};

/// A message with its audience on this node, resolved on arrival.
enum Arrived {
    Direct(DirectMessage),
    /// A channel message or broadcast, with the sockets it goes to here:
    /// `audience` but `except` (the sender's only socket: the echo rule).
    Chan {
        message: ChanMessage,
        audience: Arc<Audience>,
        except: Option<Arc<SocketHandle>>,
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
                // Waits for room: never refused.
                Ok(ready) => {
                    let admission = stream_admission(&inbox, filtering.is_empty());
                    let _ = apply(&node, ready, admission).await;
                }
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
                        let admission = stream_admission(&inbox, true);
                        let _ = filter_and_apply(&node, message, admission).await;
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

/// How the dispatcher hands a message over: it waits for room in the
/// backlog, and it writes a small audience itself only when nothing waits
/// behind the message; otherwise the message goes to the shards' queues, so
/// the one dispatcher task never becomes the node's only writer while
/// Redis has more for it.
fn stream_admission(inbox: &mpsc::Receiver<ServerMessage>, nothing_in_flight: bool) -> Admission {
    if nothing_in_flight && inbox.is_empty() {
        Admission::Wait
    } else {
        Admission::WaitQueued
    }
}

/// The embedded relay's way in: [`handle`] in the sender's task, refused
/// when the node is overloaded.
pub struct Inline(Weak<crate::node::Inner>);

impl Inline {
    pub fn new(node: &Node) -> Self {
        Inline(node.downgrade())
    }
}

#[async_trait::async_trait]
impl LocalDelivery for Inline {
    async fn deliver(&self, message: ServerMessage) -> Result<(), ClusterError> {
        let Some(node) = Node::upgrade(&self.0) else {
            return Err(ClusterError::Unavailable("node is shutting down".into()));
        };
        handle(&node, message, Admission::Try)
            .await
            .map_err(|Overloaded| {
                Stats::incr(&node.stats.sends_refused_overloaded);
                ClusterError::Overloaded
            })
    }
}

fn has_filter(node: &Node) -> bool {
    node.plugins.current().has(Hook::Filter)
}

/// Messages allowed in the filter stage at once: the smallest warm pool of
/// the filter chain (at least 1).
fn filter_concurrency(node: &Node) -> usize {
    node.plugins.current().filter_pool().max(1)
}

/// Acts on one message addressed to this node, filters included, in the
/// caller's task: the node's own API in embedded mode, and benchmarks.
///
/// # Errors
/// [`Overloaded`] when `admission` is [`Admission::Try`] and the node's
/// delivery backlog has no room: nothing was delivered.
pub async fn handle(
    node: &Node,
    message: ServerMessage,
    admission: Admission,
) -> Result<(), Overloaded> {
    if admission == Admission::Try && node.shards.is_full() {
        return Err(Overloaded);
    }
    let Some(message) = resolve(node, message).await else {
        return Ok(());
    };
    filter_and_apply(node, message, admission).await
}

/// Runs the filter chain, if there is one, then applies the message.
async fn filter_and_apply(
    node: &Node,
    message: Arrived,
    admission: Admission,
) -> Result<(), Overloaded> {
    let ready = if has_filter(node) {
        filter_stage(node, message).await
    } else {
        Ready::Deliver(message)
    };
    apply(node, ready, admission).await
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
            let audience = match &message.chan {
                None => node.registry.broadcast_audience(),
                Some(chan) => match node.presence.delivery_members(chan).await {
                    Ok(members) => node.registry.channel_audience(chan, &members),
                    Err(err) => {
                        Stats::incr(&node.stats.dispatch_errors);
                        warn!(cause = %err, chan, "channel message not delivered");
                        return None;
                    }
                },
            };
            let except = node
                .registry
                .sole_socket(message.sender)
                .filter(|sole| audience.contains(sole));
            let reached = audience.len() - usize::from(except.is_some());
            (reached > 0).then_some(Arrived::Chan {
                message,
                audience,
                except,
            })
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
                Arrived::Chan {
                    message,
                    audience,
                    except,
                } => Arrived::Chan {
                    message: ChanMessage { content, ..message },
                    audience,
                    except,
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
async fn apply(node: &Node, ready: Ready, admission: Admission) -> Result<(), Overloaded> {
    match ready {
        Ready::Deliver(Arrived::Direct(direct)) => deliver_direct(node, direct, admission).await?,
        Ready::Deliver(Arrived::Chan {
            message,
            audience,
            except,
        }) => {
            let text = Utf8Bytes::from(message.content);
            node.shards
                .write_to(audience, except, text, admission)
                .await?;
        }
        Ready::Deliver(Arrived::ForceOffline(client_id)) => {
            let sockets = node.registry.client_sockets(client_id);
            Stats::add(&node.stats.forced_offline, sockets.len() as u64);
            node.shards.close(sockets, CloseReason::ForcedOffline).await;
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
    Ok(())
}

async fn deliver_direct(
    node: &Node,
    msg: DirectMessage,
    admission: Admission,
) -> Result<(), Overloaded> {
    let DirectMessage {
        sender,
        receivers,
        content,
        receipt: receipt_asked,
    } = msg;
    let wants_receipt = |receiver: ClientId| receipt_asked && sender != 0 && receiver != sender;
    // Every socket of every receiver here, handed over as one audience: one
    // admission, one buffer (the String moves in).
    let mut audience: Vec<Arc<SocketHandle>> = Vec::new();
    let mut receipts = Vec::new();
    for &receiver in &receivers {
        let receipt_text = match node.registry.lookup(receiver, sender) {
            Lookup::NotConnected => RECEIPT_OFFLINE,
            Lookup::EchoSkipped => continue,
            Lookup::Sockets(sockets) => {
                audience.extend(sockets);
                RECEIPT_DELIVERED
            }
        };
        if wants_receipt(receiver) {
            receipts.push((receiver, receipt_text));
        }
    }
    let text = Utf8Bytes::from(content);
    node.shards.write(audience, text.clone(), admission).await?;
    for (receiver, receipt_text) in receipts {
        send_receipt(node, receiver, sender, receipt(text.as_str(), receipt_text)).await;
    }
    Ok(())
}

/// FreeIM sends a receipt as a new message from the receiver to the sender.
/// When the sender lives here the relay round trip is skipped. A receipt
/// belongs to a message already accepted: it is never refused.
async fn send_receipt(node: &Node, receiver: ClientId, sender: ClientId, content: String) {
    if node.topology.is_mine(sender) {
        if let Lookup::Sockets(sockets) = node.registry.lookup(sender, receiver) {
            let _ = node
                .shards
                .write(sockets, Utf8Bytes::from(content), Admission::Always)
                .await;
        }
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
