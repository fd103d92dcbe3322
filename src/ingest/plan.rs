//! From committed changes to per-shard frames, without I/O: [`match_changes`] finds every
//! subscribed channel a change reaches (event, table, filter), and [`route`] (or
//! [`route_selected`], a part of them at a time) encodes each change once per distinct column
//! set and once per distinct (topic, ids, wire format), and lists every connection that gets
//! each frame, grouped by shard.
//!
//! Row-level security and column privileges are decided between the two by the caller (see
//! `rls`), as a [`Decision`] per planned delivery.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;

use super::encode::{self, ChangeType, Col, Data};
use super::filter::Cell;
use super::pgoutput::Datum;
use super::subscriptions::{AuthId, Registry, EV_DELETE, EV_INSERT, EV_UPDATE};
use super::txn::Change;
use super::types::{Kind, Types};
use crate::channel::registry::ConnId;
use crate::channel::Format;

/// A change with its transaction's commit time.
#[derive(Debug, Clone, Copy)]
pub struct Item<'a> {
    pub change: &'a Change,
    /// Microseconds since 2000-01-01 UTC.
    pub commit_time: i64,
}

/// Where a change goes: one subscribed channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub shard: usize,
    pub conn: ConnId,
    pub wire: Arc<str>,
    pub format: Format,
    pub auth: AuthId,
    pub ids: Vec<u32>,
    /// The channel's claims are the connect apikey's (its join carried no `access_token`).
    pub apikey: bool,
}

/// A change (index into the items) matched to a channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Planned {
    pub item: u32,
    pub target: Target,
}

/// How a planned delivery goes out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Decision {
    /// Visible columns: 0 for all, else `masks[mask - 1]`.
    pub mask: u32,
    /// `old_record` limited to these columns: 0 for no limit, else `masks[old_only - 1]`.
    pub old_only: u32,
    /// An error reported in `errors` instead of the row.
    pub error: Option<&'static str>,
}

/// Deliver with every column.
pub const ALL: Decision = Decision { mask: 0, old_only: 0, error: None };

/// What a filter sees of column `name` of a change: the new row for INSERT and UPDATE, the old
/// row for DELETE.
pub fn cell<'a>(change: &'a Change, types: &'a Types, name: &str) -> Cell<'a> {
    let Some(&i) = change.rel.index.get(name) else {
        return Cell::Missing;
    };
    let col = &change.rel.columns[i];
    let row = match change.op {
        ChangeType::Insert | ChangeType::Update => change.new.as_ref(),
        ChangeType::Delete => {
            if change.old_key_only && !col.key {
                return Cell::Missing;
            }
            change.old.as_ref()
        }
    };
    let mut datum = row.and_then(|r| r.0.get(i));
    if matches!(datum, Some(Datum::Unchanged)) {
        datum = change.old.as_ref().filter(|_| !change.old_key_only).and_then(|o| o.0.get(i));
    }
    match datum {
        None => Cell::Missing,
        Some(Datum::Null) => Cell::Null,
        Some(Datum::Unchanged) | Some(Datum::Binary(_)) => Cell::Unknown,
        Some(Datum::Text(t)) => Cell::Value(types.kind(col.type_oid), t),
    }
}

/// Appends a [`Planned`] for every channel each item reaches, in item order.
pub fn match_changes(reg: &mut Registry, types: &Types, items: &[Item<'_>], out: &mut Vec<Planned>) {
    let mut hits = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let c = item.change;
        if !reg.watches(&c.rel.schema, &c.rel.name) {
            continue;
        }
        let ev = match c.op {
            ChangeType::Insert => EV_INSERT,
            ChangeType::Update => EV_UPDATE,
            ChangeType::Delete => EV_DELETE,
        };
        hits.clear();
        reg.matches(&c.rel.schema, &c.rel.name, ev, |name| cell(c, types, name), &mut hits);
        for h in hits.drain(..) {
            let ch = reg.channel(h.chan);
            out.push(Planned {
                item: i as u32,
                target: Target {
                    shard: ch.key.shard,
                    conn: ch.key.conn,
                    wire: ch.wire.clone(),
                    format: ch.format,
                    auth: ch.auth,
                    ids: h.ids,
                    apikey: ch.apikey,
                },
            });
        }
    }
}

