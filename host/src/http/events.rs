//! `GET /api/v1/events`: online/offline events as Server-Sent Events.
//!
//! Each subscriber reads a bounded broadcast channel. One that falls behind
//! skips the events it missed and gets a `lagged` event saying how many, rather
//! than being disconnected or holding memory for it. Streams end only after the
//! node's sockets have drained, so the offline events of a shutdown reach them.

use std::convert::Infallible;

use axum::extract::State;
use axum::response::sse::{Event, KeepAlive, Sse};
use futures_util::{Stream, StreamExt};
use serde_json::json;
use tokio_stream::wrappers::BroadcastStream;
use tokio_stream::wrappers::errors::BroadcastStreamRecvError;

use crate::cluster::{PresenceChange, PresenceKind};
use crate::node::Node;

pub async fn stream(
    State(node): State<Node>,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let events = BroadcastStream::new(node.events.subscribe())
        .map(|item| Ok(to_event(item)))
        .take_until(node.shutdown.drained().clone().cancelled_owned());
    Sse::new(events).keep_alive(KeepAlive::default())
}

fn to_event(item: Result<PresenceChange, BroadcastStreamRecvError>) -> Event {
    match item {
        Ok(change) => {
            let name = match change.kind {
                PresenceKind::Online => "online",
                PresenceKind::Offline => "offline",
            };
            Event::default()
                .event(name)
                .json_data(&change.event)
                .unwrap_or_default()
        }
        Err(BroadcastStreamRecvError::Lagged(missed)) => Event::default()
            .event("lagged")
            .data(json!({ "missed": missed }).to_string()),
    }
}
