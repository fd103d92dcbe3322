//! The raw-socket baseline: what this machine's kernel costs per `sendmsg`, with no server at all.
//!
//! A thread pinned to the server CPU accepts the N subscriber connections (answering the HTTP
//! upgrade with a canned 101), then writes the same pre-encoded WebSocket frames a corecast
//! subscriber receives (one shared buffer, unmasked) with a plain blocking `sendmsg` loop:
//! one frame per send, then K frames per send. The subscribers are the generator's usual worker
//! processes, so they measure latency, loss and throughput exactly as in the scenarios.
//!
//! Per-send cost = sender thread CPU time ÷ sends (one frame per send). The latency floor of
//! fanning one message out to N subscribers on S shards ≈ N × per-send cost ÷ S. With K frames
//! per send the generator (not the sender) is usually the bottleneck: that run measures the
//! generator's own ceiling.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::coord::{ms, si, ConnectSummary, Fleet, FleetOpts, PhaseOutcome};
use crate::layout::{Layout, EXTERNAL_PUBLISHER, PHASE_STRIDE};
use crate::sys;
use crate::wire::{self, Proto};
use crate::worker::{self, PhaseSpec};

#[derive(Clone, Debug)]
pub struct BaselineOpts {
    pub subscribers: usize,
    pub seconds: f64,
    /// Frames per send for the coalesced runs (one run per value).
    pub ks: Vec<usize>,
    /// Messages per second for the paced run (one frame per send); 0 = skip.
    pub paced_rate: f64,
    pub payload: usize,
    pub server_cpu: Option<usize>,
    pub fleet: FleetOpts,
}

#[derive(Clone, Debug, Serialize)]
pub struct SendRun {
    pub mode: String,
    pub frames_per_send: usize,
    pub target_rate: Option<f64>,
    pub sends: u64,
    pub frames: u64,
    pub messages: u64,
    pub sender_cpu_secs: f64,
    pub sender_wall_secs: f64,
    /// Sender thread CPU per sendmsg, µs.
    pub us_per_send: f64,
    /// Sender CPU ÷ wall: below ~0.9 the sender waited for the subscribers (generator-bound).
    pub sender_busy: f64,
    /// Paced run: time to write one message to every subscriber, ms.
    pub round_p50_ms: f64,
    pub round_p99_ms: f64,
    pub outcome: PhaseOutcome,
}

#[derive(Clone, Debug, Serialize)]
pub struct BaselineResult {
    pub subscribers: usize,
    pub connect: ConnectSummary,
    pub runs: Vec<SendRun>,
    /// µs of sender CPU per sendmsg of one frame (the K=1 run).
    pub us_per_send: f64,
    /// N × per-send cost, ms (one shard).
    pub floor_ms: f64,
    /// Highest deliveries/s the generator consumed (best coalesced run).
    pub generator_ceiling_per_sec: f64,
    /// Generator CPU utilisation in that run (1.0 = one core saturated).
    pub generator_ceiling_cpu: f64,
    /// The generator's core was saturated (>= 90%) in that run.
    pub generator_bound: bool,
    /// Deliveries per second of generator CPU time (best run): the generator's ceiling
    /// extrapolated to one full core.
    pub generator_per_cpu_sec: f64,
}

enum Mode {
    Flat { k: usize, secs: f64 },
    Paced { rate: f64, secs: f64 },
}

struct SenderStats {
    sends: u64,
    frames: u64,
    messages: u64,
    cpu_ns: u64,
    wall_ns: u64,
    rounds: Histogram<u64>,
}

/// Accept up to `n` subscribers (stops after 10 s without a new one).
fn accept_all(listener: &TcpListener, n: usize) -> Vec<TcpStream> {
    let mut v = Vec::with_capacity(n);
    let mut buf = [0u8; 4096];
    let _ = listener.set_nonblocking(true);
    let mut last = Instant::now();
    while v.len() < n {
        let mut s = match listener.accept() {
            Ok((s, _)) => s,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if last.elapsed() > Duration::from_secs(10) {
                    break;
                }
                std::thread::sleep(Duration::from_micros(200));
                continue;
            }
            Err(_) => continue,
        };
        last = Instant::now();
        let _ = s.set_nonblocking(false);
        let _ = s.set_nodelay(true);
        let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
        let mut got = Vec::new();
        let ok = loop {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => break false,
                Ok(k) => {
                    got.extend_from_slice(&buf[..k]);
                    if memchr::memmem::find(&got, b"\r\n\r\n").is_some() {
                        break true;
                    }
                }
            }
        };
        if !ok {
            continue;
        }
        let _ = s.write_all(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
              Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n",
        );
        let _ = s.set_write_timeout(Some(Duration::from_secs(5)));
        v.push(s);
    }
    v
}

