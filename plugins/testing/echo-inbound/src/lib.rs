//! Test guest: an inbound chat handler. `ping` is answered `"pong"` on the
//! same socket; `{"to":[ids],"text":…}` is delivered to those clients and
//! `{"chan":name,"text":…}` to a channel, as `{"from":id,"text":…}`;
//! `{"repeat":n}` is answered with a JSON string of n bytes; anything else
//! is ignored.

use imhost_sdk::Target;
use imhost_sdk::inbound::{Action, Delivery, Frame, Inbound};
use serde_json::{Value, json};

struct EchoInbound;

impl Inbound for EchoInbound {
    fn handle(frame: Frame) -> Action {
        if frame.text == "ping" {
            return Action::Reply("\"pong\"".into());
        }
        let Ok(value) = serde_json::from_str::<Value>(&frame.text) else {
            return Action::Ignore;
        };
        if let Some(n) = value["repeat"].as_u64() {
            // A reply of n bytes (a JSON string), for the size limits.
            return Action::Reply(json!("x".repeat(n as usize)).to_string());
        }
        let content = json!({"from": frame.client_id, "text": value["text"]}).to_string();
        if let Some(ids) = value["to"].as_array() {
            let ids = ids.iter().filter_map(Value::as_i64).collect();
            return Action::Deliver(Delivery {
                target: Target::Direct(ids),
                content,
            });
        }
        if let Some(chan) = value["chan"].as_str() {
            return Action::Deliver(Delivery {
                target: Target::Channel(chan.to_owned()),
                content,
            });
        }
        Action::Ignore
    }
}

imhost_sdk::export_inbound!(EchoInbound);
