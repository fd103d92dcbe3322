//! The Phoenix channel protocol, sans-IO: decoding client messages (the captured vsn 2.0.0
//! frames of `reference/realtime-protocol.md`), the session state machine on the hot client
//! messages, and the encode-once broadcast frame for each wire format.

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BatchSize, BenchmarkId, Criterion, Throughput};

use corecast::auth::{Claims, Verifier};
use corecast::channel::broadcast::{self, Message};
use corecast::channel::{Format, FormatSet};
use corecast::protocol::phoenix::message::{decode_binary, decode_text};
use corecast::protocol::phoenix::session::{Action, Now, Payload, SessionCtx};
use corecast::protocol::phoenix::{Session, Vsn};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Captured realtime-js join (vsn 2.0.0) with a `postgres_changes` binding.
const JOIN: &[u8] = br#"["6","6","realtime:room1","phx_join",{"config":{"broadcast":{"self":true,"ack":true},"presence":{"key":"u1","enabled":true},"postgres_changes":[{"event":"INSERT","schema":"public","table":"todos","filter":"id=eq.1"}],"private":false}}]"#;
/// Captured heartbeat.
const HEARTBEAT: &[u8] = br#"[null,"7","phoenix","heartbeat",{}]"#;
/// Text broadcast push as realtime-js writes it (payload `{"x":1}`).
const BROADCAST: &[u8] =
    br#"["6","7","realtime:room1","broadcast",{"type":"broadcast","event":"cursor","payload":{"x":1}}]"#;
/// Captured kind-3 user broadcast push: topic `realtime:room1`, event `cursor`, JSON `{"x":2}`.
const KIND3_HEX: &str = "0301010e06000136377265616c74696d653a726f6f6d31637572736f727b2278223a327d";

/// The load generator's 100-byte payload (`loadtest/README.md`: seq, send time, publisher, padding).
fn payload_100() -> Vec<u8> {
    let head = br#"{"s":123456,"t":1732363333123456789,"p":0,"x":""#;
    let mut p = head.to_vec();
    p.resize(100 - 2, b'x');
    p.extend_from_slice(b"\"}");
    assert_eq!(p.len(), 100);
    p
}

/// A broadcast push on `realtime:t0` carrying `payload`, as the load generator publishes it.
fn broadcast_with(payload: &[u8]) -> Vec<u8> {
    let mut v = br#"["1","2","realtime:t0","broadcast",{"type":"broadcast","event":"m","payload":"#.to_vec();
    v.extend_from_slice(payload);
    v.extend_from_slice(b"}]");
    v
}

fn hex(s: &str) -> Vec<u8> {
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex")).collect()
}

fn ctx() -> SessionCtx {
    SessionCtx {
        max_channels: 100,
        joins_per_sec: 1_000_000,
        presence_calls: 10,
        presence_window: Duration::from_secs(30),
        presence_max_bytes: 4096,
        // The server's default `--max-payload-bytes`.
        max_payload: 3_000_000,
        verifier: Arc::new(Verifier::new(None)),
        postgres: false,
    }
}

fn now() -> Now {
    Now { mono: Instant::now(), unix_secs: 1_732_363_333 }
}

fn decode(c: &mut Criterion) {
    let mut g = c.benchmark_group("phoenix_decode");
    let big = broadcast_with(&payload_100());
    for (name, frame) in
        [("join", JOIN), ("heartbeat", HEARTBEAT), ("broadcast", BROADCAST), ("broadcast_100B", big.as_slice())]
    {
        g.throughput(Throughput::Bytes(frame.len() as u64));
        g.bench_with_input(BenchmarkId::new("v2_text", name), frame, |b, f| {
            b.iter(|| decode_text(Vsn::V2, black_box(f)).expect("valid").topic.len())
        });
    }
    let kind3 = hex(KIND3_HEX);
    g.throughput(Throughput::Bytes(kind3.len() as u64));
    g.bench_with_input(BenchmarkId::new("binary", "kind3"), &kind3, |b, f| {
        b.iter(|| decode_binary(black_box(f)).expect("valid").payload.len())
    });
    g.finish();
}

