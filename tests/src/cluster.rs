//! Several real `imhost` processes on one Redis: a cluster.

use std::time::Duration;

use imhost_client::ClientId;

use crate::api::{API_KEY, Api};
use crate::process::{ImhostProcess, free_addr};
use crate::redis::RedisServer;

/// One node of a test cluster.
pub struct ClusterNode {
    pub api: Api,
    pub name: String,
    pub process: Option<ImhostProcess>,
}

/// `n` imhost processes sharing `redis`, with short liveness and heartbeat
/// times so failure tests finish quickly.
pub struct Cluster {
    pub nodes: Vec<ClusterNode>,
    pub servers: Vec<String>,
    /// `--redis URL` or `--redis-cluster SEEDS`.
    redis_args: [String; 2],
    extra: Vec<String>,
}

impl Cluster {
    pub async fn start(redis: &RedisServer, n: usize) -> Cluster {
        Self::start_with(redis, n, &[]).await
    }

    /// Like [`Cluster::start`], with more arguments for every node.
    pub async fn start_with(redis: &RedisServer, n: usize, extra: &[&str]) -> Cluster {
        Self::start_on(["--redis".into(), redis.url()], n, extra).await
    }

    /// `n` imhost processes on a Redis Cluster (`--redis-cluster`).
    pub async fn start_on_cluster(
        redis: &crate::redis_cluster::RedisCluster,
        n: usize,
        extra: &[&str],
    ) -> Cluster {
        Self::start_on(["--redis-cluster".into(), redis.seeds_arg()], n, extra).await
    }

    async fn start_on(redis_args: [String; 2], n: usize, extra: &[&str]) -> Cluster {
        let addrs: Vec<_> = (0..n).map(|_| free_addr()).collect();
        let servers: Vec<String> = addrs.iter().map(ToString::to_string).collect();
        let mut cluster = Cluster {
            nodes: Vec::new(),
            servers,
            redis_args,
            extra: extra.iter().map(ToString::to_string).collect(),
        };
        for addr in addrs {
            let api = Api::new(addr);
            cluster.nodes.push(ClusterNode {
                api,
                name: addr.to_string(),
                process: None,
            });
        }
        for i in 0..n {
            cluster.launch(i);
        }
        for node in &cluster.nodes {
            node.api.wait_serving().await;
            node.api.wait_plugins_settled().await;
        }
        cluster
    }

    /// Starts (or restarts) node `i`'s process.
    pub fn launch(&mut self, i: usize) {
        let servers = self.servers.join(",");
        let name = self.nodes[i].name.clone();
        let mut args = vec![
            "--listen",
            &name,
            "--server",
            &name,
            "--servers",
            &servers,
            &self.redis_args[0],
            &self.redis_args[1],
            "--api-key",
            API_KEY,
            "--node-ttl",
            "1500ms",
            "--heartbeat-interval",
            "500ms",
            "--heartbeat-timeout",
            "3s",
        ];
        args.extend(self.extra.iter().map(String::as_str));
        let process = ImhostProcess::spawn(self.nodes[i].api.addr, &args, &[]);
        self.nodes[i].process = Some(process);
    }

    pub fn node(&self, i: usize) -> &Api {
        &self.nodes[i].api
    }

    /// The index of the node that owns `client`.
    pub fn owner(&self, client: ClientId) -> usize {
        client.rem_euclid(self.servers.len() as i64) as usize
    }

    /// The first client id ≥ `from` that lives on node `i`.
    pub fn client_on(&self, i: usize, from: ClientId) -> ClientId {
        (from..).find(|&c| self.owner(c) == i).expect("some id")
    }

    /// Sends SIGKILL to node `i` and waits for the process to be gone.
    pub async fn kill(&mut self, i: usize) {
        let process = self.nodes[i].process.take().expect("running");
        process.signal("KILL");
        let _ = process.wait(Duration::from_secs(10)).await;
    }
}
