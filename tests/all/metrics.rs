//! `GET /metrics`: the Prometheus text format, read by a real HTTP client
//! from real nodes (one with a plugin, and a cluster on a real Redis).

use imhost::config::Options;
use imhost_tests::host::{API_KEY, TestHost};
use imhost_tests::plugins::{PluginDir, guests};
use imhost_tests::redis::RedisServer;
use serde_json::json;

/// `GET /metrics`, as Prometheus does (no key); the content type and the body.
async fn scrape(http: &reqwest::Client, url: String) -> (String, String) {
    let response = http.get(url).send().await.expect("scrape");
    assert_eq!(response.status(), 200);
    let kind = response.headers()["content-type"]
        .to_str()
        .expect("content type")
        .to_owned();
    (kind, response.text().await.expect("body"))
}

/// The value of the sample line that starts with `series `.
fn sample(body: &str, series: &str) -> Option<f64> {
    body.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

#[tokio::test]
async fn counters_plugins_and_latency_histograms_are_scraped() {
    let started = std::time::Instant::now();
    let dir = PluginDir::new();
    dir.install(
        "word-filter",
        guests::WORD_FILTER,
        "[settings]\nwords = [\"darn\"]\n",
    );
    let host = TestHost::start(Options {
        plugins: Some(dir.path().to_owned()),
        ..Options::default()
    })
    .await;
    host.plugin_where("word-filter", "active", |p| p["state"] == "active")
        .await;
    let mut terminal = host.terminal(1).await;
    host.send(0, &[1], json!("darn it"), false).await;
    assert_eq!(terminal.next_text().await, r#""**** it""#);

    let url = format!("http://{}/metrics", host.addr);
    let (kind, body) = scrape(&host.http, url.clone()).await;
    assert!(kind.starts_with("text/plain; version=0.0.4"), "{kind}");
    assert!(
        body.contains("# HELP imhost_connections Sockets open now."),
        "{body}"
    );
    assert!(
        body.contains("# TYPE imhost_frames_queued_total counter"),
        "{body}"
    );
    assert_eq!(sample(&body, "imhost_connections"), Some(1.0));
    assert_eq!(sample(&body, "imhost_frames_queued_total"), Some(1.0));
    let plugin = r#"{plugin="word-filter"}"#;
    assert_eq!(
        sample(&body, &format!("imhost_plugin_calls_total{plugin}")),
        Some(1.0)
    );
    assert_eq!(
        sample(&body, &format!("imhost_plugin_errors_total{plugin}")),
        Some(0.0)
    );
    assert_eq!(
        sample(
            &body,
            r#"imhost_plugin_state{plugin="word-filter",state="active"}"#
        ),
        Some(1.0)
    );
    assert_eq!(
        sample(
            &body,
            r#"imhost_plugin_call_duration_seconds_bucket{plugin="word-filter",le="+Inf"}"#
        ),
        Some(1.0)
    );
    assert_eq!(
        sample(
            &body,
            &format!("imhost_plugin_call_duration_seconds_count{plugin}")
        ),
        Some(1.0)
    );
    // How long its first build took to serve: within this test's life.
    let served_after = sample(
        &body,
        &format!("imhost_plugin_served_after_seconds{plugin}"),
    )
    .expect("imhost_plugin_served_after_seconds");
    assert!(
        (0.0..=started.elapsed().as_secs_f64()).contains(&served_after),
        "{served_after}"
    );

    // Every series the example Grafana dashboard queries exists.
    let dashboard = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../examples/deploy/grafana-dashboard.json"),
    )
    .expect("dashboard");
    let dashboard: serde_json::Value = serde_json::from_str(&dashboard).expect("dashboard JSON");
    let panels = dashboard["panels"].as_array().expect("panels");
    for expr in panels
        .iter()
        .flat_map(|p| p["targets"].as_array().into_iter().flatten())
        .filter_map(|t| t["expr"].as_str())
    {
        for series in expr
            .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .filter(|word| word.starts_with("imhost_"))
        {
            assert!(
                body.contains(&format!("# TYPE {} ", series.trim_end_matches("_bucket"))),
                "the dashboard queries {series}, which /metrics does not serve"
            );
        }
    }
}

#[tokio::test]
async fn metrics_listen_moves_metrics_off_the_public_port() {
    let private = imhost_tests::process::free_addr();
    let host = TestHost::start(Options {
        metrics_listen: Some(private),
        ..Options::default()
    })
    .await;
    let (_, body) = scrape(&host.http, format!("http://{private}/metrics")).await;
    assert!(body.contains("imhost_connections 0"), "{body}");
    let public = host
        .http
        .get(format!("http://{}/metrics", host.addr))
        .bearer_auth(API_KEY)
        .send()
        .await
        .expect("request");
    assert_eq!(public.status(), 404, "not on the listen port any more");
    let other = host
        .http
        .get(format!("http://{private}/api/v1/stats"))
        .bearer_auth(API_KEY)
        .send()
        .await
        .expect("request");
    assert_eq!(
        other.status(),
        404,
        "the metrics port serves /metrics alone"
    );
}

#[tokio::test]
async fn a_clustered_node_reports_its_redis_link() {
    let redis = RedisServer::start().await;
    let host = TestHost::start(Options {
        redis: Some(redis.url()),
        ..Options::default()
    })
    .await;
    let url = format!("http://{}/metrics", host.addr);
    // The probe pings at start, then every few seconds.
    let body = imhost_tests::eventually("a Redis PING answered", || async {
        let (_, body) = scrape(&host.http, url.clone()).await;
        (sample(&body, "imhost_redis_up") == Some(1.0)).then_some(body)
    })
    .await;
    assert_eq!(
        sample(&body, "imhost_redis_rtt_seconds_count").map(|n| n >= 1.0),
        Some(true)
    );
}
