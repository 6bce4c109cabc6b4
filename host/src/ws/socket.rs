//! The socket core: one terminal's WebSocket after the handshake, driven by
//! readiness.
//!
//! An idle socket costs its task, its `TcpStream` and its [`SocketHandle`]:
//! - **Reads** wait for readability, then read into one 64 KiB buffer per
//!   worker thread and decode from there ([`frame::Decoder`]). Only a frame
//!   cut off by the end of a read leaves bytes behind in the socket.
//! - **Writes** encode frame headers on the stack and hand headers and the
//!   shared message bytes to one `writev` per batch of queued messages. Bytes
//!   are copied into the socket's own buffer only when the kernel refuses
//!   them, and that buffer is freed once it drains. While it holds more than
//!   `max_unsent` bytes the socket stops reading, so a terminal that pings
//!   without reading cannot grow it.
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
use std::io::{self, IoSlice};
use std::task::Poll;
use std::time::Duration;

use bytes::Bytes;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tracing::debug;
use tungstenite::Utf8Bytes;

use super::frame::{self, Decoder, Event, Violation};
use crate::registry::{CloseReason, Registry, SocketHandle, signal};

/// The per-thread read buffer's size: a read takes at most this much.
const READ_BUFFER_BYTES: usize = 64 * 1024;
/// How many queued messages one `writev` carries at most.
const WRITE_BATCH: usize = 64;
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

/// One socket's connection state; see the module docs.
struct Connection {
    stream: TcpStream,
    decoder: Decoder,
    /// Bytes the kernel has not taken yet, in order.
    unsent: Vec<u8>,
}

/// What woke the socket task.
enum Wake {
    Close,
    Write,
    Read,
}

/// Serves the socket until it ends. `read_ahead` are bytes hyper read past
/// the handshake.
pub async fn run<T: Terminal>(
    stream: TcpStream,
    read_ahead: Bytes,
    handle: &SocketHandle,
    registry: &Registry,
    limits: Limits,
    terminal: &T,
) -> End {
    let mut conn = Connection {
        stream,
        decoder: Decoder::new(limits.max_message),
        unsent: Vec::new(),
    };
    if !read_ahead.is_empty() {
        let mut events = Vec::new();
        let decoded = conn.decoder.feed(&read_ahead, &mut events);
        if let Some(end) =
            Box::pin(conn.handle_input(decoded, events, handle, registry, terminal)).await
        {
            return Box::pin(conn.finish(end, handle)).await;
        }
    }
    // Messages may have been queued between registration and now.
    let mut want_drain = true;
    let mut want_ping = false;
    loop {
        // Without this, a socket whose queue is refilled as fast as the
        // kernel takes it would never give its worker thread back.
        tokio::task::consume_budget().await;
        let wake = poll_fn(|cx| {
            let signals = handle.take_signals(cx);
            want_drain |= signals & signal::QUEUED != 0;
            want_ping |= signals & signal::PING != 0;
            if handle.close_reason().is_some() {
                return Poll::Ready(Wake::Close);
            }
            let has_work = want_drain || want_ping || !conn.unsent.is_empty();
            let writable = conn.unsent.is_empty() || conn.stream.poll_write_ready(cx).is_ready();
            if has_work && writable {
                return Poll::Ready(Wake::Write);
            }
            if conn.unsent.len() <= limits.max_unsent && conn.stream.poll_read_ready(cx).is_ready()
            {
                return Poll::Ready(Wake::Read);
            }
            Poll::Pending
        })
        .await;
        let outcome = match wake {
            Wake::Close => break,
            Wake::Write => conn.write(handle, &mut want_drain, &mut want_ping, limits),
            Wake::Read => match conn.read() {
                Ok(Some((decoded, events))) => {
                    // Boxed: most sockets never send anything, and inlined
                    // this future would grow every idle socket's task.
                    match Box::pin(conn.handle_input(decoded, events, handle, registry, terminal))
                        .await
                    {
                        Some(end) => return Box::pin(conn.finish(end, handle)).await,
                        None => Ok(()),
                    }
                }
                Ok(None) => Ok(()),
                Err(err) => Err(err),
            },
        };
        if outcome.is_err() {
            return End::Gone;
        }
    }
    let reason = handle.close_reason().unwrap_or(CloseReason::Shutdown);
    Box::pin(conn.finish(End::Server(reason), handle)).await
}

impl Connection {
    /// Reads what is there into the thread's buffer and decodes it. `Ok(None)`
    /// when the readiness was spurious.
    #[allow(clippy::type_complexity)]
    fn read(&mut self) -> io::Result<Option<(Result<usize, Violation>, Vec<Event>)>> {
        READ_BUFFER.with_borrow_mut(|buffer| match self.stream.try_read(buffer) {
            Ok(0) => Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => {
                let mut events = Vec::new();
                let decoded = self.decoder.feed(&buffer[..n], &mut events);
                Ok(Some((decoded, events)))
            }
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => Ok(None),
            Err(err) => Err(err),
        })
    }

