//! The soak scenario's persisted messages: the REST writer thread, the ledger of every
//! acknowledged persisted message (REST `202`s and WebSocket acks), and the history checks.
//!
//! Each persist topic keeps the newest `--history-bound` persisted messages (corecast's
//! `--history-max-messages`), so a soak does not grow the server's memory with its history.
//! The check therefore has two parts:
//! - **rolling** (every `--verify-secs`): every message acknowledged since the previous round
//!   must be in its topic's history (`GET /realtime/v1/api/channels/{topic}/messages`), unless
//!   `--history-bound` newer messages were acknowledged on that topic since (then the bound may
//!   have trimmed it: counted as unverifiable, which the default rates never reach);
//! - **final** (after the load): every acknowledged message that the bound keeps (fewer than
//!   `--history-bound` newer ones on its topic) must be there, exactly once.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddrV4;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::history::{self, Http, Lat};
use crate::wire;
use crate::worker::new_hist;

/// Writer ids in the payload's `"p"` field.
pub const WRITER_REST: u64 = 1;
pub const WRITER_WS: u64 = 2;

/// Messages that may be sequenced (and so count against the bound) but not yet acknowledged
/// while a rolling check reads: one REST request (≤ 5) plus the WebSocket publisher's acks
/// waiting for a log sync.
const IN_FLIGHT_MARGIN: u64 = 64;

#[derive(Default)]
pub struct Ledger {
    /// Per persist topic: (writer, seq) of every acknowledged persisted message, in ack order.
    pub acked: Vec<Vec<(u64, u64)>>,
    /// Per persist topic: messages sent but not acknowledged (they may still be stored).
    pub unacked: Vec<u64>,
}

impl Ledger {
    pub fn new(topics: usize) -> Ledger {
        Ledger { acked: vec![Vec::new(); topics], unacked: vec![0; topics] }
    }
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct RestStats {
    pub connections: u64,
    pub requests_ok: u64,
    pub requests_failed: u64,
    /// Requests answered 202 but slower than `--timeout-ms`.
    pub requests_slow: u64,
    pub messages_sent: u64,
    pub messages_acked: u64,
    pub latency: Option<Lat>,
    pub errors: Vec<String>,
}

pub struct RestCfg {
    pub addr: SocketAddrV4,
    pub topics: Vec<String>,
    /// Messages per second, all topics together.
    pub rate: f64,
    pub payload: usize,
    pub slow_ms: u64,
}

fn note(v: &mut Vec<String>, t0: Instant, e: String) {
    if v.len() < 20 {
        v.push(format!("[{:.1}s] {e}", t0.elapsed().as_secs_f64()));
    }
}

/// Publishes persisted messages over REST until `stop`: alternately one message
/// (`POST /realtime/v1/api/broadcast/{topic}/events/m?persist=true`) and a batch of five
/// (`POST /realtime/v1/api/broadcast`, `"persist": true` each), topics in turn, one request in
/// flight, `rate` messages/s.
pub fn rest_writer(cfg: RestCfg, stop: Arc<AtomicBool>, ledger: Arc<Mutex<Ledger>>, stats: Arc<Mutex<RestStats>>) {
    let start = Instant::now();
    let mut conn: Option<Http> = None;
    let mut body = Vec::new();
    let (mut sent, mut req, mut seq) = (0u64, 0u64, 0u64);
    let mut hist = new_hist();
    while !stop.load(Ordering::Relaxed) && cfg.rate > 0.0 && !cfg.topics.is_empty() {
        let due = start + Duration::from_secs_f64(sent as f64 / cfg.rate);
        let now = Instant::now();
        if due > now {
            std::thread::sleep((due - now).min(Duration::from_millis(100)));
            continue;
        }
        if conn.is_none() {
            match Http::connect(cfg.addr) {
                Ok(c) => {
                    conn = Some(c);
                    stats.lock().unwrap().connections += 1;
                }
                Err(e) => {
                    let mut s = stats.lock().unwrap();
                    s.requests_failed += 1;
                    note(&mut s.errors, start, format!("connect: {e}"));
                    drop(s);
                    std::thread::sleep(Duration::from_secs(1));
                    continue;
                }
            }
        }
        let n = if req % 2 == 0 { 1 } else { 5 };
        // Each topic gets single and batch publishes alike.
        let t = ((req / 2) % cfg.topics.len() as u64) as usize;
        req += 1;
        let t0 = Instant::now();
        let c = conn.as_mut().expect("connected");
        let r = history::publish(c, &mut body, &cfg.topics[t], WRITER_REST, seq, n, cfg.payload);
        let el = t0.elapsed();
        sent += n as u64;
        let mut s = stats.lock().unwrap();
        s.messages_sent += n as u64;
        match r {
            Ok((202, _)) => {
                ledger.lock().unwrap().acked[t].extend((seq..seq + n as u64).map(|q| (WRITER_REST, q)));
                s.requests_ok += 1;
                s.messages_acked += n as u64;
                let _ = hist.record((el.as_micros() as u64).clamp(1, 3_600_000_000));
                if el > Duration::from_millis(cfg.slow_ms) {
                    s.requests_slow += 1;
                    note(&mut s.errors, start, format!("{}: 202 after {:.1} s", cfg.topics[t], el.as_secs_f64()));
                }
            }
            Ok((status, b)) => {
                ledger.lock().unwrap().unacked[t] += n as u64;
                s.requests_failed += 1;
                let text = String::from_utf8_lossy(&b[..b.len().min(200)]).into_owned();
                note(&mut s.errors, start, format!("{}: {status} {text}", cfg.topics[t]));
            }
            Err(e) => {
                ledger.lock().unwrap().unacked[t] += n as u64;
                s.requests_failed += 1;
                note(&mut s.errors, start, format!("{}: {e}", cfg.topics[t]));
                conn = None;
            }
        }
        seq += n as u64;
    }
    stats.lock().unwrap().latency = Some(Lat::of(&hist));
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct VerifyStats {
    pub rounds: u64,
    pub pages: u64,
    /// Acknowledged messages found in the history at their first check after the ack.
    pub verified: u64,
    /// Acknowledged messages missing at their first check with fewer than the bound newer ones
    /// acknowledged on their topic: lost.
    pub lost: u64,
    /// Missing at their first check, but the bound may have trimmed them (checked too late).
    pub unverifiable: u64,
    /// Final check: acknowledged messages the bound keeps, and those of them missing.
    pub final_checked: u64,
    pub final_missing: u64,
    /// Final check: messages stored more than once; stored but never acknowledged.
    pub duplicates: u64,
    pub unacknowledged_found: u64,
    /// History pages whose offsets were not strictly decreasing (newest first).
    pub out_of_order: u64,
    pub unparsable: u64,
    pub http_errors: u64,
    pub samples: Vec<String>,
}

#[derive(Deserialize)]
struct Page<'a> {
    #[serde(borrow)]
    messages: Vec<PageMsg<'a>>,
}

#[derive(Deserialize)]
struct PageMsg<'a> {
    offset: u64,
    #[serde(borrow)]
    payload: &'a RawValue,
}

