//! [`ApiClient`]: the business HTTP API (SPEC section 3) from Rust, over a
//! pool of HTTP/1.1 connections or one multiplexed h2c connection, with
//! batches. Enabled by the crate's `http` feature.
//!
//! Every call maps the node's JSON error body to [`ApiError::Status`]; a
//! node that is overloaded (503 `overloaded`, nothing taken) says how long
//! to wait in [`ApiError::retry_after`], and [`ApiError::is_overloaded`]
//! tells it from other failures so a caller can back off and resend.

use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::ClientId;
use crate::api::{
    BatchItem, BatchRequest, BatchResponse, BroadcastRequest, ChannelInfo, ChannelMembersRequest,
    ChannelMessageRequest, ClientInfo, ConnectUrlRequest, ConnectUrlResponse, ErrorBody,
    ErrorDetail, SendMessageRequest,
};

/// How an [`ApiClient`] reaches the node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Protocol {
    /// HTTP/1.1, a pool of connections (one per request in flight).
    #[default]
    Http1,
    /// HTTP/2 without TLS, prior knowledge: every request in flight on one
    /// connection.
    H2c,
}

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The node could not be reached, or its answer could not be read.
    #[error("imhost API: {0}")]
    Transport(#[from] reqwest::Error),
    /// The node answered with an error.
    #[error("imhost API: {status} {}: {}", .error.code, .error.message)]
    Status {
        status: u16,
        error: ErrorDetail,
        /// `Retry-After`, when the node gave one.
        retry_after: Option<Duration>,
    },
    /// The client was given something it cannot use (a bad base URL).
    #[error("imhost API: {0}")]
    Config(String),
}

impl ApiError {
    /// Whether the node pushed back (503 `overloaded`): it took nothing;
    /// send again after [`ApiError::retry_after`].
    pub fn is_overloaded(&self) -> bool {
        matches!(self, ApiError::Status { error, .. } if error.code == "overloaded")
    }

    /// How long the node asked the caller to wait, if it did.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            ApiError::Status { retry_after, .. } => *retry_after,
            _ => None,
        }
    }
}

/// The business API of one node (any node of a cluster takes any call).
#[derive(Debug, Clone)]
pub struct ApiClient {
    http: reqwest::Client,
    base: String,
    api_key: String,
}

impl ApiClient {
    /// A client of the node at `base` (`http://host:port`) with `api_key`.
    ///
    /// # Errors
    /// [`ApiError::Config`] when `base` is not an `http://` or `https://`
    /// URL, or h2c is asked over `https://`; [`ApiError::Transport`] when the
    /// HTTP client cannot be built.
    pub fn new(base: &str, api_key: &str, protocol: Protocol) -> Result<ApiClient, ApiError> {
        let base = base.trim_end_matches('/').to_owned();
        let tls = base.starts_with("https://");
        if !tls && !base.starts_with("http://") {
            return Err(ApiError::Config(format!(
                "the base URL must start with http:// or https://: {base}"
            )));
        }
        let mut builder = reqwest::Client::builder();
        if protocol == Protocol::H2c {
            if tls {
                return Err(ApiError::Config(
                    "h2c is HTTP/2 without TLS: use an http:// base URL".into(),
                ));
            }
            builder = builder.http2_prior_knowledge();
        }
        Ok(ApiClient {
            http: builder.build()?,
            base,
            api_key: api_key.to_owned(),
        })
    }

    async fn call<B: Serialize + ?Sized, T: DeserializeOwned>(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&B>,
    ) -> Result<T, ApiError> {
        let mut request = self
            .http
            .request(method, format!("{}/api/v1{path}", self.base))
            .bearer_auth(&self.api_key);
        if let Some(body) = body {
            request = request.json(body);
        }
        let response = request.send().await?;
        let status = response.status();
        if status.is_success() {
            return Ok(response.json().await?);
        }
        let retry_after = response
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
            .map(Duration::from_secs);
        let error = match response.json::<ErrorBody>().await {
            Ok(body) => body.error,
            Err(_) => ErrorDetail {
                code: "unknown".into(),
                message: format!("HTTP {status} without an error body"),
            },
        };
        Err(ApiError::Status {
            status: status.as_u16(),
            error,
            retry_after,
        })
    }

    async fn post<B: Serialize + ?Sized>(&self, path: &str, body: &B) -> Result<(), ApiError> {
        let _: serde_json::Value = self.call(reqwest::Method::POST, path, Some(body)).await?;
        Ok(())
    }

    async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ApiError> {
        self.call::<(), T>(reqwest::Method::GET, path, None).await
    }

