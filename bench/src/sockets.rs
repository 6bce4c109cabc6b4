//! The socket core against the floor and the baseline, in one run
//! (`imhost-bench --only-sockets`).
//!
//! Three servers hold N sockets each, one after the other:
//! - **floor**: does the handshake, then nothing but one `write()` of a
//!   ready-made frame per socket per message. No framework, no queue: the
//!   least a server can do to deliver.
//! - **baseline**: the bare axum + tungstenite server of the main bench
//!   (`--baseline-greets`: it also sends each new socket a greeting, as the
//!   welcome plugin does, so that connects compare the same visible work).
//! - **imhost**: one embedded node with heartbeats, presence and a loaded
//!   plugin set (word-filter and welcome); messages are `POST /broadcast`.
//!
//! For each N it measures connects/s (connect URLs fetched beforehand: that
//! is the business backend's call; each run connects from a loopback source
//! address of its own, see `source_ports`), resident memory per idle connection
//! (RSS growth over the connect phase / N, with checkpoints for the chart),
//! then offers `--rate` deliveries/s for `--seconds` and reports the
//! server's CPU time per delivery (utime + stime from /proc), the latency
//! from send to terminal (p50, p99) and deliveries/s. A rate sweep at the
//! smallest N gives latency against offered rate. Ratios are against the
//! floor and the baseline of the same run; each figure is the median of
//! `--repeat` interleaved runs, each round starting with the next server.
//! `--csv DIR` writes the curves for `scripts/bench-plot.py`.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use futures_util::StreamExt;
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio_tungstenite::tungstenite::Message;

use super::source_ports::SourcePorts;
use super::{Args, api, connect_url, free_addr, rss_bytes, wait_serving};

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Server {
    Floor,
    Baseline,
    Imhost,
    /// The `--imhost-b` build, for an A/B of two builds in one run.
    ImhostB,
}

impl Server {
    /// The servers of this run, in the order each round measures them.
    fn all(args: &Args) -> Vec<Server> {
        let mut all = vec![Server::Floor, Server::Baseline, Server::Imhost];
        if has_b(args) {
            all.push(Server::ImhostB);
        }
        all
    }

    fn name(self) -> &'static str {
        match self {
            Server::Floor => "floor",
            Server::Baseline => "baseline",
            Server::Imhost => "imhost",
            Server::ImhostB => "imhost-b",
        }
    }

    fn is_imhost(self) -> bool {
        matches!(self, Server::Imhost | Server::ImhostB)
    }
}

/// What one server did with N sockets at one offered rate.
#[derive(Debug, Default, Clone)]
struct Run {
    connects_per_sec: f64,
    /// Server CPU over the connect phase (its pauses included: work a
    /// connect leaves queued, such as a plugin's greeting, is its cost), per
    /// connect.
    cpu_us_per_connect: f64,
    bytes_per_conn: f64,
    /// (connections, RSS growth in bytes) during the connect phase.
    memory_curve: Vec<(usize, u64)>,
    cpu_us_per_delivery: f64,
    deliveries_per_sec: f64,
    p50_ms: f64,
    p99_ms: f64,
}

/// Each figure's median over `runs`.
fn median(runs: &[Run]) -> Run {
    let mid = |figure: fn(&Run) -> f64| {
        let mut values: Vec<f64> = runs.iter().map(figure).collect();
        values.sort_by(f64::total_cmp);
        values[values.len() / 2]
    };
    Run {
        connects_per_sec: mid(|r| r.connects_per_sec),
        cpu_us_per_connect: mid(|r| r.cpu_us_per_connect),
        bytes_per_conn: mid(|r| r.bytes_per_conn),
        memory_curve: runs[0].memory_curve.clone(),
        cpu_us_per_delivery: mid(|r| r.cpu_us_per_delivery),
        deliveries_per_sec: mid(|r| r.deliveries_per_sec),
        p50_ms: mid(|r| r.p50_ms),
        p99_ms: mid(|r| r.p99_ms),
    }
}

/// Microseconds since the Unix epoch: the clock messages carry.
pub fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// The server's CPU time so far (user + system), in microseconds.
pub(crate) fn cpu_us(pid: u32) -> anyhow::Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may hold spaces) start after ')'.
    let rest = stat.rsplit(')').next().context("stat format")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields[11].parse::<u64>()? + fields[12].parse::<u64>()?;
    // USER_HZ: 100 on Linux (the kernel's ABI for /proc, whatever its HZ).
    let hz = 100;
    Ok(ticks * 1_000_000 / hz)
}

