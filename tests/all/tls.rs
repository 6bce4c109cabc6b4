//! TLS (`--tls-cert`/`--tls-key`) with a certificate made in the test (rcgen)
//! and real clients that trust only it: reqwest for the API and `/metrics`,
//! tokio-tungstenite over tokio-rustls for a terminal on `wss://`. The socket
//! core drives the TLS connection itself, so this also covers its reads,
//! direct writes, writes the kernel refuses, control frames and the close.

use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use imhost_tests::api::API_KEY;
use imhost_tests::process::{ImhostProcess, free_addr};
use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;
use tokio_rustls::rustls;
use tokio_tungstenite::tungstenite::Message;

/// A self-signed certificate for 127.0.0.1, written as PEM files.
struct Certificate {
    dir: tempfile::TempDir,
    pem: String,
}

impl Certificate {
    fn new() -> Certificate {
        let made =
            rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned()]).expect("certificate");
        let dir = tempfile::tempdir().expect("dir");
        let pem = made.cert.pem();
        std::fs::write(dir.path().join("cert.pem"), &pem).expect("cert");
        std::fs::write(dir.path().join("key.pem"), made.signing_key.serialize_pem()).expect("key");
        Certificate { dir, pem }
    }

    fn path(&self, name: &str) -> String {
        self.dir
            .path()
            .join(name)
            .to_str()
            .expect("path")
            .to_owned()
    }

    /// A rustls client configuration that trusts this certificate alone.
    fn client_config(&self) -> Arc<rustls::ClientConfig> {
        use rustls::pki_types::CertificateDer;
        use rustls::pki_types::pem::PemObject;
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(self.pem.as_bytes()) {
            roots.add(cert.expect("pem")).expect("root");
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        Arc::new(
            rustls::ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .expect("versions")
                .with_root_certificates(roots)
                .with_no_client_auth(),
        )
    }

    fn http(&self) -> reqwest::Client {
        reqwest::Client::builder()
            .add_root_certificate(reqwest::Certificate::from_pem(self.pem.as_bytes()).expect("pem"))
            .build()
            .expect("client")
    }
}

/// A TLS node on a free port, serving once `/healthz` answers over HTTPS.
async fn tls_node(cert: &Certificate, http: &reqwest::Client) -> ImhostProcess {
    let addr = free_addr();
    let process = ImhostProcess::spawn(
        addr,
        &[
            "--listen",
            &addr.to_string(),
            "--api-key",
            API_KEY,
            "--tls-cert",
            &cert.path("cert.pem"),
            "--tls-key",
            &cert.path("key.pem"),
        ],
        &[],
    );
    imhost_tests::eventually("the node serves HTTPS", || async {
        let r = http
            .get(format!("https://{addr}/healthz"))
            .send()
            .await
            .ok()?;
        r.status().is_success().then_some(())
    })
    .await;
    process
}

async fn api(http: &reqwest::Client, node: &ImhostProcess, path: &str, body: Value) -> Value {
    let response = http
        .post(format!("https://{}/api/v1{path}", node.addr))
        .bearer_auth(API_KEY)
        .json(&body)
        .send()
        .await
        .expect("api call");
    assert!(
        response.status().is_success(),
        "{path}: {}",
        response.status()
    );
    response.json().await.expect("json")
}

/// `GET /api/v1{path}` over HTTPS; `None` when it cannot be had (yet).
async fn api_get(http: &reqwest::Client, node: &ImhostProcess, path: &str) -> Option<Value> {
    let response = http
        .get(format!("https://{}/api/v1{path}", node.addr))
        .bearer_auth(API_KEY)
        .send()
        .await
        .ok()?;
    response.json().await.ok()
}

type TlsTerminal =
    tokio_tungstenite::WebSocketStream<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>;

/// A terminal on `url` (`wss://127.0.0.1:P/ws?token=…`) over TLS, with a
/// tiny kernel receive buffer, so that the node's writes back up quickly
/// when it does not read.
async fn connect(cert: &Certificate, node: &ImhostProcess, url: &str) -> TlsTerminal {
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.set_recv_buffer_size(4096).expect("rcvbuf");
    let tcp = socket.connect(node.addr).await.expect("tcp");
    let name = rustls::pki_types::ServerName::IpAddress(node.addr.ip().into());
    let tls = tokio_rustls::TlsConnector::from(cert.client_config())
        .connect(name, tcp)
        .await
        .expect("TLS handshake");
    let (ws, _) = tokio_tungstenite::client_async(url, tls)
        .await
        .expect("WebSocket handshake");
    ws
}

