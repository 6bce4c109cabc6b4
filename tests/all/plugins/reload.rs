//! Hot reload: swaps under a stream, a broken new version, deletes, SIGHUP and
//! the reload call, and calls in flight that finish on the old version.

use super::*;

#[tokio::test]
async fn a_broken_new_version_keeps_the_old_and_deleting_unloads() {
    let dir = PluginDir::new();
    dir.install("tagger", guests::TAGGER, "[settings]\nversion = 1\n");
    let host = host_with(&dir).await;
    let first = host
        .plugin_where("tagger", "loaded", |p| p["state"] == "active")
        .await;
    let mut t = host.terminal(1).await;

    // An editor writing garbage in place: the old version keeps serving.
    dir.write_in_place("tagger", b"\0asm garbage");
    let row = host
        .plugin_where("tagger", "reports the failure", |p| {
            !p["last_error"].is_null()
        })
        .await;
    assert_eq!(row["hash"], first["hash"], "the old version still runs");
    assert_eq!(row["state"], "active");
    host.send(0, &[1], json!("m"), false).await;
    assert_eq!(t.next_json().await, json!({"v": 1, "m": "m"}));

    // Deleting the file unloads it.
    dir.remove("tagger");
    crate_eventually_unloaded(&host).await;
    host.send(0, &[1], json!("plain"), false).await;
    assert_eq!(t.next_text().await, r#""plain""#);
}

async fn crate_eventually_unloaded(host: &TestHost) {
    imhost_tests::eventually("tagger unloaded", || async {
        (!host
            .plugins()
            .await
            .iter()
            .any(|p| p["name"] == "tagger" && p["state"] == "active"))
        .then_some(())
    })
    .await;
}

#[tokio::test]
async fn hot_swap_under_a_stream_loses_and_duplicates_nothing() {
    const CLIENTS: i64 = 20;
    const MESSAGES: usize = 300;
    let dir = PluginDir::new();
    dir.install("tagger", guests::TAGGER, "[settings]\nversion = 1\n");
    let host = host_with(&dir).await;
    host.plugin_where("tagger", "loaded", |p| p["state"] == "active")
        .await;
    let mut readers = Vec::new();
    for id in 1..=CLIENTS {
        readers.push(host.terminal(id).await.into_reader());
    }
    let ids: Vec<i64> = (1..=CLIENTS).collect();
    let sender = {
        let api = host.api.clone();
        tokio::spawn(async move {
            for n in 0..MESSAGES {
                api.send(0, &ids, json!(n), false).await;
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        })
    };
    // Swap to version 2 mid-stream (once the stream is flowing): a new
    // manifest renamed into place, then a reload through the API as well
    // (each must be harmless).
    imhost_tests::eventually("the stream is flowing", || async {
        (host.stats().await.frames_queued >= CLIENTS as u64 * 10).then_some(())
    })
    .await;
    dir.set_manifest("tagger", "[settings]\nversion = 2\n");
    let (status, _) = host.post("/plugins/reload", json!({})).await;
    assert_eq!(status, 200);
    sender.await.expect("sender");

    let mut switch_points = Vec::new();
    for reader in &mut readers {
        let mut last_version = 0;
        let mut switch = None;
        for n in 0..MESSAGES {
            let msg: Value = serde_json::from_str(&reader.next_text().await).expect("json");
            assert_eq!(msg["m"], n, "every message exactly once, in order");
            let v = msg["v"].as_i64().expect("tagged by exactly one version");
            assert!(v >= last_version, "the switch is monotonic");
            if v == 2 && last_version == 1 {
                switch = Some(n);
            }
            last_version = v;
        }
        assert_eq!(last_version, 2, "the new version took over");
        assert!(reader.is_open(), "no socket closed");
        switch_points.push(switch);
    }
    // The filter runs once per message per node, so every client switched at
    // the same message.
    switch_points.dedup();
    assert_eq!(switch_points.len(), 1, "{switch_points:?}");
    assert!(switch_points[0].is_some(), "the swap happened mid-stream");
}

#[tokio::test]
async fn sighup_and_the_reload_call_rescan_when_not_watching() {
    let dir = PluginDir::new();
    let (process, api) = imhost_tests::process::ImhostProcess::serving_plugins(
        dir.path(),
        &["--watch-plugins", "false"],
    )
    .await;
    assert!(api.plugins().await.is_empty());

    dir.install("welcome", guests::WELCOME, "");
    let signalled = std::time::Instant::now();
    process.signal("HUP");
    let row = api
        .plugin_where("welcome", "loaded on SIGHUP", |p| p["state"] == "active")
        .await;
    // The rescan read the file after the signal: its first build served
    // within what this test saw.
    let served_after = row["served_after_ms"].as_u64().expect("served_after_ms");
    assert!(
        u128::from(served_after) <= signalled.elapsed().as_millis(),
        "{row}"
    );

    dir.install("rate-limit", guests::RATE_LIMIT, "");
    let (status, answer) = api.post("/plugins/reload", json!({})).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["failed"], json!({}));
    assert_eq!(answer["plugins"].as_array().map(Vec::len), Some(2));
    process.signal("TERM");
    let (status, _) = process.wait(Duration::from_secs(15)).await;
    assert!(status.success());
}

#[tokio::test]
async fn a_call_in_flight_finishes_on_the_old_version_while_new_calls_use_the_new() {
    let dir = PluginDir::new();
    dir.install(
        "tagger",
        guests::TAGGER,
        "timeout_ms = 10000\n[settings]\nversion = 1\ndelay_ms = 1500\nnotify = 2\n",
    );
    let host = host_with(&dir).await;
    host.plugin_where("tagger", "loaded", |p| {
        p["hooks"] == json!(["filter", "inbound"])
    })
    .await;
    let mut t = host.terminal(1).await;
    let mut watcher = host.terminal(2).await;

    // Start a slow inbound call on version 1 in client 1's socket task; its
    // first act tells client 2 that it runs.
    t.send_text("slow").await.expect("send");
    let started = watcher.next_json().await;
    assert_eq!(started["m"], json!({"v": 1, "started": true}), "{started}");

    // Swap to version 2 while that call is still running.
    dir.set_manifest("tagger", "timeout_ms = 10000\n[settings]\nversion = 2\n");
    let (status, _) = host.post("/plugins/reload", json!({})).await;
    assert_eq!(status, 200);
    // New calls use version 2 at once; the slow call is unaffected.
    host.send(0, &[1], json!("new"), false).await;
    let mut seen = vec![t.next_json().await, t.next_json().await];
    seen.sort_by_key(|v| v.to_string());
    assert_eq!(
        seen,
        vec![json!({"v": 1, "done": true}), json!({"v": 2, "m": "new"})],
        "the in-flight call finished on version 1, the new message met version 2"
    );
}
