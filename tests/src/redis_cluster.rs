//! A real Redis Cluster on loopback: `redis-server --cluster-enabled` on free
//! ports (nothing kept on disk), joined by `redis-cli --cluster create`,
//! every process killed by its PID on drop. Failover, slot migration and a
//! master's death are made the way an operator (or a crash) makes them, for
//! the failure tests of cluster mode's next step (issue 26).

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tempfile::TempDir;

struct Server {
    port: u16,
    /// The cluster bus: by default `port + 10000`, which may be taken or
    /// past 65535 for a free port; chosen free, like `port`.
    bus_port: u16,
    child: Option<Child>,
}

pub struct RedisCluster {
    servers: Vec<Server>,
    dir: TempDir,
}

async fn conn(port: u16) -> Option<redis::aio::MultiplexedConnection> {
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}/")).ok()?;
    client.get_multiplexed_async_connection().await.ok()
}

async fn query(port: u16, cmd: &redis::Cmd) -> Option<redis::Value> {
    let mut c = conn(port).await?;
    cmd.query_async(&mut c).await.ok()
}

async fn text(port: u16, cmd: &redis::Cmd) -> Option<String> {
    match query(port, cmd).await? {
        redis::Value::BulkString(b) => String::from_utf8(b).ok(),
        redis::Value::VerbatimString { text, .. } => Some(text),
        redis::Value::SimpleString(s) => Some(s),
        redis::Value::Okay => Some("OK".into()),
        _ => None,
    }
}

/// A master as `CLUSTER NODES` lists it.
struct Master {
    id: String,
    port: u16,
    /// Its slot ranges, inclusive.
    slots: Vec<(i64, i64)>,
}

/// The port of a `CLUSTER NODES` address, `ip:port@bus`.
fn port_in(addr: &str) -> Option<u16> {
    addr.split('@').next()?.rsplit(':').next()?.parse().ok()
}

