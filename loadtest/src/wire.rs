//! Bytes on the wire: a minimal WebSocket client codec (server frames are unmasked, client frames
//! masked), the measurement payload and its scanner, and what each server's protocol sends.
//!
//! Nothing here allocates per message: encoders append to caller-owned `Vec`s that keep their
//! capacity, and the scanner reads numbers straight out of the received bytes.

use serde::{Deserialize, Serialize};

/// Which server protocol a client speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Proto {
    /// corecast: Phoenix channels vsn 2.0.0 (array frames), as @supabase/realtime-js speaks it.
    Phoenix,
    /// nats-server: NATS text protocol carried in WebSocket frames (a byte stream).
    Nats,
    /// Node `ws` peer (`peers/ws-server.js`): raw payloads, room chosen in the URL.
    Ws,
    /// Socket.IO v4 peer (`peers/socketio-server.js`): Engine.IO v4 packets over WebSocket.
    Socketio,
    /// nchan (nginx module): raw payloads; the channel is in the path, which also says whether
    /// the connection subscribes, publishes or both (see [`nchan_path`]); no join message.
    Nchan,
    /// The raw-socket baseline sender: a 101 and then pre-encoded frames.
    Raw,
}

pub const OP_CONT: u8 = 0;
pub const OP_TEXT: u8 = 1;
pub const OP_BINARY: u8 = 2;
pub const OP_CLOSE: u8 = 8;
pub const OP_PING: u8 = 9;
pub const OP_PONG: u8 = 10;

/// One parsed server frame header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameHead {
    pub fin: bool,
    pub opcode: u8,
    /// Bytes of header (2, 4 or 10, plus 4 if the server masked, which it must not).
    pub header_len: usize,
    pub payload_len: usize,
    pub mask: Option<[u8; 4]>,
}

/// Parse a frame header at the start of `b`; None if more bytes are needed.
#[inline]
pub fn parse_frame_head(b: &[u8]) -> Option<FrameHead> {
    if b.len() < 2 {
        return None;
    }
    let fin = b[0] & 0x80 != 0;
    let opcode = b[0] & 0x0f;
    let masked = b[1] & 0x80 != 0;
    let l7 = (b[1] & 0x7f) as usize;
    let (mut hl, pl) = match l7 {
        126 => {
            if b.len() < 4 {
                return None;
            }
            (4, u16::from_be_bytes([b[2], b[3]]) as usize)
        }
        127 => {
            if b.len() < 10 {
                return None;
            }
            let mut a = [0u8; 8];
            a.copy_from_slice(&b[2..10]);
            (10, u64::from_be_bytes(a) as usize)
        }
        n => (2, n),
    };
    let mask = if masked {
        if b.len() < hl + 4 {
            return None;
        }
        let m = [b[hl], b[hl + 1], b[hl + 2], b[hl + 3]];
        hl += 4;
        Some(m)
    } else {
        None
    };
    Some(FrameHead { fin, opcode, header_len: hl, payload_len: pl, mask })
}

/// XOR `data` in place with the 4-byte mask, starting at mask offset 0.
#[inline]
pub fn apply_mask(data: &mut [u8], mask: [u8; 4]) {
    let m = u32::from_ne_bytes(mask);
    let m64 = (m as u64) | ((m as u64) << 32);
    let mut chunks = data.chunks_exact_mut(8);
    for c in &mut chunks {
        let v = u64::from_ne_bytes(c.try_into().unwrap()) ^ m64;
        c.copy_from_slice(&v.to_ne_bytes());
    }
    let rem = chunks.into_remainder();
    for (i, b) in rem.iter_mut().enumerate() {
        *b ^= mask[i & 3];
    }
}

