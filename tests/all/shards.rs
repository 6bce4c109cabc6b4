//! Delivery on every core: per-socket order across shards whatever the mix
//! of messages, and backpressure (503 `overloaded`) instead of unbounded
//! queues, with every accepted message delivered and no terminal cut off.

use std::collections::BTreeSet;

use imhost::config::Options;
use imhost_client::ClientId;
use imhost_tests::api::{API_KEY, Api};
use imhost_tests::cluster::Cluster;
use imhost_tests::host::TestHost;
use imhost_tests::plugins::PluginDir;
use imhost_tests::redis::RedisServer;
use imhost_tests::terminal::Terminal;
use serde_json::{Value, json};

/// Clients of the order test; client 6 holds two sockets.
const CLIENTS: [ClientId; 6] = [1, 2, 3, 4, 5, 6];

/// What one step of the order test sends, and who gets it.
enum Step {
    Channel,
    Direct(ClientId),
    Broadcast,
    Join(ClientId),
    Leave(ClientId),
}

fn step(s: usize) -> Step {
    let client = CLIENTS[s % CLIENTS.len()];
    match s % 5 {
        0 => Step::Channel,
        1 => Step::Direct(client),
        2 => Step::Broadcast,
        3 => Step::Join(client),
        _ => Step::Leave(client),
    }
}

/// Sends a mix of channel messages, direct messages, broadcasts and
/// membership changes, one after another, through a word filter whose cost
/// follows the message's length (0 to 6 KB), and checks that each socket
/// got what was meant for it, in order.
///
/// `late_window`: through Redis, a membership change is a write to Redis
/// by the API, not a message in the stream, so a channel message published
/// up to that many steps before a client joins or leaves may be resolved
/// after the change (FreeIM's model; see docs/cluster.md) and reach it or
/// not. Such messages are neither required nor refused; everything else is
/// exact, and the order of whatever arrives is strict. Embedded, it is 0:
/// exactly what was meant, nothing else.
async fn every_socket_gets_its_own_messages_in_order(api: &Api, late_window: usize) {
    let mut terminals: Vec<(ClientId, Terminal)> = Vec::new();
    for client in CLIENTS {
        terminals.push((client, api.terminal(client).await));
    }
    terminals.push((6, api.terminal(6).await));
    api.ok("/channels/room/join", json!({"client_ids": [1, 2, 3]}))
        .await;
    let mut members: BTreeSet<ClientId> = [1, 2, 3].into();
    let mut expected: Vec<Vec<usize>> = vec![Vec::new(); terminals.len()];
    // Steps at which each client joined or left.
    let mut changes: Vec<(ClientId, usize)> = Vec::new();
    const STEPS: usize = 120;
    for s in 0..STEPS {
        let pad = "x".repeat((s * 1_237) % 6_000);
        let message = json!({"s": s, "pad": pad});
        let gets = |client: ClientId| -> bool {
            match step(s) {
                Step::Channel => members.contains(&client),
                Step::Direct(to) => to == client,
                Step::Broadcast => true,
                Step::Join(_) | Step::Leave(_) => false,
            }
        };
        for (i, (client, _)) in terminals.iter().enumerate() {
            if gets(*client) {
                expected[i].push(s);
            }
        }
        match step(s) {
            Step::Channel => {
                api.ok(
                    "/channels/room/messages",
                    json!({"sender": 0, "message": message}),
                )
                .await;
            }
            Step::Direct(to) => api.send(0, &[to], message, false).await,
            Step::Broadcast => api.ok("/broadcast", json!({"message": message})).await,
            Step::Join(client) => {
                api.ok("/channels/room/join", json!({"client_ids": [client]}))
                    .await;
                members.insert(client);
                changes.push((client, s));
            }
            Step::Leave(client) => {
                api.ok("/channels/room/leave", json!({"client_ids": [client]}))
                    .await;
                members.remove(&client);
                changes.push((client, s));
            }
        }
    }
    // The node may still be draining its backlog: a 503 `overloaded` says
    // retry later, so the end marker is sent until it is taken.
    imhost_tests::eventually("the end marker accepted", || async {
        let (status, _) = api.post_raw("/broadcast", json!({"message": "end"})).await;
        (status == 200).then_some(())
    })
    .await;
    for (i, (client, terminal)) in terminals.iter_mut().enumerate() {
        let mut got = Vec::new();
        loop {
            let value = terminal.next_json().await;
            if value == json!("end") {
                break;
            }
            got.push(value["s"].as_u64().expect("a step") as usize);
        }
        assert!(
            got.windows(2).all(|w| w[0] < w[1]),
            "socket {i} (client {client}): out of order: {got:?}"
        );
        let uncertain = |s: usize| {
            matches!(step(s), Step::Channel)
                && changes
                    .iter()
                    .any(|&(c, at)| c == *client && s < at && at <= s + late_window)
        };
        let must: Vec<usize> = expected[i]
            .iter()
            .copied()
            .filter(|&s| !uncertain(s))
            .collect();
        let certain: Vec<usize> = got.iter().copied().filter(|&s| !uncertain(s)).collect();
        assert_eq!(certain, must, "socket {i} (client {client})");
    }
}

