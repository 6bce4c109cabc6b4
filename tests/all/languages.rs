//! Plugins written in JavaScript, Python and C against `plugin-sdk/wit` alone
//! (built by `examples/plugins/build`), loaded by the unchanged host and used
//! by real WebSocket terminals: every hook in a language other than Rust, a
//! hot swap from a JavaScript filter to a Python one under a message stream,
//! a swap that does not wait for the optimized builds of others, connects
//! that wait for an auth plugin still compiling, and auth plugins for real
//! identity providers (JavaScript ES256 on a key set, Python RFC 7662
//! introspection) that use the host's crypto and HTTP.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hmac::{Hmac, Mac};
use imhost::config::Options;
use imhost_tests::host::TestHost;
use imhost_tests::idp::Idp;
use imhost_tests::jwt::{Signer, jwks};
use imhost_tests::plugins::{GrantsFile, PluginDir, example, guests, variant};
use imhost_tests::terminal::Terminal;
use serde_json::{Value, json};
use sha2::Sha256;

const SECRET: &str = "languages-test-secret-0123456789";

async fn host_with(dir: &PluginDir) -> TestHost {
    TestHost::start(Options {
        plugins: Some(dir.path().to_owned()),
        ..Options::default()
    })
    .await
}

/// `<client>.<expires>.<hex hmac>`, as the JavaScript hmac-auth plugin wants.
fn hmac_token(client: i64, expires_ms: u128, secret: &str) -> String {
    let payload = format!("{client}.{expires_ms}");
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(secret.as_bytes()).expect("key");
    mac.update(payload.as_bytes());
    let signature: String = mac
        .finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("{payload}.{signature}")
}

fn now_ms() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_millis()
}

fn ws_url(host: &TestHost, token: &str) -> String {
    format!("ws://{}/ws?token={token}", host.addr)
}

