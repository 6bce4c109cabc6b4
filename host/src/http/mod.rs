//! The HTTP face of a node: the business API (`/api/v1`, SPEC section 3), the
//! terminal upgrade (`/ws`), health, metrics, the status page, and the demo
//! page when enabled.
//!
//! # Layout
//! - [`error`]: `AppError`, the one place errors become responses.
//! - `api`: thin handlers over [`crate::business`].
//! - `events`: the Server-Sent Events stream of online/offline events.
//! - `demo`: the chat page and its toy business backend (`--demo`).
//! - `status`: the live status page and its report stream.

mod api;
mod demo;
pub mod error;
mod events;
pub mod listener;
mod status;

use axum::Router;
use axum::extract::{DefaultBodyLimit, FromRequest, FromRequestParts, Request, State};
use axum::http::header::AUTHORIZATION;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Serialize;
use subtle::ConstantTimeEq;

pub use error::AppError;

use crate::config::WS_PATH;
use crate::node::Node;

/// `axum::Json` whose rejection is an [`AppError`] with the API's error body.
#[derive(FromRequest)]
#[from_request(via(axum::Json), rejection(AppError))]
pub struct Json<T>(pub T);

impl<T: Serialize> IntoResponse for Json<T> {
    fn into_response(self) -> Response {
        axum::Json(self.0).into_response()
    }
}

/// `axum::extract::Path` whose rejection is an [`AppError`].
#[derive(FromRequestParts)]
#[from_request(via(axum::extract::Path), rejection(AppError))]
pub struct Path<T>(pub T);

/// `GET /metrics` (no key, as Prometheus scrapes it; SPEC section 7): see
/// [`crate::metrics`]. On the listen port unless `metrics_listen` moves it.
pub async fn metrics(State(node): State<Node>) -> Response {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            crate::metrics::CONTENT_TYPE,
        )],
        node.metrics.render(),
    )
        .into_response()
}

/// Every route of the node.
pub fn router(node: Node) -> Router {
    let api = Router::new()
        .route("/connect-url", post(api::connect_url))
        .route("/messages", post(api::send_message))
        .route("/channels", get(api::channels))
        .route("/channels/{chan}/join", post(api::join))
        .route("/channels/{chan}/leave", post(api::leave))
        .route("/channels/{chan}/messages", post(api::channel_message))
        .route("/channels/{chan}/members", get(api::members))
        .route("/broadcast", post(api::broadcast))
        .route("/batch", post(api::batch))
        .route("/clients/{id}", get(api::client))
        .route("/clients/{id}/force-offline", post(api::force_offline))
        .route("/online", get(api::online))
        .route("/events", get(events::stream))
        .route("/stats", get(api::stats))
        .route("/plugins", get(api::plugins))
        .route("/plugins/reload", post(api::reload_plugins))
        .route_layer(middleware::from_fn_with_state(
            node.clone(),
            require_api_key,
        ))
        .layer(DefaultBodyLimit::max(node.config.limits.max_body_bytes))
        .layer(middleware::from_fn_with_state(node.clone(), read_body));

    let keyed = Router::new()
        .route("/status/events", get(status::events))
        .route_layer(middleware::from_fn_with_state(
            node.clone(),
            require_api_key,
        ));
    let mut router = Router::new().merge(keyed);
    if node.config.metrics_listen.is_none() {
        router = router.route("/metrics", get(metrics));
    }
    let mut router = router
        .route("/status", get(status::page))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(ready))
        .route(WS_PATH, get(crate::ws::upgrade))
        .nest("/api/v1", api);
    if node.config.demo {
        router = router.merge(demo::router());
    }
    router
        .fallback(|| async { AppError::NotFound("no such route".into()) })
        .method_not_allowed_fallback(|| async {
            AppError::MethodNotAllowed("this route does not take that method".into())
        })
        .with_state(node)
}

/// The router of the metrics listener (`metrics_listen`): `/metrics` alone.
pub fn metrics_router(node: Node) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .fallback(|| async { AppError::NotFound("no such route".into()) })
        .with_state(node)
}

/// `GET /readyz`: 200 when every enabled plugin is active and, clustered,
/// Redis answers; 503 with the reason otherwise. `/healthz` is liveness.
async fn ready(State(node): State<Node>) -> Response {
    if let Err(reason) = node.plugins.ready() {
        return AppError::Unavailable(reason).into_response();
    }
    let ping = tokio::time::timeout(std::time::Duration::from_secs(2), node.presence.ping()).await;
    match ping {
        Ok(Ok(())) => "ready".into_response(),
        Ok(Err(err)) => AppError::Unavailable(format!("cluster store: {err}")).into_response(),
        Err(_) => {
            AppError::Unavailable("cluster store: no answer within 2s".into()).into_response()
        }
    }
}

/// Reads an API request's whole body under one deadline (`body_read_timeout`)
/// and size limit (`max_body_bytes`), before any handler runs: a body sent
/// byte by byte, or declared longer than it is, costs the node at most that
/// long. Every API body is small JSON that handlers buffer anyway.
async fn read_body(State(node): State<Node>, request: Request, next: Next) -> Response {
    let limits = &node.config.limits;
    let declared = request
        .headers()
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > limits.max_body_bytes as u64) {
        return AppError::PayloadTooLarge("request body too large".into()).into_response();
    }
    let (parts, body) = request.into_parts();
    let read = axum::body::to_bytes(body, limits.max_body_bytes);
    match tokio::time::timeout(limits.body_read_timeout, read).await {
        Ok(Ok(bytes)) => {
            next.run(Request::from_parts(parts, axum::body::Body::from(bytes)))
                .await
        }
        Ok(Err(err)) if error::is_length_limit(&err) => {
            AppError::PayloadTooLarge("request body too large".into()).into_response()
        }
        Ok(Err(_)) => {
            AppError::BadRequest("the request body could not be read".into()).into_response()
        }
        Err(_) => AppError::RequestTimeout(format!(
            "the request body did not arrive within {:?}",
            limits.body_read_timeout
        ))
        .into_response(),
    }
}

/// Rejects API calls without `Authorization: Bearer <api key>`. The compare
/// takes the same time wherever the first wrong byte is.
async fn require_api_key(State(node): State<Node>, request: Request, next: Next) -> Response {
    let presented = request
        .headers()
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    let expected = node.config.api_key.as_bytes();
    if bool::from(presented.as_bytes().ct_eq(expected)) {
        next.run(request).await
    } else {
        AppError::Unauthorized("missing or wrong API key".into()).into_response()
    }
}