/// Append a masked client frame carrying `payload` to `out`.
#[inline]
pub fn push_client_frame(out: &mut Vec<u8>, opcode: u8, payload: &[u8], mask: [u8; 4]) {
    let n = payload.len();
    out.push(0x80 | opcode);
    if n < 126 {
        out.push(0x80 | n as u8);
    } else if n <= 0xffff {
        out.push(0x80 | 126);
        out.extend_from_slice(&(n as u16).to_be_bytes());
    } else {
        out.push(0x80 | 127);
        out.extend_from_slice(&(n as u64).to_be_bytes());
    }
    out.extend_from_slice(&mask);
    let start = out.len();
    out.extend_from_slice(payload);
    apply_mask(&mut out[start..], mask);
}

/// Append an unmasked server frame (used by the raw baseline sender and tests).
pub fn push_server_frame(out: &mut Vec<u8>, opcode: u8, payload: &[u8]) {
    let n = payload.len();
    out.push(0x80 | opcode);
    if n < 126 {
        out.push(n as u8);
    } else if n <= 0xffff {
        out.push(126);
        out.extend_from_slice(&(n as u16).to_be_bytes());
    } else {
        out.push(127);
        out.extend_from_slice(&(n as u64).to_be_bytes());
    }
    out.extend_from_slice(payload);
}

/// Append the decimal form of `v`.
#[inline]
pub fn push_u64(out: &mut Vec<u8>, mut v: u64) {
    let mut tmp = [0u8; 20];
    let mut i = tmp.len();
    loop {
        i -= 1;
        tmp[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    out.extend_from_slice(&tmp[i..]);
}

/// Append the measurement payload `{"s":SEQ,"t":T_NS,"p":PUB,"x":"xx…"}`, padded with `x` so that
/// the object is `size` bytes long (or as short as possible when `size` is smaller).
#[inline]
pub fn push_payload(out: &mut Vec<u8>, seq: u64, t_ns: u64, publisher: u64, size: usize) {
    let start = out.len();
    out.extend_from_slice(b"{\"s\":");
    push_u64(out, seq);
    out.extend_from_slice(b",\"t\":");
    push_u64(out, t_ns);
    out.extend_from_slice(b",\"p\":");
    push_u64(out, publisher);
    out.extend_from_slice(b",\"x\":\"");
    let used = out.len() - start + 2;
    if size > used {
        out.resize(out.len() + (size - used), b'x');
    }
    out.extend_from_slice(b"\"}");
}

fn num_digits(mut v: u64) -> usize {
    let mut n = 1;
    while v >= 10 {
        v /= 10;
        n += 1;
    }
    n
}

/// Length of what `push_payload` writes for these arguments.
pub fn payload_len(seq: u64, t_ns: u64, publisher: u64, size: usize) -> usize {
    size.max(23 + num_digits(seq) + num_digits(t_ns) + num_digits(publisher))
}

/// Fields read back from a received message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fields {
    pub seq: u64,
    pub t_ns: u64,
    pub publisher: u64,
}

#[inline]
fn digits(b: &[u8], mut i: usize) -> Option<(u64, usize)> {
    let start = i;
    let mut v: u64 = 0;
    while i < b.len() && b[i].is_ascii_digit() {
        v = v.wrapping_mul(10).wrapping_add((b[i] - b'0') as u64);
        i += 1;
    }
    if i == start {
        None
    } else {
        Some((v, i))
    }
}

fn field(b: &[u8], key: &[u8]) -> Option<u64> {
    let at = memchr::memmem::find(b, key)?;
    digits(b, at + key.len()).map(|(v, _)| v)
}

/// Find `"s":`, `"t":` and `"p":` in a received message without parsing its JSON: first the fast
/// path for the order we write them in (`{"s":1,"t":2,"p":3`), then each key on its own.
#[inline]
pub fn scan_fields(b: &[u8]) -> Option<Fields> {
    // `{"s":` located by its `{` (a few per message) rather than a general substring search,
    // which would build a searcher per call.
    let at = memchr::memchr_iter(b'{', b).find(|&i| b.get(i + 1..i + 5) == Some(b"\"s\":"));
    if let Some(at) = at {
        let (seq, i) = digits(b, at + 5)?;
        if b.get(i..i + 5) == Some(b",\"t\":") {
            if let Some((t_ns, j)) = digits(b, i + 5) {
                if b.get(j..j + 5) == Some(b",\"p\":") {
                    if let Some((publisher, _)) = digits(b, j + 5) {
                        return Some(Fields { seq, t_ns, publisher });
                    }
                }
            }
        }
    }
    Some(Fields { seq: field(b, b"\"s\":")?, t_ns: field(b, b"\"t\":")?, publisher: field(b, b"\"p\":")? })
}

/// Path of the WebSocket upgrade request for `proto` (the `ws` peer picks the room from the URL).
pub fn upgrade_path(proto: Proto, topic: u32) -> String {
    match proto {
        Proto::Phoenix => "/realtime/v1/websocket?apikey=loadtest&vsn=2.0.0".into(),
        Proto::Nats => "/".into(),
        Proto::Ws => format!("/?room=t{topic}"),
        Proto::Socketio => "/socket.io/?EIO=4&transport=websocket".into(),
        Proto::Nchan => nchan_path(topic, true, false),
        Proto::Raw => "/".into(),
    }
}

/// nchan's location for a client of topic `k` (`servers::nchan_conf`): `/sub/t<k>` to
/// subscribe, `/pub/t<k>` to publish, `/ps/t<k>` to do both on one connection.
pub fn nchan_path(k: u32, sub: bool, publ: bool) -> String {
    let loc = match (sub, publ) {
        (true, true) => "ps",
        (false, true) => "pub",
        _ => "sub",
    };
    format!("/{loc}/t{k}")
}

/// The upgrade request of a client that subscribes (`sub`) and/or publishes (`publ`): the
/// same as [`upgrade_request`] except for nchan, whose location depends on the role.
pub fn client_upgrade_request(proto: Proto, topic: u32, host: &str, sub: bool, publ: bool) -> Vec<u8> {
    if proto == Proto::Nchan {
        return upgrade_request_to(&nchan_path(topic, sub, publ), host);
    }
    upgrade_request(proto, topic, host)
}

/// The complete HTTP upgrade request.
pub fn upgrade_request(proto: Proto, topic: u32, host: &str) -> Vec<u8> {
    upgrade_request_to(&upgrade_path(proto, topic), host)
}

fn upgrade_request_to(path: &str, host: &str) -> Vec<u8> {
    format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
         User-Agent: corecast-loadtest\r\n\r\n"
    )
    .into_bytes()
}

