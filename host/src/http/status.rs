//! `GET /status`: the live status page, and `GET /status/events`, the stream
//! of cluster reports it draws (see [`crate::status`]).
//!
//! The page itself holds no data and needs no key. It asks for the API key in
//! a form and sends it in the `Authorization` header of its stream request,
//! which it reads with `fetch` rather than `EventSource` (which cannot send
//! headers), so the key never appears in a URL, a log line or the history.

use std::convert::Infallible;
use std::time::Duration;

use axum::extract::State;
use axum::response::Html;
use axum::response::sse::{Event, KeepAlive, Sse};
use futures_util::Stream;
use serde_json::json;

use crate::node::Node;
use crate::status::REPORT_INTERVAL;

const PAGE: &str = include_str!("status.html");

pub async fn page() -> Html<&'static str> {
    Html(PAGE)
}

/// One `cluster` event per report interval, until the node drains.
pub async fn events(
    State(node): State<Node>,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let stop = node.shutdown.drained().clone();
    let stream =
        futures_util::stream::unfold((node, stop, true), |(node, stop, first)| async move {
            if !first {
                tokio::select! {
                    () = tokio::time::sleep(REPORT_INTERVAL) => {}
                    () = stop.cancelled() => return None,
                }
            }
            let reports = crate::status::cluster(&node).await;
            let event = Event::default()
                .event("cluster")
                .json_data(json!({
                    "me": node.topology.me,
                    "servers": node.topology.servers,
                    "nodes": reports,
                }))
                .unwrap_or_default();
            Some((Ok(event), (node, stop, false)))
        });
    Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
}
