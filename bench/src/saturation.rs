//! Saturation on K cores (`imhost-bench --only-saturation`): imhost and two
//! bare axum baselines (see [`Server`]), each pinned to K cores with the load generator on the
//! others, offered far more than they can deliver to N sockets in one
//! channel, in the same command.
//!
//! For each server and K it reports what was offered, accepted (imhost
//! answers 503 `overloaded` to what it cannot take; the baseline takes
//! everything and queues it), delivered per second, lost (accepted but not
//! delivered within `--drain-seconds` of the last publish), terminals cut
//! off, the cores the server kept busy (CPU time over the delivery window,
//! divided by K) and its CPU per delivery, and the latency of delivered
//! messages. A scaling line gives delivered/s at each K over K = 1.
//!
//! Pinning needs more CPUs than K: on a machine with fewer, the run says so
//! and measures unpinned. On a 2-core machine this is K = 1 with the load
//! generator on the other core, which then limits how much a server can be
//! seen to deliver: the cores-busy figure says whether the server saturated.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures_util::StreamExt;
use tokio::sync::Semaphore;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

use super::sockets::{cpu_us, guest_file, install_plugin_set, now_us, pin, sent_at};
use super::source_ports::SourcePorts;
use super::{API_KEY, Args, api, connect_url, free_addr, wait_serving};

/// The servers a saturation run compares.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Server {
    /// The bench's bare axum server: a bounded queue per socket, each frame
    /// written and flushed on its own, the pusher waiting for room in each.
    Baseline,
    /// The bare server issue 23 measured imhost against: one
    /// `tokio::sync::broadcast` channel for the chat channel, each socket's
    /// task writing whatever has queued for it and flushing once; a socket
    /// that falls more than the channel's capacity behind skips what it
    /// missed (counted as lost), none is cut off.
    Broadcast,
    Imhost,
}

impl Server {
    fn name(self) -> &'static str {
        match self {
            Server::Baseline => "baseline",
            Server::Broadcast => "broadcast",
            Server::Imhost => "imhost",
        }
    }
}

/// The servers of `--saturation-servers`, by name.
fn servers(args: &Args) -> anyhow::Result<Vec<Server>> {
    let all = [Server::Baseline, Server::Broadcast, Server::Imhost];
    args.saturation_servers
        .iter()
        .map(|name| {
            all.into_iter()
                .find(|s| s.name() == name)
                .with_context(|| format!("--saturation-servers: no server called {name:?}"))
        })
        .collect()
}

/// One server's run at one K.
#[derive(Clone, Copy, Default)]
struct Run {
    offered_per_sec: f64,
    accepted: u64,
    refused: u64,
    delivered_per_sec: f64,
    lost: u64,
    cut_off: u64,
    cores_busy: f64,
    cpu_us_per_delivery: f64,
    p50_ms: f64,
    p99_ms: f64,
    /// Connects per second of clients outside the channel (`--saturation-churn`).
    churned_per_sec: f64,
}

