//! Counters a node keeps about itself, readable at `GET /api/v1/stats`.
//!
//! Plain relaxed atomics: each is an independent tally, read for monitoring and
//! tests, never used to make decisions that need ordering with other memory.

use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;

macro_rules! counters {
    ($( $(#[doc = $doc:literal])* $name:ident ),* $(,)?) => {
        /// Monotonic counters, except `connections` which is a gauge.
        #[derive(Debug, Default)]
        pub struct Stats {
            $( $(#[doc = $doc])* pub $name: AtomicU64, )*
        }

        impl Stats {
            /// Every counter: its name, what it counts (its doc comment) and
            /// its value now, for `/metrics`.
            pub fn each(&self) -> Vec<(&'static str, &'static str, u64)> {
                vec![ $( (stringify!($name), concat!($($doc),*), self.$name.load(Ordering::Relaxed)) ),* ]
            }
        }

        /// A point-in-time copy of [`Stats`], as served by the API.
        #[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq, Eq)]
        pub struct StatsSnapshot {
            $( $(#[doc = $doc])* pub $name: u64, )*
        }

        impl Stats {
            pub fn snapshot(&self) -> StatsSnapshot {
                StatsSnapshot { $( $name: self.$name.load(Ordering::Relaxed), )* }
            }
        }
    };
}

counters! {
    /// Sockets open now.
    connections,
    /// Sockets accepted since start.
    connections_opened,
    /// Connect attempts refused (unknown, expired or replayed token).
    connects_refused,
    /// Connect attempts refused because the node was full.
    connects_over_capacity,
    /// Text frames queued to sockets (one per socket per message).
    frames_queued,
    /// Sockets closed because their outbound queue was full.
    slow_consumers_closed,
    /// Sockets closed because they stopped answering pings.
    heartbeat_timeouts,
    /// Sockets closed because a terminal sent a message over the size limit.
    oversize_closed,
    /// Sockets closed by force-offline.
    forced_offline,
    /// Terminal frames received and ignored (no inbound handler).
    inbound_ignored,
    /// Node commands that could not be acted on (bad payload, store error).
    dispatch_errors,
    /// Messages a filter plugin dropped.
    filtered_dropped,
    /// Messages a filter plugin replaced.
    filtered_replaced,
    /// Connects an auth plugin refused.
    auth_denied,
    /// Terminal frames an inbound plugin acted on.
    inbound_handled,
    /// Presence events the events plugins' queue had no room for.
    plugin_events_dropped,
    /// Failed accepts (mostly: out of file descriptors).
    accept_errors,
    /// Connections closed on arrival because the HTTP connection cap was reached.
    connections_refused_at_cap,
    /// Connections closed on arrival because their address held its share.
    connections_refused_per_address,
    /// Publishes that found no node listening and were retried.
    publish_retries,
    /// API calls answered 503 because a node was not listening.
    publish_unheard,
    /// Sends answered 503 `overloaded`: the delivery backlog was full.
    sends_refused_overloaded,
    /// Deliveries of the Redis dispatcher that waited for room in the backlog.
    dispatch_backlog_waits,
    /// Channel messages and broadcasts whose sockets were looked up in the map.
    audiences_resolved,
    /// Channel messages and broadcasts that reused a kept audience.
    audiences_reused,
    /// Pings answered by a pong already waiting for the kernel instead of one more.
    pongs_coalesced,
    /// Connects answered 503: no auth plugin instance was free in time.
    connects_auth_busy,
    /// Inbound plugin replies over `max_body_bytes`, dropped.
    oversize_replies,
    /// Sockets closed with 1002 or 1007 because the terminal broke the protocol.
    protocol_errors,
    /// Connects refused with 429: their address was over `connect_rate_per_address`.
    connects_rate_limited,
    /// Connects refused with 503 while an auth plugin was still loading.
    connects_plugins_loading,
    /// TLS handshakes that failed or timed out (`tls_cert` set).
    tls_handshakes_failed,
    /// Keep-alive probes (empty text frames) terminals sent and the node answered.
    keepalive_probes,
    /// HTTP requests the host sent for plugins (http-fetch and key sets).
    plugin_http_requests,
    /// Plugin HTTP requests answered from the host's cache.
    plugin_http_cached,
    /// Plugin HTTP requests refused: off the list, internal address, redirect off the list, circuit open, too many.
    plugin_http_refused,
    /// Plugin HTTP requests that failed: timeout, response over the cap, connection.
    plugin_http_failed,
    /// Key-set (JWKS) fetches started.
    key_set_fetches,
    /// Key-set fetches that failed (the cached copy, if any, kept serving).
    key_set_fetch_failures,
    /// Redis Cluster: times this node subscribed to its shard channel again (after an SUNSUBSCRIBE, a disconnection, or a watchdog ping that did not come back).
    shard_resubscribes,
    /// Redis Cluster: copies of a delivery this node had already handed out (a publisher's retry), dropped.
    shard_duplicates_dropped,
}

impl Stats {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub fn incr(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }

    pub fn decr(counter: &AtomicU64) {
        counter.fetch_sub(1, Ordering::Relaxed);
    }
}
