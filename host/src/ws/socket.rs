//! The socket core: one terminal's WebSocket after the handshake, driven by
//! readiness.
//!
//! An idle socket costs its task and its [`SocketHandle`], which holds its
//! `TcpStream` (in a [`Transport`], which adds TLS when the node serves it):
//! - **Reads** wait for readability, then read into one 64 KiB buffer per
//!   worker thread and decode from there ([`frame::Decoder`]). Only a frame
//!   cut off by the end of a read leaves bytes behind in the socket.
//! - **Writes** mostly happen without this task: whoever delivers writes
//!   straight to the kernel when nothing waits (see [`super::outbound`]).
//!   The task writes what the kernel refused, when the socket becomes
//!   writable, plus pings, pongs and plugin replies. While more than
//!   `max_unsent` bytes wait the socket stops reading, so a terminal that
//!   pings without reading cannot grow them.
//! - **Timers** are not here: the heartbeat sweep ([`super::heartbeat`]) asks
//!   for pings and closes silent sockets through the handle.
//!
//! Closing follows RFC 6455 section 7: a terminal's Close is echoed; a close
//! the server starts sends its code after what is already on the wire, shuts
//! the write side and waits briefly for the terminal's answer, so the
//! terminal sees a clean close. A slow consumer's queue is dropped, and its
//! 1013 is sent once the socket drains, if it does within
//! [`SLOW_CONSUMER_DRAIN`].

use std::cell::RefCell;
use std::future::poll_fn;
use std::io;
use std::task::Poll;
use std::time::Duration;

use bytes::Bytes;
use tracing::debug;

use super::frame::{self, Decoder, Event, Violation};
use super::handle::{CloseReason, SocketHandle, signal};
use super::transport::Transport;
use crate::registry::Registry;

/// The per-thread read buffer's size: a read takes at most this much.
const READ_BUFFER_BYTES: usize = 64 * 1024;
/// How long a close frame may take to leave, and then how long the terminal
/// gets to answer it, before the socket is dropped.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);
/// How long a cut-off slow consumer gets to read what is on its way and
/// then its 1013.
pub const SLOW_CONSUMER_DRAIN: Duration = Duration::from_secs(10);

thread_local! {
    static READ_BUFFER: RefCell<Box<[u8]>> =
        RefCell::new(vec![0; READ_BUFFER_BYTES].into_boxed_slice());
}

/// What the socket core asks of the terminal it serves.
pub trait Terminal {
    /// A text message arrived; returns a reply for this socket, if any.
    fn on_text(&self, text: String) -> impl Future<Output = Option<String>> + Send;
    /// A message the node has no use for arrived (binary).
    fn on_ignored(&self);
    /// The terminal broke the protocol or a limit; the socket is about to be
    /// closed for `reason` (called before the close frame leaves).
    fn on_violation(&self, reason: CloseReason);
}

/// The socket core's bounds.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest frame or message a terminal may send.
    pub max_message: usize,
    /// A write batch stops once it holds this many bytes.
    pub max_batch_bytes: usize,
    /// Reading pauses while more than this many bytes wait for the kernel.
    pub max_unsent: usize,
}

/// How a socket ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// The server closed it for this reason (and sent the code).
    Server(CloseReason),
    /// The terminal sent a Close, which was answered.
    Terminal(Option<u16>),
    /// The connection ended without a close handshake (EOF or an I/O error).
    Gone,
}

/// What woke the socket task.
enum Wake {
    Close,
    Write,
    Read,
}

/// Serves the socket `handle` holds until it ends; `read_ahead` are bytes
/// hyper read past the handshake.
///
/// A plain fn returning an async block, not an `async fn`: an async fn's
/// future keeps its arguments twice (as passed, and as moved into its body),
/// and this future lives in every idle socket's task. Read-ahead bytes are
/// decoded here, before the future is made, and what they held waits boxed:
/// they are rare, and the future should not carry room for them.
pub fn run<'a, T: Terminal>(
    read_ahead: Bytes,
    handle: &'a SocketHandle,
    registry: &'a Registry,
    limits: Limits,
    terminal: &'a T,
) -> impl Future<Output = End> + 'a {
    let mut decoder = Decoder::new(limits.max_message);
    let early = (!read_ahead.is_empty()).then(|| {
        let mut events = Vec::new();
        Box::new((decoder.feed(&read_ahead, &mut events), events))
    });
    // `read_ahead` may hold on to hyper's whole read buffer (kilobytes), even
    // when empty: it must not live as long as the socket.
    drop(read_ahead);
    async move {
        let Some(stream) = handle.stream() else {
            return End::Gone;
        };
        if let Some(early) = early {
            let (decoded, events) = *early;
            if let Some(end) =
                Box::pin(handle_input(decoded, events, handle, registry, terminal)).await
            {
                return Box::pin(finish(stream, end, handle)).await;
            }
        }
        // Messages may have been queued between registration and now.
        let mut want_write = true;
        let mut want_ping = false;
        loop {
            // Without this, a socket whose queue is refilled as fast as the
            // kernel takes it would never give its worker thread back.
            tokio::task::consume_budget().await;
            let wake = poll_fn(|cx| {
                let signals = handle.take_signals(cx);
                want_write |= signals & signal::QUEUED != 0;
                want_ping |= signals & signal::PING != 0;
                if handle.close_reason().is_some() {
                    return Poll::Ready(Wake::Close);
                }
                if (want_write || want_ping) && stream.poll_write_ready(cx).is_ready() {
                    return Poll::Ready(Wake::Write);
                }
                if handle.out().unsent_len() <= limits.max_unsent
                    && stream.poll_read_ready(cx).is_ready()
                {
                    return Poll::Ready(Wake::Read);
                }
                Poll::Pending
            })
            .await;
            let outcome = match wake {
                Wake::Close => break,
                Wake::Write => {
                    let mut out = handle.out();
                    if std::mem::take(&mut want_ping) {
                        out.send(Some(stream), &frame::encode(frame::PING, b""));
                    }
                    out.flush(Some(stream), limits.max_batch_bytes)
                        .map(|done| want_write = !done)
                }
                Wake::Read => {
                    // Bound before the await below, not matched on in place:
                    // a matched value would be kept across it, in every
                    // socket's future.
                    let input = read(stream, &mut decoder);
                    let (decoded, events) = match input {
                        Ok(Some(input)) => input,
                        Ok(None) => continue,
                        Err(_) => return End::Gone,
                    };
                    // Reading TLS may have queued records (alerts, key
                    // updates) the kernel did not take yet.
                    want_write |= stream.has_pending_output();
                    // Boxed: most sockets never send anything, and inlined
                    // this future would grow every idle socket's task.
                    match Box::pin(handle_input(decoded, events, handle, registry, terminal)).await
                    {
                        Some(end) => return Box::pin(finish(stream, end, handle)).await,
                        None => Ok(()),
                    }
                }
            };
            if outcome.is_err() {
                return End::Gone;
            }
        }
        let reason = handle.close_reason().unwrap_or(CloseReason::Shutdown);
        Box::pin(finish(stream, End::Server(reason), handle)).await
    }
}

