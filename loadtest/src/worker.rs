//! A worker process: one single-threaded epoll loop that owns a contiguous range of client
//! connections (subscribers and publishers), pinned to one CPU.
//!
//! The coordinator starts workers as `loadtest worker`, writes a [`WorkerSpec`] as the first line
//! of their stdin, then [`Cmd`]s, and reads [`Ev`]s from their stdout, one JSON object per line.
//!
//! Hot path: one `recv` into a large shared buffer per readable socket, a hand-written frame
//! parser, a byte scan for `"s":`/`"t":`/`"p":`, an HDR histogram record and a per-publisher
//! sequence check. No allocation per message, no JSON parse.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::io::{self, BufRead, Write};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::fd::RawFd;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

use crate::layout::{Layout, PresRole, PHASE_STRIDE};
use crate::sys::{self, Epoll};
use crate::wire::{self, Proto};

pub mod presence;
pub mod tls;

/// Latencies are recorded in microseconds, 1 µs .. 1 hour, 3 significant digits.
pub fn new_hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("histogram bounds")
}

/// (value, count) pairs of a histogram, to send between processes.
pub fn hist_pairs(h: &Histogram<u64>) -> Vec<(u64, u64)> {
    h.iter_recorded().map(|v| (v.value_iterated_to(), v.count_at_value())).collect()
}

