//! The fan-out path: one message encoded once, its shared `Bytes` queued on N subscribers'
//! [`Outbox`]es, then written to real sockets.
//!
//! - `fanout_enqueue/push/N`: encode once (vsn 2 text frame, 100-byte payload) and push a
//!   clone into each of N outboxes. No sockets. Divide the time by N for the per-subscriber
//!   cost.
//! - `fanout_enqueue/deliver/N`: the same work the way `Shard::deliver` does it: look the topic
//!   up in the [`Registry`], walk its local subscribers, find each connection in a slab by
//!   index and generation, push, check the queue limit, mark the connection dirty.
//! - `fanout_flush/K=k/N`: N loopback TCP connections (`TCP_NODELAY`, as the server sets), a
//!   drain thread on another CPU reading the client ends with epoll; each iteration queues k
//!   frames on every connection and calls [`Outbox::flush`] once per connection (retrying
//!   while the socket is full). k = 1 is one frame per `sendmsg`; k = 16 is what coalescing
//!   gives under load. Throughput is in frames delivered.

use std::hint::black_box;
use std::net::{TcpListener, TcpStream};
use std::os::unix::io::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

use corecast::channel::broadcast::{self, Message};
use corecast::channel::registry::{ConnId, LocalSub, Registry};
use corecast::channel::{Format, FormatSet};
use corecast::protocol::phoenix::session::Payload;
use corecast::protocol::phoenix::Topic;
use corecast::transport::{Flush, Outbox};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The server's default `--max-queue-bytes`.
const MAX_QUEUE_BYTES: usize = 4 << 20;

/// The load generator's 100-byte payload.
fn payload_100() -> Bytes {
    let mut p = br#"{"s":123456,"t":1732363333123456789,"p":0,"x":""#.to_vec();
    p.resize(98, b'x');
    p.extend_from_slice(b"\"}");
    Bytes::from(p)
}

/// Encodes the benchmark message once for vsn 2 (what an owner shard does per publish).
fn encode_once(payload: &Payload, offset: u64) -> broadcast::Frames {
    let mut formats = FormatSet::default();
    formats.insert(Format::V2);
    let m = Message {
        wire_topic: "realtime:t0",
        event: "m",
        payload,
        binary_frame: false,
        id: "1b4e28ba-2fa1-41d2-883f-0016d3cca427",
        epoch: "9f2c0a1be44d7a10",
        offset,
        replayed: false,
        user_id: None,
    };
    broadcast::encode(&m, formats)
}

/// What the shard keeps per connection for fan-out (a subset of its `Slot`).
struct Slot {
    outbox: Outbox,
    generation: u32,
    dirty: bool,
}

fn enqueue(c: &mut Criterion) {
    let payload = Payload::Json(payload_100());
    let topic = Topic::new("t0", false).expect("valid topic");
    let mut g = c.benchmark_group("fanout_enqueue");
    for n in [100usize, 1_000, 10_000] {
        g.throughput(Throughput::Elements(n as u64));

        let mut outboxes: Vec<Outbox> = (0..n).map(|_| Outbox::new()).collect();
        g.bench_function(BenchmarkId::new("push", n), |b| {
            b.iter_custom(|iters| {
                let mut took = Duration::ZERO;
                for i in 0..iters {
                    let t = Instant::now();
                    let frames = encode_once(&payload, i);
                    let frame = frames.get(Format::V2).expect("v2 frame");
                    for ob in outboxes.iter_mut() {
                        black_box(ob.push(frame.clone()));
                    }
                    took += t.elapsed();
                    // As if flushed: empty the queues outside the timed region.
                    outboxes.iter_mut().for_each(Outbox::truncate_to_partial);
                }
                took
            })
        });

        let mut registry = Registry::new();
        let mut slots: Vec<Slot> =
            (0..n).map(|i| Slot { outbox: Outbox::new(), generation: i as u32 % 7, dirty: false }).collect();
        for (i, s) in slots.iter().enumerate() {
            registry.add(
                &topic,
                LocalSub {
                    conn: ConnId { index: i as u32, generation: s.generation },
                    format: Format::V2,
                    presence: false,
                    join_ref: None,
                    pg: false,
                    tracked: false,
                    awaiting_backlog: false,
                    held: false,
                },
            );
        }
        let mut dirty: Vec<u32> = Vec::with_capacity(n);
        g.bench_function(BenchmarkId::new("deliver", n), |b| {
            b.iter_custom(|iters| {
                let mut took = Duration::ZERO;
                for i in 0..iters {
                    let t = Instant::now();
                    let frames = encode_once(&payload, i);
                    let local = registry.get(black_box(&topic)).expect("subscribed");
                    let mut delivered = 0u64;
                    for sub in &local.subs {
                        if sub.awaiting_backlog {
                            continue;
                        }
                        let Some(frame) = frames.get(sub.format) else { continue };
                        let Some(slot) = slots.get_mut(sub.conn.index as usize) else { continue };
                        if slot.generation != sub.conn.generation {
                            continue;
                        }
                        if slot.outbox.push(frame.clone()) > MAX_QUEUE_BYTES {
                            unreachable!("one frame per connection");
                        }
                        if !slot.dirty {
                            slot.dirty = true;
                            dirty.push(sub.conn.index);
                        }
                        delivered += 1;
                    }
                    black_box(delivered);
                    took += t.elapsed();
                    for &i in &dirty {
                        let s = &mut slots[i as usize];
                        s.dirty = false;
                        s.outbox.truncate_to_partial();
                    }
                    dirty.clear();
                }
                took
            })
        });
    }
    g.finish();
}