pub struct Verifier {
    addr: SocketAddrV4,
    topics: Vec<String>,
    bound: u64,
    /// Per topic: ledger entries checked so far.
    upto: Vec<usize>,
    conn: Option<Http>,
    t0: Instant,
    pub stats: VerifyStats,
}

impl Verifier {
    pub fn new(addr: SocketAddrV4, topics: Vec<String>, bound: u64) -> Verifier {
        let n = topics.len();
        Verifier {
            addr,
            topics,
            bound,
            upto: vec![0; n],
            conn: None,
            t0: Instant::now(),
            stats: VerifyStats::default(),
        }
    }

    /// Closes the keep-alive connection (before the file-descriptor check).
    pub fn disconnect(&mut self) {
        self.conn = None;
    }

    fn note(&mut self, e: String) {
        note(&mut self.stats.samples, self.t0, e);
    }

    /// The newest `bound` persisted messages of topic `t`: (writer, seq) → times stored.
    fn read_topic(&mut self, t: usize) -> Result<HashMap<(u64, u64), u32>, String> {
        let topic = self.topics[t].clone();
        let limit = self.bound.clamp(1, 1000);
        let mut found = HashMap::new();
        let mut before: Option<u64> = None;
        let mut total = 0u64;
        for _ in 0..(self.bound / limit + 2) {
            let path = match before {
                None => format!("/realtime/v1/api/channels/{topic}/messages?limit={limit}"),
                Some(b) => format!("/realtime/v1/api/channels/{topic}/messages?limit={limit}&before={b}"),
            };
            if self.conn.is_none() {
                self.conn = Some(Http::connect(self.addr).map_err(|e| format!("connect: {e}"))?);
            }
            let r = self.conn.as_mut().expect("connected").call("GET", &path, b"");
            let (status, body) = match r {
                Ok(x) => x,
                Err(e) => {
                    self.conn = None;
                    return Err(format!("{path}: {e}"));
                }
            };
            self.stats.pages += 1;
            if status != 200 {
                return Err(format!("{path}: {status} {}", String::from_utf8_lossy(&body[..body.len().min(200)])));
            }
            let page: Page<'_> = serde_json::from_slice(&body).map_err(|e| format!("{path}: {e}"))?;
            let n = page.messages.len() as u64;
            let mut prev = before.unwrap_or(u64::MAX);
            for m in &page.messages {
                if m.offset >= prev {
                    self.stats.out_of_order += 1;
                }
                prev = m.offset;
                match wire::scan_fields(m.payload.get().as_bytes()) {
                    Some(f) => *found.entry((f.publisher, f.seq)).or_insert(0) += 1,
                    None => self.stats.unparsable += 1,
                }
            }
            total += n;
            if n < limit || total >= self.bound {
                break;
            }
            before = Some(prev);
        }
        Ok(found)
    }

