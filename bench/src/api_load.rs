//! The business API on K cores (`imhost-bench --only-api`): direct messages,
//! one receiver each, sent as fast as the callers can for `--seconds`, by
//! three kinds of caller: single-message requests over HTTP/1.1 (a pool of
//! connections), the same over one h2c connection, and `POST /api/v1/batch`
//! with `--api-batch` items per request. imhost runs on CPUs 0..K-1 with the
//! word filter, the load generator and `--api-receivers` terminals on the
//! others.
//!
//! Reports messages accepted per second, refused (503), delivered within
//! `--drain-seconds`, and the server's CPU per message, with the CPU per
//! message at each K over that at the first K (the goal: within 1.2 from 2
//! to 8 cores). On a 2-core machine the load generator has one core, so the
//! figures are what one core of callers can offer; the server's busy share
//! says how far that loaded it.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use super::saturation::{Server, read, spawn_pinned};
use super::sockets::{cpu_us, now_us, pin};
use super::source_ports::SourcePorts;
use super::{API_KEY, Args, connect_url, free_addr, wait_serving};

#[derive(Clone, Copy, PartialEq, Eq)]
enum Caller {
    Single,
    H2c,
    Batch,
}

impl Caller {
    fn name(self) -> &'static str {
        match self {
            Caller::Single => "HTTP/1.1 single",
            Caller::H2c => "h2c single",
            Caller::Batch => "HTTP/1.1 batch",
        }
    }
}

#[derive(Clone, Copy, Default)]
struct Run {
    accepted_per_sec: f64,
    refused: u64,
    lost: u64,
    cpu_us_per_message: f64,
    busy: f64,
}

pub async fn run(args: &Args) -> anyhow::Result<()> {
    let cpus = std::thread::available_parallelism()?.get();
    let mut rows = Vec::new();
    for &k in &args.server_cores {
        if k == 0 {
            bail!("--server-cores takes counts of 1 or more");
        }
        let pinned = (k < cpus).then_some(cpus);
        if pinned.is_none() {
            println!("K = {k}: this machine has {cpus} CPUs; measured unpinned");
        }
        for caller in [Caller::Single, Caller::H2c, Caller::Batch] {
            let run = measure(args, caller, k, pinned)
                .await
                .with_context(|| format!("{} on {k} cores", caller.name()))?;
            rows.push((k, caller, run));
        }
    }
    println!(
        "\n{:>3} {:<17}{:>12}{:>9}{:>7}{:>9}{:>7}{:>10}",
        "K", "caller", "messages/s", "refused", "lost", "µs/msg", "busy", "µs vs K0"
    );
    for (k, caller, r) in &rows {
        let first = rows
            .iter()
            .find(|(_, c, _)| c == caller)
            .map_or(f64::NAN, |(_, _, f)| f.cpu_us_per_message);
        println!(
            "{k:>3} {:<17}{:>12.0}{:>9}{:>7}{:>9.2}{:>6.0}%{:>10.2}",
            caller.name(),
            r.accepted_per_sec,
            r.refused,
            r.lost,
            r.cpu_us_per_message,
            r.busy * 100.0,
            r.cpu_us_per_message / first
        );
    }
    println!(
        "\ndirect messages to one of {} terminals each, {} s per run, {} requests in flight \
         ({} per batch request), imhost with word-filter; busy = server CPU time over the \
         run / K; lost = accepted but not delivered {} s after the last request",
        args.api_receivers, args.seconds, args.api_in_flight, args.api_batch, args.drain_seconds
    );
    Ok(())
}