/// The next text, pong or close, within the deadline.
async fn next(ws: &mut TlsTerminal) -> Message {
    loop {
        let message = tokio::time::timeout(imhost_tests::DEADLINE, ws.next())
            .await
            .expect("a frame before the deadline")
            .expect("open")
            .expect("frame");
        if !matches!(message, Message::Ping(_)) {
            return message;
        }
    }
}

#[tokio::test]
async fn api_metrics_and_terminals_work_over_tls() {
    let cert = Certificate::new();
    let http = cert.http();
    let node = tls_node(&cert, &http).await;

    let answer = api(&http, &node, "/connect-url", json!({"client_id": 7})).await;
    let url = answer["url"].as_str().expect("url");
    assert!(
        url.starts_with(&format!("wss://{}/ws?token=", node.addr)),
        "{url}"
    );
    let mut ws = connect(&cert, &node, url).await;
    imhost_tests::eventually("socket counted", || async {
        let info = api_get(&http, &node, "/clients/7").await?;
        (info["online"] == true).then_some(())
    })
    .await;

    // One message, then a burst the terminal does not read while it comes:
    // the kernel refuses records, which wait in rustls and go out in order.
    api(
        &http,
        &node,
        "/messages",
        json!({"sender": 0, "receivers": [7], "message": "first"}),
    )
    .await;
    assert_eq!(next(&mut ws).await, Message::text(r#""first""#));
    let big = "x".repeat(20_000);
    for i in 0..40 {
        api(
            &http,
            &node,
            "/messages",
            json!({"sender": 0, "receivers": [7], "message": {"i": i, "pad": big}}),
        )
        .await;
    }
    for i in 0..40 {
        let Message::Text(text) = next(&mut ws).await else {
            panic!("expected text");
        };
        let value: Value = serde_json::from_str(&text).expect("json");
        assert_eq!(value["i"], i);
    }

    // Terminal → node through TLS: a ping, and the keep-alive probe.
    ws.send(Message::Ping(b"tls".to_vec().into()))
        .await
        .expect("ping");
    assert_eq!(next(&mut ws).await, Message::Pong(b"tls".to_vec().into()));
    ws.send(Message::text("")).await.expect("probe");
    assert_eq!(next(&mut ws).await, Message::text(""));

    // /metrics over TLS.
    let metrics = http
        .get(format!("https://{}/metrics", node.addr))
        .send()
        .await
        .expect("scrape");
    assert_eq!(metrics.status(), 200);
    let body = metrics.text().await.expect("body");
    assert!(body.contains("imhost_connections 1"), "{body}");

    // Force-offline: the close frame arrives through TLS.
    api(&http, &node, "/clients/7/force-offline", json!({})).await;
    let Message::Close(Some(frame)) = next(&mut ws).await else {
        panic!("expected a close frame");
    };
    assert_eq!(u16::from(frame.code), 1008);
}

#[tokio::test]
async fn plain_http_on_a_tls_port_is_refused_and_counted() {
    let cert = Certificate::new();
    let http = cert.http();
    let node = tls_node(&cert, &http).await;
    let mut plain = tokio::net::TcpStream::connect(node.addr)
        .await
        .expect("tcp");
    plain
        .write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .expect("write");
    imhost_tests::eventually("the failed handshake counted", || async {
        let stats = api_get(&http, &node, "/stats").await?;
        (stats["tls_handshakes_failed"] == 1).then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_certificate_without_its_key_or_a_bad_key_stops_start_up() {
    let cert = Certificate::new();
    std::fs::write(cert.dir.path().join("bad.pem"), "not a key").expect("write");
    for (args, names) in [
        (vec!["--tls-cert", "cert.pem"], "tls_key"),
        (
            vec!["--tls-cert", "cert.pem", "--tls-key", "bad.pem"],
            "tls_key",
        ),
        (
            vec!["--tls-cert", "missing.pem", "--tls-key", "key.pem"],
            "tls_cert",
        ),
    ] {
        let args: Vec<String> = args
            .iter()
            .map(|a| {
                if a.ends_with(".pem") {
                    cert.path(a)
                } else {
                    (*a).to_owned()
                }
            })
            .collect();
        let addr = free_addr();
        let mut all = vec!["--listen".to_owned(), addr.to_string()];
        all.extend(args);
        let all: Vec<&str> = all.iter().map(String::as_str).collect();
        let process = ImhostProcess::spawn(addr, &all, &[]);
        let (status, output) = process.wait(Duration::from_secs(15)).await;
        assert!(!status.success(), "{all:?}");
        assert!(output.contains(&format!("`{names}`")), "{all:?}: {output}");
    }
}
