//! Plugins really compiled to wasm32-wasip2, loaded by a running host from its
//! plugin directory: each shipped plugin end to end, hook wiring, refusals,
//! hot swap under load, and plugins that misbehave.

use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};
use imhost::config::Options;
use imhost_tests::host::TestHost;
use imhost_tests::plugins::{PluginDir, guests};
use imhost_tests::terminal::Terminal;
use serde_json::{Value, json};
use sha2::Sha256;

async fn host_with(dir: &PluginDir) -> TestHost {
    TestHost::start(Options {
        plugins: Some(dir.path().to_owned()),
        ..Options::default()
    })
    .await
}

#[tokio::test]
async fn word_filter_masks_case_and_unicode_aware() {
    let dir = PluginDir::new();
    dir.install(
        "word-filter",
        guests::WORD_FILTER,
        "[settings]\nwords = [\"darn\", \"笨蛋\", \"ÉCOLE\"]\n",
    );
    let host = host_with(&dir).await;
    let row = host
        .plugin_where("word-filter", "loaded", |p| p["state"] == "active")
        .await;
    assert_eq!(
        row["hooks"],
        json!(["filter"]),
        "a filter-only component wires only filter"
    );
    assert_eq!(row["abi"], "1.0.0");

    let mut t = host.terminal(1).await;
    host.send(
        0,
        &[1],
        json!({"text": "DaRn it, 你是笨蛋 at l'école", "n": 5}),
        false,
    )
    .await;
    assert_eq!(
        t.next_json().await,
        json!({"text": "**** it, 你是** at l'*****", "n": 5})
    );
    host.send(0, &[1], json!({"text": "clean"}), false).await;
    assert_eq!(t.next_json().await, json!({"text": "clean"}));
    // Channel messages and broadcasts pass the chain too.
    host.ok("/channels/c/join", json!({"client_ids": [1]}))
        .await;
    host.ok("/channels/c/messages", json!({"message": "darn"}))
        .await;
    assert_eq!(t.next_text().await, r#""****""#);
    assert!(host.stats().await.filtered_replaced >= 2);

    // Drop mode, switched by a manifest change alone (hot reload).
    dir.set_manifest(
        "word-filter",
        "[settings]\nwords = [\"darn\"]\naction = \"drop\"\n",
    );
    host.plugin_where("word-filter", "reloaded in drop mode", |p| p["calls"] == 0)
        .await;
    host.send(0, &[1], json!("darn"), false).await;
    host.send(0, &[1], json!("after"), false).await;
    assert_eq!(
        t.next_text().await,
        r#""after""#,
        "the filtered message was dropped"
    );
    assert_eq!(host.stats().await.filtered_dropped, 1);
}

fn jwt(claims: Value, secret: &str) -> String {
    let header = URL_SAFE_NO_PAD.encode(r#"{"alg":"HS256","typ":"JWT"}"#);
    let payload = URL_SAFE_NO_PAD.encode(claims.to_string());
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("key");
    mac.update(format!("{header}.{payload}").as_bytes());
    let signature = URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes());
    format!("{header}.{payload}.{signature}")
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs() as i64
}

fn status_of(result: Result<Terminal, tokio_tungstenite::tungstenite::Error>) -> u16 {
    match result {
        Err(tokio_tungstenite::tungstenite::Error::Http(r)) => r.status().as_u16(),
        Err(e) => panic!("unexpected error {e}"),
        Ok(_) => 101,
    }
}

#[tokio::test]
async fn jwt_auth_checks_signature_time_issuer_audience() {
    const SECRET: &str = "a-test-secret-of-at-least-32-bytes!!";
    let dir = PluginDir::new();
    dir.install(
        "jwt-auth",
        guests::JWT_AUTH,
        &format!(
            "[settings]\nsecret = \"{SECRET}\"\nissuer = \"backend\"\naudience = \"imhost\"\nmetadata_claim = \"name\"\nleeway_secs = 0\n"
        ),
    );
    let host = host_with(&dir).await;
    host.plugin_where("jwt-auth", "loaded", |p| p["hooks"] == json!(["auth"]))
        .await;
    let ws = |token: &str| format!("ws://{}/ws?token={token}", host.addr);
    let now = unix_now();
    let good = json!({"sub": "42", "name": "小明", "iss": "backend", "aud": ["x", "imhost"], "exp": now + 60});

    let mut events = imhost_tests::sse::EventStream::open(
        &host.http,
        &host.url("/api/v1/events"),
        imhost_tests::api::API_KEY,
    )
    .await;
    let mut t = Terminal::connect(&ws(&jwt(good.clone(), SECRET)))
        .await
        .expect("valid JWT connects");
    let online: Value = serde_json::from_str(&events.expect().await.data).expect("event");
    assert_eq!(online["client_id"], 42);
    assert_eq!(online["metadata"], "小明");
    host.send(0, &[42], json!("hi 42"), false).await;
    assert_eq!(t.next_text().await, r#""hi 42""#);

    let mut bad = vec![
        jwt(good.clone(), "another-secret-another-secret-0000"),
        jwt(
            json!({"sub": 42, "iss": "backend", "aud": "imhost", "exp": now - 10}),
            SECRET,
        ),
        jwt(
            json!({"sub": 42, "iss": "backend", "aud": "imhost", "nbf": now + 600}),
            SECRET,
        ),
        jwt(
            json!({"sub": 42, "iss": "someone", "aud": "imhost"}),
            SECRET,
        ),
        jwt(json!({"sub": 42, "iss": "backend", "aud": "other"}), SECRET),
        jwt(
            json!({"sub": "not-a-number", "iss": "backend", "aud": "imhost"}),
            SECRET,
        ),
    ];
    // alg=none is refused.
    let none = format!(
        "{}.{}.",
        URL_SAFE_NO_PAD.encode(r#"{"alg":"none"}"#),
        URL_SAFE_NO_PAD.encode(json!({"sub": 1}).to_string())
    );
    bad.push(none);
    for token in bad {
        assert_eq!(
            status_of(Terminal::connect(&ws(&token)).await),
            401,
            "{token}"
        );
    }
    assert_eq!(host.stats().await.auth_denied, 7);

    // The Authorization header works too (for clients that can set it).
    let request = tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(
        format!("ws://{}/ws", host.addr),
    )
    .map(|mut r| {
        r.headers_mut().insert(
            "authorization",
            format!("Bearer {}", jwt(good.clone(), SECRET))
                .parse()
                .expect("header"),
        );
        r
    })
    .expect("request");
    let tcp = tokio::net::TcpStream::connect(host.addr)
        .await
        .expect("tcp");
    tokio_tungstenite::client_async(request, tcp)
        .await
        .expect("header JWT connects");

    // A connect URL from the backend (not a JWT) still works: the plugin passes.
    host.terminal(7).await;
}

#[tokio::test]
async fn rate_limit_drops_a_senders_excess_only() {
    let dir = PluginDir::new();
    dir.install(
        "rate-limit",
        guests::RATE_LIMIT,
        "[settings]\nlimit = 3\nwindow_ms = 60000\n",
    );
    let host = host_with(&dir).await;
    host.plugin_where("rate-limit", "loaded", |p| p["state"] == "active")
        .await;
    let mut t = host.terminal(9).await;
    for n in 0..5 {
        host.send(1, &[9], json!({"from": 1, "n": n}), false).await;
    }
    host.send(2, &[9], json!({"from": 2}), false).await;
    host.send(0, &[9], json!({"from": 0}), false).await;
    for n in 0..3 {
        assert_eq!(t.next_json().await, json!({"from": 1, "n": n}));
    }
    assert_eq!(
        t.next_json().await,
        json!({"from": 2}),
        "another sender is not limited"
    );
    assert_eq!(
        t.next_json().await,
        json!({"from": 0}),
        "the system is not limited"
    );
    assert_eq!(host.stats().await.filtered_dropped, 2);
}

#[tokio::test]
async fn welcome_greets_the_first_device_and_tells_a_channel() {
    let dir = PluginDir::new();
    dir.install(
        "welcome",
        guests::WELCOME,
        "[settings]\ntext = \"Hi {client} ({metadata})\"\nchannel = \"lobby\"\n",
    );
    let host = host_with(&dir).await;
    host.plugin_where("welcome", "loaded", |p| p["hooks"] == json!(["events"]))
        .await;
    let mut old = host.terminal(1).await;
    // Client 1's own greeting comes first.
    assert_eq!(
        old.next_json().await,
        json!({"type": "welcome", "text": "Hi 1 ()"})
    );
    host.ok("/channels/lobby/join", json!({"client_ids": [1]}))
        .await;

    let url = host.connect_url(2, Some("web")).await.url;
    let mut new = Terminal::connect(&url).await.expect("connect");
    assert_eq!(
        new.next_json().await,
        json!({"type": "welcome", "text": "Hi 2 (web)"})
    );
    assert_eq!(
        old.next_json().await,
        json!({"type": "joined", "client": 2, "metadata": "web"})
    );
    // A second device is not greeted again.
    let _second = host.terminal(2).await;
    host.send(0, &[2], json!("marker"), false).await;
    assert_eq!(new.next_text().await, r#""marker""#);
}

#[tokio::test]
async fn inbound_frames_reach_the_plugin_and_deliveries_pass_the_filters() {
    let dir = PluginDir::new();
    dir.install("echo-inbound", guests::ECHO_INBOUND, "");
    dir.install(
        "word-filter",
        guests::WORD_FILTER,
        "[settings]\nwords = [\"darn\"]\n",
    );
    let host = host_with(&dir).await;
    host.plugin_where("echo-inbound", "loaded", |p| {
        p["hooks"] == json!(["inbound"])
    })
    .await;
    host.plugin_where("word-filter", "loaded", |p| p["state"] == "active")
        .await;
    let mut a = host.terminal(1).await;
    let mut b = host.terminal(2).await;
    a.send_text("ping").await.expect("send");
    assert_eq!(a.next_text().await, r#""pong""#);
    a.send_text(json!({"to": [2], "text": "darn hello"}).to_string())
        .await
        .expect("send");
    assert_eq!(
        b.next_json().await,
        json!({"from": 1, "text": "**** hello"})
    );
    host.ok("/channels/room/join", json!({"client_ids": [1, 2]}))
        .await;
    b.send_text(json!({"chan": "room", "text": "all"}).to_string())
        .await
        .expect("send");
    assert_eq!(a.next_json().await, json!({"from": 2, "text": "all"}));
    a.send_text("not json").await.expect("send");
    imhost_tests::eventually("ignored frame counted", || async {
        (host.stats().await.inbound_ignored == 1).then_some(())
    })
    .await;
}

#[tokio::test]
async fn refusals_say_what_is_wrong_and_nothing_else_is_affected() {
    let dir = PluginDir::new();
    dir.install_bytes("core", b"\0asm\x01\0\0\0", "");
    dir.install_bytes("garbage", b"definitely not wasm", "");
    dir.install("future", guests::FUTURE_MAJOR, "");
    dir.install("badconf", guests::WORD_FILTER, "no_such_key = 1\n");
    dir.install("good", guests::WORD_FILTER, "[settings]\nwords = [\"x\"]\n");
    let host = host_with(&dir).await;
    let failed = |name: &'static str, needle: &'static str| {
        let host = &host;
        async move {
            let row = host
                .plugin_where(name, "refused", |p| p["state"] == "failed")
                .await;
            let error = row["last_error"].as_str().expect("error").to_owned();
            assert!(error.contains(needle), "{name}: {error}");
        }
    };
    failed("core", "core WebAssembly module").await;
    failed("garbage", "not a WebAssembly file").await;
    failed("future", "imhost:plugin@2.0.0").await;
    failed("badconf", "no_such_key").await;
    host.plugin_where("good", "loaded", |p| p["state"] == "active")
        .await;

    // Removing a refused file clears its report.
    dir.remove("garbage");
    imhost_tests::eventually("garbage forgotten", || async {
        (!host.plugins().await.iter().any(|p| p["name"] == "garbage")).then_some(())
    })
    .await;
}

#[tokio::test]
async fn misbehaving_plugins_are_contained_and_the_host_keeps_serving() {
    let dir = PluginDir::new();
    dir.install(
        "misbehaving",
        guests::MISBEHAVING,
        "hooks = [\"filter\"]\ntimeout_ms = 50\nmemory_mb = 16\nfailure_threshold = 100\n",
    );
    let host = host_with(&dir).await;
    host.plugin_where("misbehaving", "loaded", |p| p["state"] == "active")
        .await;
    let mut t = host.terminal(1).await;
    // Filters fail open by default: each message is still delivered.
    for word in ["loop", "hog", "trap", "fine"] {
        host.send(0, &[1], json!(word), false).await;
        assert_eq!(t.next_text().await, format!("\"{word}\""));
    }
    let row = host
        .plugin_where("misbehaving", "failures counted", |p| p["errors"] == 3)
        .await;
    assert_eq!(row["timeouts"], 1, "{row}");
    assert_eq!(row["memory_limits"], 1, "{row}");
    assert_eq!(row["traps"], 1, "{row}");
    assert_eq!(row["calls"], 4);

    // Fail closed when configured; and the circuit breaker switches it off.
    dir.set_manifest(
        "misbehaving",
        "hooks = [\"filter\"]\ntimeout_ms = 50\non_error = \"drop\"\nfailure_threshold = 2\ncooldown_ms = 60000\n",
    );
    host.plugin_where("misbehaving", "reloaded", |p| p["calls"] == 0)
        .await;
    host.send(0, &[1], json!("trap"), false).await;
    host.send(0, &[1], json!("trap"), false).await;
    host.send(0, &[1], json!("fine, but switched off"), false)
        .await;
    host.send(0, &[1], json!("next"), false).await;
    let row = host
        .plugin_where("misbehaving", "switched off", |p| {
            p["state"] == "switched_off"
        })
        .await;
    assert_eq!(row["errors"], 2, "{row}");
    // Dropped: the two traps (fail closed) and the one refused by the open
    // circuit; then everything is dropped while it stays off.
    assert!(host.stats().await.filtered_dropped >= 3);
    assert!(host.client(1).await.online, "no socket was closed");
}

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
    // Swap to version 2 mid-stream: a new manifest renamed into place, then a
    // reload through the API as well (each must be harmless).
    tokio::time::sleep(Duration::from_millis(150)).await;
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
async fn rate_limit_counts_are_shared_across_the_cluster() {
    let redis = imhost_tests::redis::RedisServer::start().await;
    let dir = PluginDir::new();
    dir.install(
        "rate-limit",
        guests::RATE_LIMIT,
        "[settings]\nlimit = 3\nwindow_ms = 60000\n",
    );
    let path = dir.path().to_str().expect("path").to_owned();
    let cluster =
        imhost_tests::cluster::Cluster::start_with(&redis, 2, &["--plugins", &path]).await;
    let (a, b) = (cluster.client_on(0, 1), cluster.client_on(1, 1));
    let mut ta = cluster.node(0).terminal(a).await;
    let mut tb = cluster.node(0).terminal(b).await;
    // Sender 5 sends two messages to a client on node 0 and two to one on
    // node 1: each node counts in Redis, so one of them is over the limit of
    // 3 (per-node counters would let all four through).
    for (n, to) in [(0, a), (1, b), (2, a), (3, b)] {
        cluster.node(0).send(5, &[to], json!(n), false).await;
    }
    cluster.node(0).send(0, &[a, b], json!("end"), false).await;
    let mut got = Vec::new();
    for t in [&mut ta, &mut tb] {
        loop {
            let text = t.next_text().await;
            if text == r#""end""# {
                break;
            }
            got.push(text);
        }
    }
    // The two nodes count in whatever order they get to it, so which message
    // is the fourth is not fixed; that exactly one of four was dropped is.
    assert_eq!(
        got.len(),
        3,
        "one message over the shared limit of 3: {got:?}"
    );
    let mut dropped = 0;
    for node in 0..2 {
        dropped += cluster.node(node).stats().await.filtered_dropped;
    }
    assert_eq!(dropped, 1, "dropped on exactly one node");
}

#[tokio::test]
async fn plugin_check_prints_hooks_or_the_reason() {
    let bin = imhost_tests::process::imhost_bin();
    let ok = std::process::Command::new(&bin)
        .args(["plugin", "check", guests::WELCOME])
        .output()
        .expect("run check");
    assert!(ok.status.success());
    let info: Value = serde_json::from_slice(&ok.stdout).expect("json");
    assert_eq!(info["hooks"], json!(["events"]));
    assert_eq!(info["abi"], "1.0.0");
    assert_eq!(info["hash"].as_str().map(str::len), Some(64));

    // Two export macros in one crate make one component with both hooks.
    let both = std::process::Command::new(&bin)
        .args(["plugin", "check", guests::TEMPLATE])
        .output()
        .expect("run check");
    assert!(both.status.success());
    let info: Value = serde_json::from_slice(&both.stdout).expect("json");
    assert_eq!(info["hooks"], json!(["filter", "events"]));

    let refused = std::process::Command::new(&bin)
        .args(["plugin", "check", guests::FUTURE_MAJOR])
        .output()
        .expect("run check");
    assert_eq!(refused.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&refused.stderr).contains("imhost:plugin@2.0.0"));
}

fn artifacts(cache: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut found: Vec<_> = std::fs::read_dir(cache)
        .expect("cache dir")
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "cwasm"))
        .collect();
    found.sort();
    found
}

#[tokio::test]
async fn compiled_plugins_are_cached_outside_the_plugin_dir_and_reused() {
    let dir = PluginDir::new();
    let cache = tempfile::tempdir().expect("cache dir");
    let cache_dir = cache.path().join("imhost");
    dir.install(
        "word-filter",
        guests::WORD_FILTER,
        "[settings]\nwords = [\"x\"]\n",
    );
    let options = || Options {
        plugins: Some(dir.path().to_owned()),
        plugin_cache: Some(cache_dir.clone()),
        ..Options::default()
    };
    let first = TestHost::start(options()).await;
    first
        .plugin_where("word-filter", "optimized", |p| p["tier"] == "optimized")
        .await;
    assert_eq!(artifacts(&cache_dir).len(), 1, "one optimized artifact");
    assert!(
        std::fs::read_dir(dir.path()).expect("plugin dir").all(|e| e
            .expect("entry")
            .path()
            .extension()
            .is_some_and(|x| x == "wasm" || x == "toml")),
        "nothing but plugins in the plugin directory"
    );
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&cache_dir)
            .expect("meta")
            .permissions()
            .mode();
        assert_eq!(mode & 0o077, 0, "the cache is owner-only: {mode:o}");
    }
    first.stop().await.expect("stopped");

    // A new node loads the artifact straight into the optimized tier.
    let second = TestHost::start(options()).await;
    let row = second
        .plugin_where("word-filter", "loaded", |p| p["state"] == "active")
        .await;
    assert_eq!(row["tier"], "optimized");
    let mut t = second.terminal(1).await;
    second.send(0, &[1], json!("x marks"), false).await;
    assert_eq!(t.next_text().await, r#""* marks""#);
    second.stop().await.expect("stopped");

    // A tampered artifact is refused, deleted and compiled again.
    let artifact = artifacts(&cache_dir).pop().expect("artifact");
    let mut bytes = std::fs::read(&artifact).expect("read");
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0xff;
    std::fs::write(&artifact, &bytes).expect("tamper");
    let third = TestHost::start(options()).await;
    third
        .plugin_where("word-filter", "recompiled", |p| p["tier"] == "optimized")
        .await;
    assert_ne!(
        std::fs::read(&artifact).expect("rewritten"),
        bytes,
        "the tampered file was replaced"
    );
    let mut t = third.terminal(1).await;
    third.send(0, &[1], json!("x again"), false).await;
    assert_eq!(t.next_text().await, r#""* again""#);
}

#[tokio::test]
async fn sighup_and_the_reload_call_rescan_when_not_watching() {
    let dir = PluginDir::new();
    let addr = imhost_tests::process::free_addr();
    let listen = addr.to_string();
    let plugins = dir.path().to_str().expect("path").to_owned();
    let process = imhost_tests::process::ImhostProcess::spawn(
        addr,
        &[
            "--listen",
            &listen,
            "--api-key",
            imhost_tests::api::API_KEY,
            "--plugins",
            &plugins,
            "--watch-plugins",
            "false",
        ],
        &[],
    );
    let api = imhost_tests::api::Api::new(addr);
    api.wait_serving().await;
    assert!(api.plugins().await.is_empty());

    dir.install("welcome", guests::WELCOME, "");
    process.signal("HUP");
    api.plugin_where("welcome", "loaded on SIGHUP", |p| p["state"] == "active")
        .await;

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
async fn a_failing_auth_plugin_fails_closed() {
    let dir = PluginDir::new();
    dir.install(
        "misbehaving",
        guests::MISBEHAVING,
        "hooks = [\"auth\"]\ntimeout_ms = 50\nmemory_mb = 16\nfailure_threshold = 100\n",
    );
    let host = host_with(&dir).await;
    host.plugin_where("misbehaving", "loaded", |p| p["hooks"] == json!(["auth"]))
        .await;
    for token in ["loop", "hog", "trap"] {
        let url = format!("ws://{}/ws?token={token}", host.addr);
        assert_eq!(status_of(Terminal::connect(&url).await), 401, "{token}");
    }
    assert_eq!(host.stats().await.auth_denied, 3);
    let row = host
        .plugin_where("misbehaving", "failures counted", |p| p["errors"] == 3)
        .await;
    assert_eq!(
        (
            row["timeouts"].clone(),
            row["memory_limits"].clone(),
            row["traps"].clone()
        ),
        (json!(1), json!(1), json!(1))
    );
    // A plugin that passes leaves the built-in tokens working.
    host.terminal(1).await;
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

#[tokio::test]
async fn the_sandbox_opens_only_what_the_manifest_grants() {
    let data = tempfile::tempdir().expect("tempdir");
    let secret = data.path().join("secret.txt");
    std::fs::write(&secret, "granted contents").expect("write");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("listener");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        // Accept whatever connects; the probe only checks that it can.
        while listener.accept().await.is_ok() {}
    });
    let settings = format!(
        "[settings]\nenv = \"PATH\"\nfile = {:?}\naddr = \"{addr}\"\n",
        secret.display().to_string()
    );
    let dir = PluginDir::new();
    dir.install(
        "probe",
        guests::SANDBOX_PROBE,
        &format!("timeout_ms = 2000\n{settings}"),
    );
    let host = host_with(&dir).await;
    host.plugin_where("probe", "loaded", |p| p["state"] == "active")
        .await;
    let mut t = host.terminal(1).await;
    host.send(0, &[1], json!("probe"), false).await;
    let denied = t.next_json().await;
    assert_eq!(denied["env"], json!(null), "{denied}");
    assert_eq!(denied["file"], json!(null), "{denied}");
    assert!(
        denied["net"].as_str().is_some_and(|e| e.contains("denied")),
        "no network without a grant: {denied}"
    );

    let grants = format!(
        "timeout_ms = 2000\n[grants]\nenv = [\"PATH\"]\ndirs = [{:?}]\nnetwork = true\n{settings}",
        data.path().display().to_string()
    );
    dir.set_manifest("probe", &grants);
    host.plugin_where("probe", "reloaded with grants", |p| p["calls"] == 0)
        .await;
    host.send(0, &[1], json!("probe"), false).await;
    let path = std::env::var("PATH").expect("PATH is set");
    assert_eq!(
        t.next_json().await,
        json!({"env": path, "file": "granted contents", "net": true}),
        "each grant opens exactly its door"
    );
}

#[tokio::test]
async fn the_circuit_breaker_half_opens_after_its_cooldown() {
    let dir = PluginDir::new();
    dir.install(
        "misbehaving",
        guests::MISBEHAVING,
        "hooks = [\"filter\"]\non_error = \"drop\"\nfailure_threshold = 1\ncooldown_ms = 300\n",
    );
    let host = host_with(&dir).await;
    host.plugin_where("misbehaving", "loaded", |p| p["state"] == "active")
        .await;
    let mut t = host.terminal(1).await;
    host.send(0, &[1], json!("trap"), false).await;
    host.plugin_where("misbehaving", "switched off", |p| {
        p["state"] == "switched_off"
    })
    .await;
    // After the cooldown the next call is let through, and succeeds.
    host.plugin_where("misbehaving", "cooled down", |p| p["state"] == "active")
        .await;
    host.send(0, &[1], json!("fine"), false).await;
    assert_eq!(
        t.next_text().await,
        r#""fine""#,
        "the trap was dropped, this passes"
    );
    // One more failure in the half-open state switches it off again at once.
    host.send(0, &[1], json!("trap"), false).await;
    let row = host
        .plugin_where("misbehaving", "switched off again", |p| {
            p["state"] == "switched_off"
        })
        .await;
    assert_eq!(row["errors"], 2, "{row}");
}

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