/// Frames per shard: each frame with the connections of that shard it goes to, in order.
#[derive(Debug, Default)]
pub struct Routed {
    pub per_shard: Vec<Vec<(Bytes, Vec<ConnId>)>>,
    /// Distinct frames encoded.
    pub frames: usize,
    /// Connections reached (one per delivered planned entry).
    pub deliveries: usize,
}

impl Routed {
    /// An empty result for `shards` shards.
    pub fn new(shards: usize) -> Self {
        Self { per_shard: (0..shards).map(|_| Vec::new()).collect(), frames: 0, deliveries: 0 }
    }

    /// Whether nothing is to be sent.
    pub fn is_empty(&self) -> bool {
        self.per_shard.iter().all(Vec::is_empty)
    }
}

/// The payload's column descriptors for a change's table.
pub fn columns<'a>(change: &'a Change, types: &'a Types) -> Vec<Col<'a>> {
    static TEXT: Kind = Kind::Text;
    change
        .rel
        .columns
        .iter()
        .map(|c| match types.get(c.type_oid) {
            Some(t) => Col { name: &c.name, typname: &t.name, kind: &t.kind, key: c.key },
            None => Col { name: &c.name, typname: "unknown", kind: &TEXT, key: c.key },
        })
        .collect()
}

/// A frame's key: (data index, topic, format, ids).
type FrameKey<'p> = (usize, &'p str, Format, &'p [u32]);

/// The encodings of one batch, shared by its [`route`] calls (one per auth context when each
/// context is delivered as its RLS check answers): each change's data once per distinct
/// decision, each frame once per distinct (data, topic, format, ids).
#[derive(Debug, Default)]
pub struct Encoder<'p> {
    /// The column masks decisions refer to.
    masks: &'p [Vec<bool>],
    /// Index into `data` by (item, decision).
    data_of: HashMap<(u32, Decision), usize, ahash::RandomState>,
    data: Vec<Vec<u8>>,
    /// Frame and its id by (data index, topic, format, ids).
    frames: HashMap<FrameKey<'p>, (Bytes, usize), ahash::RandomState>,
}

impl<'p> Encoder<'p> {
    /// An encoder for decisions whose masks index `masks`.
    pub fn new(masks: &'p [Vec<bool>]) -> Self {
        Self { masks, ..Self::default() }
    }
}

/// Encodes and groups the planned deliveries `sel` (indices into `planned`, in item order)
/// that `decide` lets through (`None`: skip). `planned` must be in item order, as
/// [`match_changes`] makes it.
pub fn route_selected<'p>(
    items: &[Item<'_>],
    types: &Types,
    planned: &'p [Planned],
    sel: &[u32],
    mut decide: impl FnMut(usize) -> Option<Decision>,
    enc: &mut Encoder<'p>,
    out: &mut Routed,
) {
    let shards = out.per_shard.len();
    // Per frame id of the current item: its item index on each shard (`usize::MAX`: none yet).
    let mut slots: HashMap<usize, Vec<usize>, ahash::RandomState> = HashMap::default();
    let mut current = u32::MAX;
    for &pi in sel {
        let pi = pi as usize;
        let p = &planned[pi];
        if p.item != current {
            current = p.item;
            slots.clear();
        }
        let Some(d) = decide(pi) else { continue };
        let item = items[p.item as usize];
        let next = enc.data.len();
        let di = *enc.data_of.entry((p.item, d)).or_insert(next);
        if di == next {
            let masks = enc.masks;
            let mask = |m: u32| (m > 0).then(|| masks[m as usize - 1].as_slice());
            let c = item.change;
            let cols = columns(c, types);
            let mut buf = Vec::with_capacity(256);
            encode::write_data(
                &mut buf,
                &Data {
                    schema: &c.rel.schema,
                    table: &c.rel.name,
                    commit_time: item.commit_time,
                    change: c.op,
                    columns: &cols,
                    new: c.new.as_ref(),
                    old: c.old.as_ref(),
                    old_key_only: c.old_key_only,
                    visible: mask(d.mask),
                    old_only: mask(d.old_only),
                    error: d.error,
                },
            );
            enc.data.push(buf);
        }
        let t = &p.target;
        let next_id = enc.frames.len();
        let data = &enc.data;
        let (frame, id) = enc.frames.entry((di, &*t.wire, t.format, t.ids.as_slice())).or_insert_with(|| {
            out.frames += 1;
            (encode::frame(t.format, &t.wire, &t.ids, &data[di]), next_id)
        });
        let shard_slots = slots.entry(*id).or_insert_with(|| vec![usize::MAX; shards]);
        let shard_items = &mut out.per_shard[t.shard];
        if shard_slots[t.shard] == usize::MAX {
            shard_slots[t.shard] = shard_items.len();
            shard_items.push((frame.clone(), Vec::new()));
        }
        shard_items[shard_slots[t.shard]].1.push(t.conn);
        out.deliveries += 1;
    }
}

