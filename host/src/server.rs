//! Wires a node together and runs it until shutdown.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::{Semaphore, broadcast, mpsc};
use tracing::{info, warn};

use crate::business::Outbox;
use crate::cluster::Backends;
use crate::cluster::Topology;
use crate::cluster::embedded::{EmbeddedPresence, EmbeddedRelay};
use crate::cluster::kv::EmbeddedKv;
use crate::config::{Config, WS_PATH};
use crate::node::{Inner, Node};
use crate::plugins::compile::Compiler;
use crate::plugins::{LoaderConfig, PluginHost};
use crate::registry::Registry;
use crate::shards::Shards;
use crate::shutdown::Shutdown;
use crate::stats::Stats;

/// Connections ramp up faster than tokio's default backlog of 128 drains; an
/// overflowing backlog adds a one-second SYN retry to a connect.
const LISTEN_BACKLOG: u32 = 4096;
/// Messages waiting for this node's dispatcher before publishers wait.
const INBOX_BOUND: usize = 4096;
/// Presence events a slow SSE subscriber may fall behind before it skips.
const EVENTS_BOUND: usize = 4096;
/// File descriptors kept back from the connection cap for Redis, plugins, logs.
const RESERVED_FDS: u64 = 100;

/// Binds `addr` with a listen backlog fit for connection bursts.
///
/// # Errors
/// The address cannot be bound.
pub fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.set_nodelay(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// How many sockets the open-file limit lets this process hold.
pub fn connection_capacity() -> usize {
    let soft = rlimit::getrlimit(rlimit::Resource::NOFILE)
        .map(|(soft, _)| soft)
        .unwrap_or(1024);
    usize::try_from(soft.saturating_sub(RESERVED_FDS).max(1)).unwrap_or(usize::MAX)
}

/// Runs a node on `listener` until `shutdown` resolves, then closes every
/// socket with 1001, publishes their offline events and returns.
///
/// # Errors
/// The configuration asks for something this node cannot do, or serving fails.
pub async fn run(
    listener: TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let local = listener.local_addr().context("listener has no address")?;
    let max_connections = config
        .limits
        .max_connections
        .unwrap_or_else(connection_capacity);
    let stats = Arc::new(Stats::default());
    let stop = Shutdown::new();
    let (inbox_tx, inbox) = mpsc::channel(INBOX_BOUND);
    let (events, _) = broadcast::channel(EVENTS_BOUND);
    let topology = Topology {
        me: config.server.clone(),
        servers: config.servers.clone(),
    };
    let mut embedded_relay = None;
    let connect = match (&config.redis, config.redis_cluster.is_empty()) {
        (Some(url), _) => Some(crate::cluster::redis::Connect::Standalone(url.clone())),
        (None, false) => Some(crate::cluster::redis::Connect::Cluster(
            config.redis_cluster.clone(),
        )),
        (None, true) => None,
    };
    let backends = match connect.clone() {
        None => {
            let relay = Arc::new(EmbeddedRelay::new(inbox_tx, events.clone()));
            embedded_relay = Some(relay.clone());
            Backends {
                relay,
                presence: Arc::new(EmbeddedPresence::new()),
                kv: Arc::new(EmbeddedKv::default()),
            }
        }
        Some(connect) => {
            crate::cluster::redis::start(crate::cluster::redis::Setup {
                connect,
                topology: topology.clone(),
                inbox: inbox_tx,
                events: events.clone(),
                stats: stats.clone(),
                shutdown: stop.clone(),
                node_ttl: config.limits.node_ttl,
            })
            .await?
        }
    };
    let mode = match &connect {
        Some(crate::cluster::redis::Connect::Cluster(_)) => "cluster (Redis Cluster)",
        Some(_) => "cluster",
        None => "embedded",
    };
    let outbox = Outbox {
        topology: topology.clone(),
        relay: backends.relay.clone(),
        max_content_bytes: config.limits.max_body_bytes,
    };
    let plugins = Arc::new(PluginHost::new(
        LoaderConfig {
            dir: config.plugins.clone(),
            cache_dir: config.plugin_cache.clone(),
            compiler: Compiler::for_this_process(),
            tiered: config.plugin_tiering,
            cache_keep: config.plugin_cache_keep,
            grants_file: config.plugin_grants.clone(),
        },
        backends.kv.clone(),
        Some(Arc::new(outbox.clone())),
        stats.clone(),
    ));
    let metrics = Arc::new(crate::metrics::Metrics::new(stats.clone(), plugins.clone()));
    if connect.is_some() {
        tokio::spawn(crate::metrics::run_redis_probe(
            metrics.clone(),
            backends.presence.clone(),
            stop.drained().clone(),
        ));
    }
    let shard_count = match config.limits.delivery_shards {
        0 => tokio::runtime::Handle::current().metrics().num_workers(),
        n => n,
    };
    let registry = Registry::new(config.limits.outbound_queue, shard_count, stats.clone());
    let (shards, shard_queues) = Shards::new(
        shard_count,
        config.limits.delivery_backlog,
        registry.clone(),
    );
    shards.spawn(shard_queues, stop.drained().clone());
    let node = Node::new(Inner {
        metrics,
        topology,
        registry,
        shards,
        presence: backends.presence,
        relay: backends.relay,
        events,
        stats,
        plugins: plugins.clone(),
        shutdown: stop.clone(),
        connection_slots: Arc::new(Semaphore::new(max_connections)),
        connect_rate: crate::ws::connect_rate::ConnectRate::new(
            config.limits.connect_rate_per_address,
            config.connect_rate_exempt.clone(),
        ),
        outbox,
        max_connections,
        config,
        status: crate::status::Board::default(),
    });

    if let Some(relay) = embedded_relay {
        relay.attach(Arc::new(crate::dispatch::Inline::new(&node)));
    }

    // Plugins load in the background: the node serves at once, `/readyz`
    // says when they are all active, and connects wait for auth plugins.
    tokio::spawn({
        let plugins = plugins.clone();
        async move {
            for (name, error) in plugins.reload().await {
                warn!(plugin = %name, %error, "plugin not loaded at start-up");
            }
        }
    });
    tokio::spawn(plugins.clone().run_events(stop.drained().clone()));
    if node.config.watch_plugins {
        tokio::spawn(crate::plugins::watcher::run(
            plugins.clone(),
            stop.drained().clone(),
        ));
    }
    spawn_reload_on_sighup(plugins.clone(), stop.drained().clone());
    tokio::spawn(crate::ws::heartbeat::run(
        node.registry.clone(),
        node.stats.clone(),
        node.config.limits.heartbeat_interval,
        node.config.limits.heartbeat_timeout,
        stop.stopping().clone(),
    ));
    tokio::spawn(crate::status::run(node.clone(), stop.drained().clone()));
    let dispatcher = tokio::spawn(crate::dispatch::run(node.clone(), inbox));
    let app = crate::http::router(node.clone());
    let limits = crate::http::listener::ListenerLimits {
        max_open: node
            .config
            .limits
            .max_http_connections
            .unwrap_or_else(connection_capacity),
        max_per_address: node.config.limits.max_connections_per_address,
        header_read_timeout: node.config.limits.header_read_timeout,
        tls: node.config.tls.clone(),
    };
    if let Some(addr) = node.config.metrics_listen {
        let listener =
            bind(addr).with_context(|| format!("cannot listen on {addr} (metrics_listen)"))?;
        let router = crate::http::metrics_router(node.clone());
        let stopping = stop.stopping().clone();
        info!("metrics on http://{addr}/metrics");
        tokio::spawn(async move {
            let served = axum::serve(listener, router)
                .with_graceful_shutdown(stopping.cancelled_owned())
                .await;
            if let Err(err) = served {
                warn!(cause = %err, "the metrics listener failed");
            }
        });
    }
    let mut server = tokio::spawn(crate::http::listener::serve(
        listener,
        app,
        limits,
        node.stats.clone(),
        stop.stopping().clone(),
    ));

    // One line a person reads; the same facts as fields would only repeat it.
    info!(
        demo = node.config.demo,
        "imhost serving on {http}://{local} (WebSocket {ws}://{local}{WS_PATH}), {mode} mode as {}, up to {max_connections} connections",
        node.config.server,
        http = if node.config.tls.is_some() {
            "https"
        } else {
            "http"
        },
        ws = if node.config.tls.is_some() {
            "wss"
        } else {
            "ws"
        },
    );
    if node.config.demo_public {
        warn!(
            "DEMO ON A PUBLIC ADDRESS: /demo/api sends as anyone without an API key; never do this in production"
        );
    }
    if node
        .config
        .server
        .parse::<std::net::SocketAddr>()
        .is_ok_and(|addr| addr.ip().is_unspecified())
    {
        warn!(
            server = %node.config.server,
            "connect URLs will name {}, which terminals cannot reach: set `server` (--server) to the host:port they connect to",
            node.config.server
        );
    }
    if node.config.api_key_generated {
        warn!(api_key = %node.config.api_key, "no api_key configured; generated one for this run");
    }

    tokio::select! {
        () = shutdown => info!("shutting down"),
        joined = &mut server => {
            stop.drain(node.config.limits.shutdown_grace).await;
            joined.context("HTTP accept loop failed")?;
            anyhow::bail!("HTTP accept loop ended on its own");
        }
    }
    // One deadline for the whole drain: sockets first (their offline events
    // reach SSE subscribers), then HTTP requests in flight, in what is left.
    let grace = node.config.limits.shutdown_grace;
    let deadline = tokio::time::Instant::now() + grace;
    if !stop.drain(grace).await {
        warn!(
            ?grace,
            "sockets still open after the grace period; exiting anyway"
        );
    }
    let drained_http = async {
        if let Ok(connections) = server.await {
            connections.wait().await;
        }
    };
    if tokio::time::timeout_at(deadline, drained_http)
        .await
        .is_err()
    {
        warn!("HTTP connections still open after the grace period; exiting anyway");
    }
    let _ = dispatcher.await;
    info!("stopped");
    Ok(())
}

/// SIGHUP reloads the plugins, as `POST /api/v1/plugins/reload` does.
fn spawn_reload_on_sighup(plugins: Arc<PluginHost>, stop: tokio_util::sync::CancellationToken) {
    #[cfg(unix)]
    tokio::spawn(async move {
        let Ok(mut hangups) =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        else {
            warn!("cannot listen for SIGHUP");
            return;
        };
        loop {
            tokio::select! {
                got = hangups.recv() => if got.is_none() { return },
                () = stop.cancelled() => return,
            }
            info!("SIGHUP: reloading plugins");
            plugins.reload().await;
        }
    });
}