/// Reads what is there into the thread's buffer and decodes it. `Ok(None)`
/// when the readiness was spurious.
#[allow(clippy::type_complexity)]
fn read(
    stream: &Transport,
    decoder: &mut Decoder,
) -> io::Result<Option<(Result<usize, Violation>, Vec<Event>)>> {
    READ_BUFFER.with_borrow_mut(|buffer| match stream.try_read(buffer) {
        Ok(0) => Err(io::ErrorKind::UnexpectedEof.into()),
        Ok(n) => {
            let mut events = Vec::new();
            let decoded = decoder.feed(&buffer[..n], &mut events);
            Ok(Some((decoded, events)))
        }
        Err(err) if err.kind() == io::ErrorKind::WouldBlock => Ok(None),
        Err(err) => Err(err),
    })
}

/// Acts on decoded input; returns how the socket ends, when it does.
async fn handle_input<T: Terminal>(
    decoded: Result<usize, Violation>,
    events: Vec<Event>,
    handle: &SocketHandle,
    registry: &Registry,
    terminal: &T,
) -> Option<End> {
    let frames = match decoded {
        Ok(frames) => frames,
        Err(violation) => {
            debug!(cause = %violation, "terminal broke the WebSocket protocol");
            let reason = match violation {
                Violation::TooBig => CloseReason::Oversize,
                Violation::InvalidUtf8 => CloseReason::InvalidData,
                Violation::Protocol(_) => CloseReason::ProtocolError,
            };
            terminal.on_violation(reason);
            return Some(End::Server(reason));
        }
    };
    if frames > 0 {
        handle.heard(registry.now_ms());
    }
    for event in events {
        match event {
            Event::Text(text) => {
                if let Some(reply) = terminal.on_text(text).await {
                    handle.send(&frame::encode(frame::TEXT, reply.as_bytes()));
                }
            }
            Event::Binary { .. } => terminal.on_ignored(),
            Event::Ping(payload) => {
                handle.send_pong(&frame::encode(frame::PONG, &payload), registry.stats());
            }
            Event::Pong => {}
            Event::Close(code) => {
                // RFC 6455 5.5.1: answer with a Close echoing the code.
                let code = code.map(|(code, _)| code);
                let answer = match code {
                    Some(code) => frame::close_frame(code, ""),
                    None => frame::encode(frame::CLOSE, b""),
                };
                handle.out().close_with(&answer);
                return Some(End::Terminal(code));
            }
        }
    }
    None
}

/// Ends the socket as `end` says: sends the close frame it calls for, then
/// waits (bounded) for the bytes to leave and the terminal to answer.
async fn finish(stream: &Transport, end: End, handle: &SocketHandle) -> End {
    let drain_for = match end {
        End::Gone => return end,
        End::Terminal(_) => CLOSE_TIMEOUT,
        End::Server(reason) => {
            handle
                .out()
                .close_with(&frame::close_frame(reason.code(), reason.text()));
            if reason == CloseReason::SlowConsumer {
                SLOW_CONSUMER_DRAIN
            } else {
                CLOSE_TIMEOUT
            }
        }
    };
    let sent = tokio::time::timeout(drain_for, async {
        // Only what is unsent is left: `close_with` dropped the queue.
        while !handle.out().flush(Some(stream), 0)? {
            stream.writable().await?;
        }
        io::Result::Ok(())
    })
    .await;
    if !matches!(sent, Ok(Ok(()))) {
        return end;
    }
    stream.shutdown_write();
    if matches!(end, End::Server(_)) {
        // Wait for the terminal's Close (or EOF), so closing the socket with
        // unread bytes does not reset the connection under it.
        let _ = tokio::time::timeout(CLOSE_TIMEOUT, discard_until_eof(stream)).await;
    }
    end
}

/// Reads and drops input until the terminal closes its side.
async fn discard_until_eof(stream: &Transport) -> io::Result<()> {
    loop {
        stream.readable().await?;
        let read = READ_BUFFER.with_borrow_mut(|buffer| stream.try_read(buffer));
        match read {
            Ok(0) => return Ok(()),
            Ok(_) => {}
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => {}
            Err(err) => return Err(err),
        }
    }
}
