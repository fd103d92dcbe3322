//! Postgres changes ingest, the CPU part: decode `pgoutput` bytes, assemble transactions, match
//! subscriptions, encode each change once per (topic, ids, wire format) and group the frames
//! per shard. Throughput is in changes per second (target: ≥ 50,000 with one subscriber).
//!
//! Cases: one subscriber; 1,000 subscribers on one topic (one frame for all); 1,000 on
//! distinct topics (1,000 frames per change); 1,000 each with an `eq` filter that one matches.
//! No I/O: row-level security round trips are measured end to end by `loadtest pg`.

use std::hint::black_box;
use std::time::Duration;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

use corecast::channel::registry::ConnId;
use corecast::channel::Format;
use corecast::ingest::filter;
use corecast::ingest::pgoutput::{build, decode};
use corecast::ingest::plan::{self, Item, Routed, ALL};
use corecast::ingest::subscriptions::{event_mask, AuthCtx, Binding, Key, Pat, Registry};
use corecast::ingest::txn::{Assembler, Step, Txn};
use corecast::ingest::types::Types;
use corecast::protocol::phoenix::Topic;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Changes per transaction (the unit of one benchmark iteration).
const CHANGES: usize = 100;

/// A transaction of `CHANGES` inserts into `public.messages(id int8, room text, author uuid,
/// body text, created_at timestamptz, done bool)`, as `XLogData` payloads.
fn wal() -> Vec<Bytes> {
    let mut out = vec![
        Bytes::from(build::begin(0x1000, 800_000_000_000_000, 42)),
        Bytes::from(build::relation(
            16_384,
            "public",
            "messages",
            b'd',
            &[
                ("id", 20, true),
                ("room", 25, false),
                ("author", 2950, false),
                ("body", 25, false),
                ("created_at", 1184, false),
                ("done", 16, false),
            ],
        )),
    ];
    let body = "The quick brown fox jumps over the lazy dog; a typical chat message of about 100 bytes.";
    for i in 0..CHANGES {
        let id = (1_000_000 + i).to_string();
        let room = format!("room-{}", i % 1000);
        out.push(Bytes::from(build::insert(
            16_384,
            &[
                build::Val::Text(&id),
                build::Val::Text(&room),
                build::Val::Text("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"),
                build::Val::Text(body),
                build::Val::Text("2026-11-23 12:00:00.123456+00"),
                build::Val::Text("f"),
            ],
        )));
    }
    out.push(Bytes::from(build::commit(0x1000, 0x2000, 800_000_000_000_000)));
    out
}

fn assemble(msgs: &[Bytes]) -> Txn {
    let mut a = Assembler::new();
    let mut txn = None;
    for m in msgs {
        if let Step::Commit(t) = a.push(decode(m).expect("valid").expect("known")) {
            txn = Some(t);
        }
    }
    txn.expect("committed")
}

/// `n` subscribers on `shards` shards; `topics` distinct topics; optional per-subscriber filter.
fn registry(n: usize, topics: usize, filtered: bool) -> Registry {
    let mut r = Registry::new();
    for i in 0..n {
        let topic = Topic::new(&format!("t{}", i % topics), false).expect("valid");
        let key = Key { shard: i % 2, conn: ConnId { index: i as u32, generation: 1 }, topic };
        let flt = if filtered { format!("room=eq.room-{i}") } else { String::new() };
        let binding = Binding {
            id: 7,
            events: event_mask("INSERT"),
            schema: Pat::new("public"),
            table: Pat::new("messages"),
            filter: filter::parse(&flt).expect("valid"),
        };
        let wire = key.topic.wire_name();
        r.insert(
            key,
            wire.into(),
            None,
            Format::V2,
            AuthCtx { role: "anon".into(), claims: "{}".into() },
            vec![binding],
        );
    }
    r
}

/// The whole CPU path for one transaction; returns bytes queued (to keep it observable).
fn pipeline(msgs: &[Bytes], reg: &mut Registry, types: &Types) -> usize {
    let txn = assemble(msgs);
    let items: Vec<Item<'_>> = txn.changes.iter().map(|c| Item { change: c, commit_time: txn.commit_time }).collect();
    let mut planned = Vec::new();
    plan::match_changes(reg, types, &items, &mut planned);
    let mut out = Routed::new(2);
    plan::route(&items, types, &planned, |_| Some(ALL), &[], &mut out);
    out.per_shard.iter().flatten().map(|(f, conns)| f.len() * conns.len()).sum()
}

fn ingest(c: &mut Criterion) {
    let msgs = wal();
    let types = Types::new();
    let mut g = c.benchmark_group("ingest");
    g.throughput(Throughput::Elements(CHANGES as u64));
    g.measurement_time(Duration::from_secs(4));
    g.bench_function("decode_only", |b| {
        b.iter(|| {
            for m in &msgs {
                black_box(decode(black_box(m)).expect("valid"));
            }
        })
    });
    for (label, n, topics, filtered) in [
        ("1_subscriber", 1, 1, false),
        ("1000_subscribers_one_topic", 1000, 1, false),
        ("1000_subscribers_1000_topics", 1000, 1000, false),
        ("1000_filtered_subscribers", 1000, 1000, true),
    ] {
        let mut reg = registry(n, topics, filtered);
        g.bench_function(BenchmarkId::new("decode_match_encode", label), |b| {
            b.iter(|| black_box(pipeline(black_box(&msgs), &mut reg, &types)))
        });
    }
    g.finish();
}

criterion_group!(benches, ingest);
criterion_main!(benches);
