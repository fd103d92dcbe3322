//! The history log: record format, recovery, compaction and the per-shard writer.
//!
//! Record: `u32 len | u32 crc32(body) | body`, little endian. A zero length marks the end (the
//! DMA writer pads with zeros). Bodies:
//! - message (`1`): `u8 private | u16 topic | u16 epoch | u64 offset | u64 created_ms |
//!   u64 expires_ms (0 = none) | u8 id | u16 event | u8 payload kind (0 JSON, 1 bytes) |
//!   u8 binary_frame | u32 payload`, each string prefixed by its length;
//! - checkpoint (`2`): `u8 private | u16 topic | u16 epoch | u64 last_offset`, written at a
//!   clean shutdown: the stream up to `last_offset` is complete on disk as far as it was
//!   durable, so the epoch may continue.
//!
//! Files are `<generation>-<sequence>-s<shard>.log` in the data directory; sorting the names
//! sorts the records in time order.

use std::collections::HashMap;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use crate::channel::history::StoredMsg;
use crate::protocol::phoenix::session::Payload;
use crate::protocol::phoenix::Topic;

/// How often a shard's writer calls `fdatasync` when records were written (group commit).
pub const SYNC_INTERVAL: Duration = Duration::from_millis(5);

/// A segment is compacted (rewritten from memory) once it grows past this size.
pub const COMPACT_BYTES: u64 = 64 << 20;

/// Largest record body accepted when reading (guards against garbage lengths).
const MAX_RECORD: usize = 64 << 20;

/// One log record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    Message { topic: Topic, msg: StoredMsg },
    Checkpoint { topic: Topic, epoch: Arc<str>, last_offset: u64 },
}

/// Why a record could not be read; recovery stops reading that file there.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    #[error("record length {0} is implausible")]
    BadLength(usize),
    #[error("checksum mismatch")]
    Checksum,
    #[error("malformed record body: {0}")]
    Body(&'static str),
}

fn put_str16(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u16).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// Appends the encoded record to `out`.
pub fn encode(rec: &Record, out: &mut Vec<u8>) {
    let start = out.len();
    out.extend_from_slice(&[0; 8]);
    match rec {
        Record::Message { topic, msg } => {
            out.push(1);
            out.push(topic.is_private() as u8);
            put_str16(out, topic.name());
            put_str16(out, &msg.epoch);
            out.extend_from_slice(&msg.offset.to_le_bytes());
            out.extend_from_slice(&msg.created_ms.to_le_bytes());
            out.extend_from_slice(&msg.expires_ms.unwrap_or(0).to_le_bytes());
            let id = &msg.id[..msg.id.len().min(255)];
            out.push(id.len() as u8);
            out.extend_from_slice(id.as_bytes());
            put_str16(out, &msg.event);
            let (kind, data) = match &msg.payload {
                Payload::Json(b) => (0u8, b),
                Payload::Binary(b) => (1u8, b),
            };
            out.push(kind);
            out.push(msg.binary_frame as u8);
            out.extend_from_slice(&(data.len() as u32).to_le_bytes());
            out.extend_from_slice(data);
            // Optional trailing field (records written before it have none).
            if let Some(u) = &msg.user_id {
                put_str16(out, &u[..u.len().min(u16::MAX as usize)]);
            }
        }
        Record::Checkpoint { topic, epoch, last_offset } => {
            out.push(2);
            out.push(topic.is_private() as u8);
            put_str16(out, topic.name());
            put_str16(out, epoch);
            out.extend_from_slice(&last_offset.to_le_bytes());
        }
    }
    let body_len = out.len() - start - 8;
    let crc = crc32fast::hash(&out[start + 8..]);
    out[start..start + 4].copy_from_slice(&(body_len as u32).to_le_bytes());
    out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
}

/// Reads one record from the front of `buf`: `Ok(None)` at a clean end (no more bytes, or
/// zero padding) or when the record is incomplete (a torn tail).
pub fn decode(buf: &[u8]) -> Result<Option<(Record, usize)>, RecordError> {
    if buf.len() < 8 {
        return Ok(None);
    }
    let len = u32::from_le_bytes(buf[0..4].try_into().expect("4 bytes")) as usize;
    if len == 0 {
        return Ok(None);
    }
    if len > MAX_RECORD {
        return Err(RecordError::BadLength(len));
    }
    if buf.len() < 8 + len {
        return Ok(None);
    }
    let crc = u32::from_le_bytes(buf[4..8].try_into().expect("4 bytes"));
    let body = &buf[8..8 + len];
    if crc32fast::hash(body) != crc {
        return Err(RecordError::Checksum);
    }
    Ok(Some((decode_body(body)?, 8 + len)))
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], RecordError> {
        if self.0.len() < n {
            return Err(RecordError::Body("truncated field"));
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }
    fn u8(&mut self) -> Result<u8, RecordError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, RecordError> {
        Ok(u16::from_le_bytes(self.take(2)?.try_into().expect("2 bytes")))
    }
    fn u32(&mut self) -> Result<u32, RecordError> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4 bytes")))
    }
    fn u64(&mut self) -> Result<u64, RecordError> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("8 bytes")))
    }
    fn str(&mut self, n: usize) -> Result<&'a str, RecordError> {
        std::str::from_utf8(self.take(n)?).map_err(|_| RecordError::Body("string is not UTF-8"))
    }
}

