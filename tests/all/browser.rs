//! The demo chat and the status page in a real headless Chromium
//! (`tests/browser/chat.test.js`, playwright-core driving Debian's chromium),
//! against a real two-node cluster on a real Redis with a word filter that
//! drops "darn". Screenshots are kept in `target/browser-artifacts/`.

use imhost_tests::api::API_KEY;
use imhost_tests::cluster::Cluster;
use imhost_tests::plugins::PluginDir;
use imhost_tests::process::npm_test;
use imhost_tests::redis::RedisServer;

#[tokio::test]
async fn three_pages_chat_across_two_nodes_and_the_status_page_shows_them() {
    let dir = PluginDir::dropping(&["darn"]);
    let plugins = dir.arg();
    let redis = RedisServer::start().await;
    let cluster = Cluster::start_with(&redis, 2, &["--demo", "--plugins", &plugins]).await;
    let nodes = format!(
        "http://{},http://{}",
        cluster.servers[0], cluster.servers[1]
    );
    let artifacts = concat!(env!("CARGO_MANIFEST_DIR"), "/../target/browser-artifacts");
    // The browser test blocks on its own process; the nodes run in theirs.
    tokio::task::spawn_blocking(move || {
        npm_test(
            "tests/browser",
            &[
                ("IMHOST_NODES", &nodes),
                ("IMHOST_API_KEY", API_KEY),
                ("ARTIFACTS", artifacts),
            ],
        );
    })
    .await
    .expect("browser test");
}