/// Phoenix join for topic `k`, broadcast self off, no ack.
pub fn phoenix_join(k: u32) -> Vec<u8> {
    format!(
        "[\"1\",\"1\",\"realtime:t{k}\",\"phx_join\",{{\"config\":{{\"broadcast\":{{\"self\":false,\"ack\":false}}}}}}]"
    )
    .into_bytes()
}

/// Phoenix join for topic `k` with presence: `key`, and `enabled` (presence_state on join and
/// every diff after it; realtime-js sets it when the channel has presence listeners).
pub fn phoenix_join_presence(k: u32, key: &str, enabled: bool) -> Vec<u8> {
    format!(
        "[\"1\",\"1\",\"realtime:t{k}\",\"phx_join\",{{\"config\":{{\"broadcast\":{{\"self\":false,\"ack\":false}},\
         \"presence\":{{\"key\":\"{key}\",\"enabled\":{enabled}}}}}}}]"
    )
    .into_bytes()
}

/// Message ref of a member's `track` push (its `phx_reply` starts with `["1","2",`).
pub const TRACK_REF: &[u8] = b"2";
/// Message ref of a member's `untrack` push.
pub const UNTRACK_REF: &[u8] = b"3";

/// A presence push on topic `k`: `track` with `state` (a JSON object) or, when `state` is None,
/// `untrack`.
pub fn push_presence(out: &mut Vec<u8>, k: u32, state: Option<&[u8]>) {
    out.extend_from_slice(b"[\"1\",\"");
    out.extend_from_slice(if state.is_some() { TRACK_REF } else { UNTRACK_REF });
    out.extend_from_slice(b"\",\"realtime:t");
    push_u64(out, k as u64);
    out.extend_from_slice(b"\",\"presence\",{\"type\":\"presence\",");
    match state {
        Some(st) => {
            out.extend_from_slice(b"\"event\":\"track\",\"payload\":");
            out.extend_from_slice(st);
            out.push(b'}');
        }
        None => out.extend_from_slice(b"\"event\":\"untrack\"}"),
    }
    out.push(b']');
}

