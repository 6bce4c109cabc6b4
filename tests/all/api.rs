//! The business API's edges: authentication, bad bodies, error shape.

use imhost::config::Options;
use imhost_tests::host::{API_KEY, TestHost};
use reqwest::StatusCode;
use serde_json::{Value, json};

fn assert_error(body: &Value, code: &str) {
    assert_eq!(body["error"]["code"], code, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "{body}"
    );
}

#[tokio::test]
async fn every_api_call_needs_the_key() {
    let host = TestHost::default().await;
    let calls = [
        ("POST", "/connect-url"),
        ("POST", "/messages"),
        ("POST", "/channels/a/join"),
        ("POST", "/channels/a/leave"),
        ("POST", "/channels/a/messages"),
        ("POST", "/broadcast"),
        ("GET", "/channels"),
        ("GET", "/channels/a/members"),
        ("GET", "/clients/1"),
        ("GET", "/online"),
        ("POST", "/clients/1/force-offline"),
        ("GET", "/events"),
        ("GET", "/stats"),
    ];
    for (method, path) in calls {
        for key in [
            None,
            Some("wrong-key-0123456789"),
            Some(&API_KEY[..API_KEY.len() - 1]),
        ] {
            let url = host.url(&format!("/api/v1{path}"));
            let mut request = match method {
                "GET" => host.http.get(url),
                _ => host.http.post(url).json(&json!({})),
            };
            if let Some(key) = key {
                request = request.bearer_auth(key);
            }
            let response = request.send().await.expect("request");
            assert_eq!(
                response.status(),
                StatusCode::UNAUTHORIZED,
                "{method} {path} with {key:?}"
            );
            let body: Value = response.json().await.expect("json error body");
            assert_error(&body, "unauthorized");
        }
    }
    // Health needs no key.
    let health = host
        .http
        .get(host.url("/healthz"))
        .send()
        .await
        .expect("healthz");
    assert_eq!(health.status(), StatusCode::OK);
}

#[tokio::test]
async fn bad_bodies_are_400_with_the_error_body() {
    let host = TestHost::default().await;
    let cases = [
        (
            "/messages",
            json!({"sender": 1, "receivers": "2", "message": 1}),
        ),
        (
            "/messages",
            json!({"sender": "x", "receivers": [2], "message": 1}),
        ),
        ("/messages", json!({"receivers": [2], "message": 1})),
        (
            "/messages",
            json!({"sender": 1, "receivers": [2], "message": 1, "extra": true}),
        ),
        ("/connect-url", json!({"client_id": 1.5})),
        ("/channels/a/join", json!({"client_ids": [1, "b"]})),
        ("/broadcast", json!({})),
    ];
    for (path, body) in cases {
        let (status, answer) = host.post(path, body.clone()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{path} {body}: {answer}");
        assert_error(&answer, "bad_request");
    }

    // Not JSON at all, and JSON with the wrong content type.
    for (content_type, body) in [("application/json", "{not json"), ("text/plain", "{}")] {
        let response = host
            .http
            .post(host.url("/api/v1/messages"))
            .bearer_auth(API_KEY)
            .header("content-type", content_type)
            .body(body)
            .send()
            .await
            .expect("request");
        let status = response.status();
        assert!(status.is_client_error(), "{content_type}: {status}");
        assert_error(&response.json().await.expect("json"), "bad_request");
    }

    // A client id that is not a number.
    let (status, answer) = host.get("/clients/abc").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_error(&answer, "bad_request");

    // Unknown route.
    let (status, answer) = host.get("/nope").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_error(&answer, "not_found");
}

#[tokio::test]
async fn bodies_over_the_limit_are_413() {
    let host = TestHost::start(Options {
        max_body_bytes: Some(4096),
        ..Options::default()
    })
    .await;
    let big = "x".repeat(8192);
    let (status, answer) = host.post("/broadcast", json!({"message": big})).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{answer}");
    assert_error(&answer, "payload_too_large");
    // The node still serves.
    host.ok("/broadcast", json!({"message": "small"})).await;
}

#[tokio::test]
async fn connect_url_points_at_the_node() {
    let host = TestHost::default().await;
    let answer = host.connect_url(7, Some("meta")).await;
    assert_eq!(answer.server, host.addr.to_string());
    let prefix = format!("ws://{}/ws?token=", host.addr);
    let token = answer.url.strip_prefix(&prefix).expect("url shape");
    assert_eq!(token.len(), 128);
    assert!(token.bytes().all(|b| b.is_ascii_hexdigit()));
}
