//! What a hostile or broken peer does to the HTTP side: connections that send
//! nothing, headers and bodies that trickle in, more connections than the node
//! takes. Each is closed or answered within its configured bound.

use std::time::Duration;

use imhost::config::Options;
use imhost_tests::DEADLINE;
use imhost_tests::host::{API_KEY, TestHost};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// RFC 6455's example key: 16 bytes in base64.
const VALID_KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

fn short_timeouts() -> Options {
    Options {
        header_read_timeout: Some(Duration::from_millis(300)),
        body_read_timeout: Some(Duration::from_millis(300)),
        ..Options::default()
    }
}

/// Reads until the server closes the connection; returns what it sent.
async fn read_until_closed(stream: &mut TcpStream) -> String {
    let mut got = Vec::new();
    tokio::time::timeout(DEADLINE, stream.read_to_end(&mut got))
        .await
        .expect("the server closed the connection in time")
        .ok();
    String::from_utf8_lossy(&got).into_owned()
}

#[tokio::test]
async fn a_connection_that_never_sends_a_request_is_closed() {
    let host = TestHost::start(short_timeouts()).await;
    let mut idle = TcpStream::connect(host.addr).await.expect("connect");
    let said = read_until_closed(&mut idle).await;
    assert!(
        said.is_empty() || said.starts_with("HTTP/1.1 408"),
        "{said:?}"
    );
}

#[tokio::test]
async fn headers_sent_a_byte_at_a_time_run_out_of_time() {
    let host = TestHost::start(short_timeouts()).await;
    let mut slow = TcpStream::connect(host.addr).await.expect("connect");
    let request = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Padding: aaaaaaaaaaaaaaaaaaaa\r\n\r\n";
    let mut closed = false;
    for byte in request {
        // Bounded by the request's length: 50 ms a byte, 3.5 s at most.
        tokio::time::sleep(Duration::from_millis(50)).await;
        if slow.write_all(&[*byte]).await.is_err() {
            closed = true;
            break;
        }
    }
    if !closed {
        let said = read_until_closed(&mut slow).await;
        assert!(
            !said.contains("200 OK"),
            "served after the deadline: {said}"
        );
    }
}

#[tokio::test]
async fn a_kept_alive_connection_that_goes_idle_is_closed() {
    let host = TestHost::start(short_timeouts()).await;
    let mut conn = TcpStream::connect(host.addr).await.expect("connect");
    conn.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .expect("write");
    let said = read_until_closed(&mut conn).await;
    assert!(said.starts_with("HTTP/1.1 200"), "{said}");
}

