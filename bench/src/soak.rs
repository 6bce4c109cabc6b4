//! The soak (`--soak SECONDS`, outside CI): two clustered nodes on a Redis of
//! their own, with a filter plugin, under churn for a bounded time, to show
//! that resident memory and file descriptors stay flat.
//!
//! Every second: 20 terminals connect and the 20 oldest leave (about 200
//! stay), and 200 direct messages go through node 0's API to live terminals.
//! Every minute the filter is swapped (a new manifest). At a third of the run
//! Redis is killed and restarted empty; at two thirds node 1 is stopped
//! (SIGTERM) and started again. Every 5 s each node's RSS and open file
//! descriptors are written to `target/soak.csv` (seconds, node, rss_kb,
//! fds, terminals, messages_ok, messages_refused). Everything talks to
//! loopback only and stops by itself.

use std::collections::VecDeque;
use std::io::Write;
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::net::TcpStream;
use tokio::process::Command;
use tokio_tungstenite::WebSocketStream;

use super::{
    Args, api, cluster_addrs, connect_url, free_addr, rss_bytes, spawn_clustered, start_redis,
    wait_serving,
};

const CHURN_PER_SECOND: usize = 20;
const LIVE_TERMINALS: usize = 200;
const MESSAGES_PER_SECOND: usize = 200;

fn fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, Iterator::count)
}

pub async fn run(args: &Args, seconds: u64) -> anyhow::Result<()> {
    let plugins = tempfile::tempdir()?;
    std::fs::copy(
        args.guests.join("tagger.wasm"),
        plugins.path().join("tag.wasm"),
    )?;
    std::fs::write(plugins.path().join("tag.toml"), "[settings]\nversion = 0\n")?;
    let plugin_dir = plugins.path().to_string_lossy().into_owned();
    let redis_port = free_addr()?.port();
    let mut redis = start_redis(redis_port, &[])?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let redis_url = format!("redis://127.0.0.1:{redis_port}/");
    let (addrs, servers) = cluster_addrs(2)?;
    let plugins_arg = ["--plugins", plugin_dir.as_str()];
    let mut nodes = Vec::new();
    for &addr in &addrs {
        nodes.push(spawn_clustered(
            args,
            addr,
            &servers,
            &redis_url,
            &plugins_arg,
        )?);
    }
    let http = reqwest::Client::new();
    for &addr in &addrs {
        wait_serving(&http, addr).await?;
    }

    let mut csv = std::fs::File::create("target/soak.csv")?;
    writeln!(
        csv,
        "seconds,node,rss_kb,fds,terminals,messages_ok,messages_refused"
    )?;
    let started = Instant::now();
    let end = Duration::from_secs(seconds);
    let mut live: VecDeque<(i64, WebSocketStream<TcpStream>)> = VecDeque::new();
    let mut next_client: i64 = 1;
    let (mut ok, mut refused) = (0u64, 0u64);
    let (mut redis_restarted, mut node_restarted) = (false, false);
    let mut version = 0;
    let mut last_sample = Duration::ZERO;
    let mut last_swap = Duration::ZERO;
    while started.elapsed() < end {
        let tick = Instant::now();
        let now = started.elapsed();
        // Churn: new terminals in (their owning node is in the URL), oldest out.
        for _ in 0..CHURN_PER_SECOND {
            let client = next_client;
            next_client += 1;
            // While Redis is down every call waits for its 503: stop for
            // this second at the first one.
            let Ok(url) = connect_url(&http, addrs[0], client).await else {
                break;
            };
            {
                let host = url
                    .trim_start_matches("ws://")
                    .split('/')
                    .next()
                    .unwrap_or_default()
                    .to_owned();
                if let Ok(tcp) = TcpStream::connect(&host).await
                    && let Ok(ws) = super::terminal(url, tcp).await
                {
                    live.push_back((client, ws));
                }
            }
        }
        while live.len() > LIVE_TERMINALS {
            if let Some((_, mut ws)) = live.pop_front() {
                let _ = ws.close(None).await;
            }
        }
        // Messages to live terminals (terminals read nothing: the node's
        // slow-consumer cut-off keeps that bounded, which is part of the test).
        for n in 0..MESSAGES_PER_SECOND {
            let Some((client, _)) = live.get(n % live.len().max(1)) else {
                break;
            };
            let body = serde_json::json!({"sender": 0, "receivers": [client], "message": {"n": n}});
            match api(&http, addrs[0], "/messages", body).await {
                Ok(_) => ok += 1,
                Err(_) => {
                    refused += 1;
                    break;
                }
            }
        }
        if now - last_swap >= Duration::from_secs(60) {
            last_swap = now;
            version += 1;
            let tmp = plugins.path().join("tag.toml.partial");
            std::fs::write(&tmp, format!("[settings]\nversion = {version}\n"))?;
            std::fs::rename(&tmp, plugins.path().join("tag.toml"))?;
        }
        if !redis_restarted && now >= end / 3 {
            redis_restarted = true;
            println!("{:>6.0}s  restarting Redis (empty)", now.as_secs_f64());
            let _ = redis.kill().await;
            redis = start_redis(redis_port, &[])?;
        }
        if !node_restarted && now >= end * 2 / 3 {
            node_restarted = true;
            println!("{:>6.0}s  restarting node 1", now.as_secs_f64());
            if let Some(pid) = nodes[1].id() {
                let _ = Command::new("kill")
                    .args(["-TERM", &pid.to_string()])
                    .status()
                    .await;
            }
            let _ = tokio::time::timeout(Duration::from_secs(15), nodes[1].wait()).await;
            nodes[1] = spawn_clustered(args, addrs[1], &servers, &redis_url, &plugins_arg)?;
            wait_serving(&http, addrs[1]).await?;
        }
        if now - last_sample >= Duration::from_secs(5) || last_sample == Duration::ZERO {
            last_sample = now;
            for (i, node) in nodes.iter().enumerate() {
                let pid = node.id().context("node pid")?;
                let rss_kb = rss_bytes(pid).unwrap_or(0) / 1024;
                writeln!(
                    csv,
                    "{:.0},{i},{rss_kb},{},{},{ok},{refused}",
                    now.as_secs_f64(),
                    fds(pid),
                    live.len()
                )?;
            }
            csv.flush()?;
        }
        if let Some(rest) = Duration::from_secs(1).checked_sub(tick.elapsed()) {
            tokio::time::sleep(rest).await;
        }
    }
    println!(
        "soak: {seconds}s, {} terminals connected in all, {ok} messages accepted, {refused} refused; target/soak.csv",
        next_client - 1
    );
    Ok(())
}
