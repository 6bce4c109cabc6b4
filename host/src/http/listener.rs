//! The accept loop: every TCP connection the node takes, with the bounds an
//! open-internet server needs and `axum::serve` does not give.
//!
//! - **A cap on open connections.** Each accepted connection holds a permit
//!   until its HTTP phase ends (an upgraded WebSocket then counts against the
//!   node's socket cap, `max_connections`, instead). At the cap, a new
//!   connection is accepted and closed at once, so the kernel's backlog never
//!   fills with connections nobody will serve.
//! - **A cap per client address** on connections in their HTTP phase, so that
//!   one address cannot take every slot (behind a proxy, every connection
//!   comes from the proxy: set it off there and limit at the proxy).
//! - **A header-read timeout** (hyper's, which needs a timer): a connection
//!   that sends no request, sends headers byte by byte, or idles between
//!   keep-alive requests is closed when it runs out. Bodies get their own
//!   timeout in the router.
//! - **Accept errors** (out of file descriptors, mostly) are counted and
//!   logged at most once a second, and the loop backs off briefly instead of
//!   spinning.
//!
//! - **TLS** (`--tls-cert`): the handshake runs in the connection's task,
//!   under the header-read timeout, before hyper sees the connection; a failed
//!   one is counted (`tls_handshakes_failed`) and logged at debug.
//!
//! - **HTTP/1.1 and h2c.** Terminals and most backends speak HTTP/1.1; a
//!   backend that sends many requests can carry them all on one HTTP/2
//!   connection without TLS (h2c with prior knowledge, RFC 9113 section
//!   3.3). The connection's first bytes say which: they are peeked, under the
//!   header-read timeout, never read past. With TLS, HTTP/1.1 only.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::ConnectInfo;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;
use tracing::{debug, warn};

use crate::stats::Stats;

/// How long the loop pauses after an accept error (EMFILE clears only when
/// some connection closes).
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(20);

/// What the loop needs besides the listener and the router.
pub struct ListenerLimits {
    /// Connections open at once (HTTP and WebSocket together).
    pub max_open: usize,
    /// Connections in their HTTP phase at once from one address (0: no limit).
    pub max_per_address: usize,
    /// Time a connection gets to deliver a request's headers, counted from
    /// when the server starts waiting for them (connect, or the previous
    /// response on a kept-alive connection). A TLS handshake gets as long.
    pub header_read_timeout: Duration,
    /// Serve TLS with this configuration.
    pub tls: Option<Arc<tokio_rustls::rustls::ServerConfig>>,
}

/// Serves `router` on `listener` until `stop` fires, then asks every HTTP
/// connection to finish its request in flight and close. Returns the tracker
/// of the connection tasks so the caller can bound the wait.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: ListenerLimits,
    stats: Arc<Stats>,
    stop: CancellationToken,
) -> TaskTracker {
    let permits = Arc::new(Semaphore::new(limits.max_open));
    let per_address = Arc::new(PerAddress::default());
    let connections = TaskTracker::new();
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        // Our responses are small (a 101, a JSON answer): one buffer and
        // one write() cost less than a writev of headers and body.
        .writev(false);
    let http = Arc::new(http);
    let tls = limits.tls.clone().map(tokio_rustls::TlsAcceptor::from);
    let mut last_error_log: Option<Instant> = None;
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = stop.cancelled() => break,
        };
        let (stream, remote) = match accepted {
            Ok(accepted) => accepted,
            Err(err) => {
                Stats::incr(&stats.accept_errors);
                if last_error_log.is_none_or(|at| at.elapsed() >= Duration::from_secs(1)) {
                    last_error_log = Some(Instant::now());
                    warn!(cause = %err, total = Stats::get(&stats.accept_errors), "cannot accept connections");
                }
                tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                continue;
            }
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            Stats::incr(&stats.connections_refused_at_cap);
            debug!(%remote, "connection cap reached; closing a new connection");
            drop(stream);
            continue;
        };
        let Some(address_slot) = per_address.take(remote.ip(), limits.max_per_address) else {
            Stats::incr(&stats.connections_refused_per_address);
            debug!(%remote, "per-address connection limit reached; closing a new connection");
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let http = http.clone();
        let router = router.clone();
        let stop = stop.clone();
        let tls = tls.clone();
        let stats = stats.clone();
        let handshake_timeout = limits.header_read_timeout;
        connections.spawn(async move {
            let _permit = permit;
            let _address_slot = address_slot;
            let service = hyper::service::service_fn(move |request: hyper::Request<Incoming>| {
                let mut request = request.map(axum::body::Body::new);
                request.extensions_mut().insert(ConnectInfo(remote));
                router.clone().oneshot(request)
            });
            let Some(tls) = tls else {
                return match speaks_h2c(&stream, handshake_timeout).await {
                    Some(true) => serve_h2c(TokioIo::new(stream), service, &stop, remote).await,
                    Some(false) => {
                        serve_http(&http, TokioIo::new(stream), service, &stop, remote).await;
                    }
                    None => debug!(%remote, "closed or silent before its first request"),
                };
            };
            let accepted = tokio::select! {
                accepted = tokio::time::timeout(handshake_timeout, tls.accept(stream)) => accepted,
                () = stop.cancelled() => return,
            };
            match accepted {
                Ok(Ok(stream)) => {
                    serve_http(&http, TokioIo::new(stream), service, &stop, remote).await;
                }
                Ok(Err(err)) => {
                    Stats::incr(&stats.tls_handshakes_failed);
                    debug!(%remote, cause = %err, "TLS handshake failed");
                }
                Err(_) => {
                    Stats::incr(&stats.tls_handshakes_failed);
                    debug!(%remote, "TLS handshake timed out");
                }
            }
        });
    }
    connections.close();
    connections
}

