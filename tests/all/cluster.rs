//! Clusters of real imhost processes on a real Redis: cross-node delivery,
//! FreeIM byte compatibility, imhost-client, node death and Redis restarts.

use std::time::Duration;

use futures_util::StreamExt;
use imhost_client::helper::{EventKind, ImHelper};
use imhost_client::wire::{Keys, TokenValue};
use imhost_tests::cluster::Cluster;
use imhost_tests::plugins::PluginDir;
use imhost_tests::redis::RedisServer;
use imhost_tests::sse::EventStream;
use imhost_tests::terminal::{Terminal, code};
use redis::AsyncCommands;
use serde_json::{Value, json};

fn keys() -> Keys {
    Keys::for_path("/ws")
}

#[tokio::test]
async fn messages_receipts_channels_and_broadcast_cross_nodes() {
    let redis = RedisServer::start().await;
    cross_node_delivery(Cluster::start(&redis, 3).await).await;
}

/// The body of the test above, run on a Redis Cluster too
/// (`redis_cluster.rs`): the same API, the same answers.
pub(crate) async fn cross_node_delivery(cluster: Cluster) {
    let (a, b, c) = (
        cluster.client_on(0, 10),
        cluster.client_on(1, 10),
        cluster.client_on(2, 10),
    );
    let mut events = cluster.node(2).events().await;

    // Every connect URL names the owning node, whichever node issued it.
    let url = cluster.node(0).connect_url(b, None).await;
    assert_eq!(url.server, cluster.servers[1]);
    let mut ta = cluster.node(1).terminal(a).await;
    let mut tb = Terminal::connect(&url.url).await.expect("connect b");
    let mut tc = cluster.node(0).terminal(c).await;

    // Nodes publish independently: find a's event among the three.
    let mut a_online = None;
    for _ in 0..3 {
        let event = events.expect().await;
        assert_eq!(event.event, "online");
        let data: Value = serde_json::from_str(&event.data).expect("json");
        if data["client_id"] == a {
            a_online = Some(data);
        }
    }
    let data = a_online.expect("a came online");
    assert_eq!(data["server"], cluster.servers[0]);

    // a (node 0) → b (node 1), asked on node 2, with a receipt back to node 0.
    cluster
        .node(2)
        .send(a, &[b], json!({"hi": "b"}), true)
        .await;
    assert_eq!(tb.next_text().await, r#"{"hi":"b"}"#);
    assert_eq!(
        ta.next_json().await,
        json!({"content": "{\"hi\":\"b\"}", "receipt": "发送成功"})
    );
    // An offline receiver on node 2.
    let gone = cluster.client_on(2, c + 1);
    cluster.node(1).send(a, &[gone], json!(1), true).await;
    assert_eq!(
        ta.next_json().await,
        json!({"content": "1", "receipt": "用户不在线"})
    );

    // Channels across nodes; the sender a (one device) gets no echo.
    cluster
        .node(2)
        .ok("/channels/room/join", json!({"client_ids": [a, b, c]}))
        .await;
    let (_, list) = cluster.node(1).get("/channels").await;
    assert_eq!(list, json!([{"channel": "room", "online": 3}]));
    cluster
        .node(0)
        .ok(
            "/channels/room/messages",
            json!({"sender": a, "message": "to room"}),
        )
        .await;
    assert_eq!(tb.next_text().await, r#""to room""#);
    assert_eq!(tc.next_text().await, r#""to room""#);
    cluster
        .node(0)
        .ok("/broadcast", json!({"message": "all"}))
        .await;
    for t in [&mut ta, &mut tb, &mut tc] {
        assert_eq!(
            t.next_text().await,
            r#""all""#,
            "broadcast, not an echo of the room"
        );
    }

    // Force-offline through a node that does not own the client.
    cluster
        .node(0)
        .ok(&format!("/clients/{c}/force-offline"), json!({}))
        .await;
    let (frame, _) = tc.closed().await;
    assert_eq!(code(&frame), Some(1008));
    imhost_tests::eventually("c offline everywhere", || async {
        (!cluster.node(1).client(c).await.online).then_some(())
    })
    .await;
    let (_, members) = cluster.node(1).get("/channels/room/members").await;
    let mut members: Vec<i64> = serde_json::from_value(members).expect("ids");
    members.sort_unstable();
    let mut expected = vec![a, b];
    expected.sort_unstable();
    assert_eq!(members, expected, "c left the room with its last device");
}

#[tokio::test]
async fn a_dropped_messages_receipt_reaches_a_sender_on_another_node() {
    // The receipt echoes the dropped text; crossing nodes it arrives as a
    // direct message, and the receiving node's filter must not drop it too.
    let dir = PluginDir::dropping(&["darn"]);
    let plugins = dir.arg();
    let redis = RedisServer::start().await;
    let cluster = Cluster::start_with(&redis, 2, &["--plugins", &plugins]).await;
    let (a, b) = (cluster.client_on(0, 10), cluster.client_on(1, 10));
    let mut ta = cluster.node(0).terminal(a).await;
    let _tb = cluster.node(1).terminal(b).await;
    cluster.node(0).send(a, &[b], json!("darn it"), true).await;
    let receipt = ta.next_json().await;
    assert_eq!(receipt["receipt"], "消息被拦截", "{receipt}");
    assert_eq!(receipt["content"], r#""darn it""#);
    assert_eq!(
        receipt["reason"], "word-filter: contains a filtered word",
        "{receipt}"
    );
}

#[tokio::test]
async fn a_terminal_at_the_wrong_node_is_refused_and_keeps_its_token() {
    let redis = RedisServer::start().await;
    let cluster = Cluster::start(&redis, 2).await;
    let client = cluster.client_on(1, 1);
    let url = cluster.node(0).connect_url(client, None).await.url;
    let wrong = url.replace(&cluster.servers[1], &cluster.servers[0]);
    match Terminal::connect(&wrong).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status().as_u16(), 421);
        }
        Err(other) => panic!("expected 421, got {other}"),
        Ok(_) => panic!("wrong node accepted the terminal"),
    }
    Terminal::connect(&url)
        .await
        .expect("the token still works at the right node");
}

#[tokio::test]
async fn freeim_bytes_in_redis_work_both_ways() {
    let redis = RedisServer::start().await;
    let cluster = Cluster::start(&redis, 2).await;
    let keys = keys();
    let mut conn = redis.connection().await;
    let client = cluster.client_on(1, 100);
    let node = &cluster.servers[1];

    // Events as FreeIM's EventBus reads them.
    let mut pubsub = redis::Client::open(redis.url())
        .expect("url")
        .get_async_pubsub()
        .await
        .expect("pubsub");
    pubsub.subscribe(keys.online_event()).await.expect("sub");
    pubsub.subscribe(keys.offline_event()).await.expect("sub");
    pubsub.subscribe(keys.server(node)).await.expect("sub");
    let mut bus = pubsub.into_on_message();

    // PrevConnectServer as ImHelper writes it.
    let token = "ab".repeat(64);
    let value = format!(r#"{{"Item1":{client},"Item2":"from-freeim"}}"#);
    let () = redis::cmd("SET")
        .arg(keys.token(&token))
        .arg(&value)
        .arg("EX")
        .arg(10)
        .query_async(&mut conn)
        .await
        .expect("set token");
    let mut terminal = Terminal::connect(&format!("ws://{node}/ws?token={token}"))
        .await
        .expect("connect with a FreeIM token");
    let msg = tokio::time::timeout(imhost_tests::DEADLINE, bus.next())
        .await
        .expect("online event")
        .expect("message");
    assert_eq!(msg.get_channel_name(), keys.online_event());
    assert_eq!(msg.get_payload::<String>().expect("payload"), value);
    let online: Option<i64> = conn.hget(keys.online(client), client).await.expect("hget");
    assert_eq!(online, Some(1));
    let token_left: bool = conn.exists(keys.token(&token)).await.expect("exists");
    assert!(!token_left, "the token was taken (GETDEL)");

    // SendMessage as ImHelper publishes it.
    let _: i64 = conn
        .publish(
            keys.server(node),
            format!(r#"{{"Item1":0,"Item2":[{client}],"Item3":"{{\"x\":1}}","Item4":false}}"#),
        )
        .await
        .expect("publish");
    assert_eq!(terminal.next_text().await, r#"{"x":1}"#);
    skip_own(&mut bus).await;

    // A channel message before the client is a member warms the node's cache;
    // then FreeIM's JoinChan Lua runs straight in Redis, and the next channel
    // message must reach the new member.
    let chan_msg = |text: &str| {
        format!(r#"__FreeIM__(ChanMessage){{"Item1":0,"Item2":"fchan","Item3":"\"{text}\""}}"#)
    };
    let _: i64 = conn
        .publish(keys.server(node), chan_msg("before"))
        .await
        .expect("publish");
    skip_own(&mut bus).await;
    // The node applies its channel in order: once a direct message published
    // after "before" arrives, "before" has been handled (and not delivered).
    let sync = format!(r#"{{"Item1":0,"Item2":[{client}],"Item3":"\"sync\"","Item4":false}}"#);
    let _: i64 = conn
        .publish(keys.server(node), sync)
        .await
        .expect("publish");
    assert_eq!(terminal.next_text().await, r#""sync""#);
    skip_own(&mut bus).await;
    let () = redis::Script::new(
        "if redis.call('HSETNX', KEYS[1], ARGV[1], 0) == 1 then redis.call('HSET', KEYS[2], ARGV[2], 0); redis.call('HINCRBY', KEYS[3], ARGV[2], 1) end",
    )
    .key(keys.chan("fchan"))
    .key(keys.client(client))
    .key(keys.list_chan("fchan"))
    .arg(client)
    .arg("fchan")
    .invoke_async(&mut conn)
    .await
    .expect("JoinChan");
    let _: i64 = conn
        .publish(keys.server(node), chan_msg("after"))
        .await
        .expect("publish");
    assert_eq!(
        terminal.next_text().await,
        r#""after""#,
        "\"before\" was not delivered"
    );
    skip_own(&mut bus).await;

    // What imhost writes is what ImHelper reads: a message sent through the
    // API of node 0 arrives on node 1's channel in FreeIM's exact bytes.
    cluster
        .node(0)
        .send(7, &[client], json!({"k": "中文"}), true)
        .await;
    let msg = tokio::time::timeout(imhost_tests::DEADLINE, bus.next())
        .await
        .expect("publish seen")
        .expect("message");
    assert_eq!(
        msg.get_payload::<String>().expect("payload"),
        format!(r#"{{"Item1":7,"Item2":[{client}],"Item3":"{{\"k\":\"中文\"}}","Item4":true}}"#)
    );
    assert_eq!(terminal.next_text().await, r#"{"k":"中文"}"#);
    // Channel join through the API is FreeIM's layout.
    cluster
        .node(0)
        .ok("/channels/api-chan/join", json!({"client_ids": [client]}))
        .await;
    let members: Vec<i64> = conn.hkeys(keys.chan("api-chan")).await.expect("hkeys");
    assert_eq!(members, vec![client]);
    let count: i64 = conn
        .hget(keys.list_chan("api-chan"), "api-chan")
        .await
        .expect("hget");
    assert_eq!(count, 1);
    let chans: Vec<String> = conn.hkeys(keys.client(client)).await.expect("hkeys");
    assert!(chans.contains(&"api-chan".to_owned()) && chans.contains(&"fchan".to_owned()));

    // ForceOffline as ImHelper publishes it.
    let _: i64 = conn
        .publish(
            keys.server(node),
            format!("__FreeIM__(ForceOffline){client}"),
        )
        .await
        .expect("publish");
    let (frame, _) = terminal.closed().await;
    assert_eq!(code(&frame), Some(1008));
    loop {
        let msg = tokio::time::timeout(imhost_tests::DEADLINE, bus.next())
            .await
            .expect("offline event")
            .expect("message");
        if msg.get_channel_name() == keys.offline_event() {
            assert_eq!(msg.get_payload::<String>().expect("payload"), value);
            break;
        }
    }
    let online: Option<i64> = conn.hget(keys.online(client), client).await.expect("hget");
    assert_eq!(online, None, "HDEL at zero");
    let chans: Vec<String> = conn.hkeys(keys.client(client)).await.expect("hkeys");
    assert!(chans.is_empty(), "left its channels with its last socket");
}

/// Consumes the copy of our own publish on the node channel we listen to.
async fn skip_own(bus: &mut (impl futures_util::Stream<Item = redis::Msg> + Unpin)) {
    tokio::time::timeout(imhost_tests::DEADLINE, bus.next())
        .await
        .expect("own publish")
        .expect("message");
}

#[tokio::test]
async fn imhost_client_drives_the_cluster_like_freeims_imhelper() {
    let redis = RedisServer::start().await;
    let cluster = Cluster::start(&redis, 2).await;
    let helper = ImHelper::connect(&redis.url(), cluster.servers.clone(), "/ws")
        .await
        .expect("helper");
    let mut bus = Box::pin(helper.event_bus().await.expect("event bus"));
    let (a, b) = (cluster.client_on(0, 1), cluster.client_on(1, 1));

    let url_a = helper
        .prev_connect_server(a, Some("ma".into()))
        .await
        .expect("url");
    assert!(url_a.starts_with(&format!("ws://{}/ws?token=", cluster.servers[0])));
    let mut ta = Terminal::connect(&url_a).await.expect("a");
    let url_b = helper.prev_connect_server(b, None).await.expect("url");
    let mut tb = Terminal::connect(&url_b).await.expect("b");
    // Two nodes publish these, so they may arrive in either order.
    let mut came_online = Vec::new();
    for _ in 0..2 {
        let event = tokio::time::timeout(imhost_tests::DEADLINE, bus.next())
            .await
            .expect("event")
            .expect("open");
        assert_eq!(event.kind, EventKind::Online);
        came_online.push(event.client.client_id);
    }
    came_online.sort_unstable();
    let mut both = vec![a, b];
    both.sort_unstable();
    assert_eq!(came_online, both);
    assert_eq!(
        helper.has_online_many(&[a, b, 999]).await.expect("many"),
        vec![true, true, false]
    );
    assert!(helper.has_online(a).await.expect("one"));
    let mut online = helper.get_client_list_by_online().await.expect("online");
    online.sort_unstable();
    assert_eq!(online, both);

    helper
        .send_message(a, &[b], &json!({"m": 1}), true)
        .await
        .expect("send");
    assert_eq!(tb.next_text().await, r#"{"m":1}"#);
    assert_eq!(ta.next_json().await["receipt"], "发送成功");

    helper.join_chan("x", &[a, b]).await.expect("join");
    helper.join_chan("y", &[a]).await.expect("join");
    assert_eq!(helper.get_chan_online("x").await.expect("count"), 2);
    assert_eq!(
        helper.get_chan_list().await.expect("list"),
        vec![("x".into(), 2), ("y".into(), 1)]
    );
    assert_eq!(
        helper.get_chan_list_by_client_id(a).await.expect("chans"),
        vec!["x", "y"]
    );
    helper
        .send_chan_message(b, "x", &"in x")
        .await
        .expect("chan");
    assert_eq!(ta.next_text().await, r#""in x""#);
    helper
        .leave_chans(a, &["x".into(), "y".into()])
        .await
        .expect("leave both");
    assert_eq!(
        helper.get_chan_client_list("x").await.expect("members"),
        vec![b]
    );
    assert_eq!(helper.get_chan_online("y").await.expect("count"), 0);
    helper.join_chan("z", &[a, b]).await.expect("join");
    helper.leave_chan("z", &[b]).await.expect("leave");
    assert_eq!(
        helper.get_chan_client_list("z").await.expect("members"),
        vec![a]
    );
    helper.clear_chan_client("x").await.expect("clear");
    assert!(
        helper
            .get_chan_client_list("x")
            .await
            .expect("members")
            .is_empty()
    );
    assert_eq!(
        helper.get_chan_list().await.expect("list"),
        vec![("z".into(), 1)]
    );

    helper
        .send_broadcast_message(&"everyone")
        .await
        .expect("broadcast");
    assert_eq!(ta.next_text().await, r#""everyone""#);
    assert_eq!(tb.next_text().await, r#""everyone""#);

    helper.force_offline(a).await.expect("kick");
    let (frame, _) = ta.closed().await;
    assert_eq!(code(&frame), Some(1008));
    let event = tokio::time::timeout(imhost_tests::DEADLINE, bus.next())
        .await
        .expect("event")
        .expect("open");
    assert_eq!(event.kind, EventKind::Offline);
    assert_eq!(
        event.client,
        TokenValue {
            client_id: a,
            metadata: Some("ma".into())
        }
    );
}

#[tokio::test]
async fn a_killed_node_is_cleaned_up_with_one_offline_event_per_client() {
    let redis = RedisServer::start().await;
    killed_node_cleanup(Cluster::start(&redis, 3).await).await;
}

/// The body of the test above, run on a Redis Cluster too.
pub(crate) async fn killed_node_cleanup(mut cluster: Cluster) {
    let (x, y) = (cluster.client_on(2, 1), cluster.client_on(2, 100));
    let survivor = cluster.client_on(0, 1);
    let _tx = cluster.node(0).terminal(x).await;
    let _ty1 = cluster.node(0).terminal(y).await;
    let _ty2 = cluster.node(0).terminal(y).await;
    // Read continuously, so it answers heartbeats for the whole test.
    let _ts = cluster.node(0).terminal(survivor).await.into_reader();
    cluster
        .node(0)
        .ok(
            "/channels/room/join",
            json!({"client_ids": [x, y, survivor]}),
        )
        .await;
    let mut events = cluster.node(0).events().await;

    cluster.kill(2).await;
    let mut offline = Vec::new();
    while offline.len() < 2 {
        let event = events.expect().await;
        if event.event == "online" {
            // A late copy of an earlier connect: not what this test is about.
            continue;
        }
        assert_eq!(event.event, "offline", "{event:?}");
        let data: Value = serde_json::from_str(&event.data).expect("json");
        assert_eq!(data["server"], cluster.servers[2]);
        offline.push(data["client_id"].as_i64().expect("id"));
    }
    offline.sort_unstable();
    assert_eq!(
        offline,
        vec![x, y],
        "one offline event per client, not per socket"
    );

    let (_, online) = cluster.node(1).get("/online").await;
    assert_eq!(online, json!([survivor]));
    // On a Redis Cluster the channels (in other slots) are left right after
    // the clients are reaped and their events told.
    imhost_tests::eventually("the reaped clients left their channels", || async {
        let (_, members) = cluster.node(1).get("/channels/room/members").await;
        (members == json!([survivor])).then_some(())
    })
    .await;

    // Let several reaper rounds pass, then prove no further offline event for
    // x or y came: the next event is the one we cause now.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let late = cluster.client_on(1, 1);
    let _tl = cluster.node(0).terminal(late).await.into_reader();
    let next = events.expect().await;
    assert_eq!(next.event, "online", "{next:?}");
    assert_eq!(
        serde_json::from_str::<Value>(&next.data).expect("json")["client_id"],
        late
    );
}

#[tokio::test]
async fn a_node_late_beyond_its_ttl_is_reaped_then_rewrites_its_records() {
    let redis = RedisServer::start().await;
    late_node_comes_back(Cluster::start(&redis, 3).await).await;
}

/// The next event about `client` on `events`, skipping others'.
async fn next_event_of(events: &mut EventStream, client: i64) -> String {
    loop {
        let event = events.expect().await;
        let data: Value = serde_json::from_str(&event.data).expect("json");
        if data["client_id"] == client {
            return event.event;
        }
    }
}

/// The body of the test above, run on a Redis Cluster too: a node stopped
/// (SIGSTOP) past its liveness TTL is taken for dead and reaped (offline
/// event, channels left); resumed, it finds out, writes its records again
/// and announces its still-connected client online, which is reachable.
pub(crate) async fn late_node_comes_back(cluster: Cluster) {
    let late = cluster.client_on(2, 1);
    let mut terminal = cluster.node(0).terminal(late).await.into_reader();
    cluster
        .node(0)
        .ok("/channels/room/join", json!({"client_ids": [late]}))
        .await;
    let mut events = cluster.node(0).events().await;

    let process = cluster.nodes[2].process.as_ref().expect("running");
    process.signal("STOP");
    assert_eq!(next_event_of(&mut events, late).await, "offline");
    // The event is told as the client is reaped; its channels (on a Redis
    // Cluster, in other slots) are left right after.
    imhost_tests::eventually("the reaped client left its channels", || async {
        let (_, members) = cluster.node(1).get("/channels/room/members").await;
        (members == json!([])).then_some(())
    })
    .await;
    let (_, online) = cluster.node(1).get("/online").await;
    assert_eq!(online, json!([]));
    process.signal("CONT");

    assert_eq!(next_event_of(&mut events, late).await, "online");
    let (_, online) = cluster.node(1).get("/online").await;
    assert_eq!(online, json!([late]), "records written again");
    assert_eq!(cluster.node(1).client(late).await.connections, 1);
    cluster
        .node(1)
        .send(0, &[late], json!("still here"), false)
        .await;
    assert_eq!(terminal.next_text().await, r#""still here""#);
}

#[tokio::test]
async fn a_restarted_node_reaps_its_past_once_and_keeps_its_new_clients() {
    let redis = RedisServer::start().await;
    restarted_node_keeps_new_clients(Cluster::start(&redis, 3).await).await;
}

/// The body of the test above, run on a Redis Cluster too: a node killed
/// and started again under the same name (reaped by itself or by the
/// others, whichever comes first, perhaps both at once) reaps the client of
/// its previous run exactly once, and never the client of its new run.
pub(crate) async fn restarted_node_keeps_new_clients(mut cluster: Cluster) {
    let old = cluster.client_on(2, 1);
    let new = cluster.client_on(2, old + 1);
    let _old_terminal = cluster.node(0).terminal(old).await.into_reader();
    cluster
        .node(0)
        .ok("/channels/room/join", json!({"client_ids": [old]}))
        .await;
    let mut events = cluster.node(0).events().await;

    cluster.kill(2).await;
    cluster.launch(2);
    cluster.node(2).wait_serving().await;
    let mut new_terminal = cluster.node(0).terminal(new).await.into_reader();
    assert_eq!(next_event_of(&mut events, old).await, "offline");

    // Several reaper rounds (node TTL 1.5 s, a round every 0.5 s) pass;
    // then the new run's client is still online, reachable, counted once,
    // and the old one was told offline once (the next event about it is
    // the one this test causes).
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (_, online) = cluster.node(1).get("/online").await;
    assert_eq!(online, json!([new]));
    assert_eq!(cluster.node(1).client(new).await.connections, 1);
    cluster.node(1).send(0, &[new], json!("hello"), false).await;
    assert_eq!(new_terminal.next_text().await, r#""hello""#);
    let (_, members) = cluster.node(1).get("/channels/room/members").await;
    assert_eq!(members, json!([]));
    let _again = cluster.node(0).terminal(old).await.into_reader();
    assert_eq!(next_event_of(&mut events, old).await, "online");
}

#[tokio::test]
async fn a_redis_restart_keeps_every_socket_and_the_cluster_recovers() {
    let mut redis = RedisServer::start().await;
    let cluster = Cluster::start(&redis, 3).await;
    let mut ids: Vec<i64> = (0..3).map(|i| cluster.client_on(i, 1)).collect();
    ids.sort_unstable();
    let mut readers = Vec::new();
    for &id in &ids {
        readers.push(cluster.node(0).terminal(id).await.into_reader());
    }
    // Traffic flows before.
    cluster.node(1).send(0, &ids, json!("before"), false).await;
    for r in &mut readers {
        assert_eq!(r.next_text().await, r#""before""#);
    }

    // Traffic keeps coming while Redis goes away and comes back.
    let unavailable = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
    let delivered = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
    let stop = tokio_util::sync::CancellationToken::new();
    let traffic = {
        let api = cluster.node(1).clone();
        let ids = ids.clone();
        let (unavailable, delivered, stop) = (unavailable.clone(), delivered.clone(), stop.clone());
        tokio::spawn(async move {
            let mut answers = std::collections::BTreeMap::<u16, u32>::new();
            let mut accepted = Vec::new();
            // Bounded: stops when told, or after 4,000 messages.
            for n in 0..4000 {
                if stop.is_cancelled() {
                    break;
                }
                let (status, _) = api
                    .post_raw(
                        "/messages",
                        json!({"sender": 0, "receivers": ids, "message": {"during": n}}),
                    )
                    .await;
                *answers.entry(status).or_default() += 1;
                match status {
                    // Redis pub/sub is at most once: a message Redis took in the
                    // instant before it was killed may never reach the node.
                    // Every one accepted after the outage began must.
                    200 if unavailable.load(std::sync::atomic::Ordering::Relaxed) > 0 => {
                        accepted.push(n);
                        delivered.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                    200 => {
                        delivered.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                    503 => {
                        unavailable.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                    _ => {}
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            (answers, accepted)
        })
    };
    redis.kill();
    // The API says so, clearly, and nothing is dropped.
    let (status, body) = cluster
        .node(0)
        .post_raw(
            "/messages",
            json!({"sender": 0, "receivers": ids, "message": "x"}),
        )
        .await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"]["code"], "unavailable");
    // A long enough outage for reconnect backoffs to grow.
    imhost_tests::eventually(
        "6 calls answered 503 during the outage (about 3 s)",
        || async { (unavailable.load(std::sync::atomic::Ordering::Relaxed) >= 6).then_some(()) },
    )
    .await;

    redis.restart().await;
    let before = delivered.load(std::sync::atomic::Ordering::Relaxed);
    // Presence is repaired on the empty Redis: every client online again.
    imhost_tests::eventually("online set repaired", || async {
        let (status, online) = cluster.node(2).get_raw("/online").await;
        (status == 200 && online == json!(ids)).then_some(())
    })
    .await;
    imhost_tests::eventually("100 calls accepted after the restart", || async {
        (delivered.load(std::sync::atomic::Ordering::Relaxed) >= before + 100).then_some(())
    })
    .await;
    stop.cancel();
    let (answers, accepted) = traffic.await.expect("traffic task");
    assert!(
        answers.keys().all(|s| *s == 200 || *s == 503),
        "only 200 or 503 while Redis restarts: {answers:?}"
    );
    // Delivery works again on every node, to the same sockets.
    imhost_tests::eventually("delivery resumed", || async {
        let (status, _) = cluster
            .node(1)
            .post_raw(
                "/messages",
                json!({"sender": 0, "receivers": ids, "message": "after"}),
            )
            .await;
        (status == 200).then_some(())
    })
    .await;
    // Every message answered 200 reached every terminal, in order.
    for r in &mut readers {
        let mut got = Vec::new();
        loop {
            let text = r.next_text().await;
            if text == r#""after""# {
                break;
            }
            let value: Value = serde_json::from_str(&text).expect("json");
            if let Some(n) = value["during"].as_i64() {
                got.push(n);
            }
        }
        // A 503 may still have reached some nodes, so more can arrive than
        // was accepted, but never fewer, and never out of order.
        let missing: Vec<_> = accepted.iter().filter(|n| !got.contains(n)).collect();
        assert!(
            missing.is_empty(),
            "answered 200 but never delivered: {missing:?}"
        );
        assert!(got.is_sorted(), "delivered out of order: {got:?}");
        assert!(r.is_open(), "socket survived the Redis restart");
    }
    for &id in &ids {
        assert_eq!(cluster.node(0).client(id).await.connections, 1);
    }
}

#[tokio::test]
async fn channel_messages_cost_no_redis_read_per_message() {
    let redis = RedisServer::start().await;
    let cluster = Cluster::start(&redis, 3).await;
    let member = cluster.client_on(1, 1);
    let mut reader = cluster.node(0).terminal(member).await.into_reader();
    cluster
        .node(0)
        .ok("/channels/hot/join", json!({"client_ids": [member]}))
        .await;
    let mut conn = redis.connection().await;
    // The first message fills each node's cache.
    cluster
        .node(2)
        .ok("/channels/hot/messages", json!({"message": 0}))
        .await;
    assert_eq!(reader.next_text().await, "0");
    let before = hkeys_calls(&mut conn).await;
    for n in 1..=20 {
        cluster
            .node(2)
            .ok("/channels/hot/messages", json!({"message": n}))
            .await;
    }
    for n in 1..=20 {
        assert_eq!(reader.next_text().await, n.to_string());
    }
    let after = hkeys_calls(&mut conn).await;
    assert_eq!(
        after, before,
        "20 channel messages on 3 nodes read no members from Redis"
    );

    // A membership change is seen by the very next message.
    let newcomer = cluster.client_on(2, 1);
    let mut second = cluster.node(0).terminal(newcomer).await.into_reader();
    cluster
        .node(1)
        .ok("/channels/hot/join", json!({"client_ids": [newcomer]}))
        .await;
    cluster
        .node(0)
        .ok("/channels/hot/messages", json!({"message": "both"}))
        .await;
    assert_eq!(second.next_text().await, r#""both""#);
    assert_eq!(reader.next_text().await, r#""both""#);
}

/// `HKEYS` calls Redis has served (its `INFO commandstats`): a node reads a
/// channel's members with it when its channel cache cannot answer.
async fn hkeys_calls(conn: &mut redis::aio::MultiplexedConnection) -> u64 {
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(conn)
        .await
        .expect("info");
    info.lines()
        .find_map(|l| l.strip_prefix("cmdstat_hkeys:calls="))
        .and_then(|rest| rest.split(',').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

#[tokio::test]
async fn the_channel_cache_comes_back_after_a_redis_restart() {
    // A restarted Redis is empty, keyspace notifications off: each node
    // turns them on again when it resubscribes, over its command
    // connection, which is the one that still holds the dead socket then.
    let mut redis = RedisServer::start().await;
    let cluster = Cluster::start(&redis, 2).await;
    let member = cluster.client_on(1, 1);
    let mut reader = cluster.node(0).terminal(member).await.into_reader();
    redis.restart().await;
    imhost_tests::eventually("online set repaired", || async {
        let (status, online) = cluster.node(0).get_raw("/online").await;
        (status == 200 && online == json!([member])).then_some(())
    })
    .await;
    cluster
        .node(0)
        .ok("/channels/hot/join", json!({"client_ids": [member]}))
        .await;
    // The first messages fill each node's cache.
    for node in [0, 1] {
        cluster
            .node(node)
            .ok("/channels/hot/messages", json!({"message": node}))
            .await;
        assert_eq!(reader.next_text().await, node.to_string());
    }
    let mut conn = redis.connection().await;
    let before = hkeys_calls(&mut conn).await;
    for n in 1..=20 {
        cluster
            .node(n % 2)
            .ok("/channels/hot/messages", json!({"message": n}))
            .await;
    }
    for n in 1..=20 {
        assert_eq!(reader.next_text().await, n.to_string());
    }
    assert_eq!(
        hkeys_calls(&mut conn).await,
        before,
        "20 channel messages after the restart read no members from Redis"
    );
}

#[tokio::test]
async fn no_message_answered_200_is_lost_while_nodes_resubscribe() {
    // Redis drops every node's pub/sub connection (as after a restart, or an
    // output-buffer overflow) while the publishing connection stays up: until
    // a node has resubscribed, what is published to it reaches no one. The
    // API must retry or say so, never answer 200 for a message lost.
    let redis = RedisServer::start().await;
    let cluster = Cluster::start(&redis, 2).await;
    let ids = vec![cluster.client_on(0, 1), cluster.client_on(1, 1)];
    let mut readers = Vec::new();
    for &id in &ids {
        readers.push(cluster.node(0).terminal(id).await.into_reader());
    }
    let answered = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
    let stop = tokio_util::sync::CancellationToken::new();
    let traffic = {
        let api = cluster.node(0).clone();
        let ids = ids.clone();
        let (answered, stop) = (answered.clone(), stop.clone());
        tokio::spawn(async move {
            let mut accepted = Vec::new();
            let mut statuses = std::collections::BTreeMap::<u16, u32>::new();
            for n in 0..5000 {
                if stop.is_cancelled() {
                    break;
                }
                let (status, _) = api
                    .post_raw(
                        "/messages",
                        json!({"sender": 0, "receivers": ids, "message": {"n": n}}),
                    )
                    .await;
                *statuses.entry(status).or_default() += 1;
                if status == 200 {
                    accepted.push(n);
                }
                answered.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            (accepted, statuses)
        })
    };
    let mut conn = redis.connection().await;
    // Messages in flight while a connection is killed: Redis discards what it
    // had queued for a killed client (pub/sub is at most once), so a message
    // heard in that instant may be lost. Every other one must arrive.
    let mut in_flight_at_kill = Vec::new();
    for _ in 0..5 {
        let before = answered.load(std::sync::atomic::Ordering::Relaxed);
        imhost_tests::eventually("traffic flows", || async {
            (answered.load(std::sync::atomic::Ordering::Relaxed) >= before + 50).then_some(())
        })
        .await;
        let first = i64::from(answered.load(std::sync::atomic::Ordering::Relaxed));
        let killed: i64 = redis::cmd("CLIENT")
            .arg("KILL")
            .arg("TYPE")
            .arg("pubsub")
            .query_async(&mut conn)
            .await
            .expect("CLIENT KILL");
        assert!(killed >= 2, "each node had a pub/sub connection");
        let last = i64::from(answered.load(std::sync::atomic::Ordering::Relaxed)) + 1;
        in_flight_at_kill.push(first..=last);
    }
    let before = answered.load(std::sync::atomic::Ordering::Relaxed);
    imhost_tests::eventually("traffic flows after the last drop", || async {
        (answered.load(std::sync::atomic::Ordering::Relaxed) >= before + 50).then_some(())
    })
    .await;
    stop.cancel();
    let (accepted, statuses) = traffic.await.expect("traffic task");
    assert!(
        statuses.keys().all(|s| *s == 200 || *s == 503),
        "only 200 or 503: {statuses:?}"
    );
    cluster.node(1).send(0, &ids, json!("end"), false).await;
    for r in &mut readers {
        let mut got = Vec::new();
        loop {
            let text = r.next_text().await;
            if text == r#""end""# {
                break;
            }
            let value: Value = serde_json::from_str(&text).expect("json");
            got.push(value["n"].as_i64().expect("n"));
        }
        let missing: Vec<_> = accepted
            .iter()
            .filter(|n| !got.contains(n) && !in_flight_at_kill.iter().any(|r| r.contains(n)))
            .collect();
        assert!(
            missing.is_empty(),
            "answered 200 but never delivered: {missing:?}"
        );
        assert!(got.is_sorted(), "delivered out of order");
    }
}
