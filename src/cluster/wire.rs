//! The bytes one node writes for the others: a [`Batch`] of sequenced messages and presence
//! changes, carried by the backend (for Postgres, the content of one
//! `pg_logical_emit_message(true, 'corecast', …)`). Pure: encode and decode, nothing else; the
//! decoder refuses anything malformed with a [`WireError`] and never panics (fuzzed with the
//! other parsers).
//!
//! Layout, little-endian: `version u8 (1)`, `run u64`, then items until the end, each a tag
//! byte and its fields. Strings and byte strings are `u32` length + bytes.

use std::sync::Arc;

use bytes::Bytes;

use crate::protocol::phoenix::session::Payload;
use crate::protocol::phoenix::Topic;

const VERSION: u8 = 1;

const TAG_PUBLISH: u8 = 1;
const TAG_TRACK: u8 = 2;
const TAG_UNTRACK: u8 = 3;

/// A connection on the publishing node (for `self: false`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sender {
    pub shard: u32,
    pub index: u32,
    pub generation: u32,
}

/// One sequenced broadcast: everything a node needs to store and deliver it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sequenced {
    pub topic: Topic,
    pub epoch: Arc<str>,
    pub offset: u64,
    pub id: Arc<str>,
    pub event: Arc<str>,
    pub payload: Payload,
    pub binary_frame: bool,
    pub created_ms: u64,
    /// Persisted (in `corecast.history` already, written in the same transaction).
    pub persisted: bool,
    pub expires_ms: Option<u64>,
    /// The publisher, when its channel has `self: false`.
    pub exclude: Option<Sender>,
    /// The publisher's identity (its token's `sub`).
    pub user_id: Option<Arc<str>>,
}

impl Sequenced {
    /// The message as a topic's history keeps it.
    pub fn into_stored(self) -> crate::channel::history::StoredMsg {
        crate::channel::history::StoredMsg {
            offset: self.offset,
            epoch: self.epoch,
            id: self.id,
            event: self.event,
            payload: self.payload,
            binary_frame: self.binary_frame,
            created_ms: self.created_ms,
            expires_ms: self.expires_ms,
            user_id: self.user_id,
        }
    }
}

/// A presence member on the publishing node: its shard and connection there.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Member {
    pub shard: u32,
    pub conn: u64,
}

/// One item of a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Item {
    Publish(Box<Sequenced>),
    Track { topic: Topic, member: Member, key: Arc<str>, meta: Bytes },
    Untrack { topic: Topic, member: Member },
}

/// What one node sent in one transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    /// The sending process (random per start): presence members are keyed by it, and a node
    /// recognizes its own messages.
    pub run: u64,
    pub items: Vec<Item>,
}

/// Why a batch could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("cluster batch: unknown version {0}")]
    Version(u8),
    #[error("cluster batch: truncated")]
    Truncated,
    #[error("cluster batch: unknown item tag {0}")]
    Tag(u8),
    #[error("cluster batch: a string is not UTF-8")]
    Utf8,
    #[error("cluster batch: invalid topic: {0}")]
    Topic(String),
}

/// Appends the batch header for `run` to an empty buffer.
pub fn start(run: u64, out: &mut Vec<u8>) {
    out.push(VERSION);
    out.extend_from_slice(&run.to_le_bytes());
}

/// Appends one broadcast (what [`push`] does with `Item::Publish`, without building the item).
pub fn push_publish(m: &Sequenced, out: &mut Vec<u8>) {
    out.push(TAG_PUBLISH);
    topic(out, &m.topic);
    bytes(out, m.epoch.as_bytes());
    out.extend_from_slice(&m.offset.to_le_bytes());
    bytes(out, m.id.as_bytes());
    bytes(out, m.event.as_bytes());
    let (kind, p) = match &m.payload {
        Payload::Json(p) => (0u8, p),
        Payload::Binary(p) => (1u8, p),
    };
    let flags = kind
        | (m.binary_frame as u8) << 1
        | (m.persisted as u8) << 2
        | (m.exclude.is_some() as u8) << 3
        | (m.user_id.is_some() as u8) << 4;
    out.push(flags);
    bytes(out, p);
    out.extend_from_slice(&m.created_ms.to_le_bytes());
    out.extend_from_slice(&m.expires_ms.unwrap_or(0).to_le_bytes());
    if let Some(s) = m.exclude {
        for v in [s.shard, s.index, s.generation] {
            out.extend_from_slice(&v.to_le_bytes());
        }
    }
    if let Some(u) = &m.user_id {
        bytes(out, u.as_bytes());
    }
}

