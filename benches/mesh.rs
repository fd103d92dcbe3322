//! Cross-shard hand-off: two glommio executors pinned to CPU 0 and CPU 1 exchanging batches
//! (`Vec<ShardMsg>`, the mesh's `Batch`) over a `shared_channel` of the mesh's capacity (1024).
//! Each message is a real [`ShardMsg::Deliver`]: a topic and the shared, encoded frames.
//!
//! A plain `fn main()` (harness = false), like glommio's own benches: criterion's timing loop
//! cannot drive two executors. Prints, for batch sizes 1 and 64:
//! - throughput: the sender sends batches for 2 s as fast as the channel takes them; messages/s
//!   as the receiver saw them;
//! - round trip: a batch goes to the peer and back, after 200 µs of quiet each time (so the
//!   peer has gone idle, as on a quiet shard); p50/p99, with glommio's default (park at once,
//!   woken by eventfd, which is how corecast runs) and with `spin_before_park(1 ms)`.
//!
//! `cargo bench --bench mesh [-- FILTER]`: FILTER matches `throughput` or `rtt`.
//!
//! The executors use glommio's default preempt timer (100 ms), not the shards' 5 ms: with
//! 5 ms, glommio 0.9.0 sometimes parks an executor that still has a runnable task (its
//! `run_task_queues` returns "nothing ran" when the preempt timer has already fired), and
//! this ping-pong, which has no other timer or I/O to wake it, then hangs for good (seen in
//! 4 of 14 runs on the busy 2-vCPU VM, 0 of 14 with 100 ms; see `benches/README.md`).
//! `MESH_PREEMPT_MS=5` reproduces it; a watchdog ends the process with exit code 2 instead
//! of hanging `cargo bench`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use glommio::channels::shared_channel;
use glommio::{LocalExecutorBuilder, Placement};

use corecast::bus::ShardMsg;
use corecast::channel::broadcast::{self, Frames, Message};
use corecast::channel::{Format, FormatSet};
use corecast::protocol::phoenix::session::Payload;
use corecast::protocol::phoenix::Topic;
use corecast::shard::mesh::{Batch, CHANNEL_CAPACITY};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const THROUGHPUT_SECS: f64 = 2.0;
const RTT_SAMPLES: usize = 2_000;
/// Samples dropped at the start (glommio 0.9's first timer sleep can take tens of ms).
const RTT_WARMUP: usize = 50;

fn frames() -> Arc<Frames> {
    let mut p = br#"{"s":123456,"t":1732363333123456789,"p":0,"x":""#.to_vec();
    p.resize(98, b'x');
    p.extend_from_slice(b"\"}");
    let payload = Payload::Json(Bytes::from(p));
    let mut formats = FormatSet::default();
    formats.insert(Format::V2);
    let m = Message {
        wire_topic: "realtime:t0",
        event: "m",
        payload: &payload,
        binary_frame: false,
        id: "1b4e28ba-2fa1-41d2-883f-0016d3cca427",
        epoch: "9f2c0a1be44d7a10",
        offset: 1,
        replayed: false,
        user_id: None,
    };
    Arc::new(broadcast::encode(&m, formats))
}

fn batch(topic: &Topic, frames: &Arc<Frames>, n: usize) -> Batch {
    (0..n).map(|_| ShardMsg::Deliver { topic: topic.clone(), frames: frames.clone(), exclude: None }).collect()
}

/// How long one case may take before the watchdog declares a hang.
const CASE_LIMIT: Duration = Duration::from_secs(60);

/// The preempt timer: `MESH_PREEMPT_MS`, default glommio's 100 ms (see the module docs).
fn preempt() -> Duration {
    let ms = std::env::var("MESH_PREEMPT_MS").ok().and_then(|v| v.parse().ok()).unwrap_or(100);
    Duration::from_millis(ms)
}

/// An executor configured as corecast's shards are (`shard::boot`: pinned, 256 KiB of
/// `io_memory`, ring depth 1024), except for the preempt timer; optionally spinning.
fn executor(cpu: usize, spin: Option<Duration>) -> LocalExecutorBuilder {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let placement = if cpus >= 2 { Placement::Fixed(cpu) } else { Placement::Unbound };
    let b = LocalExecutorBuilder::new(placement)
        .name(&format!("mesh-bench-{cpu}"))
        .io_memory(256 << 10)
        .ring_depth(1024)
        .preempt_timer(preempt());
    match spin {
        Some(d) => b.spin_before_park(d),
        None => b,
    }
}

