//! The terminal side: `GET /ws?token=…` and the life of one socket.
//!
//! Everything that can refuse a terminal happens here, before the upgrade, so a
//! refusal is a plain HTTP answer (401, 421, 503) and costs no WebSocket state:
//! a free connection slot is taken first, then the auth plugins decide, and
//! when they all pass, the built-in single-use token.
//!
//! A refusal is a [`Refusal`], which `http` turns into its answer: this
//! module knows why it refuses, not how HTTP says so.
//!
//! # Layout
//! - `handshake`: the opening handshake, and the TCP stream taken back from hyper.
//! - [`frame`]: the frame codec, decoding as bytes arrive.
//! - [`handle`]: one socket's handle (`SocketHandle`, `CloseReason`), what the
//!   rest of the node touches; `crate::registry` maps clients to handles.
//! - `socket`: the socket core, driven by readiness.
//! - [`outbound`]: a socket's writes, shared by deliveries and its task.
//! - [`transport`]: plain TCP or TLS under the socket core.
//! - `connection`: a terminal's life: registration, presence, inbound plugins.
//! - `heartbeat`: one sweep for every socket's heartbeat.
//! - [`connect_rate`]: connects per second per address.
//!
//! # Invariants of the socket core
//! - **Who writes.** Any thread may write to a socket (a delivery shard, a
//!   caller writing a small audience at once, the socket's own task), always
//!   under the socket's outbound mutex, so frames never interleave; a
//!   partly written frame's rest goes first at the next write.
//! - **Lock order.** The outbound mutex, then (TLS) the rustls connection's
//!   lock; nothing else is taken under either, and neither is held across
//!   an `.await`.
//! - **The readiness hand-off.** A delivery's write goes to the descriptor
//!   without consulting tokio's readiness (`Transport::try_write_direct`); a
//!   `WouldBlock` there leaves tokio's readiness set, so the socket's task,
//!   woken by the `QUEUED` signal, tries through tokio, sees the
//!   `WouldBlock` and waits for writability. Nothing is written past a queue:
//!   a push writes at once only when nothing waits.
//! - **Order.** A socket belongs to one delivery shard (`crate::shards`), whose
//!   queue is its order; a write at once happens only while its shard has
//!   nothing queued or being written.
//! - **Future sizes.** An idle socket is its task's future plus its handle:
//!   `connection::serve` is spawned as it is (an async block around it
//!   would hold a second copy of what it moves in), and what waits for the
//!   kernel is boxed in the handle (`docs/architecture.md`, memory per
//!   connection).

pub mod connect_rate;
mod connection;
pub mod frame;
pub mod handle;
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

use crate::cluster::{ClusterError, TokenClaim};
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

/// Why a terminal was refused before the upgrade. `http` turns each into
/// its answer (status, JSON error body, `Retry-After` where there is one).
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    /// Not a WebSocket opening handshake, or a query that does not parse: 400.
    #[error("{0}")]
    BadRequest(String),
    /// No valid token, or an auth plugin said no: 401.
    #[error("{0}")]
    Unauthorized(String),
    /// The client belongs to another node: 421.
    #[error("{0}")]
    Misdirected(String),
    /// The address is over its connect rate: 429, retry after a second.
    #[error("{0}")]
    RateLimited(String),
    /// The node cannot take it now: 503, with `Retry-After: 1` when
    /// `retry_soon` (auth plugins still loading).
    #[error("{reason}")]
    Unavailable { reason: String, retry_soon: bool },
    /// The cluster store could not be asked.
    #[error(transparent)]
    Cluster(#[from] ClusterError),
}