    /// Acts on decoded input; returns how the socket ends, when it does.
    async fn handle_input<T: Terminal>(
        &mut self,
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
                        self.send(&frame::encode(frame::TEXT, reply.as_bytes()));
                    }
                }
                Event::Binary { .. } => terminal.on_ignored(),
                Event::Ping(payload) => self.send(&frame::encode(frame::PONG, &payload)),
                Event::Pong => {}
                Event::Close(code) => {
                    // RFC 6455 5.5.1: answer with a Close echoing the code.
                    let code = code.map(|(code, _)| code);
                    let answer = match code {
                        Some(code) => frame::close_frame(code, ""),
                        None => frame::encode(frame::CLOSE, b""),
                    };
                    self.unsent.extend_from_slice(&answer);
                    return Some(End::Terminal(code));
                }
            }
        }
        None
    }

    /// Sends `bytes` after whatever is still unsent.
    fn send(&mut self, bytes: &[u8]) {
        if self.unsent.is_empty() {
            match self.stream.try_write(bytes) {
                Ok(n) if n == bytes.len() => {}
                Ok(n) => self.unsent.extend_from_slice(&bytes[n..]),
                // Errors show on the next read or write.
                Err(_) => self.unsent.extend_from_slice(bytes),
            }
        } else {
            self.unsent.extend_from_slice(bytes);
        }
    }

    /// Moves unsent bytes, then a ping and a batch of queued messages, to the
    /// kernel, as far as it takes them.
    fn write(
        &mut self,
        handle: &SocketHandle,
        want_drain: &mut bool,
        want_ping: &mut bool,
        limits: Limits,
    ) -> io::Result<()> {
        if !self.flush_unsent()? {
            return Ok(());
        }
        if std::mem::take(want_ping) {
            self.send(&frame::encode(frame::PING, b""));
        }
        if *want_drain && self.unsent.is_empty() {
            let mut batch = Vec::with_capacity(WRITE_BATCH);
            *want_drain = handle.drain_into(&mut batch, WRITE_BATCH, limits.max_batch_bytes);
            self.write_batch(&batch)?;
        }
        Ok(())
    }

    /// Writes unsent bytes; returns whether none are left.
    fn flush_unsent(&mut self) -> io::Result<bool> {
        while !self.unsent.is_empty() {
            match self.stream.try_write(&self.unsent) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    self.unsent.drain(..n);
                }
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(err) => return Err(err),
            }
        }
        // Drained: give the buffer back.
        self.unsent = Vec::new();
        Ok(true)
    }

    /// One `writev` of text frames for `batch`; what the kernel refuses is
    /// copied to `unsent`.
    fn write_batch(&mut self, batch: &[Utf8Bytes]) -> io::Result<()> {
        if batch.is_empty() {
            return Ok(());
        }
        let mut heads = [[0u8; frame::MAX_SERVER_HEADER]; WRITE_BATCH];
        let mut head_lens = [0usize; WRITE_BATCH];
        for (i, text) in batch.iter().enumerate() {
            head_lens[i] = frame::header(frame::TEXT, text.len(), &mut heads[i]);
        }
        let mut slices = Vec::with_capacity(batch.len() * 2);
        for (i, text) in batch.iter().enumerate() {
            slices.push(IoSlice::new(&heads[i][..head_lens[i]]));
            slices.push(IoSlice::new(text.as_bytes()));
        }
        let written = match self.stream.try_write_vectored(&slices) {
            Ok(n) => n,
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => 0,
            Err(err) => return Err(err),
        };
        let mut skip = written;
        for slice in &slices {
            if skip >= slice.len() {
                skip -= slice.len();
                continue;
            }
            self.unsent.extend_from_slice(&slice[skip..]);
            skip = 0;
        }
        Ok(())
    }

    /// Ends the socket as `end` says: sends the close frame it calls for,
    /// then waits (bounded) for the bytes to leave and the terminal to answer.
    async fn finish(mut self, end: End, handle: &SocketHandle) -> End {
        let drain_for = match end {
            End::Gone => return end,
            End::Terminal(_) => CLOSE_TIMEOUT,
            End::Server(reason) => {
                handle.discard_queue();
                self.unsent
                    .extend_from_slice(&frame::close_frame(reason.code(), reason.text()));
                if reason == CloseReason::SlowConsumer {
                    SLOW_CONSUMER_DRAIN
                } else {
                    CLOSE_TIMEOUT
                }
            }
        };
        let sent = tokio::time::timeout(drain_for, async {
            while !self.flush_unsent()? {
                self.stream.writable().await?;
            }
            io::Result::Ok(())
        })
        .await;
        if !matches!(sent, Ok(Ok(()))) {
            return end;
        }
        let _ = self.stream.shutdown().await;
        if matches!(end, End::Server(_)) {
            // Wait for the terminal's Close (or EOF), so closing the socket
            // with unread bytes does not reset the connection under it.
            let _ = tokio::time::timeout(CLOSE_TIMEOUT, self.discard_until_eof()).await;
        }
        end
    }

    /// Reads and drops input until the terminal closes its side.
    async fn discard_until_eof(&mut self) -> io::Result<()> {
        loop {
            self.stream.readable().await?;
            let read = READ_BUFFER.with_borrow_mut(|buffer| self.stream.try_read(buffer));
            match read {
                Ok(0) => return Ok(()),
                Ok(_) => {}
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => {}
                Err(err) => return Err(err),
            }
        }
    }
}
