//! The socket core at the frame level, from raw TCP sockets: fragments and
//! partial reads across buffer boundaries, control frames between fragments,
//! size limits over whole messages, UTF-8 checked as bytes arrive, and writes
//! the kernel only partly takes.

use imhost::config::Options;
use imhost::ws::frame::{self, CONTINUATION, PING, PONG, TEXT};
use imhost_tests::DEADLINE;
use imhost_tests::host::TestHost;
use imhost_tests::plugins::{PluginDir, guests};
use imhost_tests::terminal::Terminal;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::hardening::{close_code, raw_socket};

const KEY: [u8; 4] = [0x5a, 0x01, 0xc3, 0x77];

/// A masked client frame of any length.
fn client_frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
    frame::client_frame(fin, opcode, payload, Some(KEY))
}

/// Reads one server frame: its opcode and payload.
async fn server_frame(conn: &mut TcpStream) -> (u8, Vec<u8>) {
    let read = async {
        let mut head = [0u8; 2];
        conn.read_exact(&mut head).await?;
        let len = match head[1] & 0x7f {
            126 => usize::from(conn.read_u16().await?),
            127 => usize::try_from(conn.read_u64().await?).expect("length"),
            n => usize::from(n),
        };
        let mut payload = vec![0u8; len];
        conn.read_exact(&mut payload).await?;
        std::io::Result::Ok((head[0] & 0x0f, payload))
    };
    tokio::time::timeout(DEADLINE, read)
        .await
        .expect("a frame in time")
        .expect("a frame")
}

/// A node with the echo-inbound test plugin; the directory must outlive it.
async fn host_with_echo() -> (TestHost, PluginDir) {
    let dir = PluginDir::new();
    dir.install("echo-inbound", guests::ECHO_INBOUND, "");
    let host = TestHost::start(Options {
        plugins: Some(dir.path().to_owned()),
        ..Options::default()
    })
    .await;
    host.plugin_where("echo-inbound", "loaded", |p| p["state"] == "active")
        .await;
    (host, dir)
}

#[tokio::test]
async fn fragments_sent_byte_by_byte_with_a_ping_between_them_make_one_message() {
    let (host, _dir) = host_with_echo().await;
    let mut conn = raw_socket(&host, 1).await;
    // `{"repeat":5,"x":"é"}` in three fragments, the é cut in two, and a
    // ping between the first two; every byte in its own write, so the node
    // sees frames cut at every possible point.
    let text = r#"{"repeat":5,"x":"é"}"#.as_bytes();
    let cut = text.len() - 3;
    let mut bytes = client_frame(false, TEXT, &text[..6]);
    bytes.extend(client_frame(true, PING, b"are you there"));
    bytes.extend(client_frame(false, CONTINUATION, &text[6..cut]));
    bytes.extend(client_frame(true, CONTINUATION, &text[cut..]));
    for byte in bytes {
        conn.write_all(&[byte]).await.expect("write");
    }
    assert_eq!(
        server_frame(&mut conn).await,
        (PONG, b"are you there".to_vec())
    );
    assert_eq!(
        server_frame(&mut conn).await,
        (TEXT, br#""xxxxx""#.to_vec())
    );
}

#[tokio::test]
async fn a_message_over_the_limit_in_fragments_closes_with_1009() {
    let host = TestHost::start(Options {
        max_frame_bytes: Some(1024),
        ..Options::default()
    })
    .await;
    let mut conn = raw_socket(&host, 1).await;
    let mut bytes = client_frame(false, TEXT, &[b'a'; 600]);
    bytes.extend(client_frame(true, CONTINUATION, &[b'a'; 600]));
    conn.write_all(&bytes).await.expect("write");
    assert_eq!(close_code(&mut conn).await, 1009);
    assert_eq!(host.stats().await.oversize_closed, 1);
}

#[tokio::test]
async fn invalid_utf8_closes_before_the_rest_of_a_large_frame_arrives() {
    let host = TestHost::start(Options {
        max_frame_bytes: Some(1 << 20),
        ..Options::default()
    })
    .await;
    let mut conn = raw_socket(&host, 1).await;
    // A 100,000-byte text frame whose third byte is not UTF-8: only its
    // first 16 bytes are ever sent, and the node answers 1007 at once.
    let mut payload = vec![b'a'; 100_000];
    payload[2] = 0xff;
    let frame = client_frame(true, TEXT, &payload);
    conn.write_all(&frame[..14 + 16]).await.expect("write");
    assert_eq!(close_code(&mut conn).await, 1007);
    assert_eq!(host.stats().await.protocol_errors, 1);
}

#[tokio::test]
async fn bursts_bigger_than_the_socket_buffers_arrive_whole_and_in_order() {
    // The terminal's small receive window makes the kernel take only part
    // of each write: the node keeps the rest and sends it as room appears.
    let host = TestHost::start(Options {
        outbound_queue: Some(1000),
        ..Options::default()
    })
    .await;
    let url = host.connect_url(1, None).await.url;
    let mut slow = Terminal::connect_small_window(&url).await.expect("connect");
    imhost_tests::eventually("connected", || async {
        host.client(1).await.online.then_some(())
    })
    .await;
    let payload = "y".repeat(50_000);
    for n in 0..80 {
        host.send(0, &[1], json!({"n": n, "p": payload}), false)
            .await;
    }
    for n in 0..80 {
        let value = slow.next_json().await;
        assert_eq!(value["n"], n, "in order");
        assert_eq!(value["p"].as_str().map(str::len), Some(50_000), "whole");
    }
    assert_eq!(host.stats().await.slow_consumers_closed, 0);
}

/// A terminal that pings without reading gets one pong waiting for it, not
/// one per ping: what the node holds for it stays bounded, the surplus is
/// counted, and the socket lives on.
#[tokio::test]
async fn a_ping_flood_without_reading_queues_one_pong_not_one_per_ping() {
    let host = TestHost::default().await;
    let token = host.connect_url(1, None).await.url;
    let token = token.rsplit("token=").next().expect("token").to_owned();
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.set_recv_buffer_size(4096).expect("rcvbuf");
    let mut conn = socket.connect(host.addr).await.expect("connect");
    let request = format!(
        "GET /ws?token={token} HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        host.addr
    );
    conn.write_all(request.as_bytes()).await.expect("handshake");
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        conn.read_exact(&mut byte).await.expect("101");
        head.push(byte[0]);
    }
    assert!(head.starts_with(b"HTTP/1.1 101"));
    // 6.4 MB of pings: more pongs than the kernel buffers of both ends hold.
    let ping = client_frame(true, PING, &[7u8; 125]);
    let burst: Vec<u8> = ping.repeat(1000);
    let mut rounds = 0;
    while host.stats().await.pongs_coalesced == 0 {
        rounds += 1;
        assert!(rounds <= 200, "200,000 pings and not one pong coalesced");
        tokio::time::timeout(DEADLINE, conn.write_all(&burst))
            .await
            .expect("the node keeps reading pings")
            .expect("pings");
    }
    assert_eq!(host.stats().await.slow_consumers_closed, 0);
    // Reading again, the terminal gets its pongs and then a message: the
    // socket lived on.
    host.send(0, &[1], json!("after"), false).await;
    loop {
        let (opcode, payload) = server_frame(&mut conn).await;
        if opcode == TEXT {
            assert_eq!(payload, br#""after""#);
            break;
        }
        assert_eq!(opcode, PONG);
    }
}
