//! Encode once, send everywhere: a published message becomes one frame per wire format in
//! use, and the same `Bytes` goes to every subscriber of that format on every shard.

use std::sync::Arc;

use bytes::Bytes;

use crate::channel::{Format, FormatSet};
use crate::protocol::json::{write_str, write_u64};
use crate::protocol::phoenix::message::{broadcast_binary, broadcast_text, Vsn};
use crate::protocol::phoenix::session::Payload;

/// A message as it travels from its topic's owner to subscribing shards.
#[derive(Debug, Clone)]
pub struct Frames {
    /// Frame per [`Format::index`]; `None` where the format is unused or cannot carry the
    /// message (binary payloads never reach vsn 1.0.0 clients).
    pub by_format: [Option<Bytes>; 3],
    /// The message's offset in its topic stream (0 for presence diffs).
    pub offset: u64,
    /// The stream's epoch (SSE streams put it in their resume token).
    pub epoch: Arc<str>,
    /// The SSE event with its `id: <epoch>-<offset>` line in front: the complete resume token
    /// of any single-topic stream, so those streams share one frame like WebSocket subscribers.
    /// Multi-topic streams write their own token before the shared event.
    pub sse_with_id: Option<Bytes>,
    /// When the owner sequenced the message (for the sequenced → first write histogram).
    pub sequenced: Option<std::time::Instant>,
}

impl Frames {
    /// A copy whose bytes belong to this shard alone. Shards that each clone the same `Bytes`
    /// once per subscriber all update one shared atomic counter; with a private copy (one
    /// memcpy per message per shard) the refcount traffic stays on the shard's own core.
    pub fn localized(&self) -> Frames {
        let copy = |b: &Option<Bytes>| b.as_ref().map(|b| Bytes::copy_from_slice(b));
        Frames {
            by_format: [copy(&self.by_format[0]), copy(&self.by_format[1]), copy(&self.by_format[2])],
            offset: self.offset,
            epoch: self.epoch.clone(),
            sse_with_id: copy(&self.sse_with_id),
            sequenced: self.sequenced,
        }
    }

    /// The frame for subscribers using `format`.
    pub fn get(&self, format: Format) -> Option<&Bytes> {
        self.by_format[format.index()].as_ref()
    }
}

/// What the owner knows about one message when it encodes it.
#[derive(Debug)]
pub struct Message<'a> {
    /// `realtime:<name>` as WebSocket clients see it.
    pub wire_topic: &'a str,
    pub event: &'a str,
    pub payload: &'a Payload,
    /// Arrived as a binary frame (vsn 2 subscribers get kind 4 even for JSON payloads).
    pub binary_frame: bool,
    pub id: &'a str,
    pub epoch: &'a str,
    pub offset: u64,
    /// Sent from history (replay or resume), marked `meta.replayed: true`.
    pub replayed: bool,
    /// The publisher's identity (its token's `sub`), `meta.user_id` when known.
    pub user_id: Option<&'a str>,
}

/// `{"id":"..","offset":N,"epoch":".."[,"user_id":".."][,"replayed":true]}`.
pub fn meta_json(id: &str, offset: u64, epoch: &str, user_id: Option<&str>, replayed: bool) -> Vec<u8> {
    let mut m = Vec::with_capacity(id.len() + epoch.len() + 40);
    m.extend_from_slice(b"{\"id\":");
    write_str(&mut m, id);
    m.extend_from_slice(b",\"offset\":");
    write_u64(&mut m, offset);
    m.extend_from_slice(b",\"epoch\":");
    write_str(&mut m, epoch);
    if let Some(u) = user_id {
        m.extend_from_slice(b",\"user_id\":");
        write_str(&mut m, u);
    }
    if replayed {
        m.extend_from_slice(b",\"replayed\":true");
    }
    m.push(b'}');
    m
}

