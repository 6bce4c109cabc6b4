//! 100,000 connections in a local cluster (`imhost-bench --big-cluster N`).
//!
//! Six nodes on one `redis-server` hold N terminals. A process here may hold
//! at most about 19,900 sockets, so the terminals live in six holder
//! processes (this binary with `--hold`), each connecting its range of client
//! ids to the node that owns them and reporting, once every frame arrived,
//! each delivery's latency.
//!
//! Measured: resident memory per connection on each node, then B broadcasts
//! to everyone and C messages to a channel of 10,000 members (p50, p99,
//! deliveries/s from the first send to the last arrival).

use std::net::SocketAddr;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail};
use futures_util::StreamExt;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::Semaphore;
use tokio_tungstenite::tungstenite::Message;

use super::sockets::now_us;
use super::{
    API_KEY, Args, api, cluster_addrs, dial_owner, free_addr, rss_bytes, spawn_clustered,
    start_redis, wait_serving,
};

const NODES: usize = 6;
const BROADCASTS: usize = 3;
/// Time between broadcasts: more than one takes on this 2-core machine.
const BROADCAST_GAP: Duration = Duration::from_secs(4);
const CHANNEL_MESSAGES: usize = 5;
const CHANNEL_MEMBERS: i64 = 10_000;
const CHANNEL: &str = "big";

