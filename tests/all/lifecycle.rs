//! Events and shutdown: the SSE stream, graceful shutdown in process and of
//! the real binary on SIGTERM, configuration errors at start-up, and the
//! binary's process settings (transparent huge pages).

use std::time::Duration;

use imhost_client::api::PresenceEvent;
use imhost_tests::host::{API_KEY, TestHost};
use imhost_tests::process::{ImhostProcess, free_addr};
use imhost_tests::terminal::{Terminal, code};

fn event(data: &str) -> PresenceEvent {
    serde_json::from_str(data).expect("event data")
}

#[tokio::test]
async fn events_stream_online_and_offline() {
    let host = TestHost::default().await;
    let mut events = host.events().await;
    let url = host.connect_url(7, Some("device=web")).await.url;
    let terminal = Terminal::connect(&url).await.expect("connect");

    let online = events.expect().await;
    assert_eq!(online.event, "online");
    assert_eq!(
        event(&online.data),
        PresenceEvent {
            client_id: 7,
            metadata: Some("device=web".into()),
            server: host.addr.to_string(),
        }
    );
    drop(terminal);
    let offline = events.expect().await;
    assert_eq!(offline.event, "offline");
    assert_eq!(event(&offline.data).client_id, 7);
}

#[tokio::test]
async fn graceful_shutdown_closes_with_1001_and_publishes_offline() {
    let host = TestHost::default().await;
    let mut events = host.events().await;
    let mut a = host.terminal(1).await;
    let mut b = host.terminal(2).await;
    for _ in 0..2 {
        assert_eq!(events.expect().await.event, "online");
    }
    let stopping = tokio::spawn(host.stop());
    for t in [&mut a, &mut b] {
        let (frame, _) = t.closed().await;
        assert_eq!(code(&frame), Some(1001));
    }
    let mut offline = Vec::new();
    for _ in 0..2 {
        let e = events.expect().await;
        assert_eq!(e.event, "offline");
        offline.push(event(&e.data).client_id);
    }
    offline.sort_unstable();
    assert_eq!(offline, vec![1, 2]);
    assert_eq!(
        events.next().await,
        None,
        "the stream ends after the sockets"
    );
    stopping.await.expect("join").expect("run returned Ok");
}

#[tokio::test]
async fn the_binary_exits_0_on_sigterm_after_closing_sockets() {
    let addr = free_addr();
    let listen = addr.to_string();
    let process = ImhostProcess::spawn(addr, &["--listen", &listen, "--api-key", API_KEY], &[]);
    let http = reqwest::Client::new();
    imhost_tests::eventually("imhost serves", || async {
        let r = http
            .get(format!("http://{addr}/healthz"))
            .send()
            .await
            .ok()?;
        r.status().is_success().then_some(())
    })
    .await;
    let answer: serde_json::Value = http
        .post(format!("http://{addr}/api/v1/connect-url"))
        .bearer_auth(API_KEY)
        .json(&serde_json::json!({"client_id": 1}))
        .send()
        .await
        .expect("connect-url")
        .json()
        .await
        .expect("json");
    let mut terminal = Terminal::connect(answer["url"].as_str().expect("url"))
        .await
        .expect("connect");

    process.signal("TERM");
    let (frame, _) = terminal.closed().await;
    assert_eq!(code(&frame), Some(1001));
    let (status, output) = process.wait(Duration::from_secs(15)).await;
    assert!(status.success(), "exit status {status}: {output}");
    assert!(output.contains("embedded mode"), "start-up line: {output}");
    assert!(output.contains("stopped"), "{output}");
}

