//! Limits that keep a node bounded whatever a terminal does: huge frames, slow
//! consumers, silent sockets.

use std::time::Duration;

use imhost::config::Options;
use imhost_tests::host::TestHost;
use imhost_tests::terminal::{Terminal, code};
use serde_json::json;

#[tokio::test]
async fn an_oversize_frame_closes_only_that_socket_with_1009() {
    let host = TestHost::start(Options {
        max_frame_bytes: Some(1024),
        ..Options::default()
    })
    .await;
    let mut big = host.terminal(1).await;
    let mut bystander = host.terminal(2).await;
    // Exactly the limit is fine.
    big.send_text("a".repeat(1024)).await.expect("send");
    big.send_text("b".repeat(1025)).await.expect("send");
    let (frame, _) = big.closed().await;
    assert_eq!(code(&frame), Some(1009));
    let stats = host.stats().await;
    assert_eq!(stats.oversize_closed, 1);
    assert_eq!(stats.inbound_ignored, 1, "the frame at the limit was read");
    host.send(0, &[2], json!("fine"), false).await;
    assert_eq!(bystander.next_text().await, r#""fine""#);
}

#[tokio::test]
async fn a_slow_consumer_is_cut_off_while_others_keep_receiving() {
    // One delivery shard: the reading terminal shares the stalled one's.
    let host = TestHost::start(Options {
        outbound_queue: Some(8),
        delivery_shards: Some(1),
        ..Options::default()
    })
    .await;
    // The stalled terminal never reads, and its tiny receive window backs the
    // stream up into the node quickly.
    let url = host.connect_url(1, None).await.url;
    let mut stalled = Terminal::connect_small_window(&url).await.expect("connect");
    imhost_tests::eventually("stalled counted", || async {
        host.client(1).await.online.then_some(())
    })
    .await;
    let mut reader = host.terminal(2).await;
    let reading = tokio::spawn(async move {
        let mut seen = Vec::new();
        loop {
            let text = reader.next_text().await;
            if text == r#""end""# {
                return seen;
            }
            seen.push(text);
        }
    });

    let payload = "x".repeat(16 * 1024);
    let mut sent = 0;
    for n in 0..2000 {
        host.send(0, &[1, 2], json!({"n": n, "p": payload}), false)
            .await;
        sent += 1;
        if n % 10 == 9 && host.stats().await.slow_consumers_closed >= 1 {
            break;
        }
    }
    assert_eq!(
        host.stats().await.slow_consumers_closed,
        1,
        "cut off within {sent} messages"
    );
    host.send(0, &[2], json!("end"), false).await;

    let seen = tokio::time::timeout(imhost_tests::DEADLINE, reading)
        .await
        .expect("reader finished")
        .expect("reader task");
    assert_eq!(seen.len(), sent, "the reading client got every message");
    for (n, text) in seen.iter().enumerate() {
        let value: serde_json::Value = serde_json::from_str(text).expect("json");
        assert_eq!(value["n"], n, "in order");
    }
    // Reading again (within the node's drain bound), the stalled terminal
    // gets what was already on its way, then the 1013 close: the node sends
    // it once the socket drains.
    let (frame, _) = stalled.closed().await;
    assert_eq!(code(&frame), Some(1013));
    imhost_tests::eventually("stalled client offline", || async {
        (!host.client(1).await.online).then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_silent_socket_is_closed_and_counted_offline() {
    let host = TestHost::start(Options {
        heartbeat_interval: Some(Duration::from_millis(100)),
        heartbeat_timeout: Some(Duration::from_millis(400)),
        ..Options::default()
    })
    .await;
    // tungstenite answers pings only while it is read: this terminal is never
    // read until the end, so it never answers.
    let mut silent = host.terminal(1).await;
    // This one is read all along, so it answers and stays.
    let mut lively = host.terminal(2).await;
    let keep_reading = tokio::spawn(async move {
        let text = lively.next_text().await;
        (lively, text)
    });
    imhost_tests::eventually("silent socket closed", || async {
        (!host.client(1).await.online).then_some(())
    })
    .await;
    assert_eq!(host.stats().await.heartbeat_timeouts, 1);
    assert!(host.client(2).await.online, "the answering socket stays");
    host.send(0, &[2], json!("alive"), false).await;
    let (_lively, text) = keep_reading.await.expect("reader");
    assert_eq!(text, r#""alive""#);
    // The pongs it owes are written as it finally reads, into a socket the
    // node has dropped, so the close frame may or may not be seen.
    let (frame, _) = silent.closed().await;
    if let Some(c) = code(&frame) {
        assert_eq!(c, 1001);
    }
}

#[tokio::test]
async fn messages_at_the_body_limit_are_all_delivered_in_one_burst() {
    // Each message nearly fills the API body limit; a burst of them must
    // not overflow the socket's write buffer (a batch stops at the limit).
    let host = TestHost::start(Options {
        max_body_bytes: Some(64 * 1024),
        ..Options::default()
    })
    .await;
    let mut t = host.terminal(1).await;
    let mut sender = host.terminal(2).await;
    let big = "y".repeat(60 * 1024);
    for _ in 0..8 {
        host.send(2, &[1], json!(big), true).await;
    }
    for _ in 0..8 {
        assert_eq!(t.next_text().await.len(), big.len() + 2);
    }
    // The receipts embed each message as a JSON string, larger still.
    for _ in 0..8 {
        let receipt: serde_json::Value =
            serde_json::from_str(&sender.next_text().await).expect("receipt");
        assert_eq!(receipt["receipt"], "发送成功");
    }
}

#[tokio::test]
async fn an_inbound_reply_over_the_body_limit_is_dropped_and_counted() {
    let dir = imhost_tests::plugins::PluginDir::new();
    dir.install(
        "echo",
        imhost_tests::plugins::guests::ECHO_INBOUND,
        "memory_mb = 64\n",
    );
    let host = TestHost::start(Options {
        plugins: Some(dir.path().to_owned()),
        max_body_bytes: Some(64 * 1024),
        max_frame_bytes: Some(4 * 1024 * 1024),
        ..Options::default()
    })
    .await;
    let mut t = host.terminal(1).await;
    t.send_text(r#"{"repeat": 1000000}"#).await.expect("send");
    t.send_text("ping").await.expect("send");
    assert_eq!(t.next_text().await, r#""pong""#, "the socket lives on");
    assert_eq!(host.stats().await.oversize_replies, 1);
}