/// [`route_selected`] for every planned delivery at once, with its own [`Encoder`].
pub fn route(
    items: &[Item<'_>],
    types: &Types,
    planned: &[Planned],
    decide: impl FnMut(usize) -> Option<Decision>,
    masks: &[Vec<bool>],
    out: &mut Routed,
) {
    let all: Vec<u32> = (0..planned.len() as u32).collect();
    route_selected(items, types, planned, &all, decide, &mut Encoder::new(masks), out);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ingest::filter;
    use crate::ingest::pgoutput::{build, decode, Message};
    use crate::ingest::subscriptions::{event_mask, AuthCtx, Binding, Key, Pat};
    use crate::ingest::txn::{Assembler, Step, Txn};
    use crate::protocol::phoenix::Topic;
    use crate::protocol::ws::frame::parse_header;

    fn txn() -> Txn {
        let mut a = Assembler::new();
        let msgs = [
            build::begin(1, 0, 1),
            build::relation(1, "public", "todos", b'd', &[("id", 23, true), ("task", 25, false)]),
            build::insert(1, &[build::Val::Text("1"), build::Val::Text("x")]),
            build::insert(1, &[build::Val::Text("2"), build::Val::Text("y")]),
            build::commit(1, 2, 0),
        ];
        let mut out = None;
        for m in msgs {
            let m: Message = decode(&Bytes::from(m)).unwrap().unwrap();
            if let Step::Commit(t) = a.push(m) {
                out = Some(t);
            }
        }
        out.unwrap()
    }

    fn sub(reg: &mut Registry, shard: usize, conn: u32, topic: &str, format: Format, flt: &str) {
        let key = Key { shard, conn: ConnId { index: conn, generation: 1 }, topic: Topic::new(topic, false).unwrap() };
        let b = Binding {
            id: 7,
            events: event_mask("INSERT"),
            schema: Pat::new("public"),
            table: Pat::new("todos"),
            filter: filter::parse(flt).unwrap(),
        };
        reg.insert(
            key,
            format!("realtime:{topic}").into(),
            None,
            format,
            AuthCtx { role: "anon".into(), claims: "{}".into() },
            vec![b],
        );
    }

    fn body(f: &Bytes) -> serde_json::Value {
        let (_, n) = parse_header(f).unwrap().unwrap();
        serde_json::from_slice(&f[n..]).unwrap()
    }

    #[test]
    fn encodes_once_per_topic_and_format() {
        let t = txn();
        let items: Vec<Item<'_>> = t.changes.iter().map(|c| Item { change: c, commit_time: t.commit_time }).collect();
        let types = Types::new();
        let mut reg = Registry::new();
        sub(&mut reg, 0, 1, "room", Format::V2, "");
        sub(&mut reg, 0, 2, "room", Format::V2, "");
        sub(&mut reg, 1, 3, "room", Format::V2, "");
        sub(&mut reg, 1, 4, "room", Format::V1, "");
        sub(&mut reg, 1, 5, "other", Format::V2, "id=eq.2");
        let mut planned = Vec::new();
        match_changes(&mut reg, &types, &items, &mut planned);
        assert_eq!(planned.len(), 4 + 5);
        let mut out = Routed::new(2);
        route(&items, &types, &planned, |_| Some(ALL), &[], &mut out);
        assert_eq!(out.deliveries, 9);
        // Change 1: room/v2, room/v1. Change 2: room/v2, room/v1, other/v2.
        assert_eq!(out.frames, 5);
        let s0 = &out.per_shard[0];
        assert_eq!(s0.len(), 2);
        assert_eq!(s0[0].1.len(), 2);
        let v = body(&s0[0].0);
        assert_eq!(v[4]["ids"], serde_json::json!([7]));
        assert_eq!(v[4]["data"]["record"], serde_json::json!({"id": 1, "task": "x"}));
        // The same bytes are shared by both shards for room/v2.
        let s1 = &out.per_shard[1];
        assert_eq!(s1.len(), 5);
        assert_eq!(s0[0].0.as_ptr(), s1[0].0.as_ptr());
        assert_eq!(body(&s1[1].0)["payload"]["ids"], serde_json::json!([7]));
        assert_eq!(body(&s1[4].0)[2], "realtime:other");
    }

    #[test]
    fn routes_by_selection_sharing_encodings() {
        let t = txn();
        let items: Vec<Item<'_>> = t.changes.iter().map(|c| Item { change: c, commit_time: t.commit_time }).collect();
        let types = Types::new();
        let mut reg = Registry::new();
        sub(&mut reg, 0, 1, "room", Format::V2, "");
        sub(&mut reg, 0, 2, "room", Format::V2, "");
        sub(&mut reg, 1, 3, "room", Format::V2, "");
        let mut planned = Vec::new();
        match_changes(&mut reg, &types, &items, &mut planned);
        assert_eq!(planned.len(), 6);
        // As the engine routes one auth context at a time: conn 1 first, then the others.
        let (first, rest): (Vec<u32>, Vec<u32>) = (0..6u32).partition(|&i| planned[i as usize].target.conn.index == 1);
        let mut enc = Encoder::default();
        let mut a = Routed::new(2);
        route_selected(&items, &types, &planned, &first, |_| Some(ALL), &mut enc, &mut a);
        let mut b = Routed::new(2);
        route_selected(&items, &types, &planned, &rest, |_| Some(ALL), &mut enc, &mut b);
        assert_eq!((a.deliveries, b.deliveries), (2, 4));
        // Each change is encoded once for room/v2, whichever call needed it first.
        assert_eq!(a.frames + b.frames, 2);
        let conns = |r: &Routed, shard: usize| r.per_shard[shard].iter().map(|(_, c)| c.len()).collect::<Vec<_>>();
        assert_eq!((conns(&a, 0), conns(&b, 0), conns(&b, 1)), (vec![1, 1], vec![1, 1], vec![1, 1]));
        assert_eq!(a.per_shard[0][0].0.as_ptr(), b.per_shard[0][0].0.as_ptr());
        assert_eq!(a.per_shard[0][1].0.as_ptr(), b.per_shard[1][1].0.as_ptr());
        // In change order within each call.
        assert_eq!(body(&a.per_shard[0][0].0)[4]["data"]["record"]["id"], 1);
        assert_eq!(body(&a.per_shard[0][1].0)[4]["data"]["record"]["id"], 2);
    }

    #[test]
    fn decisions_mask_and_skip() {
        let t = txn();
        let items: Vec<Item<'_>> = t.changes.iter().map(|c| Item { change: c, commit_time: t.commit_time }).collect();
        let types = Types::new();
        let mut reg = Registry::new();
        sub(&mut reg, 0, 1, "room", Format::V2, "");
        let mut planned = Vec::new();
        match_changes(&mut reg, &types, &items, &mut planned);
        let masks = vec![vec![true, false]];
        let mut out = Routed::new(1);
        route(
            &items,
            &types,
            &planned,
            |i| (i == 0).then_some(Decision { mask: 1, old_only: 0, error: None }),
            &masks,
            &mut out,
        );
        assert_eq!(out.deliveries, 1);
        let v = body(&out.per_shard[0][0].0);
        assert_eq!(v[4]["data"]["record"], serde_json::json!({"id": 1}));
        assert_eq!(v[4]["data"]["columns"], serde_json::json!([{"name": "id", "type": "int4"}]));
    }
}
