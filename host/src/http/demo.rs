//! The demo chat (`--demo`): a page at `/` and the toy business backend it talks
//! to under `/demo/api`.
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

/// Demo visitors get ids from here; real backends use their own user ids.
static NEXT_CLIENT: AtomicI64 = AtomicI64::new(1001);

pub fn router() -> Router<Node> {
    Router::new()
        .route("/", get(|| async { Html(PAGE) }))
        .route("/demo/api/login", post(login))
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

async fn login(State(node): State<Node>, Json(req): Json<Login>) -> Result<Json<Value>, AppError> {
    let name = clean(&req.name, 32)?;
    let client_id = NEXT_CLIENT.fetch_add(1, Ordering::Relaxed);
    let answer = business::connect_url(&node, client_id, Some(name)).await?;
    Ok(Json(json!({ "client_id": client_id, "url": answer.url })))
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
