//! WebSocket frames (RFC 6455 section 5), decoded as bytes arrive.
//!
//! The socket core reads into one buffer per worker thread and hands whatever
//! arrived to [`Decoder::feed`]. The decoder keeps, per socket, only what a
//! frame boundary left unfinished: up to 14 header bytes, the state of the
//! frame whose payload is arriving, and, while a data message is incomplete,
//! its bytes. An idle socket's decoder owns no heap memory.
//!
//! Text is checked for UTF-8 as its bytes arrive, so a terminal that sends
//! invalid text is closed (1007) as soon as the bad bytes are read, not after
//! the rest of a large frame. Everything else the RFC forbids a client is a
//! [`Violation`]: reserved bits and opcodes, unmasked frames, fragmented or
//! oversized control frames, continuation frames out of place, malformed
//! close frames.
//!
//! The node only writes unfragmented, unmasked server frames: [`header`].

/// Frame opcodes (RFC 6455 section 5.2).
mod opcode {
    pub const CONTINUATION: u8 = 0x0;
    pub const TEXT: u8 = 0x1;
    pub const BINARY: u8 = 0x2;
    pub const CLOSE: u8 = 0x8;
    pub const PING: u8 = 0x9;
    pub const PONG: u8 = 0xA;
}

pub use opcode::{BINARY, CLOSE, CONTINUATION, PING, PONG, TEXT};

/// Control frames carry at most this many payload bytes.
pub const MAX_CONTROL_PAYLOAD: usize = 125;
/// The longest header the node writes (2 bytes + a 64-bit length).
pub const MAX_SERVER_HEADER: usize = 10;

/// A complete thing a terminal sent.
#[derive(Debug, PartialEq, Eq)]
pub enum Event {
    /// A whole text message, its UTF-8 checked.
    Text(String),
    /// A whole binary message; the node has no use for its bytes.
    Binary {
        len: usize,
    },
    Ping(Vec<u8>),
    Pong,
    /// The terminal's Close: its code and reason, if it gave them.
    Close(Option<(u16, String)>),
}

/// Why a terminal's bytes cannot be a WebSocket stream; each has its close code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Violation {
    /// 1002.
    #[error("protocol error: {0}")]
    Protocol(&'static str),
    /// 1007: text (or a close reason) that is not UTF-8.
    #[error("invalid UTF-8 in text")]
    InvalidUtf8,
    /// 1009: a frame or message longer than the limit.
    #[error("message over the size limit")]
    TooBig,
}

/// The frame whose payload is arriving.
#[derive(Debug, Clone, Copy)]
struct Frame {
    opcode: u8,
    fin: bool,
    mask: [u8; 4],
    /// Payload bytes still to come.
    remaining: u64,
    /// Payload bytes already unmasked (the mask key's phase).
    done: u64,
}

/// A data message whose frames are still arriving.
#[derive(Debug, Default)]
struct Partial {
    text: bool,
    /// Text bytes so far (binary payloads are counted, not kept).
    bytes: Vec<u8>,
    len: usize,
    /// How many of `bytes` are known to be valid UTF-8; the rest (at most 3
    /// bytes) is the start of a character whose end has not arrived.
    checked: usize,
}

/// The per-socket decoding state; see the module docs.
#[derive(Debug)]
pub struct Decoder {
    max_message: usize,
    head: [u8; 14],
    head_len: u8,
    frame: Option<Frame>,
    message: Option<Box<Partial>>,
    /// The payload of a control frame split across reads.
    control: Vec<u8>,
    /// Set once a Close arrived or a violation was found: nothing after counts.
    finished: bool,
}

impl Decoder {
    /// A decoder refusing frames and messages over `max_message` bytes.
    pub fn new(max_message: usize) -> Self {
        Self {
            max_message,
            head: [0; 14],
            head_len: 0,
            frame: None,
            message: None,
            control: Vec::new(),
            finished: false,
        }
    }

    /// Whether a frame or message is incomplete (the socket holds bytes for it).
    pub fn is_mid_frame(&self) -> bool {
        self.head_len > 0 || self.frame.is_some() || self.message.is_some()
    }

