//! A socket's outbound side, shared by whoever delivers to it and by its own
//! task: the queue, the bytes the kernel refused, and the writes themselves.
//!
//! Delivering writes straight to the kernel when nothing waits ahead of the
//! message: one `write()` of the frame built on the stack (a `writev` of the
//! header and the shared message bytes when it is big), from the delivering
//! thread, with no queue, no wake-up and no task switch. That is the common
//! case, and it costs what the raw-write floor costs. Only when the kernel
//! refuses (or bytes already wait) does the message go to the bounded
//! queue, and the socket's task, woken, drains it as the socket becomes
//! writable, up to 64 messages per `writev`.
//!
//! Every write happens under the socket's mutex, so frames never interleave;
//! a partly written frame's rest is kept in `unsent` and goes first. With TLS
//! the "kernel" is the [`Transport`], which may hold encrypted records the
//! kernel refused: they count as pending like `unsent`.

use std::collections::VecDeque;
use std::io::{self, IoSlice};
use tungstenite::Utf8Bytes;

use super::frame;
use super::transport::Transport;

/// How many queued messages one `writev` carries at most.
pub const WRITE_BATCH: usize = 64;

/// What became of a message handed to a socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pushed {
    /// The kernel took all of it.
    Written,
    /// It waits in the queue (or partly in `unsent`): the task must write.
    Queued,
    /// The queue is full: a slow consumer.
    Full,
    /// The socket is closing; nothing more is sent.
    Closed,
}

/// See the module docs.
///
/// The stream itself lives beside it in the socket's handle, outside the
/// mutex (the socket's task reads from it without locking), and every
/// method that writes is given it: `None` only for sockets made in unit
/// tests, where everything is queued.
///
/// What waits is boxed: almost always nothing does, and then the outbound
/// side is two words, so a delivery's write reads the lock, this and the
/// stream from the handle's first two cache lines (see `docs/architecture.md`,
/// where the bytes go).
#[derive(Debug, Default)]
pub struct Outbound {
    /// Bytes and messages waiting for the kernel; `None` (nothing
    /// allocated) once they have all gone.
    backlog: Option<Box<Backlog>>,
    /// A close frame is on its way: nothing more is written.
    closed: bool,
}

#[derive(Debug, Default)]
struct Backlog {
    queue: VecDeque<Utf8Bytes>,
    /// Bytes the kernel has not taken yet, in order; they go before the queue.
    unsent: Vec<u8>,
    /// A pong waits in `unsent`: a later ping is answered by it (RFC 6455
    /// section 5.5.3 allows answering only the latest), so a terminal that
    /// pings without reading queues one pong, not one per ping.
    pong_waiting: bool,
}

impl Outbound {
    /// Hands `text` to the socket: written at once when nothing waits ahead
    /// of it, else queued unless `bound` messages wait already.
    pub fn push(&mut self, stream: Option<&Transport>, text: &Utf8Bytes, bound: usize) -> Pushed {
        if self.closed {
            return Pushed::Closed;
        }
        if self.backlog.is_none()
            && let Some(stream) = stream
        {
            let mut head = [0u8; frame::MAX_SERVER_HEADER];
            let n = frame::header(frame::TEXT, text.len(), &mut head);
            let parts = [&head[..n], text.as_bytes()];
            match write_frame(stream, &parts) {
                // TLS may still hold records the kernel refused: the task
                // must write them.
                Ok(written) if written == n + text.len() => {
                    return if stream.has_pending_output() {
                        Pushed::Queued
                    } else {
                        Pushed::Written
                    };
                }
                Ok(written) => {
                    keep_unwritten(&mut self.backlog().unsent, &parts, written);
                    return Pushed::Queued;
                }
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => {}
                // Broken (the peer reset or went away): nothing more can be
                // sent, and queuing would only fill up and look like a slow
                // consumer. Its task finds out when it reads.
                Err(_) => {
                    self.closed = true;
                    self.backlog = None;
                    return Pushed::Closed;
                }
            }
        }
        if self.queued() >= bound {
            return Pushed::Full;
        }
        self.backlog().queue.push_back(text.clone());
        Pushed::Queued
    }

