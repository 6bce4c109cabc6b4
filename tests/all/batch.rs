//! `POST /api/v1/batch` (many sends, a result each) and the API over h2c.

use imhost::config::Options;
use imhost_tests::api::API_KEY;
use imhost_tests::host::TestHost;
use reqwest::StatusCode;
use serde_json::{Value, json};

#[tokio::test]
async fn a_batch_sends_every_kind_in_order_with_a_result_each() {
    let host = TestHost::default().await;
    let mut alice = host.terminal(1).await;
    let mut bob = host.terminal(2).await;
    host.ok("/channels/c/join", json!({"client_ids": [2]}))
        .await;
    let (status, answer) = host
        .post(
            "/batch",
            json!({"items": [
                {"messages": {"sender": 0, "receivers": [1, 2], "message": {"n": 1}}},
                {"channel_message": {"channel": "c", "message": {"n": 2}}},
                {"broadcast": {"message": {"n": 3}}},
                {"messages": {"sender": 1, "receivers": [2], "message": {"n": 4}, "receipt": true}},
            ]}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(answer, json!({"results": [{}, {}, {}, {}]}));
    assert_eq!(alice.next_json().await, json!({"n": 1}));
    assert_eq!(alice.next_json().await, json!({"n": 3}));
    assert_eq!(
        alice.next_json().await,
        json!({"content": "{\"n\":4}", "receipt": "发送成功"})
    );
    for n in 1..=4 {
        assert_eq!(bob.next_json().await, json!({ "n": n }));
    }
}

#[tokio::test]
async fn an_invalid_item_gets_its_own_error_and_the_others_still_go() {
    let host = TestHost::default().await;
    let mut bob = host.terminal(2).await;
    let (status, answer) = host
        .post(
            "/batch",
            json!({"items": [
                {"messages": {"sender": 0, "receivers": [2], "message": "first"}},
                {"no_such_call": {}},
                {"messages": {"sender": 0}},
                {"channel_message": {"channel": "", "message": 1}},
                {"messages": {"sender": 0, "receivers": [2], "message": "last"}},
            ]}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    let results = answer["results"].as_array().expect("results");
    assert_eq!(results.len(), 5, "{answer}");
    assert_eq!(results[0], json!({}));
    assert_eq!(results[4], json!({}));
    for (i, needle) in [(1, "no_such_call"), (2, "receivers"), (3, "channel name")] {
        assert_eq!(results[i]["error"]["code"], "bad_request", "{answer}");
        let message = results[i]["error"]["message"].as_str().expect("message");
        assert!(message.contains(needle), "item {i}: {message}");
    }
    assert_eq!(bob.next_text().await, r#""first""#);
    assert_eq!(bob.next_text().await, r#""last""#);
}

#[tokio::test]
async fn a_batch_over_its_bounds_is_refused_whole() {
    let host = TestHost::start(Options {
        max_batch_items: Some(3),
        max_body_bytes: Some(4096),
        ..Options::default()
    })
    .await;
    let mut bob = host.terminal(2).await;
    let item = json!({"messages": {"sender": 0, "receivers": [2], "message": "x"}});
    let (status, answer) = host
        .post("/batch", json!({"items": [item, item, item, item]}))
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{answer}");
    assert_eq!(answer["error"]["code"], "bad_request");
    assert!(
        answer["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("at most 3")),
        "{answer}"
    );
    let big = json!({"messages": {"sender": 0, "receivers": [2], "message": "y".repeat(5000)}});
    let (status, answer) = host.post("/batch", json!({"items": [big]})).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{answer}");
    let (status, answer) = host.post("/batch", json!({"things": []})).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{answer}");
    let (status, answer) = host.post("/batch", json!({"items": []})).await;
    assert_eq!((status, answer), (StatusCode::OK, json!({"results": []})));
    // None of the refused batches sent anything.
    host.send(0, &[2], json!("after"), false).await;
    assert_eq!(bob.next_text().await, r#""after""#);
}

#[tokio::test]
async fn the_api_speaks_h2c_on_the_same_port() {
    let host = TestHost::default().await;
    let mut bob = host.terminal(2).await;
    let h2 = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .expect("client");
    // Many requests at once on the one connection.
    let mut sends = tokio::task::JoinSet::new();
    for n in 0..20 {
        let (h2, url) = (h2.clone(), host.url("/api/v1/batch"));
        sends.spawn(async move {
            let response = h2
                .post(url)
                .bearer_auth(API_KEY)
                .json(&json!({"items": [
                    {"messages": {"sender": 0, "receivers": [2], "message": {"n": n}}}
                ]}))
                .send()
                .await
                .expect("h2c request");
            assert_eq!(response.version(), reqwest::Version::HTTP_2);
            assert_eq!(response.status(), StatusCode::OK);
            let body: Value = response.json().await.expect("json");
            assert_eq!(body, json!({"results": [{}]}));
        });
    }
    while let Some(done) = sends.join_next().await {
        done.expect("send");
    }
    let mut seen: Vec<u64> = Vec::new();
    for _ in 0..20 {
        seen.push(bob.next_json().await["n"].as_u64().expect("n"));
    }
    seen.sort_unstable();
    assert_eq!(seen, (0..20).collect::<Vec<_>>());
    // The same port still serves HTTP/1.1 and its errors over h2c.
    let response = h2
        .get(host.url("/api/v1/online"))
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    host.send(0, &[2], json!("http/1.1"), false).await;
    assert_eq!(bob.next_text().await, r#""http/1.1""#);
}

/// `imhost-client`'s API client over both protocols: single sends, a batch
/// with a bad item, and the node's error body mapped.
#[tokio::test]
async fn the_rust_client_sends_over_http1_and_h2c_and_batches() {
    use imhost_client::api::{BatchChannelMessage, BatchItem, SendMessageRequest};
    use imhost_client::http::{ApiClient, Protocol};

    let host = TestHost::default().await;
    let mut bob = host.terminal(2).await;
    for (n, protocol) in [Protocol::Http1, Protocol::H2c].into_iter().enumerate() {
        let client = ApiClient::new(&host.url(""), API_KEY, protocol).expect("client");
        client.join("room", vec![2]).await.expect("join");
        client
            .send_message(&SendMessageRequest {
                sender: 0,
                receivers: vec![2],
                message: json!({"single": n}),
                receipt: false,
            })
            .await
            .expect("send");
        let results = client
            .batch(vec![
                BatchItem::ChannelMessage(BatchChannelMessage {
                    channel: "room".into(),
                    sender: 0,
                    message: json!({"batched": n}),
                }),
                BatchItem::ChannelMessage(BatchChannelMessage {
                    channel: String::new(),
                    sender: 0,
                    message: json!("never"),
                }),
            ])
            .await
            .expect("batch");
        assert!(results[0].is_ok(), "{results:?}");
        assert_eq!(
            results[1].as_ref().map_err(|e| e.code.as_str()),
            Err("bad_request")
        );
        assert_eq!(bob.next_json().await, json!({ "single": n }));
        assert_eq!(bob.next_json().await, json!({ "batched": n }));
        let info = client.client(2).await.expect("client info");
        assert_eq!(info.channels, vec!["room".to_string()]);
    }
    let wrong =
        ApiClient::new(&host.url(""), "wrong-key-0123456789", Protocol::H2c).expect("client");
    let err = wrong.online().await.expect_err("401");
    assert!(
        matches!(&err, imhost_client::http::ApiError::Status { status: 401, error, .. } if error.code == "unauthorized"),
        "{err}"
    );
    assert!(!err.is_overloaded());
}
