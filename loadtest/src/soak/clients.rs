//! The soak scenario's WebSocket and SSE clients: one epoll loop (a thread of the coordinator,
//! on the generator CPU) that holds every connection of the run.
//!
//! Steady connections (for the whole load phase): `--subscribers` subscribers spread over the
//! broadcast topics (each checks that it gets every message of its topic's publisher, in order),
//! one publisher per broadcast topic (`ack: true`, every push answered), one WebSocket
//! publisher of persisted messages (binary kind-3 pushes with `{"persist":true}` metadata and
//! `ack: true`: the ack comes after the log sync) and one presence observer per presence topic
//! (joined with presence enabled; it keeps the room's membership from `presence_state` and
//! every `presence_diff`).
//!
//! Churn: every `60 / --churn-per-min` s a new connection upgrades, joins one broadcast topic,
//! half the time also a presence topic (where it tracks, sometimes tracks again with a new
//! state, sometimes untracks) and a quarter of the time a topic of its own that nobody else ever
//! uses; it holds for a random time and then ends one of five ways (see [`Style`]). SSE streams
//! are opened on the same schedule idea (`--sse-per-min`), on a broadcast topic, sometimes with a
//! presence topic and `presence=true`, sometimes with `track=`, and closed with an RST or a FIN.
//!
//! Every protocol step has a deadline (`--timeout-ms`); anything unexpected is counted under one
//! of the error kinds in [`Stats`], with the first few described in `error_samples`.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::io;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::fd::RawFd;
use std::sync::mpsc::Receiver;
use std::sync::{Arc, Mutex};

use hdrhistogram::Histogram;
use serde::Serialize;

use super::persist::{Ledger, WRITER_WS};
use crate::history::Lat;
use crate::sys::{self, Epoll};
use crate::wire;
use crate::worker::new_hist;

/// What the client loop is told to do, in this order.
pub enum Cmd {
    /// Start publishing, churning and opening SSE streams.
    Start,
    /// No new churn cycles or SSE streams, publishing stops; cycles under way finish.
    StopLoad,
    /// Close every steady connection, then probe the presence topics with fresh joins.
    Teardown,
}

#[derive(Clone, Debug)]
pub struct Cfg {
    pub addr: SocketAddrV4,
    pub src_addrs: Vec<Ipv4Addr>,
    pub prefix: String,
    pub subscribers: usize,
    pub topics: usize,
    /// Broadcasts per second, all topics together.
    pub rate: f64,
    pub payload: usize,
    pub churn_per_min: f64,
    /// Percent of churn cycles that also join (and track on) a presence topic.
    pub churn_presence_pct: u64,
    /// Percent of churn cycles that also join a topic of their own, used by no one else.
    pub churn_own_topic_pct: u64,
    pub hold_min_ms: u64,
    pub hold_max_ms: u64,
    pub presence_topics: usize,
    pub sse_per_min: f64,
    pub persist_topics: usize,
    /// Persisted messages per second over WebSocket (kind-3 pushes), all persist topics together.
    pub ws_persist_rate: f64,
    pub timeout_ms: u64,
    pub drain_ms: u64,
}

impl Cfg {
    pub fn broadcast_topic(&self, k: usize) -> String {
        format!("{}-b{k}", self.prefix)
    }
    pub fn presence_topic(&self, k: usize) -> String {
        format!("{}-p{k}", self.prefix)
    }
    pub fn persist_topic(&self, k: usize) -> String {
        format!("{}-h{k}", self.prefix)
    }
}

/// How a churn connection ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Style {
    /// `phx_leave` every channel (replies awaited), then the WebSocket close handshake.
    LeaveClose,
    /// `phx_leave` every channel, then an RST.
    LeaveRst,
    /// An RST with every channel still joined (a closed tab, a lost network).
    Rst,
    /// The WebSocket close handshake with every channel still joined.
    CloseFrame,
    /// A TCP FIN (`shutdown(SHUT_WR)`) with no close frame; the server's EOF awaited.
    Fin,
}

const STYLES: [Style; 5] = [Style::LeaveClose, Style::LeaveRst, Style::Rst, Style::CloseFrame, Style::Fin];
/// Weights of [`STYLES`], percent.
const STYLE_WEIGHTS: [u64; 5] = [30, 20, 20, 15, 15];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Role {
    Sub(u32),
    Pub(u32),
    PersistPub,
    Observer(u32),
    Churn,
    Sse,
    Probe(u32),
}

