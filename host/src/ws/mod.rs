//! The terminal side: `GET /ws?token=…` and the life of one socket.
//!
//! Everything that can refuse a terminal happens here, before the upgrade, so a
//! refusal is a plain HTTP answer (401, 421, 503) and costs no WebSocket state:
//! a free connection slot is taken first, then the auth plugins decide, and
//! when they all pass, the built-in single-use token.
//!
//! # Layout
//! - `handshake`: the opening handshake, and the TCP stream taken back from hyper.
//! - [`frame`]: the frame codec, decoding as bytes arrive.
//! - `socket`: the socket core, driven by readiness.
//! - [`outbound`]: a socket's writes, shared by deliveries and its task.
//! - `connection`: a terminal's life: registration, presence, inbound plugins.
//! - `heartbeat`: one sweep for every socket's heartbeat.
//! - [`connect_rate`]: connects per second per address.

pub mod connect_rate;
mod connection;
pub mod frame;
mod handshake;
pub mod heartbeat;
pub mod outbound;
mod socket;
pub mod transport;

use std::net::SocketAddr;

use axum::extract::rejection::QueryRejection;
use axum::extract::{ConnectInfo, Query, State};
use axum::http::HeaderMap;
use axum::response::Response;
use imhost_client::wire::TokenValue;
use tracing::{Instrument, debug, debug_span};

use self::handshake::Handshake;

use crate::cluster::TokenClaim;
use crate::http::AppError;
use crate::node::Node;
use crate::plugins::AuthOutcome;
use crate::plugins::hooks::ConnectRequest;
use crate::plugins::manifest::Hook;
use crate::stats::Stats;

/// A socket stops reading while more than this many bytes wait for the
/// kernel. The largest frame the node sends is a receipt for a message of
/// `max_body_bytes`, whose text a receipt embeds as a JSON string (at worst 6
/// bytes per byte, `\u00XX`), and a write batch stops at `max_body_bytes`; so
/// 8 × `max_body_bytes` holds a batch and the frame after it. Inbound plugin
/// replies over `max_body_bytes` are refused before they get here.
pub fn max_unsent_bytes(max_body_bytes: usize) -> usize {
    max_body_bytes.saturating_mul(8).max(1 << 20)
}

/// Who a socket belongs to, fixed at connect.
#[derive(Debug, Clone)]
pub struct Session {
    pub client: TokenValue,
}

/// Authenticates and upgrades one terminal connection.
pub async fn upgrade(
    State(node): State<Node>,
    ConnectInfo(remote): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    query: Result<Query<Vec<(String, String)>>, QueryRejection>,
    handshake: Result<Handshake, AppError>,
) -> Result<Response, AppError> {
    // The handshake is checked before anything is spent on it (a connection
    // slot, an auth call, the single-use token).
    let handshake = handshake?;
    let Query(query) = query?;
    if node.shutdown.stopping().is_cancelled() {
        return Err(AppError::Unavailable("server shutting down".into()));
    }
    let client_addr = client_address(&node, remote, &headers);
    if !node.connect_rate.admit(client_addr) {
        Stats::incr(&node.stats.connects_rate_limited);
        return Ok(AppError::TooManyRequests(
            "too many connects from this address; retry shortly".into(),
        )
        .with_retry_after(1));
    }
    if node.plugins.auth_pending() {
        Stats::incr(&node.stats.connects_plugins_loading);
        return Ok(
            AppError::Unavailable("auth plugins are loading; retry shortly".into())
                .with_retry_after(1),
        );
    }
    let Ok(slot) = node.connection_slots.clone().try_acquire_owned() else {
        Stats::incr(&node.stats.connects_over_capacity);
        return Err(AppError::Unavailable("server full".into()));
    };
    let seen_from = if client_addr == remote.ip() {
        remote.to_string()
    } else {
        client_addr.to_string()
    };
    let client = identify(&node, &query, &headers, seen_from).await?;
    let session = Session { client };
    let (response, on_upgrade) = handshake.accept();
    // Registered before the `101` goes out: a message sent as soon as the
    // terminal sees its connect succeed is queued for the socket, not lost
    // to a registration still on its way.
    let client_id = session.client.client_id;
    let registration = node.registry.register(client_id);
    let tasks = node.shutdown.tasks().clone();
    // `connection::serve` is the socket's whole life, spawned as it is: an
    // async block around it would hold a second copy of everything it moves
    // in, in every idle socket's task.
    let span = debug_span!("socket", client = client_id);
    tasks.spawn(connection::serve(on_upgrade, registration, node, session, slot).instrument(span));
    Ok(response)
}

/// The terminal's address: the peer's, or, when `trusted_proxy_header` is
/// set, the last address that header lists (what the proxy in front of us
/// appended; earlier entries are whatever the client claimed).
fn client_address(node: &Node, remote: SocketAddr, headers: &HeaderMap) -> std::net::IpAddr {
    node.config
        .trusted_proxy_header
        .as_deref()
        .and_then(|name| headers.get(name))
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.rsplit(',').next())
        .and_then(|last| last.trim().parse().ok())
        .unwrap_or(remote.ip())
}

/// Who is connecting: the auth plugins decide first; when they all pass (or
/// there are none), the built-in single-use token store.
async fn identify(
    node: &Node,
    query: &[(String, String)],
    headers: &HeaderMap,
    remote: String,
) -> Result<TokenValue, AppError> {
    let token = query
        .iter()
        .find(|(k, _)| k == "token")
        .map(|(_, v)| v.clone());
    if node.plugins.current().has(Hook::Auth) {
        let request = ConnectRequest {
            token: token.clone(),
            query: query.to_vec(),
            headers: headers
                .iter()
                .filter_map(|(k, v)| Some((k.as_str().to_owned(), v.to_str().ok()?.to_owned())))
                .collect(),
            remote_addr: remote,
            node: node.topology.me.clone(),
        };
        match node.plugins.authenticate(&request).await {
            AuthOutcome::Allow(client) => {
                if !node.topology.is_mine(client.client_id) {
                    let owner = node.topology.node_for(client.client_id);
                    return Err(AppError::Misdirected(format!(
                        "this client belongs to server {owner}; connect there"
                    )));
                }
                return Ok(client);
            }
            AuthOutcome::Deny(reason) => {
                Stats::incr(&node.stats.auth_denied);
                debug!(%reason, "connect refused by an auth plugin");
                return Err(AppError::Unauthorized("connect refused".into()));
            }
            AuthOutcome::Pass => {}
        }
    }
    let token = token.unwrap_or_default();
    let claim = if crate::token::looks_like_token(&token) {
        node.presence.take_token(&token, &node.topology).await?
    } else {
        TokenClaim::Unknown
    };
    match claim {
        TokenClaim::Taken(client) => Ok(client),
        TokenClaim::Unknown => {
            Stats::incr(&node.stats.connects_refused);
            debug!("connect refused: unknown, used or expired token");
            Err(AppError::Unauthorized(
                "unknown, used or expired token".into(),
            ))
        }
        TokenClaim::Misdirected { owner } => {
            Stats::incr(&node.stats.connects_refused);
            Err(AppError::Misdirected(format!(
                "this client belongs to server {owner}; connect there with the same token"
            )))
        }
    }
}