/// N loopback TCP pairs: server ends (written by the bench thread) and a drain thread that
/// reads every client end.
struct Pairs {
    servers: Vec<TcpStream>,
    stop: Arc<AtomicBool>,
    received: Arc<AtomicU64>,
    drainer: Option<std::thread::JoinHandle<()>>,
}

impl Pairs {
    fn new(n: usize, drain_cpu: Option<usize>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind loopback");
        let addr = listener.local_addr().expect("local addr");
        let mut clients = Vec::with_capacity(n);
        let mut servers = Vec::with_capacity(n);
        for _ in 0..n {
            let c = TcpStream::connect(addr).expect("connect loopback");
            let (s, _) = listener.accept().expect("accept");
            // As the server: Nagle off. The fd stays blocking (like glommio's accepted
            // sockets); `Outbox::flush` passes MSG_DONTWAIT.
            s.set_nodelay(true).expect("nodelay");
            c.set_nonblocking(true).expect("nonblocking");
            clients.push(c);
            servers.push(s);
        }
        let stop = Arc::new(AtomicBool::new(false));
        let received = Arc::new(AtomicU64::new(0));
        let drainer = {
            let (stop, received) = (stop.clone(), received.clone());
            std::thread::Builder::new()
                .name("drain".into())
                .spawn(move || {
                    if let Some(cpu) = drain_cpu {
                        core_affinity::set_for_current(core_affinity::CoreId { id: cpu });
                    }
                    drain(&clients, &stop, &received)
                })
                .expect("spawn drain thread")
        };
        Self { servers, stop, received, drainer: Some(drainer) }
    }
}

impl Drop for Pairs {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.drainer.take() {
            let _ = h.join();
        }
    }
}

/// Reads every readable client socket until `stop`, counting bytes.
fn drain(clients: &[TcpStream], stop: &AtomicBool, received: &AtomicU64) {
    // SAFETY: plain syscalls on fds owned by `clients`, which outlive this function.
    let ep = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
    assert!(ep >= 0, "epoll_create1");
    for (i, c) in clients.iter().enumerate() {
        let mut ev = libc::epoll_event { events: libc::EPOLLIN as u32, u64: i as u64 };
        // SAFETY: as above.
        let r = unsafe { libc::epoll_ctl(ep, libc::EPOLL_CTL_ADD, c.as_raw_fd(), &mut ev) };
        assert_eq!(r, 0, "epoll_ctl");
    }
    let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 256];
    let mut buf = vec![0u8; 256 << 10];
    while !stop.load(Ordering::Relaxed) {
        // SAFETY: `events` has room for 256 entries.
        let n = unsafe { libc::epoll_wait(ep, events.as_mut_ptr(), 256, 20) };
        for ev in events.iter().take(n.max(0) as usize) {
            let fd: RawFd = clients[ev.u64 as usize].as_raw_fd();
            loop {
                // SAFETY: `buf` is valid for its length.
                let r = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0) };
                if r <= 0 {
                    break;
                }
                received.fetch_add(r as u64, Ordering::Relaxed);
                if (r as usize) < buf.len() {
                    break;
                }
            }
        }
    }
    // SAFETY: closing the epoll fd we created.
    unsafe { libc::close(ep) };
}

fn flush(c: &mut Criterion) {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let (bench_cpu, drain_cpu) = if cpus >= 2 { (Some(0), Some(1)) } else { (None, None) };
    if let Some(cpu) = bench_cpu {
        core_affinity::set_for_current(core_affinity::CoreId { id: cpu });
    }
    let payload = Payload::Json(payload_100());
    let frames = encode_once(&payload, 1);
    let frame = frames.get(Format::V2).expect("v2 frame").clone();
    let mut g = c.benchmark_group("fanout_flush");
    g.warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(3)).sample_size(10);
    let mut summary = Vec::new();
    for n in [100usize, 1_000] {
        let pairs = Pairs::new(n, drain_cpu);
        let fds: Vec<RawFd> = pairs.servers.iter().map(AsRawFd::as_raw_fd).collect();
        let mut written = 0u64;
        for k in [1usize, 16] {
            let mut outboxes: Vec<Outbox> = (0..n).map(|_| Outbox::new()).collect();
            let mut blocked = 0u64;
            g.throughput(Throughput::Elements((n * k) as u64));
            g.bench_function(BenchmarkId::new(format!("K={k}"), n), |b| {
                b.iter_custom(|iters| {
                    let t = Instant::now();
                    for _ in 0..iters {
                        for (ob, &fd) in outboxes.iter_mut().zip(&fds) {
                            for _ in 0..k {
                                ob.push(frame.clone());
                            }
                            while ob.flush(fd).expect("sendmsg") == Flush::Blocked {
                                blocked += 1;
                                std::hint::spin_loop();
                            }
                        }
                    }
                    t.elapsed()
                })
            });
            let (frames_sent, sends) =
                outboxes.iter().map(Outbox::counters).fold((0, 0), |(f, s), (f1, s1)| (f + f1, s + s1));
            written += frames_sent;
            summary.push(format!(
                "fanout_flush K={k} N={n}: {frames_sent} frames in {sends} sendmsg calls \
                 ({:.2} frames per send), {blocked} flushes retried on a full socket",
                frames_sent as f64 / sends.max(1) as f64
            ));
        }
        // Everything written must arrive: wait for the drain thread to read it all.
        let expect = frame.len() as u64 * written;
        let deadline = Instant::now() + Duration::from_secs(10);
        while pairs.received.load(Ordering::Relaxed) < expect && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(pairs.received.load(Ordering::Relaxed), expect, "bytes received for N={n}");
    }
    g.finish();
    for line in summary {
        eprintln!("{line}");
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .sample_size(20);
    targets = enqueue, flush
}
criterion_main!(benches);