pub async fn run(args: &Args) -> anyhow::Result<()> {
    guest_file("word-filter")?;
    let cpus = std::thread::available_parallelism()?.get();
    let pinned = |k: usize| k < cpus;
    let mut rows: Vec<(usize, Server, Run)> = Vec::new();
    for &k in &args.server_cores {
        if k == 0 {
            bail!("--server-cores takes counts of 1 or more");
        }
        if !pinned(k) {
            println!("K = {k}: this machine has {cpus} CPUs; measured unpinned");
        }
        for server in servers(args)? {
            let mut runs = Vec::new();
            for _ in 0..args.repeat.max(1) {
                runs.push(
                    measure(args, server, k, pinned(k).then_some(cpus))
                        .await
                        .with_context(|| format!("{} on {k} cores", server.name()))?,
                );
            }
            runs.sort_by(|a, b| a.delivered_per_sec.total_cmp(&b.delivered_per_sec));
            rows.push((k, server, runs[runs.len() / 2]));
        }
    }
    println!(
        "\n{:>3} {:<9}{:>11}{:>10}{:>9}{:>12}{:>9}{:>6}{:>7}{:>8}{:>9}{:>9}",
        "K",
        "server",
        "offered/s",
        "accepted",
        "refused",
        "delivered/s",
        "lost",
        "cut",
        "busy",
        "µs/del",
        "p50 ms",
        "p99 ms"
    );
    for (k, server, r) in &rows {
        println!(
            "{k:>3} {:<9}{:>11.0}{:>10}{:>9}{:>12.0}{:>9}{:>6}{:>6.0}%{:>8.2}{:>9.1}{:>9.1}",
            server.name(),
            r.offered_per_sec,
            r.accepted,
            r.refused,
            r.delivered_per_sec,
            r.lost,
            r.cut_off,
            r.cores_busy * 100.0,
            r.cpu_us_per_delivery,
            r.p50_ms,
            r.p99_ms
        );
    }
    let delivered = |k: usize, s: Server| {
        rows.iter()
            .find(|(rk, rs, _)| *rk == k && *rs == s)
            .map_or(f64::NAN, |(_, _, r)| r.delivered_per_sec)
    };
    println!();
    let first = args.server_cores.first().copied().unwrap_or(1);
    let ran = servers(args)?;
    let baselines: Vec<Server> = ran
        .iter()
        .copied()
        .filter(|s| *s != Server::Imhost)
        .collect();
    for &k in &args.server_cores {
        let mut line = format!("K = {k}:");
        if ran.contains(&Server::Imhost) {
            let over: Vec<String> = baselines
                .iter()
                .map(|&b| {
                    let ratio = delivered(k, Server::Imhost) / delivered(k, b);
                    format!("over {} {ratio:.2}", b.name())
                })
                .collect();
            if !over.is_empty() {
                line += &format!(" imhost delivered/s {};", over.join(", "));
            }
        }
        let scaling: Vec<String> = ran
            .iter()
            .map(|&s| {
                let ratio = delivered(k, s) / delivered(first, s);
                format!("{} {ratio:.2}", s.name())
            })
            .collect();
        line += &format!(" K/{first}: {}", scaling.join(", "));
        println!("{line}");
    }
    if args.saturation_churn > 0 {
        let churned: Vec<String> = rows
            .iter()
            .filter(|(_, s, _)| *s == Server::Imhost)
            .map(|(k, _, r)| format!("K = {k}: {:.0}/s", r.churned_per_sec))
            .collect();
        println!(
            "imhost runs with clients outside the channel connecting (each closed {CHURN_OPEN} \
             connects later): {}",
            churned.join(", ")
        );
    }
    println!(
        "\n{} sockets in one channel, {} deliveries/s offered for {} s, imhost with word-filter and \
         --outbound-queue 4096; busy = server CPU time over the delivery window / K; lost = accepted \
         but not delivered {} s after the last publish; medians of {} runs by delivered/s",
        args.saturation_sockets,
        args.saturation_rate,
        args.seconds,
        args.drain_seconds,
        args.repeat.max(1)
    );
    Ok(())
}

