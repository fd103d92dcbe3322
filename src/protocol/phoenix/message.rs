//! Decoding client messages and encoding server messages, for both serializers.
//!
//! - vsn 2.0.0 text: `[join_ref, ref, topic, event, payload]`; binary kind 3 (user broadcast
//!   push) in, kind 4 (user broadcast) out.
//! - vsn 1.0.0 text: `{"topic","event","payload","ref","join_ref"}` in; the server emits only
//!   `topic, event, payload, ref` (as Phoenix's V1 serializer does) and never binary.
//!
//! Refs are kept as the raw JSON token the client sent (`"6"`, `7` or absent) and echoed
//! byte-for-byte: realtime-js compares them as opaque strings.

use std::borrow::Cow;

use bytes::Bytes;
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::protocol::json::write_str;
use crate::protocol::ws::frame::{FrameBuilder, OpCode};

/// Serializer version negotiated by the `vsn` query parameter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Vsn {
    /// `1.0.0` (also when `vsn` is absent): JSON objects, text frames only.
    V1,
    /// `2.0.0`: JSON arrays, plus binary user broadcasts.
    V2,
}

impl Vsn {
    /// Parses the `vsn` query value; `None` (absent) means 1.0.0.
    pub fn parse(v: Option<&str>) -> Option<Self> {
        match v {
            None | Some("1.0.0") => Some(Self::V1),
            Some("2.0.0") => Some(Self::V2),
            _ => None,
        }
    }
}

/// A decoded client message.
#[derive(Debug)]
pub struct InMessage<'a> {
    /// Raw JSON token of the join ref, `None` when null or absent.
    pub join_ref: Option<&'a str>,
    /// Raw JSON token of the ref, `None` when null or absent.
    pub msg_ref: Option<&'a str>,
    pub topic: Cow<'a, str>,
    pub event: Cow<'a, str>,
    pub payload: InPayload<'a>,
}

/// The payload of a client message.
#[derive(Debug)]
pub enum InPayload<'a> {
    /// Any JSON value, as raw text (already validated by the parser).
    Json(&'a RawValue),
    /// A binary kind-3 user broadcast push.
    UserBroadcast {
        event: &'a str,
        /// Metadata JSON text (empty when absent).
        metadata: &'a str,
        /// `true` when the payload is JSON text (encoding 1), `false` for raw bytes.
        json: bool,
        payload: &'a [u8],
    },
}

/// Why a client message could not be decoded. Answered by closing with 1007 and this text,
/// since without a parsed topic and ref there is nothing to reply to.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("malformed message: {0}")]
    Json(String),
    #[error("malformed message: refs must be strings, numbers or null")]
    BadRef,
    #[error("malformed binary message: {0}")]
    Binary(&'static str),
    #[error("unsupported binary message kind {0} (only kind 3, user broadcast push, is accepted)")]
    BinaryKind(u8),
}

#[derive(Deserialize)]
struct V2Text<'a>(
    Option<&'a RawValue>,
    Option<&'a RawValue>,
    #[serde(borrow)] Cow<'a, str>,
    #[serde(borrow)] Cow<'a, str>,
    &'a RawValue,
    #[serde(default)] serde::de::IgnoredAny,
);

#[derive(Deserialize)]
struct V1Text<'a> {
    #[serde(borrow)]
    topic: Cow<'a, str>,
    #[serde(borrow)]
    event: Cow<'a, str>,
    #[serde(borrow)]
    payload: Option<&'a RawValue>,
    #[serde(borrow, rename = "ref")]
    msg_ref: Option<&'a RawValue>,
    #[serde(borrow)]
    join_ref: Option<&'a RawValue>,
}

const EMPTY_OBJECT: &str = "{}";

fn ref_token(v: Option<&RawValue>) -> Result<Option<&str>, DecodeError> {
    let Some(v) = v else { return Ok(None) };
    let s = v.get();
    match s.as_bytes().first() {
        Some(b'"') | Some(b'-') | Some(b'0'..=b'9') => Ok(Some(s)),
        Some(b'n') => Ok(None),
        _ => Err(DecodeError::BadRef),
    }
}

