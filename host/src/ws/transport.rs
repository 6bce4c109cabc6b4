//! What a socket's bytes travel on after the handshake: the TCP stream
//! itself, or TLS over it (`--tls-cert`).
//!
//! The socket core reads on readiness and lets whoever delivers write from
//! their own thread (see [`super::outbound`]), so it cannot use an async TLS
//! stream. With TLS it drives the rustls connection itself, as it drives the
//! TCP stream: a read pulls records from the kernel and returns plaintext; a
//! write encrypts under the connection's lock and hands the records to the
//! kernel as far as it takes them. Records the kernel refused stay inside
//! rustls ([`Transport::has_pending_output`]) and go first at the next write
//! or flush, exactly like a plain socket's unsent bytes. The lock order is
//! always the socket's outbound mutex, then this one.
//!
//! A plain socket pays one enum match per call; the TLS state is boxed, so
//! it does not grow plain sockets.

use std::io::{self, IoSlice, Read, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::task::{Context, Poll};

use tokio::net::TcpStream;
use tokio_rustls::rustls::ServerConnection;

/// See the module docs.
#[derive(Debug)]
pub enum Transport {
    Plain(TcpStream),
    Tls(Box<TlsTransport>),
}

#[derive(Debug)]
pub struct TlsTransport {
    tcp: TcpStream,
    conn: Mutex<ServerConnection>,
    /// rustls may hold decrypted bytes that the kernel no longer signals:
    /// true until a read finds none (and always at the hand-over from the
    /// handshake, whose TLS stream may have read ahead).
    maybe_buffered: AtomicBool,
}

impl Transport {
    /// TLS over `tcp`, taken over from a finished handshake.
    pub fn tls(tcp: TcpStream, conn: ServerConnection) -> Self {
        Transport::Tls(Box::new(TlsTransport {
            tcp,
            conn: Mutex::new(conn),
            maybe_buffered: AtomicBool::new(true),
        }))
    }

    pub fn tcp(&self) -> &TcpStream {
        match self {
            Transport::Plain(tcp) => tcp,
            Transport::Tls(tls) => &tls.tcp,
        }
    }

    /// Reads plaintext; `WouldBlock` when there is none.
    pub fn try_read(&self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Transport::Plain(tcp) => tcp.try_read(buf),
            Transport::Tls(tls) => tls.read(buf),
        }
    }

    /// Writes plaintext as far as the kernel takes it (for TLS: as far as it
    /// took the records still held, and then as far as rustls takes more).
    pub fn try_write_vectored(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        match self {
            Transport::Plain(tcp) => tcp.try_write_vectored(bufs),
            Transport::Tls(tls) => tls.write(bufs),
        }
    }

    /// [`Self::try_write`] for a delivery's frame: on plain TCP one `send()`
    /// on the descriptor, without consulting tokio's readiness, which lives
    /// in an allocation of its own: at 19,000 sockets that is a cache line
    /// fetched per socket per message for an answer the kernel gives anyway.
    /// Safe to mix with tokio's calls: a `WouldBlock` here leaves tokio's
    /// readiness set, so whoever waits next (the socket's task) first tries
    /// through tokio, which then sees the `WouldBlock` and clears it.
    pub fn try_write_direct(&self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Transport::Plain(tcp) => socket2::SockRef::from(tcp).send(buf),
            Transport::Tls(_) => self.try_write(buf),
        }
    }

    pub fn try_write(&self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Transport::Plain(tcp) => tcp.try_write(buf),
            Transport::Tls(tls) => tls.write(&[IoSlice::new(buf)]),
        }
    }

    /// Whether encrypted bytes wait for the kernel (never, for plain TCP).
    pub fn has_pending_output(&self) -> bool {
        match self {
            Transport::Plain(_) => false,
            Transport::Tls(tls) => tls.lock().wants_write(),
        }
    }

    /// Moves held encrypted bytes to the kernel; whether none are left.
    pub fn flush_pending(&self) -> io::Result<bool> {
        match self {
            Transport::Plain(_) => Ok(true),
            Transport::Tls(tls) => flush_records(&mut tls.lock(), &tls.tcp),
        }
    }

    /// Ready to read: the kernel says so, or rustls may hold plaintext.
    pub fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if let Transport::Tls(tls) = self
            && tls.maybe_buffered.load(Ordering::Relaxed)
        {
            return Poll::Ready(Ok(()));
        }
        self.tcp().poll_read_ready(cx)
    }

    pub fn poll_write_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.tcp().poll_write_ready(cx)
    }

    pub async fn readable(&self) -> io::Result<()> {
        std::future::poll_fn(|cx| self.poll_read_ready(cx)).await
    }

    pub async fn writable(&self) -> io::Result<()> {
        self.tcp().writable().await
    }

    /// Ends the sending side: TLS says `close_notify` first (best effort),
    /// then the TCP write half is shut.
    pub fn shutdown_write(&self) {
        if let Transport::Tls(tls) = self {
            let mut conn = tls.lock();
            conn.send_close_notify();
            let _ = flush_records(&mut conn, &tls.tcp);
        }
        let _ = socket2::SockRef::from(self.tcp()).shutdown(std::net::Shutdown::Write);
    }
}