pub async fn compare(args: &Args) -> anyhow::Result<()> {
    for name in plugin_set(args, Server::Imhost)
        .into_iter()
        .chain(plugin_set(args, Server::ImhostB))
    {
        guest_file(name)?;
    }
    if args.pin {
        let cpus = std::thread::available_parallelism()?.get();
        if cpus < 2 {
            bail!("--pin needs at least two CPUs (this machine has {cpus})");
        }
        pin(std::process::id(), &format!("1-{}", cpus - 1))?;
    }
    let mut rows = Vec::new();
    let mut csv_memory = String::from("server,connections,rss_bytes\n");
    for &n in &args.socket_counts {
        // Repeated, interleaved, and the median of each figure kept: on two
        // cores shared with the load generator one run varies by ±15 %.
        let mut all: Vec<(Server, Vec<Run>)> = Server::all(args)
            .into_iter()
            .map(|s| (s, Vec::new()))
            .collect();
        // Each round starts with the next server: a run leaves its closed
        // connections in TIME_WAIT for a minute, which makes the kernel's
        // connect and lookup work a little dearer for whoever runs after it.
        let servers = all.len();
        for round in 0..args.repeat.max(1) {
            for k in 0..servers {
                let (server, runs) = &mut all[(round + k) % servers];
                let run = measure(args, *server, n, args.rate)
                    .await
                    .with_context(|| format!("{} with {n} sockets", server.name()))?;
                runs.push(run);
            }
        }
        let mut runs = Vec::new();
        for (server, measured) in all {
            for (c, bytes) in &measured[0].memory_curve {
                csv_memory.push_str(&format!("{},{c},{bytes}\n", server.name()));
            }
            runs.push((server, median(&measured)));
        }
        rows.push((n, runs));
    }
    let mut csv_latency = String::from("server,offered_per_sec,p50_ms,p99_ms,delivered_per_sec\n");
    let sweep_n = args.socket_counts.iter().copied().min().unwrap_or(1000);
    if !args.no_sweep {
        for &rate in &[25_000u64, 50_000, 100_000, 200_000] {
            for server in Server::all(args) {
                let run = measure(args, server, sweep_n, rate).await?;
                csv_latency.push_str(&format!(
                    "{},{rate},{:.2},{:.2},{:.0}\n",
                    server.name(),
                    run.p50_ms,
                    run.p99_ms,
                    run.deliveries_per_sec
                ));
            }
        }
    }

    let with_b = has_b(args);
    print!(
        "\n{:<34}{:>11}{:>11}{:>11}",
        "sockets", "floor", "baseline", "imhost"
    );
    if with_b {
        print!("{:>11}", "imhost-b");
    }
    print!("{:>9}{:>9}", "/floor", "/base");
    if with_b {
        print!("{:>9}{:>9}", "b/floor", "b/a");
    }
    println!();
    /// A row of the table: its name, how to read it from a run, its digits.
    type Figure = (&'static str, fn(&Run) -> f64, usize);
    let figures: [Figure; 7] = [
        ("connects/s", |r| r.connects_per_sec, 0),
        ("server CPU µs per connect", |r| r.cpu_us_per_connect, 1),
        ("RSS bytes per idle connection", |r| r.bytes_per_conn, 0),
        ("server CPU µs per delivery", |r| r.cpu_us_per_delivery, 2),
        ("deliveries/s", |r| r.deliveries_per_sec, 0),
        ("latency p50 ms", |r| r.p50_ms, 1),
        ("latency p99 ms", |r| r.p99_ms, 1),
    ];
    for (n, runs) in &rows {
        let get = |s: Server| runs.iter().find(|(k, _)| *k == s).map(|(_, run)| run);
        for (name, figure, digits) in figures {
            let value = |s: Server| get(s).map_or(f64::NAN, figure);
            let (f, b, i) = (
                value(Server::Floor),
                value(Server::Baseline),
                value(Server::Imhost),
            );
            print!(
                "{:<34}{f:>11.digits$}{b:>11.digits$}{i:>11.digits$}",
                format!("{name} @{n}")
            );
            let ib = value(Server::ImhostB);
            if with_b {
                print!("{ib:>11.digits$}");
            }
            print!("{:>9.2}{:>9.2}", i / f, i / b);
            if with_b {
                print!("{:>9.2}{:>9.2}", ib / f, ib / i);
            }
            println!();
        }
    }
    println!(
        "\n{} deliveries/s offered for {} s as broadcasts to every socket; imhost with heartbeats, presence{}{}; medians of {} interleaved runs{}",
        args.rate,
        args.seconds,
        {
            let describe = |server| match plugin_set(args, server).as_slice() {
                [] => "no plugins".to_owned(),
                set => set.join(" and "),
            };
            let (a, b) = (describe(Server::Imhost), describe(Server::ImhostB));
            if has_b(args) && a != b {
                format!(", {a} (imhost-b: {b})")
            } else {
                format!(", {a}")
            }
        },
        if args.baseline_greets {
            "; the baseline greets each new socket"
        } else {
            ""
        },
        args.repeat.max(1),
        if args.pin {
            "; servers on CPU 0, the load generator on the others"
        } else {
            ""
        }
    );
    if let Some(dir) = &args.csv {
        std::fs::create_dir_all(dir)?;
        std::fs::write(dir.join("memory.csv"), csv_memory)?;
        std::fs::write(dir.join("latency.csv"), csv_latency)?;
        println!("curves written to {}", dir.display());
    }
    Ok(())
}

async fn measure(args: &Args, server: Server, n: usize, rate: u64) -> anyhow::Result<Run> {
    let addr = free_addr()?;
    let plugins = tempfile::tempdir()?;
    let mut child = match server {
        Server::Imhost | Server::ImhostB => {
            let (bin, guests) = match server {
                Server::ImhostB => (
                    args.imhost_b.as_ref().unwrap_or(&args.imhost),
                    args.guests_b.as_ref().unwrap_or(&args.guests),
                ),
                _ => (&args.imhost, &args.guests),
            };
            install_plugin_set(plugins.path(), guests, &plugin_set(args, server))?;
            super::spawn_imhost_bin(
                bin,
                args,
                addr,
                &[
                    "--plugins",
                    &plugins.path().display().to_string(),
                    // Connect URLs are fetched before the connect phase.
                    "--token-ttl",
                    "10m",
                ],
            )?
        }
        Server::Baseline => tokio::process::Command::new(std::env::current_exe()?)
            .args(["--baseline-server", &addr.to_string()])
            .args(args.baseline_greets.then_some("--baseline-greets"))
            .kill_on_drop(true)
            .spawn()?,
        Server::Floor => tokio::process::Command::new(std::env::current_exe()?)
            .args(["--floor-server", &addr.to_string()])
            .kill_on_drop(true)
            .spawn()?,
    };
    let pid = child.id().context("child pid")?;
    let http = reqwest::Client::new();
    wait_serving(&http, addr).await?;
    if args.pin {
        pin(pid, "0")?;
    }
    let plugin_count = plugin_set(args, server).len();
    if server.is_imhost() && plugin_count > 0 {
        super::plugins::wait_plugins(&http, addr, plugin_count).await?;
    }
    let rss_before = rss_bytes(pid)?;

    // Connect URLs first: fetching one is the business backend's call, not
    // part of a terminal's connect, and the others need none.
    let mut urls = Vec::with_capacity(n);
    for i in 0..n {
        urls.push(match server {
            Server::Imhost | Server::ImhostB => connect_url(&http, addr, i as i64 + 1).await?,
            _ => format!("ws://{addr}/ws"),
        });
    }
    let mut urls = urls.into_iter();

    // Connect, with memory checkpoints.
    let gate = Arc::new(Semaphore::new(64));
    let sources = Arc::new(SourcePorts::fresh());
    let checkpoints: Vec<usize> = (1..=8).map(|k| n * k / 8).collect();
    let mut memory_curve = Vec::new();
    let mut sockets = Vec::with_capacity(n);
    let cpu_connect_before = cpu_us(pid)?;
    let mut connect_time = Duration::ZERO;
    let mut done = 0;
    for &upto in &checkpoints {
        let phase = Instant::now();
        let mut tasks = Vec::with_capacity(upto - done);
        for url in urls.by_ref().take(upto - done) {
            let (gate, sources) = (gate.clone(), sources.clone());
            tasks.push(tokio::spawn(async move {
                let _permit = gate.acquire().await?;
                let tcp = sources.connect(addr).await?;
                let ws = super::terminal(url, tcp).await?;
                anyhow::Ok(ws)
            }));
        }
        for task in tasks {
            sockets.push(task.await??);
        }
        connect_time += phase.elapsed();
        done = upto;
        tokio::time::sleep(Duration::from_millis(300)).await;
        memory_curve.push((done, rss_bytes(pid)?.saturating_sub(rss_before)));
    }
    let cpu_us_per_connect = (cpu_us(pid)? - cpu_connect_before) as f64 / n as f64;
    let connects_per_sec = n as f64 / connect_time.as_secs_f64();
    let bytes_per_conn = memory_curve.last().map_or(0, |m| m.1) as f64 / n as f64;

    // Fan-out at the offered rate.
    let messages = ((rate as f64 * args.seconds as f64) / n as f64)
        .ceil()
        .max(1.0) as usize;
    let interval_us = (1_000_000.0 * n as f64 / rate as f64) as u64;
    let readers: Vec<_> = sockets
        .into_iter()
        .map(|ws| tokio::spawn(read_latencies(ws, messages)))
        .collect();
    let cpu_before = cpu_us(pid)?;
    let started = Instant::now();
    match server {
        Server::Imhost | Server::ImhostB => {
            // On schedule, up to 8 calls in flight: one round trip per
            // message must not be what limits the offered rate.
            let mut next = tokio::time::Instant::now();
            let in_flight = Arc::new(Semaphore::new(8));
            let mut calls = Vec::with_capacity(messages);
            for m in 0..messages {
                tokio::time::sleep_until(next).await;
                next += Duration::from_micros(interval_us);
                let permit = in_flight.clone().acquire_owned().await?;
                let http = http.clone();
                calls.push(tokio::spawn(async move {
                    let _permit = permit;
                    api(
                        &http,
                        addr,
                        "/broadcast",
                        serde_json::json!({"message": {"n": m, "t": now_us()}}),
                    )
                    .await
                }));
            }
            for call in calls {
                call.await??;
            }
        }
        _ => {
            http.post(format!(
                "http://{addr}/push?n={messages}&interval_us={interval_us}"
            ))
            .send()
            .await?
            .error_for_status()?;
        }
    }
    let mut latencies = Vec::with_capacity(n * messages);
    let mut open = Vec::with_capacity(n);
    for reader in readers {
        let (ws, got) = reader.await??;
        latencies.extend(got);
        open.push(ws);
    }
    let elapsed = started.elapsed().as_secs_f64();
    // Read before the sockets close: closing costs the servers differently
    // (the floor never reads) and is not delivery.
    let cpu = cpu_us(pid)? - cpu_before;
    drop(open);
    let deliveries = n * messages;
    if latencies.len() != deliveries {
        bail!("lost deliveries: {} of {deliveries}", latencies.len());
    }
    latencies.sort_unstable();
    let pick = |q: f64| latencies[((latencies.len() - 1) as f64 * q) as usize] as f64 / 1000.0;
    child.start_kill()?;
    let _ = child.wait().await;
    Ok(Run {
        connects_per_sec,
        cpu_us_per_connect,
        bytes_per_conn,
        memory_curve,
        cpu_us_per_delivery: cpu as f64 / deliveries as f64,
        deliveries_per_sec: deliveries as f64 / elapsed,
        p50_ms: pick(0.5),
        p99_ms: pick(0.99),
    })
}

/// Puts every thread of process `pid` on `cpus` (a `taskset` list). Threads
/// it starts later inherit their creator's set.
pub(crate) fn pin(pid: u32, cpus: &str) -> anyhow::Result<()> {
    let status = std::process::Command::new("taskset")
        .args(["--all-tasks", "--pid", "--cpu-list", cpus, &pid.to_string()])
        .stdout(std::process::Stdio::null())
        .status()
        .context("--pin runs taskset (util-linux)")?;
    if !status.success() {
        bail!("taskset --cpu-list {cpus} for pid {pid}: {status}");
    }
    Ok(())
}

/// Whether a second imhost runs: another build, or other plugins.
fn has_b(args: &Args) -> bool {
    args.imhost_b.is_some() || args.sockets_plugins_b.is_some()
}

/// The plugins `server` runs with: `--sockets-plugins` (none with
/// `--sockets-without-plugins`), or `--sockets-plugins-b` for the second
/// imhost when given.
fn plugin_set(args: &Args, server: Server) -> Vec<&str> {
    let names = match (server, &args.sockets_plugins_b) {
        (Server::ImhostB, Some(names)) => names,
        _ if args.sockets_without_plugins => return Vec::new(),
        _ => &args.sockets_plugins,
    };
    names
        .iter()
        .map(|name| name.trim())
        .filter(|name| !name.is_empty() && *name != "none")
        .collect()
}

/// The guest's file name (without `.wasm`) of a plugin the scenario knows.
pub(crate) fn guest_file(name: &str) -> anyhow::Result<&'static str> {
    Ok(match name {
        "word-filter" => "word_filter",
        "welcome" => "welcome",
        other => bail!("--sockets-plugins: unknown plugin {other} (word-filter, welcome)"),
    })
}

