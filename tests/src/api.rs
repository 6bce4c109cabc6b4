//! The business API of one node, as a backend calls it, with assertions.

use std::net::SocketAddr;

use imhost::stats::StatsSnapshot;
use imhost_client::ClientId;
use imhost_client::api::{ClientInfo, ConnectUrlResponse};
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::terminal::Terminal;

/// The API key every test node uses.
pub const API_KEY: &str = "test-api-key-0123456789";

/// HTTP access to one node.
#[derive(Clone)]
pub struct Api {
    pub addr: SocketAddr,
    pub http: reqwest::Client,
}

impl Api {
    pub fn new(addr: SocketAddr) -> Api {
        Api {
            addr,
            // Every call has a deadline: a node that stops answering fails
            // the test instead of hanging it. The longest a call may
            // rightly take is a reload that compiles a plugin.
            http: reqwest::Client::builder()
                .timeout(crate::COMPILE_DEADLINE)
                .build()
                .expect("HTTP client"),
        }
    }

    /// Waits until the node answers `/healthz`.
    pub async fn wait_serving(&self) {
        crate::eventually("node serves /healthz", || async {
            let r = self.http.get(self.url("/healthz")).send().await.ok()?;
            (r.status() == StatusCode::OK).then_some(())
        })
        .await;
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// `method /api/v1{path}` with the API key; `Err` when the node cannot
    /// be reached (it may be down in failure tests).
    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> reqwest::Result<(StatusCode, Value)> {
        let mut request = self
            .http
            .request(method, self.url(&format!("/api/v1{path}")))
            .bearer_auth(API_KEY);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await?;
        let status = response.status();
        Ok((status, response.json().await.unwrap_or(Value::Null)))
    }

    /// `POST /api/v1{path}` with the API key; returns status and JSON body.
    pub async fn post(&self, path: &str, body: Value) -> (StatusCode, Value) {
        self.call(reqwest::Method::POST, path, Some(body))
            .await
            .expect("request")
    }

    /// `GET /api/v1{path}` with the API key; returns status and JSON body.
    pub async fn get(&self, path: &str) -> (StatusCode, Value) {
        self.call(reqwest::Method::GET, path, None)
            .await
            .expect("request")
    }

    /// `POST` that tolerates a refused connection (status 0).
    pub async fn post_raw(&self, path: &str, body: Value) -> (u16, Value) {
        self.call(reqwest::Method::POST, path, Some(body))
            .await
            .map_or((0, Value::Null), |(s, v)| (s.as_u16(), v))
    }

    /// `GET` that tolerates a refused connection (status 0).
    pub async fn get_raw(&self, path: &str) -> (u16, Value) {
        self.call(reqwest::Method::GET, path, None)
            .await
            .map_or((0, Value::Null), |(s, v)| (s.as_u16(), v))
    }

    /// The node's event stream (`GET /api/v1/events`).
    pub async fn events(&self) -> crate::sse::EventStream {
        crate::sse::EventStream::open(&self.http, &self.url("/api/v1/events"), API_KEY).await
    }

    /// POSTs and asserts 200 `{}`.
    pub async fn ok(&self, path: &str, body: Value) {
        let (status, answer) = self.post(path, body).await;
        assert_eq!(status, StatusCode::OK, "POST {path}: {answer}");
        assert_eq!(answer, json!({}), "POST {path}");
    }

    /// A connect URL for `client`.
    pub async fn connect_url(
        &self,
        client: ClientId,
        metadata: Option<&str>,
    ) -> ConnectUrlResponse {
        let (status, body) = self
            .post(
                "/connect-url",
                json!({"client_id": client, "metadata": metadata}),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        serde_json::from_value(body).expect("connect-url answer")
    }

    /// A connected terminal for `client`, once the node counts it online.
    pub async fn terminal(&self, client: ClientId) -> Terminal {
        let before = self.client(client).await.connections;
        let url = self.connect_url(client, None).await.url;
        let terminal = Terminal::connect(&url).await.expect("connect");
        crate::eventually("socket counted", || async {
            (self.client(client).await.connections > before).then_some(())
        })
        .await;
        terminal
    }

    pub async fn client(&self, client: ClientId) -> ClientInfo {
        let (status, body) = self.get(&format!("/clients/{client}")).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        serde_json::from_value(body).expect("client info")
    }

    pub async fn stats(&self) -> StatsSnapshot {
        let (status, body) = self.get("/stats").await;
        assert_eq!(status, StatusCode::OK, "{body}");
        serde_json::from_value(body).expect("stats")
    }

    /// Sends `message` from `sender` to `receivers`.
    pub async fn send(
        &self,
        sender: ClientId,
        receivers: &[ClientId],
        message: Value,
        receipt: bool,
    ) {
        self.ok(
            "/messages",
            json!({"sender": sender, "receivers": receivers, "message": message, "receipt": receipt}),
        )
        .await;
    }
}