impl TlsTransport {
    fn lock(&self) -> MutexGuard<'_, ServerConnection> {
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        let mut conn = self.lock();
        loop {
            match conn.reader().read(buf) {
                Ok(n) => {
                    // 0: the terminal sent close_notify (a clean end).
                    self.maybe_buffered.store(n > 0, Ordering::Relaxed);
                    return Ok(n);
                }
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => {}
                Err(err) => return Err(err),
            }
            self.maybe_buffered.store(false, Ordering::Relaxed);
            let eof = match conn.read_tls(&mut Kernel(&self.tcp)) {
                Ok(0) => true,
                Ok(_) => false,
                Err(err) => return Err(err),
            };
            if let Err(err) = conn.process_new_packets() {
                // rustls queued an alert saying why; send it if it goes.
                let _ = flush_records(&mut conn, &self.tcp);
                return Err(io::Error::new(io::ErrorKind::InvalidData, err));
            }
            if eof {
                // TCP ended: what rustls still holds, then the end.
                return match conn.reader().read(buf) {
                    Ok(n) => Ok(n),
                    Err(err) if err.kind() == io::ErrorKind::WouldBlock => Ok(0),
                    Err(err) => Err(err),
                };
            }
        }
    }

    fn write(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        let mut conn = self.lock();
        // Records refused earlier go first; while any wait, nothing new is
        // taken, so the bytes held stay bounded by one write.
        if !flush_records(&mut conn, &self.tcp)? {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let taken = conn.writer().write_vectored(bufs)?;
        if taken == 0 && bufs.iter().any(|b| !b.is_empty()) {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        // What the kernel refuses now waits in rustls (`has_pending_output`).
        // The plaintext is taken either way; a broken socket shows at the
        // next call.
        let _ = flush_records(&mut conn, &self.tcp);
        Ok(taken)
    }
}

/// Hands rustls's encrypted records to the kernel; whether none are left.
fn flush_records(conn: &mut ServerConnection, tcp: &TcpStream) -> io::Result<bool> {
    while conn.wants_write() {
        match conn.write_tls(&mut Kernel(tcp)) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(_) => {}
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => return Ok(false),
            Err(err) => return Err(err),
        }
    }
    Ok(true)
}

/// The TCP stream as the blocking-style `Read`/`Write` rustls wants,
/// answering `WouldBlock` instead of blocking.
struct Kernel<'a>(&'a TcpStream);

impl Read for Kernel<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.try_read(buf)
    }
}

impl Write for Kernel<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.try_write(buf)
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        self.0.try_write_vectored(bufs)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
