//! Run with `scripts/bench` (builds in release, starts both servers itself).
//!
//! Measures one imhost node (embedded mode) and, in the same run, a baseline:
//! a bare axum WebSocket server with the same socket settings that does nothing
//! but hold sockets and write frames. Figures are reported as imhost/baseline
//! ratios, so they compare across machines.
//!
//! - connects/s: N terminals connect with 64 in flight (imhost: connect-url
//!   call + upgrade; baseline: upgrade only).
//! - memory per connection: the server's RSS growth over N idle sockets / N.
//! - fan-out frames/s: B broadcasts to N sockets, until every terminal has
//!   every frame (imhost: `POST /api/v1/broadcast`; baseline: an internal loop).
//! - direct messages/s: `POST /api/v1/messages` to one receiver, 32 callers.
//!
//! Then the cluster: a `redis-server` and three imhost nodes, against one
//! embedded node as the baseline. Messages go into node 0's API, one receiver
//! each, round-robin over receivers spread evenly over the nodes (so in the
//! cluster two thirds cross nodes through Redis); 32 callers. Reported:
//! delivered messages/s and the latency from API call to terminal (p50, p99).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use futures_util::StreamExt;
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;

const API_KEY: &str = "bench-api-key-0123456789";

#[derive(Parser)]
struct Args {
    /// Idle connections to open (each costs the bench and the server one fd).
    #[arg(long, default_value_t = 5000)]
    connections: usize,
    /// Broadcasts to send to all connections.
    #[arg(long, default_value_t = 50)]
    broadcasts: usize,
    /// Direct messages to send.
    #[arg(long, default_value_t = 20000)]
    messages: usize,
    /// The imhost binary to measure.
    #[arg(long, default_value = "target/release/imhost")]
    imhost: PathBuf,
    /// Receivers for the cluster scenario.
    #[arg(long, default_value_t = 300)]
    receivers: usize,
    /// Skip the cluster scenario (it needs redis-server).
    #[arg(long)]
    no_cluster: bool,
    /// Internal: run the baseline server on this address.
    #[arg(long, hide = true)]
    baseline_server: Option<SocketAddr>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if let Some(addr) = args.baseline_server {
        return baseline::serve(addr).await;
    }
    let imhost = measure(&args, Target::Imhost).await.context("imhost run")?;
    let bare = measure(&args, Target::Baseline)
        .await
        .context("baseline run")?;
    println!(
        "\n{:<28}{:>14}{:>14}{:>10}",
        "figure", "imhost", "baseline", "ratio"
    );
    let row = |name: &str, a: f64, b: f64| {
        println!("{name:<28}{a:>14.0}{b:>14.0}{:>10.2}", a / b);
    };
    row("connects/s", imhost.connects_per_sec, bare.connects_per_sec);
    row(
        "bytes RSS per connection",
        imhost.bytes_per_conn,
        bare.bytes_per_conn,
    );
    row(
        "fan-out frames/s",
        imhost.fanout_frames_per_sec,
        bare.fanout_frames_per_sec,
    );
    if let Some(direct) = imhost.direct_per_sec {
        println!(
            "{:<28}{direct:>14.0}{:>14}{:>10}",
            "direct messages/s", "-", "-"
        );
    }
    println!(
        "\n{} connections, {} broadcasts of a 40-byte message, {} direct messages",
        args.connections, args.broadcasts, args.messages
    );
    if !args.no_cluster {
        cluster::compare(&args).await?;
    }
    Ok(())
}

#[derive(Clone, Copy, PartialEq)]
enum Target {
    Imhost,
    Baseline,
}

struct Figures {
    connects_per_sec: f64,
    bytes_per_conn: f64,
    fanout_frames_per_sec: f64,
    direct_per_sec: Option<f64>,
}