pub fn hist_add_pairs(h: &mut Histogram<u64>, pairs: &[(u64, u64)]) {
    for &(v, c) in pairs {
        let _ = h.record_n(v.clamp(1, 3_600_000_000), c);
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct WorkerSpec {
    pub index: usize,
    pub proto: Proto,
    pub addr: SocketAddrV4,
    /// Source addresses connections are spread over (each has its own ephemeral port space).
    pub src_addrs: Vec<Ipv4Addr>,
    /// Client index range `[first, last)` owned by this worker.
    pub first: usize,
    pub last: usize,
    pub layout: Layout,
    /// Connections being set up (connect + upgrade + join) at once.
    pub connect_concurrency: usize,
    pub connect_timeout_ms: u64,
    /// Application heartbeat period (Phoenix); 0 = none.
    pub heartbeat_ms: u64,
    pub cpu: Option<usize>,
    pub tick_ms: u64,
    /// Publishers use REST (`POST /realtime/v1/api/broadcast/...`, corecast only) instead of WS.
    pub rest_publish: bool,
    /// Subscribers are Server-Sent Events streams (`GET /realtime/v1/sse`, corecast only)
    /// instead of WebSocket connections; publishers are unchanged.
    #[serde(default)]
    pub sse_subscribers: bool,
    /// Speak TLS, trusting exactly the certificates in this PEM file (`--tls`).
    #[serde(default)]
    pub tls_ca: Option<std::path::PathBuf>,
    /// Connect-storm's upgrade-only pass: a client counts as set up at the 101, sends no join.
    #[serde(default)]
    pub upgrade_only: bool,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PhaseSpec {
    pub phase: u32,
    pub seconds: f64,
    /// Messages per second per publisher; None = as fast as the server takes them (bounded by
    /// `window` messages in flight, measured on this worker's subscribers).
    pub rate: Option<f64>,
    pub window: u64,
    pub payload: usize,
    /// Spread publisher start times uniformly over one interval (chat).
    pub jitter: bool,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Cmd {
    Phase(PhaseSpec),
    /// Publishing is over everywhere; `sent` = messages sent per publisher (client index) in
    /// this phase. The worker answers with `Ev::Result`.
    End {
        sent: Vec<(u64, u64)>,
    },
    /// Connect again the clients the server closed; answered by `Ev::Connected` (counting
    /// only those clients).
    Reconnect,
    /// Presence scenario: members act (track / untrack / close) on the step's schedule;
    /// progress in `Ev::Tick` (published = actions sent, uniq = keys seen by observers,
    /// delivered = diffs observed), `Ev::PubDone` when this worker's members all acted.
    PresenceStep(presence::StepSpec),
    /// End of a presence step: answered by `Ev::PresenceResult`.
    PresenceEnd {
        step: u32,
    },
    Quit,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct PhaseResult {
    pub phase: u32,
    /// Messages of this phase received (including duplicates).
    pub delivered: u64,
    pub uniq: u64,
    pub dup: u64,
    pub reordered: u64,
    /// Messages of an earlier phase received during this one.
    pub late: u64,
    /// Data frames without measurement fields, or received by publish-only clients.
    pub other: u64,
    pub lost: u64,
    pub subs_with_loss: u64,
    pub max_lost_per_sub: u64,
    pub subs: u64,
    pub closed: u64,
    pub hist: Vec<(u64, u64)>,
    pub cpu_ns: u64,
    pub window_stalls: u64,
    pub errors: Vec<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "ev", rename_all = "snake_case")]
pub enum Ev {
    Connected {
        ok: u64,
        failed: u64,
        secs: f64,
        hist: Vec<(u64, u64)>,
        errors: Vec<String>,
        /// Connect → 101 times (µs) of the WebSocket clients, whatever the join after it.
        #[serde(default)]
        upgrade_hist: Vec<(u64, u64)>,
    },
    Tick {
        phase: u32,
        delivered: u64,
        uniq: u64,
        published: u64,
        lat_max_us: u64,
        lat_sum_us: u64,
        lat_n: u64,
        closed: u64,
    },
    PubDone {
        phase: u32,
        sent: Vec<(u64, u64)>,
        /// Scheduled messages not sent because the connection had megabytes queued.
        shortfall: u64,
    },
    Result(PhaseResult),
    PresenceResult(presence::StepResult),
    Fatal {
        msg: String,
    },
}

pub fn emit(ev: &Ev) {
    let mut line = serde_json::to_vec(ev).expect("serialize event");
    line.push(b'\n');
    let mut out = io::stdout().lock();
    let _ = out.write_all(&line);
    let _ = out.flush();
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum St {
    Pending,
    Connecting,
    Upgrading,
    Joining,
    Joined,
    Closed,
}

/// Sequence state of one publisher as seen by one subscriber.
#[derive(Clone, Copy, Debug)]
struct Track {
    publisher: u64,
    /// Highest sequence seen + 1.
    next: u64,
    /// Bit i set = sequence `next - 1 - i` was seen (i < 64).
    win: u64,
}

struct Conn {
    fd: RawFd,
    id: u64,
    topic: u32,
    sub: bool,
    publ: bool,
    rest: bool,
    state: St,
    /// Socket.IO / NATS join steps done.
    step: u8,
    t0: u64,
    want_out: bool,
    rbuf: Vec<u8>,
    wbuf: Vec<u8>,
    wpos: usize,
    /// Fragmented message being assembled, or the NATS byte stream's unparsed tail.
    frag: Vec<u8>,
    frag_op: u8,
    /// NATS: unparsed tail of the protocol byte stream carried in WS frames.
    stream: Vec<u8>,
    tracks: Vec<Track>,
    uniq: u64,
    in_phase: bool,
    next_hb: u64,
    pub_idx: u32,
    rest_inflight: u32,
    /// A Server-Sent Events subscriber (plain HTTP GET, `data:` lines).
    sse: bool,
    /// Role in a presence room.
    pres: PresRole,
    /// The TLS session (`--tls`).
    tls: Option<Box<rustls::ClientConnection>>,
}

struct Pub {
    conn: usize,
    topic: u32,
    /// Messages sent so far (= next sequence number).
    seq: u64,
    start: u64,
    end: u64,
    offset: u64,
    interval: f64,
    /// Messages whose scheduled time has come.
    intended: u64,
    total: u64,
    skipped: u64,
    unlimited: bool,
    done: bool,
    /// In-flight window (unlimited mode): every local subscriber of the topic has all sequences
    /// below `wm`.
    wm: u64,
    ring: Vec<u32>,
    local_subs: u32,
    wm_changed: u64,
}

const STDIN_TOKEN: u64 = u64::MAX;
const BACKLOG_LIMIT: usize = 4 << 20;
const SCRATCH: usize = 1 << 20;

struct Worker {
    spec: WorkerSpec,
    /// `--tls`: the client configuration every connection's session starts from.
    tls: Option<std::sync::Arc<rustls::ClientConfig>>,
    host: String,
    ep: Epoll,
    conns: Vec<Conn>,
    scratch: Vec<u8>,
    out: Vec<u8>,
    body: Vec<u8>,
    rng: u64,
    // connection set-up
    next_start: usize,
    inflight: usize,
    joined: u64,
    failed: u64,
    connect_hist: Histogram<u64>,
    upgrade_hist: Histogram<u64>,
    connect_t0: u64,
    connected_sent: bool,
    errors: Vec<String>,
    // phase
    phase: u32,
    active: bool,
    phase_cpu0: u64,
    hist: Histogram<u64>,
    delivered: u64,
    uniq: u64,
    dup: u64,
    reordered: u64,
    late: u64,
    other: u64,
    closed: u64,
    published: u64,
    window_stalls: u64,
    tick_lat_max: u64,
    tick_lat_sum: u64,
    tick_lat_n: u64,
    pubs: Vec<Pub>,
    heap: BinaryHeap<Reverse<(u64, u32)>>,
    pub_done_sent: bool,
    phase_window: u64,
    phase_payload: usize,
    stdin_buf: Vec<u8>,
    quit: bool,
    /// Presence step in progress.
    pres: Option<Box<presence::PresenceRun>>,
}

/// Entry point of `loadtest worker`.
pub fn run_worker() -> ! {
    sys::die_with_parent();
    let mut line = String::new();
    if io::stdin().lock().read_line(&mut line).is_err() || line.is_empty() {
        eprintln!("worker: no spec on stdin");
        std::process::exit(2);
    }
    let spec: WorkerSpec = match serde_json::from_str(&line) {
        Ok(s) => s,
        Err(e) => {
            emit(&Ev::Fatal { msg: format!("bad spec: {e}") });
            std::process::exit(2);
        }
    };
    if let Some(cpu) = spec.cpu {
        sys::pin_to_cpu(cpu);
    }
    sys::raise_nofile();
    let mut w = Worker::new(spec).unwrap_or_else(|e| {
        emit(&Ev::Fatal { msg: format!("worker init: {e}") });
        std::process::exit(2);
    });
    w.run();
    std::process::exit(0);
}

impl Worker {
    fn new(spec: WorkerSpec) -> io::Result<Worker> {
        let ep = Epoll::new()?;
        sys::set_nonblocking(0, true);
        ep.add(0, (libc::EPOLLIN | libc::EPOLLRDHUP) as u32, STDIN_TOKEN)?;
        let mut conns = Vec::with_capacity(spec.last - spec.first);
        for id in spec.first..spec.last {
            let r = spec.layout.role(id);
            conns.push(Conn {
                fd: -1,
                id: id as u64,
                topic: r.topic,
                sub: r.sub,
                publ: r.publ,
                rest: r.publ && !r.sub && spec.rest_publish && spec.proto == Proto::Phoenix,
                state: St::Pending,
                step: 0,
                t0: 0,
                want_out: false,
                rbuf: Vec::new(),
                wbuf: Vec::new(),
                wpos: 0,
                frag: Vec::new(),
                frag_op: 0,
                stream: Vec::new(),
                tracks: Vec::new(),
                uniq: 0,
                in_phase: false,
                next_hb: u64::MAX,
                pub_idx: u32::MAX,
                rest_inflight: 0,
                sse: r.sub && spec.sse_subscribers && matches!(spec.proto, Proto::Phoenix | Proto::Nchan),
                pres: spec.layout.presence_role(id),
                tls: None,
            });
        }
        let host = spec.addr.to_string();
        let tls = match &spec.tls_ca {
            Some(ca) => Some(tls::client_config(ca).map_err(io::Error::other)?),
            None => None,
        };
        let seed = sys::now_ns() ^ ((spec.index as u64 + 1) << 40) | 1;
        Ok(Worker {
            tls,
            host,
            ep,
            conns,
            scratch: vec![0u8; SCRATCH],
            out: Vec::with_capacity(256 << 10),
            body: Vec::with_capacity(4096),
            rng: seed,
            next_start: 0,
            inflight: 0,
            joined: 0,
            failed: 0,
            connect_hist: new_hist(),
            upgrade_hist: new_hist(),
            connect_t0: 0,
            connected_sent: false,
            errors: Vec::new(),
            phase: 0,
            active: false,
            phase_cpu0: 0,
            hist: new_hist(),
            delivered: 0,
            uniq: 0,
            dup: 0,
            reordered: 0,
            late: 0,
            other: 0,
            closed: 0,
            published: 0,
            window_stalls: 0,
            tick_lat_max: 0,
            tick_lat_sum: 0,
            tick_lat_n: 0,
            pubs: Vec::new(),
            heap: BinaryHeap::new(),
            pub_done_sent: true,
            phase_window: 1,
            phase_payload: 100,
            stdin_buf: Vec::new(),
            quit: false,
            pres: None,
            spec,
        })
    }

    fn rand(&mut self) -> u64 {
        // xorshift64*
        let mut x = self.rng;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.rng = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn note_error(&mut self, e: String) {
        if self.errors.len() < 8 {
            self.errors.push(e);
        }
    }

    fn run(&mut self) {
        let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 1024];
        self.connect_t0 = sys::now_ns();
        let tick_ns = self.spec.tick_ms.max(10) * 1_000_000;
        let mut next_tick = self.connect_t0 + tick_ns;
        let mut next_housekeeping = self.connect_t0 + 100_000_000;
        self.start_connects(self.connect_t0);
        while !self.quit {
            let now = sys::now_ns();
            let mut deadline = next_tick.min(next_housekeeping);
            if let Some(Reverse((due, _))) = self.heap.peek() {
                deadline = deadline.min(*due);
            }
            if let Some(due) = self.presence_next_due() {
                deadline = deadline.min(due);
            }
            let busy = self.unlimited_can_send();
            let timeout = if busy { 0 } else { deadline.saturating_sub(now) };
            let n = self.ep.wait_ns(&mut events, Some(timeout));
            for ev in &events[..n] {
                let token = ev.u64;
                let flags = ev.events;
                if token == STDIN_TOKEN {
                    self.read_stdin();
                } else {
                    self.on_event(token as usize, flags);
                }
            }
            let now = sys::now_ns();
            if self.active {
                self.publish_scheduled(now);
                self.publish_unlimited(now);
                self.check_pub_done();
            }
            if self.pres.is_some() {
                self.presence_due(now);
            }
            if now >= next_housekeeping {
                self.housekeeping(now);
                next_housekeeping = now + 100_000_000;
            }
            if now >= next_tick {
                if self.connected_sent {
                    self.emit_tick();
                }
                next_tick = now + tick_ns;
            }
        }
        for c in &mut self.conns {
            if c.fd >= 0 {
                sys::close_abortive(c.fd);
                c.fd = -1;
            }
        }
    }

    // ---------------------------------------------------------------- connection set-up

    fn start_connects(&mut self, now: u64) {
        let conc = self.spec.connect_concurrency.max(1);
        while self.inflight < conc && self.next_start < self.conns.len() {
            let ci = self.next_start;
            self.next_start += 1;
            if self.conns[ci].state != St::Pending {
                continue;
            }
            let id = self.conns[ci].id as usize;
            let src = if self.spec.src_addrs.is_empty() {
                None
            } else {
                Some(self.spec.src_addrs[id % self.spec.src_addrs.len()])
            };
            match sys::connect_nonblocking(src, self.spec.addr) {
                Ok(fd) => {
                    let session = match &self.tls {
                        Some(cfg) => match tls::session(cfg, *self.spec.addr.ip()) {
                            Ok(s) => Some(s),
                            Err(e) => {
                                self.note_error(format!("tls session: {e}"));
                                None
                            }
                        },
                        None => None,
                    };
                    let c = &mut self.conns[ci];
                    c.tls = session;
                    c.fd = fd;
                    c.state = St::Connecting;
                    c.t0 = now;
                    c.want_out = true;
                    if c.rest || c.publ && !c.sub {
                        // Publishers keep little unsent data in the kernel, so that "as fast as
                        // the server takes them" does not mean megabytes queued in our socket.
                        sys::set_sndbuf(fd, 64 << 10);
                    }
                    // Edge-triggered: every readable event is read until the socket is empty (a short recv).
                    let ev = (libc::EPOLLIN | libc::EPOLLOUT | libc::EPOLLRDHUP | libc::EPOLLET) as u32;
                    if let Err(e) = self.ep.add(fd, ev, ci as u64) {
                        self.note_error(format!("epoll add: {e}"));
                    }
                    self.inflight += 1;
                }
                Err(e) => {
                    self.failed += 1;
                    self.note_error(format!("connect: {e}"));
                }
            }
        }
        self.maybe_connected(now);
    }

    fn reconnect(&mut self) {
        for c in &mut self.conns {
            if c.state == St::Closed {
                c.state = St::Pending;
                c.step = 0;
                c.want_out = false;
                c.rbuf.clear();
                c.wbuf.clear();
                c.wpos = 0;
                c.frag.clear();
                c.stream.clear();
                c.tracks.clear();
                c.next_hb = u64::MAX;
            }
        }
        self.next_start = 0;
        self.joined = 0;
        self.failed = 0;
        self.connect_hist.reset();
        self.upgrade_hist.reset();
        self.connected_sent = false;
        let now = sys::now_ns();
        self.connect_t0 = now;
        self.start_connects(now);
    }

    fn maybe_connected(&mut self, now: u64) {
        if self.connected_sent || self.next_start < self.conns.len() || self.inflight > 0 {
            return;
        }
        self.connected_sent = true;
        emit(&Ev::Connected {
            ok: self.joined,
            failed: self.failed,
            secs: (now - self.connect_t0) as f64 / 1e9,
            hist: hist_pairs(&self.connect_hist),
            upgrade_hist: hist_pairs(&self.upgrade_hist),
            errors: std::mem::take(&mut self.errors),
        });
    }

    fn joined(&mut self, ci: usize, now: u64) {
        let c = &mut self.conns[ci];
        if c.state == St::Joined {
            return;
        }
        c.state = St::Joined;
        let hb = self.spec.heartbeat_ms;
        c.next_hb = if hb > 0 { now + hb * 1_000_000 } else { u64::MAX };
        let us = ((now - c.t0) / 1000).max(1);
        let _ = self.connect_hist.record(us.min(3_600_000_000));
        self.joined += 1;
        self.inflight -= 1;
        self.start_connects(now);
    }

    /// Closes connection `ci`'s socket at once (RST) and marks it closed, its output dropped.
    fn drop_socket(&mut self, ci: usize) {
        let c = &mut self.conns[ci];
        if c.fd >= 0 {
            self.ep.delete(c.fd);
            sys::close_abortive(c.fd);
            c.fd = -1;
        }
        c.state = St::Closed;
        c.wbuf.clear();
        c.wpos = 0;
        c.tls = None;
    }

    fn fail(&mut self, ci: usize, why: &str) {
        let c = &mut self.conns[ci];
        if c.state == St::Closed || c.state == St::Pending {
            return;
        }
        let was = c.state;
        self.drop_socket(ci);
        let c = &mut self.conns[ci];
        c.rest_inflight = 0;
        let id = c.id;
        let pi = c.pub_idx;
        if pi != u32::MAX && (pi as usize) < self.pubs.len() {
            // A publisher that lost its connection sends nothing more in this phase.
            let p = &mut self.pubs[pi as usize];
            if !p.unlimited {
                p.skipped += p.total.saturating_sub(p.intended);
                p.intended = p.total;
            }
            p.done = true;
        }
        if was == St::Joined {
            self.closed += 1;
            self.note_error(format!("client {id} closed: {why}"));
        } else {
            self.failed += 1;
            self.inflight -= 1;
            self.note_error(format!("client {id} failed while {was:?}: {why}"));
            let now = sys::now_ns();
            self.start_connects(now);
        }
    }

    fn housekeeping(&mut self, now: u64) {
        let timeout = self.spec.connect_timeout_ms * 1_000_000;
        let mut hb_frame = Vec::new();
        if self.spec.proto == Proto::Phoenix {
            wire::push_client_frame(&mut hb_frame, wire::OP_TEXT, wire::PHOENIX_HEARTBEAT, [0x11, 0x22, 0x33, 0x44]);
        }
        for ci in 0..self.conns.len() {
            let st = self.conns[ci].state;
            match st {
                St::Connecting | St::Upgrading | St::Joining if now - self.conns[ci].t0 > timeout => {
                    self.fail(ci, "connect/join timeout");
                }
                St::Joined => {
                    let c = &mut self.conns[ci];
                    if c.next_hb <= now && !c.rest && !c.sse && !hb_frame.is_empty() {
                        c.next_hb = now + self.spec.heartbeat_ms * 1_000_000;
                        if let Err(e) = queue_send(&self.ep, ci, c, &hb_frame) {
                            self.fail(ci, &format!("heartbeat send: {e}"));
                        }
                    }
                }
                _ => {}
            }
        }
        // Window stalls: a lost message would hold an unlimited publisher forever.
        for p in &mut self.pubs {
            if p.unlimited && !p.ring.is_empty() && !p.done && p.seq > p.wm {
                let window = p.ring.len() as u64 / 2;
                if p.seq - p.wm >= window && now - p.wm_changed > 1_000_000_000 {
                    let r = p.ring.len();
                    p.ring[(p.wm as usize) & (r - 1)] = 0;
                    p.wm += 1;
                    p.wm_changed = now;
                    self.window_stalls += 1;
                }
            }
        }
    }

    // ---------------------------------------------------------------- control channel

    fn read_stdin(&mut self) {
        let mut buf = [0u8; 65536];
        loop {
            match sys::read_fd(0, &mut buf) {
                Ok(0) => {
                    // The coordinator is gone.
                    self.quit = true;
                    return;
                }
                Ok(n) => self.stdin_buf.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => {
                    self.quit = true;
                    return;
                }
            }
        }
        while let Some(nl) = memchr::memchr(b'\n', &self.stdin_buf) {
            let line: Vec<u8> = self.stdin_buf.drain(..=nl).collect();
            match serde_json::from_slice::<Cmd>(&line) {
                Ok(Cmd::Phase(p)) => self.start_phase(p),
                Ok(Cmd::End { sent }) => self.end_phase(&sent),
                Ok(Cmd::Quit) => self.quit = true,
                Ok(Cmd::Reconnect) => self.reconnect(),
                Ok(Cmd::PresenceStep(p)) => self.presence_start(p),
                Ok(Cmd::PresenceEnd { step }) => self.presence_end(step),
                Err(e) => emit(&Ev::Fatal { msg: format!("bad command: {e}") }),
            }
        }
    }

    fn start_phase(&mut self, p: PhaseSpec) {
        let now = sys::now_ns();
        self.phase = p.phase;
        self.active = true;
        self.phase_cpu0 = sys::process_cpu_ns();
        self.hist.reset();
        self.delivered = 0;
        self.uniq = 0;
        self.dup = 0;
        self.reordered = 0;
        self.late = 0;
        self.other = 0;
        self.published = 0;
        self.window_stalls = 0;
        self.closed = 0;
        self.pubs.clear();
        self.heap.clear();
        let mut local_subs: HashMap<u32, u32> = HashMap::new();
        for c in &mut self.conns {
            c.tracks.clear();
            c.uniq = 0;
            c.pub_idx = u32::MAX;
            c.in_phase = c.state == St::Joined;
            if c.in_phase && c.sub {
                *local_subs.entry(c.topic).or_default() += 1;
            }
        }
        let end = now + (p.seconds * 1e9) as u64;
        for ci in 0..self.conns.len() {
            let (publ, state, topic) = {
                let c = &self.conns[ci];
                (c.publ, c.state, c.topic)
            };
            if !(publ && state == St::Joined) {
                continue;
            }
            let unlimited = p.rate.is_none();
            let rate = p.rate.unwrap_or(0.0).max(1e-9);
            let interval = 1e9 / rate;
            let offset = if p.jitter && !unlimited { self.rand() % (interval as u64).max(1) } else { 0 };
            let total = if unlimited {
                u64::MAX
            } else {
                let span = p.seconds * 1e9 - offset as f64;
                if span <= 0.0 {
                    0
                } else {
                    (span / interval).ceil() as u64
                }
            };
            let ls = *local_subs.get(&topic).unwrap_or(&0);
            let (ring, wm_local) = if unlimited && ls > 0 {
                let size = (p.window.max(1) * 2).next_power_of_two().max(1024) as usize;
                (vec![0u32; size], ls)
            } else {
                (Vec::new(), 0)
            };
            let pi = self.pubs.len();
            self.pubs.push(Pub {
                conn: ci,
                topic,
                seq: 0,
                start: now,
                end,
                offset,
                interval,
                intended: 0,
                total,
                skipped: 0,
                unlimited,
                done: total == 0,
                wm: 0,
                ring,
                local_subs: wm_local,
                wm_changed: now,
            });
            self.conns[ci].pub_idx = pi as u32;
            if !unlimited && total > 0 {
                self.heap.push(Reverse((now + offset, pi as u32)));
            }
        }
        self.pub_done_sent = false;
        self.phase_window = p.window.max(1);
        self.phase_payload = p.payload;
        self.check_pub_done();
    }

    fn check_pub_done(&mut self) {
        if self.pub_done_sent {
            return;
        }
        let now = sys::now_ns();
        let mut all = true;
        for p in &mut self.pubs {
            if !p.done {
                let finished =
                    if p.unlimited { now >= p.end } else { p.intended >= p.total && p.seq + p.skipped >= p.total };
                if finished {
                    p.done = true;
                } else {
                    all = false;
                }
            }
        }
        if !all {
            return;
        }
        // REST publishers are done only when their last response came back.
        if self.pubs.iter().any(|p| self.conns[p.conn].rest_inflight > 0) {
            return;
        }
        self.pub_done_sent = true;
        let sent: Vec<(u64, u64)> = self.pubs.iter().map(|p| (self.conns[p.conn].id, p.seq)).collect();
        let shortfall = self.pubs.iter().map(|p| p.skipped).sum();
        emit(&Ev::PubDone { phase: self.phase, sent, shortfall });
    }

    fn end_phase(&mut self, sent: &[(u64, u64)]) {
        let layout = &self.spec.layout;
        let mut per_topic: HashMap<u32, u64> = HashMap::new();
        let mut own: HashMap<u64, u64> = HashMap::new();
        for &(p, n) in sent {
            if let Some(t) = layout.publisher_topic(p) {
                *per_topic.entry(t).or_default() += n;
                own.insert(p, n);
            }
        }
        let mut r = PhaseResult { phase: self.phase, ..Default::default() };
        for c in &self.conns {
            if !(c.sub && c.in_phase) {
                continue;
            }
            r.subs += 1;
            let mut expected = *per_topic.get(&c.topic).unwrap_or(&0);
            if c.publ {
                expected = expected.saturating_sub(*own.get(&c.id).unwrap_or(&0));
            }
            if std::env::var_os("LOADTEST_DEBUG").is_some() {
                for t in &c.tracks {
                    let pc = t.publisher % PHASE_STRIDE;
                    let sent_p = own.get(&pc).copied().unwrap_or(0);
                    if t.next > sent_p {
                        eprintln!(
                            "debug: sub {} saw publisher {} seq {} but it reported {} sent",
                            c.id,
                            t.publisher,
                            t.next - 1,
                            sent_p
                        );
                    }
                }
            }
            let lost = expected.saturating_sub(c.uniq);
            if lost > 0 {
                r.lost += lost;
                r.subs_with_loss += 1;
                r.max_lost_per_sub = r.max_lost_per_sub.max(lost);
            }
        }
        self.active = false;
        r.delivered = self.delivered;
        r.uniq = self.uniq;
        r.dup = self.dup;
        r.reordered = self.reordered;
        r.late = self.late;
        r.other = self.other;
        r.closed = self.closed;
        r.hist = hist_pairs(&self.hist);
        r.cpu_ns = sys::process_cpu_ns() - self.phase_cpu0;
        r.window_stalls = self.window_stalls;
        r.errors = std::mem::take(&mut self.errors);
        self.pubs.clear();
        self.heap.clear();
        for c in &mut self.conns {
            c.pub_idx = u32::MAX;
        }
        emit(&Ev::Result(r));
    }

    fn emit_tick(&mut self) {
        emit(&Ev::Tick {
            phase: self.phase,
            delivered: self.delivered,
            uniq: self.uniq,
            published: self.published,
            lat_max_us: self.tick_lat_max,
            lat_sum_us: self.tick_lat_sum,
            lat_n: self.tick_lat_n,
            closed: self.closed,
        });
        self.tick_lat_max = 0;
        self.tick_lat_sum = 0;
        self.tick_lat_n = 0;
    }
}

/// Send `data` on `c` now, queueing what the socket does not take (and asking epoll for
/// writability). Errors other than "would block" are returned.
fn queue_send(ep: &Epoll, ci: usize, c: &mut Conn, data: &[u8]) -> io::Result<()> {
    if c.fd < 0 {
        return Ok(());
    }
    if let Some(t) = c.tls.as_mut() {
        if !tls::send(t, c.fd, data)? && !c.want_out {
            c.want_out = true;
            let _ =
                ep.modify(c.fd, (libc::EPOLLIN | libc::EPOLLOUT | libc::EPOLLRDHUP | libc::EPOLLET) as u32, ci as u64);
        }
        return Ok(());
    }
    if c.wbuf.len() > c.wpos {
        c.wbuf.extend_from_slice(data);
        return Ok(());
    }
    c.wbuf.clear();
    c.wpos = 0;
    let n = match sys::send(c.fd, data) {
        Ok(n) => n,
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
        Err(e) if e.kind() == io::ErrorKind::Interrupted => 0,
        Err(e) => return Err(e),
    };
    if n < data.len() {
        c.wbuf.extend_from_slice(&data[n..]);
        if !c.want_out {
            c.want_out = true;
            let _ =
                ep.modify(c.fd, (libc::EPOLLIN | libc::EPOLLOUT | libc::EPOLLRDHUP | libc::EPOLLET) as u32, ci as u64);
        }
    }
    Ok(())
}

impl Worker {
    fn on_event(&mut self, ci: usize, flags: u32) {
        if ci >= self.conns.len() {
            return;
        }
        let st = self.conns[ci].state;
        match st {
            St::Pending | St::Closed => {}
            St::Connecting => {
                let err = sys::so_error(self.conns[ci].fd);
                if err != 0 {
                    self.fail(ci, &io::Error::from_raw_os_error(err).to_string());
                } else if flags & (libc::EPOLLOUT as u32) != 0 {
                    self.on_connected(ci);
                } else if flags & ((libc::EPOLLERR | libc::EPOLLHUP) as u32) != 0 {
                    self.fail(ci, "connect failed");
                }
            }
            _ => {
                if flags & (libc::EPOLLOUT as u32) != 0 {
                    self.flush(ci);
                }
                if flags & ((libc::EPOLLIN | libc::EPOLLRDHUP | libc::EPOLLHUP | libc::EPOLLERR) as u32) != 0 {
                    self.on_readable(ci);
                }
            }
        }
    }

    fn on_connected(&mut self, ci: usize) {
        let now = sys::now_ns();
        if self.conns[ci].rest {
            self.set_out(ci, false);
            // A REST publisher is an HTTP keep-alive connection: ready once connected.
            self.conns[ci].state = St::Joining;
            self.joined(ci, now);
            return;
        }
        let req = if self.conns[ci].sse {
            wire::sse_request(self.spec.proto, self.conns[ci].topic, &self.host)
        } else {
            let c = &self.conns[ci];
            wire::client_upgrade_request(self.spec.proto, c.topic, &self.host, c.sub, c.publ)
        };
        let c = &mut self.conns[ci];
        c.state = St::Upgrading;
        self.set_out(ci, false);
        let c = &mut self.conns[ci];
        if let Err(e) = queue_send(&self.ep, ci, c, &req) {
            self.fail(ci, &format!("send upgrade: {e}"));
        }
    }

    fn set_out(&mut self, ci: usize, on: bool) {
        let c = &mut self.conns[ci];
        if c.want_out != on && c.fd >= 0 {
            c.want_out = on;
            let mut ev = (libc::EPOLLIN | libc::EPOLLRDHUP | libc::EPOLLET) as u32;
            if on {
                ev |= libc::EPOLLOUT as u32;
            }
            let _ = self.ep.modify(c.fd, ev, ci as u64);
        }
    }

    fn flush(&mut self, ci: usize) {
        let c = &mut self.conns[ci];
        if let Some(t) = c.tls.as_mut() {
            match tls::flush(t, c.fd) {
                Ok(true) => self.set_out(ci, false),
                Ok(false) => self.set_out(ci, true),
                Err(e) => self.fail(ci, &format!("send: {e}")),
            }
            return;
        }
        while c.wpos < c.wbuf.len() {
            match sys::send(c.fd, &c.wbuf[c.wpos..]) {
                Ok(n) => c.wpos += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    self.fail(ci, &format!("send: {e}"));
                    return;
                }
            }
        }
        c.wbuf.clear();
        c.wpos = 0;
        self.set_out(ci, false);
    }

    fn send_ctl(&mut self, ci: usize, opcode: u8, payload: &[u8]) {
        let mask = (self.rand() as u32).to_ne_bytes();
        let mut f = Vec::with_capacity(payload.len() + 14);
        wire::push_client_frame(&mut f, opcode, payload, mask);
        let c = &mut self.conns[ci];
        if let Err(e) = queue_send(&self.ep, ci, c, &f) {
            self.fail(ci, &format!("send: {e}"));
        }
    }

    fn on_readable(&mut self, ci: usize) {
        let mut scratch = std::mem::take(&mut self.scratch);
        let mut off = 0;
        {
            let c = &mut self.conns[ci];
            if !c.rbuf.is_empty() {
                if c.rbuf.len() * 2 > scratch.len() {
                    scratch.resize(c.rbuf.len() * 2, 0);
                }
                scratch[..c.rbuf.len()].copy_from_slice(&c.rbuf);
                off = c.rbuf.len();
                c.rbuf.clear();
            }
        }
        loop {
            let fd = self.conns[ci].fd;
            if fd < 0 {
                break;
            }
            let tls = self.conns[ci].tls.is_some();
            let got = match self.conns[ci].tls.as_mut() {
                Some(t) => tls::recv(t, fd, &mut scratch[off..]),
                None => sys::recv(fd, &mut scratch[off..]),
            };
            match got {
                Ok(0) => {
                    self.fail(ci, "closed by server");
                    break;
                }
                Ok(n) => {
                    let total = off + n;
                    // A short TLS read does not mean the socket is drained: read on until
                    // WouldBlock (edge-triggered epoll gives no second event).
                    let full = total == scratch.len() || tls;
                    let now = sys::now_ns();
                    let used = self.process(ci, &scratch[..total], now);
                    if self.conns[ci].state == St::Closed {
                        break;
                    }
                    if !full {
                        self.conns[ci].rbuf.extend_from_slice(&scratch[used..total]);
                        break;
                    }
                    scratch.copy_within(used..total, 0);
                    off = total - used;
                    if off * 2 > scratch.len() {
                        // A frame larger than half the buffer: make room for it.
                        scratch.resize(scratch.len() * 2, 0);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if off > 0 {
                        self.conns[ci].rbuf.extend_from_slice(&scratch[..off]);
                    }
                    break;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    self.fail(ci, &format!("recv: {e}"));
                    break;
                }
            }
        }
        self.scratch = scratch;
        // Handshake records the socket did not take yet.
        if self.conns[ci].tls.as_ref().is_some_and(|t| t.wants_write()) {
            self.flush(ci);
        }
    }

    /// Consume what can be consumed of `data` (bytes received on `ci`); returns the count.
    fn process(&mut self, ci: usize, data: &[u8], now: u64) -> usize {
        let mut pos = 0;
        if self.conns[ci].state == St::Upgrading {
            let Some(end) = memchr::memmem::find(data, b"\r\n\r\n") else {
                if data.len() > 16 << 10 {
                    self.fail(ci, "oversized upgrade response");
                }
                return 0;
            };
            if self.conns[ci].sse {
                if !data.starts_with(b"HTTP/1.1 200") {
                    let line = String::from_utf8_lossy(&data[..data.len().min(300)]).into_owned();
                    self.fail(ci, &format!("SSE request refused: {line}"));
                    return data.len();
                }
                // The stream is registered when its head goes out: the subscriber has joined.
                self.conns[ci].state = St::Joining;
                self.joined(ci, now);
                return end + 4 + self.process_sse(ci, &data[end + 4..], now);
            }
            if !(data.starts_with(b"HTTP/1.1 101") || data.starts_with(b"HTTP/1.0 101")) {
                let line = String::from_utf8_lossy(&data[..end.min(200)]).into_owned();
                self.fail(ci, &format!("upgrade refused: {line}"));
                return data.len();
            }
            pos = end + 4;
            self.conns[ci].state = St::Joining;
            let us = ((now - self.conns[ci].t0) / 1000).max(1);
            let _ = self.upgrade_hist.record(us.min(3_600_000_000));
            self.after_upgrade(ci, now);
            if self.conns[ci].state == St::Closed {
                return data.len();
            }
        }
        if self.conns[ci].rest {
            return self.process_http(ci, data, now);
        }
        if self.conns[ci].sse {
            return self.process_sse(ci, data, now);
        }
        while let Some(h) = wire::parse_frame_head(&data[pos..]) {
            let end = pos + h.header_len + h.payload_len;
            if end > data.len() {
                break;
            }
            let start = pos + h.header_len;
            pos = end;
            let unmasked;
            let payload: &[u8] = match h.mask {
                None => &data[start..end],
                Some(m) => {
                    let mut v = data[start..end].to_vec();
                    wire::apply_mask(&mut v, m);
                    unmasked = v;
                    &unmasked
                }
            };
            match h.opcode {
                wire::OP_TEXT | wire::OP_BINARY => {
                    if h.fin {
                        self.on_message(ci, payload, now);
                    } else {
                        let c = &mut self.conns[ci];
                        c.frag.clear();
                        c.frag.extend_from_slice(payload);
                        c.frag_op = h.opcode;
                    }
                }
                wire::OP_CONT => {
                    self.conns[ci].frag.extend_from_slice(payload);
                    if h.fin {
                        let m = std::mem::take(&mut self.conns[ci].frag);
                        self.on_message(ci, &m, now);
                        let c = &mut self.conns[ci];
                        c.frag = m;
                        c.frag.clear();
                    }
                }
                wire::OP_PING => {
                    let p = payload.to_vec();
                    self.send_ctl(ci, wire::OP_PONG, &p);
                }
                wire::OP_PONG => {}
                wire::OP_CLOSE => {
                    let why = if payload.len() >= 2 {
                        format!(
                            "close frame {} {}",
                            u16::from_be_bytes([payload[0], payload[1]]),
                            String::from_utf8_lossy(&payload[2..])
                        )
                    } else {
                        "close frame".to_string()
                    };
                    self.fail(ci, &why);
                    return data.len();
                }
                op => {
                    self.fail(ci, &format!("unknown opcode {op}"));
                    return data.len();
                }
            }
            if self.conns[ci].state == St::Closed {
                return data.len();
            }
        }
        pos
    }

    fn process_http(&mut self, ci: usize, data: &[u8], now: u64) -> usize {
        let mut pos = 0;
        while let Some((status, hl, cl)) = wire::parse_http_response(&data[pos..]) {
            if pos + hl + cl > data.len() {
                break;
            }
            if status != 202 && status != 200 {
                let body = String::from_utf8_lossy(&data[pos + hl..pos + hl + cl]).into_owned();
                self.note_error(format!("REST publish answered {status}: {body}"));
            }
            pos += hl + cl;
            let c = &mut self.conns[ci];
            c.rest_inflight = c.rest_inflight.saturating_sub(1);
            let pi = c.pub_idx;
            if pi != u32::MAX && self.active && !self.pubs[pi as usize].unlimited {
                self.rest_pump(pi as usize, now);
            }
        }
        pos
    }

    /// An SSE stream's body: every `data:` line is a message (a partial line stays unconsumed).
    fn process_sse(&mut self, ci: usize, data: &[u8], now: u64) -> usize {
        wire::sse_data_lines(data, |d| self.on_data(ci, d, now))
    }

    fn after_upgrade(&mut self, ci: usize, now: u64) {
        if self.spec.upgrade_only {
            self.joined(ci, now);
            return;
        }
        match self.spec.proto {
            Proto::Phoenix if self.conns[ci].pres != PresRole::None => {
                let id = self.conns[ci].id as usize;
                let key = self.spec.layout.presence_key(id);
                let j = wire::phoenix_join_presence(self.conns[ci].topic, &key, self.spec.layout.presence_listens(id));
                self.send_ctl(ci, wire::OP_TEXT, &j);
            }
            Proto::Phoenix => {
                let j = wire::phoenix_join(self.conns[ci].topic);
                self.send_ctl(ci, wire::OP_TEXT, &j);
            }
            // nchan subscribes with the upgrade itself and sends nothing after it.
            Proto::Raw | Proto::Nchan => self.joined(ci, now),
            // ws: wait for "joined"; socket.io: wait for the open packet; NATS: wait for INFO.
            Proto::Ws | Proto::Socketio | Proto::Nats => {}
        }
    }

    fn on_message(&mut self, ci: usize, m: &[u8], now: u64) {
        if self.spec.upgrade_only {
            // Nothing is answered: NATS' INFO and Socket.IO's open packet would start a join.
            self.other += 1;
            return;
        }
        match self.spec.proto {
            Proto::Phoenix => {
                if self.conns[ci].pres != PresRole::None && self.on_presence_message(ci, m, now) {
                    return;
                }
                if m.starts_with(b"[null,null,") {
                    self.on_data(ci, m, now);
                } else if self.conns[ci].state == St::Joining {
                    if memchr::memmem::find(m, b"phx_reply").is_some() {
                        if memchr::memmem::find(m, b"\"status\":\"ok\"").is_some() {
                            self.joined(ci, now);
                        } else {
                            let s = String::from_utf8_lossy(&m[..m.len().min(300)]).into_owned();
                            self.fail(ci, &format!("join refused: {s}"));
                        }
                    }
                } else if memchr::memmem::find(m, b"\"status\":\"error\"").is_some() {
                    let s = String::from_utf8_lossy(&m[..m.len().min(300)]).into_owned();
                    self.note_error(format!("server error reply: {s}"));
                }
            }
            Proto::Ws => {
                if m == b"joined" {
                    if self.conns[ci].state == St::Joining {
                        self.joined(ci, now);
                    }
                } else {
                    self.on_data(ci, m, now);
                }
            }
            Proto::Socketio => match m.first() {
                Some(b'2') => self.send_ctl(ci, wire::OP_TEXT, b"3"),
                Some(b'0') => self.send_ctl(ci, wire::OP_TEXT, b"40"),
                Some(b'4') => {
                    if m.starts_with(b"42[\"m\"") {
                        self.on_data(ci, m, now);
                    } else if m.starts_with(b"42[\"joined\"") {
                        self.joined(ci, now);
                    } else if m.starts_with(b"40") {
                        if self.conns[ci].step == 0 {
                            self.conns[ci].step = 1;
                            let j = format!("42[\"join\",\"t{}\"]", self.conns[ci].topic);
                            self.send_ctl(ci, wire::OP_TEXT, j.as_bytes());
                        }
                    } else if m.starts_with(b"41") || m.starts_with(b"44") {
                        let s = String::from_utf8_lossy(m).into_owned();
                        self.fail(ci, &format!("socket.io: {s}"));
                    } else {
                        self.other += 1;
                    }
                }
                Some(b'1') => self.fail(ci, "engine.io close"),
                _ => self.other += 1,
            },
            Proto::Nats => self.on_nats_bytes(ci, m, now),
            Proto::Nchan => {
                // A `/ps/` client (chat) gets its own messages back (nchan has no "no echo"):
                // not a delivery.
                let c = &self.conns[ci];
                if c.sub && c.publ && wire::scan_fields(m).is_some_and(|f| f.publisher % PHASE_STRIDE == c.id) {
                    self.other += 1;
                } else {
                    self.on_data(ci, m, now);
                }
            }
            Proto::Raw => self.on_data(ci, m, now),
        }
    }

    fn on_nats_bytes(&mut self, ci: usize, b: &[u8], now: u64) {
        if self.conns[ci].stream.is_empty() {
            let used = self.nats_parse(ci, b, now);
            if self.conns[ci].state != St::Closed && used < b.len() {
                self.conns[ci].stream.extend_from_slice(&b[used..]);
            }
        } else {
            let mut s = std::mem::take(&mut self.conns[ci].stream);
            s.extend_from_slice(b);
            let used = self.nats_parse(ci, &s, now);
            s.drain(..used);
            self.conns[ci].stream = s;
        }
    }

    /// Parse NATS protocol lines; returns bytes consumed (a partial message stays).
    fn nats_parse(&mut self, ci: usize, b: &[u8], now: u64) -> usize {
        let mut pos = 0;
        while let Some(nl) = memchr::memchr(b'\n', &b[pos..]) {
            let line_end = pos + nl + 1;
            let line = &b[pos..pos + nl];
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            if line.starts_with(b"MSG ") {
                // MSG <subject> <sid> [reply-to] <#bytes>
                let n: usize = line
                    .rsplit(|&c| c == b' ')
                    .next()
                    .and_then(|t| std::str::from_utf8(t).ok())
                    .and_then(|t| t.parse().ok())
                    .unwrap_or(0);
                if line_end + n + 2 > b.len() {
                    break;
                }
                self.on_data(ci, &b[line_end..line_end + n], now);
                pos = line_end + n + 2;
            } else {
                pos = line_end;
                if line == b"PING" {
                    self.send_ctl(ci, wire::OP_BINARY, b"PONG\r\n");
                } else if line == b"PONG" {
                    if self.conns[ci].state == St::Joining {
                        self.joined(ci, now);
                    }
                } else if line.starts_with(b"INFO") {
                    if self.conns[ci].step == 0 {
                        self.conns[ci].step = 1;
                        let mut m = wire::NATS_CONNECT.to_vec();
                        if self.conns[ci].sub {
                            m.extend_from_slice(format!("SUB t{} 1\r\n", self.conns[ci].topic).as_bytes());
                        }
                        m.extend_from_slice(b"PING\r\n");
                        self.send_ctl(ci, wire::OP_BINARY, &m);
                    }
                } else if line.starts_with(b"-ERR") {
                    let s = String::from_utf8_lossy(line).into_owned();
                    self.note_error(format!("nats: {s}"));
                }
            }
            if self.conns[ci].state == St::Closed {
                return b.len();
            }
        }
        pos
    }

    /// A message that should carry measurement fields.
    #[inline]
    fn on_data(&mut self, ci: usize, m: &[u8], now: u64) {
        if !self.conns[ci].sub {
            // A publish-only client that had to join the room to publish (Phoenix, ws,
            // Socket.IO) also receives the other publishers' messages: not a subscriber.
            self.other += 1;
            return;
        }
        let Some(f) = wire::scan_fields(m) else {
            self.other += 1;
            return;
        };
        if !self.active || f.publisher / PHASE_STRIDE != self.phase as u64 {
            self.late += 1;
            return;
        }
        let lat = (now.saturating_sub(f.t_ns) / 1000).max(1);
        self.delivered += 1;
        let _ = self.hist.record(lat.min(3_600_000_000));
        self.tick_lat_n += 1;
        self.tick_lat_sum += lat;
        if lat > self.tick_lat_max {
            self.tick_lat_max = lat;
        }
        let c = &mut self.conns[ci];
        let fresh = track(&mut c.tracks, f.publisher, f.seq, &mut self.dup, &mut self.reordered);
        if !fresh {
            return;
        }
        c.uniq += 1;
        self.uniq += 1;
        // In-flight window of a local unlimited publisher.
        let pc = (f.publisher % PHASE_STRIDE) as usize;
        if pc >= self.spec.first && pc < self.spec.last {
            let pi = self.conns[pc - self.spec.first].pub_idx;
            if pi != u32::MAX {
                let p = &mut self.pubs[pi as usize];
                let r = p.ring.len() as u64;
                if r > 0 && f.seq >= p.wm && f.seq < p.wm + r {
                    let mask = (r - 1) as usize;
                    p.ring[f.seq as usize & mask] += 1;
                    while p.wm < p.seq && p.ring[p.wm as usize & mask] >= p.local_subs {
                        p.ring[p.wm as usize & mask] = 0;
                        p.wm += 1;
                        p.wm_changed = now;
                    }
                }
            }
        }
    }

    // ---------------------------------------------------------------- publishing

    fn unlimited_can_send(&self) -> bool {
        if !self.active {
            return false;
        }
        self.pubs.iter().any(|p| {
            if !p.unlimited || p.done {
                return false;
            }
            let c = &self.conns[p.conn];
            if c.wbuf.len() > c.wpos || c.rest_inflight > 0 {
                return false;
            }
            p.ring.is_empty() || p.seq - p.wm < self.phase_window
        })
    }

    fn build_messages(&mut self, pi: usize, count: u64, t_of: impl Fn(u64) -> u64) {
        let proto = self.spec.proto;
        let op = wire::publish_opcode(proto);
        let size = self.phase_payload;
        let (ci, topic) = (self.pubs[pi].conn, self.pubs[pi].topic);
        let pid = self.phase as u64 * PHASE_STRIDE + self.conns[ci].id;
        for _ in 0..count {
            let seq = self.pubs[pi].seq;
            let t = t_of(seq);
            let mask = (self.rand() as u32).to_ne_bytes();
            self.body.clear();
            wire::push_publish_body(&mut self.body, proto, topic, seq, t, pid, size);
            wire::push_client_frame(&mut self.out, op, &self.body, mask);
            self.pubs[pi].seq += 1;
        }
        self.published += count;
    }

    fn send_out(&mut self, ci: usize) {
        let out = std::mem::take(&mut self.out);
        let c = &mut self.conns[ci];
        let r = queue_send(&self.ep, ci, c, &out);
        self.out = out;
        self.out.clear();
        if let Err(e) = r {
            self.fail(ci, &format!("publish send: {e}"));
        }
    }

    fn publish_scheduled(&mut self, now: u64) {
        while let Some(&Reverse((due, pi))) = self.heap.peek() {
            if due > now {
                break;
            }
            self.heap.pop();
            let pi = pi as usize;
            let (ci, start, offset, interval, total) = {
                let p = &self.pubs[pi];
                (p.conn, p.start, p.offset, p.interval, p.total)
            };
            if self.conns[ci].state != St::Joined {
                let p = &mut self.pubs[pi];
                p.skipped += total - p.intended;
                p.intended = total;
                continue;
            }
            let elapsed = now.saturating_sub(start + offset) as f64;
            let k_due = ((elapsed / interval).floor() as u64 + 1).min(total);
            let from = self.pubs[pi].intended;
            if self.conns[ci].rest {
                self.pubs[pi].intended = k_due;
                self.rest_pump(pi, now);
            } else if k_due > from {
                let c = &self.conns[ci];
                if c.wbuf.len() - c.wpos > BACKLOG_LIMIT {
                    self.pubs[pi].skipped += k_due - from;
                } else {
                    // Stamp each message with its scheduled time (no coordinated omission).
                    let base = start + offset;
                    self.build_messages(pi, k_due - from, |seq| base + ((seq as f64) * interval) as u64);
                    self.send_out(ci);
                }
                self.pubs[pi].intended = k_due;
            }
            if k_due < total {
                let next = start + offset + ((k_due as f64) * interval) as u64;
                self.heap.push(Reverse((next.max(now + 1), pi as u32)));
            }
        }
    }

    /// Send the next due REST request of a fixed-rate publisher if none is in flight.
    fn rest_pump(&mut self, pi: usize, _now: u64) {
        let p = &self.pubs[pi];
        let ci = p.conn;
        if self.conns[ci].rest_inflight > 0 || p.seq >= p.intended {
            return;
        }
        let t = p.start + p.offset + ((p.seq as f64) * p.interval) as u64;
        self.rest_request(pi, t);
    }

    fn rest_request(&mut self, pi: usize, t: u64) {
        let ci = self.pubs[pi].conn;
        let pid = self.phase as u64 * PHASE_STRIDE + self.conns[ci].id;
        let seq = self.pubs[pi].seq;
        let topic = self.pubs[pi].topic;
        wire::push_rest_publish(&mut self.out, &self.host, topic, seq, t, pid, self.phase_payload, &mut self.body);
        self.pubs[pi].seq += 1;
        self.published += 1;
        self.conns[ci].rest_inflight += 1;
        self.send_out(ci);
    }

    fn publish_unlimited(&mut self, now: u64) {
        for pi in 0..self.pubs.len() {
            let p = &self.pubs[pi];
            if !p.unlimited || p.done {
                continue;
            }
            if now >= p.end {
                self.pubs[pi].done = true;
                continue;
            }
            let ci = p.conn;
            let c = &self.conns[ci];
            if c.state != St::Joined {
                self.pubs[pi].done = true;
                continue;
            }
            if c.wbuf.len() > c.wpos || c.rest_inflight > 0 {
                continue;
            }
            let room = if p.ring.is_empty() { 64 } else { self.phase_window.saturating_sub(p.seq - p.wm).min(64) };
            if room == 0 {
                continue;
            }
            if c.rest {
                self.rest_request(pi, now);
            } else {
                self.build_messages(pi, room, |_| now);
                self.send_out(ci);
            }
        }
    }
}

/// Record sequence `seq` of `publisher` for one subscriber. Returns true if it is new (not a
/// duplicate); counts duplicates and out-of-order arrivals.
#[inline]
fn track(tracks: &mut Vec<Track>, publisher: u64, seq: u64, dup: &mut u64, reord: &mut u64) -> bool {
    let t = match tracks.iter_mut().find(|t| t.publisher == publisher) {
        Some(t) => t,
        None => {
            tracks.push(Track { publisher, next: 0, win: 0 });
            tracks.last_mut().expect("just pushed")
        }
    };
    if seq >= t.next {
        let shift = seq - t.next + 1;
        t.win = if shift >= 64 { 0 } else { t.win << shift };
        t.win |= 1;
        t.next = seq + 1;
        true
    } else {
        let d = t.next - 1 - seq;
        if d < 64 {
            let bit = 1u64 << d;
            if t.win & bit != 0 {
                *dup += 1;
                return false;
            }
            t.win |= bit;
        }
        *reord += 1;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tracking_counts_dups_and_reorders() {
        let mut t = Vec::new();
        let (mut dup, mut re) = (0, 0);
        for s in [0u64, 1, 2, 4, 3, 3, 5, 5] {
            track(&mut t, 7, s, &mut dup, &mut re);
        }
        assert_eq!(dup, 2);
        assert_eq!(re, 1);
        assert!(track(&mut t, 8, 0, &mut dup, &mut re));
        assert_eq!(t.len(), 2);
    }
}