/// Appends one item.
pub fn push(item: &Item, out: &mut Vec<u8>) {
    match item {
        Item::Publish(m) => push_publish(m, out),
        Item::Track { topic: t, member, key, meta } => {
            out.push(TAG_TRACK);
            topic(out, t);
            self::member(out, member);
            bytes(out, key.as_bytes());
            bytes(out, meta);
        }
        Item::Untrack { topic: t, member } => {
            out.push(TAG_UNTRACK);
            topic(out, t);
            self::member(out, member);
        }
    }
}

/// Encodes a whole batch.
pub fn encode(batch: &Batch) -> Vec<u8> {
    let mut out = Vec::with_capacity(64 * batch.items.len() + 9);
    start(batch.run, &mut out);
    for item in &batch.items {
        push(item, &mut out);
    }
    out
}

fn topic(out: &mut Vec<u8>, t: &Topic) {
    out.push(t.is_private() as u8);
    bytes(out, t.name().as_bytes());
}

fn member(out: &mut Vec<u8>, m: &Member) {
    out.extend_from_slice(&m.shard.to_le_bytes());
    out.extend_from_slice(&m.conn.to_le_bytes());
}

fn bytes(out: &mut Vec<u8>, b: &[u8]) {
    out.extend_from_slice(&(b.len() as u32).to_le_bytes());
    out.extend_from_slice(b);
}

struct Reader<'a> {
    buf: &'a Bytes,
    pos: usize,
    /// The previous item's topic, epoch and event (by their bytes in `buf`): a batch is
    /// mostly one topic, one epoch and few events, so most are shared instead of allocated.
    last_topic: Option<(std::ops::Range<usize>, Topic)>,
    last_str: [Option<(std::ops::Range<usize>, Arc<str>)>; 2],
}

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], WireError> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.buf.len()).ok_or(WireError::Truncated)?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8, WireError> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> Result<u32, WireError> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().map_err(|_| WireError::Truncated)?))
    }
    fn u64(&mut self) -> Result<u64, WireError> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().map_err(|_| WireError::Truncated)?))
    }
    /// A length-prefixed byte string, sharing the batch's buffer.
    fn bytes(&mut self) -> Result<Bytes, WireError> {
        let n = self.u32()? as usize;
        let start = self.pos;
        self.take(n)?;
        Ok(self.buf.slice(start..start + n))
    }
    fn str(&mut self) -> Result<Arc<str>, WireError> {
        let n = self.u32()? as usize;
        std::str::from_utf8(self.take(n)?).map(Arc::from).map_err(|_| WireError::Utf8)
    }
    /// [`Self::str`], the same `Arc` as the previous call with `slot` when the bytes are equal.
    fn str_shared(&mut self, slot: usize) -> Result<Arc<str>, WireError> {
        let n = self.u32()? as usize;
        let start = self.pos;
        self.take(n)?;
        let range = start..self.pos;
        if let Some((r, s)) = &self.last_str[slot] {
            if self.buf[r.clone()] == self.buf[range.clone()] {
                return Ok(s.clone());
            }
        }
        let s: Arc<str> = std::str::from_utf8(&self.buf[range.clone()]).map(Arc::from).map_err(|_| WireError::Utf8)?;
        self.last_str[slot] = Some((range, s.clone()));
        Ok(s)
    }
    fn topic(&mut self) -> Result<Topic, WireError> {
        let start = self.pos;
        let private = self.u8()? != 0;
        let n = self.u32()? as usize;
        self.take(n)?;
        let range = start..self.pos;
        if let Some((r, t)) = &self.last_topic {
            if self.buf[r.clone()] == self.buf[range.clone()] {
                return Ok(t.clone());
            }
        }
        let name = std::str::from_utf8(&self.buf[start + 5..range.end]).map_err(|_| WireError::Utf8)?;
        let t = Topic::new(name, private).map_err(|e| WireError::Topic(e.to_string()))?;
        self.last_topic = Some((range, t.clone()));
        Ok(t)
    }
    fn member(&mut self) -> Result<Member, WireError> {
        Ok(Member { shard: self.u32()?, conn: self.u64()? })
    }
}

