//! Nodes on a real Redis Cluster (3 masters, 3 replicas, started by the
//! test on loopback): the cluster tests' own bodies on the second backend,
//! and what only a cluster does: a coordinated failover, a slot migration
//! and a master killed under a message stream, and the refusals of a
//! standalone URL that names a cluster node and of a cluster flag that names
//! a standalone Redis.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use imhost_client::wire::Keys;
use imhost_tests::cluster::Cluster;
use imhost_tests::process::{ImhostProcess, free_addr};
use imhost_tests::redis::RedisServer;
use imhost_tests::redis_cluster::RedisCluster;
use serde_json::{Value, json};

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
async fn a_node_late_beyond_its_ttl_is_reaped_then_rewrites_its_records_on_a_redis_cluster() {
    let redis = RedisCluster::start(3, 1).await;
    super::cluster::late_node_comes_back(Cluster::start_on_cluster(&redis, 3, &[]).await).await;
}

#[tokio::test]
async fn a_restarted_node_reaps_its_past_once_and_keeps_its_new_clients_on_a_redis_cluster() {
    let redis = RedisCluster::start(3, 1).await;
    super::cluster::restarted_node_keeps_new_clients(
        Cluster::start_on_cluster(&redis, 3, &[]).await,
    )
    .await;
}

/// A join stopped between its two steps (the client's side written, the
/// channel's not) is harmless and completed by a retry; joins and leaves
/// are idempotent; counts never drift.
#[tokio::test]
async fn joins_and_leaves_across_slots_are_idempotent_and_survive_a_stop_in_between() {
    use imhost_client::helper::ImHelper;
    use redis::AsyncCommands;
    let redis = RedisCluster::start(3, 0).await;
    let helper = ImHelper::connect_cluster(&redis.seeds(), vec!["n1".into()], "/ws")
        .await
        .expect("helper");
    let keys = helper.keys().clone();
    let (client, chan) = (7, "x");
    assert_ne!(
        redis.master_of(&keys.client(client)).await,
        redis.master_of(&keys.chan(chan)).await,
        "the two sides are on different masters (else this tests one slot)"
    );
    // The first step of a join alone, as a stopped join leaves it.
    let mut conn = helper.connection();
    let () = conn
        .hset(keys.client(client), chan, 0)
        .await
        .expect("client side");
    assert!(
        helper
            .get_chan_client_list(chan)
            .await
            .expect("members")
            .is_empty()
    );
    assert_eq!(helper.get_chan_online(chan).await.expect("count"), 0);

    for _ in 0..2 {
        helper.join_chan(chan, &[client, 8]).await.expect("join");
    }
    let mut members = helper.get_chan_client_list(chan).await.expect("members");
    members.sort_unstable();
    assert_eq!(members, [client, 8]);
    assert_eq!(helper.get_chan_online(chan).await.expect("count"), 2);
    assert_eq!(
        helper.get_chan_list().await.expect("list"),
        [(chan.to_owned(), 2)]
    );

    for _ in 0..2 {
        helper.leave_chan(chan, &[client]).await.expect("leave");
    }
    assert_eq!(
        helper.get_chan_client_list(chan).await.expect("members"),
        [8]
    );
    assert_eq!(helper.get_chan_online(chan).await.expect("count"), 1);
    assert!(
        helper
            .get_chan_list_by_client_id(client)
            .await
            .expect("channels")
            .is_empty()
    );
    helper.clear_chan_client(chan).await.expect("clear");
    assert!(helper.get_chan_list().await.expect("list").is_empty());
    assert!(
        helper
            .get_chan_list_by_client_id(8)
            .await
            .expect("channels")
            .is_empty()
    );
}

