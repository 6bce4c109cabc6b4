//! `--only-redis-cluster`: cross-node deliveries per second through one Redis
//! and through a Redis Cluster of 1 and 3 masters (sharded pub/sub), with 3
//! and 6 imhost nodes, and what each costs Redis: deliveries per Redis
//! CPU-second, in all and per shard. Then presence churn (terminals
//! connecting and closing) through one Redis and 3 masters: changes per
//! second, per Redis CPU-second, and the busiest Redis's share of the Redis
//! CPU (how evenly the presence buckets spread the writes). Every process
//! shares this machine's cores, so the figures are ratios against the
//! standalone run of the same command, not capacities.
//!
//! The cluster is made without `redis-cli`: masters started with
//! `--cluster-enabled`, introduced with `CLUSTER MEET`, the 16384 slots
//! split with `CLUSTER ADDSLOTSRANGE`. No replicas (a replica per master
//! costs 3–3.5× the Redis CPU per message: issue 26's measurement).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::Context;
use futures_util::{StreamExt, TryStreamExt};
use tokio::process::Child;

use super::{Args, cluster_addrs, free_addr, spawn_imhost, start_redis};

/// One Redis deployment under test.
struct Deployment {
    redis: Vec<Child>,
    ports: Vec<u16>,
    /// `--redis URL` or `--redis-cluster SEEDS`.
    args: [String; 2],
    _dir: tempfile::TempDir,
}

impl Deployment {
    async fn standalone() -> anyhow::Result<Deployment> {
        let port = free_addr()?.port();
        let redis = start_redis(port, &[])?;
        wait_ping(port).await?;
        Ok(Deployment {
            redis: vec![redis],
            ports: vec![port],
            args: ["--redis".into(), format!("redis://127.0.0.1:{port}/")],
            _dir: tempfile::tempdir()?,
        })
    }

    async fn cluster(masters: usize) -> anyhow::Result<Deployment> {
        let dir = tempfile::tempdir()?;
        let mut redis = Vec::new();
        let mut ports = Vec::new();
        let mut buses = Vec::new();
        for _ in 0..masters {
            let port = free_addr()?.port();
            // The bus port chosen free too (its default, port + 10000, may
            // be taken or past 65535).
            let bus_port = free_addr()?.port();
            let bus = bus_port.to_string();
            let conf = dir.path().join(format!("nodes-{port}.conf"));
            let conf = conf.to_string_lossy().into_owned();
            redis.push(start_redis(
                port,
                &[
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    &conf,
                    "--cluster-port",
                    &bus,
                ],
            )?);
            ports.push(port);
            buses.push(bus_port);
        }
        for &port in &ports {
            wait_ping(port).await?;
        }
        let per = 16384 / masters;
        for (i, &port) in ports.iter().enumerate() {
            let mut conn = connection(port).await?;
            for (&other, &bus) in ports[..i].iter().zip(&buses) {
                let () = redis::cmd("CLUSTER")
                    .arg("MEET")
                    .arg("127.0.0.1")
                    .arg(other)
                    .arg(bus)
                    .query_async(&mut conn)
                    .await?;
            }
            let last = if i + 1 == masters {
                16383
            } else {
                (i + 1) * per - 1
            };
            let () = redis::cmd("CLUSTER")
                .arg("ADDSLOTSRANGE")
                .arg(i * per)
                .arg(last)
                .query_async(&mut conn)
                .await?;
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        'settle: loop {
            anyhow::ensure!(Instant::now() < deadline, "the cluster did not settle");
            tokio::time::sleep(Duration::from_millis(100)).await;
            for &port in &ports {
                let mut conn = connection(port).await?;
                let info: String = redis::cmd("CLUSTER")
                    .arg("INFO")
                    .query_async(&mut conn)
                    .await?;
                if !info.contains("cluster_state:ok")
                    || !info.contains(&format!("cluster_known_nodes:{masters}"))
                {
                    continue 'settle;
                }
            }
            break;
        }
        let seeds = ports
            .iter()
            .map(|p| format!("redis://127.0.0.1:{p}/"))
            .collect::<Vec<_>>()
            .join(",");
        Ok(Deployment {
            redis,
            ports,
            args: ["--redis-cluster".into(), seeds],
            _dir: dir,
        })
    }