/// Whether a Phoenix v2 message is a `phx_reply` to push `msg_ref` of join ref "1".
pub fn is_reply_to(m: &[u8], msg_ref: &[u8]) -> bool {
    m.len() > 10 + msg_ref.len()
        && m.starts_with(b"[\"1\",\"")
        && m[6..].starts_with(msg_ref)
        && m[6 + msg_ref.len()..].starts_with(b"\",")
        && memchr::memmem::find(m, b"\"phx_reply\"").is_some()
}

/// The event name of a Phoenix v2 array message (`[join_ref,ref,topic,event,payload]`), found
/// without parsing the payload: the fourth string element.
pub fn phoenix_event(m: &[u8]) -> Option<&[u8]> {
    // Skip three elements: `null` or a string without escapes (refs and topic names here).
    let mut i = 1;
    for _ in 0..3 {
        match m.get(i)? {
            b'n' => i += 4,
            b'"' => i += 2 + memchr::memchr(b'"', &m[i + 1..])?,
            _ => return None,
        }
        if m.get(i) != Some(&b',') {
            return None;
        }
        i += 1;
    }
    if m.get(i) != Some(&b'"') {
        return None;
    }
    let end = i + 1 + memchr::memchr(b'"', &m[i + 1..])?;
    Some(&m[i + 1..end])
}

/// Calls `f(is_join, key)` for every key of a `presence_diff` message (`joins` then `leaves`);
/// false if it is not a parsable diff.
pub fn presence_diff_keys(m: &[u8], mut f: impl FnMut(bool, &str)) -> bool {
    use std::borrow::Cow;
    use std::collections::HashMap;
    #[derive(Deserialize)]
    struct Diff<'a> {
        #[serde(borrow, default)]
        joins: HashMap<Cow<'a, str>, serde::de::IgnoredAny>,
        #[serde(borrow, default)]
        leaves: HashMap<Cow<'a, str>, serde::de::IgnoredAny>,
    }
    type Msg<'a> = (serde::de::IgnoredAny, serde::de::IgnoredAny, serde::de::IgnoredAny, Cow<'a, str>, Diff<'a>);
    let Ok((_, _, _, event, diff)) = serde_json::from_slice::<Msg<'_>>(m) else {
        return false;
    };
    if event != "presence_diff" {
        return false;
    }
    for k in diff.joins.keys() {
        f(true, k);
    }
    for k in diff.leaves.keys() {
        f(false, k);
    }
    true
}

/// The Server-Sent Events request of an SSE subscriber to topic `k` (corecast:
/// `GET /realtime/v1/sse?topic=t<k>`; nchan: `GET /sse/t<k>`; answered `200
/// text/event-stream`, no length).
pub fn sse_request(proto: Proto, k: u32, host: &str) -> Vec<u8> {
    let path = match proto {
        Proto::Nchan => format!("/sse/t{k}"),
        _ => format!("/realtime/v1/sse?topic=t{k}&apikey=loadtest"),
    };
    format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\n\
         Accept: text/event-stream\r\nUser-Agent: corecast-loadtest\r\n\r\n"
    )
    .into_bytes()
}