async fn measure(args: &Args, target: Target) -> anyhow::Result<Figures> {
    let addr = free_addr()?;
    let mut child = match target {
        Target::Imhost => tokio::process::Command::new(&args.imhost)
            .args(["--listen", &addr.to_string(), "--api-key", API_KEY])
            .args(["--heartbeat-interval", "60s", "--heartbeat-timeout", "120s"])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("start {}", args.imhost.display()))?,
        Target::Baseline => tokio::process::Command::new(std::env::current_exe()?)
            .args(["--baseline-server", &addr.to_string()])
            .kill_on_drop(true)
            .spawn()?,
    };
    let pid = child.id().context("child pid")?;
    let http = reqwest::Client::new();
    wait_serving(&http, addr).await?;
    let rss_before = rss_bytes(pid)?;

    // Connect N terminals.
    let started = Instant::now();
    let gate = Arc::new(Semaphore::new(64));
    let mut tasks = Vec::with_capacity(args.connections);
    for i in 0..args.connections {
        let (gate, http) = (gate.clone(), http.clone());
        tasks.push(tokio::spawn(async move {
            let _permit = gate.acquire().await?;
            let url = match target {
                Target::Imhost => connect_url(&http, addr, i as i64 + 1).await?,
                Target::Baseline => format!("ws://{addr}/ws"),
            };
            let tcp = TcpStream::connect(addr).await?;
            let (ws, _) = tokio_tungstenite::client_async(url, tcp).await?;
            anyhow::Ok(ws)
        }));
    }
    let mut sockets = Vec::with_capacity(args.connections);
    for task in tasks {
        sockets.push(task.await??);
    }
    let connects_per_sec = args.connections as f64 / started.elapsed().as_secs_f64();
    // Let the server finish per-socket bookkeeping before reading its memory.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let bytes_per_conn =
        (rss_bytes(pid)?.saturating_sub(rss_before)) as f64 / args.connections as f64;

    // Fan-out: every terminal counts frames until it has them all.
    let received = Arc::new(AtomicU64::new(0));
    let expected = (args.connections * args.broadcasts) as u64;
    let readers: Vec<_> = sockets
        .into_iter()
        .map(|ws| tokio::spawn(count_frames(ws, args.broadcasts, received.clone())))
        .collect();
    let started = Instant::now();
    match target {
        Target::Imhost => {
            for n in 0..args.broadcasts {
                api(
                    &http,
                    addr,
                    "/broadcast",
                    serde_json::json!({"message": {"n": n, "t": "broadcast-payload"}}),
                )
                .await?;
            }
        }
        Target::Baseline => {
            http.post(format!("http://{addr}/push?n={}", args.broadcasts))
                .send()
                .await?
                .error_for_status()?;
        }
    }
    for reader in readers {
        reader.await??;
    }
    let fanout_frames_per_sec = expected as f64 / started.elapsed().as_secs_f64();
    if received.load(Ordering::Relaxed) != expected {
        bail!("lost frames");
    }

    let direct_per_sec = match target {
        Target::Imhost => Some(direct_messages(&http, addr, args.messages).await?),
        Target::Baseline => None,
    };
    child.start_kill()?;
    let _ = child.wait().await;
    Ok(Figures {
        connects_per_sec,
        bytes_per_conn,
        fanout_frames_per_sec,
        direct_per_sec,
    })
}

async fn direct_messages(
    http: &reqwest::Client,
    addr: SocketAddr,
    total: usize,
) -> anyhow::Result<f64> {
    let url = connect_url(http, addr, 0).await?;
    let tcp = TcpStream::connect(addr).await?;
    let (ws, _) = tokio_tungstenite::client_async(url, tcp).await?;
    let received = Arc::new(AtomicU64::new(0));
    let reader = tokio::spawn(count_frames(ws, total, received));
    let started = Instant::now();
    let gate = Arc::new(Semaphore::new(32));
    let mut calls = Vec::with_capacity(total);
    for n in 0..total {
        let (gate, http) = (gate.clone(), http.clone());
        calls.push(tokio::spawn(async move {
            let _permit = gate.acquire().await?;
            api(
                &http,
                addr,
                "/messages",
                serde_json::json!({"sender": 1, "receivers": [0], "message": {"n": n}}),
            )
            .await
        }));
    }
    for call in calls {
        call.await??;
    }
    reader.await??;
    Ok(total as f64 / started.elapsed().as_secs_f64())
}

async fn count_frames(
    mut ws: WebSocketStream<TcpStream>,
    want: usize,
    received: Arc<AtomicU64>,
) -> anyhow::Result<()> {
    let mut got = 0;
    while got < want {
        match tokio::time::timeout(Duration::from_secs(60), ws.next()).await? {
            Some(Ok(Message::Text(_))) => {
                got += 1;
                received.fetch_add(1, Ordering::Relaxed);
            }
            Some(Ok(_)) => {}
            other => bail!("socket ended early: {other:?}"),
        }
    }
    let _ = ws.close(None).await;
    Ok(())
}

async fn api(
    http: &reqwest::Client,
    addr: SocketAddr,
    path: &str,
    body: serde_json::Value,
) -> anyhow::Result<serde_json::Value> {
    Ok(http
        .post(format!("http://{addr}/api/v1{path}"))
        .bearer_auth(API_KEY)
        .json(&body)
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?)
}

async fn connect_url(
    http: &reqwest::Client,
    addr: SocketAddr,
    client: i64,
) -> anyhow::Result<String> {
    let answer = api(
        http,
        addr,
        "/connect-url",
        serde_json::json!({"client_id": client}),
    )
    .await?;
    answer["url"].as_str().map(str::to_owned).context("no url")
}

