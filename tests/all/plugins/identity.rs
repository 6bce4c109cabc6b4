//! Auth for real identity providers (ABI 1.1): the host's signature checks,
//! key sets and HTTP calls, against a provider and a backend running on
//! loopback (`imhost_tests::idp`): every JWS algorithm jwt-auth accepts, key
//! rotation, a provider that goes down or hangs, a thousand connects on a
//! cold key set, the operator's list holding against a plugin that fetches
//! whatever a terminal names, and a webhook that delivers every presence
//! event through a failing receiver.

use std::collections::BTreeSet;
use std::time::Instant;

use imhost_tests::idp::{Idp, Mode};
use imhost_tests::jwt::{Signer, jwks};
use imhost_tests::sse::EventStream;

use super::*;

const ISSUER: &str = "https://idp.test/";

/// A node serving `dir` under the operator's grants `grants`.
async fn node(dir: &PluginDir, grants: &GrantsFile, tune: Options) -> TestHost {
    TestHost::start(Options {
        plugins: Some(dir.path().to_owned()),
        plugin_grants: Some(grants.path.clone()),
        ..tune
    })
    .await
}

/// jwt-auth on the provider's key set, which the operator lists for it.
async fn jwt_auth_node(
    idp: &Idp,
    manifest_extra: &str,
    grants_extra: &str,
) -> (PluginDir, GrantsFile, TestHost) {
    let jwks_url = idp.url("/jwks.json");
    let grants = GrantsFile::new(&format!(
        "[jwt-auth]\nkey_sets = [\"{jwks_url}\"]\n{grants_extra}"
    ));
    let dir = PluginDir::new();
    dir.install(
        "jwt-auth",
        guests::JWT_AUTH,
        &format!(
            "{manifest_extra}\n[settings]\njwks_url = \"{jwks_url}\"\nissuer = \"{ISSUER}\"\naudience = \"imhost\"\nmetadata_claims = [\"name\"]\nleeway_secs = 0\n"
        ),
    );
    let host = node(&dir, &grants, Options::default()).await;
    host.plugin_where("jwt-auth", "active", |p| p["state"] == "active")
        .await;
    (dir, grants, host)
}

fn claims(sub: i64) -> Value {
    json!({"sub": sub, "iss": ISSUER, "aud": ["imhost"], "exp": unix_now() + 60, "name": format!("user {sub}")})
}

fn ws(host: &TestHost, token: &str) -> String {
    format!("ws://{}/ws?token={token}", host.addr)
}

async fn connect_status(host: &TestHost, token: &str) -> u16 {
    status_of(Terminal::connect(&ws(host, token)).await)
}

