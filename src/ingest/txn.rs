//! Assembles decoded `pgoutput` messages into committed transactions: relations are tracked
//! by id (each change holds its table's shape), changes are buffered from Begin to Commit, and
//! a transaction is released only when its Commit arrives. Pure.

use std::collections::HashMap;
use std::sync::Arc;

use super::encode::ChangeType;
use super::pgoutput::{Column, Message, Relation, Tuple};

/// A table's shape as the stream last described it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rel {
    pub relid: u32,
    pub schema: String,
    pub name: String,
    pub replica_identity: u8,
    pub columns: Vec<Column>,
    /// Column index by name.
    pub index: HashMap<String, usize>,
    /// Increases with every Relation message seen for any table (cache invalidation).
    pub version: u64,
}

impl Rel {
    /// A relation from its `pgoutput` message.
    pub fn new(r: Relation, version: u64) -> Self {
        let index = r.columns.iter().enumerate().map(|(i, c)| (c.name.clone(), i)).collect();
        Self {
            relid: r.relid,
            schema: r.schema,
            name: r.name,
            replica_identity: r.replica_identity,
            columns: r.columns,
            index,
            version,
        }
    }
}

/// One row change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub rel: Arc<Rel>,
    pub op: ChangeType,
    pub new: Option<Tuple>,
    pub old: Option<Tuple>,
    /// `old` holds only the replica identity key columns.
    pub old_key_only: bool,
}

/// A committed transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Txn {
    /// Acknowledge this LSN once the transaction is handed off.
    pub end_lsn: u64,
    /// Commit time, microseconds since 2000-01-01 UTC.
    pub commit_time: i64,
    pub xid: u32,
    pub changes: Vec<Change>,
}

/// What the assembler did with a message.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    /// Buffered or ignored.
    None,
    /// A transaction committed.
    Commit(Txn),
    /// A change referenced a relation never described (the stream is inconsistent; the
    /// transaction is dropped and the caller should reconnect).
    UnknownRelation(u32),
}

/// The assembler state.
#[derive(Debug, Default)]
pub struct Assembler {
    rels: HashMap<u32, Arc<Rel>>,
    open: Option<Txn>,
    version: u64,
    broken: bool,
}

impl Assembler {
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether a transaction is between Begin and Commit.
    pub fn in_transaction(&self) -> bool {
        self.open.is_some()
    }

    /// Forgets a half-received transaction (the connection dropped).
    pub fn reset(&mut self) {
        self.open = None;
        self.broken = false;
    }

    /// The relation with `relid`, if described.
    pub fn relation(&self, relid: u32) -> Option<&Arc<Rel>> {
        self.rels.get(&relid)
    }

    /// Feeds one message.
    pub fn push(&mut self, msg: Message) -> Step {
        match msg {
            Message::Begin(b) => {
                self.broken = false;
                self.open =
                    Some(Txn { end_lsn: b.final_lsn, commit_time: b.commit_time, xid: b.xid, changes: Vec::new() });
            }
            Message::Commit(c) => {
                let Some(mut t) = self.open.take() else { return Step::None };
                if std::mem::take(&mut self.broken) {
                    return Step::None;
                }
                t.end_lsn = c.end_lsn;
                t.commit_time = c.commit_time;
                return Step::Commit(t);
            }
            Message::Relation(r) => {
                self.version += 1;
                self.rels.insert(r.relid, Arc::new(Rel::new(r, self.version)));
            }
            Message::Insert { relid, new } => {
                return self.change(relid, ChangeType::Insert, Some(new), None, false);
            }
            Message::Update { relid, old, key_only, new } => {
                return self.change(relid, ChangeType::Update, Some(new), old, key_only);
            }
            Message::Delete { relid, old, key_only } => {
                return self.change(relid, ChangeType::Delete, None, Some(old), key_only);
            }
            // TRUNCATE is not a postgres_changes event (Supabase does not send it either).
            Message::Truncate { .. } | Message::Origin { .. } | Message::Type(_) | Message::LogicalMessage { .. } => {}
        }
        Step::None
    }

    fn change(&mut self, relid: u32, op: ChangeType, new: Option<Tuple>, old: Option<Tuple>, key_only: bool) -> Step {
        let Some(rel) = self.rels.get(&relid) else {
            self.broken = true;
            return Step::UnknownRelation(relid);
        };
        if let Some(t) = &mut self.open {
            t.changes.push(Change { rel: rel.clone(), op, new, old, old_key_only: key_only });
        }
        Step::None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ingest::pgoutput::{build, decode};
    use bytes::Bytes;

    fn m(v: Vec<u8>) -> Message {
        decode(&Bytes::from(v)).unwrap().unwrap()
    }

    #[test]
    fn releases_on_commit_only() {
        let mut a = Assembler::new();
        assert_eq!(a.push(m(build::begin(100, 5, 9))), Step::None);
        assert!(a.in_transaction());
        a.push(m(build::relation(1, "public", "t", b'd', &[("id", 23, true)])));
        a.push(m(build::insert(1, &[build::Val::Text("1")])));
        a.push(m(build::delete(1, b'K', &[build::Val::Text("1")])));
        let Step::Commit(t) = a.push(m(build::commit(100, 120, 6))) else { panic!() };
        assert_eq!((t.end_lsn, t.commit_time, t.xid, t.changes.len()), (120, 6, 9, 2));
        assert_eq!(t.changes[0].op, ChangeType::Insert);
        assert_eq!(t.changes[1].op, ChangeType::Delete);
        assert!(t.changes[1].old_key_only);
        assert_eq!(t.changes[0].rel.index["id"], 0);
        assert!(!a.in_transaction());
    }

    #[test]
    fn unknown_relation_drops_the_transaction() {
        let mut a = Assembler::new();
        a.push(m(build::begin(1, 1, 1)));
        assert_eq!(a.push(m(build::insert(7, &[build::Val::Null]))), Step::UnknownRelation(7));
        assert_eq!(a.push(m(build::commit(1, 2, 1))), Step::None);
        // A reset forgets a half transaction.
        a.push(m(build::begin(3, 1, 1)));
        a.reset();
        assert_eq!(a.push(m(build::commit(3, 4, 1))), Step::None);
    }
}
