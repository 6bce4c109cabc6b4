//! One socket: its task owns the WebSocket and runs one `select!` over the
//! terminal's frames, the outbound queue, the heartbeat and the close request.
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
        if let Err(err) = node.presence.connected(&session.client).await {
            warn!(cause = %err, "online count not updated");
        }
        announce(&node, &session, PresenceKind::Online).await;
        debug!(conn, "connected");

        let reason = pump(socket, &node, registration).await;

        node.registry.unregister(client, conn);
        Stats::decr(&node.stats.connections);
        if let Err(err) = node.presence.disconnected(&session.client).await {
            warn!(cause = %err, "online count not updated");
        }
        announce(&node, &session, PresenceKind::Offline).await;
        debug!(conn, ?reason, "disconnected");
    }
    .instrument(span)
    .await
}

async fn announce(node: &Node, session: &Session, kind: PresenceKind) {
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
                    socket.feed(Message::Text(first)).await?;
                    for _ in 1..WRITE_BATCH {
                        match outbound.try_recv() {
                            Ok(text) => socket.feed(Message::Text(text)).await?,
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
                        Message::Text(_) | Message::Binary(_) => {
                            Stats::incr(&node.stats.inbound_ignored);
                        }
                        Message::Close(_) => break None,
                        Message::Ping(_) | Message::Pong(_) => {}
                    }
                }
                Some(Err(err)) if is_too_big(&err) => {
                    Stats::incr(&node.stats.oversize_closed);
                    break Some(CloseReason::Oversize);
                }
                Some(Err(_)) => break None,
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

/// Runs a socket write unless a close is requested first; a write blocked on a
/// terminal that stopped reading must not keep its socket alive.
async fn until_closed<T>(closer: &Closer, write: impl Future<Output = T>) -> Option<T> {
    tokio::select! {
        biased;
        _ = closer.requested() => None,
        out = write => Some(out),
    }
}

fn is_too_big(err: &axum::Error) -> bool {
    std::error::Error::source(err)
        .and_then(|inner| inner.downcast_ref::<tungstenite::Error>())
        .is_some_and(|e| matches!(e, tungstenite::Error::Capacity(_)))
}