    /// Hands `texts` to the socket in order: when nothing waits ahead of
    /// them, all in one `writev` (at most [`WRITE_BATCH`] frames; the rest,
    /// and whatever the kernel refuses, queued), else queued. `Full` when
    /// the queue would pass `bound`: the frames before it still go.
    pub fn push_many(
        &mut self,
        stream: Option<&Transport>,
        texts: &[&Utf8Bytes],
        bound: usize,
    ) -> Pushed {
        match texts {
            [] => return Pushed::Written,
            [one] => return self.push(stream, one, bound),
            _ => {}
        }
        if self.closed {
            return Pushed::Closed;
        }
        let mut written_all = 0;
        if self.backlog.is_none()
            && let Some(stream) = stream
        {
            let count = texts.len().min(WRITE_BATCH);
            let mut heads = [[0u8; frame::MAX_SERVER_HEADER]; WRITE_BATCH];
            let mut slices = [IoSlice::new(&[]); 2 * WRITE_BATCH];
            let mut head_lens = [0usize; WRITE_BATCH];
            for (i, text) in texts[..count].iter().enumerate() {
                head_lens[i] = frame::header(frame::TEXT, text.len(), &mut heads[i]);
            }
            for (i, text) in texts[..count].iter().enumerate() {
                slices[2 * i] = IoSlice::new(&heads[i][..head_lens[i]]);
                slices[2 * i + 1] = IoSlice::new(text.as_bytes());
            }
            match stream.try_write_vectored(&slices[..2 * count]) {
                Ok(mut written) => {
                    for (i, text) in texts[..count].iter().enumerate() {
                        let len = head_lens[i] + text.len();
                        if written >= len {
                            written -= len;
                            written_all += 1;
                            continue;
                        }
                        if written > 0 {
                            // The kernel stopped inside this frame: its rest
                            // goes first, the frames after it queue.
                            let parts = [&heads[i][..head_lens[i]], text.as_bytes()];
                            keep_unwritten(&mut self.backlog().unsent, &parts, written);
                            written_all += 1;
                        }
                        break;
                    }
                }
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => {}
                Err(_) => {
                    self.closed = true;
                    self.backlog = None;
                    return Pushed::Closed;
                }
            }
            if written_all == texts.len() {
                return if self.backlog.is_some() || stream.has_pending_output() {
                    Pushed::Queued
                } else {
                    Pushed::Written
                };
            }
        }
        for text in &texts[written_all..] {
            if self.queued() >= bound {
                return Pushed::Full;
            }
            self.backlog().queue.push_back((*text).clone());
        }
        Pushed::Queued
    }

    /// The backlog, allocated if there was none.
    fn backlog(&mut self) -> &mut Backlog {
        self.backlog.get_or_insert_with(Box::default)
    }

    /// How many messages wait in the queue.
    fn queued(&self) -> usize {
        self.backlog.as_ref().map_or(0, |b| b.queue.len())
    }

    /// Whether bytes wait for the kernel (unsent, queued, or held by TLS).
    pub fn has_pending(&self, stream: Option<&Transport>) -> bool {
        self.backlog
            .as_ref()
            .is_some_and(|b| !b.unsent.is_empty() || !b.queue.is_empty())
            || stream.is_some_and(Transport::has_pending_output)
    }

    /// How many bytes of partly written frames wait.
    pub fn unsent_len(&self) -> usize {
        self.backlog.as_ref().map_or(0, |b| b.unsent.len())
    }

    /// Sends a whole frame (a control frame or a reply) after whatever is
    /// unsent; it may go before queued messages, never inside a frame.
    pub fn send(&mut self, stream: Option<&Transport>, bytes: &[u8]) {
        if self.closed {
            return;
        }
        if self.unsent_len() == 0
            && let Some(stream) = stream
        {
            match stream.try_write(bytes) {
                Ok(n) if n == bytes.len() => {}
                Ok(n) => self.backlog().unsent.extend_from_slice(&bytes[n..]),
                Err(_) => self.backlog().unsent.extend_from_slice(bytes),
            }
        } else {
            self.backlog().unsent.extend_from_slice(bytes);
        }
    }

    /// Sends a pong unless one already waits for the kernel; false when
    /// this one was left out (the waiting one answers it).
    pub fn send_pong(&mut self, stream: Option<&Transport>, pong: &[u8]) -> bool {
        if self.backlog.as_ref().is_some_and(|b| b.pong_waiting) {
            return false;
        }
        self.send(stream, pong);
        if let Some(backlog) = self.backlog.as_mut()
            && !backlog.unsent.is_empty()
        {
            backlog.pong_waiting = true;
        }
        true
    }

    /// Drops the queue and puts `close` last: nothing is sent after it.
    pub fn close_with(&mut self, close: &[u8]) {
        if self.closed {
            return;
        }
        let backlog = self.backlog();
        backlog.queue = VecDeque::new();
        backlog.unsent.extend_from_slice(close);
        self.closed = true;
    }