pub async fn run(args: &Args, total: usize) -> anyhow::Result<()> {
    let redis_port = free_addr()?.port();
    let _redis = start_redis(redis_port, &["--maxclients", "1000"])?;
    let (addrs, servers) = cluster_addrs(NODES)?;
    let redis_url = format!("redis://127.0.0.1:{redis_port}/");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut nodes = Vec::new();
    for addr in &addrs {
        nodes.push(spawn_clustered(args, *addr, &servers, &redis_url, &[])?);
    }
    let http = reqwest::Client::new();
    for &addr in &addrs {
        wait_serving(&http, addr).await?;
    }
    let pids: Vec<u32> = nodes.iter().filter_map(Child::id).collect();
    let rss_before: Vec<u64> = pids
        .iter()
        .map(|&p| rss_bytes(p))
        .collect::<Result<_, _>>()?;

    // The terminals, in six holder processes.
    let started = std::time::Instant::now();
    let per_holder = total.div_ceil(NODES);
    let mut holders = Vec::new();
    for (h, addr) in addrs.iter().enumerate() {
        let first = h * per_holder + 1;
        let last = ((h + 1) * per_holder).min(total);
        let mut child = Command::new(std::env::current_exe()?)
            .args(["--hold", &addr.to_string()])
            .args(["--hold-range", &format!("{first}-{last}")])
            .args(["--big-cluster", &total.to_string()])
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()?;
        let stdout = BufReader::new(child.stdout.take().context("holder stdout")?);
        holders.push((child, stdout));
    }
    for (_, stdout) in &mut holders {
        let mut line = String::new();
        stdout.read_line(&mut line).await?;
        if line.trim() != "ready" {
            bail!("a holder failed to connect its terminals: {line}");
        }
    }
    let connect_secs = started.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let per_node: Vec<(usize, u64)> = {
        let mut out = Vec::new();
        for (i, &pid) in pids.iter().enumerate() {
            let stats: serde_json::Value = http
                .get(format!("http://{}/api/v1/stats", addrs[i]))
                .bearer_auth(API_KEY)
                .send()
                .await?
                .json()
                .await?;
            let conns = stats["connections"].as_u64().unwrap_or(0) as usize;
            out.push((conns, rss_bytes(pid)?.saturating_sub(rss_before[i])));
        }
        out
    };
    let held: usize = per_node.iter().map(|n| n.0).sum();
    if held != total {
        bail!("nodes hold {held} of {total} connections");
    }

    // The channel: 10,000 clients spread over every holder and node,
    // joined 1,000 at a time.
    let members: Vec<i64> = (1..=total as i64)
        .filter(|&id| is_member(id, total))
        .collect();
    let members_count = members.len();
    for chunk in members.chunks(1000) {
        api(
            &http,
            addrs[0],
            &format!("/channels/{CHANNEL}/join"),
            serde_json::json!({"client_ids": chunk}),
        )
        .await?;
    }

    let broadcast_sent = send_spaced(
        &http,
        addrs[0],
        "/broadcast",
        BROADCASTS,
        BROADCAST_GAP,
        |n| serde_json::json!({"message": {"k": "b", "n": n, "t": now_us()}}),
    )
    .await?;
    // Let the last broadcast's tail drain before the channel phase.
    tokio::time::sleep(BROADCAST_GAP).await;
    let channel_sent = send_spaced(
        &http,
        addrs[0],
        &format!("/channels/{CHANNEL}/messages"),
        CHANNEL_MESSAGES,
        Duration::from_millis(500),
        |n| serde_json::json!({"sender": 0, "message": {"k": "c", "n": n, "t": now_us()}}),
    )
    .await?;

    let mut all = Report::new();
    for (mut child, mut stdout) in holders {
        let mut report = String::new();
        tokio::time::timeout(Duration::from_secs(180), stdout.read_to_string(&mut report))
            .await
            .context("holder report in time")??;
        let _ = child.wait().await;
        all.merge(serde_json::from_str(report.trim()).context("holder report")?);
    }
    let Report {
        mut broadcast,
        mut channel,
        last_broadcast_us,
        last_channel_us,
    } = all;
    // Deliveries/s while a message is in flight: its deliveries over the
    // time from its send to its last arrival, averaged over the messages.
    let rate = |sent: &[u64], last: &[u64], per_message: usize| {
        let secs: f64 = sent
            .iter()
            .zip(last)
            .map(|(s, l)| l.saturating_sub(*s) as f64 / 1e6)
            .sum::<f64>()
            / sent.len() as f64;
        per_message as f64 / secs
    };
    let want_broadcast = total * BROADCASTS;
    let want_channel = members_count * CHANNEL_MESSAGES;
    if broadcast.len() != want_broadcast || channel.len() != want_channel {
        bail!(
            "lost deliveries: broadcast {} of {want_broadcast}, channel {} of {want_channel}",
            broadcast.len(),
            channel.len()
        );
    }
    let pct = |v: &mut Vec<u32>, q: f64| {
        v.sort_unstable();
        v[((v.len() - 1) as f64 * q) as usize] as f64 / 1000.0
    };
    println!("\n{NODES} nodes, one Redis, {total} connections (connected in {connect_secs:.1} s)");
    for (i, (conns, rss)) in per_node.iter().enumerate() {
        println!(
            "node {i}: {conns} connections, {:.0} bytes RSS per connection",
            *rss as f64 / *conns as f64
        );
    }
    println!(
        "broadcast to all ({BROADCASTS}, {} s apart): p50 {:.1} ms, p99 {:.1} ms, {:.0} deliveries/s",
        BROADCAST_GAP.as_secs(),
        pct(&mut broadcast, 0.5),
        pct(&mut broadcast, 0.99),
        rate(&broadcast_sent, &last_broadcast_us, total)
    );
    println!(
        "channel of {members_count} ({CHANNEL_MESSAGES}, 0.5 s apart): p50 {:.1} ms, p99 {:.1} ms, {:.0} deliveries/s",
        pct(&mut channel, 0.5),
        pct(&mut channel, 0.99),
        rate(
            &channel_sent,
            &last_channel_us,
            want_channel / CHANNEL_MESSAGES
        )
    );
    Ok(())
}

/// Posts `count` bodies (made by `body` from their index) to `path` of
/// `entry`, `gap` apart; returns when each was sent.
async fn send_spaced(
    http: &reqwest::Client,
    entry: SocketAddr,
    path: &str,
    count: usize,
    gap: Duration,
    body: impl Fn(usize) -> serde_json::Value,
) -> anyhow::Result<Vec<u64>> {
    let mut sent = Vec::with_capacity(count);
    for n in 0..count {
        sent.push(now_us());
        api(http, entry, path, body(n)).await?;
        tokio::time::sleep(gap).await;
    }
    Ok(sent)
}

