//! `GET /status` and its report stream (`GET /status/events`), read by a real
//! HTTP client from a real cluster: every node's report reaches the stream of
//! any node, with live connection counts, and the stream needs the API key.
//! The page itself is driven in a real browser by `tests/browser`.

use imhost_tests::api::API_KEY;
use imhost_tests::cluster::Cluster;
use imhost_tests::redis::RedisServer;
use imhost_tests::sse::EventStream;
use serde_json::Value;

/// Reads `cluster` events from `stream` until `check` accepts one.
async fn until_report(stream: &mut EventStream, mut check: impl FnMut(&Value) -> bool) -> Value {
    loop {
        let event = stream.expect().await;
        assert_eq!(event.event, "cluster", "{event:?}");
        let report: Value = serde_json::from_str(&event.data).expect("report JSON");
        if check(&report) {
            return report;
        }
    }
}

fn node<'a>(report: &'a Value, server: &str) -> Option<&'a Value> {
    report["nodes"]
        .as_array()?
        .iter()
        .find(|n| n["server"] == server)
}

#[tokio::test]
async fn every_nodes_report_reaches_the_stream_of_any_node() {
    let redis = RedisServer::start().await;
    let cluster = Cluster::start(&redis, 2).await;
    let (a, b) = (cluster.node(0), cluster.node(1));
    let url = a.url("/status/events");
    let mut stream = EventStream::open(&a.http, &url, API_KEY).await;

    // A terminal on node b shows in node a's stream.
    let client = cluster.client_on(1, 500);
    let _terminal = b.terminal(client).await;
    let report = until_report(&mut stream, |r| {
        node(r, &cluster.servers[1]).is_some_and(|n| n["connections"] == 1)
    })
    .await;
    assert_eq!(report["me"], cluster.servers[0]);
    assert_eq!(report["servers"].as_array().map(Vec::len), Some(2));
    let a_report = node(&report, &cluster.servers[0]).expect("node a reports");
    assert_eq!(a_report["connections"], 0);
    for key in ["messages_per_s", "connects_per_s", "uptime_s", "at_ms"] {
        assert!(a_report[key].is_number(), "{key} in {a_report}");
    }
    assert!(a_report["plugins"].is_array() && a_report["swaps"].is_array());
}

#[tokio::test]
async fn the_stream_needs_the_api_key_and_the_page_holds_no_data() {
    let redis = RedisServer::start().await;
    let cluster = Cluster::start(&redis, 1).await;
    let api = cluster.node(0);
    let url = api.url("/status/events");
    let refused = api.http.get(&url).send().await.expect("request");
    assert_eq!(refused.status(), 401);
    let wrong = api
        .http
        .get(&url)
        .bearer_auth("not-the-key")
        .send()
        .await
        .expect("request");
    assert_eq!(wrong.status(), 401);

    // The page is served without the key, so it must carry none of the
    // node's data: there is a client, with metadata, in a channel, and
    // the page names none of them, nor the node, nor the key.
    let url = api.connect_url(987_654, Some("meta-7f3a")).await.url;
    let _terminal = imhost_tests::terminal::Terminal::connect(&url)
        .await
        .expect("connect");
    api.ok(
        "/channels/chan-5e1d/join",
        serde_json::json!({"client_ids": [987_654]}),
    )
    .await;
    imhost_tests::eventually("the client counted", || async {
        api.client(987_654).await.online.then_some(())
    })
    .await;
    let page = api.http.get(api.url("/status")).send().await.expect("page");
    assert_eq!(page.status(), 200);
    let html = page.text().await.expect("html");
    assert!(html.contains("API key") && html.contains("/status/events"));
    for secret in [
        API_KEY,
        "987654",
        "meta-7f3a",
        "chan-5e1d",
        cluster.servers[0].as_str(),
    ] {
        assert!(!html.contains(secret), "the page holds {secret}");
    }
}
