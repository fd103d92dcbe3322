//! RFC 6455 frame header parsing and encoding, and payload masking.
//!
//! [`parse_header`] follows the crate's parser rule: `Ok(None)` means "need more bytes" and
//! nothing is consumed. Server frames are never masked, so one encoded frame is valid for every
//! subscriber: that is what makes encode-once fan-out possible.

use bytes::Bytes;

use crate::protocol::error::WsError;

/// Frame opcodes that RFC 6455 defines; anything else is a protocol error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpCode {
    Continuation,
    Text,
    Binary,
    Close,
    Ping,
    Pong,
}

impl OpCode {
    fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            0 => Self::Continuation,
            1 => Self::Text,
            2 => Self::Binary,
            8 => Self::Close,
            9 => Self::Ping,
            10 => Self::Pong,
            _ => return None,
        })
    }

    fn as_u8(self) -> u8 {
        match self {
            Self::Continuation => 0,
            Self::Text => 1,
            Self::Binary => 2,
            Self::Close => 8,
            Self::Ping => 9,
            Self::Pong => 10,
        }
    }

    /// Control frames (close, ping, pong) may not be fragmented and carry at most 125 bytes.
    pub fn is_control(self) -> bool {
        matches!(self, Self::Close | Self::Ping | Self::Pong)
    }
}

/// Close codes the server sends. Each has one documented meaning (see README "Close codes").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseCode {
    /// 1000: normal closure (reply to a client close; idle timeout).
    Normal,
    /// 1001: the server is shutting down.
    GoingAway,
    /// 1002: the peer broke RFC 6455 (unmasked frame, bad opcode, RSV bits, bad fragmentation).
    Protocol,
    /// 1007: a text message was not valid UTF-8.
    InvalidPayload,
    /// 1008: policy violation: the connection's send queue overflowed (slow consumer), or its
    /// token expired.
    Policy,
    /// 1009: a frame or message exceeded the configured size limit.
    TooBig,
    /// 1011: unexpected server condition.
    Internal,
}

impl CloseCode {
    /// The numeric code on the wire.
    pub fn as_u16(self) -> u16 {
        match self {
            Self::Normal => 1000,
            Self::GoingAway => 1001,
            Self::Protocol => 1002,
            Self::InvalidPayload => 1007,
            Self::Policy => 1008,
            Self::TooBig => 1009,
            Self::Internal => 1011,
        }
    }
}

/// A parsed frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    pub fin: bool,
    pub opcode: OpCode,
    pub mask: Option<[u8; 4]>,
    pub payload_len: u64,
}

/// Parses one frame header from the front of `buf`.
///
/// Returns `Ok(Some((header, header_len)))`, `Ok(None)` when more bytes are needed, or an error
/// for a header no valid peer would send.
pub fn parse_header(buf: &[u8]) -> Result<Option<(FrameHeader, usize)>, WsError> {
    if buf.len() < 2 {
        return Ok(None);
    }
    let b0 = buf[0];
    let b1 = buf[1];
    if b0 & 0x70 != 0 {
        return Err(WsError::Protocol("reserved bits set without a negotiated extension"));
    }
    let opcode = OpCode::from_u8(b0 & 0x0f).ok_or(WsError::Protocol("unknown opcode"))?;
    let fin = b0 & 0x80 != 0;
    let masked = b1 & 0x80 != 0;
    let len7 = (b1 & 0x7f) as u64;
    let (payload_len, mut pos) = match len7 {
        126 => {
            if buf.len() < 4 {
                return Ok(None);
            }
            let l = u16::from_be_bytes([buf[2], buf[3]]) as u64;
            if l < 126 {
                return Err(WsError::Protocol("non-minimal length encoding"));
            }
            (l, 4)
        }
        127 => {
            if buf.len() < 10 {
                return Ok(None);
            }
            let mut b = [0u8; 8];
            b.copy_from_slice(&buf[2..10]);
            let l = u64::from_be_bytes(b);
            if l >> 63 != 0 {
                return Err(WsError::Protocol("64-bit length with the high bit set"));
            }
            if l <= 0xffff {
                return Err(WsError::Protocol("non-minimal length encoding"));
            }
            (l, 10)
        }
        l => (l, 2),
    };
    if opcode.is_control() {
        if !fin {
            return Err(WsError::Protocol("fragmented control frame"));
        }
        if payload_len > 125 {
            return Err(WsError::Protocol("control frame longer than 125 bytes"));
        }
    }
    let mask = if masked {
        if buf.len() < pos + 4 {
            return Ok(None);
        }
        let m = [buf[pos], buf[pos + 1], buf[pos + 2], buf[pos + 3]];
        pos += 4;
        Some(m)
    } else {
        None
    };
    Ok(Some((FrameHeader { fin, opcode, mask, payload_len }, pos)))
}