impl From<QueryRejection> for Refusal {
    fn from(rejection: QueryRejection) -> Self {
        Refusal::BadRequest(rejection.body_text())
    }
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
    handshake: Result<Handshake, Refusal>,
) -> Result<Response, Refusal> {
    // The handshake is checked before anything is spent on it (a connection
    // slot, an auth call, the single-use token).
    let handshake = handshake?;
    let Query(query) = query?;
    if node.shutdown.stopping().is_cancelled() {
        return Err(Refusal::Unavailable {
            reason: "server shutting down".into(),
            retry_soon: false,
        });
    }
    let client_addr = client_address(&node, remote, &headers);
    if !node.connect_rate.admit(client_addr) {
        Stats::incr(&node.stats.connects_rate_limited);
        return Err(Refusal::RateLimited(
            "too many connects from this address; retry shortly".into(),
        ));
    }
    if node.plugins.auth_pending() {
        Stats::incr(&node.stats.connects_plugins_loading);
        return Err(Refusal::Unavailable {
            reason: "auth plugins are loading; retry shortly".into(),
            retry_soon: true,
        });
    }
    let Ok(slot) = node.connection_slots.clone().try_acquire_owned() else {
        Stats::incr(&node.stats.connects_over_capacity);
        return Err(Refusal::Unavailable {
            reason: "server full".into(),
            retry_soon: false,
        });
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

/// The terminal's address: the peer's, unless the peer is one of
/// `trusted_proxies` and `trusted_proxy_header` is set: then the header's
/// addresses (every instance of it, in order) are read from the right, each
/// trusted proxy's own entry skipped, and the first address that is not a
/// trusted proxy is the client's. Entries left of it are whatever the client
/// claimed and are never believed.
fn client_address(node: &Node, remote: SocketAddr, headers: &HeaderMap) -> std::net::IpAddr {
    let Some(name) = node.config.trusted_proxy_header.as_deref() else {
        return remote.ip();
    };
    let values = headers.get_all(name).iter().filter_map(|v| v.to_str().ok());
    forwarded_client(remote.ip(), values, &node.config.trusted_proxies)
}

/// See [`client_address`].
fn forwarded_client<'a>(
    peer: std::net::IpAddr,
    header_values: impl Iterator<Item = &'a str>,
    trusted: &[ipnet::IpNet],
) -> std::net::IpAddr {
    let is_trusted = |ip: &std::net::IpAddr| trusted.iter().any(|net| net.contains(ip));
    if !is_trusted(&peer) {
        return peer;
    }
    let hops: Vec<&str> = header_values.flat_map(|v| v.split(',')).collect();
    let mut client = peer;
    for hop in hops.iter().rev() {
        let Ok(ip) = hop.trim().parse::<std::net::IpAddr>() else {
            // Not an address: nothing left of it can be believed.
            break;
        };
        client = ip;
        if !is_trusted(&ip) {
            break;
        }
    }
    client
}
/// Who is connecting: the auth plugins decide first; when they all pass (or
/// there are none), the built-in single-use token store.
async fn identify(
    node: &Node,
    query: &[(String, String)],
    headers: &HeaderMap,
    remote: String,
) -> Result<TokenValue, Refusal> {
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
                    return Err(Refusal::Misdirected(format!(
                        "this client belongs to server {owner}; connect there"
                    )));
                }
                return Ok(client);
            }
            AuthOutcome::Deny(reason) => {
                Stats::incr(&node.stats.auth_denied);
                debug!(%reason, "connect refused by an auth plugin");
                return Err(Refusal::Unauthorized("connect refused".into()));
            }
            AuthOutcome::Pass => {}
            AuthOutcome::Busy(plugin) => {
                Stats::incr(&node.stats.connects_auth_busy);
                debug!(%plugin, "connect refused for now: the auth plugin is busy");
                return Err(Refusal::Unavailable {
                    reason: "the node is busy checking connects; retry shortly".into(),
                    retry_soon: true,
                });
            }
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
            Err(Refusal::Unauthorized(
                "unknown, used or expired token".into(),
            ))
        }
        TokenClaim::Misdirected { owner } => {
            Stats::incr(&node.stats.connects_refused);
            Err(Refusal::Misdirected(format!(
                "this client belongs to server {owner}; connect there with the same token"
            )))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nets(list: &[&str]) -> Vec<ipnet::IpNet> {
        list.iter()
            .map(|n| n.parse().expect("a network in the test"))
            .collect()
    }

    fn ip(text: &str) -> std::net::IpAddr {
        text.parse().expect("an address in the test")
    }

    #[test]
    fn the_client_is_the_first_untrusted_address_from_the_right() {
        let trusted = nets(&["127.0.0.0/8", "10.0.0.0/8"]);
        let from = |peer: &str, values: &[&str]| {
            forwarded_client(ip(peer), values.iter().copied(), &trusted)
        };
        // A forged entry on the left is skipped over.
        assert_eq!(
            from("127.0.0.1", &["6.6.6.6, 198.51.100.7"]),
            ip("198.51.100.7")
        );
        // Two proxies of ours: the inner one's own entry is skipped.
        assert_eq!(
            from("127.0.0.1", &["6.6.6.6, 198.51.100.7", "10.1.1.1"]),
            ip("198.51.100.7")
        );
        // A peer that is no proxy of ours is taken at its word: none.
        assert_eq!(from("192.0.2.1", &["198.51.100.7"]), ip("192.0.2.1"));
        // Garbage stops the walk at the last believable hop.
        assert_eq!(from("127.0.0.1", &["198.51.100.7, junk"]), ip("127.0.0.1"));
        assert_eq!(from("127.0.0.1", &[]), ip("127.0.0.1"));
        // Only proxies all the way: the leftmost of them.
        assert_eq!(from("127.0.0.1", &["10.2.2.2, 10.1.1.1"]), ip("10.2.2.2"));
    }
}