/// Encodes `msg` once for each format in `formats`.
pub fn encode(msg: &Message<'_>, formats: FormatSet) -> Frames {
    let meta = meta_json(msg.id, msg.offset, msg.epoch, msg.user_id, msg.replayed);
    let mut by_format: [Option<Bytes>; 3] = [None, None, None];
    if formats.contains(Format::V2) {
        by_format[Format::V2.index()] = match msg.payload {
            Payload::Json(p) if !msg.binary_frame => Some(broadcast_text(Vsn::V2, msg.wire_topic, msg.event, p, &meta)),
            Payload::Json(p) => broadcast_binary(msg.wire_topic, msg.event, &meta, true, p)
                .or_else(|| Some(broadcast_text(Vsn::V2, msg.wire_topic, msg.event, p, &meta))),
            Payload::Binary(p) => broadcast_binary(msg.wire_topic, msg.event, &meta, false, p),
        };
    }
    if formats.contains(Format::V1) {
        if let Payload::Json(p) = msg.payload {
            by_format[Format::V1.index()] = Some(broadcast_text(Vsn::V1, msg.wire_topic, msg.event, p, &meta));
        }
    }
    let mut sse_with_id = None;
    if formats.contains(Format::Sse) {
        let event = sse_event(msg, &meta);
        let mut with_id = format!("id: {}-{}\n", msg.epoch, msg.offset).into_bytes();
        with_id.extend_from_slice(&event);
        sse_with_id = Some(Bytes::from(with_id));
        by_format[Format::Sse.index()] = Some(event);
    }
    Frames { by_format, offset: msg.offset, epoch: Arc::from(msg.epoch), sse_with_id, sequenced: None }
}

/// `event: broadcast` with data `{"topic","event","payload","meta"}`; a binary payload travels
/// as base64 with `"encoding":"base64"`.
fn sse_event(msg: &Message<'_>, meta: &[u8]) -> Bytes {
    let name = msg.wire_topic.strip_prefix(crate::protocol::phoenix::topic::PREFIX).unwrap_or(msg.wire_topic);
    let mut d = Vec::with_capacity(msg.payload.len() + meta.len() + name.len() + 64);
    d.extend_from_slice(b"{\"topic\":");
    write_str(&mut d, name);
    d.extend_from_slice(b",\"event\":");
    write_str(&mut d, msg.event);
    d.extend_from_slice(b",\"payload\":");
    match msg.payload {
        Payload::Json(p) => d.extend_from_slice(p),
        Payload::Binary(p) => {
            use base64::Engine;
            write_str(&mut d, &base64::engine::general_purpose::STANDARD.encode(p));
            d.extend_from_slice(b",\"encoding\":\"base64\"");
        }
    }
    d.extend_from_slice(b",\"meta\":");
    d.extend_from_slice(meta);
    d.push(b'}');
    crate::protocol::sse::event("broadcast", &d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::ws::frame::parse_header;

    fn body(b: &Bytes) -> &[u8] {
        let (_, n) = parse_header(b).unwrap().unwrap();
        &b[n..]
    }

    #[test]
    fn encodes_each_format_once() {
        let payload = Payload::Json(Bytes::from_static(b"{\"x\":1}"));
        let m = Message {
            wire_topic: "realtime:r",
            event: "e",
            payload: &payload,
            binary_frame: false,
            id: "i",
            epoch: "ep",
            offset: 3,
            replayed: false,
            user_id: None,
        };
        let mut fs = FormatSet::default();
        fs.insert(Format::V2);
        let f = encode(&m, fs);
        assert!(f.get(Format::V1).is_none());
        assert_eq!(body(f.get(Format::V2).unwrap()), br#"[null,null,"realtime:r","broadcast",{"type":"broadcast","event":"e","payload":{"x":1},"meta":{"id":"i","offset":3,"epoch":"ep"}}]"#);
    }

    #[test]
    fn binary_payloads_skip_v1() {
        let payload = Payload::Binary(Bytes::from_static(&[1, 2, 3]));
        let m = Message {
            wire_topic: "realtime:r",
            event: "e",
            payload: &payload,
            binary_frame: true,
            id: "i",
            epoch: "ep",
            offset: 1,
            replayed: false,
            user_id: None,
        };
        let mut fs = FormatSet::default();
        fs.insert(Format::V1);
        fs.insert(Format::V2);
        let f = encode(&m, fs);
        assert!(f.get(Format::V1).is_none());
        let v2 = body(f.get(Format::V2).unwrap());
        assert_eq!(&v2[..5], &[4, 10, 1, v2[3], 0]);
        assert!(v2.ends_with(&[1, 2, 3]));
    }
}