    /// Decodes `input`, pushing each complete event to `events`. Returns how
    /// many frames were completed (fragments and control frames included),
    /// which is what keeps a connection alive. After a Close or a violation,
    /// later input is ignored.
    pub fn feed(&mut self, mut input: &[u8], events: &mut Vec<Event>) -> Result<usize, Violation> {
        let mut frames = 0;
        while !input.is_empty() && !self.finished {
            let Some(frame) = self.frame else {
                input = self
                    .read_header(input)
                    .inspect_err(|_| self.finished = true)?;
                if let Some(frame) = self.frame
                    && frame.remaining == 0
                {
                    frames += 1;
                    self.frame_done(frame, events)
                        .inspect_err(|_| self.finished = true)?;
                }
                continue;
            };
            let take = usize::try_from(frame.remaining)
                .unwrap_or(usize::MAX)
                .min(input.len());
            let (chunk, rest) = input.split_at(take);
            input = rest;
            self.payload(frame, chunk)
                .inspect_err(|_| self.finished = true)?;
            let frame = self.frame.as_mut().expect("payload keeps the frame");
            frame.remaining -= take as u64;
            frame.done += take as u64;
            if frame.remaining == 0 {
                let frame = *frame;
                frames += 1;
                self.frame_done(frame, events)
                    .inspect_err(|_| self.finished = true)?;
            }
        }
        Ok(frames)
    }

    /// Collects header bytes; once the header is whole, checks it and starts
    /// the frame. Returns the input after what it used.
    fn read_header<'a>(&mut self, input: &'a [u8]) -> Result<&'a [u8], Violation> {
        let mut used = 0;
        loop {
            let have = usize::from(self.head_len);
            let need = header_len(&self.head[..have]);
            if have >= need {
                break;
            }
            let Some(&byte) = input.get(used) else {
                return Ok(&input[used..]);
            };
            self.head[have] = byte;
            self.head_len += 1;
            used += 1;
            if self.head_len == 2 {
                // Refuse what the first two bytes already show, without
                // waiting for a header that may never come.
                let (b0, b1) = (self.head[0], self.head[1]);
                if b0 & 0x70 != 0 {
                    return Err(Violation::Protocol("reserved bits set"));
                }
                if b1 & 0x80 == 0 {
                    return Err(Violation::Protocol("unmasked client frame"));
                }
            }
        }
        let head = &self.head[..usize::from(self.head_len)];
        let (b0, b1) = (head[0], head[1]);
        let fin = b0 & 0x80 != 0;
        let opcode = b0 & 0x0f;
        let (len, mask_at) = match b1 & 0x7f {
            126 => (u64::from(u16::from_be_bytes([head[2], head[3]])), 4),
            127 => {
                let mut eight = [0u8; 8];
                eight.copy_from_slice(&head[2..10]);
                let len = u64::from_be_bytes(eight);
                if len >> 63 != 0 {
                    return Err(Violation::Protocol("length with the top bit set"));
                }
                (len, 10)
            }
            short => (u64::from(short), 2),
        };
        let mut mask = [0u8; 4];
        mask.copy_from_slice(&head[mask_at..mask_at + 4]);
        self.head_len = 0;
        match opcode {
            opcode::CLOSE | opcode::PING | opcode::PONG => {
                if !fin {
                    return Err(Violation::Protocol("fragmented control frame"));
                }
                if len > MAX_CONTROL_PAYLOAD as u64 {
                    return Err(Violation::Protocol("control frame over 125 bytes"));
                }
            }
            opcode::TEXT | opcode::BINARY => {
                if self.message.is_some() {
                    return Err(Violation::Protocol(
                        "new message before the last one's final fragment",
                    ));
                }
                if len > self.max_message as u64 {
                    return Err(Violation::TooBig);
                }
                self.message = Some(Box::new(Partial {
                    text: opcode == opcode::TEXT,
                    ..Partial::default()
                }));
            }
            opcode::CONTINUATION => {
                let Some(message) = &self.message else {
                    return Err(Violation::Protocol("continuation with no message"));
                };
                if message.len as u64 + len > self.max_message as u64 {
                    return Err(Violation::TooBig);
                }
            }
            _ => return Err(Violation::Protocol("reserved opcode")),
        }
        self.frame = Some(Frame {
            opcode,
            fin,
            mask,
            remaining: len,
            done: 0,
        });
        Ok(&input[used..])
    }

    /// Unmasks one chunk of the current frame's payload into where it goes.
    fn payload(&mut self, frame: Frame, chunk: &[u8]) -> Result<(), Violation> {
        let phase = (frame.done % 4) as usize;
        let unmasked = chunk
            .iter()
            .enumerate()
            .map(|(i, b)| b ^ frame.mask[(phase + i) % 4]);
        if is_control(frame.opcode) {
            self.control.extend(unmasked);
            return Ok(());
        }
        let message = self
            .message
            .as_mut()
            .expect("a data frame always has its message");
        message.len += chunk.len();
        if message.text {
            message.bytes.extend(unmasked);
            check_utf8(message)?;
        }
        Ok(())
    }

    /// A frame's payload is complete: emit what it finished.
    fn frame_done(&mut self, frame: Frame, events: &mut Vec<Event>) -> Result<(), Violation> {
        self.frame = None;
        match frame.opcode {
            opcode::PING => events.push(Event::Ping(std::mem::take(&mut self.control))),
            opcode::PONG => {
                self.control = Vec::new();
                events.push(Event::Pong);
            }
            opcode::CLOSE => {
                let payload = std::mem::take(&mut self.control);
                events.push(Event::Close(close_payload(&payload)?));
                self.finished = true;
            }
            _ if frame.fin => {
                let message = self.message.take().expect("a data frame has its message");
                if !message.text {
                    events.push(Event::Binary { len: message.len });
                } else if message.checked != message.bytes.len() {
                    // The last character never got its end.
                    return Err(Violation::InvalidUtf8);
                } else {
                    let text =
                        String::from_utf8(message.bytes).map_err(|_| Violation::InvalidUtf8)?;
                    events.push(Event::Text(text));
                }
            }
            _ => {}
        }
        Ok(())
    }
}