fn frame(phase: u32, seq: u64, t: u64, payload: usize, body: &mut Vec<u8>, out: &mut Vec<u8>) {
    body.clear();
    let pid = phase as u64 * PHASE_STRIDE + EXTERNAL_PUBLISHER;
    wire::phoenix_broadcast_frame_body(body, 0, seq, t, pid, payload);
    wire::push_server_frame(out, wire::OP_TEXT, body);
}

fn send_mode(socks: &[TcpStream], mode: &Mode, phase: u32, payload: usize) -> SenderStats {
    let mut st = SenderStats { sends: 0, frames: 0, messages: 0, cpu_ns: 0, wall_ns: 0, rounds: worker::new_hist() };
    let fds: Vec<i32> = socks.iter().map(|s| s.as_raw_fd()).collect();
    let mut body = Vec::with_capacity(1024);
    let mut buf = Vec::with_capacity(64 * 1024);
    let mut bounds = Vec::new();
    let cpu0 = sys::thread_cpu_ns();
    let wall0 = sys::now_ns();
    let mut seq = 0u64;
    match *mode {
        Mode::Flat { k, secs } => {
            let end = wall0 + (secs * 1e9) as u64;
            while sys::now_ns() < end {
                buf.clear();
                bounds.clear();
                let t = sys::now_ns();
                for _ in 0..k {
                    let s = buf.len();
                    frame(phase, seq, t, payload, &mut body, &mut buf);
                    bounds.push((s, buf.len()));
                    seq += 1;
                }
                let iov: Vec<libc::iovec> = bounds
                    .iter()
                    .map(|&(a, b)| libc::iovec { iov_base: buf[a..].as_ptr() as *mut libc::c_void, iov_len: b - a })
                    .collect();
                let total: usize = bounds.iter().map(|&(a, b)| b - a).sum();
                for &fd in &fds {
                    send_all(fd, &iov, total);
                }
                st.sends += fds.len() as u64;
                st.frames += (fds.len() * k) as u64;
                st.messages += k as u64;
            }
        }
        Mode::Paced { rate, secs } => {
            let interval = 1e9 / rate;
            let n = (secs * rate).ceil() as u64;
            for i in 0..n {
                let due = wall0 + (i as f64 * interval) as u64;
                loop {
                    let now = sys::now_ns();
                    if now >= due {
                        break;
                    }
                    std::thread::sleep(Duration::from_nanos((due - now).min(1_000_000)));
                }
                buf.clear();
                let t = sys::now_ns();
                frame(phase, seq, t, payload, &mut body, &mut buf);
                seq += 1;
                let iov = [libc::iovec { iov_base: buf.as_ptr() as *mut libc::c_void, iov_len: buf.len() }];
                for &fd in &fds {
                    send_all(fd, &iov, buf.len());
                }
                let _ = st.rounds.record(((sys::now_ns() - t) / 1000).max(1));
                st.sends += fds.len() as u64;
                st.frames += fds.len() as u64;
                st.messages += 1;
            }
        }
    }
    st.cpu_ns = sys::thread_cpu_ns() - cpu0;
    st.wall_ns = sys::now_ns() - wall0;
    st
}

/// One sendmsg; finish a partial write with plain sends (rare on blocking sockets).
fn send_all(fd: i32, iov: &[libc::iovec], total: usize) {
    let Ok(n) = sys::sendmsg(fd, iov) else { return };
    if n >= total {
        return;
    }
    let mut skip = n;
    for v in iov {
        // SAFETY: iovecs point into a live buffer of the stated length.
        let s = unsafe { std::slice::from_raw_parts(v.iov_base as *const u8, v.iov_len) };
        if skip >= s.len() {
            skip -= s.len();
            continue;
        }
        let mut rest = &s[skip..];
        skip = 0;
        while !rest.is_empty() {
            // SAFETY: valid slice; blocking socket.
            let r = unsafe { libc::send(fd, rest.as_ptr() as *const libc::c_void, rest.len(), libc::MSG_NOSIGNAL) };
            if r <= 0 {
                return;
            }
            rest = &rest[r as usize..];
        }
    }
}

