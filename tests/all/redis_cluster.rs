//! Nodes on a real Redis Cluster (3 masters, 3 replicas, started by the
//! test on loopback): the cluster tests' own bodies on the second backend,
//! and the refusals of a standalone URL that names a cluster node and of a
//! cluster flag that names a standalone Redis.

use std::time::Duration;

use imhost_tests::cluster::Cluster;
use imhost_tests::process::{ImhostProcess, free_addr};
use imhost_tests::redis::RedisServer;
use imhost_tests::redis_cluster::RedisCluster;

#[tokio::test]
async fn messages_receipts_channels_and_broadcast_cross_nodes_on_a_redis_cluster() {
    let redis = RedisCluster::start(3, 1).await;
    super::cluster::cross_node_delivery(Cluster::start_on_cluster(&redis, 3, &[]).await).await;
}

#[tokio::test]
async fn a_killed_node_is_reaped_on_a_redis_cluster_as_on_one_redis() {
    let redis = RedisCluster::start(3, 1).await;
    super::cluster::killed_node_cleanup(Cluster::start_on_cluster(&redis, 3, &[]).await).await;
}

#[tokio::test]
async fn a_standalone_url_naming_a_cluster_node_and_a_cluster_flag_naming_one_redis_are_refused() {
    let cluster = RedisCluster::start(3, 0).await;
    let addr = free_addr();
    let seed = cluster.seeds()[0].clone();
    let wrong = ImhostProcess::spawn(
        addr,
        &["--listen", &addr.to_string(), "--redis", &seed],
        &[],
    );
    let (status, log) = wrong.wait(Duration::from_secs(30)).await;
    assert!(!status.success());
    assert!(log.contains("--redis-cluster"), "{log}");

    let single = RedisServer::start().await;
    let addr = free_addr();
    let wrong = ImhostProcess::spawn(
        addr,
        &[
            "--listen",
            &addr.to_string(),
            "--redis-cluster",
            &single.url(),
        ],
        &[],
    );
    let (status, log) = wrong.wait(Duration::from_secs(30)).await;
    assert!(!status.success());
    assert!(
        log.contains("Redis Cluster") && log.contains("--redis"),
        "{log}"
    );
}
