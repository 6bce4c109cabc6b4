//! One command connection over standalone Redis or Redis Cluster, so every
//! command, pipeline and script is written once.
//!
//! Standalone: redis-rs's `ConnectionManager` (multiplexed, reconnecting).
//! Cluster: its async cluster connection, which routes each command to the
//! master of its key's slot and follows `MOVED`/`ASK`. What it does not do
//! is notice that a master it cannot reach was replaced: a killed master's
//! slots stay mapped to the dead address. So a connection error makes the
//! cluster connection be built again from the seeds (at most once a
//! second, in the background), and the next command finds the new master.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use redis::aio::{ConnectionLike, ConnectionManager};
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, Pipeline, RedisFuture, Value};

/// Rebuilds of a cluster connection at most this often.
const REBUILD_EVERY: Duration = Duration::from_secs(1);

/// A command connection (cheap to clone; clones share a rebuilt cluster
/// connection).
#[derive(Clone)]
pub enum RedisConn {
    Standalone(ConnectionManager),
    Cluster(Arc<ClusterHandle>),
}

/// The current cluster connection and how to make a new one.
pub struct ClusterHandle {
    seeds: Vec<String>,
    current: Mutex<ClusterConnection>,
    last_rebuild: Mutex<Option<Instant>>,
}

impl ClusterHandle {
    pub fn new(seeds: Vec<String>, conn: ClusterConnection) -> ClusterHandle {
        ClusterHandle {
            seeds,
            current: Mutex::new(conn),
            last_rebuild: Mutex::new(None),
        }
    }

    fn get(&self) -> ClusterConnection {
        self.current
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// After a connection error: a new connection from the seeds, unless one
    /// was made within [`REBUILD_EVERY`].
    fn rebuild_soon(self: &Arc<Self>) {
        {
            let mut last = self.last_rebuild.lock().unwrap_or_else(|p| p.into_inner());
            if last.is_some_and(|at| at.elapsed() < REBUILD_EVERY) {
                return;
            }
            *last = Some(Instant::now());
        }
        let handle = self.clone();
        tokio::spawn(async move {
            let fresh = match crate::helper::cluster_client(&handle.seeds, None) {
                Ok(client) => client.get_async_connection().await,
                Err(_) => return,
            };
            if let Ok(conn) = fresh {
                *handle.current.lock().unwrap_or_else(|p| p.into_inner()) = conn;
            }
        });
    }
}

/// Errors after which a cluster's map of its masters may be stale.
fn unreachable(err: &redis::RedisError) -> bool {
    err.is_io_error()
        || err.is_connection_refusal()
        || err.is_connection_dropped()
        || err.is_timeout()
        || matches!(
            err.kind(),
            redis::ErrorKind::Server(redis::ServerErrorKind::ClusterDown)
                | redis::ErrorKind::Server(redis::ServerErrorKind::TryAgain)
                | redis::ErrorKind::Server(redis::ServerErrorKind::MasterDown)
        )
}

impl RedisConn {
    pub fn is_cluster(&self) -> bool {
        matches!(self, RedisConn::Cluster(_))
    }
}

impl ConnectionLike for RedisConn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            RedisConn::Standalone(conn) => conn.req_packed_command(cmd),
            RedisConn::Cluster(handle) => {
                let handle = handle.clone();
                Box::pin(async move {
                    let mut conn = handle.get();
                    let result = conn.req_packed_command(cmd).await;
                    if let Err(err) = &result
                        && unreachable(err)
                    {
                        handle.rebuild_soon();
                    }
                    result
                })
            }
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            RedisConn::Standalone(conn) => conn.req_packed_commands(pipeline, offset, count),
            RedisConn::Cluster(handle) => {
                let handle = handle.clone();
                Box::pin(async move {
                    let mut conn = handle.get();
                    let result = conn.req_packed_commands(pipeline, offset, count).await;
                    if let Err(err) = &result
                        && unreachable(err)
                    {
                        handle.rebuild_soon();
                    }
                    result
                })
            }
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            RedisConn::Standalone(conn) => conn.get_db(),
            RedisConn::Cluster(handle) => handle.get().get_db(),
        }
    }
}