/// One run of `server` on `k` cores: pinned when `pinned_of` gives the
/// machine's CPU count (counted before any pinning), unpinned otherwise.
async fn measure(
    args: &Args,
    server: Server,
    k: usize,
    pinned_of: Option<usize>,
) -> anyhow::Result<Run> {
    let n = args.saturation_sockets;
    let addr = free_addr()?;
    let plugins = tempfile::tempdir()?;
    let pinned = pinned_of.is_some();
    let cpus = pinned_of.unwrap_or(1);
    let plugin_set: &[&str] = match server {
        Server::Imhost => &["word-filter"],
        Server::Baseline | Server::Broadcast => &[],
    };
    let mut child = spawn_pinned(args, server, addr, plugins.path(), plugin_set, k, pinned)?;
    let pid = child.id().context("server pid")?;
    if pinned {
        pin(std::process::id(), &format!("{k}-{}", cpus - 1))?;
    }
    let http = reqwest::Client::new();
    wait_serving(&http, addr).await?;
    if server == Server::Imhost {
        super::plugins::wait_plugins(&http, addr, 1).await?;
    }

    let mut urls = Vec::with_capacity(n);
    for i in 0..n {
        urls.push(match server {
            Server::Imhost => connect_url(&http, addr, i as i64 + 1).await?,
            Server::Baseline | Server::Broadcast => format!("ws://{addr}/ws"),
        });
    }
    let gate = Arc::new(Semaphore::new(64));
    let sources = Arc::new(SourcePorts::fresh());
    let mut connects = Vec::with_capacity(n);
    for url in urls {
        let (gate, sources) = (gate.clone(), sources.clone());
        connects.push(tokio::spawn(async move {
            let _permit = gate.acquire().await?;
            let tcp = sources.connect(addr).await?;
            super::terminal(url, tcp).await
        }));
    }
    let mut sockets = Vec::with_capacity(n);
    for connect in connects {
        sockets.push(connect.await??);
    }
    if server == Server::Imhost {
        let ids: Vec<i64> = (1..=n as i64).collect();
        for chunk in ids.chunks(1000) {
            api(
                &http,
                addr,
                "/channels/sat/join",
                serde_json::json!({ "client_ids": chunk }),
            )
            .await?;
        }
    }

    let messages = ((args.saturation_rate as f64 * args.seconds as f64) / n as f64)
        .ceil()
        .max(1.0) as usize;
    let interval_us = (1_000_000.0 * n as f64 / args.saturation_rate as f64) as u64;
    let stop = CancellationToken::new();
    let delivered = Arc::new(AtomicU64::new(0));
    let readers: Vec<_> = sockets
        .into_iter()
        .map(|ws| tokio::spawn(read(ws, stop.clone(), delivered.clone())))
        .collect();
    let churn = if server == Server::Imhost && args.saturation_churn > 0 {
        let (per_sec, stop) = (args.saturation_churn, stop.clone());
        Some(on_own_thread("churn", move || {
            churn(addr, n, per_sec, stop)
        })?)
    } else {
        None
    };
    let cpu_before = cpu_us(pid)?;
    let started = Instant::now();
    let start_us = now_us();
    let (accepted, refused) = match server {
        Server::Imhost => publish_apart(addr, messages, interval_us).await?,
        Server::Baseline | Server::Broadcast => {
            http.post(format!(
                "http://{addr}/push?n={messages}&interval_us={interval_us}"
            ))
            .send()
            .await?
            .error_for_status()?;
            (messages as u64, 0)
        }
    };
    let published = started.elapsed();
    let want = accepted * n as u64;
    let drain = Duration::from_secs(args.drain_seconds);
    let drained_by = tokio::time::Instant::now() + drain;
    while delivered.load(Ordering::Relaxed) < want && tokio::time::Instant::now() < drained_by {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let cpu = cpu_us(pid)? - cpu_before;
    stop.cancel();
    let churned = match churn {
        Some(churn) => churn.await?,
        None => 0.0,
    };
    let mut latencies = Vec::with_capacity(want as usize);
    let mut last_us = start_us;
    let mut cut_off = 0;
    for reader in readers {
        let got = reader.await?;
        latencies.extend(got.latencies);
        last_us = last_us.max(got.last_us);
        cut_off += u64::from(got.cut_off);
    }
    child.start_kill()?;
    let _ = child.wait().await;
    let window_s = (last_us.saturating_sub(start_us) as f64 / 1e6).max(1e-3);
    let count = latencies.len() as u64;
    latencies.sort_unstable();
    let pick = |q: f64| {
        latencies
            .get(((latencies.len().max(1) - 1) as f64 * q) as usize)
            .map_or(f64::NAN, |&us| f64::from(us) / 1000.0)
    };
    Ok(Run {
        offered_per_sec: (messages * n) as f64 / published.as_secs_f64().max(1e-3),
        accepted,
        refused,
        delivered_per_sec: count as f64 / window_s,
        lost: want.saturating_sub(count),
        cut_off,
        cores_busy: cpu as f64 / 1e6 / window_s / k as f64,
        cpu_us_per_delivery: cpu as f64 / count.max(1) as f64,
        p50_ms: pick(0.5),
        p99_ms: pick(0.99),
        churned_per_sec: churned,
    })
}

/// Clients outside the channel that [`churn`] connects as, in turn.
const CHURN_CLIENTS: i64 = 64;
/// Churn connections open at a time: each is closed this many connects on.
const CHURN_OPEN: usize = 16;

/// Connects `per_sec` times a second as one of [`CHURN_CLIENTS`] clients
/// numbered after the channel's `n` (each with a new connect URL, as a
/// backend hands out: tokens are single-use), closing each connection
/// [`CHURN_OPEN`] connects later, until `stop`; returns the connects per
/// second it made. Run [`on_own_thread`], like the publisher, so that the
/// readers do not slow it.
async fn churn(
    addr: std::net::SocketAddr,
    n: usize,
    per_sec: u64,
    stop: CancellationToken,
) -> anyhow::Result<f64> {
    let http = reqwest::Client::new();
    let started = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / per_sec.max(1) as f64));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut open = std::collections::VecDeque::with_capacity(CHURN_OPEN + 1);
    let mut connects = 0u64;
    for client in (0..CHURN_CLIENTS).cycle() {
        tokio::select! {
            _ = tick.tick() => {}
            () = stop.cancelled() => break,
        }
        let url = super::connect_url(&http, addr, n as i64 + 1 + client).await?;
        let tcp = tokio::net::TcpStream::connect(addr).await?;
        open.push_back(super::terminal(url, tcp).await?);
        connects += 1;
        if open.len() > CHURN_OPEN
            && let Some(mut ws) = open.pop_front()
        {
            ws.close(None).await.ok();
        }
    }
    Ok(connects as f64 / started.elapsed().as_secs_f64().max(1e-3))
}

