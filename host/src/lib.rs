//! imhost: a clustered WebSocket IM server in the shape of FreeIM, extended by
//! WebAssembly plugins.
//!
//! Terminals hold a WebSocket to a node; the business backend asks any node,
//! over HTTP, to deliver; nodes relay to each other (in process when embedded).
//!
//! # Layout
//! - [`config`] — flags, `IMHOST_*` variables and the TOML file, merged and checked.
//! - [`server`] — wires a node together and runs it until shutdown.
//! - [`node`] — the handles every task of a node shares.
//! - [`ws`] — the terminal side: connect, and one task per socket.
//! - [`registry`] — local sockets by client id, each with a bounded outbound queue.
//! - [`dispatch`] — applies FreeIM's delivery rules to what arrives for this node.
//! - [`audience`] — who a channel message or broadcast reaches here, resolved once per change.
//! - [`shards`] — writes to the sockets, in order per socket, on every core, within a bounded backlog.
//! - [`business`] — the operations a backend asks for (FreeIM's `ImHelper`).
//! - [`http`] — the business API, the event stream and the demo page.
//! - [`cluster`] — the relay and presence traits and their implementations.
//! - [`plugins`] — WebAssembly plugins: runtime, hooks, hot reload.
//! - [`shutdown`] — how tasks learn the node is stopping.
//! - [`stats`] — counters.
//! - [`status`] — the reports behind the live status page.
//! - [`token`] — connect tokens.
#![warn(clippy::print_stdout)]

pub mod audience;
pub mod business;
pub mod cluster;
pub mod config;
pub mod dispatch;
pub mod http;
pub mod metrics;
pub mod node;
pub mod plugins;
pub mod registry;
pub mod server;
pub mod shards;
pub mod shutdown;
pub mod stats;
pub mod status;
pub mod token;
pub mod ws;