impl Role {
    fn steady(self) -> bool {
        matches!(self, Role::Sub(_) | Role::Pub(_) | Role::PersistPub | Role::Observer(_))
    }
    fn name(self) -> &'static str {
        match self {
            Role::Sub(_) => "subscriber",
            Role::Pub(_) => "publisher",
            Role::PersistPub => "ws persist publisher",
            Role::Observer(_) => "presence observer",
            Role::Churn => "churn client",
            Role::Sse => "sse stream",
            Role::Probe(_) => "presence probe",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum St {
    Connecting,
    /// Upgrade (WS) or GET (SSE) sent, response head awaited.
    Head,
    Open,
    /// We sent a close frame (or a FIN): the server's close frame and EOF awaited.
    Closing,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ChSt {
    Joining,
    Joined,
    Leaving,
    Left,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ChKind {
    Broadcast,
    Presence,
    Own,
    Persist(u32),
}

struct Chan {
    wire: String,
    join_ref: u64,
    st: ChSt,
    kind: ChKind,
    delivered: u64,
    tracked: bool,
}

#[derive(Clone, Copy, Debug)]
enum What {
    Join(usize),
    Leave(usize),
    Track(usize),
    Untrack(usize),
    Ack(Option<(u32, u64)>),
    Heartbeat,
}

impl What {
    fn name(self) -> &'static str {
        match self {
            What::Join(_) => "join reply",
            What::Leave(_) => "leave reply",
            What::Track(_) => "track reply",
            What::Untrack(_) => "untrack reply",
            What::Ack(None) => "broadcast ack",
            What::Ack(Some(_)) => "persisted broadcast ack",
            What::Heartbeat => "heartbeat reply",
        }
    }
}

struct Pend {
    r: u64,
    what: What,
    deadline: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stage {
    Joining,
    Holding,
    Untracking,
    Leaving,
    Done,
}

struct Churn {
    cycle: u64,
    hold_ns: u64,
    style: Style,
    retrack: bool,
    untrack_first: bool,
    stage: Stage,
    joined_at: u64,
}

struct Conn {
    fd: RawFd,
    slot: usize,
    gen: u32,
    role: Role,
    st: St,
    t0: u64,
    /// Deadline of the current connection step (head, close handshake, probe state).
    deadline: u64,
    want_out: bool,
    rbuf: Vec<u8>,
    wbuf: Vec<u8>,
    wpos: usize,
    frag: Vec<u8>,
    frag_op: u8,
    chans: Vec<Chan>,
    next_ref: u64,
    pend: VecDeque<Pend>,
    next_hb: u64,
    got_close_frame: bool,
    sent_close_frame: bool,
    /// A steady connection counted as joined (or failed) for the start-up.
    ready_counted: bool,
    /// Subscriber: next sequence expected from its topic's publisher; messages seen once.
    next_seq: u64,
    uniq: u64,
    /// Observer / probe: metas per presence key.
    members: HashMap<String, i64>,
    /// SSE: broadcast events received; topics and the presence flag.
    sse_broadcasts: u64,
    sse_opened_at: u64,
    sse_fin: bool,
    churn: Option<Box<Churn>>,
    hold_ns: u64,
    /// Probe: `presence_state` received.
    probed: bool,
}

/// Client-side counters (a copy is published to the coordinator every 100 ms).
#[derive(Clone, Debug, Default, Serialize)]
pub struct Stats {
    pub ready: bool,
    pub quiesced: bool,
    pub done: bool,
    /// Client sockets to the server open now (WebSocket and SSE).
    pub open_sockets: u64,
    pub steady_target: u64,
    pub steady_joined: u64,
    pub steady_failed: u64,
    pub steady_open: u64,
    /// TCP connections made (WebSocket and SSE, all roles).
    pub connections: u64,
    /// Upgrades answered 101.
    pub ws_upgraded: u64,
    pub churn_started: u64,
    pub churn_done: u64,
    pub churn_active: u64,
    /// Churn cycles by ending: leave+close handshake, leave+RST, RST, close handshake, FIN.
    pub churn_leave_close: u64,
    pub churn_leave_rst: u64,
    pub churn_rst: u64,
    pub churn_close_frame: u64,
    pub churn_fin: u64,
    /// Churn cycles that ended early on an error.
    pub churn_aborted: u64,
    pub churn_own_topics: u64,
    pub joins_sent: u64,
    pub joins_ok: u64,
    pub leaves_sent: u64,
    pub leaves_ok: u64,
    pub heartbeats_sent: u64,
    pub heartbeat_replies: u64,
    // broadcast
    pub published: u64,
    pub publish_acked: u64,
    /// Broadcasts received by the steady subscribers / by churn clients.
    pub delivered_steady: u64,
    pub delivered_churn: u64,
    /// Steady subscribers: sequence gaps seen live, and repeats or older messages.
    pub steady_gaps: u64,
    pub steady_repeats: u64,
    /// At quiesce: messages each steady subscriber should have had (its publisher's sent
    /// count) and how many of those it did not get.
    pub steady_expected: u64,
    pub steady_lost: u64,
    pub steady_subs_with_loss: u64,
    pub latency: Option<Lat>,
    pub churn_join_latency: Option<Lat>,
    // presence
    pub tracks_sent: u64,
    pub tracks_ok: u64,
    pub retracks: u64,
    pub untracks_sent: u64,
    pub untracks_ok: u64,
    /// presence_state / presence_diff frames received by every WebSocket client.
    pub presence_state_frames: u64,
    pub presence_diff_frames: u64,
    /// Observers: metas joined and left (from the diffs), keys present now.
    pub observer_joins: u64,
    pub observer_leaves: u64,
    pub observer_present: u64,
    /// At quiesce: presence keys the observers still see (every churn member is gone by then).
    pub observer_left_over: u64,
    /// Fresh joins after the teardown: (topic, members in its presence_state).
    pub probe_members: Vec<(String, u64)>,
    // SSE
    pub sse_started: u64,
    pub sse_opened: u64,
    pub sse_done: u64,
    pub sse_active: u64,
    pub sse_tracked: u64,
    pub sse_broadcast_events: u64,
    pub sse_presence_events: u64,
    pub sse_other_events: u64,
    pub sse_keepalives: u64,
    // persisted over WebSocket
    pub ws_persist_sent: u64,
    pub ws_persist_acked: u64,
    // errors
    pub err_connect: u64,
    pub err_timeout: u64,
    pub err_protocol: u64,
    pub err_unexpected_close: u64,
    /// A channel or SSE stream held ≥ 1 s that got no broadcast at all.
    pub err_silent: u64,
    /// Broadcasts delivered on a channel after its leave was answered.
    pub err_after_leave: u64,
    pub error_samples: Vec<String>,
    pub late_replies: u64,
    pub generator_loop_cpu_secs: f64,
}

impl Stats {
    pub fn errors(&self) -> u64 {
        self.err_connect
            + self.err_timeout
            + self.err_protocol
            + self.err_unexpected_close
            + self.err_silent
            + self.err_after_leave
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Connecting,
    Ready,
    Load,
    Stopping,
    Quiesced,
    Teardown,
    Probing,
    Done,
}

#[derive(Clone, Copy)]
enum Timer {
    HoldEnd,
    Retrack,
}

const HEARTBEAT_NS: u64 = 25_000_000_000;
const SCRATCH: usize = 1 << 20;

struct Loop {
    cfg: Cfg,
    host: String,
    ep: Epoll,
    conns: Vec<Option<Conn>>,
    gens: Vec<u32>,
    free: Vec<usize>,
    scratch: Vec<u8>,
    frame: Vec<u8>,
    body: Vec<u8>,
    rng: u64,
    st: Stats,
    phase: Phase,
    timers: BinaryHeap<Reverse<(u64, usize, u32, u8)>>,
    // load clocks
    load_t0: u64,
    pub_i: u64,
    pub_seq: Vec<u64>,
    pub_slots: Vec<Option<usize>>,
    persist_slot: Option<usize>,
    persist_i: u64,
    churn_i: u64,
    sse_i: u64,
    stop_t: u64,
    quiet_since: u64,
    hist: Histogram<u64>,
    join_hist: Histogram<u64>,
    pending_steady: VecDeque<Role>,
    connecting_steady: usize,
    ledger: Arc<Mutex<Ledger>>,
    cpu0: u64,
}

fn token(slot: usize, gen: u32) -> u64 {
    slot as u64 | ((gen as u64) << 32)
}

/// Entry point of the client thread.
pub fn run(cfg: Cfg, rx: Receiver<Cmd>, shared: Arc<Mutex<Stats>>, ledger: Arc<Mutex<Ledger>>) {
    let mut l = match Loop::new(cfg, ledger) {
        Ok(l) => l,
        Err(e) => {
            let mut s = shared.lock().unwrap();
            s.error_samples.push(format!("client loop: {e}"));
            s.err_connect += 1;
            s.done = true;
            return;
        }
    };
    l.main(rx, shared);
}

impl Loop {
    fn new(cfg: Cfg, ledger: Arc<Mutex<Ledger>>) -> io::Result<Loop> {
        let ep = Epoll::new()?;
        let mut pending_steady = VecDeque::new();
        for k in 0..cfg.topics {
            pending_steady.push_back(Role::Pub(k as u32));
        }
        if cfg.persist_topics > 0 && cfg.ws_persist_rate > 0.0 {
            pending_steady.push_back(Role::PersistPub);
        }
        for k in 0..cfg.presence_topics {
            pending_steady.push_back(Role::Observer(k as u32));
        }
        for i in 0..cfg.subscribers {
            pending_steady.push_back(Role::Sub((i % cfg.topics.max(1)) as u32));
        }
        let st = Stats { steady_target: pending_steady.len() as u64, ..Default::default() };
        Ok(Loop {
            host: cfg.addr.to_string(),
            pub_seq: vec![0; cfg.topics],
            pub_slots: vec![None; cfg.topics],
            cfg,
            ep,
            conns: Vec::new(),
            gens: Vec::new(),
            free: Vec::new(),
            scratch: vec![0u8; SCRATCH],
            frame: Vec::with_capacity(4096),
            body: Vec::with_capacity(4096),
            rng: sys::now_ns() | 1,
            st,
            phase: Phase::Connecting,
            timers: BinaryHeap::new(),
            load_t0: 0,
            pub_i: 0,
            persist_slot: None,
            persist_i: 0,
            churn_i: 0,
            sse_i: 0,
            stop_t: 0,
            quiet_since: 0,
            hist: new_hist(),
            join_hist: new_hist(),
            pending_steady,
            connecting_steady: 0,
            ledger,
            cpu0: sys::thread_cpu_ns(),
        })
    }

    fn rand(&mut self) -> u64 {
        let mut x = self.rng;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.rng = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.rand() % 100 < percent
    }

    fn note(&mut self, e: String) {
        if self.st.error_samples.len() < 40 {
            let t = if self.load_t0 > 0 { (sys::now_ns().saturating_sub(self.load_t0)) as f64 / 1e9 } else { 0.0 };
            self.st.error_samples.push(format!("[{t:.1}s] {e}"));
        }
    }

    fn main(&mut self, rx: Receiver<Cmd>, shared: Arc<Mutex<Stats>>) {
        let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 1024];
        let mut next_house = sys::now_ns();
        loop {
            while let Ok(cmd) = rx.try_recv() {
                self.command(cmd);
            }
            let now = sys::now_ns();
            if now >= next_house {
                self.housekeeping(now);
                next_house = now + 100_000_000;
                self.st.generator_loop_cpu_secs = (sys::thread_cpu_ns() - self.cpu0) as f64 / 1e9;
                *shared.lock().unwrap() = self.st.clone();
                if self.phase == Phase::Done {
                    return;
                }
            }
            let mut due = next_house;
            if self.phase == Phase::Load {
                due = due.min(self.next_due());
            }
            if let Some(Reverse((t, ..))) = self.timers.peek() {
                due = due.min(*t);
            }
            let n = self.ep.wait_ns(&mut events, Some(due.saturating_sub(now).min(100_000_000)));
            for ev in &events[..n] {
                self.on_event(ev.u64, ev.events);
            }
            let now = sys::now_ns();
            if self.phase == Phase::Load {
                self.load_due(now);
            }
            while let Some(&Reverse((t, slot, gen, kind))) = self.timers.peek() {
                if t > now {
                    break;
                }
                self.timers.pop();
                self.timer(slot, gen, if kind == 0 { Timer::HoldEnd } else { Timer::Retrack }, now);
            }
        }
    }

    fn command(&mut self, cmd: Cmd) {
        let now = sys::now_ns();
        match cmd {
            Cmd::Start => {
                self.phase = Phase::Load;
                self.load_t0 = now;
            }
            Cmd::StopLoad => {
                self.phase = Phase::Stopping;
                self.stop_t = now;
            }
            Cmd::Teardown => {
                self.phase = Phase::Teardown;
                let slots: Vec<usize> = (0..self.conns.len())
                    .filter(|&s| self.conns[s].as_ref().is_some_and(|c| c.role.steady()))
                    .collect();
                for (i, s) in slots.into_iter().enumerate() {
                    let Some(mut c) = self.conns[s].take() else { continue };
                    if i % 2 == 0 && c.st == St::Open {
                        self.send_close(&mut c, now);
                        self.put(c);
                    } else {
                        self.finish(c, true);
                    }
                }
            }
        }
    }

    // ------------------------------------------------------------ slots and sockets

    fn open(&mut self, role: Role, now: u64) -> Option<usize> {
        let slot = match self.free.pop() {
            Some(s) => s,
            None => {
                self.conns.push(None);
                self.gens.push(0);
                self.conns.len() - 1
            }
        };
        let n = self.st.connections;
        let src = (!self.cfg.src_addrs.is_empty()).then(|| self.cfg.src_addrs[n as usize % self.cfg.src_addrs.len()]);
        let fd = match sys::connect_nonblocking(src, self.cfg.addr) {
            Ok(fd) => fd,
            Err(e) => {
                self.free.push(slot);
                self.st.err_connect += 1;
                self.note(format!("{}: connect: {e}", role.name()));
                return None;
            }
        };
        self.st.connections += 1;
        self.st.open_sockets += 1;
        let gen = self.gens[slot];
        let ev = (libc::EPOLLIN | libc::EPOLLOUT | libc::EPOLLRDHUP | libc::EPOLLET) as u32;
        if let Err(e) = self.ep.add(fd, ev, token(slot, gen)) {
            self.note(format!("epoll add: {e}"));
        }
        self.conns[slot] = Some(Conn {
            fd,
            slot,
            gen,
            role,
            st: St::Connecting,
            t0: now,
            deadline: now + self.cfg.timeout_ms * 1_000_000,
            want_out: true,
            rbuf: Vec::new(),
            wbuf: Vec::new(),
            wpos: 0,
            frag: Vec::new(),
            frag_op: 0,
            chans: Vec::new(),
            next_ref: 1,
            pend: VecDeque::new(),
            next_hb: now + HEARTBEAT_NS,
            got_close_frame: false,
            sent_close_frame: false,
            ready_counted: false,
            next_seq: 0,
            uniq: 0,
            members: HashMap::new(),
            sse_broadcasts: 0,
            sse_opened_at: 0,
            sse_fin: false,
            churn: None,
            hold_ns: 0,
            probed: false,
        });
        Some(slot)
    }

    fn put(&mut self, c: Conn) {
        let s = c.slot;
        self.conns[s] = Some(c);
    }

    /// Closes `c` (RST when `abortive`, else a plain close) and does the bookkeeping of its
    /// role.
    fn finish(&mut self, c: Conn, abortive: bool) {
        self.ep.delete(c.fd);
        if abortive {
            sys::close_abortive(c.fd);
        } else {
            // SAFETY: we own the fd and never use it again.
            unsafe { libc::close(c.fd) };
        }
        self.st.open_sockets -= 1;
        self.gens[c.slot] = self.gens[c.slot].wrapping_add(1);
        self.free.push(c.slot);
        match c.role {
            Role::Churn => {
                self.st.churn_active -= 1;
                self.st.churn_done += 1;
                let ch = c.churn.as_ref().expect("churn state");
                if ch.stage != Stage::Done {
                    self.st.churn_aborted += 1;
                } else {
                    match ch.style {
                        Style::LeaveClose => self.st.churn_leave_close += 1,
                        Style::LeaveRst => self.st.churn_leave_rst += 1,
                        Style::Rst => self.st.churn_rst += 1,
                        Style::CloseFrame => self.st.churn_close_frame += 1,
                        Style::Fin => self.st.churn_fin += 1,
                    }
                }
            }
            Role::Sse => {
                self.st.sse_active -= 1;
                self.st.sse_done += 1;
            }
            r if r.steady() => {
                self.st.steady_open -= 1;
                if let Role::Pub(k) = r {
                    self.pub_slots[k as usize] = None;
                }
                if r == Role::PersistPub {
                    self.persist_slot = None;
                }
            }
            _ => {}
        }
    }

    /// `c` failed: count the error (kind by `kind`), close with an RST.
    fn fail(&mut self, c: Conn, kind: ErrKind, why: String) {
        match kind {
            ErrKind::Connect => self.st.err_connect += 1,
            ErrKind::Timeout => self.st.err_timeout += 1,
            ErrKind::Protocol => self.st.err_protocol += 1,
            ErrKind::Closed => self.st.err_unexpected_close += 1,
        }
        self.note(format!("{} ({:?}): {why}", c.role.name(), c.st));
        if c.role.steady() && !c.ready_counted && self.phase == Phase::Connecting {
            self.st.steady_failed += 1;
            self.connecting_steady -= 1;
        }
        self.finish(c, true);
    }

    fn send(&mut self, c: &mut Conn, data: &[u8]) -> io::Result<()> {
        if c.wpos < c.wbuf.len() {
            c.wbuf.extend_from_slice(data);
            return Ok(());
        }
        c.wbuf.clear();
        c.wpos = 0;
        let mut off = 0;
        while off < data.len() {
            match sys::send(c.fd, &data[off..]) {
                Ok(n) => off += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
        if off < data.len() {
            c.wbuf.extend_from_slice(&data[off..]);
            self.set_out(c, true);
        }
        Ok(())
    }

    fn set_out(&self, c: &mut Conn, on: bool) {
        if c.want_out != on {
            c.want_out = on;
            let mut ev = (libc::EPOLLIN | libc::EPOLLRDHUP | libc::EPOLLET) as u32;
            if on {
                ev |= libc::EPOLLOUT as u32;
            }
            let _ = self.ep.modify(c.fd, ev, token(c.slot, c.gen));
        }
    }

    fn flush(&mut self, c: &mut Conn) -> io::Result<()> {
        while c.wpos < c.wbuf.len() {
            match sys::send(c.fd, &c.wbuf[c.wpos..]) {
                Ok(n) => c.wpos += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
        c.wbuf.clear();
        c.wpos = 0;
        self.set_out(c, false);
        Ok(())
    }

    /// Sends one masked client frame.
    fn send_frame(&mut self, c: &mut Conn, opcode: u8, payload: &[u8]) -> io::Result<()> {
        let mask = (self.rand() as u32).to_ne_bytes();
        let mut f = std::mem::take(&mut self.frame);
        f.clear();
        wire::push_client_frame(&mut f, opcode, payload, mask);
        let r = self.send(c, &f);
        self.frame = f;
        r
    }

    /// Sends a Phoenix text message and registers the reply it waits for.
    fn push(&mut self, c: &mut Conn, msg: &[u8], r: u64, what: What, now: u64) -> io::Result<()> {
        c.pend.push_back(Pend { r, what, deadline: now + self.cfg.timeout_ms * 1_000_000 });
        self.send_frame(c, wire::OP_TEXT, msg)
    }

    fn send_close(&mut self, c: &mut Conn, now: u64) {
        let _ = self.send_frame(c, wire::OP_CLOSE, &1000u16.to_be_bytes());
        c.sent_close_frame = true;
        c.st = St::Closing;
        c.deadline = now + self.cfg.timeout_ms * 1_000_000;
    }

    // ------------------------------------------------------------ load schedule

    fn next_due(&self) -> u64 {
        let mut due = u64::MAX;
        let at = |i: u64, rate: f64| self.load_t0 + (i as f64 * 1e9 / rate) as u64;
        if self.cfg.rate > 0.0 {
            due = due.min(at(self.pub_i, self.cfg.rate));
        }
        if self.cfg.ws_persist_rate > 0.0 && self.cfg.persist_topics > 0 {
            due = due.min(at(self.persist_i, self.cfg.ws_persist_rate));
        }
        if self.cfg.churn_per_min > 0.0 {
            due = due.min(at(self.churn_i, self.cfg.churn_per_min / 60.0));
        }
        if self.cfg.sse_per_min > 0.0 {
            due = due.min(at(self.sse_i, self.cfg.sse_per_min / 60.0));
        }
        due
    }

    fn load_due(&mut self, now: u64) {
        let at = |t0: u64, i: u64, rate: f64| t0 + (i as f64 * 1e9 / rate) as u64;
        let mut budget = 2000;
        while self.cfg.rate > 0.0 && at(self.load_t0, self.pub_i, self.cfg.rate) <= now && budget > 0 {
            let k = (self.pub_i % self.cfg.topics as u64) as usize;
            self.pub_i += 1;
            budget -= 1;
            self.publish(k, now);
        }
        while self.cfg.ws_persist_rate > 0.0
            && self.cfg.persist_topics > 0
            && at(self.load_t0, self.persist_i, self.cfg.ws_persist_rate) <= now
        {
            let seq = self.persist_i;
            self.persist_i += 1;
            self.persist_publish(seq, now);
        }
        while self.cfg.churn_per_min > 0.0 && at(self.load_t0, self.churn_i, self.cfg.churn_per_min / 60.0) <= now {
            let cycle = self.churn_i;
            self.churn_i += 1;
            self.start_churn(cycle, now);
        }
        while self.cfg.sse_per_min > 0.0 && at(self.load_t0, self.sse_i, self.cfg.sse_per_min / 60.0) <= now {
            let n = self.sse_i;
            self.sse_i += 1;
            self.start_sse(n, now);
        }
    }

    fn publish(&mut self, k: usize, now: u64) {
        let Some(slot) = self.pub_slots[k] else { return };
        let Some(mut c) = self.conns[slot].take() else { return };
        if c.st != St::Open || c.chans.first().is_none_or(|ch| ch.st != ChSt::Joined) {
            self.put(c);
            return;
        }
        let seq = self.pub_seq[k];
        self.pub_seq[k] += 1;
        let r = c.next_ref;
        c.next_ref += 1;
        let mut b = std::mem::take(&mut self.body);
        b.clear();
        b.extend_from_slice(b"[\"");
        wire::push_u64(&mut b, c.chans[0].join_ref);
        b.extend_from_slice(b"\",\"");
        wire::push_u64(&mut b, r);
        b.extend_from_slice(b"\",\"");
        b.extend_from_slice(c.chans[0].wire.as_bytes());
        b.extend_from_slice(b"\",\"broadcast\",{\"type\":\"broadcast\",\"event\":\"m\",\"payload\":");
        wire::push_payload(&mut b, seq, sys::now_ns(), k as u64, self.cfg.payload);
        b.extend_from_slice(b"}]");
        let res = self.push(&mut c, &b, r, What::Ack(None), now);
        self.body = b;
        self.st.published += 1;
        match res {
            Ok(()) => self.put(c),
            Err(e) => self.fail(c, ErrKind::Closed, format!("send: {e}")),
        }
    }

    /// A binary kind-3 push with `{"persist":true}` metadata on persist topic `seq % topics`.
    fn persist_publish(&mut self, seq: u64, now: u64) {
        let Some(slot) = self.persist_slot else { return };
        let Some(mut c) = self.conns[slot].take() else { return };
        let ci = (seq % self.cfg.persist_topics as u64) as usize;
        if c.st != St::Open || c.chans.get(ci).is_none_or(|ch| ch.st != ChSt::Joined) {
            self.put(c);
            return;
        }
        let r = c.next_ref;
        c.next_ref += 1;
        let jr = c.chans[ci].join_ref.to_string();
        let rs = r.to_string();
        let topic = c.chans[ci].wire.clone();
        let meta = b"{\"persist\":true}";
        let mut b = std::mem::take(&mut self.body);
        b.clear();
        b.extend_from_slice(&[3, jr.len() as u8, rs.len() as u8, topic.len() as u8, 1, meta.len() as u8, 1]);
        b.extend_from_slice(jr.as_bytes());
        b.extend_from_slice(rs.as_bytes());
        b.extend_from_slice(topic.as_bytes());
        b.extend_from_slice(b"m");
        b.extend_from_slice(meta);
        wire::push_payload(&mut b, seq, sys::now_ns(), WRITER_WS, self.cfg.payload);
        c.pend.push_back(Pend {
            r,
            what: What::Ack(Some((ci as u32, seq))),
            deadline: now + self.cfg.timeout_ms * 1_000_000,
        });
        let res = self.send_frame(&mut c, wire::OP_BINARY, &b);
        self.body = b;
        self.st.ws_persist_sent += 1;
        match res {
            Ok(()) => self.put(c),
            Err(e) => self.fail(c, ErrKind::Closed, format!("send: {e}")),
        }
    }

    fn hold(&mut self) -> u64 {
        let (lo, hi) = (self.cfg.hold_min_ms, self.cfg.hold_max_ms.max(self.cfg.hold_min_ms));
        (lo + self.rand() % (hi - lo + 1)) * 1_000_000
    }

    fn start_churn(&mut self, cycle: u64, now: u64) {
        let b = (self.rand() % self.cfg.topics.max(1) as u64) as usize;
        let mut chans = vec![(self.cfg.broadcast_topic(b), ChKind::Broadcast)];
        let presence = self.cfg.presence_topics > 0 && self.chance(self.cfg.churn_presence_pct);
        if presence {
            let p = (self.rand() % self.cfg.presence_topics as u64) as usize;
            chans.push((self.cfg.presence_topic(p), ChKind::Presence));
        }
        if self.chance(self.cfg.churn_own_topic_pct) {
            chans.push((format!("{}-own{cycle}", self.cfg.prefix), ChKind::Own));
            self.st.churn_own_topics += 1;
        }
        let mut w = self.rand() % 100;
        let mut style = Style::Rst;
        for (s, &p) in STYLES.iter().zip(&STYLE_WEIGHTS) {
            if w < p {
                style = *s;
                break;
            }
            w -= p;
        }
        let churn = Churn {
            cycle,
            hold_ns: self.hold(),
            style,
            retrack: presence && self.chance(30),
            untrack_first: presence && self.chance(50),
            stage: Stage::Joining,
            joined_at: 0,
        };
        self.st.churn_started += 1;
        let Some(slot) = self.open(Role::Churn, now) else {
            return;
        };
        self.st.churn_active += 1;
        let c = self.conns[slot].as_mut().expect("just opened");
        c.churn = Some(Box::new(churn));
        for (name, kind) in chans {
            c.chans.push(Chan {
                wire: format!("realtime:{name}"),
                join_ref: 0,
                st: ChSt::Joining,
                kind,
                delivered: 0,
                tracked: false,
            });
        }
    }

    fn start_sse(&mut self, n: u64, now: u64) {
        self.st.sse_started += 1;
        let hold = self.hold();
        let Some(slot) = self.open(Role::Sse, now) else {
            return;
        };
        self.st.sse_active += 1;
        let fin = self.chance(50);
        let c = self.conns[slot].as_mut().expect("just opened");
        c.hold_ns = hold;
        c.sse_fin = fin;
        let _ = n;
    }

    fn sse_request(&mut self) -> Vec<u8> {
        let n = self.st.sse_started;
        let b = (self.rand() % self.cfg.topics.max(1) as u64) as usize;
        let mut q = format!("topic={}", self.cfg.broadcast_topic(b));
        if self.cfg.presence_topics > 0 && self.chance(30) {
            let p = (self.rand() % self.cfg.presence_topics as u64) as usize;
            q.push_str(&format!("&topic={}&presence=true", self.cfg.presence_topic(p)));
            if self.chance(50) {
                // track={"sse":n} (URL-encoded): this stream's presence on both topics, removed
                // when the stream closes.
                q.push_str(&format!("&track=%7B%22sse%22%3A{n}%7D&presence_key=sse{n}"));
                self.st.sse_tracked += 1;
            }
        }
        format!(
            "GET /realtime/v1/sse?{q}&apikey=loadtest HTTP/1.1\r\nHost: {}\r\nAccept: text/event-stream\r\n\
             User-Agent: corecast-loadtest-soak\r\n\r\n",
            self.host
        )
        .into_bytes()
    }

    // ------------------------------------------------------------ housekeeping

    fn housekeeping(&mut self, now: u64) {
        // Steady connections are opened 200 at a time before the load starts.
        if self.phase == Phase::Connecting {
            while self.connecting_steady < 200 {
                let Some(role) = self.pending_steady.pop_front() else { break };
                if let Some(slot) = self.open(role, now) {
                    self.connecting_steady += 1;
                    self.st.steady_open += 1;
                    match role {
                        Role::Pub(k) => self.pub_slots[k as usize] = Some(slot),
                        Role::PersistPub => self.persist_slot = Some(slot),
                        _ => {}
                    }
                } else {
                    self.st.steady_failed += 1;
                }
            }
            if self.pending_steady.is_empty() && self.connecting_steady == 0 {
                self.phase = Phase::Ready;
                self.st.ready = true;
            }
        }
        let mut hb = Vec::new();
        for slot in 0..self.conns.len() {
            let Some(mut c) = self.conns[slot].take() else { continue };
            // Deadlines of the connection's own steps.
            if c.st != St::Open && now > c.deadline {
                let why = match c.st {
                    St::Connecting => "connect timeout",
                    St::Head => "no response head",
                    _ => "close handshake not finished",
                };
                self.fail(c, ErrKind::Timeout, why.into());
                continue;
            }
            if c.role == Role::Sse || c.st != St::Open {
                self.put(c);
                continue;
            }
            if matches!(c.role, Role::Probe(_)) && !c.probed && now > c.deadline {
                self.fail(c, ErrKind::Timeout, "no presence_state after the join".into());
                continue;
            }
            let mut fatal = None;
            while let Some(p) = c.pend.front() {
                // Replies come in order, so the oldest one is the first to expire.
                if p.deadline > now {
                    break;
                }
                let p = c.pend.pop_front().expect("front");
                let why = format!("no {} within {} ms", p.what.name(), self.cfg.timeout_ms);
                // Without its join (or, for a churn cycle, its leave or untrack) the connection
                // cannot go on: it is closed with an RST (a churn cycle counts as aborted).
                let ends = matches!(p.what, What::Join(_))
                    || c.role == Role::Churn && matches!(p.what, What::Leave(_) | What::Untrack(_));
                if ends {
                    fatal = Some(why);
                    break;
                }
                self.st.err_timeout += 1;
                self.note(format!("{}: {why}", c.role.name()));
            }
            if let Some(why) = fatal {
                self.fail(c, ErrKind::Timeout, why);
                continue;
            }
            if now >= c.next_hb {
                c.next_hb = now + HEARTBEAT_NS;
                let r = c.next_ref;
                c.next_ref += 1;
                hb.clear();
                hb.extend_from_slice(b"[null,\"");
                wire::push_u64(&mut hb, r);
                hb.extend_from_slice(b"\",\"phoenix\",\"heartbeat\",{}]");
                self.st.heartbeats_sent += 1;
                if let Err(e) = self.push(&mut c, &hb, r, What::Heartbeat, now) {
                    self.fail(c, ErrKind::Closed, format!("heartbeat send: {e}"));
                    continue;
                }
            }
            self.put(c);
        }
        self.st.observer_present = self
            .conns
            .iter()
            .flatten()
            .filter(|c| matches!(c.role, Role::Observer(_)))
            .map(|c| c.members.values().filter(|&&v| v > 0).count() as u64)
            .sum();
        match self.phase {
            Phase::Stopping => {
                let acks_pending = self
                    .conns
                    .iter()
                    .flatten()
                    .filter(|c| matches!(c.role, Role::Pub(_) | Role::PersistPub))
                    .any(|c| c.pend.iter().any(|p| matches!(p.what, What::Ack(_))));
                let quiet = self.st.churn_active == 0 && self.st.sse_active == 0 && !acks_pending;
                if !quiet {
                    self.quiet_since = 0;
                } else if self.quiet_since == 0 {
                    self.quiet_since = now;
                } else if now - self.quiet_since >= self.cfg.drain_ms * 1_000_000 {
                    self.quiesce();
                }
            }
            Phase::Teardown if self.st.steady_open == 0 => {
                self.phase = Phase::Probing;
                for k in 0..self.cfg.presence_topics {
                    if let Some(slot) = self.open(Role::Probe(k as u32), now) {
                        let c = self.conns[slot].as_mut().expect("just opened");
                        c.chans.push(Chan {
                            wire: format!("realtime:{}", self.cfg.presence_topic(k)),
                            join_ref: 0,
                            st: ChSt::Joining,
                            kind: ChKind::Presence,
                            delivered: 0,
                            tracked: false,
                        });
                    }
                }
            }
            Phase::Probing if self.st.open_sockets == 0 => {
                self.phase = Phase::Done;
                self.st.done = true;
            }
            _ => {}
        }
    }

    /// Everything has stopped: the steady subscribers' loss and the observers' leftovers.
    fn quiesce(&mut self) {
        let mut expected = 0;
        let mut lost = 0;
        let mut with_loss = 0;
        for c in self.conns.iter().flatten() {
            if let Role::Sub(k) = c.role {
                let e = self.pub_seq[k as usize];
                expected += e;
                let l = e.saturating_sub(c.uniq);
                lost += l;
                with_loss += u64::from(l > 0);
            }
        }
        self.st.steady_expected = expected;
        self.st.steady_lost = lost;
        self.st.steady_subs_with_loss = with_loss;
        self.st.observer_left_over = self.st.observer_present;
        self.st.latency = Some(Lat::of(&self.hist));
        self.st.churn_join_latency = Some(Lat::of(&self.join_hist));
        self.st.quiesced = true;
        self.phase = Phase::Quiesced;
    }

    fn timer(&mut self, slot: usize, gen: u32, t: Timer, now: u64) {
        if self.gens.get(slot) != Some(&gen) {
            return;
        }
        let Some(mut c) = self.conns[slot].take() else { return };
        if c.role == Role::Sse {
            if c.st != St::Open {
                self.put(c);
                return;
            }
            // Judged only while the broadcasts go on (not for streams that outlive the load).
            let publishing = self.phase == Phase::Load && self.cfg.rate > 0.0;
            if now - c.sse_opened_at >= 1_000_000_000 && c.sse_broadcasts == 0 && publishing {
                self.st.err_silent += 1;
                self.note("sse stream: no broadcast event while open".into());
            }
            if c.sse_fin {
                shutdown_write(c.fd);
                c.st = St::Closing;
                c.deadline = now + self.cfg.timeout_ms * 1_000_000;
                self.put(c);
            } else {
                self.finish(c, true);
            }
            return;
        }
        let res = match t {
            Timer::Retrack => self.retrack(&mut c, now),
            Timer::HoldEnd => {
                let publishing = self.phase == Phase::Load && self.cfg.rate > 0.0;
                for ch in &c.chans {
                    if ch.kind == ChKind::Broadcast && ch.delivered == 0 && publishing {
                        self.st.err_silent += 1;
                        self.note(format!("churn client: no broadcast on {} while joined", ch.wire));
                    }
                }
                let ch = c.churn.as_mut().expect("churn");
                match c.chans.iter().position(|x| x.tracked) {
                    Some(i) if ch.untrack_first => {
                        ch.stage = Stage::Untracking;
                        self.presence_push(&mut c, i, None, now)
                    }
                    _ => return self.leave(c, now),
                }
            }
        };
        match res {
            Ok(()) => self.put(c),
            Err(e) => self.fail(c, ErrKind::Closed, format!("send: {e}")),
        }
    }

    fn retrack(&mut self, c: &mut Conn, now: u64) -> io::Result<()> {
        let Some(i) = c.chans.iter().position(|x| x.tracked) else { return Ok(()) };
        if c.churn.as_ref().is_some_and(|ch| ch.stage != Stage::Holding) {
            return Ok(());
        }
        self.st.retracks += 1;
        let cycle = c.churn.as_ref().map_or(0, |ch| ch.cycle);
        let state = format!("{{\"cycle\":{cycle},\"v\":2}}");
        self.presence_push(c, i, Some(state.as_bytes()), now)
    }

    /// `track` (with `state`) or `untrack` on channel `i`.
    fn presence_push(&mut self, c: &mut Conn, i: usize, state: Option<&[u8]>, now: u64) -> io::Result<()> {
        let r = c.next_ref;
        c.next_ref += 1;
        let ch = &c.chans[i];
        let mut b = format!("[\"{}\",\"{r}\",\"{}\",\"presence\",{{\"type\":\"presence\",", ch.join_ref, ch.wire);
        let what = match state {
            Some(s) => {
                b.push_str("\"event\":\"track\",\"payload\":");
                b.push_str(std::str::from_utf8(s).unwrap_or("{}"));
                b.push_str("}]");
                self.st.tracks_sent += 1;
                What::Track(i)
            }
            None => {
                b.push_str("\"event\":\"untrack\"}]");
                self.st.untracks_sent += 1;
                What::Untrack(i)
            }
        };
        self.push(c, b.as_bytes(), r, what, now)
    }

    /// The end of a churn cycle's hold (after the untrack, if any): its ending style.
    fn leave(&mut self, mut c: Conn, now: u64) {
        let ch = c.churn.as_mut().expect("churn");
        match ch.style {
            Style::LeaveClose | Style::LeaveRst => {
                ch.stage = Stage::Leaving;
                for i in 0..c.chans.len() {
                    let r = c.next_ref;
                    c.next_ref += 1;
                    c.chans[i].st = ChSt::Leaving;
                    let msg =
                        format!("[\"{}\",\"{r}\",\"{}\",\"phx_leave\",{{}}]", c.chans[i].join_ref, c.chans[i].wire);
                    self.st.leaves_sent += 1;
                    if let Err(e) = self.push(&mut c, msg.as_bytes(), r, What::Leave(i), now) {
                        return self.fail(c, ErrKind::Closed, format!("send: {e}"));
                    }
                }
                self.put(c);
            }
            Style::Rst => {
                ch.stage = Stage::Done;
                self.finish(c, true);
            }
            Style::CloseFrame => {
                ch.stage = Stage::Done;
                self.send_close(&mut c, now);
                self.put(c);
            }
            Style::Fin => {
                ch.stage = Stage::Done;
                shutdown_write(c.fd);
                c.st = St::Closing;
                c.deadline = now + self.cfg.timeout_ms * 1_000_000;
                self.put(c);
            }
        }
    }

    // ------------------------------------------------------------ events

    fn on_event(&mut self, tok: u64, flags: u32) {
        let slot = (tok & 0xffff_ffff) as usize;
        let gen = (tok >> 32) as u32;
        if self.gens.get(slot) != Some(&gen) {
            return;
        }
        let Some(mut c) = self.conns[slot].take() else { return };
        let now = sys::now_ns();
        if c.st == St::Connecting {
            let err = sys::so_error(c.fd);
            if err != 0 {
                return self.fail(c, ErrKind::Connect, io::Error::from_raw_os_error(err).to_string());
            }
            if flags & (libc::EPOLLOUT as u32) == 0 {
                if flags & ((libc::EPOLLERR | libc::EPOLLHUP) as u32) != 0 {
                    return self.fail(c, ErrKind::Connect, "connect failed".into());
                }
                return self.put(c);
            }
            c.st = St::Head;
            self.set_out(&mut c, false);
            let req = if c.role == Role::Sse {
                self.sse_request()
            } else {
                wire::upgrade_request(wire::Proto::Phoenix, 0, &self.host)
            };
            if let Err(e) = self.send(&mut c, &req) {
                return self.fail(c, ErrKind::Connect, format!("send request: {e}"));
            }
        }
        if flags & (libc::EPOLLOUT as u32) != 0 && c.wpos < c.wbuf.len() {
            if let Err(e) = self.flush(&mut c) {
                return self.fail(c, ErrKind::Closed, format!("send: {e}"));
            }
        }
        if flags & ((libc::EPOLLIN | libc::EPOLLRDHUP | libc::EPOLLHUP | libc::EPOLLERR) as u32) != 0 {
            let hup = flags & ((libc::EPOLLRDHUP | libc::EPOLLHUP | libc::EPOLLERR) as u32) != 0;
            self.readable(c, now, hup);
        } else {
            self.put(c);
        }
    }

    /// Reads what `c` has; `hup`: the event also reported the peer's close, which edge-triggered
    /// epoll will not report again, so reading goes on to the EOF.
    fn readable(&mut self, mut c: Conn, now: u64, hup: bool) {
        let mut scratch = std::mem::take(&mut self.scratch);
        let mut eof = None;
        loop {
            match sys::recv(c.fd, &mut scratch) {
                Ok(0) => {
                    eof = Some("EOF".to_string());
                    break;
                }
                Ok(n) => {
                    c.rbuf.extend_from_slice(&scratch[..n]);
                    if n < scratch.len() && !hup {
                        // Edge-triggered: a short read emptied the socket (a later EOF or
                        // reset still raises a new event).
                        break;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    eof = Some(e.to_string());
                    break;
                }
            }
        }
        self.scratch = scratch;
        let mut c = match self.process(c, now) {
            Some(c) => c,
            None => return,
        };
        if let Some(why) = eof {
            let clean = why == "EOF";
            if c.st == St::Closing {
                // We sent a close frame (answered by the server's, then its EOF) or a FIN (EOF).
                if c.sent_close_frame && !c.got_close_frame {
                    self.st.err_protocol += 1;
                    self.note(format!("{}: no close frame in answer to ours before {why}", c.role.name()));
                }
                return self.finish(c, !clean);
            }
            return self.fail(c, ErrKind::Closed, format!("the server closed the connection ({why})"));
        }
        c = match self.maybe_flush(c) {
            Some(c) => c,
            None => return,
        };
        self.put(c);
    }

    fn maybe_flush(&mut self, mut c: Conn) -> Option<Conn> {
        if c.wpos < c.wbuf.len() {
            if let Err(e) = self.flush(&mut c) {
                self.fail(c, ErrKind::Closed, format!("send: {e}"));
                return None;
            }
        }
        Some(c)
    }

    /// Parses what `c.rbuf` holds; None when `c` was finished on the way.
    fn process(&mut self, mut c: Conn, now: u64) -> Option<Conn> {
        if c.st == St::Head {
            let Some(end) = memchr::memmem::find(&c.rbuf, b"\r\n\r\n") else {
                return Some(c);
            };
            let head = String::from_utf8_lossy(&c.rbuf[..end]).into_owned();
            let want = if c.role == Role::Sse { "HTTP/1.1 200" } else { "HTTP/1.1 101" };
            if !head.starts_with(want) {
                let first = head.lines().next().unwrap_or("").to_string();
                self.fail(c, ErrKind::Protocol, format!("response {first:?}, expected {want}"));
                return None;
            }
            c.rbuf.drain(..end + 4);
            c.st = St::Open;
            if c.role == Role::Sse {
                self.st.sse_opened += 1;
                c.sse_opened_at = now;
                self.timers.push(Reverse((now + c.hold_ns, c.slot, c.gen, 0)));
            } else {
                self.st.ws_upgraded += 1;
                if let Err(e) = self.on_open(&mut c, now) {
                    self.fail(c, ErrKind::Closed, format!("send: {e}"));
                    return None;
                }
            }
        }
        if c.role == Role::Sse {
            self.sse_lines(&mut c);
            return Some(c);
        }
        let buf = std::mem::take(&mut c.rbuf);
        let mut pos = 0;
        let mut out = Some(c);
        while let Some(c) = out.as_mut() {
            let Some(h) = wire::parse_frame_head(&buf[pos..]) else { break };
            if buf.len() - pos < h.header_len + h.payload_len {
                break;
            }
            let data = &buf[pos + h.header_len..pos + h.header_len + h.payload_len];
            pos += h.header_len + h.payload_len;
            if h.mask.is_some() {
                let c = out.take().expect("conn");
                self.fail(c, ErrKind::Protocol, "masked server frame".into());
                return None;
            }
            let (op, msg): (u8, &[u8]) = if h.opcode == wire::OP_CONT || !h.fin {
                if h.opcode != wire::OP_CONT {
                    c.frag_op = h.opcode;
                    c.frag.clear();
                }
                c.frag.extend_from_slice(data);
                if !h.fin {
                    continue;
                }
                (c.frag_op, &[])
            } else {
                (h.opcode, data)
            };
            let assembled;
            let msg = if h.opcode == wire::OP_CONT {
                assembled = std::mem::take(&mut c.frag);
                &assembled[..]
            } else {
                msg
            };
            let cc = out.take().expect("conn");
            out = self.message(cc, op, msg, now);
        }
        let mut c = out?;
        c.rbuf = buf;
        c.rbuf.drain(..pos);
        Some(c)
    }

    fn sse_lines(&mut self, c: &mut Conn) {
        let mut pos = 0;
        let buf = std::mem::take(&mut c.rbuf);
        for nl in memchr::memchr_iter(b'\n', &buf) {
            let line = &buf[pos..nl];
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            pos = nl + 1;
            if let Some(ev) = line.strip_prefix(b"event:") {
                let ev = ev.strip_prefix(b" ").unwrap_or(ev);
                match ev {
                    b"broadcast" => {
                        self.st.sse_broadcast_events += 1;
                        c.sse_broadcasts += 1;
                    }
                    b"presence_state" | b"presence_diff" => self.st.sse_presence_events += 1,
                    b"system" => {
                        self.st.sse_other_events += 1;
                        self.st.err_protocol += 1;
                        self.note("sse stream: system event".into());
                    }
                    _ => self.st.sse_other_events += 1,
                }
            } else if line.starts_with(b":") {
                self.st.sse_keepalives += 1;
            }
        }
        c.rbuf = buf;
        c.rbuf.drain(..pos);
    }

    /// The WebSocket is open: join what the role joins.
    fn on_open(&mut self, c: &mut Conn, now: u64) -> io::Result<()> {
        match c.role {
            Role::Sub(k) | Role::Pub(k) => {
                let kind = ChKind::Broadcast;
                c.chans.push(Chan {
                    wire: format!("realtime:{}", self.cfg.broadcast_topic(k as usize)),
                    join_ref: 0,
                    st: ChSt::Joining,
                    kind,
                    delivered: 0,
                    tracked: false,
                });
            }
            Role::PersistPub => {
                for k in 0..self.cfg.persist_topics {
                    c.chans.push(Chan {
                        wire: format!("realtime:{}", self.cfg.persist_topic(k)),
                        join_ref: 0,
                        st: ChSt::Joining,
                        kind: ChKind::Persist(k as u32),
                        delivered: 0,
                        tracked: false,
                    });
                }
            }
            Role::Observer(k) => {
                c.chans.push(Chan {
                    wire: format!("realtime:{}", self.cfg.presence_topic(k as usize)),
                    join_ref: 0,
                    st: ChSt::Joining,
                    kind: ChKind::Presence,
                    delivered: 0,
                    tracked: false,
                });
            }
            Role::Churn | Role::Probe(_) | Role::Sse => {}
        }
        let ack = matches!(c.role, Role::Pub(_) | Role::PersistPub);
        let cycle = c.churn.as_ref().map(|ch| ch.cycle);
        let listens = cycle.is_none() || self.chance(50);
        for i in 0..c.chans.len() {
            let r = c.next_ref;
            c.next_ref += 1;
            c.chans[i].join_ref = r;
            let presence = match (c.role, c.chans[i].kind) {
                (Role::Observer(k), _) => format!(",\"presence\":{{\"key\":\"obs{k}\",\"enabled\":true}}"),
                (Role::Probe(k), _) => format!(",\"presence\":{{\"key\":\"probe{k}\",\"enabled\":true}}"),
                (Role::Churn, ChKind::Presence) => {
                    format!(",\"presence\":{{\"key\":\"c{}\",\"enabled\":{listens}}}", cycle.unwrap_or(0))
                }
                _ => String::new(),
            };
            let msg = format!(
                "[\"{r}\",\"{r}\",\"{}\",\"phx_join\",{{\"config\":{{\"broadcast\":{{\"self\":false,\"ack\":{ack}}}{presence},\"private\":false}}}}]",
                c.chans[i].wire
            );
            self.st.joins_sent += 1;
            self.push(c, msg.as_bytes(), r, What::Join(i), now)?;
        }
        Ok(())
    }

    /// One complete message; None when `c` was finished.
    fn message(&mut self, mut c: Conn, op: u8, m: &[u8], now: u64) -> Option<Conn> {
        match op {
            wire::OP_TEXT => self.text(c, m, now),
            wire::OP_BINARY => {
                self.st.err_protocol += 1;
                self.note(format!("{}: unexpected binary frame ({} bytes)", c.role.name(), m.len()));
                Some(c)
            }
            wire::OP_PING => {
                let p = m.to_vec();
                if let Err(e) = self.send_frame(&mut c, wire::OP_PONG, &p) {
                    self.fail(c, ErrKind::Closed, format!("send: {e}"));
                    return None;
                }
                Some(c)
            }
            wire::OP_PONG => Some(c),
            wire::OP_CLOSE => {
                c.got_close_frame = true;
                if c.st == St::Closing {
                    // The answer to ours; the server's EOF follows.
                    return Some(c);
                }
                let code = if m.len() >= 2 { u16::from_be_bytes([m[0], m[1]]) } else { 0 };
                let reason = String::from_utf8_lossy(m.get(2..).unwrap_or(&[])).into_owned();
                self.fail(c, ErrKind::Closed, format!("server close frame {code} {reason:?}"));
                None
            }
            _ => {
                self.fail(c, ErrKind::Protocol, format!("unknown opcode {op}"));
                None
            }
        }
    }

    fn text(&mut self, mut c: Conn, m: &[u8], now: u64) -> Option<Conn> {
        let Some(h) = phoenix_head(m) else {
            self.st.err_protocol += 1;
            let s = String::from_utf8_lossy(&m[..m.len().min(120)]).into_owned();
            self.note(format!("{}: unparsable message {s:?}", c.role.name()));
            return Some(c);
        };
        match h.event {
            b"broadcast" => {
                if let Role::Sub(_) = c.role {
                    self.st.delivered_steady += 1;
                    if let Some(f) = wire::scan_fields(h.payload) {
                        if f.seq == c.next_seq {
                            c.next_seq += 1;
                            c.uniq += 1;
                        } else if f.seq > c.next_seq {
                            self.st.steady_gaps += f.seq - c.next_seq;
                            c.next_seq = f.seq + 1;
                            c.uniq += 1;
                        } else {
                            self.st.steady_repeats += 1;
                        }
                        let us = (now.saturating_sub(f.t_ns) / 1000).clamp(1, 3_600_000_000);
                        let _ = self.hist.record(us);
                    }
                    return Some(c);
                }
                let Some(ch) = c.chans.iter_mut().find(|ch| ch.wire.as_bytes() == h.topic) else {
                    self.st.err_protocol += 1;
                    self.note(format!("{}: broadcast on a topic never joined", c.role.name()));
                    return Some(c);
                };
                ch.delivered += 1;
                if ch.st == ChSt::Left {
                    self.st.err_after_leave += 1;
                    let w = ch.wire.clone();
                    self.note(format!("{}: broadcast on {w} after its leave reply", c.role.name()));
                } else {
                    self.st.delivered_churn += 1;
                }
                Some(c)
            }
            b"phx_reply" => self.reply(c, &h, now),
            b"presence_state" => {
                self.st.presence_state_frames += 1;
                if matches!(c.role, Role::Observer(_) | Role::Probe(_)) {
                    let Ok(state) = serde_json::from_slice::<HashMap<String, Metas>>(h.payload) else {
                        self.st.err_protocol += 1;
                        self.note(format!("{}: unparsable presence_state", c.role.name()));
                        return Some(c);
                    };
                    c.members = state.into_iter().map(|(k, v)| (k, v.metas.len() as i64)).collect();
                    if let Role::Probe(_) = c.role {
                        let n = c.members.values().filter(|&&v| v > 0).count() as u64;
                        let topic = c.chans[0].wire.clone();
                        self.st.probe_members.push((topic, n));
                        c.probed = true;
                        self.send_close(&mut c, now);
                    }
                }
                Some(c)
            }
            b"presence_diff" => {
                self.st.presence_diff_frames += 1;
                if let Role::Observer(_) = c.role {
                    let Ok(d) = serde_json::from_slice::<Diff>(h.payload) else {
                        self.st.err_protocol += 1;
                        self.note("presence observer: unparsable presence_diff".into());
                        return Some(c);
                    };
                    for (k, v) in d.joins {
                        self.st.observer_joins += v.metas.len() as u64;
                        *c.members.entry(k).or_default() += v.metas.len() as i64;
                    }
                    for (k, v) in d.leaves {
                        self.st.observer_leaves += v.metas.len() as u64;
                        let e = c.members.entry(k.clone()).or_default();
                        *e -= v.metas.len() as i64;
                        if *e < 0 {
                            self.st.err_protocol += 1;
                            self.note(format!("presence observer: leave of {k}, which had not joined"));
                            *e = 0;
                        }
                        if *e == 0 {
                            c.members.remove(&k);
                        }
                    }
                }
                Some(c)
            }
            b"phx_close" => {
                let left = c.chans.iter().any(|ch| ch.wire.as_bytes() == h.topic && ch.st == ChSt::Left);
                if !left {
                    self.st.err_protocol += 1;
                    let t = String::from_utf8_lossy(h.topic).into_owned();
                    self.note(format!("{}: phx_close on {t} without a leave", c.role.name()));
                }
                Some(c)
            }
            other => {
                self.st.err_protocol += 1;
                let e = String::from_utf8_lossy(other).into_owned();
                let s = String::from_utf8_lossy(&m[..m.len().min(160)]).into_owned();
                self.note(format!("{}: unexpected {e}: {s}", c.role.name()));
                Some(c)
            }
        }
    }

    fn reply(&mut self, mut c: Conn, h: &Head<'_>, now: u64) -> Option<Conn> {
        let r = h.msg_ref.and_then(|b| std::str::from_utf8(b).ok()).and_then(|s| s.parse::<u64>().ok());
        let Some(r) = r else {
            self.st.err_protocol += 1;
            self.note(format!("{}: reply without a numeric ref", c.role.name()));
            return Some(c);
        };
        let Some(i) = c.pend.iter().position(|p| p.r == r) else {
            if r < c.next_ref {
                self.st.late_replies += 1;
            } else {
                self.st.err_protocol += 1;
                self.note(format!("{}: reply to ref {r}, never sent", c.role.name()));
            }
            return Some(c);
        };
        let p = c.pend.remove(i).expect("index");
        let ok = h.payload.starts_with(b"{\"status\":\"ok\"");
        if !ok {
            self.st.err_protocol += 1;
            let s = String::from_utf8_lossy(&h.payload[..h.payload.len().min(160)]).into_owned();
            let t = String::from_utf8_lossy(h.topic).into_owned();
            self.note(format!("{}: {} on {t}: {s}", c.role.name(), p.what.name()));
            if c.role == Role::Churn && matches!(p.what, What::Join(_) | What::Leave(_) | What::Untrack(_)) {
                self.finish(c, true);
                return None;
            }
        }
        match p.what {
            What::Heartbeat => self.st.heartbeat_replies += 1,
            What::Ack(None) => self.st.publish_acked += u64::from(ok),
            What::Ack(Some((t, seq))) => {
                if ok {
                    self.st.ws_persist_acked += 1;
                    self.ledger.lock().unwrap().acked[t as usize].push((WRITER_WS, seq));
                }
            }
            What::Track(i) => {
                if ok {
                    self.st.tracks_ok += 1;
                    c.chans[i].tracked = true;
                }
            }
            What::Untrack(i) => {
                self.st.untracks_ok += u64::from(ok);
                c.chans[i].tracked = false;
                if c.churn.as_ref().is_some_and(|ch| ch.stage == Stage::Untracking) {
                    self.leave(c, now);
                    return None;
                }
            }
            What::Join(i) => {
                if ok {
                    self.st.joins_ok += 1;
                    c.chans[i].st = ChSt::Joined;
                } else if c.role.steady() {
                    // A steady connection without its channel is useless: count it as failed.
                    self.fail(c, ErrKind::Protocol, "join refused".into());
                    return None;
                }
                if c.chans.iter().all(|ch| ch.st == ChSt::Joined) {
                    return self.all_joined(c, now);
                }
            }
            What::Leave(i) => {
                if ok {
                    self.st.leaves_ok += 1;
                }
                c.chans[i].st = ChSt::Left;
                if c.chans.iter().all(|ch| ch.st == ChSt::Left) {
                    let ch = c.churn.as_mut().expect("churn");
                    ch.stage = Stage::Done;
                    let style = ch.style;
                    if style == Style::LeaveClose {
                        self.send_close(&mut c, now);
                    } else {
                        self.finish(c, true);
                        return None;
                    }
                }
            }
        }
        Some(c)
    }

    fn all_joined(&mut self, mut c: Conn, now: u64) -> Option<Conn> {
        match c.role {
            Role::Churn => {
                let _ = self.join_hist.record(((now - c.t0) / 1000).clamp(1, 3_600_000_000));
                let (hold, retrack, cycle) = {
                    let ch = c.churn.as_mut().expect("churn");
                    ch.stage = Stage::Holding;
                    ch.joined_at = now;
                    (ch.hold_ns, ch.retrack, ch.cycle)
                };
                self.timers.push(Reverse((now + hold, c.slot, c.gen, 0)));
                if retrack {
                    self.timers.push(Reverse((now + hold / 2, c.slot, c.gen, 1)));
                }
                if let Some(i) = c.chans.iter().position(|ch| ch.kind == ChKind::Presence) {
                    let state = format!("{{\"cycle\":{cycle},\"v\":1}}");
                    if let Err(e) = self.presence_push(&mut c, i, Some(state.as_bytes()), now) {
                        self.fail(c, ErrKind::Closed, format!("send: {e}"));
                        return None;
                    }
                }
            }
            Role::Probe(_) => {
                c.deadline = now + self.cfg.timeout_ms * 1_000_000;
            }
            _ => {
                if self.phase == Phase::Connecting && !c.ready_counted {
                    c.ready_counted = true;
                    self.st.steady_joined += 1;
                    self.connecting_steady -= 1;
                }
            }
        }
        Some(c)
    }
}

#[derive(Clone, Copy, Debug)]
enum ErrKind {
    Connect,
    Timeout,
    Protocol,
    Closed,
}

#[derive(serde::Deserialize)]
struct Metas {
    #[serde(default)]
    metas: Vec<serde::de::IgnoredAny>,
}

#[derive(serde::Deserialize)]
struct Diff {
    #[serde(default)]
    joins: HashMap<String, Metas>,
    #[serde(default)]
    leaves: HashMap<String, Metas>,
}

/// The four header elements of a Phoenix v2 array message and its payload.
struct Head<'a> {
    msg_ref: Option<&'a [u8]>,
    topic: &'a [u8],
    event: &'a [u8],
    payload: &'a [u8],
}

/// Splits `[join_ref, ref, topic, event, payload]` without parsing the payload (the header
/// elements are `null` or strings without escapes, as corecast sends them).
fn phoenix_head(m: &[u8]) -> Option<Head<'_>> {
    if m.first() != Some(&b'[') || m.last() != Some(&b']') {
        return None;
    }
    let mut i = 1;
    let mut parts: [Option<&[u8]>; 4] = [None; 4];
    for p in &mut parts {
        match m.get(i)? {
            b'n' => {
                if m.get(i..i + 4)? != b"null" {
                    return None;
                }
                i += 4;
            }
            b'"' => {
                let end = i + 1 + memchr::memchr(b'"', &m[i + 1..])?;
                *p = Some(&m[i + 1..end]);
                i = end + 1;
            }
            _ => return None,
        }
        if m.get(i) != Some(&b',') {
            return None;
        }
        i += 1;
    }
    Some(Head { msg_ref: parts[1], topic: parts[2]?, event: parts[3]?, payload: &m[i..m.len() - 1] })
}

fn shutdown_write(fd: RawFd) {
    // SAFETY: shutdown(2) on a socket we own.
    unsafe { libc::shutdown(fd, libc::SHUT_WR) };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn head_of_phoenix_messages() {
        let m = br#"[null,null,"realtime:x-b0","broadcast",{"type":"broadcast","event":"m","payload":{"s":1}}]"#;
        let h = phoenix_head(m).unwrap();
        assert_eq!(h.topic, b"realtime:x-b0");
        assert_eq!(h.event, b"broadcast");
        assert!(h.msg_ref.is_none());
        assert!(h.payload.starts_with(b"{\"type\""));
        assert!(h.payload.ends_with(b"}}"));
        let r = br#"["3","7","realtime:x","phx_reply",{"status":"ok","response":{}}]"#;
        let h = phoenix_head(r).unwrap();
        assert_eq!(h.msg_ref, Some(&b"7"[..]));
        assert_eq!(h.event, b"phx_reply");
        assert_eq!(h.payload, br#"{"status":"ok","response":{}}"#);
        assert!(phoenix_head(b"[1,2]").is_none());
        assert!(phoenix_head(b"{}").is_none());
    }

    #[test]
    fn presence_payloads_parse() {
        let d: Diff = serde_json::from_slice(br#"{"joins":{"c1":{"metas":[{"phx_ref":"a"}]}},"leaves":{}}"#).unwrap();
        assert_eq!(d.joins["c1"].metas.len(), 1);
        let s: HashMap<String, Metas> = serde_json::from_slice(br#"{}"#).unwrap();
        assert!(s.is_empty());
    }
}