/// Splits an SSE byte stream into lines and calls `f` with the value of every `data:` line
/// (`id:`, `event:`, `retry:` and `:` comment lines are skipped; this generator's payloads never
/// span lines). Returns the bytes consumed (up to the last complete line).
#[inline]
pub fn sse_data_lines(b: &[u8], mut f: impl FnMut(&[u8])) -> usize {
    let mut pos = 0;
    for nl in memchr::memchr_iter(b'\n', b) {
        let line = &b[pos..nl];
        if let Some(v) = line.strip_prefix(b"data:") {
            let v = v.strip_prefix(b" ").unwrap_or(v);
            f(v.strip_suffix(b"\r").unwrap_or(v));
        }
        pos = nl + 1;
    }
    pos
}

pub const PHOENIX_HEARTBEAT: &[u8] = b"[null,\"9\",\"phoenix\",\"heartbeat\",{}]";

/// NATS CONNECT (echo off: a client never receives its own publishes, like `self:false`).
pub const NATS_CONNECT: &[u8] = b"CONNECT {\"verbose\":false,\"pedantic\":false,\"tls_required\":false,\"name\":\"loadtest\",\"lang\":\"rust\",\"version\":\"0.1.0\",\"protocol\":1,\"echo\":false,\"headers\":false,\"no_responders\":false}\r\n";

/// Append the publish message body (the WebSocket frame payload) for one measurement payload.
/// `scratch` receives the payload first; the protocol envelope is built around it in `out`.
pub fn push_publish_body(
    out: &mut Vec<u8>,
    proto: Proto,
    topic: u32,
    seq: u64,
    t_ns: u64,
    publisher: u64,
    size: usize,
) {
    match proto {
        Proto::Phoenix => {
            out.extend_from_slice(b"[\"1\",\"2\",\"realtime:t");
            push_u64(out, topic as u64);
            out.extend_from_slice(b"\",\"broadcast\",{\"type\":\"broadcast\",\"event\":\"m\",\"payload\":");
            push_payload(out, seq, t_ns, publisher, size);
            out.extend_from_slice(b"}]");
        }
        Proto::Nats => {
            // PUB subject len\r\npayload\r\n
            out.extend_from_slice(b"PUB t");
            push_u64(out, topic as u64);
            out.push(b' ');
            push_u64(out, payload_len(seq, t_ns, publisher, size) as u64);
            out.extend_from_slice(b"\r\n");
            push_payload(out, seq, t_ns, publisher, size);
            out.extend_from_slice(b"\r\n");
        }
        Proto::Ws | Proto::Nchan | Proto::Raw => push_payload(out, seq, t_ns, publisher, size),
        Proto::Socketio => {
            out.extend_from_slice(b"42[\"m\",");
            push_payload(out, seq, t_ns, publisher, size);
            out.push(b']');
        }
    }
}

/// Opcode publishers use for `proto`.
pub fn publish_opcode(proto: Proto) -> u8 {
    match proto {
        Proto::Nats => OP_BINARY,
        _ => OP_TEXT,
    }
}

/// What a corecast subscriber receives for one broadcast (used by the baseline sender so that its
/// frames are the same size as corecast's).
pub fn phoenix_broadcast_frame_body(out: &mut Vec<u8>, topic: u32, seq: u64, t_ns: u64, publisher: u64, size: usize) {
    out.extend_from_slice(b"[null,null,\"realtime:t");
    push_u64(out, topic as u64);
    out.extend_from_slice(b"\",\"broadcast\",{\"type\":\"broadcast\",\"event\":\"m\",\"payload\":");
    push_payload(out, seq, t_ns, publisher, size);
    out.extend_from_slice(b",\"meta\":{\"id\":\"00000000-0000-4000-8000-000000000000\",\"offset\":");
    push_u64(out, seq);
    out.extend_from_slice(b",\"epoch\":\"0123456789abcdef\"}}]");
}

