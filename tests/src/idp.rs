//! An identity provider and a backend on loopback, as the plugin HTTP tests
//! need them: a JWKS endpoint whose keys rotate and whose lifetime is set by
//! the test, an RFC 7662 introspection endpoint, a webhook receiver that can
//! fail on purpose, and the hostile answers (redirects, huge and slow
//! bodies, errors) the host must cut or refuse. Everything it answers is
//! counted, so a test can say how many requests really arrived.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use bytes::Bytes;
use serde_json::{Value, json};

/// How the JWKS and introspection endpoints behave.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Up,
    /// Answers 503.
    Down,
    /// Answers after a minute (the host must give up long before).
    Hanging,
}

#[derive(Default)]
pub struct Counters {
    pub jwks_fetches: AtomicU64,
    pub introspections: AtomicU64,
    pub webhook_attempts: AtomicU64,
    pub other: AtomicU64,
}

struct IdpState {
    jwks: Mutex<Value>,
    max_age: AtomicU64,
    mode: Mutex<Mode>,
    /// Introspection answers by token; unknown tokens are inactive.
    tokens: Mutex<HashMap<String, Value>>,
    /// Webhook requests received and accepted: headers and body.
    webhooks: Mutex<Vec<(HeaderMap, Bytes)>>,
    /// The next this many webhook requests answer 503.
    webhook_failures: AtomicU64,
    counters: Counters,
}

/// A running provider; dropping it stops it.
pub struct Idp {
    pub addr: SocketAddr,
    state: Arc<IdpState>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Idp {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Idp {
    pub async fn start() -> Idp {
        let state = Arc::new(IdpState {
            jwks: Mutex::new(json!({"keys": []})),
            max_age: AtomicU64::new(600),
            mode: Mutex::new(Mode::Up),
            tokens: Mutex::default(),
            webhooks: Mutex::default(),
            webhook_failures: AtomicU64::new(0),
            counters: Counters::default(),
        });
        let app = Router::new()
            .route("/jwks.json", get(jwks))
            .route("/introspect", post(introspect))
            .route("/webhook", post(webhook))
            .route("/redirect", get(redirect))
            .route("/bytes/{n}", get(sized))
            .route("/slow", get(slow))
            .route("/status/{code}", get(status))
            .route("/echo", get(echo).post(echo))
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind idp");
        let addr = listener.local_addr().expect("addr");
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Idp { addr, state, task }
    }

    /// `http://127.0.0.1:PORT` followed by `path`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn origin(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn set_jwks(&self, jwks: Value) {
        *self.state.jwks.lock().expect("jwks") = jwks;
    }

    /// The `max-age` the JWKS is served with.
    pub fn set_max_age(&self, secs: u64) {
        self.state.max_age.store(secs, Ordering::Relaxed);
    }

    pub fn set_mode(&self, mode: Mode) {
        *self.state.mode.lock().expect("mode") = mode;
    }

    /// What introspection answers for `token` (`active` and the claims).
    pub fn set_token(&self, token: &str, answer: Value) {
        self.state
            .tokens
            .lock()
            .expect("tokens")
            .insert(token.into(), answer);
    }

    pub fn fail_webhooks(&self, n: u64) {
        self.state.webhook_failures.store(n, Ordering::Relaxed);
    }

    /// Webhook requests accepted so far.
    pub fn webhooks(&self) -> Vec<(HeaderMap, Bytes)> {
        self.state.webhooks.lock().expect("webhooks").clone()
    }

    pub fn counters(&self) -> &Counters {
        &self.state.counters
    }

    pub fn jwks_fetches(&self) -> u64 {
        self.state.counters.jwks_fetches.load(Ordering::Relaxed)
    }
}

async fn jwks(State(state): State<Arc<IdpState>>) -> Response {
    state.counters.jwks_fetches.fetch_add(1, Ordering::Relaxed);
    let mode = *state.mode.lock().expect("mode");
    match mode {
        Mode::Down => return StatusCode::SERVICE_UNAVAILABLE.into_response(),
        Mode::Hanging => tokio::time::sleep(Duration::from_secs(60)).await,
        Mode::Up => {}
    }
    let body = state.jwks.lock().expect("jwks").to_string();
    let max_age = state.max_age.load(Ordering::Relaxed);
    (
        [
            (header::CONTENT_TYPE, "application/json".to_owned()),
            (header::CACHE_CONTROL, format!("public, max-age={max_age}")),
        ],
        body,
    )
        .into_response()
}

async fn introspect(
    State(state): State<Arc<IdpState>>,
    headers: HeaderMap,
    body: String,
) -> Response {
    state
        .counters
        .introspections
        .fetch_add(1, Ordering::Relaxed);
    if *state.mode.lock().expect("mode") != Mode::Up {
        return StatusCode::SERVICE_UNAVAILABLE.into_response();
    }
    if headers.get(header::AUTHORIZATION).is_none() {
        return StatusCode::UNAUTHORIZED.into_response();
    }
    let token = body
        .split('&')
        .find_map(|pair| pair.strip_prefix("token="))
        .unwrap_or_default()
        .to_owned();
    let answer = state
        .tokens
        .lock()
        .expect("tokens")
        .get(&token)
        .cloned()
        .unwrap_or_else(|| json!({"active": false}));
    axum::Json(answer).into_response()
}

async fn webhook(
    State(state): State<Arc<IdpState>>,
    headers: HeaderMap,
    body: Bytes,
) -> StatusCode {
    state
        .counters
        .webhook_attempts
        .fetch_add(1, Ordering::Relaxed);
    let failing = state
        .webhook_failures
        .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
        .is_ok();
    if failing {
        return StatusCode::SERVICE_UNAVAILABLE;
    }
    state
        .webhooks
        .lock()
        .expect("webhooks")
        .push((headers, body));
    StatusCode::NO_CONTENT
}

async fn redirect(
    State(state): State<Arc<IdpState>>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    state.counters.other.fetch_add(1, Ordering::Relaxed);
    let to = q.get("to").cloned().unwrap_or_default();
    (StatusCode::FOUND, [(header::LOCATION, to)]).into_response()
}

async fn sized(State(state): State<Arc<IdpState>>, Path(n): Path<usize>) -> Vec<u8> {
    state.counters.other.fetch_add(1, Ordering::Relaxed);
    vec![b'x'; n]
}

async fn slow(State(state): State<Arc<IdpState>>) -> &'static str {
    state.counters.other.fetch_add(1, Ordering::Relaxed);
    tokio::time::sleep(Duration::from_secs(60)).await;
    "late"
}

async fn status(State(state): State<Arc<IdpState>>, Path(code): Path<u16>) -> StatusCode {
    state.counters.other.fetch_add(1, Ordering::Relaxed);
    StatusCode::from_u16(code).unwrap_or(StatusCode::BAD_REQUEST)
}

async fn echo(State(state): State<Arc<IdpState>>, headers: HeaderMap) -> axum::Json<Value> {
    state.counters.other.fetch_add(1, Ordering::Relaxed);
    let headers: serde_json::Map<String, Value> = headers
        .iter()
        .map(|(n, v)| (n.to_string(), json!(v.to_str().unwrap_or_default())))
        .collect();
    axum::Json(json!({"headers": headers}))
}
