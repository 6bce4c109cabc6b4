//! `imhost-client`: what a business backend needs to talk to an imhost cluster.
//!
//! imhost re-designs FreeIM; a backend never talks to terminals, it asks the
//! cluster to deliver. This crate holds the one copy of every shape that crosses
//! a process boundary, so the host and the backends cannot drift apart.
//!
//! # Layout
//! - [`wire`] — FreeIM v2 over Redis, byte for byte: key names, the value-tuple JSON,
//!   the `__FreeIM__(…)` control messages, partitioning of clients over nodes.
//! - [`buckets`] — channels and presence spread over a Redis Cluster's slots: each side
//!   of a membership changed on its own, in an order that keeps failures harmless.
//! - [`helper`] — [`helper::ImHelper`], FreeIM's `ImHelper` over Redis, in async Rust.
//! - [`api`] — request and response bodies of the business HTTP API (`/api/v1/…`).
//! - `http` (feature `http`) — `http::ApiClient`, that API from Rust over HTTP/1.1 or
//!   h2c, with batches and the node's push-back (503 `overloaded`) told apart.
#![warn(clippy::print_stdout)]

pub mod api;
pub mod buckets;
pub mod conn;
pub mod helper;
#[cfg(feature = "http")]
pub mod http;
pub mod wire;

/// A client (a user of the business system) as FreeIM numbers it: a .NET `long`.
/// One client may hold several sockets (devices).
pub type ClientId = i64;