/// Installs `set` (names from word-filter and welcome) with their shipped
/// manifests.
pub(crate) fn install_plugin_set(dir: &Path, guests: &Path, set: &[&str]) -> anyhow::Result<()> {
    for name in set {
        let file = guest_file(name)?;
        std::fs::copy(
            guests.join(format!("{file}.wasm")),
            dir.join(format!("{name}.wasm")),
        )
        .with_context(|| format!("copy {file}.wasm (scripts/bench builds the guests)"))?;
        let manifest = super::repo_path(&format!("plugins/{name}/{name}.toml"));
        std::fs::copy(&manifest, dir.join(format!("{name}.toml")))
            .with_context(|| format!("copy {}", manifest.display()))?;
    }
    Ok(())
}

type Socket = tokio_tungstenite::WebSocketStream<TcpStream>;

/// Reads `want` timestamped frames; returns the socket, still open, and
/// each frame's latency in µs. Frames without a timestamp (a welcome) are
/// skipped.
async fn read_latencies(mut ws: Socket, want: usize) -> anyhow::Result<(Socket, Vec<u32>)> {
    let mut out = Vec::with_capacity(want);
    while out.len() < want {
        match tokio::time::timeout(Duration::from_secs(60), ws.next()).await? {
            Some(Ok(Message::Text(text))) => {
                let now = now_us();
                let Some(sent) = sent_at(&text) else { continue };
                out.push(u32::try_from(now.saturating_sub(sent)).unwrap_or(u32::MAX));
            }
            Some(Ok(_)) => {}
            other => bail!("socket ended early: {other:?}"),
        }
    }
    Ok((ws, out))
}