/// How long a client frame's header is, given its first bytes (2 until the
/// length byte is known).
fn header_len(head: &[u8]) -> usize {
    match head.get(1).map(|b| b & 0x7f) {
        None => 2,
        Some(126) => 2 + 2 + 4,
        Some(127) => 2 + 8 + 4,
        Some(_) => 2 + 4,
    }
}

fn is_control(opcode: u8) -> bool {
    opcode & 0x8 != 0
}

/// Extends what is known to be UTF-8 over newly arrived bytes; an incomplete
/// character at the end waits for the next bytes.
fn check_utf8(message: &mut Partial) -> Result<(), Violation> {
    match std::str::from_utf8(&message.bytes[message.checked..]) {
        Ok(_) => message.checked = message.bytes.len(),
        Err(err) if err.error_len().is_some() => return Err(Violation::InvalidUtf8),
        Err(err) => message.checked += err.valid_up_to(),
    }
    Ok(())
}

/// A Close frame's payload: empty, or a valid code and a UTF-8 reason.
fn close_payload(payload: &[u8]) -> Result<Option<(u16, String)>, Violation> {
    match payload {
        [] => Ok(None),
        [_] => Err(Violation::Protocol("close payload of one byte")),
        [hi, lo, reason @ ..] => {
            let code = u16::from_be_bytes([*hi, *lo]);
            if !valid_close_code(code) {
                return Err(Violation::Protocol("invalid close code"));
            }
            let reason = std::str::from_utf8(reason).map_err(|_| Violation::InvalidUtf8)?;
            Ok(Some((code, reason.to_owned())))
        }
    }
}

/// Codes a peer may send (RFC 6455 section 7.4 and the IANA registry).
fn valid_close_code(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999)
}

/// Writes the header of an unfragmented, unmasked server frame into `out`;
/// returns its length.
pub fn header(opcode: u8, len: usize, out: &mut [u8; MAX_SERVER_HEADER]) -> usize {
    out[0] = 0x80 | opcode;
    if len < 126 {
        out[1] = len as u8;
        2
    } else if let Ok(short) = u16::try_from(len) {
        out[1] = 126;
        out[2..4].copy_from_slice(&short.to_be_bytes());
        4
    } else {
        out[1] = 127;
        out[2..10].copy_from_slice(&(len as u64).to_be_bytes());
        10
    }
}

/// A client frame (what terminals send): `fin`, `opcode`, and the payload
/// masked with `mask` when given (a client must mask; `None` makes the
/// unmasked frame a server must refuse). The node never sends one; tests and
/// load tools do.
pub fn client_frame(fin: bool, opcode: u8, payload: &[u8], mask: Option<[u8; 4]>) -> Vec<u8> {
    let mut head = [0u8; MAX_SERVER_HEADER];
    let n = header(opcode, payload.len(), &mut head);
    if !fin {
        head[0] &= 0x7f;
    }
    let mut out = Vec::with_capacity(n + 4 + payload.len());
    out.extend_from_slice(&head[..n]);
    match mask {
        Some(key) => {
            out[1] |= 0x80;
            out.extend_from_slice(&key);
            out.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
        }
        None => out.extend_from_slice(payload),
    }
    out
}