/// XORs `data` with `mask`, where `data` starts `offset` bytes into the frame payload.
pub fn apply_mask(data: &mut [u8], mask: [u8; 4], offset: usize) {
    let rot = (offset & 3) as u32;
    let m = u32::from_ne_bytes(mask).rotate_right(rot * 8);
    // Rotating a native-endian word gives the byte order needed only on little endian; fall back
    // to the bytewise loop elsewhere.
    if cfg!(target_endian = "little") {
        let m64 = (m as u64) | ((m as u64) << 32);
        let mut chunks = data.chunks_exact_mut(8);
        for c in &mut chunks {
            let mut w = [0u8; 8];
            w.copy_from_slice(c);
            let v = u64::from_ne_bytes(w) ^ m64;
            c.copy_from_slice(&v.to_ne_bytes());
        }
        let rest = chunks.into_remainder();
        let mb = m.to_ne_bytes();
        for (i, b) in rest.iter_mut().enumerate() {
            *b ^= mb[i & 3];
        }
    } else {
        for (i, b) in data.iter_mut().enumerate() {
            *b ^= mask[(i + offset) & 3];
        }
    }
}

/// Length of the header for an unmasked server frame with `len` payload bytes.
pub fn header_len(len: usize) -> usize {
    match len {
        0..=125 => 2,
        126..=0xffff => 4,
        _ => 10,
    }
}

/// Appends an unmasked (server) frame header.
pub fn write_header(out: &mut Vec<u8>, opcode: OpCode, fin: bool, len: usize) {
    let b0 = (if fin { 0x80 } else { 0 }) | opcode.as_u8();
    match len {
        0..=125 => out.extend_from_slice(&[b0, len as u8]),
        126..=0xffff => {
            out.extend_from_slice(&[b0, 126]);
            out.extend_from_slice(&(len as u16).to_be_bytes());
        }
        _ => {
            out.extend_from_slice(&[b0, 127]);
            out.extend_from_slice(&(len as u64).to_be_bytes());
        }
    }
}

/// Builds a whole unmasked frame with `payload`.
pub fn frame(opcode: OpCode, payload: &[u8]) -> Bytes {
    let mut out = Vec::with_capacity(header_len(payload.len()) + payload.len());
    write_header(&mut out, opcode, true, payload.len());
    out.extend_from_slice(payload);
    Bytes::from(out)
}

/// Wraps a payload that was written after a reserved gap of [`MAX_HEADER`] bytes at the start
/// of `buf`: writes the header right before the payload and returns the frame without copying
/// the payload. Use with [`FrameBuilder`].
pub const MAX_HEADER: usize = 10;

/// Builds one frame in a single allocation: reserve header space, write the payload, then
/// [`FrameBuilder::finish`] places the header in front of it.
#[derive(Debug)]
pub struct FrameBuilder {
    pub buf: Vec<u8>,
}

impl FrameBuilder {
    /// A builder whose payload is expected to be about `payload_hint` bytes.
    pub fn new(payload_hint: usize) -> Self {
        let mut buf = Vec::with_capacity(MAX_HEADER + payload_hint);
        buf.resize(MAX_HEADER, 0);
        Self { buf }
    }

    /// Finishes the frame as `opcode` and returns it as shareable `Bytes`.
    pub fn finish(self, opcode: OpCode) -> Bytes {
        let mut buf = self.buf;
        let len = buf.len() - MAX_HEADER;
        let start = MAX_HEADER - header_len(len);
        let b0 = 0x80 | opcode.as_u8();
        match len {
            0..=125 => buf[start..MAX_HEADER].copy_from_slice(&[b0, len as u8]),
            126..=0xffff => {
                let l = (len as u16).to_be_bytes();
                buf[start..MAX_HEADER].copy_from_slice(&[b0, 126, l[0], l[1]]);
            }
            _ => {
                buf[start] = b0;
                buf[start + 1] = 127;
                buf[start + 2..MAX_HEADER].copy_from_slice(&(len as u64).to_be_bytes());
            }
        }
        // `advance` keeps the buffer's single owner (`slice` would allocate a shared handle).
        let mut b = Bytes::from(buf);
        bytes::Buf::advance(&mut b, start);
        b
    }
}

