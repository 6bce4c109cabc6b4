//! Terminal connections from source addresses the bench picks itself.
//!
//! Thousands of connections from one address to one server make the load
//! generator's own kernel the bottleneck of a connect: `connect()` searches
//! the ephemeral ports for one whose 4-tuple is free, and with 19,000 ports
//! held (plus the previous runs' `TIME_WAIT`s) that search
//! (`__inet_hash_connect`, `__inet_check_established`) took 45 % of the
//! load generator's CPU in a profile, more than any server spent on its
//! connects. Terminals of a real server come from many addresses. Here each
//! server run gets a loopback source address of its own (all of
//! 127.0.0.0/8 is local) and every connection an explicit port on it, so a
//! connect costs the client the same whichever server it reaches, and
//! connects/s compares the servers.

use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU16, AtomicU32, Ordering};

use tokio::net::{TcpSocket, TcpStream};

/// The first port tried on each source address: above the well-known and
/// registered ports most services listen on, below Linux's ephemeral range.
const FIRST_PORT: u16 = 10_000;

/// Source addresses handed out so far in this process.
static ADDRESSES: AtomicU32 = AtomicU32::new(0);

/// One loopback source address and the next port to bind on it.
pub struct SourcePorts {
    ip: Ipv4Addr,
    next: AtomicU16,
}

impl SourcePorts {
    /// A source address no earlier call in this process used, from
    /// 127.1.0.1 on (127.0.0.1 stays with everything else).
    pub fn fresh() -> Self {
        let k = ADDRESSES.fetch_add(1, Ordering::Relaxed);
        // 250 addresses per /24, none ending in 0 or 255.
        let (high, low) = (k / 250, (k % 250) as u8 + 1);
        let [_, _, b, c] = (0x0100 + high).to_be_bytes();
        Self {
            ip: Ipv4Addr::new(127, b, c, low),
            next: AtomicU16::new(FIRST_PORT),
        }
    }

    /// Connects to `server` from the next free port of this address. A port
    /// some listener holds on every address is skipped.
    pub async fn connect(&self, server: SocketAddr) -> io::Result<TcpStream> {
        loop {
            let port = self.next.fetch_add(1, Ordering::Relaxed);
            if port < FIRST_PORT {
                return Err(io::Error::new(
                    io::ErrorKind::AddrNotAvailable,
                    format!("no source port left on {}", self.ip),
                ));
            }
            let socket = TcpSocket::new_v4()?;
            // A port of this address may still be in TIME_WAIT from an
            // earlier connection; the 4-tuple differs, so reuse is safe.
            socket.set_reuseaddr(true)?;
            match socket.bind(SocketAddr::from((self.ip, port))) {
                Ok(()) => return socket.connect(server).await,
                Err(err) if err.kind() == io::ErrorKind::AddrInUse => continue,
                Err(err) => return Err(err),
            }
        }
    }
}