async fn wait_serving(http: &reqwest::Client, addr: SocketAddr) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if let Ok(r) = http.get(format!("http://{addr}/healthz")).send().await
            && r.status().is_success()
        {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bail!("server at {addr} did not come up")
}

fn free_addr() -> anyhow::Result<SocketAddr> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

fn rss_bytes(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .context("no VmRSS")?;
    let kb: u64 = line
        .split_whitespace()
        .nth(1)
        .context("VmRSS value")?
        .parse()?;
    Ok(kb * 1024)
}

/// The baseline: a bare axum WebSocket server with imhost's socket settings,
/// holding each socket in one task with a bounded queue, as imhost does, but
/// without tokens, presence, registry or dispatcher.
mod baseline {
    use std::collections::HashMap;
    use std::net::SocketAddr;
    use std::sync::{Arc, Mutex};

    use axum::Router;
    use axum::extract::ws::{Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
    use axum::extract::{Query, State};
    use axum::routing::{get, post};
    use tokio::sync::mpsc;

    type Sockets = Arc<Mutex<HashMap<u64, mpsc::Sender<Utf8Bytes>>>>;

    pub async fn serve(addr: SocketAddr) -> anyhow::Result<()> {
        let sockets: Sockets = Arc::default();
        let app = Router::new()
            .route("/ws", get(upgrade))
            .route("/push", post(push))
            .route("/healthz", get(|| async { "ok" }))
            .with_state(sockets);
        let socket = tokio::net::TcpSocket::new_v4()?;
        socket.set_reuseaddr(true)?;
        socket.bind(addr)?;
        axum::serve(socket.listen(4096)?, app).await?;
        Ok(())
    }

    async fn upgrade(
        State(sockets): State<Sockets>,
        ws: WebSocketUpgrade,
    ) -> axum::response::Response {
        ws.read_buffer_size(4096)
            .on_upgrade(move |socket| hold(socket, sockets))
    }

    async fn hold(mut socket: WebSocket, sockets: Sockets) {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let id = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let (tx, mut rx) = mpsc::channel(256);
        sockets.lock().expect("lock").insert(id, tx);
        loop {
            tokio::select! {
                Some(text) = rx.recv() => if socket.send(Message::Text(text)).await.is_err() { break },
                frame = socket.recv() => if !matches!(frame, Some(Ok(_))) { break },
            }
        }
        sockets.lock().expect("lock").remove(&id);
    }

    #[derive(serde::Deserialize)]
    struct Push {
        n: usize,
    }

    async fn push(State(sockets): State<Sockets>, Query(push): Query<Push>) -> &'static str {
        for n in 0..push.n {
            let text = Utf8Bytes::from(format!("{{\"n\":{n},\"t\":\"broadcast-payload\"}}"));
            let senders: Vec<_> = sockets.lock().expect("lock").values().cloned().collect();
            for tx in senders {
                let _ = tx.send(text.clone()).await;
            }
        }
        "ok"
    }
}

/// Cross-node delivery through Redis against one embedded node.
mod cluster {
    use std::net::SocketAddr;
    use std::process::Stdio;
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use anyhow::Context;
    use futures_util::StreamExt;
    use tokio::net::TcpStream;
    use tokio::process::{Child, Command};
    use tokio::sync::{Mutex, Semaphore};
    use tokio_tungstenite::tungstenite::Message;

    use super::{API_KEY, Args, api, connect_url, free_addr, wait_serving};

    struct Run {
        per_sec: f64,
        p50_us: u64,
        p99_us: u64,
    }

