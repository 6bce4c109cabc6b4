//! FreeIM's delivery rules: direct messages, receipts, the echo rule, channels,
//! broadcast, force-offline.

use imhost_tests::host::TestHost;
use imhost_tests::terminal::code;
use serde_json::json;

#[tokio::test]
async fn a_message_arrives_as_compact_json_text() {
    let host = TestHost::default().await;
    let mut bob = host.terminal(2).await;
    let message = json!({"z": 1, "a": "你好 🌏", "nested": {"b": [1, 2.5, null], "a": true}});
    host.send(1, &[2], message, false).await;
    // Keys keep the caller's order, non-ASCII stays UTF-8, no whitespace.
    assert_eq!(
        bob.next_text().await,
        r#"{"z":1,"a":"你好 🌏","nested":{"b":[1,2.5,null],"a":true}}"#
    );
    // A bare string message is its JSON text, quotes included, as in FreeIM.
    host.send(1, &[2], json!("hi"), false).await;
    assert_eq!(bob.next_text().await, r#""hi""#);
}

#[tokio::test]
async fn receivers_are_deduplicated_and_every_device_gets_a_copy() {
    let host = TestHost::default().await;
    let mut phone = host.terminal(2).await;
    let mut laptop = host.terminal(2).await;
    let mut carol = host.terminal(3).await;
    host.send(0, &[2, 3, 2], json!({"n": 1}), false).await;
    host.send(0, &[2, 3], json!({"n": 2}), false).await;
    for t in [&mut phone, &mut laptop, &mut carol] {
        assert_eq!(t.next_text().await, r#"{"n":1}"#);
        assert_eq!(t.next_text().await, r#"{"n":2}"#, "no duplicate of n=1");
    }
}

#[tokio::test]
async fn receipts_say_delivered_or_offline() {
    let host = TestHost::default().await;
    let mut alice = host.terminal(1).await;
    let mut bob = host.terminal(2).await;

    host.send(1, &[2], json!({"t": "你好"}), true).await;
    assert_eq!(bob.next_text().await, r#"{"t":"你好"}"#);
    assert_eq!(
        alice.next_json().await,
        json!({"content": "{\"t\":\"你好\"}", "receipt": "发送成功"})
    );

    // Receiver 9 is not connected.
    host.send(1, &[9], json!({"t": "x"}), true).await;
    assert_eq!(
        alice.next_json().await,
        json!({"content": "{\"t\":\"x\"}", "receipt": "用户不在线"})
    );

    // No receipt without asking, nor for the system sender 0; then a marker
    // proves nothing else was queued before it.
    host.send(1, &[2], json!("plain"), false).await;
    host.send(0, &[9], json!("system"), true).await;
    host.send(0, &[1], json!("marker"), false).await;
    assert_eq!(alice.next_text().await, r#""marker""#);
    assert_eq!(bob.next_text().await, r#""plain""#);
}

#[tokio::test]
async fn echo_reaches_only_a_senders_other_devices() {
    let host = TestHost::default().await;
    let mut first = host.terminal(1).await;
    // One device: a message to oneself is skipped (and asks no receipt).
    host.send(1, &[1], json!("self"), true).await;
    host.send(0, &[1], json!("marker"), false).await;
    assert_eq!(first.next_text().await, r#""marker""#);

    // Two devices: both get it (the node cannot tell which device sent).
    let mut second = host.terminal(1).await;
    host.send(1, &[1], json!("self2"), true).await;
    assert_eq!(first.next_text().await, r#""self2""#);
    assert_eq!(second.next_text().await, r#""self2""#);
    host.send(0, &[1], json!("marker2"), false).await;
    assert_eq!(
        first.next_text().await,
        r#""marker2""#,
        "no receipt to oneself"
    );
}

#[tokio::test]
async fn channels_count_members_and_deliver_to_them() {
    let host = TestHost::default().await;
    let mut a = host.terminal(1).await;
    let mut b = host.terminal(2).await;
    let mut c = host.terminal(3).await;

    host.ok("/channels/room/join", json!({"client_ids": [1, 2]}))
        .await;
    host.ok("/channels/room/join", json!({"client_ids": [2]}))
        .await; // idempotent
    host.ok("/channels/other/join", json!({"client_ids": [3]}))
        .await;

    let (_, list) = host.get("/channels").await;
    assert_eq!(
        list,
        json!([{"channel": "other", "online": 1}, {"channel": "room", "online": 2}])
    );
    let (_, members) = host.get("/channels/room/members").await;
    assert_eq!(members, json!([1, 2]));
    assert_eq!(host.client(2).await.channels, vec!["room".to_owned()]);

    // The sender (1, one device) is skipped by the echo rule; 3 is not a member.
    host.ok(
        "/channels/room/messages",
        json!({"sender": 1, "message": {"m": "hi room"}}),
    )
    .await;
    assert_eq!(b.next_text().await, r#"{"m":"hi room"}"#);
    host.send(0, &[1, 3], json!("marker"), false).await;
    assert_eq!(a.next_text().await, r#""marker""#);
    assert_eq!(c.next_text().await, r#""marker""#);

    host.ok("/channels/room/leave", json!({"client_ids": [2]}))
        .await;
    host.ok("/channels/room/leave", json!({"client_ids": [2]}))
        .await; // idempotent
    let (_, members) = host.get("/channels/room/members").await;
    assert_eq!(members, json!([1]));

    // The last member leaving removes the channel from the list.
    host.ok("/channels/other/leave", json!({"client_ids": [3]}))
        .await;
    let (_, list) = host.get("/channels").await;
    assert_eq!(list, json!([{"channel": "room", "online": 1}]));
}

#[tokio::test]
async fn a_client_leaves_channels_when_its_last_device_goes() {
    let host = TestHost::default().await;
    let phone = host.terminal(1).await;
    let laptop = host.terminal(1).await;
    host.ok("/channels/room/join", json!({"client_ids": [1]}))
        .await;

    drop(phone);
    imhost_tests::eventually("one device left", || async {
        (host.client(1).await.connections == 1).then_some(())
    })
    .await;
    assert_eq!(
        host.client(1).await.channels,
        vec!["room".to_owned()],
        "still a member"
    );

    drop(laptop);
    imhost_tests::eventually("last device gone", || async {
        let info = host.client(1).await;
        (!info.online && info.channels.is_empty()).then_some(())
    })
    .await;
    let (_, members) = host.get("/channels/room/members").await;
    assert_eq!(members, json!([]));
}

#[tokio::test]
async fn broadcast_reaches_every_client() {
    let host = TestHost::default().await;
    let mut terminals = Vec::new();
    for id in 1..=5 {
        terminals.push(host.terminal(id).await);
    }
    terminals.push(host.terminal(5).await);
    host.ok("/broadcast", json!({"message": {"notice": "全体"}}))
        .await;
    for t in &mut terminals {
        assert_eq!(t.next_text().await, r#"{"notice":"全体"}"#);
    }
}

#[tokio::test]
async fn force_offline_closes_every_socket_of_that_client_only() {
    let host = TestHost::default().await;
    let mut phone = host.terminal(1).await;
    let mut laptop = host.terminal(1).await;
    let mut other = host.terminal(2).await;

    host.ok("/clients/1/force-offline", json!({})).await;
    for t in [&mut phone, &mut laptop] {
        let (frame, _) = t.closed().await;
        assert_eq!(code(&frame), Some(1008));
    }
    imhost_tests::eventually("client 1 offline", || async {
        (!host.client(1).await.online).then_some(())
    })
    .await;
    assert_eq!(host.stats().await.forced_offline, 2);
    host.send(0, &[2], json!("still here"), false).await;
    assert_eq!(other.next_text().await, r#""still here""#);
    // Force-offline of a client that is not connected is fine.
    host.ok("/clients/42/force-offline", json!({})).await;
}

#[tokio::test]
async fn terminal_frames_are_ignored() {
    let host = TestHost::default().await;
    let mut t = host.terminal(1).await;
    t.send_text("anything").await.expect("send");
    imhost_tests::eventually("frame counted", || async {
        (host.stats().await.inbound_ignored == 1).then_some(())
    })
    .await;
    host.send(0, &[1], json!("after"), false).await;
    assert_eq!(t.next_text().await, r#""after""#);
}

#[tokio::test]
async fn a_message_sent_the_moment_a_connect_succeeds_is_delivered() {
    // The socket is registered before its 101 goes out: a message the
    // backend sends as soon as the terminal is connected must not miss a
    // registration still on its way. Many connects, to meet the race.
    let host = TestHost::default().await;
    for client in 1..=40 {
        let mut t = host.terminal(client).await;
        host.send(0, &[client], json!({"to": client}), false).await;
        assert_eq!(t.next_json().await, json!({"to": client}));
    }
}