#[tokio::test]
async fn jwt_auth_verifies_every_provider_algorithm_and_refuses_forgeries() {
    let idp = Idp::start().await;
    let rsa = Signer::rsa(0, "rsa-1");
    let es256 = Signer::ec("ES256", "ec-256");
    let es384 = Signer::ec("ES384", "ec-384");
    let ed = Signer::ed25519("ed-1");
    idp.set_jwks(jwks(&[&rsa, &es256, &es384, &ed]));
    let (_dir, _grants, host) = jwt_auth_node(&idp, "", "").await;
    let mut events = EventStream::open(
        &host.http,
        &host.url("/api/v1/events"),
        imhost_tests::api::API_KEY,
    )
    .await;

    let algorithms = [
        (&rsa, "RS256"),
        (&rsa, "RS384"),
        (&rsa, "RS512"),
        (&rsa, "PS256"),
        (&rsa, "PS384"),
        (&rsa, "PS512"),
        (&es256, "ES256"),
        (&es384, "ES384"),
        (&ed, "EdDSA"),
    ];
    for (n, (signer, alg)) in algorithms.iter().enumerate() {
        let sub = 100 + n as i64;
        let t = Terminal::connect(&ws(&host, &signer.sign(alg, &claims(sub))))
            .await
            .unwrap_or_else(|e| panic!("{alg} refused: {e}"));
        let online: Value = serde_json::from_str(&events.expect().await.data).expect("event");
        assert_eq!(online["client_id"], sub, "{alg}");
        assert_eq!(
            online["metadata"],
            json!({"name": format!("user {sub}")}).to_string()
        );
        drop(t);
        let _offline = events.expect().await;
    }
    assert_eq!(
        idp.jwks_fetches(),
        1,
        "one fetch of the set serves every key"
    );

    let good = es256.sign("ES256", &claims(1));
    let parts: Vec<&str> = good.split('.').collect();
    let forged_claims = URL_SAFE_NO_PAD.encode(claims(2).to_string());
    let impostor = Signer::ec("ES256", "ec-256");
    let forgeries = [
        // Claims changed after signing.
        format!("{}.{forged_claims}.{}", parts[0], parts[2]),
        // `alg: none`, with and without a signature.
        format!(
            "{}.{}.",
            URL_SAFE_NO_PAD.encode(r#"{"alg":"none","kid":"ec-256"}"#),
            parts[1]
        ),
        format!(
            "{}.{}.{}",
            URL_SAFE_NO_PAD.encode(r#"{"alg":"none","kid":"ec-256"}"#),
            parts[1],
            parts[2]
        ),
        // The RSA public key used as an HMAC secret (algorithm confusion).
        Signer::hmac(rsa.jwk().to_string().as_bytes())
            .sign_with_header(&json!({"alg": "HS256", "kid": "rsa-1"}), &claims(1)),
        // Another key under a kid the set holds.
        impostor.sign("ES256", &claims(1)),
        // An ES256 signature presented as ES384 for the P-256 key.
        es256.sign_with_header(&json!({"alg": "ES384", "kid": "ec-256"}), &claims(1)),
        // RS256 under the EC key's kid.
        rsa.sign_with_header(&json!({"alg": "RS256", "kid": "ec-256"}), &claims(1)),
        // Right key, wrong claims.
        es256.sign(
            "ES256",
            &json!({"sub": 1, "iss": ISSUER, "aud": "imhost", "exp": unix_now() - 5}),
        ),
        es256.sign(
            "ES256",
            &json!({"sub": 1, "iss": ISSUER, "aud": "imhost", "nbf": unix_now() + 600}),
        ),
        es256.sign(
            "ES256",
            &json!({"sub": 1, "iss": "https://evil.test/", "aud": "imhost"}),
        ),
        es256.sign("ES256", &json!({"sub": 1, "iss": ISSUER, "aud": "other"})),
        es256.sign(
            "ES256",
            &json!({"sub": "alice", "iss": ISSUER, "aud": "imhost"}),
        ),
    ];
    let denied_before = host.stats().await.auth_denied;
    for token in &forgeries {
        assert_eq!(connect_status(&host, token).await, 401, "{token}");
    }
    assert_eq!(
        host.stats().await.auth_denied - denied_before,
        forgeries.len() as u64
    );
    assert_eq!(idp.jwks_fetches(), 1, "no forgery made the host refetch");

    // A kid the set does not hold refetches it once (a rotation may have
    // happened), and no more for a while, however often it is presented.
    let stranger = Signer::ec("ES256", "unknown-kid");
    for _ in 0..3 {
        assert_eq!(
            connect_status(&host, &stranger.sign("ES256", &claims(1))).await,
            401
        );
    }
    // (The set was fetched moments ago: within UNKNOWN_KID_REFETCH, even
    // that one refetch may be skipped.)
    assert!(
        idp.jwks_fetches() <= 2,
        "an unknown kid refetches at most once, rate-limited"
    );
    assert_eq!(connect_status(&host, &good).await, 101, "still serving");
}

#[tokio::test]
async fn a_rotated_key_is_picked_up_without_a_restart_and_a_retired_one_refused() {
    let idp = Idp::start().await;
    let old = Signer::rsa(0, "2026-11");
    let new = Signer::rsa(1, "2026-12");
    idp.set_jwks(jwks(&[&old]));
    let (_dir, _grants, host) = jwt_auth_node(&idp, "", "").await;
    assert_eq!(
        connect_status(&host, &old.sign("RS256", &claims(1))).await,
        101
    );
    assert_eq!(
        connect_status(&host, &new.sign("RS256", &claims(1))).await,
        401,
        "not published yet"
    );
    // The provider rotates: publishes the new key, retires the old one.
    idp.set_jwks(jwks(&[&new]));
    let before = idp.jwks_fetches();
    // The unknown-kid refetch above was just made; the next is allowed
    // once UNKNOWN_KID_REFETCH has passed.
    imhost_tests::eventually_within("the new key accepted", Duration::from_secs(30), || async {
        (connect_status(&host, &new.sign("RS256", &claims(2))).await == 101).then_some(())
    })
    .await;
    assert!(idp.jwks_fetches() > before, "the set was fetched again");
    assert_eq!(
        connect_status(&host, &old.sign("RS256", &claims(1))).await,
        401,
        "the retired key is gone with the set that held it"
    );
}

#[tokio::test]
async fn when_the_provider_is_down_cached_keys_serve_until_they_expire_then_connects_fail_closed() {
    let idp = Idp::start().await;
    idp.set_max_age(3);
    let key = Signer::ec("ES256", "k");
    idp.set_jwks(jwks(&[&key]));
    let (_dir, _grants, host) =
        jwt_auth_node(&idp, "timeout_ms = 1000", "http_timeout_ms = 500\n").await;
    let token = key.sign("ES256", &claims(7));
    assert_eq!(connect_status(&host, &token).await, 101);

    idp.set_mode(Mode::Down);
    assert_eq!(
        connect_status(&host, &token).await,
        101,
        "the cached set serves while the provider is down"
    );
    // Once its lifetime (3 s) ends, connects fail closed, each promptly.
    imhost_tests::eventually_within(
        "connects refused after the set expired",
        Duration::from_secs(30),
        || async {
            let started = Instant::now();
            let status = connect_status(&host, &token).await;
            assert!(started.elapsed() < Duration::from_secs(5), "a connect hung");
            (status == 401).then_some(())
        },
    )
    .await;
    assert!(host.stats().await.key_set_fetch_failures >= 1);

    // A provider that hangs instead: the host gives up at its timeout.
    idp.set_mode(Mode::Hanging);
    let hanging_fetches = idp.jwks_fetches();
    imhost_tests::eventually_within(
        "a fetch of the hanging provider",
        Duration::from_secs(30),
        || async {
            let started = Instant::now();
            assert_eq!(connect_status(&host, &token).await, 401);
            assert!(
                started.elapsed() < Duration::from_secs(5),
                "a connect hung on the provider"
            );
            (idp.jwks_fetches() > hanging_fetches).then_some(())
        },
    )
    .await;

    // Back up: connects work again, no restart.
    idp.set_mode(Mode::Up);
    imhost_tests::eventually_within(
        "connects accepted again",
        Duration::from_secs(30),
        || async { (connect_status(&host, &token).await == 101).then_some(()) },
    )
    .await;
}

#[tokio::test]
async fn a_thousand_connects_on_a_cold_key_set_fetch_it_once() {
    let idp = Idp::start().await;
    let key = Signer::ec("ES256", "k");
    idp.set_jwks(jwks(&[&key]));
    let jwks_url = idp.url("/jwks.json");
    let grants = GrantsFile::new(&format!("[jwt-auth]\nkey_sets = [\"{jwks_url}\"]\n"));
    let dir = PluginDir::new();
    dir.install(
        "jwt-auth",
        guests::JWT_AUTH,
        &format!("pool = 16\ntimeout_ms = 5000\n[settings]\njwks_url = \"{jwks_url}\"\n"),
    );
    let host = node(
        &dir,
        &grants,
        Options {
            max_connections_per_address: Some(2000),
            ..Options::default()
        },
    )
    .await;
    host.plugin_where("jwt-auth", "active", |p| p["state"] == "active")
        .await;
    let token = key.sign("ES256", &json!({"sub": 1, "exp": unix_now() + 600}));
    let url = ws(&host, &token);
    let mut connects = tokio::task::JoinSet::new();
    for _ in 0..1000 {
        let url = url.clone();
        connects.spawn(async move { status_of(Terminal::connect(&url).await) });
    }
    let mut statuses = std::collections::BTreeMap::<u16, usize>::new();
    while let Some(status) = connects.join_next().await {
        *statuses.entry(status.expect("connect task")).or_default() += 1;
    }
    assert_eq!(
        statuses,
        [(101, 1000)].into_iter().collect(),
        "every connect admitted"
    );
    assert_eq!(idp.jwks_fetches(), 1, "a thousand connects, one fetch");
    assert_eq!(host.stats().await.key_set_fetches, 1);
}

/// What the http-probe plugin reported for a connect with `params`.
async fn probe(
    host: &TestHost,
    events: &mut EventStream,
    id: i64,
    params: &[(&str, &str)],
) -> Value {
    let mut all = vec![("id", id.to_string())];
    all.extend(params.iter().map(|(k, v)| (*k, v.to_string())));
    let url =
        reqwest::Url::parse_with_params(&format!("ws://{}/ws", host.addr), &all).expect("url");
    let terminal = Terminal::connect(url.as_str())
        .await
        .expect("probe connects");
    loop {
        let sse = events.expect().await;
        let event: Value = serde_json::from_str(&sse.data).expect("event");
        if event["client_id"] == id && sse.event == "online" {
            drop(terminal);
            return serde_json::from_str(event["metadata"].as_str().expect("metadata"))
                .expect("report");
        }
    }
}

fn error_of(report: &Value) -> &str {
    assert_eq!(report["ok"], false, "{report}");
    report["error"].as_str().unwrap_or_default()
}

#[tokio::test]
async fn http_calls_reach_only_what_the_operator_lists() {
    let idp = Idp::start().await;
    let elsewhere = Idp::start().await;
    let port = idp.addr.port();
    let grants = GrantsFile::new(&format!(
        "[http-probe]\nhttp = [\"{}\", \"http://localhost:{port}\"]\nhttp_timeout_ms = 500\nhttp_max_response_bytes = 1000\n",
        idp.origin()
    ));
    let dir = PluginDir::new();
    dir.install("http-probe", guests::HTTP_PROBE, "");
    let host = node(&dir, &grants, Options::default()).await;
    host.plugin_where("http-probe", "active", |p| p["state"] == "active")
        .await;
    let mut events = EventStream::open(
        &host.http,
        &host.url("/api/v1/events"),
        imhost_tests::api::API_KEY,
    )
    .await;

    let ok = probe(&host, &mut events, 1, &[("url", &idp.url("/echo"))]).await;
    assert_eq!(
        (ok["ok"].clone(), ok["status"].clone()),
        (json!(true), json!(200)),
        "{ok}"
    );
    assert!(
        ok["body"].as_str().unwrap_or_default().contains("imhost/"),
        "the host's user agent: {ok}"
    );

    // A URL the terminal chose: another server, another port, a relative
    // or non-HTTP URL, credentials: nothing is sent.
    let sent_elsewhere = elsewhere
        .counters()
        .other
        .load(std::sync::atomic::Ordering::Relaxed);
    for (n, url) in [
        elsewhere.url("/echo"),
        "/echo".to_owned(),
        "file:///etc/passwd".to_owned(),
        format!("http://user:pw@127.0.0.1:{port}/echo"),
    ]
    .iter()
    .enumerate()
    {
        let report = probe(&host, &mut events, 10 + n as i64, &[("url", url)]).await;
        assert!(error_of(&report).starts_with("refused"), "{url}: {report}");
    }
    assert_eq!(
        elsewhere
            .counters()
            .other
            .load(std::sync::atomic::Ordering::Relaxed),
        sent_elsewhere,
        "nothing reached the unlisted server"
    );
    // A listed name that resolves to loopback is refused (DNS may not point
    // a name inside); the listed address itself was allowed above.
    let by_name = probe(
        &host,
        &mut events,
        20,
        &[("url", &format!("http://localhost:{port}/echo"))],
    )
    .await;
    assert!(
        error_of(&by_name).contains("internal addresses"),
        "{by_name}"
    );
    // Redirects: followed on the list, refused off it.
    let on_list = probe(
        &host,
        &mut events,
        21,
        &[("url", &idp.url("/redirect?to=/echo"))],
    )
    .await;
    assert_eq!(on_list["status"], 200, "{on_list}");
    let off_list = probe(
        &host,
        &mut events,
        22,
        &[(
            "url",
            &idp.url(&format!("/redirect?to={}", elsewhere.url("/echo"))),
        )],
    )
    .await;
    assert!(
        error_of(&off_list).contains("not on the list"),
        "{off_list}"
    );
    // The host sets Host and framing, not the plugin.
    let host_header = probe(
        &host,
        &mut events,
        23,
        &[("url", &idp.url("/echo")), ("header", "Host:evil.test")],
    )
    .await;
    assert!(error_of(&host_header).contains("header"), "{host_header}");

    // Bounded: a body over the cap is cut, a slow server timed out.
    let small = probe(&host, &mut events, 30, &[("url", &idp.url("/bytes/900"))]).await;
    assert_eq!(small["len"], 900, "{small}");
    let big = probe(&host, &mut events, 31, &[("url", &idp.url("/bytes/5000"))]).await;
    assert!(error_of(&big).contains("cap"), "{big}");
    let started = Instant::now();
    let slow = probe(&host, &mut events, 32, &[("url", &idp.url("/slow"))]).await;
    assert!(error_of(&slow).starts_with("failed"), "{slow}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "the slow server held the connect"
    );

    // The plugin's cache: the second request is answered without asking.
    let first = probe(
        &host,
        &mut events,
        40,
        &[("url", &idp.url("/echo")), ("cache", "k")],
    )
    .await;
    let asked = idp
        .counters()
        .other
        .load(std::sync::atomic::Ordering::Relaxed);
    let second = probe(
        &host,
        &mut events,
        41,
        &[("url", &idp.url("/echo")), ("cache", "k")],
    )
    .await;
    assert_eq!(
        (first["cached"].clone(), second["cached"].clone()),
        (json!(false), json!(true))
    );
    assert_eq!(
        idp.counters()
            .other
            .load(std::sync::atomic::Ordering::Relaxed),
        asked
    );

    // A host that keeps failing is not asked again for a while.
    let failing = probe(
        &host,
        &mut events,
        50,
        &[("url", &idp.url("/status/500")), ("repeat", "6")],
    )
    .await;
    assert!(error_of(&failing).contains("5 times in a row"), "{failing}");

    // A filter cannot call out at all.
    let mut t = host.terminal(60).await;
    host.send(0, &[60], json!("probe-http"), false).await;
    let refusal = t.next_text().await;
    assert!(
        refusal.contains("only the auth and events hooks"),
        "{refusal}"
    );

    let stats = host.stats().await;
    assert!(stats.plugin_http_refused >= 8, "{stats:?}");
    assert!(stats.plugin_http_failed >= 2, "{stats:?}");
    assert!(stats.plugin_http_cached >= 1, "{stats:?}");
}

#[tokio::test]
async fn the_webhook_plugin_delivers_every_presence_event_through_a_failing_receiver() {
    const SECRET: &str = "webhook-test-secret";
    let idp = Idp::start().await;
    let grants = GrantsFile::new(&format!(
        "[webhook]\nhttp = [\"{}\"]\nactions = [\"kv\"]\n",
        idp.origin()
    ));
    let dir = PluginDir::new();
    dir.install(
        "webhook",
        guests::WEBHOOK,
        &format!(
            "[settings]\nurl = \"{}\"\nsecret = \"{SECRET}\"\nattempts = 3\n",
            idp.url("/webhook")
        ),
    );
    let host = node(&dir, &grants, Options::default()).await;
    host.plugin_where("webhook", "active", |p| p["state"] == "active")
        .await;
    // The first event fails twice, then is accepted (retried in the call);
    // a later one fails three times, is kept, and goes with the next event.
    idp.fail_webhooks(2);
    let first = host.terminal(1).await;
    imhost_tests::eventually("the first event delivered", || async {
        (idp.webhooks().len() == 1).then_some(())
    })
    .await;
    idp.fail_webhooks(3);
    let mut terminals = vec![first];
    for id in 2..=5 {
        terminals.push(host.terminal(id).await);
    }
    drop(terminals);
    imhost_tests::eventually("every presence event delivered", || async {
        (idp.webhooks().len() == 10).then_some(())
    })
    .await;
    let mut seen = BTreeSet::new();
    let mut ids = BTreeSet::new();
    for (headers, body) in idp.webhooks() {
        let timestamp = headers["x-imhost-timestamp"].to_str().expect("timestamp");
        let mut mac = Hmac::<Sha256>::new_from_slice(SECRET.as_bytes()).expect("key");
        mac.update(format!("{timestamp}.").as_bytes());
        mac.update(&body);
        let expected = format!("sha256={}", hex_of(&mac.finalize().into_bytes()));
        assert_eq!(
            headers["x-imhost-signature"].to_str().expect("signature"),
            expected
        );
        let event: Value = serde_json::from_slice(&body).expect("json");
        seen.insert((
            event["event"].as_str().expect("event").to_owned(),
            event["client_id"].as_i64().expect("id"),
        ));
        ids.insert(event["id"].as_str().expect("id").to_owned());
    }
    let expected: BTreeSet<(String, i64)> = (1..=5)
        .flat_map(|id| [("online".to_owned(), id), ("offline".to_owned(), id)])
        .collect();
    assert_eq!(seen, expected, "each online and offline event, once");
    assert_eq!(ids.len(), 10, "event ids are unique");
    assert!(
        idp.counters()
            .webhook_attempts
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 15
    );
}

fn hex_of(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[tokio::test]
async fn a_plugin_built_against_abi_1_0_loads_and_runs_on_this_host() {
    let dir = PluginDir::new();
    dir.install("abi-1-0", guests::ABI_1_0, "");
    let host = host_with(&dir).await;
    let row = host
        .plugin_where("abi-1-0", "active", |p| p["state"] == "active")
        .await;
    assert_eq!(row["abi"], "1.0.0");
    let mut t = host.terminal(1).await;
    host.send(0, &[1], json!("hello"), false).await;
    assert_eq!(t.next_text().await, r#""hello [1.0]""#);
}