/// Decodes a text frame for `vsn`.
pub fn decode_text(vsn: Vsn, data: &[u8]) -> Result<InMessage<'_>, DecodeError> {
    match vsn {
        Vsn::V2 => {
            let t: V2Text<'_> = serde_json::from_slice(data).map_err(|e| DecodeError::Json(e.to_string()))?;
            Ok(InMessage {
                join_ref: ref_token(t.0)?,
                msg_ref: ref_token(t.1)?,
                topic: t.2,
                event: t.3,
                payload: InPayload::Json(t.4),
            })
        }
        Vsn::V1 => {
            let t: V1Text<'_> = serde_json::from_slice(data).map_err(|e| DecodeError::Json(e.to_string()))?;
            let empty: &RawValue = serde_json::from_str(EMPTY_OBJECT).expect("literal is JSON");
            Ok(InMessage {
                join_ref: ref_token(t.join_ref)?,
                msg_ref: ref_token(t.msg_ref)?,
                topic: t.topic,
                event: t.event,
                payload: InPayload::Json(t.payload.unwrap_or(empty)),
            })
        }
    }
}

/// Decodes a binary frame (vsn 2.0.0 only): kind 3, user broadcast push.
///
/// Layout: `u8 3 | u8 join_ref_len | u8 ref_len | u8 topic_len | u8 event_len | u8 meta_len |
/// u8 encoding | join_ref | ref | topic | event | metadata | payload`.
pub fn decode_binary(data: &[u8]) -> Result<BinaryPush<'_>, DecodeError> {
    let Some(&kind) = data.first() else {
        return Err(DecodeError::Binary("empty frame"));
    };
    if kind != 3 {
        return Err(DecodeError::BinaryKind(kind));
    }
    if data.len() < 7 {
        return Err(DecodeError::Binary("truncated kind-3 header"));
    }
    let lens = [data[1], data[2], data[3], data[4], data[5]].map(|l| l as usize);
    let encoding = data[6];
    if encoding > 1 {
        return Err(DecodeError::Binary("payload encoding must be 0 (binary) or 1 (JSON)"));
    }
    let mut pos = 7;
    let mut parts: [&[u8]; 5] = [&[]; 5];
    for (i, len) in lens.iter().enumerate() {
        let end = pos + len;
        if end > data.len() {
            return Err(DecodeError::Binary("truncated kind-3 fields"));
        }
        parts[i] = &data[pos..end];
        pos = end;
    }
    fn text(b: &[u8]) -> Result<&str, DecodeError> {
        std::str::from_utf8(b).map_err(|_| DecodeError::Binary("header field is not UTF-8"))
    }
    Ok(BinaryPush {
        join_ref: text(parts[0])?,
        msg_ref: text(parts[1])?,
        topic: text(parts[2])?,
        event: text(parts[3])?,
        metadata: text(parts[4])?,
        json: encoding == 1,
        payload: &data[pos..],
    })
}

/// The `(join_ref, ref, topic)` of a Phoenix kind-0 binary push (what `phoenix` JS sends for
/// `channel.push(event, arrayBuffer)`): `u8 0 | u8 join_ref_len | u8 ref_len | u8 topic_len |
/// u8 event_len | join_ref | ref | topic | event | payload`. corecast does not accept such
/// pushes, but can address its refusal to the channel that sent one.
pub fn binary_push_address(data: &[u8]) -> Option<(&str, &str, &str)> {
    let [0, jl, rl, tl, _el, rest @ ..] = data else { return None };
    let (jl, rl, tl) = (*jl as usize, *rl as usize, *tl as usize);
    let head = rest.get(..jl + rl + tl)?;
    let text = std::str::from_utf8;
    Some((text(&head[..jl]).ok()?, text(&head[jl..jl + rl]).ok()?, text(&head[jl + rl..]).ok()?))
}

/// A decoded kind-3 push. Refs here are bare strings (not JSON tokens).
#[derive(Debug, PartialEq, Eq)]
pub struct BinaryPush<'a> {
    pub join_ref: &'a str,
    pub msg_ref: &'a str,
    pub topic: &'a str,
    pub event: &'a str,
    pub metadata: &'a str,
    pub json: bool,
    pub payload: &'a [u8],
}

