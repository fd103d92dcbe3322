//! A pure decoder for the `pgoutput` logical replication messages (protocol version 1) that
//! arrive inside `XLogData`: Begin, Commit, Origin, Relation, Type, Insert, Update, Delete,
//! Truncate and logical Message.
//!
//! Bytes from the wire are untrusted: [`decode`] never panics, returns `Ok(None)` for message
//! kinds it does not know (forward compatibility) and an error for truncated or malformed
//! input. Column values stay zero-copy slices of the input [`Bytes`].
//!
//! Layouts: <https://www.postgresql.org/docs/15/protocol-logicalrep-message-formats.html>.

use bytes::Bytes;

/// Microseconds between the Unix epoch and the Postgres epoch (2000-01-01 00:00:00 UTC).
pub const PG_EPOCH_OFFSET_MICROS: i64 = 946_684_800_000_000;

/// Postgres allows at most 1,664 columns in a result and 1,600 in a table.
const MAX_COLUMNS: usize = 1664;

/// One decoded `pgoutput` message.
#[derive(Debug, Clone, PartialEq)]
pub enum Message {
    Begin(Begin),
    Commit(Commit),
    /// Replication origin of the transaction (ignored by corecast).
    Origin {
        lsn: u64,
        name: String,
    },
    Relation(Relation),
    Type(TypeMsg),
    Insert {
        relid: u32,
        new: Tuple,
    },
    /// `old` is present with REPLICA IDENTITY FULL (`key_only == false`) or when the key
    /// changed (`key_only == true`: only identity columns are set, the rest are null).
    Update {
        relid: u32,
        old: Option<Tuple>,
        key_only: bool,
        new: Tuple,
    },
    Delete {
        relid: u32,
        old: Tuple,
        key_only: bool,
    },
    Truncate {
        relids: Vec<u32>,
        cascade: bool,
        restart_identity: bool,
    },
    /// A `pg_logical_emit_message()` payload.
    LogicalMessage {
        transactional: bool,
        lsn: u64,
        prefix: String,
        content: Bytes,
    },
}

/// Start of a transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Begin {
    pub final_lsn: u64,
    /// Commit time, microseconds since 2000-01-01 UTC.
    pub commit_time: i64,
    pub xid: u32,
}

/// End of a transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Commit {
    pub flags: u8,
    pub commit_lsn: u64,
    /// The LSN to acknowledge once this transaction is handled.
    pub end_lsn: u64,
    /// Commit time, microseconds since 2000-01-01 UTC.
    pub commit_time: i64,
}

/// A table's shape, sent before its first change in a session and after each schema change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relation {
    pub relid: u32,
    pub schema: String,
    pub name: String,
    /// `d` default, `n` nothing, `f` full, `i` index.
    pub replica_identity: u8,
    pub columns: Vec<Column>,
}

/// One column of a [`Relation`], in attribute order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Column {
    /// Part of the replica identity key.
    pub key: bool,
    pub name: String,
    pub type_oid: u32,
    pub typmod: i32,
}

/// A non-builtin type used by a relation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TypeMsg {
    pub oid: u32,
    pub schema: String,
    pub name: String,
}

/// Column values of one row, in the relation's column order.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Tuple(pub Vec<Datum>);

/// One column value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Datum {
    Null,
    /// A TOASTed value that did not change (its bytes are not in the WAL record).
    Unchanged,
    /// Text output of the type.
    Text(Bytes),
    /// Binary send format (only with `binary 'true'`, which corecast does not request).
    Binary(Bytes),
}

impl Datum {
    /// The text bytes, if this is a text value.
    pub fn text(&self) -> Option<&[u8]> {
        match self {
            Self::Text(b) => Some(b),
            _ => None,
        }
    }
}

