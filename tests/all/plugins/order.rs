//! Filters on every core, deliveries in order.

use super::*;

#[tokio::test]
async fn filter_calls_run_side_by_side_and_terminals_still_get_messages_in_order() {
    // Every other message makes the filter busy for 20 ms: with four warm
    // instances, calls overlap, and fast ones finish before slow ones that
    // arrived earlier. Terminals must still see arrival order.
    let dir = PluginDir::new();
    dir.install(
        "tagger",
        guests::TAGGER,
        "pool = 4\n[settings]\nversion = 1\ndelay_ms = 20\n",
    );
    let host = host_with(&dir).await;
    host.plugin_where("tagger", "loaded", |p| p["state"] == "active")
        .await;
    let mut a = host.terminal(1).await;
    let mut b = host.terminal(2).await;
    let total = 40;
    let sends = (0..total).map(|n| {
        let message = if n % 2 == 0 {
            json!({"slow": n})
        } else {
            json!({"n": n})
        };
        // One call per message, in order: the API answers once the node has
        // accepted it, so arrival order is send order.
        (n, message)
    });
    for (_, message) in sends {
        host.send(0, &[1, 2], message, false).await;
    }
    for t in [&mut a, &mut b] {
        for n in 0..total {
            let text = t.next_text().await;
            let value: Value = serde_json::from_str(&text).expect("json");
            let got = value["m"]["slow"].as_i64().or(value["m"]["n"].as_i64());
            assert_eq!(got, Some(n), "out of order: {text}");
        }
    }
}

#[tokio::test]
async fn filters_run_only_for_messages_someone_here_gets() {
    // tagger counts its calls; messages nobody on this node would get
    // (a channel without members here, a direct message to a client that is
    // not connected, with no receipt to send) never reach it.
    let dir = PluginDir::new();
    dir.install("tagger", guests::TAGGER, "[settings]\nversion = 1\n");
    let host = host_with(&dir).await;
    host.plugin_where("tagger", "loaded", |p| p["state"] == "active")
        .await;
    let mut a = host.terminal(1).await;
    host.ok("/channels/nobody-here/join", json!({"client_ids": [9]}))
        .await;
    host.ok(
        "/channels/nobody-here/messages",
        json!({"sender": 0, "message": "unheard"}),
    )
    .await;
    host.send(0, &[9], json!("unheard"), false).await;
    host.send(1, &[9], json!("unheard"), false).await;
    // A receipt is owed to 1 (9 is offline), so this one is filtered.
    host.send(1, &[9], json!("owed a receipt"), true).await;
    host.send(0, &[1], json!("heard"), false).await;

    let receipt = a.next_json().await;
    assert_eq!(receipt["receipt"], "用户不在线", "{receipt}");
    let heard = a.next_json().await;
    assert_eq!(heard["m"], "heard", "{heard}");
    // Messages are handled in arrival order: with "heard" delivered, every
    // earlier one was handled too.
    let row = host
        .plugin_where("tagger", "calls counted", |p| p["calls"].is_number())
        .await;
    assert_eq!(row["calls"], 2, "{row}");
}