/// Decodes a batch.
pub fn decode(buf: &Bytes) -> Result<Batch, WireError> {
    let mut r = Reader { buf, pos: 0, last_topic: None, last_str: [None, None] };
    let v = r.u8()?;
    if v != VERSION {
        return Err(WireError::Version(v));
    }
    let run = r.u64()?;
    let mut items = Vec::new();
    while r.pos < buf.len() {
        let item = match r.u8()? {
            TAG_PUBLISH => {
                let topic = r.topic()?;
                let epoch = r.str_shared(0)?;
                let offset = r.u64()?;
                let id = r.str()?;
                let event = r.str_shared(1)?;
                let flags = r.u8()?;
                let p = r.bytes()?;
                let payload = if flags & 1 == 0 { Payload::Json(p) } else { Payload::Binary(p) };
                let created_ms = r.u64()?;
                let expires_ms = Some(r.u64()?).filter(|&e| e != 0);
                let exclude = if flags & 8 != 0 {
                    Some(Sender { shard: r.u32()?, index: r.u32()?, generation: r.u32()? })
                } else {
                    None
                };
                let user_id = if flags & 16 != 0 { Some(r.str()?) } else { None };
                Item::Publish(Box::new(Sequenced {
                    topic,
                    epoch,
                    offset,
                    id,
                    event,
                    payload,
                    binary_frame: flags & 2 != 0,
                    created_ms,
                    persisted: flags & 4 != 0,
                    expires_ms,
                    exclude,
                    user_id,
                }))
            }
            TAG_TRACK => {
                let topic = r.topic()?;
                let member = r.member()?;
                let key = r.str()?;
                let meta = r.bytes()?;
                Item::Track { topic, member, key, meta }
            }
            TAG_UNTRACK => Item::Untrack { topic: r.topic()?, member: r.member()? },
            t => return Err(WireError::Tag(t)),
        };
        items.push(item);
    }
    Ok(Batch { run, items })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Batch {
        let t = Topic::new("room:1", false).unwrap();
        let p = Topic::new("secret", true).unwrap();
        Batch {
            run: 0xdead_beef_0123,
            items: vec![
                Item::Publish(Box::new(Sequenced {
                    topic: t.clone(),
                    epoch: Arc::from("ep"),
                    offset: 42,
                    id: Arc::from("id-1"),
                    event: Arc::from("msg"),
                    payload: Payload::Json(Bytes::from_static(b"{\"a\":1}")),
                    binary_frame: false,
                    created_ms: 1_700_000_000_000,
                    persisted: true,
                    expires_ms: Some(1_700_000_060_000),
                    exclude: Some(Sender { shard: 1, index: 7, generation: 3 }),
                    user_id: Some(Arc::from("user-1")),
                })),
                Item::Publish(Box::new(Sequenced {
                    topic: p.clone(),
                    epoch: Arc::from("e2"),
                    offset: 1,
                    id: Arc::from("x"),
                    event: Arc::from("bin"),
                    payload: Payload::Binary(Bytes::from_static(&[0, 1, 255])),
                    binary_frame: true,
                    created_ms: 5,
                    persisted: false,
                    expires_ms: None,
                    exclude: None,
                    user_id: None,
                })),
                Item::Track {
                    topic: t.clone(),
                    member: Member { shard: 0, conn: 99 },
                    key: Arc::from("alice"),
                    meta: Bytes::from_static(b"{\"s\":1}"),
                },
                Item::Untrack { topic: p, member: Member { shard: 1, conn: u64::MAX } },
            ],
        }
    }

    #[test]
    fn batches_round_trip() {
        let b = sample();
        let bytes = Bytes::from(encode(&b));
        assert_eq!(decode(&bytes).unwrap(), b);
        let empty = Batch { run: 1, items: vec![] };
        assert_eq!(decode(&Bytes::from(encode(&empty))).unwrap(), empty);
    }

    #[test]
    fn every_truncation_and_bad_byte_is_an_error_not_a_panic() {
        let bytes = encode(&sample());
        for n in 0..bytes.len() {
            let cut = Bytes::copy_from_slice(&bytes[..n]);
            // A prefix that ends exactly between items decodes to fewer items; any other is an error.
            if let Ok(b) = decode(&cut) {
                assert!(b.items.len() < sample().items.len());
            }
        }
        assert_eq!(decode(&Bytes::from_static(&[9])), Err(WireError::Version(9)));
        let mut bad = encode(&Batch { run: 1, items: vec![] });
        bad.push(77);
        assert_eq!(decode(&Bytes::from(bad)), Err(WireError::Tag(77)));
    }
}