fn decode_body(body: &[u8]) -> Result<Record, RecordError> {
    let mut r = Reader(body);
    let kind = r.u8()?;
    let private = r.u8()? != 0;
    let n = r.u16()? as usize;
    let topic = Topic::new(r.str(n)?, private).map_err(|_| RecordError::Body("bad topic"))?;
    let n = r.u16()? as usize;
    let epoch: Arc<str> = Arc::from(r.str(n)?);
    match kind {
        1 => {
            let offset = r.u64()?;
            let created_ms = r.u64()?;
            let expires_ms = Some(r.u64()?).filter(|&e| e != 0);
            let n = r.u8()? as usize;
            let id = Arc::from(r.str(n)?);
            let n = r.u16()? as usize;
            let event = Arc::from(r.str(n)?);
            let pkind = r.u8()?;
            let binary_frame = r.u8()? != 0;
            let n = r.u32()? as usize;
            let data = Bytes::copy_from_slice(r.take(n)?);
            let payload = match pkind {
                0 => Payload::Json(data),
                1 => Payload::Binary(data),
                _ => return Err(RecordError::Body("unknown payload kind")),
            };
            let user_id = if r.0.is_empty() {
                None
            } else {
                let n = r.u16()? as usize;
                Some(Arc::from(r.str(n)?))
            };
            Ok(Record::Message {
                topic,
                msg: StoredMsg { offset, epoch, id, event, payload, binary_frame, created_ms, expires_ms, user_id },
            })
        }
        2 => Ok(Record::Checkpoint { topic, epoch, last_offset: r.u64()? }),
        _ => Err(RecordError::Body("unknown record kind")),
    }
}

/// What recovery found for one topic.
#[derive(Debug, Default)]
pub struct RecoveredTopic {
    /// Epoch of the newest record.
    pub epoch: Option<Arc<str>>,
    /// Newest offset seen (messages or checkpoint).
    pub last_offset: u64,
    /// A checkpoint came after the last message: the epoch may continue.
    pub clean: bool,
    pub messages: Vec<Arc<StoredMsg>>,
    /// Cluster mode (NATS): every message the stream still holds, in offset order, with its
    /// persisted flag: they fill the recent window (and the history, for persisted ones).
    pub recent: Vec<(Arc<StoredMsg>, bool)>,
}

/// Everything read from the data directory.
#[derive(Debug, Default)]
pub struct Recovered {
    pub topics: HashMap<Topic, RecoveredTopic>,
    /// Files read (to delete once the snapshot is written).
    pub files: Vec<PathBuf>,
    /// Bytes dropped from torn or corrupt tails.
    pub dropped_bytes: u64,
    pub records: u64,
}

/// Reads every segment in `dir` (creating the directory if needed).
pub fn recover(dir: &Path) -> io::Result<Recovered> {
    std::fs::create_dir_all(dir)?;
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "log"))
        .collect();
    files.sort();
    let mut rec = Recovered::default();
    for f in &files {
        let data = std::fs::read(f)?;
        let mut pos = 0;
        loop {
            match decode(&data[pos..]) {
                Ok(Some((r, used))) => {
                    pos += used;
                    rec.records += 1;
                    apply(&mut rec.topics, r);
                }
                Ok(None) => break,
                Err(e) => {
                    tracing::warn!(file = %f.display(), at = pos, error = %e, "history log: dropping the rest of a corrupt segment");
                    break;
                }
            }
        }
        let rest = data[pos..].iter().filter(|&&b| b != 0).count() as u64;
        if rest > 0 {
            tracing::warn!(file = %f.display(), at = pos, bytes = data.len() - pos, "history log: dropped a torn tail");
            rec.dropped_bytes += (data.len() - pos) as u64;
        }
    }
    rec.files = files;
    Ok(rec)
}

/// Folds one record into the recovered state (records in log order).
pub fn apply(topics: &mut HashMap<Topic, RecoveredTopic>, r: Record) {
    match r {
        Record::Message { topic, msg } => {
            let t = topics.entry(topic).or_default();
            t.clean = false;
            t.last_offset = t.last_offset.max(msg.offset);
            t.epoch = Some(msg.epoch.clone());
            // A later record of the same offset (compaction rewrote it) replaces the earlier.
            if let Some(last) = t.messages.last() {
                if last.offset >= msg.offset {
                    t.messages.retain(|m| m.offset != msg.offset);
                }
            }
            t.messages.push(Arc::new(msg));
        }
        Record::Checkpoint { topic, epoch, last_offset } => {
            let t = topics.entry(topic).or_default();
            t.clean = t.epoch.as_deref().is_none_or(|e| *e == *epoch);
            t.epoch = Some(epoch);
            t.last_offset = t.last_offset.max(last_offset);
        }
    }
}

