//! Configuration: command-line flags beat `IMHOST_*` variables, which beat the
//! TOML file given by `--config`, which beats the built-in defaults (SPEC section 1).
//!
//! clap already resolves "flag beats variable" for each [`Options`] field; this
//! module lays the file underneath, fills in defaults and checks the result, so a
//! bad setting stops start-up with a message that names the key.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use serde::Deserialize;
use tokio_rustls::rustls;

/// The WebSocket path terminals connect to. FreeIM derives its Redis prefix from
/// it, so it is fixed rather than configurable.
pub const WS_PATH: &str = "/ws";

/// Declares [`Options`] from one list of settings: each written once, with
/// its flag, variable, help and TOML key, and merged layer over layer by the
/// generated [`Options::or`] (as `stats.rs` declares its counters).
macro_rules! options {
    ($( $(#[$attr:meta])* $name:ident: $ty:ty, )*) => {
        /// Every setting, each optional so that layers can be merged. The same struct is
        /// the clap flag set and the TOML file schema, so the two cannot drift.
        #[derive(Debug, Default, Clone, Args, Deserialize)]
        #[serde(deny_unknown_fields)]
        pub struct Options {
            $( $(#[$attr])* pub $name: Option<$ty>, )*
        }

        impl Options {
            /// `self` where set, else `lower`.
            pub fn or(self, lower: Options) -> Options {
                Options { $( $name: self.$name.or(lower.$name), )* }
            }
        }
    };
}

options! {
    /// Address to listen on for HTTP and WebSocket. [default: 127.0.0.1:6001]
    #[arg(
        long,
        help_heading = "Node",
        env = "IMHOST_LISTEN",
        value_name = "ADDR"
    )]
    listen: SocketAddr,
    /// This node's name in the cluster. [default: the listen address]
    #[arg(
        long,
        help_heading = "Cluster",
        env = "IMHOST_SERVER",
        value_name = "NAME"
    )]
    server: String,
    /// Every node of the cluster, in the same order on every node. [default: this node
    /// alone]
    #[arg(
        long,
        help_heading = "Cluster",
        env = "IMHOST_SERVERS",
        value_name = "A,B,C",
        value_delimiter = ','
    )]
    servers: Vec<String>,
    /// Redis URL; without it the node runs embedded (no cluster). [default: none:
    /// embedded mode]
    #[arg(
        long,
        help_heading = "Cluster",
        env = "IMHOST_REDIS",
        value_name = "URL"
    )]
    redis: String,
    /// Redis Cluster seed URLs (some of its nodes): nodes share a Redis
    /// Cluster over sharded pub/sub, with imhost-native keys (not readable by
    /// FreeIM's .NET helper). [default: none]
    #[arg(
        long,
        help_heading = "Cluster",
        env = "IMHOST_REDIS_CLUSTER",
        value_name = "URL,URL",
        value_delimiter = ','
    )]
    redis_cluster: Vec<String>,
    /// Bearer key the business API requires; a random one is made when absent.
    /// [default: random, logged at start-up]
    #[arg(
        long,
        help_heading = "Node",
        env = "IMHOST_API_KEY",
        value_name = "KEY"
    )]
    api_key: String,
    /// Directory of WebAssembly plugins. [default: none]
    #[arg(
        long,
        help_heading = "Plugins",
        env = "IMHOST_PLUGINS",
        value_name = "DIR"
    )]
    plugins: PathBuf,
    /// Where compiled plugins are cached (owner-only; outside the plugin
    /// directory). [default: $XDG_CACHE_HOME/imhost/plugins or ~/.cache/imhost/plugins]
    #[arg(
        long,
        help_heading = "Plugins",
        env = "IMHOST_PLUGIN_CACHE",
        value_name = "DIR"
    )]
    plugin_cache: PathBuf,
    /// Compiled plugins kept in the cache besides the running ones. [default: 8]
    #[arg(
        long,
        help_heading = "Plugins",
        env = "IMHOST_PLUGIN_CACHE_KEEP",
        value_name = "N"
    )]
    plugin_cache_keep: usize,
    /// The operator's grants file: what each plugin may touch (variables,
    /// directories, host actions, key sets, HTTP origins, raw network),
    /// outside the plugin directory;
    /// read at start and at every reload. [default: none: nothing granted]
    #[arg(
        long,
        help_heading = "Plugins",
        env = "IMHOST_PLUGIN_GRANTS",
        value_name = "FILE"
    )]
    plugin_grants: PathBuf,
    /// Serve a new plugin from the fast baseline compiler first, then swap in the
    /// optimized build. [default: true]
    #[arg(long, help_heading = "Plugins", env = "IMHOST_PLUGIN_TIERING", num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
    plugin_tiering: bool,
    /// Watch the plugin directory and reload on changes; without it, reload with SIGHUP
    /// or `POST /api/v1/plugins/reload`. [default: true]
    #[arg(long, help_heading = "Plugins", env = "IMHOST_WATCH_PLUGINS", num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
    watch_plugins: bool,
    /// Serve the demo chat page at `/` with its toy business backend (no API key:
    /// anyone who reaches it can send as anyone). Refused on a listen address that is
    /// not loopback, unless `demo_public` is set too. [default: false]
    #[arg(long, help_heading = "Node", env = "IMHOST_DEMO", num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
    demo: bool,
    /// Allow `demo` on a non-loopback listen address (dangerous; logged). [default:
    /// false]
    #[arg(long, help_heading = "Node", env = "IMHOST_DEMO_PUBLIC", num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
    demo_public: bool,
    /// Largest message a terminal may send, in bytes (closes the socket with 1009).
    /// [default: 65536]
    #[arg(
        long,
        help_heading = "Terminals",
        env = "IMHOST_MAX_FRAME_BYTES",
        value_name = "BYTES"
    )]
    max_frame_bytes: usize,
    /// Messages queued per socket before the socket counts as a slow consumer.
    /// [default: 256]
    #[arg(
        long,
        help_heading = "Terminals",
        env = "IMHOST_OUTBOUND_QUEUE",
        value_name = "MESSAGES"
    )]
    outbound_queue: usize,
    /// Delivery shards: each writes to its share of the sockets, in order per
    /// socket, on a task of its own. 0: one per worker thread. [default: 0]
    #[arg(
        long,
        help_heading = "Delivery",
        env = "IMHOST_DELIVERY_SHARDS",
        value_name = "N"
    )]
    delivery_shards: usize,
    /// Deliveries (one message to one socket) the node queues before the API
    /// answers 503 `overloaded` and the Redis subscriber stops reading.
    /// [default: 524288]
    #[arg(
        long,
        help_heading = "Delivery",
        env = "IMHOST_DELIVERY_BACKLOG",
        value_name = "DELIVERIES"
    )]
    delivery_backlog: usize,
    /// How often the server pings each socket. [default: 20s]
    #[arg(long, help_heading = "Terminals", env = "IMHOST_HEARTBEAT_INTERVAL", value_name = "DURATION", value_parser = humantime::parse_duration)]
    #[serde(default, with = "humantime_option")]
    heartbeat_interval: Duration,
    /// Silence after which a socket is closed and counted offline. [default: 60s]
    #[arg(long, help_heading = "Terminals", env = "IMHOST_HEARTBEAT_TIMEOUT", value_name = "DURATION", value_parser = humantime::parse_duration)]
    #[serde(default, with = "humantime_option")]
    heartbeat_timeout: Duration,
    /// How long a connect token stays valid. [default: 10s]
    #[arg(long, help_heading = "Terminals", env = "IMHOST_TOKEN_TTL", value_name = "DURATION", value_parser = humantime::parse_duration)]
    #[serde(default, with = "humantime_option")]
    token_ttl: Duration,
    /// Sockets this node accepts at once. [default: open-file limit - 100]
    #[arg(
        long,
        help_heading = "Terminals",
        env = "IMHOST_MAX_CONNECTIONS",
        value_name = "N"
    )]
    max_connections: usize,
    /// Largest business API request body, in bytes. [default: 1048576]
    #[arg(
        long,
        help_heading = "HTTP",
        env = "IMHOST_MAX_BODY_BYTES",
        value_name = "BYTES"
    )]
    max_body_bytes: usize,
    /// Most items in one `POST /api/v1/batch` (each a send with its own
    /// result; the body limit applies too). [default: 1000]
    #[arg(
        long,
        help_heading = "HTTP",
        env = "IMHOST_MAX_BATCH_ITEMS",
        value_name = "N"
    )]
    max_batch_items: usize,
    /// How long a node's liveness key lives without a refresh (cluster mode): a node
    /// silent this long is taken for dead and its clients go offline. [default: 15s]
    #[arg(long, help_heading = "Cluster", env = "IMHOST_NODE_TTL", value_name = "DURATION", value_parser = humantime::parse_duration)]
    #[serde(default, with = "humantime_option")]
    node_ttl: Duration,
    /// How long a graceful shutdown waits for sockets to close. [default: 10s]
    #[arg(long, help_heading = "Node", env = "IMHOST_SHUTDOWN_GRACE", value_name = "DURATION", value_parser = humantime::parse_duration)]
    #[serde(default, with = "humantime_option")]
    shutdown_grace: Duration,
    /// Time a client gets to send a request's headers, counted from connect or from the
    /// previous response on a kept-alive connection (so it is also the keep-alive idle
    /// timeout). [default: 10s]
    #[arg(long, help_heading = "HTTP", env = "IMHOST_HEADER_READ_TIMEOUT", value_name = "DURATION", value_parser = humantime::parse_duration)]
    #[serde(default, with = "humantime_option")]
    header_read_timeout: Duration,
    /// Time a business API request body may take to arrive. [default: 30s]
    #[arg(long, help_heading = "HTTP", env = "IMHOST_BODY_READ_TIMEOUT", value_name = "DURATION", value_parser = humantime::parse_duration)]
    #[serde(default, with = "humantime_option")]
    body_read_timeout: Duration,
    /// HTTP connections open at once (before any upgrade). [default: open-file limit -
    /// 100]
    #[arg(
        long,
        help_heading = "HTTP",
        env = "IMHOST_MAX_HTTP_CONNECTIONS",
        value_name = "N"
    )]
    max_http_connections: usize,
    /// HTTP connections open at once from one client address, before any
    /// upgrade; 0: no limit (set 0 behind a proxy). [default: 256]
    #[arg(
        long,
        help_heading = "HTTP",
        env = "IMHOST_MAX_CONNECTIONS_PER_ADDRESS",
        value_name = "N"
    )]
    max_connections_per_address: usize,
    /// WebSocket connects per second from one client address (an IPv6 client
    /// per /64), in bursts of as many; over it, 429 with `Retry-After`; 0: no
    /// limit. [default: 50]
    #[arg(
        long,
        help_heading = "Terminals",
        env = "IMHOST_CONNECT_RATE_PER_ADDRESS",
        value_name = "N"
    )]
    connect_rate_per_address: u32,
    /// Client addresses or networks `connect_rate_per_address` does not
    /// apply to, comma-separated; empty: none. Loopback by default, where a
    /// local proxy that sends no `trusted_proxy_header` puts every terminal.
    /// [default: 127.0.0.0/8,::1]
    #[arg(
        long,
        help_heading = "Terminals",
        env = "IMHOST_CONNECT_RATE_EXEMPT",
        value_name = "NETS",
        value_delimiter = ','
    )]
    connect_rate_exempt: Vec<String>,
    /// Behind a proxy: the header whose last address is the client's. [default: none]
    #[arg(
        long,
        help_heading = "HTTP",
        env = "IMHOST_TRUSTED_PROXY_HEADER",
        value_name = "NAME"
    )]
    trusted_proxy_header: String,
    /// The proxies whose `trusted_proxy_header` is believed: addresses or
    /// networks (`10.0.0.0/8`), comma-separated. A connection from any other
    /// peer is taken at its own address. [default: 127.0.0.0/8,::1]
    #[arg(
        long,
        help_heading = "HTTP",
        env = "IMHOST_TRUSTED_PROXIES",
        value_name = "NETS",
        value_delimiter = ','
    )]
    trusted_proxies: Vec<String>,
    /// PEM certificate chain: serve HTTPS and WSS on the listen port (with `tls_key`).
    /// [default: none: plain HTTP and WS]
    #[arg(
        long,
        help_heading = "HTTP",
        env = "IMHOST_TLS_CERT",
        value_name = "FILE"
    )]
    tls_cert: PathBuf,
    /// PEM private key of `tls_cert` (PKCS#8, PKCS#1 or SEC1). [default: none]
    #[arg(
        long,
        help_heading = "HTTP",
        env = "IMHOST_TLS_KEY",
        value_name = "FILE"
    )]
    tls_key: PathBuf,
    /// Scheme of the connect URLs terminals get (`ws` or `wss`): `wss` behind a proxy
    /// that terminates TLS. The host part is the node's name (`server`). [default: wss
    /// with `tls_cert`, else ws]
    #[arg(
        long,
        help_heading = "HTTP",
        env = "IMHOST_PUBLIC_SCHEME",
        value_name = "SCHEME"
    )]
    public_scheme: String,
    /// Serve `GET /metrics` on this address (a private interface) instead of the
    /// listen port. [default: none: /metrics on the listen port]
    #[arg(
        long,
        help_heading = "HTTP",
        env = "IMHOST_METRICS_LISTEN",
        value_name = "ADDR"
    )]
    metrics_listen: SocketAddr,
}