/// A whole server frame (header and payload), for control frames and replies.
pub fn encode(opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mut head = [0u8; MAX_SERVER_HEADER];
    let n = header(opcode, payload.len(), &mut head);
    let mut out = Vec::with_capacity(n + payload.len());
    out.extend_from_slice(&head[..n]);
    out.extend_from_slice(payload);
    out
}

/// A Close frame with `code` and `reason`.
pub fn close_frame(code: u16, reason: &str) -> Vec<u8> {
    let mut payload = code.to_be_bytes().to_vec();
    payload.extend_from_slice(&reason.as_bytes()[..reason.len().min(MAX_CONTROL_PAYLOAD - 2)]);
    encode(CLOSE, &payload)
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];

    /// A client frame: `fin`, `opcode`, masked with `KEY`.
    fn client(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
        client_frame(fin, opcode, payload, Some(KEY))
    }

    /// Feeds `bytes` in pieces of `step` bytes; returns the events or the violation.
    fn decode_in_steps(bytes: &[u8], step: usize, max: usize) -> Result<Vec<Event>, Violation> {
        let mut decoder = Decoder::new(max);
        let mut events = Vec::new();
        for piece in bytes.chunks(step) {
            decoder.feed(piece, &mut events)?;
        }
        Ok(events)
    }

    /// Every split of the input gives the same result.
    fn decode(bytes: &[u8]) -> Result<Vec<Event>, Violation> {
        let whole = decode_in_steps(bytes, bytes.len().max(1), 1 << 20);
        for step in [1, 2, 3, 5, 7, 13] {
            assert_eq!(
                decode_in_steps(bytes, step, 1 << 20),
                whole,
                "split every {step} bytes"
            );
        }
        whole
    }

    #[test]
    fn messages_survive_any_split_across_reads() {
        let mut bytes = client(true, TEXT, "héllo wörld ✓".as_bytes());
        bytes.extend(client(true, BINARY, &[1, 2, 3]));
        let long = "x".repeat(70_000);
        bytes.extend(client(true, TEXT, long.as_bytes()));
        bytes.extend(client(true, TEXT, b""));
        assert_eq!(
            decode(&bytes),
            Ok(vec![
                Event::Text("héllo wörld ✓".into()),
                Event::Binary { len: 3 },
                Event::Text(long),
                Event::Text(String::new()),
            ])
        );
    }

    #[test]
    fn fragments_join_and_control_frames_interleave() {
        let mut bytes = client(false, TEXT, "frag".as_bytes());
        bytes.extend(client(true, PING, b"p"));
        // A character split across two fragments.
        bytes.extend(client(false, CONTINUATION, &"mé".as_bytes()[..2]));
        bytes.extend(client(true, PONG, b""));
        bytes.extend(client(true, CONTINUATION, &"mé".as_bytes()[2..]));
        assert_eq!(
            decode(&bytes),
            Ok(vec![
                Event::Ping(b"p".to_vec()),
                Event::Pong,
                Event::Text("fragmé".into()),
            ])
        );
    }

    #[test]
    fn close_frames_end_the_stream() {
        let mut payload = 4000u16.to_be_bytes().to_vec();
        payload.extend_from_slice(b"bye");
        let mut bytes = client(true, CLOSE, &payload);
        bytes.extend(client(true, TEXT, b"after close"));
        assert_eq!(
            decode(&bytes),
            Ok(vec![Event::Close(Some((4000, "bye".into())))])
        );
        assert_eq!(
            decode(&client(true, CLOSE, b"")),
            Ok(vec![Event::Close(None)])
        );
    }

    #[test]
    fn protocol_violations_are_named() {
        let unmasked = client_frame(true, TEXT, b"hi", None);
        let rsv = {
            let mut f = client(true, TEXT, b"hi");
            f[0] |= 0x40;
            f
        };
        let cases: Vec<(&str, Vec<u8>, Violation)> = vec![
            (
                "unmasked",
                unmasked,
                Violation::Protocol("unmasked client frame"),
            ),
            ("rsv", rsv, Violation::Protocol("reserved bits set")),
            (
                "opcode 3",
                client(true, 0x3, b"?"),
                Violation::Protocol("reserved opcode"),
            ),
            (
                "opcode 0xB",
                client(true, 0xB, b""),
                Violation::Protocol("reserved opcode"),
            ),
            (
                "fragmented ping",
                client(false, PING, b""),
                Violation::Protocol("fragmented control frame"),
            ),
            (
                "long ping",
                client(true, PING, &[0; 126]),
                Violation::Protocol("control frame over 125 bytes"),
            ),
            (
                "lone continuation",
                client(true, CONTINUATION, b"x"),
                Violation::Protocol("continuation with no message"),
            ),
            (
                "text inside text",
                [client(false, TEXT, b"a"), client(true, TEXT, b"b")].concat(),
                Violation::Protocol("new message before the last one's final fragment"),
            ),
            (
                "one-byte close",
                client(true, CLOSE, &[3]),
                Violation::Protocol("close payload of one byte"),
            ),
            (
                "close code 1005",
                client(true, CLOSE, &1005u16.to_be_bytes()),
                Violation::Protocol("invalid close code"),
            ),
            (
                "close reason not UTF-8",
                client(true, CLOSE, &[0x03, 0xe8, 0xff]),
                Violation::InvalidUtf8,
            ),
        ];
        for (what, bytes, violation) in cases {
            assert_eq!(decode(&bytes), Err(violation), "{what}");
        }
    }

    #[test]
    fn invalid_utf8_is_caught_as_the_bytes_arrive() {
        // A 100,000-byte frame whose third byte is invalid: the violation
        // comes with the first bytes of the payload, not the last.
        let mut payload = vec![b'a'; 100_000];
        payload[2] = 0xff;
        let bytes = client(true, TEXT, &payload);
        let mut decoder = Decoder::new(1 << 20);
        let mut events = Vec::new();
        assert_eq!(
            decoder.feed(&bytes[..20], &mut events),
            Err(Violation::InvalidUtf8)
        );
        // A character cut short at the end of a message.
        assert_eq!(
            decode(&client(true, TEXT, &"é".as_bytes()[..1])),
            Err(Violation::InvalidUtf8)
        );
    }

    #[test]
    fn size_limits_apply_to_frames_and_to_whole_messages() {
        let over = client(true, TEXT, &[b'a'; 101]);
        // Refused from the header alone, before any payload is read.
        let mut decoder = Decoder::new(100);
        assert_eq!(
            decoder.feed(&over[..8], &mut Vec::new()),
            Err(Violation::TooBig)
        );
        let mut fragments = client(false, TEXT, &[b'a'; 60]);
        fragments.extend(client(true, CONTINUATION, &[b'a'; 41]));
        assert_eq!(decode_in_steps(&fragments, 9, 100), Err(Violation::TooBig));
        let exact = client(true, TEXT, &[b'a'; 100]);
        assert_eq!(
            decode_in_steps(&exact, 9, 100),
            Ok(vec![Event::Text("a".repeat(100))])
        );
    }

    #[test]
    fn an_idle_decoder_holds_nothing() {
        let mut decoder = Decoder::new(1 << 20);
        let bytes = client(true, TEXT, b"hello");
        decoder.feed(&bytes[..4], &mut Vec::new()).expect("valid");
        assert!(decoder.is_mid_frame());
        decoder.feed(&bytes[4..], &mut Vec::new()).expect("valid");
        assert!(!decoder.is_mid_frame());
        assert!(decoder.message.is_none());
        assert_eq!(decoder.control.capacity(), 0);
    }

    #[test]
    fn server_headers_use_the_shortest_length() {
        let mut head = [0u8; MAX_SERVER_HEADER];
        assert_eq!(header(TEXT, 125, &mut head), 2);
        assert_eq!(&head[..2], &[0x81, 125]);
        assert_eq!(header(TEXT, 126, &mut head), 4);
        assert_eq!(&head[..4], &[0x81, 126, 0, 126]);
        assert_eq!(header(TEXT, 70_000, &mut head), 10);
        assert_eq!(head[1], 127);
        assert_eq!(
            u64::from_be_bytes(head[2..10].try_into().expect("8")),
            70_000
        );
        assert_eq!(close_frame(1013, "x"), vec![0x88, 3, 0x03, 0xf5, b'x']);
    }
}