/// A REST publish request (one message, keep-alive) to corecast.
#[allow(clippy::too_many_arguments)]
pub fn push_rest_publish(
    out: &mut Vec<u8>,
    host: &str,
    topic: u32,
    seq: u64,
    t_ns: u64,
    publisher: u64,
    size: usize,
    body: &mut Vec<u8>,
) {
    body.clear();
    push_payload(body, seq, t_ns, publisher, size);
    out.extend_from_slice(b"POST /realtime/v1/api/broadcast/t");
    push_u64(out, topic as u64);
    out.extend_from_slice(b"/events/m HTTP/1.1\r\nHost: ");
    out.extend_from_slice(host.as_bytes());
    out.extend_from_slice(b"\r\napikey: loadtest\r\nContent-Type: application/json\r\nContent-Length: ");
    push_u64(out, body.len() as u64);
    out.extend_from_slice(b"\r\n\r\n");
    out.extend_from_slice(body);
}

/// Parse one HTTP response head at the start of `b`: Some((status, head_len, content_length)).
pub fn parse_http_response(b: &[u8]) -> Option<(u16, usize, usize)> {
    let end = memchr::memmem::find(b, b"\r\n\r\n")? + 4;
    let head = &b[..end];
    let status = std::str::from_utf8(head.get(9..12)?).ok()?.parse().ok()?;
    let mut cl = 0usize;
    for line in head.split(|&c| c == b'\n') {
        if line.len() > 15 && line[..15].eq_ignore_ascii_case(b"content-length:") {
            let v = std::str::from_utf8(&line[15..]).ok()?.trim();
            cl = v.parse().ok()?;
        }
    }
    Some((status, end, cl))
}