/// Presence is spread over the masters: every master holds clients' and
/// channels' buckets, nothing of it is in the control slot, and the
/// listings (the union of the buckets) are whole and exact.
#[tokio::test]
async fn presence_spreads_over_every_master_and_lists_whole() {
    let redis = RedisCluster::start(3, 0).await;
    let cluster = Cluster::start_on_cluster(&redis, 2, &[]).await;
    const CLIENTS: i64 = 60;
    let mut readers = Vec::new();
    // Client 2's socket is closed by the test: a plain terminal, whose
    // drop closes it at once.
    let two = cluster.node(0).terminal(2).await;
    for id in (1..=CLIENTS).filter(|&id| id != 2) {
        readers.push(cluster.node(0).terminal(id).await.into_reader());
    }
    // Channel `c{k}` has members k..=k+1: 2 each, 30 channels.
    for k in 1..=30 {
        cluster
            .node(1)
            .ok(
                &format!("/channels/c{k}/join"),
                json!({"client_ids": [k, k + 1]}),
            )
            .await;
    }
    for pattern in [
        "{im_v2_ws:*}Online",
        "{im_v2_ws:*}Chanc*",
        "{im_v2_ws:*}Client*",
    ] {
        let per_master = redis.keys_per_master(pattern).await;
        assert_eq!(per_master.len(), 3);
        assert!(
            per_master.iter().all(|&n| n > 0),
            "{pattern}: every master holds some, {per_master:?}"
        );
    }
    assert_eq!(redis.keys_per_master("{im_v2_ws}Online*").await, [0, 0, 0]);

    let (_, online) = cluster.node(1).get("/online").await;
    let expected: Vec<i64> = (1..=CLIENTS).collect();
    assert_eq!(online, json!(expected));
    let (_, channels) = cluster.node(0).get("/channels").await;
    let channels = channels.as_array().expect("a list");
    assert_eq!(channels.len(), 30, "{channels:?}");
    assert!(channels.iter().all(|c| c["online"] == 2), "{channels:?}");

    // A backend's event bus (imhost-client) hears a disconnect's event on
    // its event shard.
    let helper = imhost_client::helper::ImHelper::connect_cluster(
        &redis.seeds(),
        cluster.servers.clone(),
        "/ws",
    )
    .await
    .expect("helper");
    let mut bus = helper.event_bus().await.expect("event bus");

    // A client going offline leaves channels in other buckets (c1 and c2
    // hold client 2; their buckets are not client 2's).
    drop(two);
    let event = tokio::time::timeout(
        imhost_tests::DEADLINE,
        futures_util::StreamExt::next(&mut bus),
    )
    .await
    .expect("an event in time")
    .expect("the bus is open");
    assert_eq!(event.kind, imhost_client::helper::EventKind::Offline);
    assert_eq!(event.client.client_id, 2);
    imhost_tests::eventually("client 2 left c1 and c2", || async {
        let (_, c1) = cluster.node(1).get("/channels/c1/members").await;
        let (_, c2) = cluster.node(1).get("/channels/c2/members").await;
        (c1 == json!([1]) && c2 == json!([3])).then_some(())
    })
    .await;
    let info = cluster.node(0).client(2).await;
    assert!(!info.online && info.channels.is_empty(), "{info:?}");
    // Nothing is left pending once the leaves are done.
    assert_eq!(
        redis.keys_per_master("{im_v2_ws:*}NodeLeaving*").await,
        [0, 0, 0]
    );
}

/// What a stream of API sends to one client saw, and what its socket got.
struct Stream {
    statuses: BTreeMap<u16, u32>,
    accepted: Vec<i64>,
    received: Vec<i64>,
    /// The numbers that may have been in flight while the disturbance ran:
    /// sends are one at a time, so send `n` is in flight while `n` answers
    /// have come back.
    in_flight: std::ops::RangeInclusive<i64>,
}

/// Sends numbered messages from node 0's API to `client` (on node 1) until
/// `disturb` has run and `after` more were answered, then checks the socket.
async fn stream_through(
    cluster: &Cluster,
    client: i64,
    disturb: impl std::future::Future<Output = ()>,
) -> Stream {
    let mut reader = cluster.node(0).terminal(client).await.into_reader();
    let answered = Arc::new(AtomicU32::new(0));
    let stop = tokio_util::sync::CancellationToken::new();
    let traffic = {
        let api = cluster.node(0).clone();
        let (answered, stop) = (answered.clone(), stop.clone());
        tokio::spawn(async move {
            let mut accepted = Vec::new();
            let mut statuses = BTreeMap::<u16, u32>::new();
            for n in 0..20_000i64 {
                if stop.is_cancelled() {
                    break;
                }
                let (status, _) = api
                    .post_raw(
                        "/messages",
                        json!({"sender": 0, "receivers": [client], "message": {"n": n}}),
                    )
                    .await;
                *statuses.entry(status).or_default() += 1;
                if status == 200 {
                    accepted.push(n);
                }
                answered.fetch_add(1, Ordering::Relaxed);
            }
            (accepted, statuses)
        })
    };
    let flowing = |more: u32| {
        let answered = answered.clone();
        async move {
            let before = answered.load(Ordering::Relaxed);
            imhost_tests::eventually_within("traffic flows", Duration::from_secs(60), || async {
                (answered.load(Ordering::Relaxed) >= before + more).then_some(())
            })
            .await;
        }
    };
    flowing(100).await;
    let before = answered.load(Ordering::SeqCst);
    disturb.await;
    let after = answered.load(Ordering::SeqCst);
    flowing(200).await;
    stop.cancel();
    let (accepted, statuses) = traffic.await.expect("traffic task");
    cluster
        .node(0)
        .send(0, &[client], json!("end"), false)
        .await;
    let mut received = Vec::new();
    loop {
        let text = reader.next_text().await;
        if text == r#""end""# {
            break;
        }
        let value: Value = serde_json::from_str(&text).expect("json");
        received.push(value["n"].as_i64().expect("n"));
    }
    assert!(reader.is_open(), "the socket stayed open");
    Stream {
        statuses,
        accepted,
        received,
        in_flight: i64::from(before)..=i64::from(after),
    }
}

