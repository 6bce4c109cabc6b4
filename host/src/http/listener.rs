//! The accept loop: every TCP connection the node takes, with the bounds an
//! open-internet server needs and `axum::serve` does not give.
//!
//! - **A cap on open connections.** Each accepted connection holds a permit
//!   until its HTTP phase ends (an upgraded WebSocket then counts against the
//!   node's socket cap, `max_connections`, instead). At the cap, a new
//!   connection is accepted and closed at once, so the kernel's backlog never
//!   fills with connections nobody will serve.
//! - **A header-read timeout** (hyper's, which needs a timer): a connection
//!   that sends no request, sends headers byte by byte, or idles between
//!   keep-alive requests is closed when it runs out. Bodies get their own
//!   timeout in the router.
//! - **Accept errors** (out of file descriptors, mostly) are counted and
//!   logged at most once a second, and the loop backs off briefly instead of
//!   spinning.
//!
//! HTTP/1.1 only: terminals and business backends speak it, and HTTP/2's
//! version sniffing would read the first bytes with no timeout.

use std::sync::Arc;
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
    /// Time a connection gets to deliver a request's headers, counted from
    /// when the server starts waiting for them (connect, or the previous
    /// response on a kept-alive connection).
    pub header_read_timeout: Duration,
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
    let connections = TaskTracker::new();
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
    let http = Arc::new(http);
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
        let _ = stream.set_nodelay(true);
        let http = http.clone();
        let router = router.clone();
        let stop = stop.clone();
        connections.spawn(async move {
            let _permit = permit;
            let service = hyper::service::service_fn(move |request: hyper::Request<Incoming>| {
                let mut request = request.map(axum::body::Body::new);
                request.extensions_mut().insert(ConnectInfo(remote));
                router.clone().oneshot(request)
            });
            let connection = http
                .serve_connection(TokioIo::new(stream), service)
                .with_upgrades();
            tokio::pin!(connection);
            let result = tokio::select! {
                result = connection.as_mut() => result,
                () = stop.cancelled() => {
                    connection.as_mut().graceful_shutdown();
                    connection.await
                }
            };
            if let Err(err) = result {
                debug!(%remote, cause = %err, "HTTP connection ended with an error");
            }
        });
    }
    connections.close();
    connections
}