fn throughput(batch_size: usize) {
    let (tx, rx) = shared_channel::new_bounded::<Batch>(CHANNEL_CAPACITY);
    let (topic, frames) = (Topic::new("t0", false).expect("valid"), frames());
    let sender = executor(0, None)
        .spawn(move || async move {
            let tx = tx.connect().await;
            let t = Instant::now();
            let mut sent = 0u64;
            while t.elapsed().as_secs_f64() < THROUGHPUT_SECS {
                for _ in 0..64 {
                    tx.send(batch(&topic, &frames, batch_size)).await.expect("receiver alive");
                    sent += batch_size as u64;
                }
            }
            sent
        })
        .expect("spawn sender");
    let receiver = executor(1, None)
        .spawn(move || async move {
            let rx = rx.connect().await;
            let (mut got, mut first, mut last) = (0u64, None, Instant::now());
            while let Some(b) = rx.recv().await {
                first.get_or_insert_with(Instant::now);
                for m in b {
                    if let ShardMsg::Deliver { frames, .. } = m {
                        got += u64::from(frames.get(Format::V2).is_some());
                    }
                }
                last = Instant::now();
            }
            (got, last.saturating_duration_since(first.unwrap_or(last)))
        })
        .expect("spawn receiver");
    let sent = sender.join().expect("sender");
    let (got, took) = receiver.join().expect("receiver");
    assert_eq!(sent, got, "every message arrives");
    let secs = took.as_secs_f64().max(1e-9);
    println!(
        "mesh_throughput/batch={batch_size:<3} {:>7.2} M msgs/s  {:>7.3} M batches/s  ({got} msgs in {secs:.2} s)",
        got as f64 / secs / 1e6,
        got as f64 / batch_size as f64 / secs / 1e6,
    );
}

fn rtt(batch_size: usize, spin: Option<Duration>) {
    let (tx_ab, rx_ab) = shared_channel::new_bounded::<Batch>(CHANNEL_CAPACITY);
    let (tx_ba, rx_ba) = shared_channel::new_bounded::<Batch>(CHANNEL_CAPACITY);
    let (topic, frames) = (Topic::new("t0", false).expect("valid"), frames());
    let a = executor(0, spin)
        .spawn(move || async move {
            let (tx, rx) = (tx_ab.connect().await, rx_ba.connect().await);
            let mut ns = Vec::with_capacity(RTT_SAMPLES);
            for i in 0..RTT_WARMUP + RTT_SAMPLES {
                glommio::timer::sleep(Duration::from_micros(200)).await;
                let b = batch(&topic, &frames, batch_size);
                let t = Instant::now();
                tx.send(b).await.expect("peer alive");
                let back = rx.recv().await.expect("peer alive");
                let d = t.elapsed();
                assert_eq!(back.len(), batch_size);
                if i >= RTT_WARMUP {
                    ns.push(d.as_nanos() as u64);
                }
            }
            ns
        })
        .expect("spawn a");
    let b = executor(1, spin)
        .spawn(move || async move {
            let (rx, tx) = (rx_ab.connect().await, tx_ba.connect().await);
            while let Some(b) = rx.recv().await {
                if tx.send(b).await.is_err() {
                    break;
                }
            }
        })
        .expect("spawn b");
    let mut ns = a.join().expect("a");
    b.join().expect("b");
    ns.sort_unstable();
    let q = |p: f64| ns[((ns.len() - 1) as f64 * p) as usize] as f64 / 1e3;
    let mean = ns.iter().sum::<u64>() as f64 / ns.len() as f64 / 1e3;
    let mode = match spin {
        None => "park (no spin, as corecast)".to_string(),
        Some(d) => format!("spin_before_park({} ms)", d.as_millis()),
    };
    println!(
        "mesh_rtt/batch={batch_size:<3} {mode:<28} p50 {:>7.1} µs  p99 {:>7.1} µs  mean {mean:>7.1} µs  ({} round trips)",
        q(0.50),
        q(0.99),
        ns.len()
    );
}

/// Runs one case under a watchdog: a case that does not finish within [`CASE_LIMIT`] ends the
/// process with exit code 2 (a hang of both executors, not a slow machine).
fn guarded(name: &str, case: impl FnOnce()) {
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    let name = name.to_string();
    let watchdog = std::thread::spawn(move || {
        if let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = done_rx.recv_timeout(CASE_LIMIT) {
            eprintln!(
                "{name}: no progress for {} s: both executors parked (preempt timer {} ms); see benches/README.md",
                CASE_LIMIT.as_secs(),
                preempt().as_millis()
            );
            std::process::exit(2);
        }
    });
    case();
    let _ = done_tx.send(());
    let _ = watchdog.join();
}

fn main() {
    // `cargo bench` passes `--bench`; any other non-flag argument is a name filter.
    let filter: Option<String> = std::env::args().skip(1).find(|a| !a.starts_with('-'));
    let wants = |name: &str| filter.as_deref().is_none_or(|f| name.contains(f) || "mesh".contains(f));
    println!("mesh: preempt timer {} ms", preempt().as_millis());
    if wants("mesh_throughput") {
        for b in [1, 64] {
            guarded(&format!("mesh_throughput/batch={b}"), || throughput(b));
        }
    }
    if wants("mesh_rtt") {
        for b in [1, 64] {
            for spin in [None, Some(Duration::from_millis(1))] {
                guarded(&format!("mesh_rtt/batch={b} spin_before_park={spin:?}"), || rtt(b, spin));
            }
        }
    }
}
