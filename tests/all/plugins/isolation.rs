//! Plugins that misbehave or are refused: contained, reported, sandboxed,
//! switched off and back on, and auth that fails closed.

use super::*;

#[tokio::test]
async fn refusals_say_what_is_wrong_and_nothing_else_is_affected() {
    let dir = PluginDir::new();
    dir.install_bytes("core", b"\0asm\x01\0\0\0", "");
    dir.install_bytes("garbage", b"definitely not wasm", "");
    dir.install("future", guests::FUTURE_MAJOR, "");
    dir.install("badconf", guests::WORD_FILTER, "no_such_key = 1\n");
    dir.install("good", guests::WORD_FILTER, "[settings]\nwords = [\"x\"]\n");
    dir.install_bytes("memories", &many_memories(70), "");
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
    // /readyz (no key) says which plugin is not ready, not why.
    let ready = host
        .http
        .get(host.url("/readyz"))
        .send()
        .await
        .expect("readyz");
    assert_eq!(ready.status(), 503);
    let said = ready.text().await.expect("text");
    assert!(said.contains("garbage failed to load"), "{said}");
    assert!(!said.contains("not a WebAssembly file"), "{said}");
    failed("future", "imhost:plugin@2.0.0").await;
    failed("badconf", "no_such_key").await;
    failed(
        "memories",
        "would create 70 memories; a plugin may have at most 64",
    )
    .await;
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
async fn the_sandbox_opens_what_the_manifest_asks_and_the_operator_grants() {
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
    // The operator grants the probe the variable, the directory and the
    // network; the test's default grants (actions only) are not used here.
    let grants = GrantsFile::new(&format!(
        "[probe]\nenv = [\"PATH\"]\ndirs = [{:?}]\nnetwork = true\n",
        data.path().display().to_string()
    ));
    let dir = PluginDir::new();
    dir.install(
        "probe",
        guests::SANDBOX_PROBE,
        &format!("timeout_ms = 2000\n{settings}"),
    );
    let host = TestHost::start(Options {
        plugins: Some(dir.path().to_owned()),
        plugin_grants: Some(grants.path.clone()),
        ..Options::default()
    })
    .await;
    host.plugin_where("probe", "loaded", |p| p["state"] == "active")
        .await;
    let mut t = host.terminal(1).await;
    // Granted, but not asked for: nothing is open.
    host.send(0, &[1], json!("probe"), false).await;
    let denied = t.next_json().await;
    assert_eq!(denied["env"], json!(null), "{denied}");
    assert_eq!(denied["file"], json!(null), "{denied}");
    assert!(
        denied["net"].as_str().is_some_and(|e| e.contains("denied")),
        "no network without asking: {denied}"
    );

    // Asked for and granted: each door opens, exactly.
    let asks = format!(
        "timeout_ms = 2000\n[grants]\nenv = [\"PATH\"]\ndirs = [{:?}]\nnetwork = true\n{settings}",
        data.path().display().to_string()
    );
    dir.set_manifest("probe", &asks);
    host.plugin_where("probe", "reloaded asking", |p| p["calls"] == 0)
        .await;
    host.send(0, &[1], json!("probe"), false).await;
    let path = std::env::var("PATH").expect("PATH is set");
    assert_eq!(
        t.next_json().await,
        json!({"env": path, "file": "granted contents", "net": true}),
        "each grant opens exactly its door"
    );

    // Asked for and no longer granted: the operator's file changes, a
    // reload applies it, and the plugin says what it lacks.
    grants.set("[probe]\nenv = [\"PATH\"]\n");
    let (status, answer) = host.post("/plugins/reload", json!({})).await;
    assert_eq!(status, 200, "{answer}");
    let row = host
        .plugin_where("probe", "grants withdrawn", |p| {
            p["withheld"].as_array().is_some_and(|w| w.len() == 2) && p["calls"] == 0
        })
        .await;
    let withheld = row["withheld"].to_string();
    assert!(
        withheld.contains("directory") && withheld.contains("network"),
        "{withheld}"
    );
    host.send(0, &[1], json!("probe"), false).await;
    let now = t.next_json().await;
    assert_eq!(now["env"], json!(path), "{now}");
    assert_eq!(now["file"], json!(null), "{now}");
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

/// The node's own secrets are never a plugin's to ask for: a manifest that
/// grants itself `IMHOST_API_KEY` and the compiled-plugin cache (with its
/// signing key) gets neither, in a real process given its key by variable.
#[tokio::test]
async fn a_manifest_cannot_grant_itself_the_nodes_secrets() {
    let dir = PluginDir::new();
    let cache = imhost_tests::plugin_cache();
    // The cache's signing key lives beside it (`DIR.key`).
    let mut key_name = cache.file_name().expect("cache name").to_owned();
    key_name.push(".key");
    let key_file = cache.with_file_name(key_name);
    let holds_the_cache = cache.parent().expect("cache parent").to_path_buf();
    dir.install(
        "probe",
        guests::SANDBOX_PROBE,
        &format!(
            "timeout_ms = 2000\n[grants]\nenv = [\"IMHOST_API_KEY\", \"imhost_redis\", \"PATH\"]\n\
             dirs = [{:?}, {:?}]\n[settings]\nenv = \"IMHOST_API_KEY\"\nfile = {:?}\naddr = \"127.0.0.1:9\"\n",
            cache.display().to_string(),
            holds_the_cache.display().to_string(),
            key_file.display().to_string()
        ),
    );
    // Even an operator who grants them by mistake gives none of them.
    let grants = GrantsFile::new(&format!(
        "[\"*\"]\nenv = [\"IMHOST_API_KEY\", \"imhost_redis\"]\ndirs = [{:?}, {:?}]\n",
        cache.display().to_string(),
        holds_the_cache.display().to_string()
    ));
    let grants_path = grants.path.display().to_string();
    let addr = imhost_tests::process::free_addr();
    let listen = addr.to_string();
    let plugins = dir.arg();
    let _process = imhost_tests::process::ImhostProcess::spawn(
        addr,
        &[
            "--listen",
            &listen,
            "--plugins",
            &plugins,
            "--plugin-grants",
            &grants_path,
        ],
        &[("IMHOST_API_KEY", imhost_tests::api::API_KEY)],
    );
    let api = imhost_tests::api::Api::new(addr);
    api.wait_serving().await;
    api.plugin_where("probe", "loaded", |p| p["state"] == "active")
        .await;
    let mut t = api.terminal(1).await;
    api.send(0, &[1], json!("probe"), false).await;
    let seen = t.next_json().await;
    assert_eq!(seen["env"], json!(null), "the API key leaked: {seen}");
    assert_eq!(seen["file"], json!(null), "the cache key leaked: {seen}");
    let row = api
        .plugin_where("probe", "reported", |p| p["state"] == "active")
        .await;
    let withheld = row["withheld"].to_string();
    assert!(withheld.contains("IMHOST_API_KEY"), "{withheld}");
    assert!(withheld.contains("never granted"), "{withheld}");
}

/// Host actions are the operator's to grant: a plugin whose manifest asks
/// to send gets nothing until the grants file gives it, and says so.
#[tokio::test]
async fn a_plugin_acts_on_the_cluster_only_with_the_operators_grant() {
    let grants = GrantsFile::new("");
    let dir = PluginDir::new();
    dir.install(
        "welcome",
        guests::WELCOME,
        "[grants]\nactions = [\"send\"]\n[settings]\ntext = \"Hi {client}\"\n",
    );
    let host = TestHost::start(Options {
        plugins: Some(dir.path().to_owned()),
        plugin_grants: Some(grants.path.clone()),
        ..Options::default()
    })
    .await;
    let row = host
        .plugin_where("welcome", "loaded", |p| p["state"] == "active")
        .await;
    assert_eq!(row["withheld"], json!(["action `send`"]), "{row}");
    let mut first = host.terminal(1).await;
    // Once the plugin has handled this socket's online event, a marker
    // sent after it is the first thing the terminal gets: no greeting.
    host.plugin_where("welcome", "called for the socket", |p| {
        p["calls"].as_u64() >= Some(1)
    })
    .await;
    host.send(0, &[1], json!("marker"), false).await;
    assert_eq!(
        first.next_text().await,
        r#""marker""#,
        "send was not granted"
    );

    grants.set("[welcome]\nactions = [\"send\"]\n");
    let (status, answer) = host.post("/plugins/reload", json!({})).await;
    assert_eq!(status, 200, "{answer}");
    host.plugin_where("welcome", "granted", |p| {
        p["withheld"] == json!([]) && p["state"] == "active"
    })
    .await;
    let mut second = host.terminal(2).await;
    assert_eq!(
        second.next_json().await,
        json!({"type": "welcome", "text": "Hi 2"})
    );
}

/// A burst of connects against an auth plugin with one instance: those that
/// cannot get the instance within its deadline are told 503 with
/// `Retry-After` (fail closed, but honest), and the plugin, which did
/// nothing wrong, is not switched off.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_connect_burst_on_a_busy_auth_plugin_gets_503_not_an_open_breaker() {
    let dir = PluginDir::new();
    dir.install(
        "misbehaving",
        guests::MISBEHAVING,
        "hooks = [\"auth\"]\ntimeout_ms = 150\npool = 1\nfailure_threshold = 2\n",
    );
    let host = host_with(&dir).await;
    host.plugin_where("misbehaving", "loaded", |p| p["state"] == "active")
        .await;
    let mut connects = tokio::task::JoinSet::new();
    for n in 0..12 {
        // Each `slow` token keeps the one instance for 60 ms, then passes
        // on to the built-in tokens, which do not know it: 401.
        let url = format!("ws://{}/ws?token=slow{n}", host.addr);
        connects.spawn(async move {
            match Terminal::connect(&url).await {
                Err(tokio_tungstenite::tungstenite::Error::Http(r)) => {
                    let retry = r.headers().get("retry-after").cloned();
                    (r.status().as_u16(), retry)
                }
                other => panic!("unexpected: {:?}", other.map(|_| "connected")),
            }
        });
    }
    let mut statuses = Vec::new();
    while let Some(done) = connects.join_next().await {
        let (status, retry) = done.expect("connect");
        if status == 503 {
            assert!(retry.is_some(), "503 without Retry-After");
        }
        statuses.push(status);
    }
    assert!(
        statuses.iter().all(|s| [401, 503].contains(s)),
        "{statuses:?}"
    );
    assert!(
        statuses.contains(&503),
        "nobody waited past the deadline: {statuses:?}"
    );
    assert!(statuses.contains(&401), "nobody was served: {statuses:?}");
    let row = host
        .plugin_where("misbehaving", "counted", |p| {
            p["overloaded"].as_u64() > Some(0)
        })
        .await;
    assert_eq!(row["state"], "active", "{row}");
    assert_eq!(row["errors"], 0, "{row}");
    let stats = host.stats().await;
    assert_eq!(
        stats.connects_auth_busy,
        statuses.iter().filter(|s| **s == 503).count() as u64
    );
    // A connect the plugin passes still gets in: nothing was switched off.
    host.terminal(1).await;
}

/// A component of `n` core modules, each with a memory, each instantiated:
/// far more memories than any toolchain emits for one plugin.
fn many_memories(n: usize) -> Vec<u8> {
    let modules: String = (0..n)
        .map(|i| format!("(core module $m{i} (memory 1)) (core instance (instantiate $m{i}))"))
        .collect();
    wat::parse_str(format!("(component {modules})")).expect("wat")
}

/// Each plugin holds its own share of the engine's pooled slots: a plugin
/// whose `pool` does not fit beside the others' reservations is refused
/// with the figures, the plugin already running keeps serving all of its
/// share, and a smaller `pool` loads. (A process of its own: the pool is
/// the process's.)
#[tokio::test]
async fn a_plugin_cannot_take_the_pool_slots_another_holds() {
    let dir = PluginDir::new();
    let drop_darn = "[settings]\nwords = [\"darn\"]\naction = \"drop\"\n";
    dir.install(
        "big",
        guests::WORD_FILTER,
        &format!("pool = 256\n{drop_darn}"),
    );
    let (_process, api) =
        imhost_tests::process::ImhostProcess::serving_plugins(dir.path(), &[]).await;
    api.plugin_where("big", "loaded", |p| p["state"] == "active")
        .await;
    // 256 of the 384 reservable instance slots are big's: 200 more do not fit.
    dir.install("second", guests::WORD_FILTER, "pool = 200\n");
    let row = api
        .plugin_where("second", "refused", |p| p["state"] == "failed")
        .await;
    let error = row["last_error"].as_str().expect("error");
    assert!(
        error.contains("no room in the engine's pool")
            && error.contains("200 component instances")
            && error.contains("128 of 384 are left"),
        "{error}"
    );
    // big still filters, with every slot it reserved.
    let mut t = api.terminal(1).await;
    api.send(0, &[1], json!("darn"), false).await;
    api.send(0, &[1], json!("fine"), false).await;
    assert_eq!(t.next_text().await, "\"fine\"");
    // A pool that fits beside big's loads.
    dir.set_manifest("second", "pool = 100\n");
    api.plugin_where("second", "loaded", |p| p["state"] == "active")
        .await;
}