    /// A rolling check: every message acknowledged since the last round is in the history.
    pub fn round(&mut self, ledger: &Mutex<Ledger>) {
        self.stats.rounds += 1;
        for t in 0..self.topics.len() {
            let (snap, n0) = {
                let l = ledger.lock().unwrap();
                (l.acked[t][self.upto[t]..].to_vec(), l.acked[t].len())
            };
            if snap.is_empty() {
                continue;
            }
            let found = match self.read_topic(t) {
                Ok(f) => f,
                Err(e) => {
                    self.stats.http_errors += 1;
                    self.note(e);
                    continue;
                }
            };
            let (n1, unacked) = {
                let l = ledger.lock().unwrap();
                (l.acked[t].len(), l.unacked[t])
            };
            for (j, key) in snap.iter().enumerate() {
                let idx = self.upto[t] + j;
                let newer = (n1 - idx - 1) as u64 + unacked + IN_FLIGHT_MARGIN;
                if found.contains_key(key) {
                    self.stats.verified += 1;
                } else if newer >= self.bound {
                    self.stats.unverifiable += 1;
                } else {
                    self.stats.lost += 1;
                    let e = format!(
                        "{}: writer {} seq {} acknowledged but not in the history",
                        self.topics[t], key.0, key.1
                    );
                    self.note(e);
                }
            }
            self.upto[t] = n0;
        }
    }

    /// After the load: everything the bound keeps is there exactly once.
    pub fn final_check(&mut self, ledger: &Mutex<Ledger>) {
        for t in 0..self.topics.len() {
            let (entries, unacked) = {
                let l = ledger.lock().unwrap();
                (l.acked[t].clone(), l.unacked[t])
            };
            let found = match self.read_topic(t) {
                Ok(f) => f,
                Err(e) => {
                    self.stats.http_errors += 1;
                    self.note(format!("final: {e}"));
                    continue;
                }
            };
            let n = entries.len();
            for (idx, key) in entries.iter().enumerate() {
                let newer = (n - idx - 1) as u64 + unacked;
                let present = found.contains_key(key);
                if idx >= self.upto[t] {
                    // Not checked by a rolling round yet: this is its first check.
                    if present {
                        self.stats.verified += 1;
                    } else if newer >= self.bound {
                        self.stats.unverifiable += 1;
                    }
                }
                if newer < self.bound {
                    self.stats.final_checked += 1;
                    if !present {
                        self.stats.final_missing += 1;
                        let e = format!(
                            "final: {}: writer {} seq {} acknowledged but not in the history",
                            self.topics[t], key.0, key.1
                        );
                        self.note(e);
                    }
                }
            }
            self.upto[t] = n;
            self.stats.duplicates += found.values().map(|&v| u64::from(v.saturating_sub(1))).sum::<u64>();
            let acked: HashSet<&(u64, u64)> = entries.iter().collect();
            self.stats.unacknowledged_found += found.keys().filter(|k| !acked.contains(k)).count() as u64;
        }
    }
}

/// The rolling checks, every `every` until `stop`; returns the verifier for the final check.
pub fn verifier_thread(
    mut v: Verifier,
    every: Duration,
    stop: Arc<AtomicBool>,
    ledger: Arc<Mutex<Ledger>>,
    shared: Arc<Mutex<VerifyStats>>,
) -> Verifier {
    let mut next = Instant::now() + every;
    while !stop.load(Ordering::Relaxed) {
        if Instant::now() < next {
            std::thread::sleep(Duration::from_millis(100));
            continue;
        }
        next += every;
        v.round(&ledger);
        *shared.lock().unwrap() = v.stats.clone();
    }
    v
}