/// The resolved configuration a node runs with.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub server: String,
    pub servers: Vec<String>,
    pub redis: Option<String>,
    /// Redis Cluster seeds; empty: not a cluster.
    pub redis_cluster: Vec<String>,
    pub api_key: String,
    /// True when the key was generated because none was configured (it is logged).
    pub api_key_generated: bool,
    pub plugins: Option<PathBuf>,
    /// `None`: no cache directory could be named (no `plugin_cache`, no
    /// `XDG_CACHE_HOME` or `HOME`); plugins are compiled at every load.
    pub plugin_cache: Option<PathBuf>,
    pub plugin_cache_keep: usize,
    /// The operator's grants file (see `plugins::grants`); none: nothing
    /// is granted to any plugin.
    pub plugin_grants: Option<PathBuf>,
    pub plugin_tiering: bool,
    pub watch_plugins: bool,
    pub demo: bool,
    /// Lower-case header name whose last address is the client's.
    pub trusted_proxy_header: Option<String>,
    /// Peers whose `trusted_proxy_header` is believed.
    pub trusted_proxies: Vec<ipnet::IpNet>,
    /// Client networks `connect_rate_per_address` does not apply to.
    pub connect_rate_exempt: Vec<ipnet::IpNet>,
    /// `demo` on a non-loopback address, forced.
    pub demo_public: bool,
    /// Set with `tls_cert` and `tls_key`: the certificate is loaded and
    /// checked when the configuration is resolved.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// `ws` or `wss`: what connect URLs say.
    pub public_scheme: &'static str,
    /// Where `/metrics` is served when not on `listen`.
    pub metrics_listen: Option<SocketAddr>,
    pub limits: Limits,
}

