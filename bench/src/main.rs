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
use std::path::{Path, PathBuf};
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

mod api_load;
mod big_cluster;
mod languages;
mod redis_cluster;
mod saturation;
mod soak;
mod sockets;
mod source_ports;
mod swap;

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
    /// A second imhost binary, measured in the same interleaved runs as
    /// `--imhost` in `--only-sockets` (an A/B of two builds).
    #[arg(long, value_name = "BIN")]
    imhost_b: Option<PathBuf>,
    /// The guest plugins of `--imhost-b` (default: `--guests`).
    #[arg(long, value_name = "DIR")]
    guests_b: Option<PathBuf>,
    /// Receivers for the cluster scenario.
    #[arg(long, default_value_t = 300)]
    receivers: usize,
    /// Skip the cluster scenario (it needs redis-server).
    #[arg(long)]
    no_cluster: bool,
    /// Skip the plugin scenarios.
    #[arg(long)]
    no_plugins: bool,
    /// Only the plugin scenarios.
    #[arg(long)]
    only_plugins: bool,
    /// Only the plugins-in-every-language scenarios (needs
    /// `examples/plugins/build` first).
    #[arg(long)]
    only_languages: bool,
    /// Run the soak for this many seconds instead (outside CI; writes
    /// target/soak.csv).
    #[arg(long, value_name = "SECONDS")]
    soak: Option<u64>,
    /// Compiled-plugin cache of the nodes under test.
    #[arg(long, default_value = "target/bench-plugin-cache")]
    plugin_cache: PathBuf,
    /// Where the built guest plugins are (scripts/bench builds them).
    #[arg(long, default_value = "target/plugins/wasm32-wasip2/release")]
    guests: PathBuf,
    /// Only the socket-core scenarios: floor, baseline and imhost at each
    /// of `--socket-counts`, then a rate sweep.
    #[arg(long)]
    only_sockets: bool,
    /// Socket counts for `--only-sockets`.
    #[arg(long, value_delimiter = ',', default_value = "1000,19000")]
    socket_counts: Vec<usize>,
    /// Deliveries per second offered in `--only-sockets`.
    #[arg(long, default_value_t = 100_000)]
    rate: u64,
    /// Seconds of offered load per `--only-sockets` run.
    #[arg(long, default_value_t = 3)]
    seconds: u64,
    /// Runs per server and socket count in `--only-sockets` (medians kept).
    #[arg(long, default_value_t = 3)]
    repeat: usize,
    /// The plugins imhost runs with in `--only-sockets`, comma-separated,
    /// from `word-filter` and `welcome` (each with its shipped manifest).
    #[arg(long, value_delimiter = ',', default_value = "word-filter,welcome")]
    sockets_plugins: Vec<String>,
    /// Run imhost without plugins in `--only-sockets` (what the plugins
    /// cost): `--sockets-plugins` with none.
    #[arg(long)]
    sockets_without_plugins: bool,
    /// The plugins of the second imhost in `--only-sockets` (`none` for
    /// none; default: as the first). With it, the second imhost runs even
    /// without `--imhost-b`: what a plugin set costs, measured in the same
    /// interleaved runs.
    #[arg(long, value_delimiter = ',', value_name = "LIST")]
    sockets_plugins_b: Option<Vec<String>>,
    /// The bare axum baseline of `--only-sockets` sends each new socket a
    /// greeting frame, as imhost's `welcome` plugin does: the same visible
    /// work on both sides of the connects/s ratio.
    #[arg(long)]
    baseline_greets: bool,
    /// In `--only-sockets`, run each server on CPU 0 and the load generator
    /// on the other CPUs (`taskset`), as if they were separate machines:
    /// unpinned, the server's cost per write depends on what the load
    /// generator is doing on the same cores (a write that must wake an
    /// idle core costs more), and an A/B of one build against itself
    /// varies by about 7 % instead of 1 %.
    #[arg(long)]
    pin: bool,
    /// Only the saturation scenario: the baseline and imhost, each on K
    /// cores of `--server-cores` with the load generator on the others,
    /// offered `--saturation-rate` deliveries/s to `--saturation-sockets`
    /// sockets in one channel (see `bench/src/saturation.rs`).
    #[arg(long)]
    only_saturation: bool,
    /// Server core counts K of `--only-saturation` (CPUs 0..K-1; the load
    /// generator gets the rest; a K the machine cannot leave a core beside
    /// runs unpinned).
    #[arg(long, value_delimiter = ',', default_value = "1,2,4,8")]
    server_cores: Vec<usize>,
    /// Sockets of `--only-saturation`, all in one channel.
    #[arg(long, default_value_t = 10_000)]
    saturation_sockets: usize,
    /// Deliveries per second offered in `--only-saturation`: far above what
    /// the server can write.
    #[arg(long, default_value_t = 2_000_000)]
    saturation_rate: u64,
    /// The servers `--only-saturation` measures, in this order: `baseline`
    /// (a bounded queue per socket), `broadcast` (one broadcast channel,
    /// the issue's baseline) and `imhost`.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "baseline,broadcast,imhost"
    )]
    saturation_servers: Vec<String>,
    /// Connects per second, during `--only-saturation`'s imhost runs, of
    /// clients outside the channel, each closed again 16 connects later:
    /// a node whose clients come and go while a big channel is busy (the
    /// baselines have no clients outside their one channel). 0: none.
    #[arg(long, default_value_t = 0)]
    saturation_churn: u64,
    /// How long `--only-saturation` waits after the last publish for what
    /// was accepted to arrive; what has not by then counts as lost.
    #[arg(long, default_value_t = 10)]
    drain_seconds: u64,
    /// Only the API scenario: direct messages through `POST /api/v1/messages`
    /// (HTTP/1.1 and h2c) and `POST /api/v1/batch`, imhost on each K of
    /// `--server-cores` (see `bench/src/api_load.rs`).
    #[arg(long)]
    only_api: bool,
    /// Terminals of `--only-api`: each message goes to one of them.
    #[arg(long, default_value_t = 1000)]
    api_receivers: usize,
    /// Requests in flight in `--only-api` (batch callers: an eighth as many).
    #[arg(long, default_value_t = 256)]
    api_in_flight: usize,
    /// Messages per batch request in `--only-api`.
    #[arg(long, default_value_t = 100)]
    api_batch: usize,
    /// Only the swap scenario: a new JavaScript filter written while the
    /// optimized builds of four JavaScript and Python examples run, against
    /// the same swap on an idle node, and cold against cached memory (see
    /// `bench/src/swap.rs`; needs `examples/plugins/build`).
    #[arg(long)]
    only_swap: bool,
    /// Only the Redis Cluster scenario: deliveries through one Redis and a
    /// Redis Cluster of 1 and 3 masters, 3 and 6 nodes, with Redis CPU per
    /// delivery, then presence churn (`bench/src/redis_cluster.rs`).
    #[arg(long)]
    only_redis_cluster: bool,
    /// Only the presence churn of `--only-redis-cluster`.
    #[arg(long)]
    only_presence_churn: bool,
    /// Skip the latency-against-rate sweep of `--only-sockets`.
    #[arg(long)]
    no_sweep: bool,
    /// Where `--only-sockets` writes its curves (memory.csv, latency.csv).
    #[arg(long)]
    csv: Option<PathBuf>,
    /// Only the local-cluster scenario: six nodes, one Redis, this many
    /// connections (needs an open-file limit of about 20,000).
    #[arg(long, value_name = "CONNECTIONS")]
    big_cluster: Option<usize>,
    /// Internal: hold terminals for the big cluster, via this node's API.
    #[arg(long, hide = true)]
    hold: Option<SocketAddr>,
    /// Internal: the client ids a holder connects, FIRST-LAST.
    #[arg(long, hide = true)]
    hold_range: Option<String>,
    /// Internal: run the baseline server on this address.
    #[arg(long, hide = true)]
    baseline_server: Option<SocketAddr>,
    /// Internal: the baseline server pushes through one broadcast channel
    /// (see `saturation::Server::Broadcast`).
    #[arg(long, hide = true)]
    baseline_broadcast: bool,
    /// Internal: run the raw-write floor server on this address.
    #[arg(long, hide = true)]
    floor_server: Option<SocketAddr>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if let Some(addr) = args.baseline_server {
        return baseline::serve(addr, args.baseline_greets, args.baseline_broadcast).await;
    }
    if let Some(addr) = args.floor_server {
        return sockets::floor::serve(addr).await;
    }
    if args.only_sockets {
        return sockets::compare(&args).await;
    }
    if args.only_saturation {
        return saturation::run(&args).await;
    }
    if args.only_api {
        return api_load::run(&args).await;
    }
    if args.only_swap {
        return swap::run(&args).await;
    }
    if args.only_redis_cluster {
        return redis_cluster::run(&args).await;
    }
    if args.only_presence_churn {
        return redis_cluster::run_churn(&args).await;
    }
    if let Some(entry) = args.hold {
        let range = args.hold_range.as_deref().unwrap_or("1-1");
        return big_cluster::hold(entry, range, args.big_cluster.unwrap_or(0)).await;
    }
    if let Some(total) = args.big_cluster {
        return big_cluster::run(&args, total).await;
    }
    if args.only_plugins {
        return plugins::compare(&args).await;
    }
    if args.only_languages {
        return languages::compare(&args).await;
    }
    if let Some(seconds) = args.soak {
        return soak::run(&args, seconds).await;
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
    if !args.no_plugins {
        plugins::compare(&args).await?;
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

/// Starts the imhost under test on `addr` with `extra` arguments; it is
/// killed when the handle drops.
fn spawn_imhost(
    args: &Args,
    addr: SocketAddr,
    extra: &[&str],
) -> anyhow::Result<tokio::process::Child> {
    spawn_imhost_bin(&args.imhost, args, addr, extra)
}

/// [`spawn_imhost`] of another binary than `--imhost`.
fn spawn_imhost_bin(
    bin: &Path,
    args: &Args,
    addr: SocketAddr,
    extra: &[&str],
) -> anyhow::Result<tokio::process::Child> {
    tokio::process::Command::new(bin)
        .args(["--listen", &addr.to_string(), "--api-key", API_KEY])
        .args(extra)
        // The nodes' log level (their standard error is the bench's):
        // `IMHOST_BENCH_NODE_LOG=imhost=debug` shows, say, a swap's build time.
        .env(
            "RUST_LOG",
            std::env::var("IMHOST_BENCH_NODE_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .env("IMHOST_PLUGIN_CACHE", &args.plugin_cache)
        .env("IMHOST_PLUGIN_GRANTS", shipped_grants())
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("start {}", bin.display()))
}

/// The grants file of the plugins we ship (`plugins/grants.toml`).
fn shipped_grants() -> PathBuf {
    repo_path("plugins/grants.toml")
}

/// A path of this repository: under the working directory when the bench
/// runs from a checkout's root (as `scripts/bench` and `scripts/device-bench`
/// run it, wherever that checkout is), else where the bench was built.
pub(crate) fn repo_path(relative: &str) -> PathBuf {
    let here = Path::new(relative);
    match std::path::absolute(here) {
        Ok(absolute) if absolute.exists() => absolute,
        _ => Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("..")
            .join(relative),
    }
}

/// A `redis-server` of the bench's own on loopback `port`, keeping nothing on
/// disk, with `extra` arguments; killed when the handle drops.
fn start_redis(port: u16, extra: &[&str]) -> anyhow::Result<tokio::process::Child> {
    tokio::process::Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(["--save", "", "--appendonly", "no"])
        .args(extra)
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .context("start redis-server")
}

/// One node of a cluster: named by its address, listing `servers` (comma
/// separated, the same on every node), on `redis`, with `extra` arguments.
fn spawn_clustered(
    args: &Args,
    addr: SocketAddr,
    servers: &str,
    redis: &str,
    extra: &[&str],
) -> anyhow::Result<tokio::process::Child> {
    let name = addr.to_string();
    let mut all = vec!["--server", &name, "--servers", servers, "--redis", redis];
    all.extend_from_slice(extra);
    spawn_imhost(args, addr, &all)
}

/// `n` free loopback addresses, and the `--servers` list naming them.
fn cluster_addrs(n: usize) -> anyhow::Result<(Vec<SocketAddr>, String)> {
    let addrs: Vec<SocketAddr> = (0..n).map(|_| free_addr()).collect::<Result<_, _>>()?;
    let servers = addrs
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",");
    Ok((addrs, servers))
}

async fn measure(args: &Args, target: Target) -> anyhow::Result<Figures> {
    let addr = free_addr()?;
    let mut child = match target {
        Target::Imhost => spawn_imhost(
            args,
            addr,
            &["--heartbeat-interval", "60s", "--heartbeat-timeout", "120s"],
        )?,
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

/// `GET /api/v1{path}` with the API key.
async fn api_get(
    http: &reqwest::Client,
    addr: SocketAddr,
    path: &str,
) -> anyhow::Result<serde_json::Value> {
    Ok(http
        .get(format!("http://{addr}/api/v1{path}"))
        .bearer_auth(API_KEY)
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?)
}

/// A connect URL for `client` from `entry`'s API, and a TCP connection to
/// the node it names (the client's own): a terminal's first two steps.
async fn dial_owner(
    http: &reqwest::Client,
    entry: SocketAddr,
    client: i64,
) -> anyhow::Result<(String, TcpStream)> {
    let url = connect_url(http, entry, client).await?;
    let host = url
        .trim_start_matches("ws://")
        .split('/')
        .next()
        .context("host")?
        .to_owned();
    let tcp = TcpStream::connect(host).await?;
    Ok((url, tcp))
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

/// A terminal of the load generator: tungstenite's default 128 KiB read
/// buffer would make the generator, not the server, the bottleneck with
/// tens of thousands of sockets.
async fn terminal(url: String, tcp: TcpStream) -> anyhow::Result<WebSocketStream<TcpStream>> {
    let config =
        tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default().read_buffer_size(4096);
    let (ws, _) = tokio_tungstenite::client_async_with_config(url, tcp, Some(config)).await?;
    Ok(ws)
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
    use futures_util::SinkExt;
    use tokio::sync::{broadcast, mpsc};

    type Sockets = Arc<Mutex<HashMap<u64, mpsc::Sender<Utf8Bytes>>>>;

    /// The broadcast channel's capacity: what a socket may fall behind
    /// before it skips, as imhost's `--outbound-queue 4096` in the same run.
    const HUB_CAPACITY: usize = 4096;
    /// Frames a socket's task writes before one flush, at most.
    const FLUSH_EVERY: usize = 64;

    #[derive(Clone)]
    struct Baseline {
        sockets: Sockets,
        /// Set: every push goes through this one broadcast channel.
        hub: Option<broadcast::Sender<Utf8Bytes>>,
        /// Send each new socket a greeting, as imhost's `welcome` does.
        greets: bool,
    }

    pub async fn serve(addr: SocketAddr, greets: bool, broadcast: bool) -> anyhow::Result<()> {
        let app = Router::new()
            .route("/ws", get(upgrade))
            .route("/push", post(push))
            .route("/healthz", get(|| async { "ok" }))
            .with_state(Baseline {
                sockets: Sockets::default(),
                hub: broadcast.then(|| broadcast::channel(HUB_CAPACITY).0),
                greets,
            });
        let socket = tokio::net::TcpSocket::new_v4()?;
        socket.set_reuseaddr(true)?;
        socket.bind(addr)?;
        axum::serve(socket.listen(4096)?, app).await?;
        Ok(())
    }

    async fn upgrade(
        State(baseline): State<Baseline>,
        ws: WebSocketUpgrade,
    ) -> axum::response::Response {
        ws.read_buffer_size(4096)
            .on_upgrade(move |socket| hold(socket, baseline))
    }

    async fn hold(mut socket: WebSocket, baseline: Baseline) {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let id = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if baseline.greets {
            // What welcome's shipped manifest sends.
            let greeting = format!(r#"{{"type":"welcome","text":"Welcome, {id}!"}}"#);
            if socket.send(Message::Text(greeting.into())).await.is_err() {
                return;
            }
        }
        if let Some(hub) = &baseline.hub {
            return subscribed(socket, hub.subscribe()).await;
        }
        let (tx, mut rx) = mpsc::channel(256);
        baseline.sockets.lock().expect("lock").insert(id, tx);
        loop {
            tokio::select! {
                Some(text) = rx.recv() => if socket.send(Message::Text(text)).await.is_err() { break },
                frame = socket.recv() => if !matches!(frame, Some(Ok(_))) { break },
            }
        }
        baseline.sockets.lock().expect("lock").remove(&id);
    }

    /// A socket fed by the broadcast channel: each wake-up writes what has
    /// queued (up to [`FLUSH_EVERY`] frames) and flushes once. What it fell
    /// too far behind to get is skipped.
    async fn subscribed(mut socket: WebSocket, mut rx: broadcast::Receiver<Utf8Bytes>) {
        loop {
            let first = tokio::select! {
                got = rx.recv() => got,
                frame = socket.recv() => if matches!(frame, Some(Ok(_))) { continue } else { return },
            };
            let mut next = match first {
                Ok(text) => Some(text),
                Err(broadcast::error::RecvError::Lagged(_)) => continue,
                Err(broadcast::error::RecvError::Closed) => return,
            };
            let mut fed = 0;
            while let Some(text) = next.take() {
                if socket.feed(Message::Text(text)).await.is_err() {
                    return;
                }
                fed += 1;
                if fed < FLUSH_EVERY {
                    next = match rx.try_recv() {
                        Ok(text) => Some(text),
                        Err(broadcast::error::TryRecvError::Lagged(_)) => rx.try_recv().ok(),
                        Err(_) => None,
                    };
                }
            }
            if socket.flush().await.is_err() {
                return;
            }
        }
    }

    #[derive(serde::Deserialize)]
    struct Push {
        n: usize,
        /// Pause between messages (0: none).
        #[serde(default)]
        interval_us: u64,
    }

    async fn push(
        State(Baseline { sockets, hub, .. }): State<Baseline>,
        Query(push): Query<Push>,
    ) -> &'static str {
        let mut next = tokio::time::Instant::now();
        for n in 0..push.n {
            tokio::time::sleep_until(next).await;
            next += std::time::Duration::from_micros(push.interval_us);
            let text = Utf8Bytes::from(format!("{{\"n\":{n},\"t\":{}}}", super::sockets::now_us()));
            if let Some(hub) = &hub {
                // Nobody subscribed is no error here: nothing to deliver.
                let _ = hub.send(text);
                continue;
            }
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
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use anyhow::Context;
    use futures_util::StreamExt;
    use tokio::sync::{Mutex, Semaphore};
    use tokio_tungstenite::tungstenite::Message;

    use super::{
        API_KEY, Args, api, cluster_addrs, dial_owner, free_addr, spawn_clustered, spawn_imhost,
        start_redis, wait_serving,
    };

    pub(super) struct Run {
        pub(super) per_sec: f64,
        p50_us: u64,
        p99_us: u64,
    }

    pub async fn compare(args: &Args) -> anyhow::Result<()> {
        let embedded = {
            let addr = free_addr()?;
            let _node = spawn_imhost(args, addr, &[])?;
            run(args, &[addr]).await.context("embedded run")?
        };
        let clustered = {
            let redis_port = free_addr()?.port();
            let _redis = start_redis(redis_port, &[])?;
            let (addrs, servers) = cluster_addrs(3)?;
            let redis_url = format!("redis://127.0.0.1:{redis_port}/");
            tokio::time::sleep(Duration::from_millis(300)).await;
            let mut nodes = Vec::new();
            for addr in &addrs {
                nodes.push(spawn_clustered(args, *addr, &servers, &redis_url, &[])?);
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

    pub(super) async fn run(args: &Args, nodes: &[SocketAddr]) -> anyhow::Result<Run> {
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
            let (url, tcp) = dial_owner(&http, entry, id).await?;
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

/// Tokens signed as identity providers sign them: the tests' own signer
/// (one copy of its fixed RSA keys), for the jwt-auth connect figures; the
/// bench signs with some of its schemes only.
#[allow(dead_code)]
#[path = "../../tests/src/jwt.rs"]
mod jwt_signing;

/// The plugin platform: call cost, the filter chain's throughput cost, jwt-auth
/// connects (HS256, RS256, ES256) against the built-in token store, and
/// hot-swap latency.
mod plugins {
    use std::net::SocketAddr;
    use std::path::Path;
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use anyhow::Context;
    use base64::Engine;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use futures_util::StreamExt;
    use hmac::{Hmac, Mac};
    use imhost::plugins::PluginHost;
    use imhost::plugins::hooks::{InboundFrame, Outgoing, Target};
    use tokio::net::TcpStream;
    use tokio::process::Child;
    use tokio::sync::Semaphore;
    use tokio_tungstenite::tungstenite::Message;

    use super::{
        API_KEY, Args, api, connect_url, direct_messages, free_addr, jwt_signing, spawn_imhost,
        wait_serving,
    };

    const JWT_SECRET: &str = "bench-secret-bench-secret-bench-secret";

    pub async fn compare(args: &Args) -> anyhow::Result<()> {
        println!(
            "\n{:<40}{:>12}{:>12}{:>10}",
            "plugins", "with", "without", "ratio"
        );
        call_cost(args).await?;
        chain_throughput(args).await?;
        jwt_connects(args).await?;
        hot_swap(args).await?;
        Ok(())
    }

    fn install(
        dir: &Path,
        guests: &Path,
        name: &str,
        file: &str,
        manifest: &str,
    ) -> anyhow::Result<()> {
        std::fs::copy(
            guests.join(format!("{file}.wasm")),
            dir.join(format!("{name}.wasm")),
        )
        .with_context(|| {
            format!("copy {file}.wasm (run scripts/bench, which builds the guests)")
        })?;
        std::fs::write(dir.join(format!("{name}.toml")), manifest)?;
        Ok(())
    }

    /// In process: one filter call on a warm instance, word-filter with 3
    /// words against tagger (a one-line filter).
    async fn call_cost(args: &Args) -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        install(
            dir.path(),
            &args.guests,
            "words",
            "word_filter",
            "pool = 1\n[settings]\nwords = [\"darn\", \"笨蛋\", \"école\"]\n",
        )?;
        let words = in_process_host(dir.path());
        anyhow::ensure!(words.reload().await.is_empty(), "word-filter did not load");
        let dir2 = tempfile::tempdir()?;
        install(
            dir2.path(),
            &args.guests,
            "tagger",
            "tagger",
            "pool = 1\n[settings]\nversion = 1\n",
        )?;
        let tagger = in_process_host(dir2.path());
        anyhow::ensure!(tagger.reload().await.is_empty(), "tagger did not load");
        let words_us = per_call(&words).await;
        let tagger_us = per_call(&tagger).await;
        println!(
            "{:<40}{:>12.2}{:>12.2}{:>10.2}",
            "filter call µs (word-filter vs tagger)",
            words_us,
            tagger_us,
            words_us / tagger_us
        );
        Ok(())
    }

    /// A plugin host in this process, compiling the optimized tier directly.
    fn in_process_host(dir: &Path) -> Arc<PluginHost> {
        Arc::new(PluginHost::new(
            imhost::plugins::LoaderConfig {
                dir: Some(dir.to_owned()),
                cache_dir: None,
                compiler: imhost::plugins::compile::Compiler::InProcess,
                tiered: false,
                cache_keep: 0,
                grants_file: None,
            },
            Arc::new(imhost::cluster::kv::EmbeddedKv::default()),
            None,
            Arc::default(),
        ))
    }

    /// A host in this process with the plugin at `wasm` loaded as `p`. The
    /// directory is returned too: it must outlive the host's use of it.
    async fn host_with_one(
        wasm: &Path,
        manifest: &str,
    ) -> anyhow::Result<(tempfile::TempDir, Arc<PluginHost>)> {
        let dir = tempfile::tempdir()?;
        std::fs::copy(wasm, dir.path().join("p.wasm"))
            .with_context(|| format!("copy {}", wasm.display()))?;
        std::fs::write(dir.path().join("p.toml"), manifest)?;
        let host = in_process_host(dir.path());
        anyhow::ensure!(
            host.reload().await.is_empty(),
            "{} did not load",
            wasm.display()
        );
        Ok((dir, host))
    }

    /// Mean µs of one filter chain run of the plugin at `wasm`, in process.
    pub async fn filter_call_us(wasm: &Path, manifest: &str) -> anyhow::Result<f64> {
        let (_dir, host) = host_with_one(wasm, manifest).await?;
        Ok(per_call(&host).await)
    }

    /// Mean µs of one inbound chain run (frame `ping`), in process.
    pub async fn inbound_call_us(wasm: &Path, manifest: &str) -> anyhow::Result<f64> {
        let (_dir, host) = host_with_one(wasm, manifest).await?;
        let frame = InboundFrame {
            client_id: 1,
            metadata: None,
            node: "bench".into(),
            text: "ping".into(),
        };
        for _ in 0..200 {
            host.inbound(&frame).await;
        }
        let n = 20_000;
        let started = Instant::now();
        for _ in 0..n {
            host.inbound(&frame).await;
        }
        Ok(started.elapsed().as_secs_f64() * 1e6 / f64::from(n))
    }

    fn message() -> Outgoing {
        Outgoing {
            sender: 1,
            target: Target::Direct(vec![2]),
            content: r#"{"text":"hello there, how are you today?","n":1}"#.into(),
            node: "bench".into(),
        }
    }

    /// Mean µs of one filter chain run, after a warm-up.
    async fn per_call(host: &PluginHost) -> f64 {
        for _ in 0..200 {
            host.filter(message()).await;
        }
        let n = 20_000;
        let started = Instant::now();
        for _ in 0..n {
            host.filter(message()).await;
        }
        started.elapsed().as_secs_f64() * 1e6 / f64::from(n)
    }

    fn spawn(args: &Args, addr: SocketAddr, plugins: Option<&Path>) -> anyhow::Result<Child> {
        match plugins {
            Some(dir) => {
                let dir = dir.to_str().context("plugin dir is not UTF-8")?;
                spawn_imhost(args, addr, &["--plugins", dir])
            }
            None => spawn_imhost(args, addr, &[]),
        }
    }

    /// Direct messages/s through the API with rate-limit + word-filter on
    /// against no plugins.
    async fn chain_throughput(args: &Args) -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        install(
            dir.path(),
            &args.guests,
            "rate-limit",
            "rate_limit",
            "order = 10\n[settings]\nlimit = 100000000\nwindow_ms = 60000\n",
        )?;
        install(
            dir.path(),
            &args.guests,
            "word-filter",
            "word_filter",
            "order = 20\n[settings]\nwords = [\"darn\", \"笨蛋\"]\n",
        )?;
        let http = reqwest::Client::new();
        let mut rates = Vec::new();
        for plugins in [Some(dir.path()), None] {
            let addr = free_addr()?;
            let _node = spawn(args, addr, plugins)?;
            wait_serving(&http, addr).await?;
            if plugins.is_some() {
                wait_plugins(&http, addr, 2).await?;
            }
            rates.push(direct_messages(&http, addr, args.messages).await?);
        }
        println!(
            "{:<40}{:>12.0}{:>12.0}{:>10.2}",
            "messages/s, rate-limit + word-filter",
            rates[0],
            rates[1],
            rates[0] / rates[1]
        );
        Ok(())
    }

    /// The rows of `GET /api/v1/plugins`.
    pub async fn plugin_rows(
        http: &reqwest::Client,
        addr: SocketAddr,
    ) -> anyhow::Result<Vec<serde_json::Value>> {
        Ok(http
            .get(format!("http://{addr}/api/v1/plugins"))
            .bearer_auth(API_KEY)
            .send()
            .await?
            .json()
            .await?)
    }

    /// Waits until `n` plugins serve from their optimized build.
    pub async fn wait_plugins(
        http: &reqwest::Client,
        addr: SocketAddr,
        n: usize,
    ) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(180);
        loop {
            let list = plugin_rows(http, addr).await?;
            let settled = |p: &&serde_json::Value| {
                p["state"] == "active" && p["tier"] == "optimized" && p["compiling"].is_null()
            };
            if list.iter().filter(settled).count() >= n {
                return Ok(());
            }
            anyhow::ensure!(Instant::now() < deadline, "plugins did not load: {list:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn jwt(sub: i64) -> String {
        let header = URL_SAFE_NO_PAD.encode(r#"{"alg":"HS256","typ":"JWT"}"#);
        let payload =
            URL_SAFE_NO_PAD.encode(serde_json::json!({"sub": sub, "aud": "imhost"}).to_string());
        let mut mac = Hmac::<sha2::Sha256>::new_from_slice(JWT_SECRET.as_bytes()).expect("key");
        mac.update(format!("{header}.{payload}").as_bytes());
        format!(
            "{header}.{payload}.{}",
            URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes())
        )
    }

    /// WebSocket connects/s: a JWT checked by jwt-auth (HS256 with a shared
    /// secret; RS256 and ES256 against a key set, verified by the host's
    /// crypto) against a connect URL taken from the built-in store (URLs
    /// issued beforehand, not timed).
    async fn jwt_connects(args: &Args) -> anyhow::Result<()> {
        let n = args.connections.min(3000);
        let rsa = jwt_signing::Signer::rsa(0, "rsa");
        let ec = jwt_signing::Signer::ec("ES256", "ec");
        let dir = tempfile::tempdir()?;
        let key_set = jwt_signing::jwks(&[&rsa, &ec]).to_string();
        install(
            dir.path(),
            &args.guests,
            "jwt-auth",
            "jwt_auth",
            &format!(
                "[settings]\nsecret = \"{JWT_SECRET}\"\naudience = \"imhost\"\njwks = '{key_set}'\n"
            ),
        )?;
        let http = reqwest::Client::new();
        let mut rates = Vec::new();
        for alg in ["HS256", "RS256", "ES256", "store"] {
            let with_jwt = alg != "store";
            let addr = free_addr()?;
            let _node = spawn(args, addr, with_jwt.then(|| dir.path()))?;
            wait_serving(&http, addr).await?;
            if with_jwt {
                wait_plugins(&http, addr, 1).await?;
            }
            let mut urls = Vec::with_capacity(n);
            for id in 1..=n as i64 {
                let claims = serde_json::json!({"sub": id, "aud": "imhost"});
                urls.push(match alg {
                    "HS256" => format!("ws://{addr}/ws?token={}", jwt(id)),
                    "RS256" => format!("ws://{addr}/ws?token={}", rsa.sign(alg, &claims)),
                    "ES256" => format!("ws://{addr}/ws?token={}", ec.sign(alg, &claims)),
                    _ => connect_url(&http, addr, id).await?,
                });
            }
            let gate = Arc::new(Semaphore::new(64));
            let started = Instant::now();
            let mut tasks = Vec::new();
            for url in urls {
                let gate = gate.clone();
                tasks.push(tokio::spawn(async move {
                    let _permit = gate.acquire().await?;
                    let tcp = TcpStream::connect(addr).await?;
                    let (ws, _) = tokio_tungstenite::client_async(url, tcp).await?;
                    anyhow::Ok(ws)
                }));
            }
            let mut sockets = Vec::new();
            for task in tasks {
                sockets.push(task.await??);
            }
            rates.push(n as f64 / started.elapsed().as_secs_f64());
        }
        let row = |name: &str, a: f64, b: f64| {
            println!("{name:<40}{a:>12.0}{b:>12.0}{:>10.2}", a / b);
        };
        row(
            "connects/s, jwt-auth HS256 vs token store",
            rates[0],
            rates[3],
        );
        row("connects/s, jwt-auth RS256 vs HS256", rates[1], rates[0]);
        row("connects/s, jwt-auth ES256 vs HS256", rates[2], rates[0]);
        Ok(())
    }

    /// From renaming a new manifest into place to the first message handled
    /// by the new version, with a message sent every millisecond.
    async fn hot_swap(args: &Args) -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        install(
            dir.path(),
            &args.guests,
            "tagger",
            "tagger",
            "[settings]\nversion = 0\n",
        )?;
        let http = reqwest::Client::new();
        let addr = free_addr()?;
        let _node = spawn(args, addr, Some(dir.path()))?;
        wait_serving(&http, addr).await?;
        wait_plugins(&http, addr, 1).await?;
        let url = connect_url(&http, addr, 1).await?;
        let (mut ws, _) =
            tokio_tungstenite::client_async(url, TcpStream::connect(addr).await?).await?;
        let mut samples = Vec::new();
        for version in 1..=5 {
            let tmp = dir.path().join("tagger.toml.partial");
            std::fs::write(&tmp, format!("[settings]\nversion = {version}\n"))?;
            let started = Instant::now();
            std::fs::rename(&tmp, dir.path().join("tagger.toml"))?;
            loop {
                api(
                    &http,
                    addr,
                    "/messages",
                    serde_json::json!({"sender": 0, "receivers": [1], "message": 0}),
                )
                .await?;
                let frame = tokio::time::timeout(Duration::from_secs(10), ws.next())
                    .await?
                    .context("socket ended")??;
                if let Message::Text(text) = frame {
                    let v: serde_json::Value = serde_json::from_str(&text)?;
                    if v["v"] == version {
                        break;
                    }
                }
                anyhow::ensure!(
                    started.elapsed() < Duration::from_secs(10),
                    "new version never served"
                );
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            samples.push(started.elapsed().as_secs_f64() * 1000.0);
        }
        samples.sort_by(f64::total_cmp);
        println!(
            "{:<40}{:>12.0}{:>12}{:>10}",
            "ms from file write to new version (med)",
            samples[samples.len() / 2],
            "-",
            "-"
        );
        println!(
            "  (includes the watcher's {} ms of quiet after a rename into place)",
            imhost::plugins::watcher::SETTLED.as_millis()
        );
        Ok(())
    }
}
