//! Connecting: single-use tokens, expiry, refusals before the upgrade, capacity.

use std::time::Duration;

use imhost::config::Options;
use imhost_tests::host::TestHost;
use imhost_tests::terminal::Terminal;
use tokio_tungstenite::tungstenite::Error;

fn refused_status(result: Result<Terminal, Error>) -> u16 {
    match result {
        Err(Error::Http(response)) => response.status().as_u16(),
        Err(other) => panic!("expected an HTTP refusal, got {other}"),
        Ok(_) => panic!("expected a refusal, the socket opened"),
    }
}

#[tokio::test]
async fn a_token_connects_once() {
    let host = TestHost::default().await;
    let url = host.connect_url(1, None).await.url;
    let _first = Terminal::connect(&url).await.expect("first use connects");
    assert_eq!(refused_status(Terminal::connect(&url).await), 401);
    assert_eq!(host.stats().await.connects_refused, 1);
}

#[tokio::test]
async fn a_token_expires() {
    let host = TestHost::start(Options {
        token_ttl: Some(Duration::from_millis(300)),
        ..Options::default()
    })
    .await;
    let url = host.connect_url(1, None).await.url;
    // Time itself is what is under test: let the TTL pass on the shared
    // monotonic clock, then the token must be refused.
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(refused_status(Terminal::connect(&url).await), 401);
    // A fresh token still works.
    let url = host.connect_url(1, None).await.url;
    Terminal::connect(&url).await.expect("fresh token connects");
}

#[tokio::test]
async fn unknown_and_malformed_tokens_are_refused() {
    let host = TestHost::default().await;
    let base = format!("ws://{}/ws", host.addr);
    for url in [
        base.clone(),
        format!("{base}?token="),
        format!("{base}?token=abc"),
        format!("{base}?token={}", "0".repeat(128)),
        format!("{base}?token={}", "z".repeat(128)),
    ] {
        assert_eq!(refused_status(Terminal::connect(&url).await), 401, "{url}");
    }
    assert_eq!(host.client(0).await.connections, 0);
}

#[tokio::test]
async fn a_full_node_answers_503_and_keeps_the_token() {
    let host = TestHost::start(Options {
        max_connections: Some(1),
        ..Options::default()
    })
    .await;
    let first = host.terminal(1).await;
    let url = host.connect_url(2, None).await.url;
    assert_eq!(refused_status(Terminal::connect(&url).await), 503);
    assert_eq!(host.stats().await.connects_over_capacity, 1);
    // Once a slot frees, the same token still works: capacity is checked first.
    drop(first);
    imhost_tests::eventually("slot freed", || async {
        (host.stats().await.connections == 0).then_some(())
    })
    .await;
    Terminal::connect(&url)
        .await
        .expect("token survived the 503");
}

#[tokio::test]
async fn one_client_holds_several_devices() {
    let host = TestHost::default().await;
    let _a = host.terminal(5).await;
    let b = host.terminal(5).await;
    let info = host.client(5).await;
    assert!(info.online);
    assert_eq!(info.connections, 2);
    let (_, online) = host.get("/online").await;
    assert_eq!(online, serde_json::json!([5]));
    drop(b);
    imhost_tests::eventually("one device left", || async {
        (host.client(5).await.connections == 1).then_some(())
    })
    .await;
}