/// The `"t":` field of a frame, without a JSON parse per delivery.
pub(crate) fn sent_at(text: &str) -> Option<u64> {
    let at = text.find("\"t\":")? + 4;
    let digits: String = text[at..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().ok()
}

/// The floor: the handshake, then one `write()` per socket per message.
pub mod floor {
    use std::net::SocketAddr;
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    type Sockets = Arc<Mutex<Vec<TcpStream>>>;

    pub async fn serve(addr: SocketAddr) -> anyhow::Result<()> {
        let socket = tokio::net::TcpSocket::new_v4()?;
        socket.set_reuseaddr(true)?;
        socket.bind(addr)?;
        let listener: TcpListener = socket.listen(4096)?;
        let sockets: Sockets = Arc::default();
        loop {
            let (stream, _) = listener.accept().await?;
            let _ = stream.set_nodelay(true);
            tokio::spawn(handle(stream, sockets.clone()));
        }
    }

    async fn handle(mut stream: TcpStream, sockets: Sockets) -> anyhow::Result<()> {
        let mut head = Vec::with_capacity(512);
        let mut byte = [0u8; 256];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = stream.read(&mut byte).await?;
            if n == 0 {
                return Ok(());
            }
            head.extend_from_slice(&byte[..n]);
        }
        let head = String::from_utf8_lossy(&head).into_owned();
        let path = head.split_whitespace().nth(1).unwrap_or("/").to_owned();
        if path.starts_with("/ws") {
            let key = head
                .lines()
                .find_map(|l| {
                    let (name, value) = l.split_once(':')?;
                    name.eq_ignore_ascii_case("sec-websocket-key")
                        .then(|| value.trim().to_owned())
                })
                .unwrap_or_default();
            let accept =
                tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
            stream
                .write_all(
                    format!(
                        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\n"
                    )
                    .as_bytes(),
                )
                .await?;
            sockets.lock().expect("lock").push(stream);
            return Ok(());
        }
        if path.starts_with("/push") {
            let param = |name: &str| -> u64 {
                path.split(['?', '&'])
                    .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('=')?.parse().ok())
                    .unwrap_or(0)
            };
            let (n, interval) = (param("n"), param("interval_us"));
            let mut next = tokio::time::Instant::now();
            for m in 0..n {
                tokio::time::sleep_until(next).await;
                next += Duration::from_micros(interval);
                let text = format!("{{\"n\":{m},\"t\":{}}}", super::now_us());
                let mut frame = vec![0x81, text.len() as u8];
                frame.extend_from_slice(text.as_bytes());
                let sockets = sockets.lock().expect("lock");
                for socket in sockets.iter() {
                    // One write per socket per message, and nothing else.
                    let _ = socket.try_write(&frame);
                }
            }
        }
        stream
            .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
            .await?;
        Ok(())
    }
}