/// Declares [`Limits`] with each limit's type and default written once; the
/// generated `Limits::from_options` takes what the options set.
macro_rules! limits {
    ($( $(#[$attr:meta])* $name:ident: $ty:ty = $default:expr, )*) => {
        /// Bounds that keep one node's memory and time in check whatever clients do.
        #[derive(Debug, Clone)]
        pub struct Limits {
            $( $(#[$attr])* pub $name: $ty, )*
        }

        impl Default for Limits {
            fn default() -> Self {
                Self { $( $name: $default, )* }
            }
        }

        impl Limits {
            /// The limits `options` sets, the defaults for the others.
            fn from_options(options: &Options) -> Limits {
                Limits { $( $name: Layered::layer(options.$name.clone(), $default), )* }
            }
        }
    };
}

limits! {
    max_frame_bytes: usize = 64 * 1024,
    outbound_queue: usize = 256,
    /// 0: one per worker thread.
    delivery_shards: usize = 0,
    delivery_backlog: usize = 512 * 1024,
    heartbeat_interval: Duration = Duration::from_secs(20),
    heartbeat_timeout: Duration = Duration::from_secs(60),
    token_ttl: Duration = Duration::from_secs(10),
    /// `None`: derive from the open-file limit at start-up.
    max_connections: Option<usize> = None,
    max_body_bytes: usize = 1024 * 1024,
    max_batch_items: usize = 1000,
    node_ttl: Duration = Duration::from_secs(15),
    shutdown_grace: Duration = Duration::from_secs(10),
    header_read_timeout: Duration = Duration::from_secs(10),
    body_read_timeout: Duration = Duration::from_secs(30),
    /// `None`: derive from the open-file limit at start-up.
    max_http_connections: Option<usize> = None,
    /// 0: no limit.
    max_connections_per_address: usize = 256,
    /// 0: no limit.
    connect_rate_per_address: u32 = 50,
}

/// A limit's value from an optional setting over its default: a plain
/// limit takes the setting or the default; an optional one (`None`: derived
/// at start-up) takes the setting, else the default.
trait Layered<S> {
    fn layer(set: Option<S>, default: Self) -> Self;
}

impl<T> Layered<T> for T {
    fn layer(set: Option<T>, default: T) -> T {
        set.unwrap_or(default)
    }
}

impl<T> Layered<T> for Option<T> {
    fn layer(set: Option<T>, default: Option<T>) -> Option<T> {
        set.or(default)
    }
}

/// A setting that cannot be used, named by its key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config file {path}: {source}")]
    Parse {
        path: PathBuf,
        #[source]
        source: toml::de::Error,
    },
    #[error("`{key}`: {problem}")]
    Invalid { key: &'static str, problem: String },
}

fn invalid(key: &'static str, problem: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key,
        problem: problem.into(),
    }
}

impl Options {
    /// Reads a TOML file of options.
    ///
    /// # Errors
    /// The file cannot be read, is not TOML, has an unknown key or a bad value.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        toml::from_str(&text).map_err(|source| ConfigError::Parse {
            path: path.to_owned(),
            source,
        })
    }

    /// Fills in defaults and checks every value.
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] naming the first key whose value cannot work.
    pub fn resolve(self) -> Result<Config, ConfigError> {
        let limits = Limits::from_options(&self);
        let listen = self
            .listen
            .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 6001)));
        let server = self.server.unwrap_or_else(|| listen.to_string());
        if server.trim().is_empty() {
            return Err(invalid("server", "must not be empty"));
        }
        let servers = self.servers.unwrap_or_else(|| vec![server.clone()]);
        if servers.iter().any(|s| s.trim().is_empty()) {
            return Err(invalid("servers", "has an empty entry"));
        }
        if !servers.contains(&server) {
            return Err(invalid(
                "servers",
                format!("does not contain this node's name {server:?} (set `server`)"),
            ));
        }
        let mut unique = servers.clone();
        unique.sort();
        unique.dedup();
        if unique.len() != servers.len() {
            return Err(invalid("servers", "names a node twice"));
        }
        let redis_cluster = self.redis_cluster.unwrap_or_default();
        if self.redis.is_some() && !redis_cluster.is_empty() {
            return Err(invalid(
                "redis_cluster",
                "set either `redis` (one Redis) or `redis_cluster` (a Redis Cluster), not both",
            ));
        }
        if servers.len() > 1 && self.redis.is_none() && redis_cluster.is_empty() {
            return Err(invalid(
                "servers",
                "several nodes need `redis` or `redis_cluster`; without them the node runs embedded",
            ));
        }
        let demo = self.demo.unwrap_or(false);
        let demo_public = self.demo_public.unwrap_or(false);
        if demo && !listen.ip().is_loopback() && !demo_public {
            return Err(invalid(
                "demo",
                format!(
                    "the demo's toy backend needs no API key, so it is refused on {listen}, \
                     which is not a loopback address; set `demo_public` to force it"
                ),
            ));
        }
        let (api_key, api_key_generated) = match self.api_key {
            Some(key) if key.len() < 16 => {
                return Err(invalid("api_key", "must be at least 16 characters"));
            }
            Some(key) => (key, false),
            None => (crate::token::random_hex(32), true),
        };
        if let Some(dir) = &self.plugins
            && !dir.is_dir()
        {
            return Err(invalid(
                "plugins",
                format!("{} is not a directory", dir.display()),
            ));
        }
        let trusted_proxies = self
            .trusted_proxies
            .unwrap_or_else(|| vec!["127.0.0.0/8".into(), "::1".into()])
            .iter()
            .map(|entry| parse_network(entry))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| invalid("trusted_proxies", e))?;
        let connect_rate_exempt = self
            .connect_rate_exempt
            .unwrap_or_else(|| vec!["127.0.0.0/8".into(), "::1".into()])
            .iter()
            .filter(|entry| !entry.trim().is_empty())
            .map(|entry| parse_network(entry))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| invalid("connect_rate_exempt", e))?;
        limits.check()?;
        let tls = match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => Some(Arc::new(load_tls(cert, key)?)),
            (None, None) => None,
            (Some(_), None) => return Err(invalid("tls_key", "is needed with `tls_cert`")),
            (None, Some(_)) => return Err(invalid("tls_cert", "is needed with `tls_key`")),
        };
        let public_scheme = match self.public_scheme.as_deref() {
            None if tls.is_some() => "wss",
            None => "ws",
            Some("ws") => "ws",
            Some("wss") => "wss",
            Some(other) => {
                return Err(invalid(
                    "public_scheme",
                    format!("must be `ws` or `wss`, not {other:?}"),
                ));
            }
        };
        if self.metrics_listen == Some(listen) {
            return Err(invalid(
                "metrics_listen",
                "must differ from `listen` (leave it unset to serve /metrics there)",
            ));
        }
        Ok(Config {
            tls,
            public_scheme,
            metrics_listen: self.metrics_listen,
            listen,
            server,
            servers,
            redis: self.redis,
            redis_cluster,
            api_key,
            api_key_generated,
            plugin_cache: self.plugin_cache.or_else(default_plugin_cache),
            plugin_tiering: self.plugin_tiering.unwrap_or(true),
            plugin_cache_keep: self.plugin_cache_keep.unwrap_or(KEEP_RECENT_ARTIFACTS),
            plugin_grants: self.plugin_grants,
            plugins: self.plugins,
            watch_plugins: self.watch_plugins.unwrap_or(true),
            demo,
            demo_public,
            trusted_proxy_header: self
                .trusted_proxy_header
                .map(|h| h.trim().to_ascii_lowercase())
                .filter(|h| !h.is_empty()),
            trusted_proxies,
            connect_rate_exempt,
            limits,
        })
    }
}

