//! One socket: its task owns the WebSocket and runs one `select!` over the
//! terminal's frames, the outbound queue, the heartbeat and the close request.
//! Text frames go to the inbound plugins when one is loaded, in this task, so
//! one terminal's frames are handled in order.
//!
//! One task per socket (not a reader and a writer) keeps the per-connection cost
//! to one task, one queue and tungstenite's buffers.

use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, WebSocket};
use futures_util::SinkExt;
use imhost_client::api::PresenceEvent;
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::{Instant, MissedTickBehavior, interval_at};
use tracing::{Instrument, debug, info_span, warn};

use super::Session;
use crate::cluster::{PresenceChange, PresenceKind};
use crate::node::Node;
use crate::plugins::hooks::{InboundAction, InboundFrame, PresenceNotice, Target};
use crate::plugins::manifest::Hook;
use crate::registry::{CloseReason, Closer, Registration};
use crate::stats::Stats;

/// How many queued messages one write batches before flushing.
const WRITE_BATCH: usize = 64;
/// How long a close frame may take to leave before the socket is just dropped.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);

/// Runs a socket from registration to the offline event.
pub async fn serve(socket: WebSocket, node: Node, session: Session, _slot: OwnedSemaphorePermit) {
    let client = session.client.client_id;
    let span = info_span!("socket", client);
    async move {
        let registration = node.registry.register(client, node.shutdown.stopping());
        let conn = registration.conn;
        Stats::incr(&node.stats.connections);
        Stats::incr(&node.stats.connections_opened);
        presence_changed(&node, &session, PresenceKind::Online).await;
        debug!(conn, "connected");

        let reason = pump(socket, &node, &session, registration).await;

        node.registry.unregister(client, conn);
        Stats::decr(&node.stats.connections);
        presence_changed(&node, &session, PresenceKind::Offline).await;
        debug!(conn, ?reason, "disconnected");
    }
    .instrument(span)
    .await
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

/// Moves frames until the socket ends; returns why the server closed it, if it did.
async fn pump(
    mut socket: WebSocket,
    node: &Node,
    session: &Session,
    registration: Registration,
) -> Option<CloseReason> {
    let Registration {
        mut outbound,
        closer,
        ..
    } = registration;
    let limits = &node.config.limits;
    let mut ping = interval_at(
        Instant::now() + limits.heartbeat_interval,
        limits.heartbeat_interval,
    );
    ping.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut last_heard = Instant::now();

    let reason = loop {
        tokio::select! {
            biased;
            reason = closer.requested() => break Some(reason),
            Some(first) = outbound.recv() => {
                let write = async {
                    // A batch stops at WRITE_BATCH frames or once it holds the
                    // largest message's worth of bytes, so tungstenite's write
                    // buffer (see `write_buffer_limit`) always has room for
                    // one more frame.
                    let mut batched = first.len();
                    socket.feed(Message::Text(first)).await?;
                    for _ in 1..WRITE_BATCH {
                        if batched >= limits.max_body_bytes {
                            break;
                        }
                        match outbound.try_recv() {
                            Ok(text) => {
                                batched += text.len();
                                socket.feed(Message::Text(text)).await?;
                            }
                            Err(_) => break,
                        }
                    }
                    socket.flush().await
                };
                if let Some(outcome) = until_closed(&closer, write).await {
                    if outcome.is_err() {
                        break None;
                    }
                } else {
                    break Some(closer.reason());
                }
            }
            frame = socket.recv() => match frame {
                None => break None,
                Some(Ok(message)) => {
                    last_heard = Instant::now();
                    match message {
                        Message::Text(text) if node.plugins.current().has(Hook::Inbound) => {
                            // Boxed: the plugin call's future is large, and inlined it
                            // would grow every socket task, plugins or not.
                            let reply = Box::pin(handle_inbound(node, session, text.as_str())).await;
                            if let Some(reply) = reply {
                                let sent = until_closed(&closer, socket.send(Message::Text(reply.into()))).await;
                                match sent {
                                    Some(Ok(())) => {}
                                    Some(Err(_)) => break None,
                                    None => break Some(closer.reason()),
                                }
                            }
                        }
                        Message::Text(_) | Message::Binary(_) => {
                            Stats::incr(&node.stats.inbound_ignored);
                        }
                        Message::Close(_) => {
                            // RFC 6455 5.5.1: answer with a Close echoing the
                            // code. tungstenite queued that reply; send it
                            // before the TCP close, so the terminal sees a
                            // clean close (a browser's `wasClean`).
                            let _ = tokio::time::timeout(CLOSE_TIMEOUT, socket.flush()).await;
                            break None;
                        }
                        Message::Ping(_) | Message::Pong(_) => {}
                    }
                }
                Some(Err(err)) => match protocol_violation(&err) {
                    Some(CloseReason::Oversize) => {
                        Stats::incr(&node.stats.oversize_closed);
                        break Some(CloseReason::Oversize);
                    }
                    Some(reason) => {
                        Stats::incr(&node.stats.protocol_errors);
                        debug!(cause = %err, code = reason.code(), "terminal broke the WebSocket protocol");
                        break Some(reason);
                    }
                    None => break None,
                },
            },
            _ = ping.tick() => {
                if last_heard.elapsed() >= limits.heartbeat_timeout {
                    Stats::incr(&node.stats.heartbeat_timeouts);
                    break Some(CloseReason::HeartbeatTimeout);
                }
                let sent = until_closed(&closer, socket.send(Message::Ping(Default::default()))).await;
                match sent {
                    Some(Ok(())) => {}
                    Some(Err(_)) => break None,
                    None => break Some(closer.reason()),
                }
            }
        }
    };
    if let Some(reason) = reason {
        let frame = CloseFrame {
            code: reason.code(),
            reason: reason.text().into(),
        };
        let _ = tokio::time::timeout(CLOSE_TIMEOUT, socket.send(Message::Close(Some(frame)))).await;
    }
    reason
}

/// Hands a terminal's text frame to the inbound plugins; returns a reply for
/// this socket, if the plugin gave one. Deliveries go through the normal path
/// (and so through the filter chain on the delivery nodes).
async fn handle_inbound(node: &Node, session: &Session, text: &str) -> Option<String> {
    let frame = InboundFrame {
        client_id: session.client.client_id,
        metadata: session.client.metadata.clone(),
        node: node.topology.me.clone(),
        text: text.to_owned(),
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

/// Runs a socket write unless a close is requested first; a write blocked on a
/// terminal that stopped reading must not keep its socket alive.
async fn until_closed<T>(closer: &Closer, write: impl Future<Output = T>) -> Option<T> {
    tokio::select! {
        biased;
        _ = closer.requested() => None,
        out = write => Some(out),
    }
}

/// The close a read error calls for: 1009 for a message over the limit,
/// 1007 for text that is not UTF-8, 1002 for other protocol violations;
/// `None` when the connection itself failed (nothing can be sent).
fn protocol_violation(err: &axum::Error) -> Option<CloseReason> {
    let inner = std::error::Error::source(err)?.downcast_ref::<tungstenite::Error>()?;
    match inner {
        tungstenite::Error::Capacity(_) => Some(CloseReason::Oversize),
        tungstenite::Error::Utf8(_) => Some(CloseReason::InvalidData),
        tungstenite::Error::Protocol(_) => Some(CloseReason::ProtocolError),
        _ => None,
    }
}
