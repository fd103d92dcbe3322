//! WebSocket frame codec, sans-IO: parsing and unmasking client frames with
//! [`WsConn::handle_input`], and encoding server frames with [`frame::frame`] and
//! [`FrameBuilder`].
//!
//! Inputs hold several whole masked frames, as one `recv` returns them under load. Throughput is
//! in input bytes. `handle_input` unmasks in place, so every iteration gets a fresh masked copy
//! (made outside the timed region by `iter_batched_ref`).

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BatchSize, BenchmarkId, Criterion, Throughput};

use corecast::protocol::ws::conn::WsLimits;
use corecast::protocol::ws::frame::{self, FrameBuilder, OpCode};
use corecast::protocol::ws::{WsConn, WsEvent};

// The server binary runs on mimalloc; allocation-sensitive numbers should too.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Payload sizes measured: a tiny push, a typical JSON message, a large one, and a 16 KiB blob.
const SIZES: [usize; 4] = [16, 128, 1024, 16 * 1024];

/// Frame and message limits of 1 MiB (the server defaults, `--max-frame-bytes` and
/// `--max-message-bytes`, are 4 MiB; the limit does not change the cost of these frames).
const LIMITS: WsLimits = WsLimits { max_frame: 1 << 20, max_message: 1 << 20 };

/// A masked client frame (FIN set) with `payload`.
fn masked(opcode: u8, payload: &[u8], mask: [u8; 4]) -> Vec<u8> {
    frame::client_frame(true, opcode, payload, mask)
}

/// ASCII JSON-ish text of exactly `n` bytes (valid UTF-8, so text frames pass validation).
fn text_payload(n: usize) -> Vec<u8> {
    b"{\"type\":\"broadcast\",\"event\":\"m\",\"payload\":{\"x\":\"".iter().copied().cycle().take(n).collect()
}

/// Frames per input: enough that per-call overhead is amortized, few enough to stay in cache.
fn frames_per_input(size: usize) -> usize {
    (64 * 1024 / size).clamp(4, 64)
}

/// One input of several masked frames of `size` bytes each, with varying masks.
fn input(opcode: u8, size: usize) -> Vec<u8> {
    let payload = text_payload(size);
    let mut v = Vec::new();
    for i in 0..frames_per_input(size) {
        let mask = [0x37 ^ i as u8, 0xfa, 0x21 ^ (i >> 8) as u8, 0x3d];
        v.extend(masked(opcode, &payload, mask));
    }
    v
}

fn parse_unmask(c: &mut Criterion) {
    let mut g = c.benchmark_group("ws_parse_unmask");
    for (name, opcode) in [("text", 1u8), ("binary", 2u8)] {
        for size in SIZES {
            let pristine = input(opcode, size);
            let frames = frames_per_input(size);
            g.throughput(Throughput::Bytes(pristine.len() as u64));
            let id = BenchmarkId::new(name, format!("{size}B x{frames}"));
            g.bench_with_input(id, &pristine, |b, pristine| {
                let mut ws = WsConn::new();
                b.iter_batched_ref(
                    || pristine.clone(),
                    |buf| {
                        let mut n = 0usize;
                        ws.handle_input(buf, LIMITS, |e| {
                            if let WsEvent::Text(d) | WsEvent::Binary(d) = e {
                                n += d.len();
                            }
                        })
                        .expect("valid frames");
                        assert_eq!(n, size * frames);
                        black_box(n)
                    },
                    BatchSize::SmallInput,
                );
            });
        }
    }
    g.finish();
}

fn encode(c: &mut Criterion) {
    let mut g = c.benchmark_group("ws_encode");
    for size in SIZES {
        let payload = text_payload(size);
        g.throughput(Throughput::Bytes(size as u64));
        g.bench_with_input(BenchmarkId::new("frame", size), &payload, |b, p| {
            b.iter(|| frame::frame(OpCode::Text, black_box(p)))
        });
        // The encoders' own pattern: reserve the header, write the payload in place, finish.
        g.bench_with_input(BenchmarkId::new("builder", size), &payload, |b, p| {
            b.iter(|| {
                let mut fb = FrameBuilder::new(p.len());
                fb.buf.extend_from_slice(black_box(p));
                fb.finish(OpCode::Text)
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
    targets = parse_unmask, encode
}
criterion_main!(benches);