/// A client frame: FIN if `fin`, raw `opcode` (any value, so invalid ones can be built too),
/// `payload` masked with `mask` (RFC 6455 §5.3). The server never sends one; benches and unit
/// tests build their input with it.
pub fn client_frame(fin: bool, opcode: u8, payload: &[u8], mask: [u8; 4]) -> Vec<u8> {
    let mut v = Vec::with_capacity(MAX_HEADER + 4 + payload.len());
    v.push(if fin { 0x80 | opcode } else { opcode });
    match payload.len() {
        n @ 0..=125 => v.push(0x80 | n as u8),
        n @ 126..=0xffff => {
            v.push(0x80 | 126);
            v.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            v.push(0x80 | 127);
            v.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    v.extend_from_slice(&mask);
    let start = v.len();
    v.extend_from_slice(payload);
    apply_mask(&mut v[start..], mask, 0);
    v
}

/// A close frame with `code` and a short UTF-8 `reason` (truncated to fit 125 bytes).
pub fn close_frame(code: CloseCode, reason: &str) -> Bytes {
    let mut r = reason;
    while r.len() > 123 {
        let mut cut = 123;
        while !r.is_char_boundary(cut) {
            cut -= 1;
        }
        r = &r[..cut];
    }
    let mut payload = Vec::with_capacity(2 + r.len());
    payload.extend_from_slice(&code.as_u16().to_be_bytes());
    payload.extend_from_slice(r.as_bytes());
    frame(OpCode::Close, &payload)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn masked(opcode: u8, payload: &[u8], mask: [u8; 4]) -> Vec<u8> {
        client_frame(true, opcode, payload, mask)
    }

    #[test]
    fn parses_masked_text() {
        let f = masked(1, b"hello", [1, 2, 3, 4]);
        let (h, n) = parse_header(&f).unwrap().unwrap();
        assert_eq!(n, 6);
        assert!(h.fin);
        assert_eq!(h.opcode, OpCode::Text);
        assert_eq!(h.payload_len, 5);
        let mut p = f[n..].to_vec();
        apply_mask(&mut p, h.mask.unwrap(), 0);
        assert_eq!(p, b"hello");
    }

    #[test]
    fn needs_more_bytes_without_consuming() {
        let f = masked(2, &[7u8; 300], [9, 8, 7, 6]);
        for cut in 0..8 {
            assert_eq!(parse_header(&f[..cut]).unwrap(), None, "cut {cut}");
        }
        assert!(parse_header(&f[..8]).unwrap().is_some());
    }

    #[test]
    fn rejects_bad_headers() {
        assert!(parse_header(&[0xC1, 0x80, 0, 0, 0, 0]).is_err()); // RSV1
        assert!(parse_header(&[0x83, 0x80, 0, 0, 0, 0]).is_err()); // opcode 3
        assert!(parse_header(&[0x09, 0x80, 0, 0, 0, 0]).is_err()); // fragmented ping
        assert!(parse_header(&[0x89, 0xFE, 0, 200]).is_err()); // ping > 125
        assert!(parse_header(&[0x82, 0xFE, 0, 5]).is_err()); // non-minimal 16-bit
        let mut big = vec![0x82, 0xFF];
        big.extend_from_slice(&(1u64 << 63).to_be_bytes());
        assert!(parse_header(&big).is_err());
    }

    #[test]
    fn mask_offsets_compose() {
        let data: Vec<u8> = (0..=255u8).cycle().take(1000).collect();
        let mask = [0xde, 0xad, 0xbe, 0xef];
        let mut whole = data.clone();
        apply_mask(&mut whole, mask, 0);
        for split in [1usize, 3, 4, 7, 13, 500] {
            let mut a = data.clone();
            let (x, y) = a.split_at_mut(split);
            apply_mask(x, mask, 0);
            apply_mask(y, mask, split);
            assert_eq!(a, whole, "split {split}");
        }
    }

    #[test]
    fn builder_matches_plain_frame() {
        for n in [0usize, 5, 125, 126, 1000, 70_000] {
            let payload = vec![b'x'; n];
            let mut b = FrameBuilder::new(n);
            b.buf.extend_from_slice(&payload);
            assert_eq!(b.finish(OpCode::Text), frame(OpCode::Text, &payload));
        }
    }

    #[test]
    fn matches_tungstenite_encoding() {
        use tungstenite::protocol::frame::{coding, Frame};
        for n in [3usize, 200, 70_000] {
            let payload = vec![b'a'; n];
            let f = Frame::message(payload.clone(), coding::OpCode::Data(coding::Data::Text), true);
            let mut expect = Vec::new();
            f.format(&mut expect).unwrap();
            assert_eq!(frame(OpCode::Text, &payload).to_vec(), expect);
        }
    }
}