    pub async fn compare(args: &Args) -> anyhow::Result<()> {
        let embedded = {
            let addr = free_addr()?;
            let _node = spawn_node(args, addr, &[])?;
            run(args, &[addr]).await.context("embedded run")?
        };
        let clustered = {
            let redis_port = free_addr()?.port();
            let _redis = Command::new("redis-server")
                .args([
                    "--port",
                    &redis_port.to_string(),
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                ])
                .stdout(Stdio::null())
                .kill_on_drop(true)
                .spawn()
                .context("start redis-server")?;
            let addrs: Vec<SocketAddr> = (0..3).map(|_| free_addr()).collect::<Result<_, _>>()?;
            let servers = addrs
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(",");
            let redis_url = format!("redis://127.0.0.1:{redis_port}/");
            tokio::time::sleep(Duration::from_millis(300)).await;
            let mut nodes = Vec::new();
            for addr in &addrs {
                let name = addr.to_string();
                nodes.push(spawn_node(
                    args,
                    *addr,
                    &[
                        "--server",
                        &name,
                        "--servers",
                        &servers,
                        "--redis",
                        &redis_url,
                    ],
                )?);
            }
            run(args, &addrs).await.context("cluster run")?
        };
        println!(
            "\n{:<28}{:>14}{:>14}{:>10}",
            "cross-node delivery", "3 nodes", "1 node", "ratio"
        );
        println!(
            "{:<28}{:>14.0}{:>14.0}{:>10.2}",
            "messages/s",
            clustered.per_sec,
            embedded.per_sec,
            clustered.per_sec / embedded.per_sec
        );
        println!(
            "{:<28}{:>14}{:>14}{:>10.2}",
            "latency p50 (µs)",
            clustered.p50_us,
            embedded.p50_us,
            clustered.p50_us as f64 / embedded.p50_us.max(1) as f64
        );
        println!(
            "{:<28}{:>14}{:>14}{:>10.2}",
            "latency p99 (µs)",
            clustered.p99_us,
            embedded.p99_us,
            clustered.p99_us as f64 / embedded.p99_us.max(1) as f64
        );
        println!(
            "\n{} messages into node 0's API, 32 callers, {} receivers spread over the nodes",
            args.messages, args.receivers
        );
        Ok(())
    }

    fn spawn_node(args: &Args, addr: SocketAddr, extra: &[&str]) -> anyhow::Result<Child> {
        Command::new(&args.imhost)
            .args(["--listen", &addr.to_string(), "--api-key", API_KEY])
            .args(extra)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("start {}", args.imhost.display()))
    }

    async fn run(args: &Args, nodes: &[SocketAddr]) -> anyhow::Result<Run> {
        let http = reqwest::Client::new();
        for &node in nodes {
            wait_serving(&http, node).await?;
        }
        let entry = nodes[0];
        let epoch = Instant::now();
        let latencies = Arc::new(Mutex::new(Vec::with_capacity(args.messages)));
        let per_receiver = args.messages.div_ceil(args.receivers);
        let mut readers = Vec::new();
        // Client ids 1..=R: partitioning spreads them evenly over the nodes.
        for id in 1..=args.receivers as i64 {
            let url = connect_url(&http, entry, id).await?;
            let host = url
                .trim_start_matches("ws://")
                .split('/')
                .next()
                .context("host")?
                .to_owned();
            let tcp = TcpStream::connect(host).await?;
            let (mut ws, _) = tokio_tungstenite::client_async(url, tcp).await?;
            let want = (0..args.messages)
                .filter(|n| n % args.receivers == (id - 1) as usize)
                .count();
            let latencies = latencies.clone();
            readers.push(tokio::spawn(async move {
                let mut got = Vec::with_capacity(per_receiver);
                while got.len() < want {
                    match tokio::time::timeout(Duration::from_secs(60), ws.next()).await? {
                        Some(Ok(Message::Text(text))) => {
                            let sent: u64 = serde_json::from_str::<serde_json::Value>(&text)?["t"]
                                .as_u64()
                                .context("t")?;
                            got.push(epoch.elapsed().as_micros() as u64 - sent);
                        }
                        Some(Ok(_)) => {}
                        other => anyhow::bail!("socket ended: {other:?}"),
                    }
                }
                latencies.lock().await.extend(got);
                anyhow::Ok(())
            }));
        }
        // Every receiver is online in the cluster before traffic starts.
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let online = http
                .get(format!("http://{entry}/api/v1/online"))
                .bearer_auth(API_KEY)
                .send()
                .await?
                .json::<Vec<i64>>()
                .await?;
            if online.len() == args.receivers {
                break;
            }
            anyhow::ensure!(Instant::now() < deadline, "receivers not online");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let started = Instant::now();
        let gate = Arc::new(Semaphore::new(32));
        let mut calls = Vec::with_capacity(args.messages);
        for n in 0..args.messages {
            let (gate, http) = (gate.clone(), http.clone());
            let receiver = (n % args.receivers) as i64 + 1;
            calls.push(tokio::spawn(async move {
                let _permit = gate.acquire().await?;
                let t = epoch.elapsed().as_micros() as u64;
                api(&http, entry, "/messages", serde_json::json!({"sender": 0, "receivers": [receiver], "message": {"n": n, "t": t}})).await
            }));
        }
        for call in calls {
            call.await??;
        }
        for reader in readers {
            reader.await??;
        }
        let per_sec = args.messages as f64 / started.elapsed().as_secs_f64();
        let mut all = latencies.lock().await.clone();
        all.sort_unstable();
        let at = |q: f64| all[((all.len() as f64 * q) as usize).min(all.len() - 1)];
        Ok(Run {
            per_sec,
            p50_us: at(0.50),
            p99_us: at(0.99),
        })
    }
}