/// Reads everything a non-blocking socket has into `buf` (through `chunk`); returns `false`
/// when the peer closed it or it failed.
pub fn read_available(s: &mut impl std::io::Read, chunk: &mut [u8], buf: &mut Vec<u8>) -> bool {
    loop {
        match s.read(chunk) {
            Ok(0) => return false,
            Ok(k) => buf.extend_from_slice(&chunk[..k]),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return true,
            Err(_) => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_has_requested_size_and_scans_back() {
        let mut v = Vec::new();
        push_payload(&mut v, 42, 1_234_567_890_123, 7, 100);
        assert_eq!(v.len(), 100);
        assert_eq!(payload_len(42, 1_234_567_890_123, 7, 100), 100);
        let mut w = Vec::new();
        push_payload(&mut w, 42, 1_234_567_890_123, 7, 10);
        assert_eq!(w.len(), payload_len(42, 1_234_567_890_123, 7, 10));
        let j: serde_json::Value = serde_json::from_slice(&v).unwrap();
        assert_eq!(j["s"], 42);
        let f = scan_fields(&v).unwrap();
        assert_eq!(f, Fields { seq: 42, t_ns: 1_234_567_890_123, publisher: 7 });
    }

    #[test]
    fn scan_finds_fields_inside_envelopes_and_in_any_order() {
        let m = br#"[null,null,"realtime:t0","broadcast",{"type":"broadcast","event":"m","payload":{"s":5,"t":99,"p":3,"x":"xx"},"meta":{"id":"u","offset":5,"epoch":"e"}}]"#;
        assert_eq!(scan_fields(m), Some(Fields { seq: 5, t_ns: 99, publisher: 3 }));
        let m = br#"42["m",{"x":"","p":1,"t":2,"s":3}]"#;
        assert_eq!(scan_fields(m), Some(Fields { seq: 3, t_ns: 2, publisher: 1 }));
        assert_eq!(scan_fields(br#"[null,"9","phoenix","phx_reply",{}]"#), None);
    }

    #[test]
    fn frames_roundtrip_through_the_parser() {
        for n in [0usize, 5, 125, 126, 300, 70_000] {
            let payload: Vec<u8> = (0..n).map(|i| (i % 251) as u8).collect();
            let mut f = Vec::new();
            push_client_frame(&mut f, OP_TEXT, &payload, [1, 2, 3, 4]);
            let h = parse_frame_head(&f).unwrap();
            assert_eq!(h.payload_len, n);
            assert_eq!(h.opcode, OP_TEXT);
            let mut body = f[h.header_len..].to_vec();
            apply_mask(&mut body, h.mask.unwrap());
            assert_eq!(body, payload);
            let mut s = Vec::new();
            push_server_frame(&mut s, OP_BINARY, &payload);
            let h = parse_frame_head(&s).unwrap();
            assert!(h.mask.is_none() && h.fin);
            assert_eq!(&s[h.header_len..], &payload[..]);
            assert!(parse_frame_head(&s[..1]).is_none());
        }
    }

    #[test]
    fn publish_bodies_are_valid() {
        for p in [Proto::Phoenix, Proto::Ws, Proto::Socketio] {
            let mut v = Vec::new();
            push_publish_body(&mut v, p, 3, 1, 2, 3, 50);
            let s = std::str::from_utf8(&v).unwrap();
            let s = s.strip_prefix("42").unwrap_or(s);
            let _: serde_json::Value = serde_json::from_str(s).unwrap();
        }
        let mut v = Vec::new();
        push_publish_body(&mut v, Proto::Nats, 3, 1, 2, 3, 50);
        assert!(v.starts_with(b"PUB t3 50\r\n{"));
        assert!(v.ends_with(b"}\r\n"));
    }

    #[test]
    fn presence_messages() {
        let j = phoenix_join_presence(0, "m7", false);
        let v: serde_json::Value = serde_json::from_slice(&j).unwrap();
        assert_eq!(v[4]["config"]["presence"]["key"], "m7");
        assert_eq!(v[4]["config"]["presence"]["enabled"], false);
        let mut t = Vec::new();
        push_presence(&mut t, 0, Some(br#"{"a":1}"#));
        let v: serde_json::Value = serde_json::from_slice(&t).unwrap();
        assert_eq!(v[3], "presence");
        assert_eq!(v[4]["event"], "track");
        assert_eq!(v[4]["payload"]["a"], 1);
        let mut u = Vec::new();
        push_presence(&mut u, 0, None);
        let v: serde_json::Value = serde_json::from_slice(&u).unwrap();
        assert_eq!(v[4]["event"], "untrack");
        assert_eq!(v[1], "3");
        let r = br#"["1","2","realtime:t0","phx_reply",{"status":"ok","response":{}}]"#;
        assert!(is_reply_to(r, TRACK_REF) && !is_reply_to(r, UNTRACK_REF));
        let d = br#"[null,null,"realtime:t0","presence_diff",{"joins":{"m5":{"metas":[{"phx_ref":"x","s":0}]},"m6":{"metas":[]}},"leaves":{"m1":{"metas":[]}}}]"#;
        assert_eq!(phoenix_event(d), Some(&b"presence_diff"[..]));
        assert_eq!(phoenix_event(br#"["1",null,"realtime:t0","presence_state",{}]"#), Some(&b"presence_state"[..]));
        let mut keys = Vec::new();
        assert!(presence_diff_keys(d, |j, k| keys.push((j, k.to_string()))));
        keys.sort();
        assert_eq!(keys, vec![(false, "m1".into()), (true, "m5".into()), (true, "m6".into())]);
    }

    #[test]
    fn sse_lines_give_data_values() {
        let s = b"retry: 2000\n: open\n\nid: e-1\nevent: broadcast\ndata: {\"a\":1}\n\nid: e-2\nevent: broadcast\ndata: {\"a\"";
        let mut got = Vec::new();
        let used = sse_data_lines(s, |d| got.push(d.to_vec()));
        assert_eq!(got, vec![b"{\"a\":1}".to_vec()]);
        assert_eq!(&s[used..], b"data: {\"a\"");
    }

    #[test]
    fn http_response_head() {
        let r = b"HTTP/1.1 202 Accepted\r\ncontent-length: 2\r\n\r\n{}rest";
        assert_eq!(parse_http_response(r), Some((202, 44, 2)));
        assert_eq!(parse_http_response(b"HTTP/1.1 202"), None);
    }
}