async fn measure(
    args: &Args,
    caller: Caller,
    k: usize,
    pinned_of: Option<usize>,
) -> anyhow::Result<Run> {
    let addr = free_addr()?;
    let plugins = tempfile::tempdir()?;
    let mut child = spawn_pinned(
        args,
        Server::Imhost,
        addr,
        plugins.path(),
        &["word-filter"],
        k,
        pinned_of.is_some(),
    )?;
    let pid = child.id().context("server pid")?;
    if let Some(cpus) = pinned_of {
        pin(std::process::id(), &format!("{k}-{}", cpus - 1))?;
    }
    let http = reqwest::Client::new();
    wait_serving(&http, addr).await?;
    super::plugins::wait_plugins(&http, addr, 1).await?;
    let receivers = args.api_receivers.max(1);
    let sources = SourcePorts::fresh();
    let stop = CancellationToken::new();
    let delivered = Arc::new(AtomicU64::new(0));
    let mut readers = Vec::with_capacity(receivers);
    for id in 1..=receivers {
        let url = connect_url(&http, addr, id as i64).await?;
        let ws = super::terminal(url, sources.connect(addr).await?).await?;
        readers.push(tokio::spawn(read(ws, stop.clone(), delivered.clone())));
    }
    let client = match caller {
        Caller::H2c => reqwest::Client::builder().http2_prior_knowledge().build()?,
        _ => reqwest::Client::builder()
            .pool_max_idle_per_host(args.api_in_flight)
            .build()?,
    };
    let (per_request, callers, path) = match caller {
        Caller::Batch => (
            args.api_batch.max(1),
            (args.api_in_flight / 8).max(1),
            "/api/v1/batch",
        ),
        _ => (1, args.api_in_flight.max(1), "/api/v1/messages"),
    };
    let accepted = Arc::new(AtomicU64::new(0));
    let refused = Arc::new(AtomicU64::new(0));
    let next_id = Arc::new(AtomicU64::new(0));
    let gate = Arc::new(Semaphore::new(0));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(args.seconds.max(1));
    let mut tasks = Vec::with_capacity(callers);
    for _ in 0..callers {
        let (client, accepted, refused, next_id, gate) = (
            client.clone(),
            accepted.clone(),
            refused.clone(),
            next_id.clone(),
            gate.clone(),
        );
        let url = format!("http://{addr}{path}");
        tasks.push(tokio::spawn(async move {
            let _start = gate.acquire().await?;
            while tokio::time::Instant::now() < deadline {
                let body = body(caller, per_request, receivers, &next_id);
                let response = client
                    .post(&url)
                    .bearer_auth(API_KEY)
                    .header("content-type", "application/json")
                    .body(body)
                    .send()
                    .await?;
                match (response.status().as_u16(), caller) {
                    (200, Caller::Batch) => {
                        let answer: serde_json::Value = response.json().await?;
                        let results = answer["results"].as_array().context("results")?;
                        let ok = results.iter().filter(|r| r.get("error").is_none()).count();
                        accepted.fetch_add(ok as u64, Ordering::Relaxed);
                        refused.fetch_add((results.len() - ok) as u64, Ordering::Relaxed);
                    }
                    (200, _) => {
                        accepted.fetch_add(1, Ordering::Relaxed);
                    }
                    (503, _) => {
                        refused.fetch_add(per_request as u64, Ordering::Relaxed);
                    }
                    (other, _) => bail!("{url} answered {other}"),
                }
            }
            anyhow::Ok(())
        }));
    }
    let cpu_before = cpu_us(pid)?;
    let started = Instant::now();
    gate.add_permits(callers);
    for task in tasks {
        task.await??;
    }
    let sending = started.elapsed().as_secs_f64();
    let cpu = cpu_us(pid)? - cpu_before;
    let want = accepted.load(Ordering::Relaxed);
    let drained_by = tokio::time::Instant::now() + Duration::from_secs(args.drain_seconds);
    while delivered.load(Ordering::Relaxed) < want && tokio::time::Instant::now() < drained_by {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let got = delivered.load(Ordering::Relaxed);
    stop.cancel();
    for reader in readers {
        reader.await?;
    }
    child.start_kill()?;
    let _ = child.wait().await;
    Ok(Run {
        accepted_per_sec: want as f64 / sending,
        refused: refused.load(Ordering::Relaxed),
        lost: want.saturating_sub(got),
        cpu_us_per_message: cpu as f64 / want.max(1) as f64,
        busy: cpu as f64 / 1e6 / sending / k as f64,
    })
}

/// One request's body: a direct message, or `n` of them in a batch, each to
/// the next receiver in turn.
fn body(caller: Caller, n: usize, receivers: usize, next_id: &AtomicU64) -> String {
    let one = || {
        let to = next_id.fetch_add(1, Ordering::Relaxed) % receivers as u64 + 1;
        format!(
            r#"{{"sender":0,"receivers":[{to}],"message":{{"t":{}}}}}"#,
            now_us()
        )
    };
    match caller {
        Caller::Batch => {
            let items: Vec<String> = (0..n)
                .map(|_| format!(r#"{{"messages":{}}}"#, one()))
                .collect();
            format!(r#"{{"items":[{}]}}"#, items.join(","))
        }
        _ => one(),
    }
}