impl RedisCluster {
    /// `masters` masters with `replicas` replicas each, serving every slot.
    pub async fn start(masters: usize, replicas: usize) -> RedisCluster {
        let dir = tempfile::tempdir().expect("tempdir");
        let n = masters * (1 + replicas);
        let mut cluster = RedisCluster {
            servers: Vec::new(),
            dir,
        };
        for _ in 0..n {
            let port = crate::process::free_addr().port();
            let bus_port = crate::process::free_addr().port();
            cluster.servers.push(Server {
                port,
                bus_port,
                child: None,
            });
        }
        for i in 0..n {
            cluster.spawn(i);
        }
        for i in 0..n {
            cluster.wait_started(i).await;
        }
        let addrs: Vec<String> = cluster
            .servers
            .iter()
            .map(|s| format!("127.0.0.1:{}", s.port))
            .collect();
        let status = tokio::process::Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(&addrs)
            .args(["--cluster-replicas", &replicas.to_string(), "--cluster-yes"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .await
            .expect("run redis-cli --cluster create");
        assert!(status.success(), "redis-cli --cluster create failed");
        cluster.wait_ok(n).await;
        cluster.wait_replicas_synced().await;
        cluster
    }

    /// Waits until server `i` answers as itself (`INFO server` gives its
    /// PID). One that exits first lost a port to another process meanwhile
    /// (`free_addr` picks ports no outgoing connection takes, but any process
    /// may bind one): it starts again on fresh ports.
    async fn wait_started(&mut self, i: usize) {
        for _ in 0..crate::redis::STARTS {
            let server = &mut self.servers[i];
            if crate::redis::answers_as_itself(server.port, &mut server.child).await {
                return;
            }
            server.port = crate::process::free_addr().port();
            server.bus_port = crate::process::free_addr().port();
            self.spawn(i);
        }
        panic!(
            "redis-server exited {} times before answering: ports taken?",
            crate::redis::STARTS
        );
    }

    fn spawn(&mut self, i: usize) {
        let (port, bus_port) = (self.servers[i].port, self.servers[i].bus_port);
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--cluster-port", &bus_port.to_string()])
            .args(["--cluster-enabled", "yes", "--cluster-node-timeout", "1000"])
            // Replicas sync at once (not after the default 5 s that batches
            // them): a replica with no data is not allowed to take over.
            .args(["--repl-diskless-sync-delay", "0"])
            .arg("--cluster-config-file")
            .arg(self.dir.path().join(format!("nodes-{port}.conf")))
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(self.dir.path())
            .arg("--logfile")
            .arg(self.dir.path().join(format!("{port}.log")))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn redis-server");
        self.servers[i].child = Some(child);
    }

    /// Waits until every live node sees every slot served and `n` nodes.
    async fn wait_ok(&self, n: usize) {
        let ports: Vec<u16> = self
            .servers
            .iter()
            .filter(|s| s.child.is_some())
            .map(|s| s.port)
            .collect();
        crate::eventually_within("the redis cluster is ok", Duration::from_secs(60), || {
            let ports = ports.clone();
            async move {
                for port in ports {
                    let info = text(port, redis::cmd("CLUSTER").arg("INFO")).await?;
                    let ok = info.contains("cluster_state:ok")
                        && info.contains("cluster_slots_ok:16384")
                        && info.contains(&format!("cluster_known_nodes:{n}"));
                    if !ok {
                        return None;
                    }
                }
                Some(())
            }
        })
        .await;
    }

    /// Waits until every replica's link to its master is up (it has the
    /// data, and may take over).
    async fn wait_replicas_synced(&self) {
        let ports: Vec<u16> = self.servers.iter().map(|s| s.port).collect();
        crate::eventually_within("replicas synced", Duration::from_secs(60), || {
            let ports = ports.clone();
            async move {
                for port in ports {
                    let info = text(port, redis::cmd("INFO").arg("replication")).await?;
                    if info.contains("role:slave") && !info.contains("master_link_status:up") {
                        return None;
                    }
                }
                Some(())
            }
        })
        .await;
    }

    /// The URLs of every node, as `--redis-cluster` takes them.
    pub fn seeds(&self) -> Vec<String> {
        self.servers
            .iter()
            .map(|s| format!("redis://127.0.0.1:{}/", s.port))
            .collect()
    }

    /// `redis_cluster` seeds, comma-separated.
    pub fn seeds_arg(&self) -> String {
        self.seeds().join(",")
    }

    /// The slot of `key`.
    async fn slot_of(&self, key: &str) -> i64 {
        let cmd = redis::cmd("CLUSTER").arg("KEYSLOT").arg(key).clone();
        match query(self.live_port(), &cmd).await {
            Some(redis::Value::Int(slot)) => slot,
            other => panic!("CLUSTER KEYSLOT: {other:?}"),
        }
    }

    /// The masters a live node knows and does not take for failed.
    async fn masters(&self) -> Vec<Master> {
        let nodes = text(self.live_port(), redis::cmd("CLUSTER").arg("NODES"))
            .await
            .expect("CLUSTER NODES");
        nodes
            .lines()
            .filter_map(|line| {
                let fields: Vec<&str> = line.split(' ').collect();
                if fields.len() < 3 || !fields[2].contains("master") || fields[2].contains("fail") {
                    return None;
                }
                let slots = fields
                    .get(8..)
                    .unwrap_or_default()
                    .iter()
                    .filter_map(|range| {
                        let (lo, hi) = range.split_once('-').unwrap_or((range, range));
                        Some((lo.parse().ok()?, hi.parse().ok()?))
                    })
                    .collect();
                Some(Master {
                    id: fields[0].to_owned(),
                    port: port_in(fields[1]).unwrap_or(0),
                    slots,
                })
            })
            .collect()
    }

    /// How many keys matching `pattern` each master holds (`KEYS`: a
    /// test's data set is small).
    pub async fn keys_per_master(&self, pattern: &str) -> Vec<usize> {
        let mut counts = Vec::new();
        for master in self.masters().await {
            let found = query(master.port, redis::cmd("KEYS").arg(pattern)).await;
            counts.push(match found {
                Some(redis::Value::Array(keys)) => keys.len(),
                other => panic!("KEYS {pattern} on {}: {other:?}", master.port),
            });
        }
        counts
    }

    /// The port of the master serving `key`'s slot now.
    pub async fn master_of(&self, key: &str) -> u16 {
        let slot = self.slot_of(key).await;
        self.masters()
            .await
            .into_iter()
            .find(|m| m.slots.iter().any(|&(lo, hi)| (lo..=hi).contains(&slot)))
            .map(|m| m.port)
            .unwrap_or_else(|| panic!("no master serves slot {slot}"))
    }

    fn live_port(&self) -> u16 {
        self.servers
            .iter()
            .find(|s| s.child.is_some())
            .map(|s| s.port)
            .expect("a live node")
    }

    /// Promotes a replica of the master on `port` with `CLUSTER FAILOVER`
    /// (coordinated, no data lost) and waits until it serves.
    pub async fn failover(&self, port: u16) -> u16 {
        let id = text(port, redis::cmd("CLUSTER").arg("MYID"))
            .await
            .expect("MYID");
        let replicas = match query(port, redis::cmd("CLUSTER").arg("REPLICAS").arg(&id)).await {
            Some(redis::Value::Array(lines)) => lines,
            other => panic!("CLUSTER REPLICAS: {other:?}"),
        };
        let line = match replicas.first() {
            Some(redis::Value::BulkString(b)) => String::from_utf8_lossy(b).into_owned(),
            Some(redis::Value::VerbatimString { text, .. }) => text.clone(),
            other => panic!("no replica of {port}: {other:?}"),
        };
        let replica = port_in(line.split(' ').nth(1).expect("addr")).expect("replica port");
        let ok = text(replica, redis::cmd("CLUSTER").arg("FAILOVER")).await;
        assert_eq!(ok.as_deref(), Some("OK"), "CLUSTER FAILOVER on {replica}");
        crate::eventually_within(
            "the replica took over",
            Duration::from_secs(30),
            || async move {
                let role = query(replica, &redis::cmd("ROLE")).await?;
                match role {
                    redis::Value::Array(items) => match items.first() {
                        Some(redis::Value::BulkString(b)) if b.as_slice() == b"master" => Some(()),
                        _ => None,
                    },
                    _ => None,
                }
            },
        )
        .await;
        replica
    }

    /// Moves `key`'s slot from its master to another master, as `redis-cli
    /// --cluster reshard` would: importing and migrating states, the slot's
    /// keys moved with `MIGRATE` (a node's watchdog keeps a short-lived key
    /// in its channel's slot), then the owner changed on both ends.
    pub async fn migrate_slot_of(&self, key: &str) -> (u16, u16) {
        let from = self.master_of(key).await;
        let slot = self.slot_of(key).await;
        let masters: Vec<(String, u16)> = self
            .masters()
            .await
            .into_iter()
            .map(|m| (m.id, m.port))
            .collect();
        let from_id = masters
            .iter()
            .find(|(_, p)| *p == from)
            .expect("from")
            .0
            .clone();
        let (to_id, to) = masters
            .iter()
            .find(|(_, p)| *p != from)
            .expect("another master")
            .clone();
        let setslot = |state: &str, id: &str| {
            let mut cmd = redis::cmd("CLUSTER");
            cmd.arg("SETSLOT").arg(slot).arg(state).arg(id);
            cmd
        };
        assert!(query(to, &setslot("IMPORTING", &from_id)).await.is_some());
        assert!(query(from, &setslot("MIGRATING", &to_id)).await.is_some());
        // The two ends must take it; the other masters learn it by gossip
        // too, so a view still settling there is no failure.
        let move_keys = || async move {
            loop {
                let found = query(
                    from,
                    redis::cmd("CLUSTER")
                        .arg("GETKEYSINSLOT")
                        .arg(slot)
                        .arg(100),
                )
                .await;
                let keys: Vec<Vec<u8>> = match found {
                    Some(redis::Value::Array(keys)) => keys
                        .into_iter()
                        .filter_map(|k| match k {
                            redis::Value::BulkString(k) => Some(k),
                            _ => None,
                        })
                        .collect(),
                    _ => Vec::new(),
                };
                if keys.is_empty() {
                    return;
                }
                let mut migrate = redis::cmd("MIGRATE");
                migrate
                    .arg("127.0.0.1")
                    .arg(to)
                    .arg("")
                    .arg(0)
                    .arg(5000)
                    .arg("REPLACE")
                    .arg("KEYS")
                    .arg(keys);
                let _ = query(from, &migrate).await;
            }
        };
        move_keys().await;
        assert!(query(to, &setslot("NODE", &to_id)).await.is_some());
        // The source refuses while it holds keys of the slot: a key written
        // there meanwhile is moved too, and the source asked again.
        crate::eventually("the source gave the slot up", || async {
            move_keys().await;
            query(from, &setslot("NODE", &to_id)).await.map(drop)
        })
        .await;
        for (_, port) in masters.iter().filter(|(_, p)| *p != to && *p != from) {
            let _ = query(*port, &setslot("NODE", &to_id)).await;
        }
        (from, to)
    }

    /// The log of the node on `port`, for a failing test's message.
    pub fn log_of(&self, port: u16) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("{port}.log"))).unwrap_or_default()
    }

    /// Kills the master on `port` (SIGKILL, by PID): its replica takes over
    /// after the node timeout.
    pub fn kill(&mut self, port: u16) {
        if let Some(server) = self.servers.iter_mut().find(|s| s.port == port)
            && let Some(mut child) = server.child.take()
        {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for server in &mut self.servers {
            if let Some(mut child) = server.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}