    /// `POST /api/v1/connect-url`.
    pub async fn connect_url(
        &self,
        client_id: ClientId,
        metadata: Option<String>,
    ) -> Result<ConnectUrlResponse, ApiError> {
        let body = ConnectUrlRequest {
            client_id,
            metadata,
        };
        self.call(reqwest::Method::POST, "/connect-url", Some(&body))
            .await
    }

    /// `POST /api/v1/messages`.
    pub async fn send_message(&self, message: &SendMessageRequest) -> Result<(), ApiError> {
        self.post("/messages", message).await
    }

    /// `POST /api/v1/channels/{chan}/messages`.
    pub async fn send_chan_message(
        &self,
        chan: &str,
        message: &ChannelMessageRequest,
    ) -> Result<(), ApiError> {
        self.post(
            &format!("/channels/{}/messages", path_segment(chan)),
            message,
        )
        .await
    }

    /// `POST /api/v1/broadcast`.
    pub async fn broadcast(&self, message: serde_json::Value) -> Result<(), ApiError> {
        self.post("/broadcast", &BroadcastRequest { message }).await
    }

    /// `POST /api/v1/batch`: one result per item, in order (`Err` with the
    /// node's reason for an item it did not send).
    ///
    /// # Errors
    /// The batch as a whole was refused (too many items, too big) or the
    /// node could not be reached: then nothing was sent.
    pub async fn batch(
        &self,
        items: Vec<BatchItem>,
    ) -> Result<Vec<Result<(), ErrorDetail>>, ApiError> {
        let answer: BatchResponse = self
            .call(
                reqwest::Method::POST,
                "/batch",
                Some(&BatchRequest { items }),
            )
            .await?;
        Ok(answer
            .results
            .into_iter()
            .map(|r| r.error.map_or(Ok(()), Err))
            .collect())
    }

    /// `POST /api/v1/channels/{chan}/join`.
    pub async fn join(&self, chan: &str, client_ids: Vec<ClientId>) -> Result<(), ApiError> {
        let body = ChannelMembersRequest { client_ids };
        self.post(&format!("/channels/{}/join", path_segment(chan)), &body)
            .await
    }

    /// `POST /api/v1/channels/{chan}/leave`.
    pub async fn leave(&self, chan: &str, client_ids: Vec<ClientId>) -> Result<(), ApiError> {
        let body = ChannelMembersRequest { client_ids };
        self.post(&format!("/channels/{}/leave", path_segment(chan)), &body)
            .await
    }

    /// `POST /api/v1/clients/{id}/force-offline`.
    pub async fn force_offline(&self, client_id: ClientId) -> Result<(), ApiError> {
        self.post(
            &format!("/clients/{client_id}/force-offline"),
            &serde_json::json!({}),
        )
        .await
    }

    /// `GET /api/v1/clients/{id}`.
    pub async fn client(&self, client_id: ClientId) -> Result<ClientInfo, ApiError> {
        self.get(&format!("/clients/{client_id}")).await
    }

    /// `GET /api/v1/online`.
    pub async fn online(&self) -> Result<Vec<ClientId>, ApiError> {
        self.get("/online").await
    }

    /// `GET /api/v1/channels`.
    pub async fn channels(&self) -> Result<Vec<ChannelInfo>, ApiError> {
        self.get("/channels").await
    }
}

/// A channel name as one URL path segment.
fn path_segment(chan: &str) -> String {
    let mut out = String::with_capacity(chan.len());
    for byte in chan.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~".contains(&byte) {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channel_names_are_escaped_as_one_segment() {
        assert_eq!(path_segment("room-1"), "room-1");
        assert_eq!(path_segment("a/b c"), "a%2Fb%20c");
        assert_eq!(path_segment("聊天"), "%E8%81%8A%E5%A4%A9");
    }

    #[test]
    fn bad_base_urls_are_refused() {
        assert!(ApiClient::new("127.0.0.1:6001", "k", Protocol::Http1).is_err());
        assert!(ApiClient::new("https://x", "k", Protocol::H2c).is_err());
        assert!(ApiClient::new("http://127.0.0.1:6001/", "k", Protocol::H2c).is_ok());
    }

    #[test]
    fn overloaded_is_told_from_other_errors() {
        let status = |code: &str| ApiError::Status {
            status: 503,
            error: ErrorDetail {
                code: code.into(),
                message: String::new(),
            },
            retry_after: Some(Duration::from_secs(1)),
        };
        assert!(status("overloaded").is_overloaded());
        assert!(!status("unavailable").is_overloaded());
        assert_eq!(
            status("overloaded").retry_after(),
            Some(Duration::from_secs(1))
        );
    }
}
