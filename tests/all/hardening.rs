//! What a hostile or broken peer does to the HTTP side: connections that send
//! nothing, headers and bodies that trickle in, more connections than the node
//! takes. Each is closed or answered within its configured bound.

use std::time::Duration;

use imhost::config::Options;
use imhost_tests::DEADLINE;
use imhost_tests::host::{API_KEY, TestHost};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

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

/// Sends a raw handshake for `token` with `key`; returns the status line and body.
async fn raw_handshake(host: &TestHost, token: &str, key: Option<&str>) -> String {
    let mut conn = TcpStream::connect(host.addr).await.expect("connect");
    let mut request = format!(
        "GET /ws?token={token} HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\n"
    );
    if let Some(key) = key {
        request.push_str(&format!("Sec-WebSocket-Key: {key}\r\n"));
    }
    request.push_str("\r\n");
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
    let url = host.connect_url(5, None).await.url;
    let token = url.rsplit("token=").next().expect("token").to_owned();
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
    let said = raw_handshake(&host, &token, Some("dGhlIHNhbXBsZSBub25jZQ==")).await;
    assert!(said.starts_with("HTTP/1.1 101"), "{said}");
}
