//! Handlers of `/api/v1`: decode, call [`crate::business`], encode.

use axum::extract::State;
use imhost_client::ClientId;
use imhost_client::api::{
    BroadcastRequest, ChannelInfo, ChannelMembersRequest, ChannelMessageRequest, ClientInfo,
    ConnectUrlRequest, ConnectUrlResponse, SendMessageRequest,
};
use serde_json::{Value, json};

use super::{AppError, Json, Path};
use crate::business::{self, check_channel, message_text};
use crate::node::Node;
use crate::stats::StatsSnapshot;

type Answer<T> = Result<Json<T>, AppError>;

fn done() -> Answer<Value> {
    Ok(Json(json!({})))
}

pub async fn connect_url(
    State(node): State<Node>,
    Json(req): Json<ConnectUrlRequest>,
) -> Answer<ConnectUrlResponse> {
    Ok(Json(
        business::connect_url(&node, req.client_id, req.metadata).await?,
    ))
}

pub async fn send_message(
    State(node): State<Node>,
    Json(req): Json<SendMessageRequest>,
) -> Answer<Value> {
    let content = message_text(&req.message);
    business::send_message(
        &node.outbox,
        req.sender,
        &req.receivers,
        content,
        req.receipt,
    )
    .await?;
    done()
}

pub async fn join(
    State(node): State<Node>,
    Path(chan): Path<String>,
    Json(req): Json<ChannelMembersRequest>,
) -> Answer<Value> {
    check_channel(&chan)?;
    node.presence.join(&chan, &req.client_ids).await?;
    done()
}

pub async fn leave(
    State(node): State<Node>,
    Path(chan): Path<String>,
    Json(req): Json<ChannelMembersRequest>,
) -> Answer<Value> {
    check_channel(&chan)?;
    node.presence.leave(&chan, &req.client_ids).await?;
    done()
}

pub async fn channel_message(
    State(node): State<Node>,
    Path(chan): Path<String>,
    Json(req): Json<ChannelMessageRequest>,
) -> Answer<Value> {
    check_channel(&chan)?;
    let content = message_text(&req.message);
    business::send_chan_message(&node.outbox, req.sender, Some(chan), content).await?;
    done()
}

pub async fn broadcast(
    State(node): State<Node>,
    Json(req): Json<BroadcastRequest>,
) -> Answer<Value> {
    business::send_chan_message(&node.outbox, 0, None, message_text(&req.message)).await?;
    done()
}

pub async fn channels(State(node): State<Node>) -> Answer<Vec<ChannelInfo>> {
    Ok(Json(business::channels(&node).await?))
}

pub async fn members(State(node): State<Node>, Path(chan): Path<String>) -> Answer<Vec<ClientId>> {
    check_channel(&chan)?;
    Ok(Json(node.presence.members(&chan).await?))
}

pub async fn client(State(node): State<Node>, Path(id): Path<ClientId>) -> Answer<ClientInfo> {
    Ok(Json(business::client_info(&node, id).await?))
}

pub async fn online(State(node): State<Node>) -> Answer<Vec<ClientId>> {
    Ok(Json(node.presence.online().await?))
}

pub async fn force_offline(State(node): State<Node>, Path(id): Path<ClientId>) -> Answer<Value> {
    business::force_offline(&node.outbox, id).await?;
    done()
}

/// This node's counters (not cluster-wide).
pub async fn stats(State(node): State<Node>) -> Answer<StatsSnapshot> {
    Ok(Json(node.stats.snapshot()))
}

/// Every plugin: running versions with their counters, and failed files.
pub async fn plugins(State(node): State<Node>) -> Answer<Vec<crate::plugins::PluginInfo>> {
    Ok(Json(node.plugins.list()))
}

/// Rescans the plugin directory now; answers with what failed to load.
pub async fn reload_plugins(State(node): State<Node>) -> Answer<Value> {
    let failed = node.plugins.reload().await;
    Ok(Json(
        json!({ "failed": failed, "plugins": node.plugins.list() }),
    ))
}
