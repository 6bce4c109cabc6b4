//! The real `imhost` binary as a child process, ended by its PID on drop.
//!
//! The binary is the one cargo built next to this test executable
//! (`target/<profile>/imhost`); `scripts/test` builds it first. `IMHOST_BIN`
//! overrides the path.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use tokio::process::{Child, Command};

/// Path of the `imhost` binary under test.
pub fn imhost_bin() -> PathBuf {
    if let Some(path) = std::env::var_os("IMHOST_BIN") {
        return PathBuf::from(path);
    }
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/all-<hash> → target/<profile>/imhost
    let dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target dir");
    let bin = dir.join("imhost");
    assert!(
        bin.exists(),
        "{} not built: run `cargo build -p imhost` first (scripts/test does)",
        bin.display()
    );
    bin
}

/// A free loopback port for a child process to bind.
///
/// Binding port 0 and releasing it races: that port comes from the
/// ephemeral range, which every outgoing connection of every test draws from
/// too, so one can take it before the child binds it (a Redis harness saw
/// it). Ports below the range (`net.ipv4.ip_local_port_range`) are never
/// given to outgoing connections. So this walks them from a point that
/// differs per process, never hands out the same port twice in a process,
/// and returns the first that binds now. Where the range leaves too little
/// below it, it falls back to port 0.
pub fn free_addr() -> SocketAddr {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    const LOWEST: u32 = 10_000;
    let below = ephemeral_start().saturating_sub(LOWEST);
    if below >= 1_000 {
        let start = std::process::id().wrapping_mul(7_919) % below;
        for _ in 0..below {
            let step = NEXT.fetch_add(1, Ordering::Relaxed);
            let Ok(port) = u16::try_from(LOWEST + (start + step) % below) else {
                continue;
            };
            if let Ok(listener) = std::net::TcpListener::bind(("127.0.0.1", port)) {
                return listener.local_addr().expect("addr");
            }
        }
    }
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("addr")
}

/// The first port of the kernel's ephemeral range (Linux's default when it
/// cannot be read).
fn ephemeral_start() -> u32 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse().ok())
        .unwrap_or(32_768)
}

/// A running `imhost` process.
pub struct ImhostProcess {
    pub addr: SocketAddr,
    child: Option<Child>,
}

impl ImhostProcess {
    /// Starts `imhost` with `args`; does not wait for it to serve.
    pub fn spawn(addr: SocketAddr, args: &[&str], envs: &[(&str, &str)]) -> ImhostProcess {
        let mut command = Command::new(imhost_bin());
        command.args(args);
        for (k, v) in envs {
            command.env(k, v);
        }
        Self::start(addr, command)
    }

    /// Starts `imhost` on a free loopback port with the test API key, serving
    /// the plugins of `plugins` (plus `extra` arguments), and waits until it
    /// answers; returns it and an API client for it.
    pub async fn serving_plugins(
        plugins: &std::path::Path,
        extra: &[&str],
    ) -> (ImhostProcess, crate::api::Api) {
        let addr = free_addr();
        let (listen, plugins) = (addr.to_string(), plugins.display().to_string());
        let mut args = vec![
            "--listen",
            &listen,
            "--api-key",
            crate::api::API_KEY,
            "--plugins",
            &plugins,
        ];
        args.extend_from_slice(extra);
        let process = Self::spawn(addr, &args, &[]);
        let api = crate::api::Api::new(addr);
        api.wait_serving().await;
        (process, api)
    }

    /// Like [`ImhostProcess::spawn`], with the open-file limit (soft and
    /// hard) lowered to `nofile` for the child only.
    pub fn spawn_with_nofile(addr: SocketAddr, args: &[&str], nofile: u64) -> ImhostProcess {
        let mut command = Command::new("sh");
        command
            .arg("-c")
            .arg(format!("ulimit -n {nofile} && exec \"$0\" \"$@\""))
            .arg(imhost_bin())
            .args(args);
        Self::start(addr, command)
    }

    /// Runs `command` with the settings every test process gets: the shared
    /// plugin cache, no inherited log filter, output captured, killed on drop.
    fn start(addr: SocketAddr, mut command: Command) -> ImhostProcess {
        command
            .env_remove("RUST_LOG")
            .env("IMHOST_PLUGIN_CACHE", crate::plugin_cache())
            .env("IMHOST_PLUGIN_CACHE_KEEP", "256")
            .env("IMHOST_PLUGIN_GRANTS", crate::test_grants())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let child = command.spawn().expect("spawn imhost");
        ImhostProcess {
            addr,
            child: Some(child),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().and_then(Child::id).expect("running")
    }

    /// Sends `signal` (e.g. "TERM", "KILL") to the process by its PID.
    pub fn signal(&self, signal: &str) {
        let status = std::process::Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.pid().to_string())
            .status()
            .expect("kill");
        assert!(status.success(), "kill -{signal} failed");
    }

    /// Waits for the process to exit; returns its status and everything it wrote.
    pub async fn wait(mut self, within: Duration) -> (std::process::ExitStatus, String) {
        let child = self.child.take().expect("running");
        let output = tokio::time::timeout(within, child.wait_with_output())
            .await
            .expect("imhost exited in time")
            .expect("wait");
        let mut text = String::from_utf8_lossy(&output.stdout).into_owned();
        text.push_str(&String::from_utf8_lossy(&output.stderr));
        (output.status, text)
    }
}

/// Runs `npm test` in `dir` (relative to the repository root) with the binary
/// under test as `IMHOST_BIN` and `envs`, failing with everything it printed.
pub fn npm_test(dir: &str, envs: &[(&str, &str)]) {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(dir);
    let output = std::process::Command::new("npm")
        .args(["test", "--silent"])
        .current_dir(&dir)
        .env("IMHOST_BIN", imhost_bin())
        .envs(envs.iter().copied())
        .output()
        .expect("npm not found: scripts/test installs Node.js 20+");
    assert!(
        output.status.success(),
        "npm test in {} failed:\n{}\n{}",
        dir.display(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}
