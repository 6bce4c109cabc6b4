//! Handlers of `/api/v1`: decode, call [`crate::business`], encode.

use axum::extract::State;
use imhost_client::ClientId;
use imhost_client::api::{
    BatchChannelMessage, BatchItem, BatchResponse, BatchResult, BroadcastRequest, ChannelInfo,
    ChannelMembersRequest, ChannelMessageRequest, ClientInfo, ConnectUrlRequest,
    ConnectUrlResponse, SendMessageRequest,
};
use serde_json::value::RawValue;
use serde_json::{Value, json};

use super::{AppError, Json, Path};
use crate::business::{self, check_channel, message_text};
use crate::node::Node;
use crate::stats::{Stats, StatsSnapshot};

type Answer<T> = Result<Json<T>, AppError>;

fn done() -> Answer<Value> {
    Ok(Json(json!({})))
}

/// Refuses a send at once when this node's delivery backlog is full. In
/// embedded mode delivery checks again as it takes its share of the backlog;
/// clustered, this is the node's own push-back on its caller before it
/// publishes (the receiving nodes push back on Redis by not reading).
fn refuse_when_overloaded(node: &Node) -> Result<(), AppError> {
    if node.shards.is_full() {
        Stats::incr(&node.stats.sends_refused_overloaded);
        return Err(AppError::Overloaded(crate::shards::Overloaded.to_string()));
    }
    Ok(())
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
    send(&node, BatchItem::Messages(req)).await?;
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
    Path(channel): Path<String>,
    Json(req): Json<ChannelMessageRequest>,
) -> Answer<Value> {
    let item = BatchChannelMessage {
        channel,
        sender: req.sender,
        message: req.message,
    };
    send(&node, BatchItem::ChannelMessage(item)).await?;
    done()
}

pub async fn broadcast(
    State(node): State<Node>,
    Json(req): Json<BroadcastRequest>,
) -> Answer<Value> {
    send(&node, BatchItem::Broadcast(req)).await?;
    done()
}

/// The body of `POST /api/v1/batch`, its items left unparsed: an item that
/// does not parse gets its own error, and the others still go.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBatch<'a> {
    #[serde(borrow)]
    items: Vec<&'a RawValue>,
}

/// `POST /api/v1/batch`: each item is the body of the call it names, sent
/// in order, with its own result. The request fails as a whole only when its
/// body is not a batch or has more than `max_batch_items` items.
pub async fn batch(State(node): State<Node>, body: axum::body::Bytes) -> Answer<BatchResponse> {
    let raw: RawBatch<'_> = serde_json::from_slice(&body)
        .map_err(|e| AppError::BadRequest(format!("not a batch: {e}")))?;
    let max = node.config.limits.max_batch_items;
    if raw.items.len() > max {
        return Err(AppError::BadRequest(format!(
            "a batch holds at most {max} items; this one has {}",
            raw.items.len()
        )));
    }
    let mut results = Vec::with_capacity(raw.items.len());
    for item in raw.items {
        let result = match serde_json::from_str::<BatchItem>(item.get()) {
            Ok(item) => send(&node, item).await,
            Err(err) => Err(AppError::BadRequest(format!("invalid item: {err}"))),
        };
        results.push(BatchResult {
            error: result.err().map(|err| err.body().error),
        });
    }
    Ok(Json(BatchResponse { results }))
}

/// One send, as its own call or as an item of a batch: checked, refused
/// when the node is overloaded, and handed to [`business`].
async fn send(node: &Node, item: BatchItem) -> Result<(), AppError> {
    if let BatchItem::ChannelMessage(req) = &item {
        check_channel(&req.channel)?;
    }
    refuse_when_overloaded(node)?;
    match item {
        BatchItem::Messages(req) => {
            let content = message_text(&req.message);
            business::send_message(
                &node.outbox,
                req.sender,
                &req.receivers,
                content,
                req.receipt,
            )
            .await?;
        }
        BatchItem::ChannelMessage(req) => {
            let content = message_text(&req.message);
            business::send_chan_message(&node.outbox, req.sender, Some(req.channel), content)
                .await?;
        }
        BatchItem::Broadcast(req) => {
            business::send_chan_message(&node.outbox, 0, None, message_text(&req.message)).await?;
        }
    }
    Ok(())
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