#[tokio::test]
async fn javascript_auth_admits_signed_tokens_and_refuses_forged_ones() {
    let dir = PluginDir::new();
    dir.install(
        "hmac-auth",
        &example("js-hmac-auth"),
        &format!("[settings]\nsecret = \"{SECRET}\"\n"),
    );
    let host = host_with(&dir).await;
    let row = host
        .plugin_where("hmac-auth", "loaded", |p| p["state"] == "active")
        .await;
    assert_eq!(row["hooks"], json!(["auth"]));

    let later = now_ms() + 60_000;
    let mut t = Terminal::connect(&ws_url(&host, &hmac_token(42, later, SECRET)))
        .await
        .expect("a signed token connects");
    host.send(0, &[42], json!("hello 42"), false).await;
    assert_eq!(t.next_text().await, r#""hello 42""#);
    let client = host.client(42).await;
    assert!(client.online);

    for (why, token) in [
        (
            "wrong secret",
            hmac_token(43, later, "another-secret-0123456789"),
        ),
        ("expired", hmac_token(43, now_ms() - 1, SECRET)),
        (
            "tampered client id",
            hmac_token(43, later, SECRET).replacen("43", "44", 1),
        ),
    ] {
        let refused = Terminal::connect(&ws_url(&host, &token)).await;
        assert!(refused.is_err(), "{why}: connected");
    }
    // Not of its shape: passed on to the built-in connect tokens.
    let mut built_in = host.terminal(7).await;
    host.send(0, &[7], json!("built-in"), false).await;
    assert_eq!(built_in.next_text().await, r#""built-in""#);
}

async fn moderation_in(language: &str, file: &str) {
    let dir = PluginDir::new();
    dir.install(
        "moderation",
        &example(file),
        "[settings]\nbanned = [\"darn\"]\nmax_length = 60\nstamp = true\n",
    );
    let host = host_with(&dir).await;
    host.plugin_where("moderation", "loaded", |p| p["hooks"] == json!(["filter"]))
        .await;
    let mut t = host.terminal(1).await;
    host.send(0, &[1], json!({"text": "Darn it, 笨蛋", "n": 1}), false)
        .await;
    assert_eq!(
        t.next_text().await,
        format!(r#"{{"text":"**** it, 笨蛋","n":1,"moderated_by":"{language}"}}"#)
    );
    host.send(0, &[1], json!("no darn way"), false).await;
    assert_eq!(t.next_text().await, r#""no **** way""#);
    // Too long: dropped; the next message still arrives, and a sender who
    // asked for a receipt learns that it was dropped, and why.
    let mut sender = host.terminal(9).await;
    host.send(9, &[1], json!("x".repeat(100)), true).await;
    host.send(0, &[1], json!("short"), false).await;
    assert_eq!(t.next_text().await, r#""short""#);
    let receipt: Value = serde_json::from_str(&sender.next_text().await).expect("receipt");
    assert_eq!(receipt["receipt"], "消息被拦截");
    assert_eq!(receipt["content"], json!("x".repeat(100)).to_string());
    assert_eq!(receipt["reason"], "moderation: longer than 60 bytes");
    assert_eq!(host.stats().await.filtered_dropped, 1);
}

#[tokio::test]
async fn javascript_moderation_masks_stamps_and_drops() {
    moderation_in("javascript", "js-moderation").await;
}

#[tokio::test]
async fn python_moderation_masks_stamps_and_drops() {
    moderation_in("python", "py-moderation").await;
}

fn connect_status(result: Result<Terminal, tokio_tungstenite::tungstenite::Error>) -> u16 {
    match result {
        Err(tokio_tungstenite::tungstenite::Error::Http(r)) => r.status().as_u16(),
        Err(e) => panic!("unexpected error {e}"),
        Ok(_) => 101,
    }
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs() as i64
}

#[tokio::test]
async fn javascript_es256_auth_checks_tokens_with_the_hosts_crypto_and_key_set() {
    let idp = Idp::start().await;
    let key = Signer::ec("ES256", "js-1");
    idp.set_jwks(jwks(&[&key]));
    let jwks_url = idp.url("/jwks.json");
    let grants = GrantsFile::new(&format!("[es256-auth]\nkey_sets = [\"{jwks_url}\"]\n"));
    let dir = PluginDir::new();
    dir.install(
        "es256-auth",
        &example("js-es256-auth"),
        &format!(
            "timeout_ms = 2000\n[settings]\njwks_url = \"{jwks_url}\"\nissuer = \"https://idp.test/\"\naudience = \"imhost\"\n"
        ),
    );
    let host = TestHost::start(Options {
        plugins: Some(dir.path().to_owned()),
        plugin_grants: Some(grants.path.clone()),
        ..Options::default()
    })
    .await;
    host.plugin_where("es256-auth", "active", |p| p["state"] == "active")
        .await;
    let claims = json!({"sub": "31", "iss": "https://idp.test/", "aud": "imhost", "exp": unix_now() + 60, "name": "Ada"});
    let ws = |token: &str| format!("ws://{}/ws?token={token}", host.addr);
    let mut events = imhost_tests::sse::EventStream::open(
        &host.http,
        &host.url("/api/v1/events"),
        imhost_tests::api::API_KEY,
    )
    .await;
    let good = key.sign("ES256", &claims);
    let _t = Terminal::connect(&ws(&good))
        .await
        .expect("a valid ES256 token connects");
    let online: Value = serde_json::from_str(&events.expect().await.data).expect("event");
    assert_eq!(
        (online["client_id"].clone(), online["metadata"].clone()),
        (json!(31), json!("Ada"))
    );

    let parts: Vec<&str> = good.split('.').collect();
    let other_claims = base64::Engine::encode(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD,
        json!({"sub": "1", "iss": "https://idp.test/", "aud": "imhost"}).to_string(),
    );
    let refused = [
        format!("{}.{other_claims}.{}", parts[0], parts[2]),
        Signer::ec("ES256", "js-1").sign("ES256", &claims),
        Signer::rsa(0, "js-1").sign("RS256", &claims),
        Signer::ec("ES256", "unknown").sign("ES256", &claims),
        key.sign("ES256", &json!({"sub": "31", "iss": "https://idp.test/", "aud": "imhost", "exp": unix_now() - 5})),
        key.sign("ES256", &json!({"sub": "31", "iss": "https://other.test/", "aud": "imhost"})),
    ];
    for token in &refused {
        assert_eq!(
            connect_status(Terminal::connect(&ws(token)).await),
            401,
            "{token}"
        );
    }
    assert!(
        idp.jwks_fetches() <= 2,
        "one fetch, and one for the unknown kid"
    );
}

#[tokio::test]
async fn python_introspection_auth_asks_the_provider_once_per_token() {
    let idp = Idp::start().await;
    idp.set_token(
        "opaque-1",
        json!({"active": true, "sub": "77", "username": "ann"}),
    );
    idp.set_token("opaque-2", json!({"active": false, "sub": "78"}));
    idp.set_token("opaque-3", json!({"active": true, "sub": "not-a-client"}));
    let grants = GrantsFile::new(&format!("[introspect]\nhttp = [\"{}\"]\n", idp.origin()));
    let dir = PluginDir::new();
    dir.install(
        "introspect",
        &example("py-introspect"),
        &format!(
            "timeout_ms = 2000\n[settings]\nendpoint = \"{}\"\nclient_id = \"imhost\"\nclient_secret = \"s\"\ncache_secs = 60\n",
            idp.url("/introspect")
        ),
    );
    let host = TestHost::start(Options {
        plugins: Some(dir.path().to_owned()),
        plugin_grants: Some(grants.path.clone()),
        ..Options::default()
    })
    .await;
    host.plugin_where("introspect", "active", |p| p["state"] == "active")
        .await;
    let ws = |token: &str| format!("ws://{}/ws?token={token}", host.addr);
    let mut events = imhost_tests::sse::EventStream::open(
        &host.http,
        &host.url("/api/v1/events"),
        imhost_tests::api::API_KEY,
    )
    .await;
    for _ in 0..3 {
        let t = Terminal::connect(&ws("opaque-1"))
            .await
            .expect("an active token connects");
        let online: Value = serde_json::from_str(&events.expect().await.data).expect("event");
        assert_eq!(
            (online["client_id"].clone(), online["metadata"].clone()),
            (json!(77), json!("ann"))
        );
        drop(t);
        let _offline = events.expect().await;
    }
    let asked = idp
        .counters()
        .introspections
        .load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(asked, 1, "the answer is cached under the token's digest");
    for token in ["opaque-2", "opaque-3", "never-issued"] {
        assert_eq!(
            connect_status(Terminal::connect(&ws(token)).await),
            401,
            "{token}"
        );
    }
    // The provider failing: connects fail closed.
    idp.set_mode(imhost_tests::idp::Mode::Down);
    idp.set_token("opaque-9", json!({"active": true, "sub": "79"}));
    assert_eq!(
        connect_status(Terminal::connect(&ws("opaque-9")).await),
        401
    );
}

#[tokio::test]
async fn python_events_tell_the_roster_channel() {
    let dir = PluginDir::new();
    dir.install(
        "presence-notify",
        &example("py-presence-notify"),
        "[settings]\nchannel = \"roster\"\n",
    );
    let host = host_with(&dir).await;
    host.plugin_where("presence-notify", "loaded", |p| {
        p["hooks"] == json!(["events"])
    })
    .await;
    let mut watcher = host.terminal(1).await;
    host.ok("/channels/roster/join", json!({"client_ids": [1]}))
        .await;
    let newcomer = host.terminal(2).await;
    assert_eq!(
        watcher.next_text().await,
        r#"{"presence":"online","client_id":2}"#
    );
    drop(newcomer);
    assert_eq!(
        watcher.next_text().await,
        r#"{"presence":"offline","client_id":2}"#
    );
}

#[tokio::test]
async fn c_inbound_commands_reply_and_whisper() {
    let dir = PluginDir::new();
    dir.install("commands", &example("c-commands"), "");
    let host = host_with(&dir).await;
    host.plugin_where("commands", "loaded", |p| p["hooks"] == json!(["inbound"]))
        .await;
    let mut one = host.terminal(1).await;
    let mut two = host.terminal(2).await;
    one.send_text("ping").await.expect("send");
    assert_eq!(one.next_text().await, "pong");
    one.send_text("/whisper 2 hi \"there\" ✓")
        .await
        .expect("send");
    assert_eq!(
        two.next_text().await,
        r#"{"from":1,"whisper":"hi \"there\" ✓"}"#
    );
    one.send_text("/whisper nobody").await.expect("send");
    assert_eq!(one.next_text().await, "usage: /whisper ID message");
    assert_eq!(host.stats().await.inbound_handled, 3);
}

#[tokio::test]
async fn a_javascript_filter_is_hot_swapped_for_a_python_one_under_a_stream() {
    let dir = PluginDir::new();
    let manifest = "[settings]\nstamp = true\n";
    dir.install("moderation", &example("js-moderation"), manifest);
    let host = host_with(&dir).await;
    let first = host
        .plugin_where("moderation", "javascript loaded", |p| {
            p["state"] == "active"
        })
        .await;
    let mut t = host.terminal(1).await;
    let total = 600;
    let sender = {
        let api = host.api.clone();
        tokio::spawn(async move {
            for n in 0..total {
                api.send(0, &[1], json!({"n": n}), false).await;
                if n % 50 == 0 {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
        })
    };
    let mut seen = Vec::new();
    let mut swapped = false;
    while seen.len() < total {
        let text = t.next_text().await;
        let value: Value = serde_json::from_str(&text).expect("json");
        let by = value["moderated_by"].as_str().expect("stamped").to_owned();
        seen.push((value["n"].as_i64().expect("n"), by));
        if seen.len() == 100 && !swapped {
            // Deploy the Python build of the same filter under the same name.
            dir.install("moderation", &example("py-moderation"), manifest);
            swapped = true;
        }
    }
    sender.await.expect("sender");
    let numbers: Vec<i64> = seen.iter().map(|(n, _)| *n).collect();
    assert_eq!(
        numbers,
        (0..total as i64).collect::<Vec<_>>(),
        "every message once, in order"
    );
    // Once Python served a message, JavaScript never did again.
    let first_python = seen
        .iter()
        .position(|(_, by)| by == "python")
        .unwrap_or(seen.len());
    assert!(
        seen[first_python..].iter().all(|(_, by)| by == "python"),
        "the switch is monotonic"
    );
    assert!(seen[..100].iter().all(|(_, by)| by == "javascript"));
    let row = host
        .plugin_where("moderation", "python build active", |p| {
            p["hash"] != first["hash"]
        })
        .await;
    assert_eq!(row["state"], "active");
    // After the stream, the Python build serves.
    host.send(0, &[1], json!({"n": -1}), false).await;
    assert_eq!(t.next_text().await, r#"{"n":-1,"moderated_by":"python"}"#);
    assert_eq!(
        host.client(1).await.connections,
        1,
        "no socket closed by the swap"
    );
}

#[tokio::test]
async fn connects_wait_for_an_auth_plugin_that_is_still_compiling() {
    let dir = PluginDir::new();
    dir.install(
        "hmac-auth",
        &example("js-hmac-auth"),
        &format!("[settings]\nsecret = \"{SECRET}\"\n"),
    );
    // A cache of its own (nothing precompiled) and no baseline tier: the
    // optimized compile of 12 MB of JavaScript takes seconds here.
    let cache = tempfile::tempdir().expect("cache");
    let host = TestHost::start_serving(Options {
        plugins: Some(dir.path().to_owned()),
        plugin_cache: Some(cache.path().join("c")),
        plugin_tiering: Some(false),
        ..Options::default()
    })
    .await;
    let (api, addr) = (&host.api, host.addr);

    // Serving at once; the directory is scanned in milliseconds, the plugin
    // compiles for seconds.
    let rows = imhost_tests::eventually("hmac-auth listed as compiling", || async {
        let rows = api.plugins().await;
        (rows.len() == 1 && rows[0]["state"] == "compiling").then_some(rows)
    })
    .await;
    assert_eq!(rows[0]["compiling"]["tier"], "optimized");
    assert_eq!(
        rows[0]["hooks"],
        json!(["auth"]),
        "read from the file before compiling"
    );
    // While it compiles, a WebSocket handshake is
    // refused with 503, Retry-After and the JSON error body.
    let refused = Terminal::connect(&format!("ws://{addr}/ws?token=x")).await;
    let Err(tokio_tungstenite::tungstenite::Error::Http(response)) = refused else {
        panic!("expected an HTTP refusal, got {:?}", refused.map(|_| ()));
    };
    assert_eq!(response.status(), 503);
    assert_eq!(
        response
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok()),
        Some("1")
    );
    let body: Value =
        serde_json::from_slice(response.body().as_deref().unwrap_or_default()).expect("json body");
    assert_eq!(body["error"]["code"], "unavailable");
    let ready = api
        .http
        .get(format!("http://{addr}/readyz"))
        .send()
        .await
        .expect("readyz");
    assert_eq!(ready.status(), 503);
    let said = ready.text().await.expect("text");
    assert!(said.contains("hmac-auth compiling"), "{said}");

    imhost_tests::eventually_within("ready", imhost_tests::COMPILE_DEADLINE, || async {
        let r = api
            .http
            .get(format!("http://{addr}/readyz"))
            .send()
            .await
            .ok()?;
        (r.status() == 200).then_some(())
    })
    .await;
    let url = format!(
        "ws://{addr}/ws?token={}",
        hmac_token(5, now_ms() + 60_000, SECRET)
    );
    Terminal::connect(&url).await.expect("connects once active");
    host.stop().await.expect("clean stop");
}

#[tokio::test]
async fn plugin_check_refuses_a_plugin_whose_start_code_traps() {
    let dir = PluginDir::new();
    dir.install("start-trap", guests::START_TRAP, "");
    let out = std::process::Command::new(imhost_tests::process::imhost_bin())
        .args(["plugin", "check"])
        .arg(dir.path().join("start-trap.wasm"))
        .output()
        .expect("run check");
    assert_eq!(out.status.code(), Some(1));
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(said.contains("instantiation failed"), "{said}");

    // The server refuses it the same way, and says so.
    let host = host_with(&dir).await;
    let row = host
        .plugin_where("start-trap", "refused", |p| p["state"] == "failed")
        .await;
    assert!(
        row["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("instantiation failed")),
        "{row}"
    );

    // A name the server would ignore is refused by check too.
    std::fs::copy(guests::TEMPLATE, dir.path().join("my.filter.wasm")).expect("copy");
    let out = std::process::Command::new(imhost_tests::process::imhost_bin())
        .args(["plugin", "check"])
        .arg(dir.path().join("my.filter.wasm"))
        .output()
        .expect("run check");
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("ignores this file"));
}

/// A swap never waits behind background builds: with the optimized builds
/// of four JavaScript and Python plugins still to run (a cold cache of its
/// own), a new JavaScript filter serves before they finish, because they
/// are stopped while its baseline build runs, and a stream of messages
/// through the swap loses nothing.
#[tokio::test]
async fn a_new_filter_serves_before_the_optimized_builds_of_others_finish() {
    let dir = PluginDir::new();
    let stamp = |order: u32| format!("order = {order}\n[settings]\nstamp = true\n");
    let js = example("js-moderation");
    let py = example("py-moderation");
    dir.install_bytes("a-js", &variant(&js, 1), &stamp(10));
    dir.install_bytes("b-js", &variant(&js, 2), &stamp(11));
    dir.install_bytes("c-py", &variant(&py, 3), &stamp(12));
    dir.install_bytes("d-py", &variant(&py, 4), &stamp(13));
    let cache = tempfile::tempdir().expect("cache");
    let cache_dir = cache.path().join("c").display().to_string();
    let (_process, api) = imhost_tests::process::ImhostProcess::serving_plugins(
        dir.path(),
        &["--plugin-cache", &cache_dir],
    )
    .await;
    // All four serve from their baseline builds; optimized ones pending.
    imhost_tests::eventually_within(
        "four plugins active, optimized builds pending",
        imhost_tests::COMPILE_DEADLINE,
        || async {
            let rows = api.plugins().await;
            let pending = rows
                .iter()
                .filter(|p| p["compiling"]["tier"] == "optimized")
                .count();
            (rows.len() == 4 && rows.iter().all(|p| p["state"] == "active") && pending >= 3)
                .then_some(())
        },
    )
    .await;

    let mut t = api.terminal(1).await;
    // A message every 10 ms until the swap is seen (at most a minute).
    let sender = {
        let api = api.clone();
        tokio::spawn(async move {
            for n in 0..6000 {
                api.send(0, &[1], json!({"n": n}), false).await;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
    };
    let first = t.next_json().await;
    assert_eq!(first["moderated_by"], "python", "{first}");
    let paused_before = builds_paused(&api).await;
    dir.install_bytes("e-js", &variant(&js, 5), &stamp(14));
    let mut seen = vec![first["n"].as_i64().expect("n")];
    loop {
        let value = t.next_json().await;
        seen.push(value["n"].as_i64().expect("n"));
        if value["moderated_by"] == "javascript" {
            break;
        }
    }
    // The new filter serves, and the four optimized builds have not all
    // finished: they were held while it was built.
    let rows = api.plugins().await;
    let new = rows.iter().find(|p| p["name"] == "e-js").expect("e-js row");
    assert_eq!(new["state"], "active", "{new}");
    let pending = rows
        .iter()
        .filter(|p| p["name"] != "e-js" && p["compiling"]["tier"] == "optimized")
        .count();
    assert!(
        pending >= 1,
        "every optimized build finished first: {rows:?}"
    );
    assert!(
        builds_paused(&api).await > paused_before,
        "no background build was paused for the swap"
    );
    sender.abort();
    let last = *seen.last().expect("one");
    assert_eq!(
        seen,
        (0..=last).collect::<Vec<_>>(),
        "every message once, in order, through the swap"
    );
}

/// `imhost_plugin_builds_paused_total` from `/metrics`.
async fn builds_paused(api: &imhost_tests::api::Api) -> u64 {
    let text = api
        .http
        .get(api.url("/metrics"))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    text.lines()
        .find_map(|l| l.strip_prefix("imhost_plugin_builds_paused_total "))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map(|v| v as u64)
        .expect("imhost_plugin_builds_paused_total in /metrics")
}
