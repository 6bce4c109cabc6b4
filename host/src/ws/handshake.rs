//! The opening handshake (RFC 6455 section 4.2), and taking the TCP stream
//! back from hyper once it is done.
//!
//! The node does not use axum's `WebSocketUpgrade`: that hands over hyper's
//! `Upgraded` I/O object wrapped in tungstenite's buffered stream, which is
//! what costs an idle socket kilobytes. [`Handshake`] checks the request with
//! the same rules, answers 101 itself, and [`take_stream`] downcasts the
//! upgraded connection to the `TcpStream` the accept loop gave hyper, keeping
//! any bytes hyper had read ahead.

use axum::extract::FromRequestParts;
use axum::http::header::{CONNECTION, SEC_WEBSOCKET_ACCEPT, SEC_WEBSOCKET_KEY, UPGRADE};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use super::transport::Transport;

use super::Refusal;

/// A checked WebSocket opening handshake, ready to be answered.
pub struct Handshake {
    accept: HeaderValue,
    on_upgrade: OnUpgrade,
}

impl<S: Send + Sync> FromRequestParts<S> for Handshake {
    type Rejection = Refusal;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Refusal> {
        let refuse = |why: &str| Refusal::BadRequest(format!("not a WebSocket handshake: {why}"));
        if parts.method != Method::GET {
            return Err(refuse("the method must be GET"));
        }
        if !header_has_token(&parts.headers, CONNECTION, "upgrade") {
            return Err(refuse("Connection must include `upgrade`"));
        }
        if !header_has_token(&parts.headers, UPGRADE, "websocket") {
            return Err(refuse("Upgrade must be `websocket`"));
        }
        if parts
            .headers
            .get("sec-websocket-version")
            .is_none_or(|v| v.as_bytes() != b"13")
        {
            return Err(refuse("Sec-WebSocket-Version must be 13"));
        }
        let Some(key) = parts
            .headers
            .get(SEC_WEBSOCKET_KEY)
            .filter(|key| valid_key(key.as_bytes()))
        else {
            return Err(refuse("Sec-WebSocket-Key must be 16 bytes in base64"));
        };
        let accept = tungstenite::handshake::derive_accept_key(key.as_bytes());
        // Base64, so always a valid header value.
        let accept = HeaderValue::from_str(&accept).map_err(|_| refuse("bad key"))?;
        let on_upgrade = parts
            .extensions
            .remove::<OnUpgrade>()
            .ok_or_else(|| refuse("this connection cannot be upgraded"))?;
        Ok(Self { accept, on_upgrade })
    }
}

impl Handshake {
    /// The 101 answer, and the future that yields the connection once hyper
    /// has sent it.
    pub fn accept(self) -> (Response, OnUpgrade) {
        let response = (
            StatusCode::SWITCHING_PROTOCOLS,
            [
                (CONNECTION, HeaderValue::from_static("upgrade")),
                (UPGRADE, HeaderValue::from_static("websocket")),
                (SEC_WEBSOCKET_ACCEPT, self.accept),
            ],
        )
            .into_response();
        (response, self.on_upgrade)
    }
}

/// The upgraded connection's transport (its TCP stream, with the TLS
/// connection when it has one) and the bytes hyper read past the request.
/// `None` when it is neither (the accept loop always gives hyper one of the
/// two, so this is a bug if it happens).
pub async fn take_stream(on_upgrade: OnUpgrade) -> Option<(Transport, Bytes)> {
    let upgraded = on_upgrade.await.ok()?;
    let upgraded = match upgraded.downcast::<TokioIo<TcpStream>>() {
        Ok(parts) => return Some((Transport::Plain(parts.io.into_inner()), parts.read_buf)),
        Err(upgraded) => upgraded,
    };
    let parts = upgraded
        .downcast::<TokioIo<tokio_rustls::server::TlsStream<TcpStream>>>()
        .ok()?;
    let (tcp, conn) = parts.io.into_inner().into_inner();
    Some((Transport::tls(tcp, conn), parts.read_buf))
}

/// Whether a comma-separated header holds `token`, ignoring case.
fn header_has_token(headers: &HeaderMap, name: axum::http::HeaderName, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// RFC 6455 section 4.2.1: the key is 16 random bytes in base64, which is
/// 24 characters ending in `==`.
fn valid_key(key: &[u8]) -> bool {
    key.len() == 24
        && key.ends_with(b"==")
        && key[..22]
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || *b == b'+' || *b == b'/')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_must_be_sixteen_bytes_of_base64() {
        assert!(valid_key(b"dGhlIHNhbXBsZSBub25jZQ=="));
        assert!(!valid_key(b"dGhlIHNhbXBsZSBub25jZQ"));
        assert!(!valid_key(b"not-base64!"));
        assert!(!valid_key(b"dGhlIHNhbXBsZSBub25j!Q=="));
    }

    #[test]
    fn connection_tokens_are_matched_in_lists() {
        let mut headers = HeaderMap::new();
        headers.insert(CONNECTION, HeaderValue::from_static("keep-alive, Upgrade"));
        assert!(header_has_token(&headers, CONNECTION, "upgrade"));
        assert!(!header_has_token(&headers, UPGRADE, "websocket"));
    }
}