/// Segment file name.
pub fn segment_name(generation: u64, seq: u32, shard: usize) -> String {
    format!("{generation:020}-{seq:06}-s{shard}.log")
}

/// Writes `records` as a new segment with plain I/O and `fsync` (start-up compaction).
pub fn write_snapshot(path: &Path, records: &[Record]) -> io::Result<()> {
    let mut buf = Vec::new();
    for r in records {
        encode(r, &mut buf);
    }
    let mut f = std::fs::File::create(path)?;
    f.write_all(&buf)?;
    f.sync_all()
}

/// Fsyncs a directory (so created and removed files are durable).
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(o: u64, payload: Payload) -> StoredMsg {
        StoredMsg {
            offset: o,
            epoch: Arc::from("ep"),
            id: Arc::from("id"),
            event: Arc::from("ev"),
            payload,
            binary_frame: o.is_multiple_of(2),
            created_ms: 1000 + o,
            expires_ms: if o == 2 { Some(99) } else { None },
            user_id: (o == 3).then(|| Arc::from("u-3")),
        }
    }

    #[test]
    fn round_trip() {
        let t = Topic::new("room", true).unwrap();
        let recs = vec![
            Record::Message { topic: t.clone(), msg: msg(1, Payload::Json(Bytes::from_static(b"{\"a\":1}"))) },
            Record::Message { topic: t.clone(), msg: msg(2, Payload::Binary(Bytes::from_static(&[0, 1, 255]))) },
            Record::Checkpoint { topic: t, epoch: Arc::from("ep"), last_offset: 7 },
        ];
        let mut buf = Vec::new();
        for r in &recs {
            encode(r, &mut buf);
        }
        buf.extend_from_slice(&[0; 100]); // DMA padding
        let mut pos = 0;
        let mut out = Vec::new();
        while let Some((r, n)) = decode(&buf[pos..]).unwrap() {
            out.push(r);
            pos += n;
        }
        assert_eq!(out, recs);
    }

    #[test]
    fn torn_and_corrupt_tails_stop_reading() {
        let t = Topic::new("room", false).unwrap();
        let mut buf = Vec::new();
        encode(&Record::Message { topic: t.clone(), msg: msg(1, Payload::Json(Bytes::from_static(b"1"))) }, &mut buf);
        let whole = buf.len();
        encode(&Record::Message { topic: t, msg: msg(2, Payload::Json(Bytes::from_static(b"2"))) }, &mut buf);
        // torn: cut in the middle of the second record
        for cut in whole + 1..buf.len() {
            let (_, n) = decode(&buf[..cut]).unwrap().unwrap();
            assert_eq!(decode(&buf[n..cut]).unwrap(), None);
        }
        // corrupt: flip a byte in the second record's body
        let mut bad = buf.clone();
        let i = bad.len() - 3;
        bad[i] ^= 0xff;
        assert_eq!(decode(&bad[whole..]), Err(RecordError::Checksum));
        // garbage length
        assert!(decode(&[0xff, 0xff, 0xff, 0x7f, 0, 0, 0, 0]).is_err());
    }

    #[test]
    fn recovery_reads_files_in_order_and_tracks_clean_shutdown() {
        let dir = std::env::temp_dir().join(format!("cc-log-{}-{}", std::process::id(), fastrand::u64(..)));
        std::fs::create_dir_all(&dir).unwrap();
        let t = Topic::new("a", false).unwrap();
        let m = |o| Record::Message { topic: t.clone(), msg: msg(o, Payload::Json(Bytes::from_static(b"{}"))) };
        write_snapshot(&dir.join(segment_name(1, 0, 0)), &[m(1), m(3)]).unwrap();
        write_snapshot(
            &dir.join(segment_name(1, 1, 0)),
            &[m(4), Record::Checkpoint { topic: t.clone(), epoch: Arc::from("ep"), last_offset: 9 }],
        )
        .unwrap();
        // a torn third file
        let mut torn = Vec::new();
        encode(&m(10), &mut torn);
        std::fs::write(dir.join(segment_name(2, 0, 1)), &torn[..torn.len() - 2]).unwrap();
        let r = recover(&dir).unwrap();
        let rt = &r.topics[&t];
        assert_eq!(rt.messages.iter().map(|m| m.offset).collect::<Vec<_>>(), vec![1, 3, 4]);
        assert_eq!(rt.last_offset, 9);
        assert!(rt.clean);
        assert!(r.dropped_bytes > 0);
        assert_eq!(r.files.len(), 3);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