pub fn run(o: &BaselineOpts, label: &str) -> Result<BaselineResult, String> {
    let listener = TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    let addr = match listener.local_addr().map_err(|e| e.to_string())? {
        std::net::SocketAddr::V4(a) => a,
        _ => return Err("no IPv4 address".into()),
    };
    let n = o.subscribers;
    type SentTx = mpsc::Sender<Vec<(u64, u64)>>;
    let (mode_tx, mode_rx) = mpsc::channel::<Option<(u32, Mode, SentTx)>>();
    let (res_tx, res_rx) = mpsc::channel::<SenderStats>();
    let cpu = o.server_cpu;
    let payload = o.payload;
    let sender = std::thread::spawn(move || {
        if let Some(c) = cpu {
            sys::pin_to_cpu(c);
        }
        let socks = accept_all(&listener, n);
        while let Ok(Some((phase, mode, sent_tx))) = mode_rx.recv() {
            let st = send_mode(&socks, &mode, phase, payload);
            let _ = sent_tx.send(vec![(EXTERNAL_PUBLISHER, st.messages)]);
            if res_tx.send(st).is_err() {
                break;
            }
        }
        for s in &socks {
            sys::close_abortive(s.as_raw_fd());
        }
        std::mem::forget(socks);
    });
    let layout = Layout::External { subs: n };
    let mut fleet = Fleet::spawn(Proto::Raw, addr, layout, &o.fleet)?;
    let connect = fleet.wait_connected(Duration::from_secs(300))?;
    if !o.fleet.quiet {
        eprintln!(
            "{label}: {} subscribers connected to the raw sender ({} failed) in {:.2}s",
            connect.ok, connect.failed, connect.secs
        );
    }
    let mut modes = vec![Mode::Flat { k: 1, secs: o.seconds }];
    for &k in &o.ks {
        if k > 1 {
            modes.push(Mode::Flat { k, secs: o.seconds });
        }
    }
    if o.paced_rate > 0.0 {
        modes.push(Mode::Paced { rate: o.paced_rate, secs: o.seconds.max(2.0) });
    }
    let mut runs = Vec::new();
    for (i, mode) in modes.into_iter().enumerate() {
        let phase = i as u32 + 1;
        let (name, k, target, secs) = match mode {
            Mode::Flat { k, secs } => (format!("flat K={k}"), k, None, secs),
            Mode::Paced { rate, secs } => (format!("paced {rate}/s"), 1, Some(rate), secs),
        };
        let (sent_tx, sent_rx) = mpsc::channel();
        let spec = PhaseSpec { phase, seconds: secs, rate: None, window: 1, payload: o.payload, jitter: false };
        mode_tx.send(Some((phase, mode, sent_tx))).map_err(|_| "sender thread gone".to_string())?;
        let outcome = fleet.run_phase(spec, &format!("{label} {name}"), Some(&sent_rx), Duration::from_secs(20))?;
        let st = res_rx.recv().map_err(|_| "sender result missing".to_string())?;
        let us_per_send = st.cpu_ns as f64 / 1000.0 / st.sends.max(1) as f64;
        let run = SendRun {
            mode: name.clone(),
            frames_per_send: k,
            target_rate: target,
            sends: st.sends,
            frames: st.frames,
            messages: st.messages,
            sender_cpu_secs: st.cpu_ns as f64 / 1e9,
            sender_wall_secs: st.wall_ns as f64 / 1e9,
            us_per_send,
            sender_busy: st.cpu_ns as f64 / st.wall_ns.max(1) as f64,
            round_p50_ms: if st.rounds.is_empty() { 0.0 } else { ms(st.rounds.value_at_quantile(0.5)) },
            round_p99_ms: if st.rounds.is_empty() { 0.0 } else { ms(st.rounds.value_at_quantile(0.99)) },
            outcome,
        };
        if !o.fleet.quiet {
            eprintln!(
                "{label} {name}: {:.2} µs/send, sender busy {:.0}%, delivered {}/s, p50 {:.2} ms p99 {:.2} ms, lost {}",
                run.us_per_send,
                run.sender_busy * 100.0,
                si(run.outcome.deliveries_per_sec),
                run.outcome.p50_ms,
                run.outcome.p99_ms,
                run.outcome.lost
            );
        }
        runs.push(run);
    }
    let _ = mode_tx.send(None);
    fleet.quit();
    let _ = sender.join();
    let k1 = runs.iter().find(|r| r.frames_per_send == 1 && r.target_rate.is_none());
    let us_per_send = k1.map_or(0.0, |r| r.us_per_send);
    let best = runs
        .iter()
        .filter(|r| r.target_rate.is_none())
        .max_by(|a, b| a.outcome.deliveries_per_sec.total_cmp(&b.outcome.deliveries_per_sec));
    let (ceiling, ceiling_cpu, bound) = best.map_or((0.0, 0.0, false), |r| {
        let cpu = r.outcome.generator_cpu_secs / r.outcome.active_secs.max(1e-3);
        (r.outcome.deliveries_per_sec, cpu, cpu >= 0.9)
    });
    // Deliveries per second of generator CPU, best run: what one generator core would take if
    // nothing else waited (the sender blocks on full sockets, so neither side may be saturated).
    let per_cpu =
        runs.iter().map(|r| r.outcome.uniq as f64 / r.outcome.generator_cpu_secs.max(1e-6)).fold(0.0f64, f64::max);
    Ok(BaselineResult {
        subscribers: n,
        connect,
        us_per_send,
        floor_ms: n as f64 * us_per_send / 1000.0,
        generator_ceiling_per_sec: ceiling,
        generator_ceiling_cpu: ceiling_cpu,
        generator_bound: bound,
        generator_per_cpu_sec: per_cpu,
        runs,
    })
}