fn filtering() -> PluginDir {
    PluginDir::dropping(&["never-sent"])
}

#[tokio::test]
async fn order_holds_per_socket_across_four_shards_embedded() {
    let dir = filtering();
    let host = TestHost::start(Options {
        delivery_shards: Some(4),
        plugins: Some(dir.path().to_owned()),
        ..Options::default()
    })
    .await;
    every_socket_gets_its_own_messages_in_order(&host, 0).await;
}

#[tokio::test]
async fn order_holds_per_socket_across_four_shards_through_redis() {
    let redis = RedisServer::start().await;
    let dir = filtering();
    let plugins = dir.arg();
    let cluster = Cluster::start_with(
        &redis,
        1,
        &["--delivery-shards", "4", "--plugins", &plugins],
    )
    .await;
    every_socket_gets_its_own_messages_in_order(cluster.node(0), 5).await;
}

/// Members enough for the node to keep the channel's resolved audience
/// (`imhost::audience::CACHE_FROM`), and a few more.
const CROWD: ClientId = imhost::audience::CACHE_FROM as ClientId + 6;

/// One socket of the audience test and what it has been sent.
struct Seat {
    client: ClientId,
    terminal: Terminal,
}

/// Sends `text` to channel `crowd` from `sender` (or a broadcast when
/// `broadcast`, from the backend), and checks that exactly the seats `gets`
/// names receive it, each as its next message (the others are checked at
/// the end: nothing but the end marker may follow).
async fn send_and_check(
    api: &Api,
    seats: &mut [Seat],
    sender: ClientId,
    broadcast: bool,
    text: &str,
    gets: impl Fn(&Seat) -> bool,
) {
    if broadcast {
        api.ok("/broadcast", json!({"message": text})).await;
    } else {
        let body = json!({"sender": sender, "message": text});
        api.ok("/channels/crowd/messages", body).await;
    }
    for (i, seat) in seats.iter_mut().enumerate() {
        if gets(seat) {
            let got = seat.terminal.next_json().await;
            assert_eq!(got, json!(text), "seat {i} (client {})", seat.client);
        }
    }
}