/// Whether client `id` is in the channel: every k-th client, so that
/// 10,000 of `total` are, spread over the holders.
fn is_member(id: i64, total: usize) -> bool {
    let stride = (total as i64 / CHANNEL_MEMBERS).max(1);
    (id - 1) % stride == 0 && (id - 1) / stride < CHANNEL_MEMBERS
}

#[derive(serde::Serialize, serde::Deserialize, Default)]
struct Report {
    broadcast: Vec<u32>,
    channel: Vec<u32>,
    /// When the last delivery of each broadcast / channel message arrived.
    last_broadcast_us: Vec<u64>,
    last_channel_us: Vec<u64>,
}

impl Report {
    fn new() -> Self {
        Self {
            last_broadcast_us: vec![0; BROADCASTS],
            last_channel_us: vec![0; CHANNEL_MESSAGES],
            ..Self::default()
        }
    }

    fn merge(&mut self, other: Report) {
        self.broadcast.extend(other.broadcast);
        self.channel.extend(other.channel);
        for (a, b) in self
            .last_broadcast_us
            .iter_mut()
            .zip(other.last_broadcast_us)
        {
            *a = (*a).max(b);
        }
        for (a, b) in self.last_channel_us.iter_mut().zip(other.last_channel_us) {
            *a = (*a).max(b);
        }
    }
}

/// A holder process: connects client ids `first..=last` through `entry`'s
/// connect URLs, says `ready`, then reports every delivery's latency once
/// each socket has its frames.
pub async fn hold(entry: SocketAddr, range: &str, total: usize) -> anyhow::Result<()> {
    let (first, last) = range.split_once('-').context("range FIRST-LAST")?;
    let (first, last): (i64, i64) = (first.parse()?, last.parse()?);
    let http = reqwest::Client::new();
    let gate = std::sync::Arc::new(Semaphore::new(64));
    let mut tasks = Vec::new();
    for id in first..=last {
        let (gate, http) = (gate.clone(), http.clone());
        tasks.push(tokio::spawn(async move {
            let _permit = gate.acquire().await?;
            let (url, tcp) = dial_owner(&http, entry, id).await?;
            let ws = super::terminal(url, tcp).await?;
            anyhow::Ok((id, ws))
        }));
    }
    let mut sockets = Vec::new();
    for task in tasks {
        sockets.push(task.await??);
    }
    println!("ready");
    let readers: Vec<_> = sockets
        .into_iter()
        .map(|(id, mut ws)| {
            let channel_want = if is_member(id, total) {
                CHANNEL_MESSAGES
            } else {
                0
            };
            tokio::spawn(async move {
                let mut report = Report::new();
                while report.broadcast.len() < BROADCASTS || report.channel.len() < channel_want {
                    let frame = tokio::time::timeout(Duration::from_secs(120), ws.next()).await?;
                    let Some(Ok(Message::Text(text))) = frame else {
                        if matches!(frame, Some(Ok(_))) {
                            continue;
                        }
                        bail!("socket {id} ended early: {frame:?}");
                    };
                    let now = now_us();
                    let value: serde_json::Value = serde_json::from_str(&text)?;
                    let sent = value["t"].as_u64().unwrap_or(now);
                    let n = value["n"].as_u64().unwrap_or(0) as usize;
                    let latency = u32::try_from(now.saturating_sub(sent)).unwrap_or(u32::MAX);
                    let (latencies, last) = if value["k"] == "c" {
                        (&mut report.channel, &mut report.last_channel_us)
                    } else {
                        (&mut report.broadcast, &mut report.last_broadcast_us)
                    };
                    latencies.push(latency);
                    if let Some(last) = last.get_mut(n) {
                        *last = now;
                    }
                }
                let _ = ws.close(None).await;
                anyhow::Ok(report)
            })
        })
        .collect();
    let mut all = Report::new();
    for reader in readers {
        all.merge(reader.await??);
    }
    println!("{}", serde_json::to_string(&all)?);
    Ok(())
}