    /// `nodes` imhost nodes on this deployment.
    fn spawn_nodes(
        &self,
        args: &Args,
        nodes: usize,
    ) -> anyhow::Result<(Vec<SocketAddr>, Vec<Child>)> {
        let (addrs, servers): (Vec<SocketAddr>, String) = cluster_addrs(nodes)?;
        let mut children = Vec::new();
        for addr in &addrs {
            let name = addr.to_string();
            children.push(spawn_imhost(
                args,
                *addr,
                &[
                    "--server",
                    &name,
                    "--servers",
                    &servers,
                    &self.args[0],
                    &self.args[1],
                ],
            )?);
        }
        Ok((addrs, children))
    }

    /// Redis CPU time so far, all processes together, in microseconds.
    fn cpu_us(&self) -> anyhow::Result<u64> {
        Ok(self.cpu_us_each()?.iter().sum())
    }

    /// Each Redis process's CPU time so far, in microseconds.
    fn cpu_us_each(&self) -> anyhow::Result<Vec<u64>> {
        self.redis
            .iter()
            .map(|c| super::sockets::cpu_us(c.id().context("redis pid")?))
            .collect()
    }
}

async fn connection(port: u16) -> anyhow::Result<redis::aio::MultiplexedConnection> {
    Ok(redis::Client::open(format!("redis://127.0.0.1:{port}/"))?
        .get_multiplexed_async_connection()
        .await?)
}