    /// Moves unsent bytes, then queued messages (at most `WRITE_BATCH` and
    /// `max_batch_bytes` per `writev`), to the kernel as far as it takes
    /// them. Returns whether nothing is left.
    pub fn flush(
        &mut self,
        stream: Option<&Transport>,
        max_batch_bytes: usize,
    ) -> io::Result<bool> {
        let Some(stream) = stream else {
            return Ok(!self.has_pending(None));
        };
        if let Some(backlog) = self.backlog.as_mut() {
            if !backlog.flush(stream, max_batch_bytes)? {
                return Ok(false);
            }
            // Drained: give its memory back.
            self.backlog = None;
        }
        stream.flush_pending()
    }
}

impl Backlog {
    /// Unsent bytes, then the queue, to the kernel; whether it took them all.
    fn flush(&mut self, stream: &Transport, max_batch_bytes: usize) -> io::Result<bool> {
        while !self.unsent.is_empty() {
            match stream.try_write(&self.unsent) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    self.unsent.drain(..n);
                }
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(err) => return Err(err),
            }
        }
        self.pong_waiting = false;
        while !self.queue.is_empty() {
            if !self.write_batch(stream, max_batch_bytes)? {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// One `writev` of the first queued messages; what the kernel refuses of
    /// a frame is kept in `unsent`. Returns whether the kernel took it all.
    fn write_batch(&mut self, stream: &Transport, max_batch_bytes: usize) -> io::Result<bool> {
        let mut heads = [[0u8; frame::MAX_SERVER_HEADER]; WRITE_BATCH];
        let mut head_lens = [0usize; WRITE_BATCH];
        let mut count = 0;
        let mut bytes = 0;
        for text in self.queue.iter().take(WRITE_BATCH) {
            if count > 0 && bytes >= max_batch_bytes {
                break;
            }
            head_lens[count] = frame::header(frame::TEXT, text.len(), &mut heads[count]);
            bytes += text.len();
            count += 1;
        }
        let mut slices = [IoSlice::new(&[]); 2 * WRITE_BATCH];
        for (i, text) in self.queue.iter().take(count).enumerate() {
            slices[2 * i] = IoSlice::new(&heads[i][..head_lens[i]]);
            slices[2 * i + 1] = IoSlice::new(text.as_bytes());
        }
        let mut written = match stream.try_write_vectored(&slices[..2 * count]) {
            Ok(n) => n,
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => return Ok(false),
            Err(err) => return Err(err),
        };
        for i in 0..count {
            let head = &heads[i][..head_lens[i]];
            let Some(text) = self.queue.pop_front() else {
                break;
            };
            let len = head.len() + text.len();
            if written >= len {
                written -= len;
                continue;
            }
            // The kernel stopped inside this frame: keep its rest, and leave
            // the messages after it queued.
            keep_unwritten(&mut self.unsent, &[head, text.as_bytes()], written);
            return Ok(false);
        }
        Ok(true)
    }
}

#[cfg(test)]
impl Outbound {
    /// Empties the queue, for tests.
    pub fn take_queue(&mut self) -> Vec<Utf8Bytes> {
        self.backlog
            .as_mut()
            .map(|b| b.queue.drain(..).collect())
            .unwrap_or_default()
    }
}

/// Frames up to this size (header included) are copied into one buffer on
/// the stack and sent with one `write()`; bigger ones go by `writev`, which
/// costs the kernel more per call than copying a chat message does here.
const SMALL_FRAME: usize = 512;

/// Writes a frame given as its header and payload, without blocking.
fn write_frame(stream: &Transport, parts: &[&[u8]; 2]) -> io::Result<usize> {
    let len = parts[0].len() + parts[1].len();
    if len <= SMALL_FRAME {
        let mut frame = [0u8; SMALL_FRAME];
        frame[..parts[0].len()].copy_from_slice(parts[0]);
        frame[parts[0].len()..len].copy_from_slice(parts[1]);
        return stream.try_write_direct(&frame[..len]);
    }
    stream.try_write_vectored(&[IoSlice::new(parts[0]), IoSlice::new(parts[1])])
}

/// Appends what is left of `parts` after `written` bytes to `unsent`.
fn keep_unwritten(unsent: &mut Vec<u8>, parts: &[&[u8]], mut written: usize) {
    for part in parts {
        if written >= part.len() {
            written -= part.len();
            continue;
        }
        unsent.extend_from_slice(&part[written..]);
        written = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_a_stream_everything_queues_up_to_the_bound() {
        let mut out = Outbound::default();
        let text = Utf8Bytes::from("x");
        assert_eq!(out.push(None, &text, 2), Pushed::Queued);
        assert_eq!(out.push(None, &text, 2), Pushed::Queued);
        assert_eq!(out.push(None, &text, 2), Pushed::Full);
        out.close_with(b"close");
        assert_eq!(out.push(None, &text, 2), Pushed::Closed);
        assert_eq!(out.queued(), 0);
        assert_eq!(
            out.backlog.as_ref().map(|b| b.unsent.as_slice()),
            Some(&b"close"[..])
        );
    }

    /// A connected loopback pair: the server side (with a small send
    /// buffer) and the terminal side.
    async fn pair() -> (Transport, tokio::net::TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let terminal = tokio::net::TcpSocket::new_v4().expect("socket");
        terminal.set_recv_buffer_size(4096).expect("rcvbuf");
        let terminal = terminal
            .connect(listener.local_addr().expect("addr"))
            .await
            .expect("connect");
        let (server, _) = listener.accept().await.expect("accept");
        socket2::SockRef::from(&server)
            .set_send_buffer_size(4096)
            .expect("sndbuf");
        (Transport::Plain(server), terminal)
    }

    #[tokio::test]
    async fn writes_go_straight_out_until_the_kernel_refuses_then_queue_in_order() {
        use tokio::io::AsyncReadExt;

        let (server, mut terminal) = pair().await;
        let stream = Some(&server);
        let mut out = Outbound::default();
        let first = Utf8Bytes::from("hello");
        assert_eq!(out.push(stream, &first, 100), Pushed::Written);
        assert!(!out.has_pending(stream));
        // Nobody reads: the kernel fills up, takes part of a frame, then
        // refuses; the rest waits in order.
        let big = Utf8Bytes::from("z".repeat(3000));
        let mut pushed = 1;
        while !out.has_pending(stream) {
            out.push(stream, &big, 1000);
            pushed += 1;
        }
        for _ in 0..20 {
            assert_eq!(out.push(stream, &big, 1000), Pushed::Queued);
            pushed += 1;
        }
        let expected = 7 + (pushed - 1) * (4 + 3000);
        let reader = tokio::spawn(async move {
            let mut got = vec![0u8; expected];
            terminal.read_exact(&mut got).await.expect("read");
            got
        });
        while !out.flush(stream, 1 << 20).expect("flush") {
            server.writable().await.expect("writable");
        }
        let got = reader.await.expect("reader");
        assert_eq!(&got[..7], b"\x81\x05hello");
        for frame in got[7..].chunks(3004) {
            assert_eq!(&frame[..4], &[0x81, 126, 0x0b, 0xb8]);
            assert!(frame[4..].iter().all(|b| *b == b'z'));
        }
        assert!(out.backlog.is_none(), "memory given back");
    }

    #[tokio::test]
    async fn a_broken_socket_is_closed_not_queued_up() {
        let (server, terminal) = pair().await;
        drop(terminal);
        let stream = Some(&server);
        let mut out = Outbound::default();
        let text = Utf8Bytes::from("x");
        // The first write after the peer left is accepted (and answered with
        // a reset); a later one fails, and from then on nothing is queued.
        let mut outcomes = Vec::new();
        for _ in 0..100 {
            let pushed = out.push(stream, &text, 1000);
            outcomes.push(pushed);
            if pushed == Pushed::Closed {
                break;
            }
            tokio::task::yield_now().await;
        }
        assert_eq!(outcomes.last(), Some(&Pushed::Closed), "{outcomes:?}");
        assert!(!outcomes.contains(&Pushed::Full));
        assert!(out.backlog.is_none());
        assert_eq!(out.push(stream, &text, 1000), Pushed::Closed);
    }

    #[tokio::test]
    async fn one_pong_waits_at_a_time_until_the_kernel_takes_it() {
        use tokio::io::AsyncReadExt;

        let (server, mut terminal) = pair().await;
        let stream = Some(&server);
        let mut out = Outbound::default();
        let big = Utf8Bytes::from("z".repeat(3000));
        while !out.has_pending(stream) {
            out.push(stream, &big, 1000);
        }
        assert!(out.send_pong(stream, b"\x8a\x00"), "the first pong waits");
        assert!(
            !out.send_pong(stream, b"\x8a\x00"),
            "the next is answered by it"
        );
        assert!(!out.send_pong(stream, b"\x8a\x00"));
        let reader = tokio::spawn(async move {
            let mut sink = vec![0u8; 1 << 16];
            while terminal.read(&mut sink).await.is_ok_and(|n| n > 0) {}
        });
        while !out.flush(stream, 1 << 20).expect("flush") {
            server.writable().await.expect("writable");
        }
        assert!(
            out.send_pong(stream, b"\x8a\x00"),
            "gone out: a new ping gets its pong"
        );
        reader.abort();
    }

    #[test]
    fn the_rest_of_a_cut_frame_is_kept_in_order() {
        let mut unsent = Vec::new();
        keep_unwritten(&mut unsent, &[b"ab", b"cdef"], 3);
        assert_eq!(unsent, b"def");
        keep_unwritten(&mut unsent, &[b"gh", b"ij"], 0);
        assert_eq!(unsent, b"defghij");
    }
}