fn session(c: &mut Criterion) {
    let mut g = c.benchmark_group("phoenix_session");
    let ctx = ctx();
    let mut out: Vec<Action> = Vec::with_capacity(8);

    g.bench_function("heartbeat", |b| {
        let mut s = Session::new(Vsn::V2, Claims::anonymous());
        let n = now();
        b.iter(|| {
            out.clear();
            s.handle_text(n, black_box(HEARTBEAT), &ctx, &mut out);
            assert!(matches!(out.as_slice(), [Action::Send(_)]));
        })
    });

    // A fresh session per iteration (setup not timed): the connect-storm path.
    g.bench_function("join", |b| {
        let n = now();
        b.iter_batched_ref(
            || Session::new(Vsn::V2, Claims::anonymous()),
            |s| {
                out.clear();
                s.handle_text(n, black_box(JOIN), &ctx, &mut out);
                assert!(matches!(out.last(), Some(Action::Subscribe(_))));
            },
            BatchSize::SmallInput,
        )
    });

    // Joined with `self: true, ack: true`: a Publish action and the ack reply frame.
    g.bench_function("broadcast_ack", |b| {
        let mut s = Session::new(Vsn::V2, Claims::anonymous());
        let n = now();
        s.handle_text(n, JOIN, &ctx, &mut out);
        b.iter(|| {
            out.clear();
            s.handle_text(n, black_box(BROADCAST), &ctx, &mut out);
            assert!(matches!(out.first(), Some(Action::Publish(_))));
        })
    });

    // The load generator's channel (`self: false, ack: false`) and 100-byte payload.
    let big = broadcast_with(&payload_100());
    g.bench_function("broadcast_100B_noack", |b| {
        let mut s = Session::new(Vsn::V2, Claims::anonymous());
        let n = now();
        s.handle_text(
            n,
            br#"["1","1","realtime:t0","phx_join",{"config":{"broadcast":{"self":false,"ack":false}}}]"#,
            &ctx,
            &mut out,
        );
        b.iter(|| {
            out.clear();
            s.handle_text(n, black_box(&big), &ctx, &mut out);
            assert!(matches!(out.first(), Some(Action::Publish(_))));
        })
    });

    let kind3 = hex(KIND3_HEX);
    g.bench_function("kind3_ack", |b| {
        let mut s = Session::new(Vsn::V2, Claims::anonymous());
        s.handle_text(now(), JOIN, &ctx, &mut out);
        b.iter(|| {
            out.clear();
            s.handle_binary(black_box(&kind3), &ctx, &mut out);
            assert!(matches!(out.first(), Some(Action::Publish(_))));
        })
    });
    g.finish();
}

fn encode(c: &mut Criterion) {
    let mut g = c.benchmark_group("broadcast_encode");
    let json = Payload::Json(Bytes::from(payload_100()));
    let id = "1b4e28ba-2fa1-41d2-883f-0016d3cca427";
    let msg = |payload, binary_frame| Message {
        wire_topic: "realtime:t0",
        event: "m",
        payload,
        binary_frame,
        id,
        epoch: "9f2c0a1be44d7a10",
        offset: 123_456,
        replayed: false,
        user_id: None,
    };
    let set = |fs: &[Format]| {
        let mut s = FormatSet::default();
        for &f in fs {
            s.insert(f);
        }
        s
    };
    let cases = [
        ("v1_text", msg(&json, false), set(&[Format::V1]), Format::V1),
        ("v2_text", msg(&json, false), set(&[Format::V2]), Format::V2),
        ("v2_kind4", msg(&json, true), set(&[Format::V2]), Format::V2),
        ("sse", msg(&json, false), set(&[Format::Sse]), Format::Sse),
        ("all_three", msg(&json, false), set(&Format::ALL), Format::V2),
    ];
    for (name, m, formats, check) in &cases {
        g.bench_function(BenchmarkId::new("payload_100B", name), |b| {
            b.iter(|| {
                let f = broadcast::encode(black_box(m), *formats);
                black_box(f.get(*check).map(Bytes::len))
            })
        });
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .sample_size(30);
    targets = decode, session, encode
}
criterion_main!(benches);