/// Starts imhost (with `plugin_set` installed into `plugins` and
/// `--outbound-queue 4096`) or a baseline on `addr`, on CPUs 0..K-1 when
/// `pinned`; killed when the handle drops.
pub(crate) fn spawn_pinned(
    args: &Args,
    server: Server,
    addr: std::net::SocketAddr,
    plugins: &std::path::Path,
    plugin_set: &[&str],
    k: usize,
    pinned: bool,
) -> anyhow::Result<tokio::process::Child> {
    let mut command = if pinned {
        let mut c = tokio::process::Command::new("taskset");
        c.args(["--cpu-list", &format!("0-{}", k - 1)]);
        c
    } else {
        tokio::process::Command::new("env")
    };
    if server == Server::Imhost {
        install_plugin_set(plugins, &args.guests, plugin_set)?;
        command
            .arg(&args.imhost)
            .args(["--listen", &addr.to_string(), "--api-key", API_KEY])
            .args(["--plugins", &plugins.display().to_string()])
            .args(["--token-ttl", "10m", "--outbound-queue", "4096"])
            // The load generator's callers are one backend with many
            // connections, all from 127.0.0.1.
            .args(["--max-connections-per-address", "0"])
            .env("RUST_LOG", "warn")
            .env("IMHOST_PLUGIN_CACHE", &args.plugin_cache)
            .env("IMHOST_PLUGIN_GRANTS", super::shipped_grants());
    } else {
        command
            .arg(std::env::current_exe()?)
            .args(["--baseline-server", &addr.to_string()]);
        if server == Server::Broadcast {
            command.arg("--baseline-broadcast");
        }
    }
    command
        .stdout(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .context("start the server")
}

/// [`publish`] on a thread and runtime of its own. On the load generator's
/// runtime the publisher is one task among the 10,000 readers: the more a
/// server delivers, the later its next messages leave, and a server that
/// writes in smaller pieces (more reads for the readers) was offered less
/// than the baselines, which publish inside their own process. Its own
/// thread gets the scheduler's share as soon as a message is due.
async fn publish_apart(
    addr: std::net::SocketAddr,
    messages: usize,
    interval_us: u64,
) -> anyhow::Result<(u64, u64)> {
    on_own_thread("publisher", move || async move {
        publish(&reqwest::Client::new(), addr, messages, interval_us).await
    })?
    .await
}

/// Runs the future `make` makes on a thread and current-thread runtime of
/// its own, started now, away from the readers' runtime; the future this
/// returns waits for its result.
fn on_own_thread<T, F>(
    name: &str,
    make: impl FnOnce() -> F + Send + 'static,
) -> anyhow::Result<impl std::future::Future<Output = anyhow::Result<T>>>
where
    F: std::future::Future<Output = anyhow::Result<T>>,
    T: Send + 'static,
{
    let thread = std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?
                .block_on(make())
        })?;
    let name = name.to_owned();
    Ok(async move {
        tokio::task::spawn_blocking(move || thread.join())
            .await?
            .map_err(|_| anyhow::anyhow!("the {name} thread panicked"))?
    })
}

