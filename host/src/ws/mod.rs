//! The terminal side: `GET /ws?token=…` and the life of one socket.
//!
//! Everything that can refuse a terminal happens here, before the upgrade, so a
//! refusal is a plain HTTP answer (401, 503) and costs no WebSocket state:
//! a free connection slot is taken first, then the single-use token.

mod connection;

use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{Query, State};
use axum::response::{IntoResponse, Response};
use imhost_client::wire::TokenValue;
use serde::Deserialize;
use tracing::debug;

use crate::cluster::TokenClaim;
use crate::http::AppError;
use crate::node::Node;
use crate::stats::Stats;

/// tungstenite reads into a buffer of this size; its 128 KiB default would cost
/// more per idle connection than everything else the node keeps for it.
const READ_BUFFER_BYTES: usize = 4 * 1024;

#[derive(Debug, Deserialize)]
pub struct ConnectQuery {
    token: Option<String>,
}

/// Who a socket belongs to, fixed at connect.
#[derive(Debug, Clone)]
pub struct Session {
    pub client: TokenValue,
}

/// Authenticates and upgrades one terminal connection.
pub async fn upgrade(
    State(node): State<Node>,
    Query(query): Query<ConnectQuery>,
    upgrade: WebSocketUpgrade,
) -> Result<Response, AppError> {
    if node.shutdown.stopping().is_cancelled() {
        return Err(AppError::Unavailable("server shutting down".into()));
    }
    let Ok(slot) = node.connection_slots.clone().try_acquire_owned() else {
        Stats::incr(&node.stats.connects_over_capacity);
        return Err(AppError::Unavailable("server full".into()));
    };
    let token = query.token.unwrap_or_default();
    let claim = if crate::token::looks_like_token(&token) {
        node.presence.take_token(&token, &node.topology).await?
    } else {
        TokenClaim::Unknown
    };
    let client = match claim {
        TokenClaim::Taken(client) => client,
        TokenClaim::Unknown => {
            Stats::incr(&node.stats.connects_refused);
            debug!("connect refused: unknown, used or expired token");
            return Err(AppError::Unauthorized(
                "unknown, used or expired token".into(),
            ));
        }
        TokenClaim::Misdirected { owner } => {
            Stats::incr(&node.stats.connects_refused);
            return Err(AppError::Misdirected(format!(
                "this client belongs to server {owner}; connect there with the same token"
            )));
        }
    };
    let limits = &node.config.limits;
    let session = Session { client };
    let tasks = node.shutdown.tasks().clone();
    Ok(upgrade
        .read_buffer_size(READ_BUFFER_BYTES)
        .max_message_size(limits.max_frame_bytes)
        .max_frame_size(limits.max_frame_bytes)
        // Writes wait for the socket instead of buffering without bound; slow
        // consumers are handled by the outbound queue.
        .max_write_buffer_size(limits.max_body_bytes.saturating_mul(2).max(1 << 20))
        .on_upgrade(move |socket| {
            tasks.track_future(connection::serve(socket, node, session, slot))
        })
        .into_response())
}