#[tokio::test]
async fn a_bad_setting_stops_start_up_naming_the_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("imhost.toml");
    std::fs::write(
        &file,
        "heartbeat_interval = \"30s\"\nheartbeat_timeout = \"10s\"\n",
    )
    .expect("write config");
    let addr = free_addr();
    let process = ImhostProcess::spawn(
        addr,
        &[
            "--config",
            file.to_str().expect("path"),
            "--listen",
            &addr.to_string(),
        ],
        &[],
    );
    let (status, output) = process.wait(Duration::from_secs(15)).await;
    assert!(!status.success());
    assert!(output.contains("heartbeat_timeout"), "{output}");

    // A variable beats the file: the same file with the timeout fixed by env
    // gets past validation, and a bad variable value is named too.
    let process = ImhostProcess::spawn(
        addr,
        &[
            "--config",
            file.to_str().expect("path"),
            "--listen",
            &addr.to_string(),
        ],
        &[("IMHOST_MAX_FRAME_BYTES", "lots")],
    );
    let (status, output) = process.wait(Duration::from_secs(15)).await;
    assert!(!status.success());
    assert!(
        output.contains("max-frame-bytes") || output.contains("MAX_FRAME_BYTES"),
        "{output}"
    );

    // Unknown keys in the file are refused by name.
    std::fs::write(&file, "listen = \"127.0.0.1:1\"\nmax_frame_bytez = 5\n").expect("write");
    let process = ImhostProcess::spawn(addr, &["--config", file.to_str().expect("path")], &[]);
    let (status, output) = process.wait(Duration::from_secs(15)).await;
    assert!(!status.success());
    assert!(output.contains("max_frame_bytez"), "{output}");
}

#[tokio::test]
async fn logs_go_to_standard_error_as_json_when_asked() {
    use tokio::io::AsyncBufReadExt;

    let addr = free_addr();
    let mut child = tokio::process::Command::new(imhost_tests::process::imhost_bin())
        .args(["--listen", &addr.to_string(), "--log-format", "json"])
        .env_remove("RUST_LOG")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start imhost");
    let stderr = child.stderr.take().expect("stderr");
    let mut lines = tokio::io::BufReader::new(stderr).lines();
    let start_up = tokio::time::timeout(imhost_tests::DEADLINE, async {
        while let Some(line) = lines.next_line().await.expect("read stderr") {
            let event: serde_json::Value = serde_json::from_str(&line)
                .unwrap_or_else(|e| panic!("not a JSON log line ({e}): {line}"));
            if event["message"]
                .as_str()
                .is_some_and(|m| m.contains("imhost serving"))
            {
                return event;
            }
        }
        panic!("imhost exited before its start-up line");
    })
    .await
    .expect("start-up line in time");
    assert_eq!(start_up["level"], "INFO");
    child.start_kill().expect("stop imhost");
    let output = child.wait_with_output().await.expect("wait");
    assert!(output.stdout.is_empty(), "nothing on standard output");
}

#[tokio::test]
async fn config_check_validates_a_file_offline() {
    let dir = tempfile::tempdir().expect("tempdir");
    let good = dir.path().join("good.toml");
    std::fs::write(&good, "heartbeat_interval = \"15s\"\noutbound_queue = 64\n").expect("write");
    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        "heartbeat_interval = \"30s\"\nheartbeat_timeout = \"10s\"\n",
    )
    .expect("write");
    let unknown = dir.path().join("unknown.toml");
    std::fs::write(&unknown, "heartbeat_intervl = \"30s\"\n").expect("write");
    let check = |file: &std::path::Path| {
        std::process::Command::new(imhost_tests::process::imhost_bin())
            .args(["config", "check"])
            .arg(file)
            .output()
            .expect("run imhost config check")
    };
    let ok = check(&good);
    assert!(ok.status.success());
    assert!(String::from_utf8_lossy(&ok.stdout).ends_with("good.toml: valid\n"));
    for (file, key) in [(&bad, "heartbeat_timeout"), (&unknown, "heartbeat_intervl")] {
        let refused = check(file);
        assert_eq!(refused.status.code(), Some(1));
        let said = String::from_utf8_lossy(&refused.stderr);
        assert!(said.contains(key), "{said}");
    }
}