/// Encodes one server message as a text frame.
///
/// `join_ref` and `msg_ref` are raw JSON tokens (or `None` for null); `payload` is JSON text.
pub fn encode(
    vsn: Vsn,
    join_ref: Option<&str>,
    msg_ref: Option<&str>,
    topic: &str,
    event: &str,
    payload: &[u8],
) -> Bytes {
    let mut b = FrameBuilder::new(payload.len() + topic.len() + event.len() + 48);
    write_message(&mut b.buf, vsn, join_ref, msg_ref, topic, event, |out| out.extend_from_slice(payload));
    b.finish(OpCode::Text)
}

/// Writes the JSON text of one message, with the payload produced by `payload`.
pub fn write_message(
    out: &mut Vec<u8>,
    vsn: Vsn,
    join_ref: Option<&str>,
    msg_ref: Option<&str>,
    topic: &str,
    event: &str,
    payload: impl FnOnce(&mut Vec<u8>),
) {
    let tok = |out: &mut Vec<u8>, t: Option<&str>| match t {
        Some(t) => out.extend_from_slice(t.as_bytes()),
        None => out.extend_from_slice(b"null"),
    };
    match vsn {
        Vsn::V2 => {
            out.push(b'[');
            tok(out, join_ref);
            out.push(b',');
            tok(out, msg_ref);
            out.push(b',');
            write_str(out, topic);
            out.push(b',');
            write_str(out, event);
            out.push(b',');
            payload(out);
            out.push(b']');
        }
        Vsn::V1 => {
            out.extend_from_slice(b"{\"topic\":");
            write_str(out, topic);
            out.extend_from_slice(b",\"event\":");
            write_str(out, event);
            out.extend_from_slice(b",\"payload\":");
            payload(out);
            out.extend_from_slice(b",\"ref\":");
            tok(out, msg_ref);
            out.push(b'}');
        }
    }
}

/// A `phx_reply` with `status` and a raw JSON `response`.
pub fn reply(vsn: Vsn, join_ref: Option<&str>, msg_ref: Option<&str>, topic: &str, ok: bool, response: &[u8]) -> Bytes {
    let mut p = Vec::with_capacity(response.len() + 32);
    p.extend_from_slice(if ok { b"{\"status\":\"ok\",\"response\":" } else { b"{\"status\":\"error\",\"response\":" });
    p.extend_from_slice(response);
    p.push(b'}');
    encode(vsn, join_ref, msg_ref, topic, "phx_reply", &p)
}

/// An error reply with `{"reason": reason}`.
pub fn error_reply(vsn: Vsn, join_ref: Option<&str>, msg_ref: Option<&str>, topic: &str, reason: &str) -> Bytes {
    let mut r = Vec::with_capacity(reason.len() + 16);
    r.extend_from_slice(b"{\"reason\":");
    write_str(&mut r, reason);
    r.push(b'}');
    reply(vsn, join_ref, msg_ref, topic, false, &r)
}

/// A `system` message: `{"extension","status","message","channel"}` with `ref` null.
pub fn system(vsn: Vsn, join_ref: Option<&str>, topic: &str, extension: &str, ok: bool, message: &str) -> Bytes {
    encode(vsn, join_ref, None, topic, "system", &system_payload(topic, extension, ok, message))
}

/// The payload of a `system` message about `extension` on the wire `topic`:
/// `{"extension","status","message","channel"}` (also sent as an SSE `system` event).
pub fn system_payload(topic: &str, extension: &str, ok: bool, message: &str) -> Vec<u8> {
    let channel = topic.strip_prefix(crate::protocol::phoenix::topic::PREFIX).unwrap_or(topic);
    let mut p = Vec::with_capacity(message.len() + channel.len() + 80);
    p.extend_from_slice(b"{\"extension\":");
    write_str(&mut p, extension);
    p.extend_from_slice(if ok { b",\"status\":\"ok\",\"message\":" } else { b",\"status\":\"error\",\"message\":" });
    write_str(&mut p, message);
    p.extend_from_slice(b",\"channel\":");
    write_str(&mut p, channel);
    p.push(b'}');
    p
}

/// `phx_close` or `phx_error` for a channel: Phoenix sends both with `ref == join_ref`, which
/// realtime-js requires (it ignores them otherwise).
pub fn channel_control(vsn: Vsn, join_ref: Option<&str>, topic: &str, event: &str) -> Bytes {
    encode(vsn, join_ref, join_ref, topic, event, b"{}")
}