#[tokio::test]
async fn a_body_that_never_ends_is_answered_408() {
    let host = TestHost::start(short_timeouts()).await;
    let mut conn = TcpStream::connect(host.addr).await.expect("connect");
    let head = format!(
        "POST /api/v1/messages HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_KEY}\r\n\
         Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{{\"sender\":"
    );
    conn.write_all(head.as_bytes()).await.expect("write");
    let said = read_until_closed(&mut conn).await;
    assert!(said.starts_with("HTTP/1.1 408"), "{said}");
    assert!(said.contains(r#""code":"request_timeout""#), "{said}");
}

#[tokio::test]
async fn a_declared_body_over_the_limit_is_refused_at_once() {
    let host = TestHost::start(short_timeouts()).await;
    let mut conn = TcpStream::connect(host.addr).await.expect("connect");
    let head = format!(
        "POST /api/v1/messages HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_KEY}\r\n\
         Content-Type: application/json\r\nContent-Length: 100000000\r\n\r\n"
    );
    conn.write_all(head.as_bytes()).await.expect("write");
    let said = read_until_closed(&mut conn).await;
    assert!(said.starts_with("HTTP/1.1 413"), "{said}");
}

#[tokio::test]
async fn connections_over_the_cap_are_closed_and_the_node_recovers() {
    let host = TestHost::start(Options {
        max_http_connections: Some(4),
        ..short_timeouts()
    })
    .await;
    let mut idle = Vec::new();
    for _ in 0..4 {
        idle.push(TcpStream::connect(host.addr).await.expect("connect"));
    }
    // Every slot is taken: the node accepts a fifth and closes it at once.
    imhost_tests::eventually("a connection over the cap is closed", || async {
        let mut extra = TcpStream::connect(host.addr).await.ok()?;
        let mut byte = [0u8; 1];
        match tokio::time::timeout(Duration::from_millis(200), extra.read(&mut byte)).await {
            Ok(Ok(0)) => Some(()),
            _ => None,
        }
    })
    .await;
    // The idle ones time out, and the API answers again.
    imhost_tests::eventually("API reachable again", || async {
        let (status, _) = host.get_raw("/online").await;
        (status == 200).then_some(())
    })
    .await;
    assert!(host.stats().await.connections_refused_at_cap >= 1);
}

#[tokio::test]
async fn a_wrong_method_gets_the_json_error_body() {
    let host = TestHost::default().await;
    for (method, path) in [
        (reqwest::Method::POST, "/healthz"),
        (reqwest::Method::GET, "/api/v1/messages"),
        (reqwest::Method::DELETE, "/api/v1/channels"),
    ] {
        let response = host
            .http
            .request(method.clone(), host.url(path))
            .bearer_auth(API_KEY)
            .send()
            .await
            .expect("request");
        assert_eq!(response.status(), 405, "{method} {path}");
        let body: serde_json::Value = response.json().await.expect("json body");
        assert_eq!(
            body["error"]["code"], "method_not_allowed",
            "{method} {path}"
        );
    }
}

/// A WebSocket handshake request for `token`, with `key` and extra header lines.
pub(crate) fn handshake_request(token: &str, key: Option<&str>, extra: &str) -> String {
    let key = key
        .map(|k| format!("Sec-WebSocket-Key: {k}\r\n"))
        .unwrap_or_default();
    format!(
        "GET /ws?token={token} HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\n{key}{extra}\r\n"
    )
}

/// The token of a fresh connect URL for `client`.
pub(crate) async fn token_for(host: &TestHost, client: i64) -> String {
    let url = host.connect_url(client, None).await.url;
    url.rsplit("token=").next().expect("token").to_owned()
}

/// Sends a raw handshake for `token` with `key`; returns the status line and body.
async fn raw_handshake(host: &TestHost, token: &str, key: Option<&str>) -> String {
    let mut conn = TcpStream::connect(host.addr).await.expect("connect");
    let request = handshake_request(token, key, "");
    conn.write_all(request.as_bytes()).await.expect("write");
    let mut got = vec![0u8; 4096];
    let n = tokio::time::timeout(DEADLINE, conn.read(&mut got))
        .await
        .expect("answer in time")
        .expect("read");
    String::from_utf8_lossy(&got[..n]).into_owned()
}

#[tokio::test]
async fn bad_handshakes_are_refused_with_json_and_keep_the_token() {
    let host = TestHost::default().await;
    let token = token_for(&host, 5).await;
    for key in [None, Some("not-base64!"), Some("dGhlIHNhbXBsZSBub25jZQ")] {
        let said = raw_handshake(&host, &token, key).await;
        assert!(said.starts_with("HTTP/1.1 400"), "{key:?}: {said}");
        assert!(said.contains(r#""code":"bad_request""#), "{key:?}: {said}");
    }
    // Not a WebSocket request at all.
    let plain = host
        .http
        .get(format!("http://{}/ws?token={token}", host.addr))
        .send()
        .await
        .expect("request");
    assert_eq!(plain.status(), 400);
    let body: serde_json::Value = plain.json().await.expect("json body");
    assert_eq!(body["error"]["code"], "bad_request");
    // None of that used the single-use token.
    let said = raw_handshake(&host, &token, Some(VALID_KEY)).await;
    assert!(said.starts_with("HTTP/1.1 101"), "{said}");
}

/// A raw WebSocket connection after a real handshake, for frames a
/// well-behaved client library will not send.
pub(crate) async fn raw_socket(host: &TestHost, client: i64) -> TcpStream {
    let token = token_for(host, client).await;
    let mut conn = TcpStream::connect(host.addr).await.expect("connect");
    let request = handshake_request(&token, Some(VALID_KEY), "");
    conn.write_all(request.as_bytes()).await.expect("write");
    // Read the 101 response head, byte by byte up to the blank line.
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        tokio::time::timeout(DEADLINE, conn.read_exact(&mut byte))
            .await
            .expect("handshake in time")
            .expect("read");
        head.push(byte[0]);
    }
    assert!(
        head.starts_with(b"HTTP/1.1 101"),
        "{}",
        String::from_utf8_lossy(&head)
    );
    conn
}

/// One client frame: FIN, `opcode`, masked when `mask` is set.
fn frame(opcode: u8, payload: &[u8], mask: bool) -> Vec<u8> {
    imhost::ws::frame::client_frame(
        true,
        opcode,
        payload,
        mask.then_some([0x12, 0x34, 0x56, 0x78]),
    )
}

/// Reads server frames until a Close; returns its code.
pub(crate) async fn close_code(conn: &mut TcpStream) -> u16 {
    loop {
        let mut head = [0u8; 2];
        tokio::time::timeout(DEADLINE, conn.read_exact(&mut head))
            .await
            .expect("a frame in time")
            .expect("a close frame before the TCP close");
        let len = usize::from(head[1] & 0x7f);
        assert!(len < 126, "small frames only here");
        let mut payload = vec![0u8; len];
        conn.read_exact(&mut payload).await.expect("payload");
        if head[0] & 0x0f == 0x8 {
            return u16::from_be_bytes([payload[0], payload[1]]);
        }
    }
}

#[tokio::test]
async fn a_terminals_close_is_answered_with_its_code() {
    let host = TestHost::default().await;
    let mut conn = raw_socket(&host, 1).await;
    let mut payload = 4000u16.to_be_bytes().to_vec();
    payload.extend_from_slice(b"bye");
    conn.write_all(&frame(0x8, &payload, true))
        .await
        .expect("write close");
    assert_eq!(close_code(&mut conn).await, 4000);
}

#[tokio::test]
async fn protocol_violations_close_with_1002_or_1007_and_are_counted() {
    let host = TestHost::default().await;
    let cases: [(&str, Vec<u8>, u16); 3] = [
        ("invalid UTF-8", frame(0x1, &[0x68, 0xff, 0xfe], true), 1007),
        ("unmasked", frame(0x1, b"hello", false), 1002),
        ("reserved opcode", frame(0x3, b"?", true), 1002),
    ];
    for (client, (what, bytes, code)) in (1..).zip(cases) {
        let mut conn = raw_socket(&host, client).await;
        conn.write_all(&bytes).await.expect("write");
        assert_eq!(close_code(&mut conn).await, code, "{what}");
    }

    assert_eq!(host.stats().await.protocol_errors, 3);
    // Others are unaffected.
    let mut fine = host.terminal(4).await;
    host.send(0, &[4], serde_json::json!("still here"), false)
        .await;
    assert_eq!(fine.next_text().await, r#""still here""#);
}

#[tokio::test]
async fn an_idle_connection_flood_does_not_take_down_a_node_with_few_file_descriptors() {
    // The report: 2,000 idle TCP connections took down a node whose open-file
    // limit was 1024. Here: 400 against a limit of 256, bounded in count and
    // time, loopback only.
    let addr = imhost_tests::process::free_addr();
    let listen = addr.to_string();
    let process = imhost_tests::process::ImhostProcess::spawn_with_nofile(
        addr,
        &[
            "--listen",
            &listen,
            "--api-key",
            API_KEY,
            "--header-read-timeout",
            "1s",
        ],
        256,
    );
    let api = imhost_tests::api::Api::new(addr);
    api.wait_serving().await;
    let mut flood = Vec::new();
    for _ in 0..400 {
        // Connects past the cap are accepted and closed by the node; a
        // refused or reset connect is fine too: nothing piles up.
        if let Ok(Ok(conn)) =
            tokio::time::timeout(Duration::from_secs(2), TcpStream::connect(addr)).await
        {
            flood.push(conn);
        }
    }
    // The flood is still open on our side; the node times the idle ones out
    // and serves again: the API and a WebSocket connect both work.
    imhost_tests::eventually("the API answers during the flood", || async {
        let (status, _) = api.get_raw("/online").await;
        (status == 200).then_some(())
    })
    .await;
    let mut terminal = imhost_tests::eventually("a terminal connects", || async {
        let url = api
            .post_raw("/connect-url", serde_json::json!({"client_id": 9}))
            .await;
        let url = url.1["url"].as_str()?.to_owned();
        imhost_tests::terminal::Terminal::connect(&url).await.ok()
    })
    .await;
    api.send(0, &[9], serde_json::json!("through"), false).await;
    assert_eq!(terminal.next_text().await, r#""through""#);
    let stats = api.stats().await;
    assert!(
        stats.connections_refused_at_cap > 0 || stats.accept_errors > 0,
        "the flood was met at the cap: {stats:?}"
    );
    drop(flood);
    process.signal("TERM");
    let (status, log) = process.wait(DEADLINE).await;
    assert!(status.success(), "{log}");
    assert!(
        log.contains("up to 156 connections"),
        "the limit applied: {log}"
    );
}

/// Connects from `from` (another loopback address) to `to`.
async fn connect_from(from: &str, to: std::net::SocketAddr) -> TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket
        .bind(format!("{from}:0").parse().expect("addr"))
        .expect("bind a loopback source address");
    socket.connect(to).await.expect("connect")
}

/// True when the node closes `conn` at once (reads EOF within 200 ms).
async fn closed_at_once(conn: &mut TcpStream) -> bool {
    let mut byte = [0u8; 1];
    matches!(
        tokio::time::timeout(Duration::from_millis(200), conn.read(&mut byte)).await,
        Ok(Ok(0))
    )
}

#[tokio::test]
async fn one_address_cannot_take_every_connection_slot() {
    let host = TestHost::start(Options {
        max_connections_per_address: Some(3),
        ..Options::default()
    })
    .await;
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(connect_from("127.0.0.2", host.addr).await);
    }
    let mut fourth = connect_from("127.0.0.2", host.addr).await;
    assert!(closed_at_once(&mut fourth).await, "over its share");
    // Another address is served; so is the first once it lets go.
    let mut other = connect_from("127.0.0.3", host.addr).await;
    assert!(
        !closed_at_once(&mut other).await,
        "another address has room"
    );
    drop(held);
    imhost_tests::eventually("the address has room again", || async {
        let mut again = connect_from("127.0.0.2", host.addr).await;
        (!closed_at_once(&mut again).await).then_some(())
    })
    .await;
    assert!(host.stats().await.connections_refused_per_address >= 1);
}

#[tokio::test]
async fn connects_over_the_rate_of_an_address_get_429_and_proxies_are_honoured() {
    let host = TestHost::start(Options {
        connect_rate_per_address: Some(3),
        trusted_proxy_header: Some("X-Forwarded-For".into()),
        ..Options::default()
    })
    .await;
    // A burst from one client address (as the proxy reports it): three get
    // in, the fourth is told to wait.
    let mut statuses = Vec::new();
    for client in 0..4 {
        let token = token_for(&host, client).await;
        let mut conn = TcpStream::connect(host.addr).await.expect("connect");
        let request = handshake_request(
            &token,
            Some(VALID_KEY),
            "X-Forwarded-For: 203.0.113.9, 198.51.100.7\r\n",
        );
        conn.write_all(request.as_bytes()).await.expect("write");
        let mut head = vec![0u8; 1024];
        let n = tokio::time::timeout(DEADLINE, conn.read(&mut head))
            .await
            .expect("answer")
            .expect("read");
        let said = String::from_utf8_lossy(&head[..n]).into_owned();
        statuses.push(said[9..12].to_owned());
        if said.starts_with("HTTP/1.1 429") {
            assert!(
                said.to_ascii_lowercase().contains("retry-after: 1"),
                "{said}"
            );
            assert!(said.contains(r#""code":"too_many_requests""#), "{said}");
        }
    }
    assert_eq!(statuses, ["101", "101", "101", "429"]);
    // Another client address behind the same proxy is not affected.
    let token = token_for(&host, 9).await;
    let mut conn = TcpStream::connect(host.addr).await.expect("connect");
    let request = handshake_request(&token, Some(VALID_KEY), "X-Forwarded-For: 198.51.100.8\r\n");
    conn.write_all(request.as_bytes()).await.expect("write");
    let mut head = vec![0u8; 64];
    let n = conn.read(&mut head).await.expect("read");
    assert!(head[..n].starts_with(b"HTTP/1.1 101"));
    assert_eq!(host.stats().await.connects_rate_limited, 1);
}

/// Opens a connection from `from` (a loopback address) and writes `request`.
async fn send_from(from: &str, host: &TestHost, request: &str) -> TcpStream {
    let mut conn = connect_from(from, host.addr).await;
    conn.write_all(request.as_bytes()).await.expect("write");
    conn
}

/// The status code of the answer on `conn`.
async fn status_of(mut conn: TcpStream) -> String {
    let mut head = vec![0u8; 1024];
    let n = tokio::time::timeout(DEADLINE, conn.read(&mut head))
        .await
        .expect("answer")
        .expect("read");
    String::from_utf8_lossy(&head[9..12.min(n)]).into_owned()
}

/// The status codes of WebSocket handshakes from `from` for `clients`, with
/// `extra` headers, all sent at once (tokens fetched first).
async fn handshake_statuses(
    host: &TestHost,
    from: &str,
    clients: std::ops::Range<i64>,
    extra: &str,
) -> Vec<String> {
    let mut requests = Vec::new();
    for client in clients {
        let token = token_for(host, client).await;
        requests.push(handshake_request(&token, Some(VALID_KEY), extra));
    }
    let mut conns = Vec::new();
    for request in &requests {
        conns.push(send_from(from, host, request).await);
    }
    futures_util::future::join_all(conns.into_iter().map(status_of)).await
}

/// A per-address connect rate ships on (50 a second, in bursts of 50), and
/// loopback, where a local proxy naming no client puts everyone, is exempt.
#[tokio::test]
async fn a_default_connect_rate_limits_client_addresses_but_not_loopback() {
    let host = TestHost::start(Options {
        trusted_proxy_header: Some("X-Forwarded-For".into()),
        ..Options::default()
    })
    .await;
    // 120 handshakes at once from one client address: its burst of 50 (and
    // what refills while they are answered) gets in, the rest get 429.
    let proxied = "X-Forwarded-For: 203.0.113.50\r\n";
    let statuses = handshake_statuses(&host, "127.0.0.1", 0..120, proxied).await;
    let admitted = statuses.iter().filter(|s| *s == "101").count();
    let limited = statuses.iter().filter(|s| *s == "429").count();
    assert_eq!(admitted + limited, 120, "{statuses:?}");
    assert!((50..120).contains(&admitted), "{statuses:?}");
    assert_eq!(host.stats().await.connects_rate_limited, limited as u64);
    // As many from a loopback address, which names no client: all admitted.
    let local = handshake_statuses(&host, "127.0.0.3", 200..320, "").await;
    assert!(local.iter().all(|s| s == "101"), "{local:?}");
}

/// A peer that is not one of `trusted_proxies` cannot pick its address with
/// the proxy header: four connects from 127.0.0.2, each claiming another
/// client address, count against 127.0.0.2 itself.
#[tokio::test]
async fn a_forged_proxy_header_from_an_untrusted_peer_is_ignored() {
    let host = TestHost::start(Options {
        connect_rate_per_address: Some(3),
        trusted_proxy_header: Some("X-Forwarded-For".into()),
        trusted_proxies: Some(vec!["127.0.0.1".into()]),
        // Loopback is exempt by default; 127.0.0.2 plays an outside peer.
        connect_rate_exempt: Some(Vec::new()),
        ..Options::default()
    })
    .await;
    let mut statuses = Vec::new();
    for client in 0..4 {
        let token = token_for(&host, client).await;
        let forged = format!("X-Forwarded-For: 198.51.100.{client}\r\n");
        let request = handshake_request(&token, Some(VALID_KEY), &forged);
        statuses.push(status_of(send_from("127.0.0.2", &host, &request).await).await);
    }
    assert_eq!(statuses, ["101", "101", "101", "429"]);
    assert_eq!(host.stats().await.connects_rate_limited, 1);
}