/// Channel messages on schedule through the API, up to 64 in flight: the
/// accepted and the refused (503 `overloaded`; not retried).
async fn publish(
    http: &reqwest::Client,
    addr: std::net::SocketAddr,
    messages: usize,
    interval_us: u64,
) -> anyhow::Result<(u64, u64)> {
    let accepted = Arc::new(AtomicU64::new(0));
    let refused = Arc::new(AtomicU64::new(0));
    let in_flight = Arc::new(Semaphore::new(64));
    let mut next = tokio::time::Instant::now();
    let mut calls = Vec::with_capacity(messages);
    for m in 0..messages {
        tokio::time::sleep_until(next).await;
        next += Duration::from_micros(interval_us);
        let permit = in_flight.clone().acquire_owned().await?;
        let (http, accepted, refused) = (http.clone(), accepted.clone(), refused.clone());
        calls.push(tokio::spawn(async move {
            let _permit = permit;
            let response = http
                .post(format!("http://{addr}/api/v1/channels/sat/messages"))
                .bearer_auth(API_KEY)
                .json(&serde_json::json!({"message": {"n": m, "t": now_us()}}))
                .send()
                .await?;
            match response.status().as_u16() {
                200 => accepted.fetch_add(1, Ordering::Relaxed),
                503 => refused.fetch_add(1, Ordering::Relaxed),
                other => bail!("channel message answered {other}"),
            };
            anyhow::Ok(())
        }));
    }
    for call in calls {
        call.await??;
    }
    Ok((
        accepted.load(Ordering::Relaxed),
        refused.load(Ordering::Relaxed),
    ))
}

pub(crate) struct Read {
    latencies: Vec<u32>,
    last_us: u64,
    cut_off: bool,
}

/// Reads timestamped frames until `stop`: their latencies, when the last
/// arrived, and whether the server closed the socket.
pub(crate) async fn read(
    mut ws: tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>,
    stop: CancellationToken,
    delivered: Arc<AtomicU64>,
) -> Read {
    let mut read = Read {
        latencies: Vec::new(),
        last_us: 0,
        cut_off: false,
    };
    loop {
        let frame = tokio::select! {
            frame = ws.next() => frame,
            () = stop.cancelled() => return read,
        };
        match frame {
            Some(Ok(Message::Text(text))) => {
                let now = now_us();
                let Some(sent) = sent_at(&text) else { continue };
                read.latencies
                    .push(u32::try_from(now.saturating_sub(sent)).unwrap_or(u32::MAX));
                read.last_us = now;
                delivered.fetch_add(1, Ordering::Relaxed);
            }
            Some(Ok(Message::Close(_)) | Err(_)) | None => {
                read.cut_off = true;
                return read;
            }
            Some(Ok(_)) => {}
        }
    }
}