/// Compiled plugins kept in the cache besides the running ones, by default
/// (`plugin_cache_keep`).
pub const KEEP_RECENT_ARTIFACTS: usize = 8;

/// An address (`10.1.2.3`, a network of one) or a network (`10.0.0.0/8`).
fn parse_network(entry: &str) -> Result<ipnet::IpNet, String> {
    let entry = entry.trim();
    entry
        .parse::<ipnet::IpNet>()
        .or_else(|_| entry.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
        .map_err(|_| format!("`{entry}` is not an address or a network"))
}

/// Reads a PEM certificate chain and its private key into a rustls server
/// configuration (TLS 1.2 and 1.3, HTTP/1.1 by ALPN).
fn load_tls(cert: &Path, key: &Path) -> Result<rustls::ServerConfig, ConfigError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};

    let certs = CertificateDer::pem_file_iter(cert)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|err| invalid("tls_cert", format!("{}: {err}", cert.display())))?;
    if certs.is_empty() {
        return Err(invalid(
            "tls_cert",
            format!("{}: no certificate in it", cert.display()),
        ));
    }
    let key = PrivateKeyDer::from_pem_file(key)
        .map_err(|err| invalid("tls_key", format!("{}: {err}", key.display())))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|err| invalid("tls_cert", err.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|err| invalid("tls_key", format!("does not fit the certificate: {err}")))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