/// Writes the broadcast payload object shared by every text encoding:
/// `{"type":"broadcast","event":E,"payload":P,"meta":M}` (`meta` omitted when empty).
pub fn write_broadcast_payload(out: &mut Vec<u8>, event: &str, payload: &[u8], meta: &[u8]) {
    out.extend_from_slice(b"{\"type\":\"broadcast\",\"event\":");
    write_str(out, event);
    out.extend_from_slice(b",\"payload\":");
    out.extend_from_slice(payload);
    if !meta.is_empty() {
        out.extend_from_slice(b",\"meta\":");
        out.extend_from_slice(meta);
    }
    out.push(b'}');
}

/// A text broadcast frame for all subscribers (`join_ref` and `ref` null).
pub fn broadcast_text(vsn: Vsn, topic: &str, event: &str, payload: &[u8], meta: &[u8]) -> Bytes {
    let mut b = FrameBuilder::new(payload.len() + meta.len() + topic.len() + event.len() + 80);
    write_message(&mut b.buf, vsn, None, None, topic, "broadcast", |out| {
        write_broadcast_payload(out, event, payload, meta)
    });
    b.finish(OpCode::Text)
}

/// A binary kind-4 user broadcast frame (vsn 2.0.0):
/// `u8 4 | u8 topic_len | u8 event_len | u8 meta_len | u8 encoding | topic | event | meta | payload`.
///
/// Returns `None` if a header field exceeds 255 bytes; callers then fall back to text.
pub fn broadcast_binary(topic: &str, event: &str, meta: &[u8], json: bool, payload: &[u8]) -> Option<Bytes> {
    if topic.len() > 255 || event.len() > 255 || meta.len() > 255 {
        return None;
    }
    let mut b = FrameBuilder::new(5 + topic.len() + event.len() + meta.len() + payload.len());
    b.buf.extend_from_slice(&[4, topic.len() as u8, event.len() as u8, meta.len() as u8, json as u8]);
    b.buf.extend_from_slice(topic.as_bytes());
    b.buf.extend_from_slice(event.as_bytes());
    b.buf.extend_from_slice(meta);
    b.buf.extend_from_slice(payload);
    Some(b.finish(OpCode::Binary))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::ws::frame::parse_header;

    fn body(frame: &Bytes) -> &[u8] {
        let (_, n) = parse_header(frame).unwrap().unwrap();
        &frame[n..]
    }

    #[test]
    fn decodes_captured_v2_frames() {
        let join = br#"["6","6","realtime:room1","phx_join",{"config":{"broadcast":{"self":true,"ack":true},"presence":{"key":"u1","enabled":true},"postgres_changes":[],"private":false}}]"#;
        let m = decode_text(Vsn::V2, join).unwrap();
        assert_eq!(m.join_ref, Some("\"6\""));
        assert_eq!(m.msg_ref, Some("\"6\""));
        assert_eq!(m.topic, "realtime:room1");
        assert_eq!(m.event, "phx_join");
        let hb = br#"[null,"7","phoenix","heartbeat",{}]"#;
        let m = decode_text(Vsn::V2, hb).unwrap();
        assert_eq!(m.join_ref, None);
        assert_eq!(m.msg_ref, Some("\"7\""));
    }

    #[test]
    fn decodes_captured_v1_frame() {
        let b = br#"{"topic":"realtime:room3","event":"broadcast","payload":{"type":"broadcast","event":"e","payload":{"b":2}},"ref":"7","join_ref":"6"}"#;
        let m = decode_text(Vsn::V1, b).unwrap();
        assert_eq!((m.join_ref, m.msg_ref), (Some("\"6\""), Some("\"7\"")));
        assert_eq!(m.event, "broadcast");
    }

    #[test]
    fn rejects_bad_text() {
        assert!(decode_text(Vsn::V2, b"not json").is_err());
        assert!(decode_text(Vsn::V2, b"[1,2,3]").is_err());
        assert_eq!(decode_text(Vsn::V2, br#"[{},"1","t","e",{}]"#).unwrap_err(), DecodeError::BadRef);
        assert!(decode_text(Vsn::V1, br#"{"event":"x"}"#).is_err());
    }

    #[test]
    fn decodes_captured_kind3() {
        let hex = "0301010e06000136377265616c74696d653a726f6f6d31637572736f727b2278223a327d";
        let bytes: Vec<u8> =
            (0..hex.len()).step_by(2).map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap()).collect();
        let p = decode_binary(&bytes).unwrap();
        assert_eq!(
            p,
            BinaryPush {
                join_ref: "6",
                msg_ref: "7",
                topic: "realtime:room1",
                event: "cursor",
                metadata: "",
                json: true,
                payload: b"{\"x\":2}"
            }
        );
        // realtime-js test vector
        let v = b"\x03\x02\x01\x03\x0a\x00\x0110" as &[u8];
        let mut full = v.to_vec();
        full.extend_from_slice(b"1topuser-event{\"a\":\"b\"}");
        let p = decode_binary(&full).unwrap();
        assert_eq!((p.join_ref, p.msg_ref, p.topic, p.event), ("10", "1", "top", "user-event"));
        assert!(decode_binary(&full[..10]).is_err());
        assert_eq!(decode_binary(&[4, 0, 0]).unwrap_err(), DecodeError::BinaryKind(4));
        let kind0 = [&[0u8, 1, 1, 5, 2][..], b"1", b"2", b"room1", b"ev", &[9, 9]].concat();
        assert_eq!(binary_push_address(&kind0), Some(("1", "2", "room1")));
        assert_eq!(binary_push_address(&kind0[..8]), None, "truncated");
        assert_eq!(binary_push_address(&[3, 0, 0, 0, 0]), None, "not kind 0");
    }

    #[test]
    fn encodes_captured_kind4() {
        let f = broadcast_binary("realtime:room1", "cursor", br#"{"id":"abc"}"#, true, br#"{"x":2}"#).unwrap();
        let hex: String = body(&f).iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(hex, "040e060c017265616c74696d653a726f6f6d31637572736f727b226964223a22616263227d7b2278223a327d");
    }

    #[test]
    fn encodes_replies_like_phoenix() {
        let r = reply(Vsn::V2, Some("\"6\""), Some("\"10\""), "realtime:room1", true, b"{}");
        assert_eq!(body(&r), br#"["6","10","realtime:room1","phx_reply",{"status":"ok","response":{}}]"#);
        let c = channel_control(Vsn::V2, Some("\"6\""), "realtime:room1", "phx_close");
        assert_eq!(body(&c), br#"["6","6","realtime:room1","phx_close",{}]"#);
        let h = reply(Vsn::V2, None, Some("\"7\""), "phoenix", true, b"{}");
        assert_eq!(body(&h), br#"[null,"7","phoenix","phx_reply",{"status":"ok","response":{}}]"#);
        let v1 = reply(Vsn::V1, Some("\"6\""), Some("\"6\""), "realtime:room3", true, br#"{"postgres_changes":[]}"#);
        assert_eq!(body(&v1), br#"{"topic":"realtime:room3","event":"phx_reply","payload":{"status":"ok","response":{"postgres_changes":[]}},"ref":"6"}"#);
        let s =
            system(Vsn::V2, Some("\"13\""), "realtime:chat-room", "postgres_changes", true, "Subscribed to PostgreSQL");
        assert_eq!(body(&s), br#"["13",null,"realtime:chat-room","system",{"extension":"postgres_changes","status":"ok","message":"Subscribed to PostgreSQL","channel":"chat-room"}]"#);
    }

    #[test]
    fn encodes_broadcast_text() {
        let f = broadcast_text(Vsn::V2, "realtime:room1", "cursor", br#"{"x":1}"#, b"");
        assert_eq!(
            body(&f),
            br#"[null,null,"realtime:room1","broadcast",{"type":"broadcast","event":"cursor","payload":{"x":1}}]"#
        );
        let parsed: serde_json::Value =
            serde_json::from_slice(body(&broadcast_text(Vsn::V1, "t\"x", "e", b"1", br#"{"id":"a"}"#))).unwrap();
        assert_eq!(parsed["payload"]["meta"]["id"], "a");
        assert_eq!(parsed["topic"], "t\"x");
    }
}