/// A big channel's audience is resolved once and kept (see
/// `imhost::audience`); every change must still show at once: a socket that
/// comes, a member who joins or leaves, a socket that goes and comes back,
/// and FreeIM's echo rule for a sender with one socket or two; and a socket
/// of a client outside the channel does not make it resolve again.
///
/// `exact_counts`: embedded, the second of two messages with no change
/// between them must reuse the audience (the counters say so). Through
/// Redis the member list the node keeps is dropped when Redis's notice of
/// a membership change arrives, which may be after the first message.
async fn a_kept_audience_follows_every_change(api: &Api, exact_counts: bool) {
    let before = api.stats().await;
    let mut seats = Vec::new();
    for client in 1..=CROWD {
        seats.push(Seat {
            client,
            terminal: api.terminal(client).await,
        });
    }
    let everyone: Vec<ClientId> = (1..=CROWD).collect();
    api.ok("/channels/crowd/join", json!({"client_ids": everyone}))
        .await;
    let mut members: BTreeSet<ClientId> = (1..=CROWD).collect();

    // From a member with one socket: everyone else, twice (the second time
    // from the kept audience).
    for text in ["m1", "m2"] {
        send_and_check(api, &mut seats, 1, false, text, |s| s.client != 1).await;
    }
    if exact_counts {
        let after = api.stats().await;
        assert_eq!(after.audiences_resolved, before.audiences_resolved + 1);
        assert_eq!(after.audiences_reused, before.audiences_reused + 1, "kept");
    }
    // A second socket for client 2: the map changed, the members did not.
    seats.push(Seat {
        client: 2,
        terminal: api.terminal(2).await,
    });
    send_and_check(api, &mut seats, 0, false, "m3", |_| true).await;
    // Client 2 sends: with two sockets, both get the echo.
    send_and_check(api, &mut seats, 2, false, "m4", |_| true).await;
    // A newcomer joins and client 3 leaves.
    let newcomer = CROWD + 1;
    seats.push(Seat {
        client: newcomer,
        terminal: api.terminal(newcomer).await,
    });
    api.ok("/channels/crowd/join", json!({"client_ids": [newcomer]}))
        .await;
    api.ok("/channels/crowd/leave", json!({"client_ids": [3]}))
        .await;
    members.insert(newcomer);
    members.remove(&3);
    send_and_check(api, &mut seats, 0, false, "m5", |s| {
        members.contains(&s.client)
    })
    .await;
    // Client 4's only socket goes (and its membership with it), then it
    // comes back without joining: its new socket gets nothing of the channel.
    let at = seats.iter().position(|s| s.client == 4).expect("client 4");
    drop(seats.remove(at));
    imhost_tests::eventually("client 4 gone", || async {
        (api.client(4).await.connections == 0).then_some(())
    })
    .await;
    members.remove(&4);
    seats.push(Seat {
        client: 4,
        terminal: api.terminal(4).await,
    });
    send_and_check(api, &mut seats, 5, false, "m6", |s| {
        members.contains(&s.client) && s.client != 5
    })
    .await;
    // A socket of a client outside the channel comes: the channel's
    // audience is kept (embedded, the counters say so), and still right.
    let before = api.stats().await;
    let stranger = CROWD + 3;
    seats.push(Seat {
        client: stranger,
        terminal: api.terminal(stranger).await,
    });
    send_and_check(api, &mut seats, 5, false, "m7", |s| {
        members.contains(&s.client) && s.client != 5
    })
    .await;
    if exact_counts {
        let after = api.stats().await;
        assert_eq!(after.audiences_resolved, before.audiences_resolved);
        assert_eq!(after.audiences_reused, before.audiences_reused + 1, "kept");
    }
    // Broadcasts (from the backend: sender 0) reach every socket, the
    // second from the kept audience, and then one that came since.
    send_and_check(api, &mut seats, 0, true, "b1", |_| true).await;
    send_and_check(api, &mut seats, 0, true, "b2", |_| true).await;
    seats.push(Seat {
        client: CROWD + 2,
        terminal: api.terminal(CROWD + 2).await,
    });
    send_and_check(api, &mut seats, 0, true, "b3", |_| true).await;

    api.ok("/broadcast", json!({"message": "end"})).await;
    for (i, seat) in seats.iter_mut().enumerate() {
        let next = seat.terminal.next_json().await;
        assert_eq!(next, json!("end"), "seat {i} (client {})", seat.client);
    }
}

#[tokio::test]
async fn a_kept_audience_follows_every_change_embedded() {
    let host = TestHost::start(Options {
        delivery_shards: Some(4),
        ..Options::default()
    })
    .await;
    a_kept_audience_follows_every_change(&host, true).await;
}

#[tokio::test]
async fn a_kept_audience_follows_every_change_through_redis() {
    let redis = RedisServer::start().await;
    let cluster = Cluster::start_with(&redis, 1, &["--delivery-shards", "4"]).await;
    a_kept_audience_follows_every_change(cluster.node(0), false).await;
}

/// Senders at once, and messages each sends at most.
const SENDERS: usize = 16;
const PER_SENDER: usize = 200;

