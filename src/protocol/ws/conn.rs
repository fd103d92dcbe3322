//! The server side of one WebSocket connection as a state machine: bytes in, events out.
//!
//! [`WsConn::handle_input`] takes whatever the socket produced (any split, any number of
//! frames), unmasks in place, reassembles fragmented messages, validates UTF-8 and limits, and
//! calls back with each complete [`WsEvent`]. Partial frames are copied into a small carry-over
//! buffer that is freed again once empty, so an idle connection holds no read buffer at all.

use crate::protocol::error::WsError;
use crate::protocol::ws::frame::{apply_mask, parse_header, OpCode};

/// One complete inbound event. Borrowed data is valid only during the callback.
#[derive(Debug, PartialEq, Eq)]
pub enum WsEvent<'a> {
    /// A complete text message, already checked to be UTF-8.
    Text(&'a [u8]),
    /// A complete binary message.
    Binary(&'a [u8]),
    /// A ping: the driver answers with a pong carrying the same payload.
    Ping(&'a [u8]),
    /// A pong (ignored beyond counting as activity).
    Pong,
    /// The peer started or answered the closing handshake. The code is 1005 when absent.
    Close { code: u16, reason: &'a str },
}

/// Per-connection WebSocket state.
#[derive(Debug, Default)]
pub struct WsConn {
    /// Bytes of an incomplete frame carried over from the previous read. Empty (and without an
    /// allocation) whenever the last read ended on a frame boundary.
    carry: Vec<u8>,
    /// A fragmented message being reassembled.
    partial: Option<Partial>,
    /// Set once a close frame was received; later input is ignored.
    closed: bool,
}

/// A fragmented message being reassembled.
#[derive(Debug)]
struct Partial {
    /// Text or binary.
    opcode: OpCode,
    /// The payload so far.
    data: Vec<u8>,
    /// For text: how much of `data` is known to be valid UTF-8. Each fragment is checked as it
    /// arrives, so at most an incomplete last character (3 bytes) is unchecked, and a message
    /// that can no longer be valid fails at once instead of after its last fragment.
    utf8_valid: usize,
}

/// Limits a [`WsConn`] enforces.
#[derive(Debug, Clone, Copy)]
pub struct WsLimits {
    /// Largest single frame payload accepted.
    pub max_frame: usize,
    /// Largest reassembled message accepted.
    pub max_message: usize,
}

impl WsConn {
    /// A fresh connection state.
    pub fn new() -> Self {
        Self::default()
    }

    /// Bytes currently held between reads (for memory accounting and tests).
    pub fn buffered(&self) -> usize {
        self.carry.capacity() + self.partial.as_ref().map_or(0, |p| p.data.capacity())
    }

    /// Whether a close frame has been received.
    pub fn is_closed(&self) -> bool {
        self.closed
    }

    /// Feeds bytes read from the socket. `input` is used as scratch (unmasked in place).
    ///
    /// Calls `on_event` once per complete event, in order. An error means the connection must
    /// be closed with [`WsError::close_code`]; events before the error were already delivered.
    pub fn handle_input(
        &mut self,
        input: &mut [u8],
        limits: WsLimits,
        mut on_event: impl FnMut(WsEvent<'_>),
    ) -> Result<(), WsError> {
        if self.closed {
            return Ok(());
        }
        if self.carry.is_empty() {
            let used = self.process(input, limits, &mut on_event)?;
            if used < input.len() {
                self.carry.extend_from_slice(&input[used..]);
            }
            return Ok(());
        }
        let mut carry = std::mem::take(&mut self.carry);
        carry.extend_from_slice(input);
        let used = self.process(&mut carry, limits, &mut on_event)?;
        if used < carry.len() {
            carry.drain(..used);
            if carry.capacity() > 4 * carry.len().max(1024) {
                carry.shrink_to_fit();
            }
            self.carry = carry;
        }
        Ok(())
    }

    /// Processes as many whole frames from `buf` as it holds; returns the bytes consumed.
    fn process(
        &mut self,
        buf: &mut [u8],
        limits: WsLimits,
        on_event: &mut impl FnMut(WsEvent<'_>),
    ) -> Result<usize, WsError> {
        let mut pos = 0;
        while pos < buf.len() && !self.closed {
            let Some((hdr, hlen)) = parse_header(&buf[pos..])? else {
                break;
            };
            let Some(mask) = hdr.mask else {
                return Err(WsError::Protocol("client frames must be masked"));
            };
            if hdr.payload_len > limits.max_frame as u64 {
                return Err(WsError::TooBig { size: hdr.payload_len, limit: limits.max_frame });
            }
            let len = hdr.payload_len as usize;
            if buf.len() - pos - hlen < len {
                break;
            }
            let start = pos + hlen;
            let payload = &mut buf[start..start + len];
            apply_mask(payload, mask, 0);
            pos = start + len;
            self.frame(hdr.fin, hdr.opcode, payload, limits, on_event)?;
        }
        Ok(pos)
    }

    fn frame(
        &mut self,
        fin: bool,
        opcode: OpCode,
        payload: &[u8],
        limits: WsLimits,
        on_event: &mut impl FnMut(WsEvent<'_>),
    ) -> Result<(), WsError> {
        match opcode {
            OpCode::Ping => on_event(WsEvent::Ping(payload)),
            OpCode::Pong => on_event(WsEvent::Pong),
            OpCode::Close => {
                self.closed = true;
                let (code, reason) = parse_close(payload)?;
                on_event(WsEvent::Close { code, reason });
            }
            OpCode::Text | OpCode::Binary => {
                if self.partial.is_some() {
                    return Err(WsError::Protocol("new data frame inside a fragmented message"));
                }
                if fin {
                    deliver(opcode, payload, on_event)?;
                } else {
                    let utf8_valid = if opcode == OpCode::Text { utf8_prefix(payload, 0)? } else { 0 };
                    self.partial = Some(Partial { opcode, data: payload.to_vec(), utf8_valid });
                }
            }
            OpCode::Continuation => {
                let Some(mut p) = self.partial.take() else {
                    return Err(WsError::Protocol("continuation frame without a message"));
                };
                let size = p.data.len() + payload.len();
                if size > limits.max_message {
                    return Err(WsError::TooBig { size: size as u64, limit: limits.max_message });
                }
                p.data.extend_from_slice(payload);
                if p.opcode == OpCode::Text {
                    p.utf8_valid = utf8_prefix(&p.data, p.utf8_valid)?;
                }
                if !fin {
                    self.partial = Some(p);
                } else if p.opcode == OpCode::Binary {
                    on_event(WsEvent::Binary(&p.data));
                } else if p.utf8_valid == p.data.len() {
                    on_event(WsEvent::Text(&p.data));
                } else {
                    // The message ends inside a character.
                    return Err(WsError::InvalidUtf8);
                }
            }
        }
        Ok(())
    }
}

fn deliver(opcode: OpCode, data: &[u8], on_event: &mut impl FnMut(WsEvent<'_>)) -> Result<(), WsError> {
    if opcode == OpCode::Text {
        if std::str::from_utf8(data).is_err() {
            return Err(WsError::InvalidUtf8);
        }
        on_event(WsEvent::Text(data));
    } else {
        on_event(WsEvent::Binary(data));
    }
    Ok(())
}

/// Checks the text bytes `data[from..]` (`from` is a character boundary up to which `data` is
/// valid) and returns how far `data` is now known to be valid UTF-8. An incomplete character at
/// the end is left for the next fragment; bytes that no continuation can make valid fail at
/// once (RFC 6455 §8.1 allows failing as soon as the message cannot be valid).
fn utf8_prefix(data: &[u8], from: usize) -> Result<usize, WsError> {
    match std::str::from_utf8(&data[from..]) {
        Ok(_) => Ok(data.len()),
        Err(e) if e.error_len().is_none() => Ok(from + e.valid_up_to()),
        Err(_) => Err(WsError::InvalidUtf8),
    }
}

fn parse_close(payload: &[u8]) -> Result<(u16, &str), WsError> {
    match payload.len() {
        0 => Ok((1005, "")),
        1 => Err(WsError::Protocol("close frame with a 1-byte payload")),
        _ => {
            let code = u16::from_be_bytes([payload[0], payload[1]]);
            let valid = matches!(code, 1000..=1003 | 1007..=1011 | 3000..=4999);
            if !valid {
                return Err(WsError::Protocol("invalid close code"));
            }
            let reason = std::str::from_utf8(&payload[2..]).map_err(|_| WsError::InvalidUtf8)?;
            Ok((code, reason))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: WsLimits = WsLimits { max_frame: 1 << 16, max_message: 1 << 17 };

    fn masked(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
        crate::protocol::ws::frame::client_frame(fin, opcode, payload, [0x37, 0xfa, 0x21, 0x3d])
    }

    #[derive(Debug, PartialEq)]
    enum Ev {
        Text(String),
        Bin(Vec<u8>),
        Ping(Vec<u8>),
        Pong,
        Close(u16, String),
    }

    fn feed(ws: &mut WsConn, bytes: &[u8]) -> (Vec<Ev>, Result<(), WsError>) {
        let mut out = Vec::new();
        let mut b = bytes.to_vec();
        let r = ws.handle_input(&mut b, LIMITS, |e| {
            out.push(match e {
                WsEvent::Text(t) => Ev::Text(String::from_utf8(t.to_vec()).unwrap()),
                WsEvent::Binary(b) => Ev::Bin(b.to_vec()),
                WsEvent::Ping(p) => Ev::Ping(p.to_vec()),
                WsEvent::Pong => Ev::Pong,
                WsEvent::Close { code, reason } => Ev::Close(code, reason.to_string()),
            })
        });
        (out, r)
    }

    #[test]
    fn whole_and_split_frames() {
        let mut stream = masked(true, 1, b"hello");
        stream.extend(masked(true, 2, &[1, 2, 3]));
        stream.extend(masked(true, 9, b"p"));
        let expect = vec![Ev::Text("hello".into()), Ev::Bin(vec![1, 2, 3]), Ev::Ping(b"p".to_vec())];
        // Every split point gives the same events.
        for cut in 0..stream.len() {
            let mut ws = WsConn::new();
            let (mut a, r1) = feed(&mut ws, &stream[..cut]);
            let (b, r2) = feed(&mut ws, &stream[cut..]);
            r1.unwrap();
            r2.unwrap();
            a.extend(b);
            assert_eq!(a, expect, "cut at {cut}");
            assert_eq!(ws.buffered(), 0, "carry freed after cut {cut}");
        }
    }

    #[test]
    fn fragmented_with_interleaved_ping() {
        let mut s = masked(false, 1, b"hel");
        s.extend(masked(true, 9, b""));
        s.extend(masked(false, 0, b"lo "));
        s.extend(masked(true, 0, "wörld".as_bytes()));
        let (ev, r) = feed(&mut WsConn::new(), &s);
        r.unwrap();
        assert_eq!(ev, vec![Ev::Ping(vec![]), Ev::Text("hello wörld".into())]);
    }

    #[test]
    fn errors_map_to_close_codes() {
        let unmasked = [0x81u8, 0x02, b'h', b'i'];
        assert_eq!(feed(&mut WsConn::new(), &unmasked).1.unwrap_err().close_code().as_u16(), 1002);
        let bad_utf8 = masked(true, 1, &[0xff, 0xfe]);
        assert_eq!(feed(&mut WsConn::new(), &bad_utf8).1.unwrap_err().close_code().as_u16(), 1007);
        let big = masked(true, 2, &vec![0u8; LIMITS.max_frame + 1]);
        assert_eq!(feed(&mut WsConn::new(), &big[..14]).1.unwrap_err().close_code().as_u16(), 1009);
        let orphan = masked(true, 0, b"x");
        assert_eq!(feed(&mut WsConn::new(), &orphan).1.unwrap_err().close_code().as_u16(), 1002);
        let mut two = masked(false, 1, b"a");
        two.extend(masked(true, 1, b"b"));
        assert_eq!(feed(&mut WsConn::new(), &two).1.unwrap_err().close_code().as_u16(), 1002);
    }

    #[test]
    fn message_limit_over_fragments() {
        let chunk = vec![b'a'; 60_000];
        let mut s = masked(false, 1, &chunk);
        s.extend(masked(false, 0, &chunk));
        s.extend(masked(true, 0, &chunk));
        let (_, r) = feed(&mut WsConn::new(), &s);
        assert_eq!(r.unwrap_err().close_code().as_u16(), 1009);
    }

    #[test]
    fn invalid_utf8_fails_at_its_fragment() {
        // Autobahn 6.4.1: a valid first fragment, then one that no continuation can make valid
        // (U+110000 encoded as F4 90 80 80): the error comes without waiting for the rest.
        let mut ws = WsConn::new();
        let (ev, r) = feed(&mut ws, &masked(false, 1, "κόσμε".as_bytes()));
        r.unwrap();
        assert!(ev.is_empty());
        let (ev, r) = feed(&mut ws, &masked(false, 0, &[0xf4, 0x90, 0x80, 0x80, 0xce]));
        assert!(ev.is_empty());
        assert_eq!(r.unwrap_err().close_code().as_u16(), 1007);
        // A character split over fragments is fine, even split over three.
        let euro = "€".as_bytes();
        let mut s = masked(false, 1, &[b'a', euro[0]]);
        s.extend(masked(false, 0, &euro[1..2]));
        s.extend(masked(true, 0, &[euro[2], b'b']));
        let (ev, r) = feed(&mut WsConn::new(), &s);
        r.unwrap();
        assert_eq!(ev, vec![Ev::Text("a€b".into())]);
        // A message that ends inside a character is not.
        let mut s = masked(false, 1, b"a");
        s.extend(masked(true, 0, &euro[..2]));
        assert_eq!(feed(&mut WsConn::new(), &s).1.unwrap_err().close_code().as_u16(), 1007);
        // Binary fragments are never checked.
        let mut s = masked(false, 2, &[0xff]);
        s.extend(masked(true, 0, &[0xfe]));
        let (ev, r) = feed(&mut WsConn::new(), &s);
        r.unwrap();
        assert_eq!(ev, vec![Ev::Bin(vec![0xff, 0xfe])]);
    }

    #[test]
    fn close_parsing() {
        let mut p = 1000u16.to_be_bytes().to_vec();
        p.extend_from_slice(b"bye");
        let (ev, r) = feed(&mut WsConn::new(), &masked(true, 8, &p));
        r.unwrap();
        assert_eq!(ev, vec![Ev::Close(1000, "bye".into())]);
        let (ev, _) = feed(&mut WsConn::new(), &masked(true, 8, &[]));
        assert_eq!(ev, vec![Ev::Close(1005, String::new())]);
        let bad = 999u16.to_be_bytes();
        assert!(feed(&mut WsConn::new(), &masked(true, 8, &bad)).1.is_err());
    }
}