/// Why a message could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("pgoutput: truncated {0}")]
    Truncated(&'static str),
    #[error("pgoutput: unterminated string in {0}")]
    Unterminated(&'static str),
    #[error("pgoutput: {0} is not UTF-8")]
    Utf8(&'static str),
    #[error("pgoutput: unexpected tuple marker {0:#04x} in {1}")]
    Marker(u8, &'static str),
    #[error("pgoutput: unknown column kind {0:#04x}")]
    ColumnKind(u8),
    #[error("pgoutput: {0} columns is more than Postgres allows")]
    TooManyColumns(usize),
    #[error("pgoutput: {0} trailing bytes after {1}")]
    Trailing(usize, &'static str),
}

struct Reader<'a> {
    buf: &'a Bytes,
    pos: usize,
}

impl<'a> Reader<'a> {
    fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], DecodeError> {
        if self.remaining() < n {
            return Err(DecodeError::Truncated(what));
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn u8(&mut self, what: &'static str) -> Result<u8, DecodeError> {
        Ok(self.take(1, what)?[0])
    }

    fn u16(&mut self, what: &'static str) -> Result<u16, DecodeError> {
        let b = self.take(2, what)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    fn u32(&mut self, what: &'static str) -> Result<u32, DecodeError> {
        let b = self.take(4, what)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u64(&mut self, what: &'static str) -> Result<u64, DecodeError> {
        let b = self.take(8, what)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_be_bytes(a))
    }

    fn i64(&mut self, what: &'static str) -> Result<i64, DecodeError> {
        Ok(self.u64(what)? as i64)
    }

    fn cstr(&mut self, what: &'static str) -> Result<String, DecodeError> {
        let rest = &self.buf[self.pos..];
        let end = rest.iter().position(|&b| b == 0).ok_or(DecodeError::Unterminated(what))?;
        let s = std::str::from_utf8(&rest[..end]).map_err(|_| DecodeError::Utf8(what))?.to_string();
        self.pos += end + 1;
        Ok(s)
    }

    fn bytes(&mut self, n: usize, what: &'static str) -> Result<Bytes, DecodeError> {
        if self.remaining() < n {
            return Err(DecodeError::Truncated(what));
        }
        let b = self.buf.slice(self.pos..self.pos + n);
        self.pos += n;
        Ok(b)
    }

    fn tuple(&mut self) -> Result<Tuple, DecodeError> {
        let n = self.u16("tuple column count")? as usize;
        if n > MAX_COLUMNS {
            return Err(DecodeError::TooManyColumns(n));
        }
        // Every column takes at least one byte: never reserve more than the input could hold.
        let mut cols = Vec::with_capacity(n.min(self.remaining()));
        for _ in 0..n {
            let d = match self.u8("column kind")? {
                b'n' => Datum::Null,
                b'u' => Datum::Unchanged,
                k @ (b't' | b'b') => {
                    let len = self.u32("column length")? as usize;
                    let v = self.bytes(len, "column value")?;
                    if k == b't' {
                        Datum::Text(v)
                    } else {
                        Datum::Binary(v)
                    }
                }
                other => return Err(DecodeError::ColumnKind(other)),
            };
            cols.push(d);
        }
        Ok(Tuple(cols))
    }

    fn end(&self, what: &'static str) -> Result<(), DecodeError> {
        match self.remaining() {
            0 => Ok(()),
            n => Err(DecodeError::Trailing(n, what)),
        }
    }
}

/// Decodes one `pgoutput` message. `Ok(None)`: empty input or a message kind corecast does
/// not use (streaming and two-phase messages of newer protocol versions).
pub fn decode(data: &Bytes) -> Result<Option<Message>, DecodeError> {
    let mut r = Reader { buf: data, pos: 0 };
    let Some(&tag) = data.first() else {
        return Ok(None);
    };
    r.pos = 1;
    let msg = match tag {
        b'B' => {
            let final_lsn = r.u64("Begin")?;
            let commit_time = r.i64("Begin")?;
            let xid = r.u32("Begin")?;
            r.end("Begin")?;
            Message::Begin(Begin { final_lsn, commit_time, xid })
        }
        b'C' => {
            let flags = r.u8("Commit")?;
            let commit_lsn = r.u64("Commit")?;
            let end_lsn = r.u64("Commit")?;
            let commit_time = r.i64("Commit")?;
            r.end("Commit")?;
            Message::Commit(Commit { flags, commit_lsn, end_lsn, commit_time })
        }
        b'O' => {
            let lsn = r.u64("Origin")?;
            let name = r.cstr("Origin")?;
            Message::Origin { lsn, name }
        }
        b'R' => {
            let relid = r.u32("Relation")?;
            let schema = r.cstr("Relation namespace")?;
            let name = r.cstr("Relation name")?;
            let replica_identity = r.u8("Relation")?;
            let n = r.u16("Relation column count")? as usize;
            if n > MAX_COLUMNS {
                return Err(DecodeError::TooManyColumns(n));
            }
            let mut columns = Vec::with_capacity(n.min(r.remaining()));
            for _ in 0..n {
                let flags = r.u8("Relation column")?;
                let name = r.cstr("Relation column name")?;
                let type_oid = r.u32("Relation column")?;
                let typmod = r.u32("Relation column")? as i32;
                columns.push(Column { key: flags & 1 == 1, name, type_oid, typmod });
            }
            r.end("Relation")?;
            Message::Relation(Relation { relid, schema, name, replica_identity, columns })
        }
        b'Y' => {
            let oid = r.u32("Type")?;
            let schema = r.cstr("Type namespace")?;
            let name = r.cstr("Type name")?;
            r.end("Type")?;
            Message::Type(TypeMsg { oid, schema, name })
        }
        b'I' => {
            let relid = r.u32("Insert")?;
            match r.u8("Insert")? {
                b'N' => {}
                m => return Err(DecodeError::Marker(m, "Insert")),
            }
            let new = r.tuple()?;
            r.end("Insert")?;
            Message::Insert { relid, new }
        }
        b'U' => {
            let relid = r.u32("Update")?;
            let (old, key_only, marker) = match r.u8("Update")? {
                m @ (b'K' | b'O') => {
                    let old = r.tuple()?;
                    (Some(old), m == b'K', r.u8("Update")?)
                }
                m => (None, false, m),
            };
            if marker != b'N' {
                return Err(DecodeError::Marker(marker, "Update"));
            }
            let new = r.tuple()?;
            r.end("Update")?;
            Message::Update { relid, old, key_only, new }
        }
        b'D' => {
            let relid = r.u32("Delete")?;
            let key_only = match r.u8("Delete")? {
                b'K' => true,
                b'O' => false,
                m => return Err(DecodeError::Marker(m, "Delete")),
            };
            let old = r.tuple()?;
            r.end("Delete")?;
            Message::Delete { relid, old, key_only }
        }
        b'T' => {
            let n = r.u32("Truncate")? as usize;
            let options = r.u8("Truncate")?;
            if n.saturating_mul(4) > r.remaining() {
                return Err(DecodeError::Truncated("Truncate relations"));
            }
            let mut relids = Vec::with_capacity(n);
            for _ in 0..n {
                relids.push(r.u32("Truncate")?);
            }
            r.end("Truncate")?;
            Message::Truncate { relids, cascade: options & 1 != 0, restart_identity: options & 2 != 0 }
        }
        b'M' => {
            let flags = r.u8("Message")?;
            let lsn = r.u64("Message")?;
            let prefix = r.cstr("Message prefix")?;
            let len = r.u32("Message")? as usize;
            let content = r.bytes(len, "Message content")?;
            r.end("Message")?;
            Message::LogicalMessage { transactional: flags & 1 != 0, lsn, prefix, content }
        }
        _ => return Ok(None),
    };
    Ok(Some(msg))
}

/// Builders for `pgoutput` messages: test vectors, benches and fuzz seeds.
pub mod build {
    /// A value to write into a tuple.
    #[derive(Debug, Clone, Copy)]
    pub enum Val<'a> {
        Null,
        Unchanged,
        Text(&'a str),
    }

    fn tuple(out: &mut Vec<u8>, vals: &[Val<'_>]) {
        out.extend_from_slice(&(vals.len() as u16).to_be_bytes());
        for v in vals {
            match v {
                Val::Null => out.push(b'n'),
                Val::Unchanged => out.push(b'u'),
                Val::Text(t) => {
                    out.push(b't');
                    out.extend_from_slice(&(t.len() as u32).to_be_bytes());
                    out.extend_from_slice(t.as_bytes());
                }
            }
        }
    }

    /// `B`: Begin.
    pub fn begin(final_lsn: u64, commit_time: i64, xid: u32) -> Vec<u8> {
        let mut v = vec![b'B'];
        v.extend_from_slice(&final_lsn.to_be_bytes());
        v.extend_from_slice(&commit_time.to_be_bytes());
        v.extend_from_slice(&xid.to_be_bytes());
        v
    }

    /// `C`: Commit.
    pub fn commit(commit_lsn: u64, end_lsn: u64, commit_time: i64) -> Vec<u8> {
        let mut v = vec![b'C', 0];
        v.extend_from_slice(&commit_lsn.to_be_bytes());
        v.extend_from_slice(&end_lsn.to_be_bytes());
        v.extend_from_slice(&commit_time.to_be_bytes());
        v
    }

    /// `R`: Relation with `(name, type_oid, key)` columns.
    pub fn relation(relid: u32, schema: &str, name: &str, identity: u8, cols: &[(&str, u32, bool)]) -> Vec<u8> {
        let mut v = vec![b'R'];
        v.extend_from_slice(&relid.to_be_bytes());
        for s in [schema, name] {
            v.extend_from_slice(s.as_bytes());
            v.push(0);
        }
        v.push(identity);
        v.extend_from_slice(&(cols.len() as u16).to_be_bytes());
        for (n, oid, key) in cols {
            v.push(*key as u8);
            v.extend_from_slice(n.as_bytes());
            v.push(0);
            v.extend_from_slice(&oid.to_be_bytes());
            v.extend_from_slice(&(-1i32).to_be_bytes());
        }
        v
    }

    /// `I`: Insert.
    pub fn insert(relid: u32, new: &[Val<'_>]) -> Vec<u8> {
        let mut v = vec![b'I'];
        v.extend_from_slice(&relid.to_be_bytes());
        v.push(b'N');
        tuple(&mut v, new);
        v
    }

    /// `U`: Update, with an old tuple marked `O` (full) or `K` (key) when given.
    pub fn update(relid: u32, old: Option<(u8, &[Val<'_>])>, new: &[Val<'_>]) -> Vec<u8> {
        let mut v = vec![b'U'];
        v.extend_from_slice(&relid.to_be_bytes());
        if let Some((marker, old)) = old {
            v.push(marker);
            tuple(&mut v, old);
        }
        v.push(b'N');
        tuple(&mut v, new);
        v
    }

    /// `D`: Delete with marker `K` or `O`.
    pub fn delete(relid: u32, marker: u8, old: &[Val<'_>]) -> Vec<u8> {
        let mut v = vec![b'D'];
        v.extend_from_slice(&relid.to_be_bytes());
        v.push(marker);
        tuple(&mut v, old);
        v
    }

    /// `T`: Truncate.
    pub fn truncate(relids: &[u32], options: u8) -> Vec<u8> {
        let mut v = vec![b'T'];
        v.extend_from_slice(&(relids.len() as u32).to_be_bytes());
        v.push(options);
        for r in relids {
            v.extend_from_slice(&r.to_be_bytes());
        }
        v
    }
}

#[cfg(test)]
mod tests {
    use super::build::*;
    use super::*;

    fn d(v: Vec<u8>) -> Result<Option<Message>, DecodeError> {
        decode(&Bytes::from(v))
    }

    #[test]
    fn decodes_every_message_kind() {
        assert_eq!(
            d(begin(0x10, 42, 7)).unwrap(),
            Some(Message::Begin(Begin { final_lsn: 0x10, commit_time: 42, xid: 7 }))
        );
        assert_eq!(
            d(commit(1, 2, 3)).unwrap(),
            Some(Message::Commit(Commit { flags: 0, commit_lsn: 1, end_lsn: 2, commit_time: 3 }))
        );
        let rel = d(relation(99, "public", "todos", b'd', &[("id", 20, true), ("task", 25, false)])).unwrap();
        let Some(Message::Relation(r)) = rel else { panic!("{rel:?}") };
        assert_eq!((r.relid, r.schema.as_str(), r.name.as_str(), r.replica_identity), (99, "public", "todos", b'd'));
        assert_eq!(r.columns[0], Column { key: true, name: "id".into(), type_oid: 20, typmod: -1 });
        assert!(!r.columns[1].key);
        let ins = d(insert(99, &[Val::Text("1"), Val::Null])).unwrap();
        assert_eq!(
            ins,
            Some(Message::Insert { relid: 99, new: Tuple(vec![Datum::Text(Bytes::from_static(b"1")), Datum::Null]) })
        );
        let up = d(update(99, Some((b'O', &[Val::Text("1"), Val::Text("a")])), &[Val::Text("1"), Val::Unchanged]))
            .unwrap()
            .unwrap();
        let Message::Update { old: Some(old), key_only: false, new, .. } = up else { panic!() };
        assert_eq!(old.0[1].text(), Some(&b"a"[..]));
        assert_eq!(new.0[1], Datum::Unchanged);
        let up = d(update(99, None, &[Val::Text("2")])).unwrap().unwrap();
        assert!(matches!(up, Message::Update { old: None, .. }));
        let del = d(delete(99, b'K', &[Val::Text("1"), Val::Null])).unwrap().unwrap();
        assert!(matches!(del, Message::Delete { key_only: true, .. }));
        assert_eq!(
            d(truncate(&[1, 2], 3)).unwrap(),
            Some(Message::Truncate { relids: vec![1, 2], cascade: true, restart_identity: true })
        );
        let mut ty = vec![b'Y'];
        ty.extend_from_slice(&5000u32.to_be_bytes());
        ty.extend_from_slice(b"public\0mood\0");
        assert_eq!(
            d(ty).unwrap(),
            Some(Message::Type(TypeMsg { oid: 5000, schema: "public".into(), name: "mood".into() }))
        );
    }

    #[test]
    fn unknown_and_empty_are_none() {
        assert_eq!(d(vec![]).unwrap(), None);
        assert_eq!(d(vec![b'S', 1, 2, 3]).unwrap(), None);
    }

    #[test]
    fn malformed_input_is_an_error_not_a_panic() {
        let good = [
            begin(1, 2, 3),
            commit(1, 2, 3),
            relation(1, "s", "t", b'f', &[("a", 23, true), ("b", 25, false)]),
            insert(1, &[Val::Text("12345"), Val::Null]),
            update(1, Some((b'K', &[Val::Text("1")])), &[Val::Text("1"), Val::Text("x")]),
            delete(1, b'O', &[Val::Text("1"), Val::Text("x")]),
            truncate(&[1, 2, 3], 0),
        ];
        for msg in good {
            assert!(d(msg.clone()).unwrap().is_some());
            // Every strict prefix fails cleanly; so does any extra byte.
            for cut in 1..msg.len() {
                assert!(d(msg[..cut].to_vec()).is_err(), "prefix {cut} of {msg:?}");
            }
            let mut longer = msg.clone();
            longer.push(0);
            assert!(d(longer).is_err());
        }
        // Huge counts do not allocate or panic.
        let mut t = vec![b'T'];
        t.extend_from_slice(&u32::MAX.to_be_bytes());
        t.push(0);
        assert!(d(t).is_err());
        let mut i = vec![b'I', 0, 0, 0, 1, b'N', 0xff, 0xff];
        assert_eq!(d(i.clone()).unwrap_err(), DecodeError::TooManyColumns(65535));
        i.truncate(6);
        i.extend_from_slice(&[0, 1, b't', 0xff, 0xff, 0xff, 0xff]);
        assert!(d(i).is_err());
        assert!(matches!(d(vec![b'I', 0, 0, 0, 1, b'X']), Err(DecodeError::Marker(b'X', _))));
        assert!(matches!(d(vec![b'R', 0, 0, 0, 1, 0xff, 0xfe, 0]), Err(DecodeError::Utf8(_))));
    }

    #[test]
    fn pseudo_random_bytes_never_panic() {
        let mut rng = fastrand::Rng::with_seed(7);
        for _ in 0..20_000 {
            let len = rng.usize(0..64);
            let mut v: Vec<u8> = (0..len).map(|_| rng.u8(..)).collect();
            if let Some(first) = v.first_mut() {
                *first = *rng.choice(b"BCORYIUDTM").unwrap();
            }
            let _ = d(v);
        }
    }
}