/// Floods a channel of 40 reading terminals from 16 senders at once:
/// whatever the node accepted (200) reaches every terminal, each sender's
/// messages in order, and nothing else; what it refused was a 503
/// `overloaded` with `Retry-After`. Returns how many sends were refused.
async fn flood(api: &Api) -> usize {
    const MEMBERS: ClientId = 40;
    let mut terminals = Vec::new();
    for client in 1..=MEMBERS {
        terminals.push(api.terminal(client).await);
    }
    let members: Vec<ClientId> = (1..=MEMBERS).collect();
    api.ok("/channels/flood/join", json!({"client_ids": members}))
        .await;
    // Every terminal reads all along (a terminal that stops reading is a
    // slow consumer, another test's business), until "end".
    let mut readers = tokio::task::JoinSet::new();
    for (i, mut terminal) in terminals.into_iter().enumerate() {
        readers.spawn(async move {
            let mut seen = Vec::new();
            loop {
                let value = terminal.next_json().await;
                if value == json!("end") {
                    return (i, seen);
                }
                let from = value["from"].as_u64().expect("from") as usize;
                let n = value["n"].as_u64().expect("n") as usize;
                seen.push((from, n));
            }
        });
    }

    let mut senders = tokio::task::JoinSet::new();
    for sender in 0..SENDERS {
        let api = api.clone();
        senders.spawn(async move {
            let mut accepted = Vec::new();
            let mut refused = 0;
            for n in 0..PER_SENDER {
                let response = api
                    .http
                    .post(api.url("/api/v1/channels/flood/messages"))
                    .bearer_auth(API_KEY)
                    .json(&json!({"sender": 0, "message": {"from": sender, "n": n}}))
                    .send()
                    .await
                    .expect("request");
                match response.status().as_u16() {
                    200 => accepted.push(n),
                    503 => {
                        let retry = response.headers().get("retry-after").cloned();
                        let body: Value = response.json().await.expect("json");
                        assert_eq!(body["error"]["code"], "overloaded", "{body}");
                        assert!(retry.is_some(), "503 without Retry-After");
                        refused += 1;
                    }
                    other => panic!("unexpected status {other}"),
                }
            }
            (sender, accepted, refused)
        });
    }
    let mut accepted: Vec<Vec<usize>> = vec![Vec::new(); SENDERS];
    let mut refused = 0;
    while let Some(done) = senders.join_next().await {
        let (sender, ok, no) = done.expect("sender");
        accepted[sender] = ok;
        refused += no;
    }
    let total: usize = accepted.iter().map(Vec::len).sum();
    assert!(total > 0, "the node accepted nothing");
    // The node may still be draining its backlog: a 503 `overloaded` says
    // retry later, so the end marker is sent until it is taken (and its
    // refusals are counted with the senders').
    let marker_refused = std::sync::atomic::AtomicUsize::new(0);
    imhost_tests::eventually("the end marker accepted", || async {
        let (status, _) = api.post_raw("/broadcast", json!({"message": "end"})).await;
        if status == 503 {
            marker_refused.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        (status == 200).then_some(())
    })
    .await;
    refused += marker_refused.into_inner();

    // Every terminal got every accepted message, each sender's in order,
    // and nothing else; none was cut off.
    while let Some(done) = tokio::time::timeout(imhost_tests::DEADLINE, readers.join_next())
        .await
        .expect("every terminal reached the end")
    {
        let (i, seen) = done.expect("reader");
        assert_eq!(seen.len(), total, "terminal {i}: every accepted message");
        let mut next = [0usize; SENDERS];
        for (from, n) in seen {
            assert_eq!(
                accepted[from].get(next[from]),
                Some(&n),
                "terminal {i}: sender {from}'s accepted messages in order"
            );
            next[from] += 1;
        }
    }
    refused
}

// Several worker threads: the node's request handlers must run side by
// side for one to find the backlog taken by another.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_overloaded_node_answers_503_and_delivers_everything_it_accepted() {
    // One delivery of backlog: while one message waits for its shard, the
    // node has no room for another.
    let host = TestHost::start(Options {
        delivery_shards: Some(1),
        delivery_backlog: Some(1),
        ..Options::default()
    })
    .await;
    let refused = flood(&host).await;
    assert!(refused > 0, "the node never pushed back");
    let stats = host.stats().await;
    assert_eq!(stats.slow_consumers_closed, 0, "no terminal was cut off");
    assert_eq!(
        stats.sends_refused_overloaded, refused as u64,
        "every 503 counted"
    );
}

/// Through Redis, a node whose backlog is full stops taking messages from
/// its subscriber until there is room (Redis holds them meanwhile), and
/// loses none of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_behind_on_redis_messages_waits_for_room_and_loses_none() {
    let redis = RedisServer::start().await;
    let cluster = Cluster::start_with(
        &redis,
        1,
        &["--delivery-shards", "1", "--delivery-backlog", "1"],
    )
    .await;
    let api = cluster.node(0);
    flood(api).await;
    let stats = api.stats().await;
    assert!(
        stats.dispatch_backlog_waits > 0,
        "the dispatcher never waited for room: {stats:?}"
    );
    assert_eq!(stats.slow_consumers_closed, 0, "no terminal was cut off");
}
