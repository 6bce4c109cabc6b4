//! A terminal: a real WebSocket client whose every read has a deadline.

use futures_util::{SinkExt, StreamExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{Error, Message};

use crate::DEADLINE;

pub struct Terminal {
    pub ws: WebSocketStream<TcpStream>,
}

/// `connect` under [`DEADLINE`]: a node that accepts and never answers
/// fails the test (a timed-out I/O error) instead of hanging it.
async fn within_deadline<T>(
    connect: impl std::future::Future<Output = Result<T, Error>>,
) -> Result<T, Error> {
    tokio::time::timeout(DEADLINE, connect)
        .await
        .unwrap_or_else(|_| {
            Err(Error::Io(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "no WebSocket handshake within the deadline",
            )))
        })
}

fn host_port(url: &str) -> &str {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    rest.split('/').next().unwrap_or(rest)
}

impl Terminal {
    /// Opens `url` (`ws://host:port/ws?token=…`).
    ///
    /// # Errors
    /// The handshake failed; a refused connect is `Error::Http` with its status.
    pub async fn connect(url: &str) -> Result<Terminal, Error> {
        within_deadline(async {
            let tcp = TcpStream::connect(host_port(url)).await?;
            let (ws, _) = tokio_tungstenite::client_async(url, tcp).await?;
            Ok(Terminal { ws })
        })
        .await
    }

    /// Like [`Terminal::connect`], with a tiny kernel receive buffer, so a
    /// terminal that stops reading backs up into the server quickly.
    pub async fn connect_small_window(url: &str) -> Result<Terminal, Error> {
        within_deadline(Self::connect_small_window_now(url)).await
    }

    async fn connect_small_window_now(url: &str) -> Result<Terminal, Error> {
        let addr = tokio::net::lookup_host(host_port(url))
            .await?
            .next()
            .ok_or_else(|| Error::Io(std::io::Error::other("no address")))?;
        let socket = TcpSocket::new_v4()?;
        socket.set_recv_buffer_size(4096)?;
        let tcp = socket.connect(addr).await?;
        let (ws, _) = tokio_tungstenite::client_async(url, tcp).await?;
        Ok(Terminal { ws })
    }

    /// The next text frame; panics on close, error or deadline.
    pub async fn next_text(&mut self) -> String {
        loop {
            let frame = tokio::time::timeout(DEADLINE, self.ws.next())
                .await
                .expect("a text frame before the deadline");
            match frame {
                Some(Ok(Message::Text(text))) => return text.to_string(),
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                other => panic!("expected a text frame, got {other:?}"),
            }
        }
    }

    /// The next text frame parsed as JSON.
    pub async fn next_json(&mut self) -> serde_json::Value {
        let text = self.next_text().await;
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
    }

    /// Reads until the server closes; returns its close frame (None when the
    /// connection ended without one). Text frames on the way are returned too.
    pub async fn closed(&mut self) -> (Option<CloseFrame>, Vec<String>) {
        let mut texts = Vec::new();
        loop {
            let frame = tokio::time::timeout(DEADLINE, self.ws.next())
                .await
                .expect("the socket closes before the deadline");
            match frame {
                Some(Ok(Message::Close(frame))) => return (frame, texts),
                Some(Ok(Message::Text(text))) => texts.push(text.to_string()),
                Some(Ok(_)) => {}
                Some(Err(_)) | None => return (None, texts),
            }
        }
    }

    /// Sends a text frame.
    pub async fn send_text(&mut self, text: impl Into<String>) -> Result<(), Error> {
        self.ws.send(Message::text(text.into())).await
    }
}

/// The close code of a frame, for assertions.
pub fn code(frame: &Option<CloseFrame>) -> Option<u16> {
    frame.as_ref().map(|f| u16::from(f.code))
}

/// A terminal read continuously by a task (so it answers pings while a test
/// does other things); its text frames arrive on a queue.
pub struct Reader {
    frames: tokio::sync::mpsc::Receiver<String>,
    closed: tokio::sync::oneshot::Receiver<Option<u16>>,
}

impl Terminal {
    /// Hands the terminal to a reading task.
    pub fn into_reader(mut self) -> Reader {
        let (tx, frames) = tokio::sync::mpsc::channel(1024);
        let (done, closed) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            let code = loop {
                match self.ws.next().await {
                    Some(Ok(Message::Text(text))) => {
                        if tx.send(text.to_string()).await.is_err() {
                            break None;
                        }
                    }
                    Some(Ok(Message::Close(frame))) => break frame.map(|f| u16::from(f.code)),
                    Some(Ok(_)) => {}
                    Some(Err(_)) | None => break None,
                }
            };
            let _ = done.send(code);
        });
        Reader { frames, closed }
    }
}

impl Reader {
    /// The next text frame; panics if the socket closed or the deadline passed.
    pub async fn next_text(&mut self) -> String {
        tokio::time::timeout(DEADLINE, self.frames.recv())
            .await
            .expect("a text frame before the deadline")
            .expect("the socket is still open")
    }

    /// True while the socket has not been closed.
    pub fn is_open(&mut self) -> bool {
        matches!(
            self.closed.try_recv(),
            Err(tokio::sync::oneshot::error::TryRecvError::Empty)
        )
    }
}