impl Limits {
    fn check(&self) -> Result<(), ConfigError> {
        if !(16..=64 * 1024 * 1024).contains(&self.max_frame_bytes) {
            return Err(invalid("max_frame_bytes", "must be between 16 and 64 MiB"));
        }
        if !(1..=65_536).contains(&self.outbound_queue) {
            return Err(invalid("outbound_queue", "must be between 1 and 65536"));
        }
        if self.delivery_shards > 1024 {
            return Err(invalid("delivery_shards", "must be at most 1024"));
        }
        if !(1..=1 << 30).contains(&self.delivery_backlog) {
            return Err(invalid("delivery_backlog", "must be between 1 and 2^30"));
        }
        if self.heartbeat_interval < Duration::from_millis(10) {
            return Err(invalid("heartbeat_interval", "must be at least 10ms"));
        }
        if self.heartbeat_timeout <= self.heartbeat_interval {
            return Err(invalid(
                "heartbeat_timeout",
                "must be longer than heartbeat_interval",
            ));
        }
        if self.token_ttl < Duration::from_millis(100) {
            return Err(invalid("token_ttl", "must be at least 100ms"));
        }
        if self.max_connections == Some(0) {
            return Err(invalid("max_connections", "must be at least 1"));
        }
        if self.node_ttl < Duration::from_millis(300) {
            return Err(invalid("node_ttl", "must be at least 300ms"));
        }
        if self.header_read_timeout < Duration::from_millis(100) {
            return Err(invalid("header_read_timeout", "must be at least 100ms"));
        }
        if self.body_read_timeout < Duration::from_millis(100) {
            return Err(invalid("body_read_timeout", "must be at least 100ms"));
        }
        if self.max_http_connections == Some(0) {
            return Err(invalid("max_http_connections", "must be at least 1"));
        }
        if self.max_body_bytes < 1024 {
            return Err(invalid("max_body_bytes", "must be at least 1024"));
        }
        if !(1..=1_000_000).contains(&self.max_batch_items) {
            return Err(invalid("max_batch_items", "must be between 1 and 1000000"));
        }
        Ok(())
    }
}

