//! Black-box tests of imhost: real servers, real WebSocket and HTTP clients.
//! One test binary (wasmtime's `tests/all` layout) so everything links once.

mod api;
mod batch;
mod browser;
mod cluster;
mod connect;
mod delivery;
mod deploy;
mod frames;
mod hardening;
mod js_client;
mod languages;
mod lifecycle;
mod limits;
mod metrics;
mod plugins;
mod redis_cluster;
mod shards;
mod status;
mod tls;
