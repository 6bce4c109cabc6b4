//! A real `redis-server` on a free loopback port, nothing kept on disk, killed
//! (by its PID) on drop. Modelled on redis-rs's `redis-test` server fixture.
//! `REDIS_SERVER_BIN` overrides the binary.

use std::process::{Child, Command, Stdio};

use tempfile::TempDir;

pub struct RedisServer {
    pub port: u16,
    dir: TempDir,
    child: Option<Child>,
}

/// How many times a server is started on fresh ports before a test gives up.
pub(crate) const STARTS: usize = 5;

/// Waits until the `redis-server` in `child` answers on `port` as itself
/// (`INFO server` gives its PID, so another process's server on a reused
/// port does not count): true; false when it exited first (reaped, `child`
/// emptied), most likely because its port was taken meanwhile.
pub(crate) async fn answers_as_itself(port: u16, child: &mut Option<Child>) -> bool {
    let Some(pid) = child.as_ref().map(Child::id) else {
        return false;
    };
    let deadline = tokio::time::Instant::now() + crate::DEADLINE;
    loop {
        let info: Option<String> = async {
            let client = redis::Client::open(format!("redis://127.0.0.1:{port}/")).ok()?;
            let mut conn = client.get_multiplexed_async_connection().await.ok()?;
            redis::cmd("INFO")
                .arg("server")
                .query_async(&mut conn)
                .await
                .ok()
        }
        .await;
        let ours = format!("process_id:{pid}");
        if info.is_some_and(|info| info.lines().any(|line| line.trim() == ours)) {
            return true;
        }
        let exited = child
            .as_mut()
            .is_none_or(|c| !matches!(c.try_wait(), Ok(None)));
        if exited {
            *child = None;
            return false;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for redis-server on port {port} to answer"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

impl RedisServer {
    /// Starts a server and waits until it answers as itself. One that exits
    /// first lost its port to another process meanwhile (`free_addr` picks
    /// ports no outgoing connection takes, but any process may bind one): it
    /// starts again on a fresh port.
    pub async fn start() -> RedisServer {
        let mut server = RedisServer {
            port: crate::process::free_addr().port(),
            dir: tempfile::tempdir().expect("tempdir"),
            child: None,
        };
        for _ in 0..STARTS {
            if server.spawn().await {
                return server;
            }
            server.port = crate::process::free_addr().port();
        }
        panic!("redis-server exited {STARTS} times before answering: ports taken?");
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// Starts the server on `self.port`; false when it exited before
    /// answering as itself.
    async fn spawn(&mut self) -> bool {
        let bin = std::env::var("REDIS_SERVER_BIN").unwrap_or_else(|_| "redis-server".into());
        let child = Command::new(bin)
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(self.dir.path())
            .arg("--logfile")
            .arg(self.dir.path().join("redis.log"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn redis-server (install it: apt-get install redis-server)");
        self.child = Some(child);
        answers_as_itself(self.port, &mut self.child).await
    }

    /// Kills the server (SIGKILL, by PID) and waits for it to be gone.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Kills the server and starts a new, empty one on the same port.
    pub async fn restart(&mut self) {
        self.kill();
        assert!(
            self.spawn().await,
            "redis-server could not start again on port {}",
            self.port
        );
    }

    /// A multiplexed connection for the test's own commands.
    pub async fn connection(&self) -> redis::aio::MultiplexedConnection {
        redis::Client::open(self.url())
            .expect("url")
            .get_multiplexed_async_connection()
            .await
            .expect("connect to test redis")
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_server_whose_port_is_taken_reports_it_and_the_harness_needs_no_luck() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let mut server = RedisServer {
            port: taken.local_addr().expect("addr").port(),
            dir: tempfile::tempdir().expect("tempdir"),
            child: None,
        };
        assert!(
            !server.spawn().await,
            "redis-server cannot bind a taken port"
        );
        assert!(server.child.is_none(), "the exited server was reaped");

        let started = RedisServer::start().await;
        let mut conn = started.connection().await;
        let pong: String = redis::cmd("PING")
            .query_async(&mut conn)
            .await
            .expect("ping");
        assert_eq!(pong, "PONG");
    }
}