/// `$XDG_CACHE_HOME/imhost/plugins`, `~/.cache/imhost/plugins`, or one in
/// the temporary directory.
pub fn default_plugin_cache() -> Option<PathBuf> {
    // No fallback to a shared temporary directory: whoever else can write
    // there could plant native code for the server to run.
    std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .filter(|p| p.is_absolute())
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cache")))
        .map(|base| base.join("imhost").join("plugins"))
}

/// `Option<Duration>` written as a humantime string (`"20s"`, `"1m 30s"`) in TOML.
mod humantime_option {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer};

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        Option::<String>::deserialize(d)?
            .map(|s| humantime::parse_duration(&s).map_err(serde::de::Error::custom))
            .transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_make_a_single_embedded_node() {
        let config = Options::default().resolve().expect("defaults resolve");
        assert_eq!(config.listen.to_string(), "127.0.0.1:6001");
        assert_eq!(config.server, "127.0.0.1:6001");
        assert_eq!(config.servers, vec!["127.0.0.1:6001".to_owned()]);
        assert!(config.api_key_generated);
        assert_eq!(config.api_key.len(), 64);
    }

    #[test]
    fn higher_layer_wins() {
        let file: Options = toml::from_str(
            "listen = \"127.0.0.1:7000\"\nmax_frame_bytes = 100\nheartbeat_interval = \"5s\"",
        )
        .expect("toml");
        let flags = Options {
            max_frame_bytes: Some(200),
            ..Options::default()
        };
        let config = flags.or(file).resolve().expect("resolves");
        assert_eq!(config.listen.port(), 7000);
        assert_eq!(config.limits.max_frame_bytes, 200);
        assert_eq!(config.limits.heartbeat_interval, Duration::from_secs(5));
    }

    #[test]
    fn bad_values_name_their_key() {
        let err = toml::from_str::<Options>("listen = 5").expect_err("type");
        assert!(err.to_string().contains("listen"), "{err}");
        let err = toml::from_str::<Options>("nope = 1").expect_err("unknown");
        assert!(err.to_string().contains("nope"), "{err}");
        let err = toml::from_str::<Options>("token_ttl = \"soon\"").expect_err("duration");
        assert!(err.to_string().contains("token_ttl"), "{err}");

        let err = Options {
            heartbeat_interval: Some(Duration::from_secs(10)),
            heartbeat_timeout: Some(Duration::from_secs(5)),
            ..Options::default()
        }
        .resolve()
        .expect_err("timeout shorter than interval");
        assert!(err.to_string().contains("`heartbeat_timeout`"), "{err}");

        let err = Options {
            plugins: Some("/no/such/dir".into()),
            ..Options::default()
        }
        .resolve()
        .expect_err("missing plugin dir");
        assert!(err.to_string().contains("`plugins`"), "{err}");

        let err = Options {
            server: Some("a".into()),
            servers: Some(vec!["b".into()]),
            ..Options::default()
        }
        .resolve()
        .expect_err("server not in servers");
        assert!(err.to_string().contains("`servers`"), "{err}");
    }

    #[test]
    fn the_demo_is_refused_on_a_public_address_unless_forced() {
        let public = Options {
            listen: Some("0.0.0.0:6001".parse().expect("addr")),
            demo: Some(true),
            ..Options::default()
        };
        let err = public.clone().resolve().expect_err("refused");
        assert!(err.to_string().contains("`demo`"), "{err}");
        let forced = Options {
            demo_public: Some(true),
            ..public
        }
        .resolve()
        .expect("forced");
        assert!(forced.demo && forced.demo_public);
        let loopback = Options {
            demo: Some(true),
            ..Options::default()
        };
        assert!(loopback.resolve().expect("loopback").demo);
    }
}
