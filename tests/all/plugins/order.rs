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