async fn wait_ping(port: u16) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(mut conn) = connection(port).await
            && redis::cmd("PING")
                .query_async::<String>(&mut conn)
                .await
                .is_ok()
        {
            return Ok(());
        }
        anyhow::ensure!(Instant::now() < deadline, "redis on {port} did not start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

struct Figures {
    per_sec: f64,
    per_redis_cpu_sec: f64,
    shards: usize,
}

async fn measure(args: &Args, deployment: &Deployment, nodes: usize) -> anyhow::Result<Figures> {
    let (addrs, children) = deployment.spawn_nodes(args, nodes)?;
    let cpu_before = deployment.cpu_us()?;
    let run = super::cluster::run(args, &addrs).await?;
    let cpu = deployment.cpu_us()?.saturating_sub(cpu_before).max(1) as f64 / 1e6;
    drop(children);
    Ok(Figures {
        per_sec: run.per_sec,
        per_redis_cpu_sec: args.messages as f64 / cpu,
        shards: deployment.ports.len(),
    })
}

struct Churn {
    per_sec: f64,
    per_redis_cpu_sec: f64,
    /// The busiest Redis process's part of all Redis CPU (1.0 with one).
    busiest_share: f64,
}

/// Terminals connecting and closing: each takes a connect URL from node
/// 0's API (a token written), connects at its node (the token taken, the
/// connect script) and closes (the disconnect script), 32 at a time.
async fn churn(args: &Args, deployment: &Deployment, clients: i64) -> anyhow::Result<Churn> {
    let (addrs, children) = deployment.spawn_nodes(args, 3)?;
    let http = reqwest::Client::new();
    for &addr in &addrs {
        super::wait_serving(&http, addr).await?;
    }
    let before = deployment.cpu_us_each()?;
    let started = Instant::now();
    let entry = addrs[0];
    futures_util::stream::iter(1..=clients)
        .map(|id| {
            let http = http.clone();
            async move {
                let (url, tcp) = super::dial_owner(&http, entry, id).await?;
                let mut ws = super::terminal(url, tcp).await?;
                ws.close(None).await?;
                while ws.next().await.is_some() {}
                anyhow::Ok(())
            }
        })
        .buffer_unordered(32)
        .try_collect::<Vec<()>>()
        .await?;
    // Every node has seen every close; the last disconnect scripts are
    // one round trip behind.
    let deadline = Instant::now() + Duration::from_secs(30);
    for &addr in &addrs {
        loop {
            let stats = super::api_get(&http, addr, "/stats").await?;
            if stats["connections"] == 0 {
                break;
            }
            anyhow::ensure!(Instant::now() < deadline, "sockets still open on {addr}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let elapsed = started.elapsed().as_secs_f64();
    let used: Vec<u64> = deployment
        .cpu_us_each()?
        .into_iter()
        .zip(&before)
        .map(|(now, then)| now.saturating_sub(*then))
        .collect();
    let total = used.iter().sum::<u64>().max(1) as f64;
    let online = super::api_get(&http, addrs[0], "/online").await?;
    anyhow::ensure!(
        online.as_array().is_some_and(Vec::is_empty),
        "clients left online: {online}"
    );
    drop(children);
    let changes = 2.0 * clients as f64;
    Ok(Churn {
        per_sec: changes / elapsed,
        per_redis_cpu_sec: changes / (total / 1e6),
        busiest_share: used.iter().copied().max().unwrap_or(0) as f64 / total,
    })
}

pub async fn run(args: &Args) -> anyhow::Result<()> {
    println!(
        "\n{:<44}{:>12}{:>16}{:>16}{:>10}",
        "deliveries through Redis", "msgs/s", "per Redis CPU-s", "per shard CPU-s", "vs one"
    );
    for nodes in [3, 6] {
        let standalone = {
            let deployment = Deployment::standalone().await?;
            measure(args, &deployment, nodes)
                .await
                .context("standalone run")?
        };
        let mut rows = vec![(format!("{nodes} nodes, one Redis"), standalone)];
        for masters in [1, 3] {
            let deployment = Deployment::cluster(masters).await?;
            let figures = measure(args, &deployment, nodes)
                .await
                .with_context(|| format!("cluster of {masters}"))?;
            rows.push((
                format!("{nodes} nodes, Redis Cluster, {masters} master(s)"),
                figures,
            ));
        }
        let base = rows[0].1.per_sec;
        for (name, f) in &rows {
            println!(
                "{name:<44}{:>12.0}{:>16.0}{:>16.0}{:>10.2}",
                f.per_sec,
                f.per_redis_cpu_sec,
                f.per_redis_cpu_sec / f.shards as f64,
                f.per_sec / base
            );
        }
    }
    println!(
        "\n{} messages into node 0's API, 32 callers, {} receivers spread over the nodes; \
         per Redis CPU-s: messages / CPU seconds of every Redis process",
        args.messages, args.receivers
    );
    run_churn(args).await
}

/// Presence churn alone (`--only-presence-churn`).
pub async fn run_churn(args: &Args) -> anyhow::Result<()> {
    println!(
        "\n{:<44}{:>12}{:>16}{:>16}{:>10}",
        "presence churn, 3 nodes", "changes/s", "per Redis CPU-s", "busiest share", "vs one"
    );
    let clients = args.connections.min(5000) as i64;
    // Interleaved rounds, medians kept: this machine's noise is larger
    // than the differences looked for.
    const ROUNDS: usize = 3;
    let deployments = [
        Deployment::standalone().await?,
        Deployment::cluster(3).await?,
    ];
    let mut runs: [Vec<Churn>; 2] = [Vec::new(), Vec::new()];
    for _ in 0..ROUNDS {
        for (deployment, runs) in deployments.iter().zip(runs.iter_mut()) {
            runs.push(churn(args, deployment, clients).await.context("churn")?);
        }
    }
    let median = |runs: &[Churn], pick: fn(&Churn) -> f64| {
        let mut values: Vec<f64> = runs.iter().map(pick).collect();
        values.sort_by(f64::total_cmp);
        values[values.len() / 2]
    };
    let base = median(&runs[0], |c| c.per_sec);
    for (name, runs) in ["one Redis", "Redis Cluster, 3 masters"].iter().zip(&runs) {
        let per_sec = median(runs, |c| c.per_sec);
        println!(
            "{name:<44}{:>12.0}{:>16.0}{:>16.2}{:>10.2}",
            per_sec,
            median(runs, |c| c.per_redis_cpu_sec),
            median(runs, |c| c.busiest_share),
            per_sec / base
        );
    }
    println!(
        "\n{clients} terminals connect (a connect URL from node 0, the socket at their node) \
         and close, 32 at a time; a change is a connect or a disconnect; medians of 3 \
         interleaved rounds"
    );
    Ok(())
}
