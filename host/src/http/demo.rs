//! The demo chat (`--demo`): a page at `/`, the JavaScript client it runs on
//! (`clients/js/imhost.js`, served as `/demo/imhost.js`) and the toy business
//! backend it talks to under `/demo/api`.
//!
//! In a real deployment the page's backend is the business system, holding the
//! API key; here the node plays that part in process, so the browser never sees
//! the key. The toy backend trusts whatever name a visitor types: it is for
//! trying imhost out, never for exposure beyond localhost.

use std::sync::atomic::{AtomicI64, Ordering};

use axum::Router;
use axum::extract::State;
use axum::response::Html;
use axum::routing::{get, post};
use imhost_client::ClientId;
use imhost_client::api::ChannelInfo;
use serde::Deserialize;
use serde_json::{Value, json};

use super::{AppError, Json};
use crate::business::{self, check_channel};
use crate::node::Node;

const PAGE: &str = include_str!("demo.html");
/// The terminal client the page runs on, the same file applications import.
const CLIENT: &str = include_str!("../../../clients/js/imhost.js");

/// Most online client ids `/demo/api/online` lists.
const ONLINE_LISTED: usize = 50;

/// Demo visitors get ids from here, plus [`IDS_PER_NODE`] times the node's
/// place in the cluster, so that two nodes never hand out the same id; real
/// backends use their own user ids.
static NEXT_CLIENT: AtomicI64 = AtomicI64::new(1001);
const IDS_PER_NODE: i64 = 100_000;

pub fn router() -> Router<Node> {
    Router::new()
        .route("/", get(|| async { Html(PAGE) }))
        .route(
            "/demo/imhost.js",
            get(|| async {
                (
                    [(
                        axum::http::header::CONTENT_TYPE,
                        "text/javascript; charset=utf-8",
                    )],
                    CLIENT,
                )
            }),
        )
        .route("/demo/api/login", post(login))
        .route("/demo/api/connect", post(connect))
        .route("/demo/api/online", get(online))
        .route("/demo/api/join", post(join))
        .route("/demo/api/say", post(say))
        .route("/demo/api/direct", post(direct))
        .route("/demo/api/broadcast", post(broadcast))
        .route("/demo/api/channels", get(channels))
}

#[derive(Deserialize)]
struct Login {
    name: String,
}

/// Signs a visitor in: a new client id for the name (no password: a toy).
async fn login(State(node): State<Node>, Json(req): Json<Login>) -> Result<Json<Value>, AppError> {
    let name = clean(&req.name, 32)?;
    let place = node
        .topology
        .servers
        .iter()
        .position(|s| *s == node.topology.me)
        .unwrap_or(0) as i64;
    let client_id = place * IDS_PER_NODE + NEXT_CLIENT.fetch_add(1, Ordering::Relaxed);
    Ok(Json(json!({ "client_id": client_id, "name": name })))
}

#[derive(Deserialize)]
struct Connect {
    client_id: ClientId,
    name: String,
}

/// A fresh connect URL, before every connect and reconnect (tokens are
/// single use): what a real backend's endpoint for its client library does.
async fn connect(
    State(node): State<Node>,
    Json(req): Json<Connect>,
) -> Result<Json<Value>, AppError> {
    let name = clean(&req.name, 32)?;
    let answer = business::connect_url(&node, req.client_id, Some(name)).await?;
    Ok(Json(json!({ "url": answer.url })))
}

/// How many clients are online in the cluster, and the first few ids.
async fn online(State(node): State<Node>) -> Result<Json<Value>, AppError> {
    let mut ids = node.presence.online().await?;
    let count = ids.len();
    ids.truncate(ONLINE_LISTED);
    Ok(Json(json!({ "online": count, "clients": ids })))
}

#[derive(Deserialize)]
struct Join {
    client_id: ClientId,
    channel: String,
}

async fn join(State(node): State<Node>, Json(req): Json<Join>) -> Result<Json<Value>, AppError> {
    check_channel(&req.channel)?;
    node.presence.join(&req.channel, &[req.client_id]).await?;
    Ok(Json(json!({})))
}

#[derive(Deserialize)]
struct Say {
    client_id: ClientId,
    name: String,
    channel: String,
    text: String,
}

async fn say(State(node): State<Node>, Json(req): Json<Say>) -> Result<Json<Value>, AppError> {
    check_channel(&req.channel)?;
    let message = json!({
        "type": "chat",
        "channel": req.channel,
        "from": clean(&req.name, 32)?,
        "text": clean(&req.text, 2000)?,
    });
    let content = business::message_text(&message);
    business::send_chan_message(&node.outbox, req.client_id, Some(req.channel), content).await?;
    Ok(Json(json!({})))
}

#[derive(Deserialize)]
struct Direct {
    client_id: ClientId,
    name: String,
    to: ClientId,
    text: String,
    /// The page's own id for the message, so it can match the receipt.
    #[serde(default)]
    id: Option<String>,
}

async fn direct(
    State(node): State<Node>,
    Json(req): Json<Direct>,
) -> Result<Json<Value>, AppError> {
    let message = json!({
        "type": "direct",
        "from": clean(&req.name, 32)?,
        "from_id": req.client_id,
        "text": clean(&req.text, 2000)?,
        "id": req.id.as_deref().map(|id| clean(id, 64)).transpose()?,
    });
    let content = business::message_text(&message);
    business::send_message(&node.outbox, req.client_id, &[req.to], content, true).await?;
    Ok(Json(json!({})))
}

#[derive(Deserialize)]
struct Broadcast {
    name: String,
    text: String,
}

async fn broadcast(
    State(node): State<Node>,
    Json(req): Json<Broadcast>,
) -> Result<Json<Value>, AppError> {
    let message = json!({
        "type": "broadcast",
        "from": clean(&req.name, 32)?,
        "text": clean(&req.text, 2000)?,
    });
    business::send_chan_message(&node.outbox, 0, None, business::message_text(&message)).await?;
    Ok(Json(json!({})))
}

async fn channels(State(node): State<Node>) -> Result<Json<Vec<ChannelInfo>>, AppError> {
    Ok(Json(business::channels(&node).await?))
}

fn clean(text: &str, max_chars: usize) -> Result<String, AppError> {
    let text = text.trim();
    if text.is_empty() || text.chars().count() > max_chars {
        return Err(AppError::BadRequest(format!(
            "must be 1 to {max_chars} characters"
        )));
    }
    Ok(text.to_owned())
}
