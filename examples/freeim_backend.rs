//! Run with `cargo run -p imhost-examples --example freeim-backend -- --redis redis://127.0.0.1:6380/ --servers 127.0.0.1:7001,127.0.0.1:7002,127.0.0.1:7003`
//! against the 3-node cluster of docs/cluster.md.
//!
//! A business backend that talks to an imhost cluster the way a FreeIM backend
//! talks to FreeIM: straight through Redis with `ImHelper` (here its Rust twin,
//! `imhost_client::helper::ImHelper`). It prints connect URLs for two users,
//! follows the event bus, puts every user who comes online into the `lobby`
//! channel, greets them there, and answers each arrival with a direct message
//! asking for a receipt. Open the printed URLs with any WebSocket client
//! (e.g. `websocat`) to see it work.

use clap::Parser;
use futures_util::StreamExt;
use imhost_client::helper::{EventKind, ImHelper};
use serde_json::json;

#[derive(Parser)]
struct Args {
    /// The cluster's Redis.
    #[arg(long, default_value = "redis://127.0.0.1:6380/")]
    redis: String,
    /// Every node, in the same order as the nodes' own `--servers`.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "127.0.0.1:7001,127.0.0.1:7002,127.0.0.1:7003"
    )]
    servers: Vec<String>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let helper = ImHelper::connect(&args.redis, args.servers, "/ws").await?;
    for (user, name) in [(1001, "alice"), (1002, "bob")] {
        let url = helper.prev_connect_server(user, Some(name.into())).await?;
        println!("{name} (client {user}) may connect within 10 s: {url}");
    }

    let mut events = Box::pin(helper.event_bus().await?);
    println!("following online/offline events (Ctrl-C to stop)");
    while let Some(event) = events.next().await {
        let client = event.client.client_id;
        let name = event
            .client
            .metadata
            .clone()
            .unwrap_or_else(|| client.to_string());
        match event.kind {
            EventKind::Online => {
                println!("{name} came online");
                helper.join_chan("lobby", &[client]).await?;
                helper
                    .send_chan_message(0, "lobby", &json!({"type": "joined", "who": name}))
                    .await?;
                // Sender 0 is the system: receipts go to a real sender, so the
                // backend sends as a service account (client 1).
                helper
                    .send_message(
                        1,
                        &[client],
                        &json!({"type": "hello", "text": format!("hi {name}")}),
                        true,
                    )
                    .await?;
                let online = helper.get_chan_online("lobby").await?;
                println!("lobby has {online} member(s)");
            }
            EventKind::Offline => println!("{name} went offline"),
        }
    }
    println!("event bus connection lost");
    Ok(())
}