/// `docs/configuration.md` lists exactly the settings `imhost --help` shows,
/// each with the same flag, variable and default.
#[test]
fn the_configuration_doc_matches_the_help() {
    let help = std::process::Command::new(imhost_tests::process::imhost_bin())
        .arg("--help")
        .output()
        .expect("imhost --help");
    let help = String::from_utf8_lossy(&help.stdout).into_owned();
    // One entry per option: its lines joined.
    let mut options: Vec<String> = Vec::new();
    for line in help.lines() {
        let trimmed = line.trim_start();
        if trimmed.starts_with("--") {
            options.push(trimmed.to_owned());
        } else if line.starts_with("          ")
            && let Some(last) = options.last_mut()
        {
            last.push(' ');
            last.push_str(trimmed);
        }
    }
    let between = |text: &str, open: &str, close: char| -> Option<String> {
        let start = text.find(open)? + open.len();
        let len = text[start..].find(close)?;
        Some(text[start..start + len].to_owned())
    };
    let doc = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/configuration.md"),
    )
    .expect("docs/configuration.md");
    let rows: Vec<Vec<String>> = doc
        .lines()
        .filter(|l| l.starts_with("| `"))
        .map(|l| {
            l.split(" | ")
                .map(|c| c.trim_matches(['|', ' ']).to_owned())
                .collect()
        })
        .collect();
    let mut documented = 0;
    for option in &options {
        let flag = option.split_whitespace().next().expect("flag");
        if ["--config", "--log-format", "--help", "--version"].contains(&flag) {
            continue;
        }
        let default =
            between(option, "[default: ", ']').unwrap_or_else(|| panic!("{flag} shows no default"));
        let env =
            between(option, "[env: ", '=').unwrap_or_else(|| panic!("{flag} has no variable"));
        let key = flag.trim_start_matches("--").replace('-', "_");
        let row = rows
            .iter()
            .find(|r| r[0] == format!("`{key}`"))
            .unwrap_or_else(|| panic!("docs/configuration.md has no row for `{key}`"));
        assert_eq!(row[1], format!("`{flag}`"), "{key}: flag");
        assert_eq!(row[2], format!("`{env}`"), "{key}: variable");
        assert_eq!(row[3], default, "{key}: default");
        documented += 1;
    }
    assert_eq!(
        documented,
        rows.len(),
        "docs/configuration.md has rows --help does not show"
    );
}

#[tokio::test]
async fn a_node_named_by_a_wildcard_address_is_warned_about() {
    // With `--listen 0.0.0.0:P` and no `--server`, the node's name is
    // `0.0.0.0:P`; named so explicitly here, so the test listens on
    // loopback only.
    let addr = free_addr();
    let wildcard = format!("0.0.0.0:{}", addr.port());
    let process = ImhostProcess::spawn(
        addr,
        &["--listen", &addr.to_string(), "--server", &wildcard],
        &[],
    );
    imhost_tests::api::Api::new(addr).wait_serving().await;
    process.signal("TERM");
    let (_, output) = process.wait(Duration::from_secs(15)).await;
    assert!(
        output.contains("connect URLs will name 0.0.0.0"),
        "{output}"
    );
}

/// The `imhost` binary runs without transparent huge pages unless the
/// operator keeps them with `MIMALLOC_ALLOW_THP` (docs/plugins.md, "Huge
/// pages"): what the kernel says of each process. (The test's own
/// environment must not set `MIMALLOC_ALLOW_THP`: the processes inherit it.)
#[tokio::test]
async fn the_binary_turns_transparent_huge_pages_off_unless_told_to_keep_them() {
    async fn thp_enabled(envs: &[(&str, &str)]) -> Option<String> {
        let addr = free_addr();
        let listen = addr.to_string();
        let process = ImhostProcess::spawn(addr, &["--listen", &listen], envs);
        imhost_tests::api::Api::new(addr).wait_serving().await;
        let status = std::fs::read_to_string(format!("/proc/{}/status", process.pid()))
            .expect("the process's status");
        process.signal("TERM");
        let _ = process.wait(Duration::from_secs(15)).await;
        status
            .lines()
            .find_map(|line| line.strip_prefix("THP_enabled:"))
            .map(|value| value.trim().to_owned())
    }
    let Some(default) = thp_enabled(&[]).await else {
        // A kernel built without transparent huge pages has nothing to turn off.
        eprintln!("no THP_enabled in /proc/PID/status: nothing to check");
        return;
    };
    assert_eq!(default, "0", "huge pages are off by default");
    let kept = thp_enabled(&[("MIMALLOC_ALLOW_THP", "1")]).await;
    assert_eq!(
        kept.as_deref(),
        Some("1"),
        "MIMALLOC_ALLOW_THP=1 keeps them"
    );
}