impl Stream {
    /// Every message answered 200 arrived, once; nothing else arrived twice.
    fn assert_complete(&self) {
        self.assert_complete_but(0);
    }

    /// As [`Self::assert_complete`], except that up to `in_flight_losses` of
    /// the sends in flight while the disturbance ran may be missing: Redis
    /// pub/sub is at most once, and a master killed between writing a
    /// `SPUBLISH`'s reply and the subscriber's copy loses that copy with
    /// itself (docs/cluster.md). Anything sent before or after that instant
    /// must still arrive.
    fn assert_complete_but(&self, in_flight_losses: usize) {
        assert!(
            self.statuses.keys().all(|s| *s == 200 || *s == 503),
            "only 200 or 503: {:?}",
            self.statuses
        );
        let mut seen = std::collections::BTreeSet::new();
        let duplicates: Vec<i64> = self
            .received
            .iter()
            .copied()
            .filter(|n| !seen.insert(*n))
            .collect();
        assert!(duplicates.is_empty(), "delivered twice: {duplicates:?}");
        let missing: Vec<i64> = self
            .accepted
            .iter()
            .copied()
            .filter(|n| !seen.contains(n))
            .collect();
        let excused =
            missing.len() <= in_flight_losses && missing.iter().all(|n| self.in_flight.contains(n));
        assert!(
            missing.is_empty() || excused,
            "{} answered 200 and lost: {missing:?} ({:?}; in flight during the disturbance: {:?})",
            missing.len(),
            self.statuses,
            self.in_flight
        );
    }
}

/// The key whose slot carries node `i`'s delivery channel.
fn channel_of(cluster: &Cluster, i: usize) -> String {
    Keys::for_cluster("/ws").server(&cluster.servers[i])
}

#[tokio::test]
async fn a_failover_and_a_slot_migration_under_a_stream_lose_and_duplicate_nothing() {
    let redis = RedisCluster::start(3, 1).await;
    let cluster = Cluster::start_on_cluster(&redis, 2, &[]).await;
    let client = cluster.client_on(1, 1);
    let channel = channel_of(&cluster, 1);

    let master = redis.master_of(&channel).await;
    let failover = stream_through(&cluster, client, async {
        let promoted = redis.failover(master).await;
        assert_ne!(promoted, master);
    })
    .await;
    failover.assert_complete();
    assert_ne!(
        redis.master_of(&channel).await,
        master,
        "the channel's slot moved"
    );

    let migration = stream_through(&cluster, client, async {
        let (from, to) = redis.migrate_slot_of(&channel).await;
        assert_ne!(from, to);
    })
    .await;
    migration.assert_complete();
    let stats = cluster.node(1).stats().await;
    assert!(
        stats.shard_resubscribes >= 1,
        "node 1 subscribed again after losing its shard subscription: {stats:?}"
    );
}

#[tokio::test]
async fn a_killed_master_leaves_a_bounded_gap_answered_503_never_200() {
    let mut redis = RedisCluster::start(3, 1).await;
    let cluster = Cluster::start_on_cluster(&redis, 2, &[]).await;
    let client = cluster.client_on(1, 1);
    let master = redis.master_of(&channel_of(&cluster, 1)).await;
    // Killed between the stream's first and last hundreds: its replica takes
    // over after the node timeout (1 s here), the nodes find it, and sends
    // resume; in between they are answered 503. The one send Redis may have
    // taken in the instant of the kill is the only one it may lose.
    let stream = stream_through(&cluster, client, async {
        redis.kill(master);
    })
    .await;
    stream.assert_complete_but(1);
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