/// Serves HTTP on one connection (plain or TLS) until it ends, or, once
/// `stop` fires, until its request in flight is answered.
async fn serve_http<I, S>(
    http: &hyper::server::conn::http1::Builder,
    io: I,
    service: S,
    stop: &CancellationToken,
    remote: std::net::SocketAddr,
) where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    S: hyper::service::HttpService<Incoming>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    S::ResBody: 'static,
    <S::ResBody as hyper::body::Body>::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let connection = http.serve_connection(io, service).with_upgrades();
    let result = until_done_or_stopped(connection, stop, |c| c.graceful_shutdown()).await;
    if let Err(err) = result {
        debug!(%remote, cause = %err, "HTTP connection ended with an error");
    }
}

/// Drives `connection` to its end, or, once `stop` fires, asks it to finish
/// what is in flight (`graceful`) and waits for that.
async fn until_done_or_stopped<C: Future>(
    connection: C,
    stop: &CancellationToken,
    graceful: impl FnOnce(std::pin::Pin<&mut C>),
) -> C::Output {
    tokio::pin!(connection);
    tokio::select! {
        result = connection.as_mut() => result,
        () = stop.cancelled() => {
            graceful(connection.as_mut());
            connection.await
        }
    }
}

/// How an HTTP/2 connection with prior knowledge begins (RFC 9113 section
/// 3.4); no HTTP/1 method does.
const H2_PREFACE_START: &[u8; 3] = b"PRI";

/// Streams one HTTP/2 connection carries at once.
const H2_MAX_STREAMS: u32 = 256;

/// Whether the client opens with HTTP/2's preface, from the bytes it sent so
/// far (peeked, not consumed); `None` when it closes or says too little
/// within `within`.
async fn speaks_h2c(stream: &tokio::net::TcpStream, within: Duration) -> Option<bool> {
    let mut start = [0u8; 3];
    let sniff = async {
        loop {
            match stream.peek(&mut start).await {
                Ok(0) | Err(_) => return None,
                Ok(n) if start[..n] != H2_PREFACE_START[..n] => return Some(false),
                Ok(n) if n == start.len() => return Some(true),
                // A first segment of one or two bytes: wait for the rest.
                Ok(_) => tokio::time::sleep(Duration::from_millis(1)).await,
            }
        }
    };
    tokio::time::timeout(within, sniff).await.ok().flatten()
}

/// Serves one h2c connection until it ends, or, once `stop` fires, until
/// its streams in flight are answered.
async fn serve_h2c<I, S>(io: I, service: S, stop: &CancellationToken, remote: std::net::SocketAddr)
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    S: hyper::service::HttpService<Incoming> + Send,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    S::ResBody: Send + 'static,
    <S::ResBody as hyper::body::Body>::Data: Send,
    <S::ResBody as hyper::body::Body>::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let mut http = hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new());
    http.timer(TokioTimer::new())
        .max_concurrent_streams(H2_MAX_STREAMS)
        // A backend that went away without closing is found out.
        .keep_alive_interval(Some(Duration::from_secs(20)))
        .keep_alive_timeout(Duration::from_secs(20));
    let connection = http.serve_connection(io, service);
    let result = until_done_or_stopped(connection, stop, |c| c.graceful_shutdown()).await;
    if let Err(err) = result {
        debug!(%remote, cause = %err, "HTTP/2 connection ended with an error");
    }
}

/// Connections open per client address, so that one address cannot take
/// every slot of the connection cap.
#[derive(Default)]
struct PerAddress {
    open: Mutex<HashMap<IpAddr, usize>>,
}

impl PerAddress {
    /// A slot for `ip`, unless it holds `limit` already (0: no limit).
    fn take(self: &Arc<Self>, ip: IpAddr, limit: usize) -> Option<AddressSlot> {
        if limit == 0 {
            return Some(AddressSlot { table: None, ip });
        }
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let count = open.entry(ip).or_default();
        if *count >= limit {
            return None;
        }
        *count += 1;
        Some(AddressSlot {
            table: Some(self.clone()),
            ip,
        })
    }
}

/// Gives its address's slot back when the connection ends.
struct AddressSlot {
    table: Option<Arc<PerAddress>>,
    ip: IpAddr,
}

impl Drop for AddressSlot {
    fn drop(&mut self) {
        if let Some(table) = &self.table {
            let mut open = table.open.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(count) = open.get_mut(&self.ip) {
                *count -= 1;
                if *count == 0 {
                    open.remove(&self.ip);
                }
            }
        }
    }
}
