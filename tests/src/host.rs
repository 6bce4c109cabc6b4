//! An imhost node running in this process, like mini-redis's `start_server`.

use std::net::SocketAddr;

use imhost::config::Options;
use imhost::stats::StatsSnapshot;
use imhost_client::ClientId;
use imhost_client::api::{ClientInfo, ConnectUrlResponse};
use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::terminal::Terminal;

/// The API key every test host uses.
pub const API_KEY: &str = "test-api-key-0123456789";

/// A running node; dropping it stops the node.
pub struct TestHost {
    pub addr: SocketAddr,
    pub http: reqwest::Client,
    stop: CancellationToken,
    task: Option<JoinHandle<anyhow::Result<()>>>,
}

impl TestHost {
    /// Starts a node with test defaults overridden by `options`.
    pub async fn start(options: Options) -> TestHost {
        let listener = imhost::server::bind("127.0.0.1:0".parse().expect("addr")).expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let defaults = Options {
            listen: Some(addr),
            api_key: Some(API_KEY.into()),
            ..Options::default()
        };
        let config = options.or(defaults).resolve().expect("test config");
        let stop = CancellationToken::new();
        let signal = stop.clone().cancelled_owned();
        let task = tokio::spawn(imhost::server::run(listener, config, signal));
        let host = TestHost {
            addr,
            http: reqwest::Client::new(),
            stop,
            task: Some(task),
        };
        crate::eventually("host serves /healthz", || async {
            let r = host.http.get(host.url("/healthz")).send().await.ok()?;
            (r.status() == StatusCode::OK).then_some(())
        })
        .await;
        host
    }

    /// A node with every default.
    pub async fn default() -> TestHost {
        Self::start(Options::default()).await
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// `POST /api/v1{path}` with the API key; returns status and JSON body.
    pub async fn post(&self, path: &str, body: Value) -> (StatusCode, Value) {
        let r = self
            .http
            .post(self.url(&format!("/api/v1{path}")))
            .bearer_auth(API_KEY)
            .json(&body)
            .send()
            .await
            .expect("request");
        let status = r.status();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    /// `GET /api/v1{path}` with the API key; returns status and JSON body.
    pub async fn get(&self, path: &str) -> (StatusCode, Value) {
        let r = self
            .http
            .get(self.url(&format!("/api/v1{path}")))
            .bearer_auth(API_KEY)
            .send()
            .await
            .expect("request");
        let status = r.status();
        (status, r.json().await.unwrap_or(Value::Null))
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

    /// Begins a graceful shutdown and returns what `server::run` returned.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        self.stop.cancel();
        let task = self.task.take().expect("running");
        tokio::time::timeout(crate::DEADLINE, task)
            .await
            .expect("node stopped in time")
            .expect("node task")
    }
}

impl Drop for TestHost {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}
