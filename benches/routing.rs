//! Routing: building a [`Topic`] and picking its owner shard (stable hash), and the per-shard
//! subscriber [`Registry`] with 10,000 topics: lookups on every delivery, add/remove on every
//! join and leave.

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};

use corecast::channel::registry::{ConnId, LocalSub, Registry};
use corecast::channel::Format;
use corecast::protocol::phoenix::Topic;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const TOPICS: usize = 10_000;

fn sub(index: u32) -> LocalSub {
    LocalSub {
        conn: ConnId { index, generation: 1 },
        format: Format::V2,
        presence: false,
        join_ref: None,
        pg: false,
        tracked: false,
        awaiting_backlog: false,
        held: false,
    }
}

fn topics(c: &mut Criterion) {
    let mut g = c.benchmark_group("topic");
    for (label, name) in [
        ("short", "room-1234".to_string()),
        ("64B", "org-4f1c9a2e/project-77/document-3b8e1d0c9f7a4e2b/cursor-stream".to_string()),
    ] {
        g.bench_function(BenchmarkId::new("new_owner", label), |b| {
            b.iter(|| Topic::new(black_box(&name), false).expect("valid").owner(black_box(4)))
        });
    }
    let t = Topic::new("room-1234", false).expect("valid");
    g.bench_function("owner", |b| b.iter(|| black_box(&t).owner(black_box(4))));
    g.finish();
}

fn registry(c: &mut Criterion) {
    let names: Vec<Topic> = (0..TOPICS).map(|i| Topic::new(&format!("room-{i}"), false).expect("valid")).collect();
    let mut r = Registry::new();
    for (i, t) in names.iter().enumerate() {
        r.add(t, sub(i as u32));
    }
    // One big topic as well: the load generator's single topic with 5,000 local subscribers.
    let big = Topic::new("t0", false).expect("valid");
    for i in 0..5_000u32 {
        r.add(&big, sub(1_000_000 + i));
    }
    assert_eq!(r.topic_count(), TOPICS + 1);

    let mut g = c.benchmark_group("registry_10k_topics");
    let mut i = 0usize;
    g.bench_function("get", |b| {
        b.iter(|| {
            i = (i + 7919) % TOPICS;
            r.get(black_box(&names[i])).map(|t| t.subs.len())
        })
    });
    // A second subscriber joins and leaves an existing topic (no interest change).
    g.bench_function("add_remove_existing_topic", |b| {
        b.iter(|| {
            i = (i + 7919) % TOPICS;
            let t = &names[i];
            black_box(r.add(t, sub(2_000_000)));
            black_box(r.remove(t, ConnId { index: 2_000_000, generation: 1 }))
        })
    });
    // The first subscriber of a topic arrives and leaves (entry created and removed; both
    // report an interest change for the owner).
    let fresh: Vec<Topic> = (0..1024).map(|i| Topic::new(&format!("fresh-{i}"), false).expect("valid")).collect();
    g.bench_function("add_remove_new_topic", |b| {
        b.iter(|| {
            i = (i + 1) % fresh.len();
            let t = &fresh[i];
            black_box(r.add(t, sub(3_000_000)));
            black_box(r.remove(t, ConnId { index: 3_000_000, generation: 1 }))
        })
    });
    // Join and leave on the topic with 5,000 local subscribers: `add` and `remove` both scan
    // the topic's subscriber list for the connection.
    g.bench_function("add_remove_5000_sub_topic", |b| {
        b.iter(|| {
            black_box(r.add(&big, sub(4_000_000)));
            black_box(r.remove(&big, ConnId { index: 4_000_000, generation: 1 }))
        })
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .sample_size(30);
    targets = topics, registry
}
criterion_main!(benches);
