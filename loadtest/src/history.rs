//! The history scenario (corecast only: the peers have no history API). REST only, so it runs in
//! the coordinator process (pinned to the generator CPU) with one blocking keep-alive connection
//! per thread instead of the worker fleet.
//!
//! 1. **Write**: `--writers` connections publish persisted messages (`"persist": true` per message
//!    in batch bodies of `--batch`, or `?persist=true` single publishes with `--batch 1`), one
//!    request in flight each, as fast as the server answers (or `--rate` messages/s in total),
//!    for `--seconds` or until `--messages` were sent. Accepted = messages in requests answered
//!    202. Request latency = send (or scheduled send, with `--rate`) → 202.
//! 2. **Verify** (optionally after `--restart term|kill`): page through
//!    `GET /realtime/v1/api/channels/{topic}/messages?limit=1000&before=<offset>` newest first and
//!    check that every accepted message is there exactly once (payloads carry writer and sequence).
//! 3. **Read latency**: store `--seed-messages` on a fresh topic, then `--readers` keep-alive
//!    connections make `--requests` requests, alternately `?limit=50` (the newest page) and
//!    `?limit=50&before=<random offset>`; HDR percentiles for each kind.

use std::fmt::Write as _;
use std::io::{self, Read, Write};
use std::net::{SocketAddrV4, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::coord::{ms, si};
use crate::scenarios::{Restart, RunArgs, RunResult, ScenarioKind};
use crate::servers::{self, Running, ServerKind, ServerOpts};
use crate::sys;
use crate::wire;
use crate::worker::new_hist;

/// Latency percentiles of one kind of request.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Lat {
    pub count: u64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
    pub mean_ms: f64,
    pub ladder: Vec<(f64, f64)>,
}

impl Lat {
    pub(crate) fn of(h: &Histogram<u64>) -> Lat {
        if h.is_empty() {
            return Lat::default();
        }
        let qs = [0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99, 0.995, 0.999, 0.9995, 0.9999, 0.99999];
        let mut ladder: Vec<(f64, f64)> = qs.iter().map(|&q| (q, ms(h.value_at_quantile(q)))).collect();
        ladder.push((1.0, ms(h.max())));
        Lat {
            count: h.len(),
            p50_ms: ms(h.value_at_quantile(0.5)),
            p90_ms: ms(h.value_at_quantile(0.9)),
            p99_ms: ms(h.value_at_quantile(0.99)),
            p999_ms: ms(h.value_at_quantile(0.999)),
            max_ms: ms(h.max()),
            mean_ms: h.mean() / 1000.0,
            ladder,
        }
    }
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct HistorySummary {
    pub topics: Vec<String>,
    pub writers: usize,
    pub batch: usize,
    /// Messages/s in total (None: as fast as the server answers).
    pub target_rate: Option<f64>,
    pub payload: usize,
    // write
    pub write_secs: f64,
    pub sent: u64,
    pub accepted: u64,
    pub accepted_per_sec: f64,
    pub requests_ok: u64,
    pub requests_failed: u64,
    /// POST → 202 (from the scheduled send with --rate).
    pub write_latency: Lat,
    pub write_errors: Vec<String>,
    pub server_cpu_secs_write: Option<f64>,
    pub server_cpu_us_per_msg: Option<f64>,
    /// Seconds the server waited for its CPU during the writes (other processes on it).
    pub server_run_wait_write: Option<f64>,
    pub generator_cpu_write: f64,
    /// (second, accepted messages/s).
    pub timeline: Vec<(f64, f64)>,
    // verify
    pub restart: Option<Restart>,
    /// Wait between the last 202 and the restart, ms.
    pub restart_after_ms: u64,
    /// Seconds from the restart to the server answering again (log recovery).
    pub restart_secs: Option<f64>,
    /// Accepted messages found in the history exactly once / missing / found more than once.
    pub readable: u64,
    pub missing: u64,
    /// Missing messages older than a message of the same writer that was found (a hole, not a
    /// lost tail).
    pub missing_holes: u64,
    pub duplicated: u64,
    /// Messages found that were never acknowledged (sent in a request that failed).
    pub unacknowledged_found: u64,
    pub unparsable: u64,
    pub pages: u64,
    pub verify_secs: f64,
    pub verify_msgs_per_sec: f64,
    pub verify_errors: Vec<String>,
    // read latency
    pub seed_messages: u64,
    pub readers: usize,
    pub read_requests: u64,
    pub read_failed: u64,
    /// Pages with fewer than 50 messages (offsets not contiguous, or the seed not all stored).
    pub read_short_pages: u64,
    pub reads_per_sec: f64,
    pub read_latest: Lat,
    pub read_before: Lat,
    pub server_cpu_us_per_read: Option<f64>,
    pub read_errors: Vec<String>,
}

/// A blocking HTTP/1.1 keep-alive connection.
pub(crate) struct Http {
    s: TcpStream,
    buf: Vec<u8>,
    host: String,
    req: Vec<u8>,
}

impl Http {
    pub(crate) fn connect(addr: SocketAddrV4) -> io::Result<Http> {
        let s = TcpStream::connect_timeout(&addr.into(), Duration::from_secs(5))?;
        s.set_nodelay(true)?;
        s.set_read_timeout(Some(Duration::from_secs(30)))?;
        Ok(Http { s, buf: Vec::with_capacity(1 << 16), host: addr.to_string(), req: Vec::with_capacity(1 << 16) })
    }

    fn send(&mut self, method: &str, path: &str, body: &[u8]) -> io::Result<()> {
        self.req.clear();
        let _ = write!(
            self.req,
            "{method} {path} HTTP/1.1\r\nHost: {}\r\napikey: loadtest\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            self.host,
            body.len()
        );
        self.req.extend_from_slice(body);
        self.s.write_all(&self.req)
    }

    /// Reads one response: (status, body). Responses carry a Content-Length.
    fn recv(&mut self) -> io::Result<(u16, Vec<u8>)> {
        let mut chunk = [0u8; 65536];
        loop {
            if let Some((status, hl, cl)) = wire::parse_http_response(&self.buf) {
                if self.buf.len() >= hl + cl {
                    let body = self.buf[hl..hl + cl].to_vec();
                    self.buf.drain(..hl + cl);
                    return Ok((status, body));
                }
            }
            let n = self.s.read(&mut chunk)?;
            if n == 0 {
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "connection closed by the server"));
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    pub(crate) fn call(&mut self, method: &str, path: &str, body: &[u8]) -> io::Result<(u16, Vec<u8>)> {
        self.send(method, path, body)?;
        self.recv()
    }
}

fn note(errors: &mut Vec<String>, e: String) {
    if errors.len() < 8 {
        errors.push(e);
    }
}

/// Body of a persisted batch: `{"messages":[{"topic","event","persist":true,"payload"},…]}`.
fn batch_body(out: &mut Vec<u8>, topic: &str, writer: u64, first_seq: u64, n: usize, size: usize) {
    out.clear();
    out.extend_from_slice(b"{\"messages\":[");
    for i in 0..n {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(b"{\"topic\":\"");
        out.extend_from_slice(topic.as_bytes());
        out.extend_from_slice(b"\",\"event\":\"m\",\"persist\":true,\"payload\":");
        wire::push_payload(out, first_seq + i as u64, sys::now_ns(), writer, size);
        out.push(b'}');
    }
    out.extend_from_slice(b"]}");
}

/// Send `n` messages starting at `first_seq` in one request; Ok(status).
pub(crate) fn publish(
    c: &mut Http,
    body: &mut Vec<u8>,
    topic: &str,
    writer: u64,
    first_seq: u64,
    n: usize,
    size: usize,
) -> io::Result<(u16, Vec<u8>)> {
    if n == 1 {
        body.clear();
        wire::push_payload(body, first_seq, sys::now_ns(), writer, size);
        let path = format!("/realtime/v1/api/broadcast/{topic}/events/m?persist=true");
        let b = std::mem::take(body);
        let r = c.call("POST", &path, &b);
        *body = b;
        r
    } else {
        batch_body(body, topic, writer, first_seq, n, size);
        let b = std::mem::take(body);
        let r = c.call("POST", "/realtime/v1/api/broadcast", &b);
        *body = b;
        r
    }
}

struct WriterOut {
    /// acked[seq] = the request carrying `seq` was answered 202.
    acked: Vec<bool>,
    requests_ok: u64,
    requests_failed: u64,
    hist: Histogram<u64>,
    errors: Vec<String>,
}

struct WriteShared {
    stop: AtomicBool,
    reserved: AtomicU64,
    accepted: AtomicU64,
}

#[allow(clippy::too_many_arguments)]
fn writer(
    addr: SocketAddrV4,
    w: usize,
    writers: usize,
    topic: String,
    batch: usize,
    size: usize,
    limit: u64,
    rate: Option<f64>,
    start: Instant,
    sh: Arc<WriteShared>,
) -> WriterOut {
    let mut out =
        WriterOut { acked: Vec::new(), requests_ok: 0, requests_failed: 0, hist: new_hist(), errors: Vec::new() };
    let mut c = match Http::connect(addr) {
        Ok(c) => c,
        Err(e) => {
            note(&mut out.errors, format!("writer {w}: connect: {e}"));
            return out;
        }
    };
    let mut body = Vec::with_capacity(batch * (size + 64) + 64);
    // With --rate: request j of writer w is due at start + (w / writers + j) × interval.
    let interval = rate.map(|r| Duration::from_secs_f64(batch as f64 * writers as f64 / r.max(1e-3)));
    let mut j = 0u32;
    let mut seq = 0u64;
    while !sh.stop.load(Ordering::Relaxed) {
        let got = sh.reserved.fetch_add(batch as u64, Ordering::Relaxed);
        if got >= limit {
            break;
        }
        let n = (limit - got).min(batch as u64) as usize;
        let due = interval.map(|iv| start + iv.mul_f64(w as f64 / writers as f64 + j as f64));
        if let Some(d) = due {
            let now = Instant::now();
            if d > now {
                std::thread::sleep(d - now);
            }
        }
        j += 1;
        let t0 = due.unwrap_or_else(Instant::now).min(Instant::now());
        let r = publish(&mut c, &mut body, &topic, w as u64, seq, n, size);
        let ok = matches!(r, Ok((202, _)));
        out.acked.resize(out.acked.len() + n, ok);
        seq += n as u64;
        match r {
            Ok((202, _)) => {
                out.requests_ok += 1;
                sh.accepted.fetch_add(n as u64, Ordering::Relaxed);
                let _ = out.hist.record((t0.elapsed().as_micros() as u64).clamp(1, 3_600_000_000));
            }
            Ok((status, b)) => {
                out.requests_failed += 1;
                let text = String::from_utf8_lossy(&b[..b.len().min(200)]).into_owned();
                note(&mut out.errors, format!("writer {w}: {status} {text}"));
            }
            Err(e) => {
                out.requests_failed += 1;
                note(&mut out.errors, format!("writer {w}: {e}"));
                match Http::connect(addr) {
                    Ok(nc) => c = nc,
                    Err(e) => {
                        note(&mut out.errors, format!("writer {w}: reconnect: {e}"));
                        break;
                    }
                }
            }
        }
    }
    out
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

pub fn run(
    srv: &mut Running,
    args: &RunArgs,
    r: &mut RunResult,
    label: &str,
    sopts: &ServerOpts,
) -> Result<(), String> {
    let quiet = args.quiet;
    let batch = args.batch.clamp(1, 1000);
    let writers = args.writers.max(1);
    let size = args.payload_for(ScenarioKind::History);
    let (_, hms) = sys::utc_date_time();
    let prefix = format!("lt{hms}p{}", std::process::id());
    let topics: Vec<String> = (0..args.topics.max(1)).map(|i| format!("{prefix}h{i}")).collect();
    let mut h = HistorySummary {
        topics: topics.clone(),
        writers,
        batch,
        target_rate: args.rate,
        payload: size,
        restart: args.restart,
        seed_messages: args.seed_messages,
        readers: args.readers.max(1),
        ..Default::default()
    };
    r.clients = writers + h.readers;
    r.workers = 0;

    // 1. Write.
    let limit = args.messages.unwrap_or(u64::MAX);
    let sh = Arc::new(WriteShared {
        stop: AtomicBool::new(false),
        reserved: AtomicU64::new(0),
        accepted: AtomicU64::new(0),
    });
    let cpu0 = srv.cpu_secs();
    let wait0 = srv.run_wait_secs();
    let gen0 = sys::process_cpu_ns();
    let start = Instant::now();
    let handles: Vec<_> = (0..writers)
        .map(|w| {
            let (sh, topic, addr, rate) = (sh.clone(), topics[w % topics.len()].clone(), srv.addr, args.rate);
            std::thread::spawn(move || writer(addr, w, writers, topic, batch, size, limit, rate, start, sh))
        })
        .collect();
    let mut last = (0.0f64, 0u64);
    while !handles.iter().all(|t| t.is_finished()) {
        std::thread::sleep(Duration::from_millis(50));
        let el = start.elapsed().as_secs_f64();
        if el >= args.seconds && args.messages.is_none() {
            sh.stop.store(true, Ordering::Relaxed);
        }
        if el - last.0 >= 1.0 {
            let a = sh.accepted.load(Ordering::Relaxed);
            let per = (a - last.1) as f64 / (el - last.0);
            h.timeline.push((el, per));
            if !quiet {
                eprintln!("[{el:4.0}s] {label}: accepted {}/s (total {})", si(per), si(a as f64));
            }
            last = (el, a);
        }
    }
    h.write_secs = start.elapsed().as_secs_f64();
    let cpu1 = srv.cpu_secs();
    h.server_run_wait_write = wait0.zip(srv.run_wait_secs()).map(|(a, b)| b - a);
    h.generator_cpu_write = (sys::process_cpu_ns() - gen0) as f64 / 1e9;
    let mut acked: Vec<Vec<bool>> = Vec::new();
    let mut wh = new_hist();
    for t in handles {
        let o = t.join().map_err(|_| "a writer thread panicked".to_string())?;
        h.requests_ok += o.requests_ok;
        h.requests_failed += o.requests_failed;
        wh.add(&o.hist).map_err(|e| e.to_string())?;
        for e in o.errors {
            note(&mut h.write_errors, e);
        }
        acked.push(o.acked);
    }
    h.sent = acked.iter().map(|a| a.len() as u64).sum();
    h.accepted = acked.iter().map(|a| a.iter().filter(|x| **x).count() as u64).sum();
    h.accepted_per_sec = h.accepted as f64 / h.write_secs.max(1e-3);
    h.write_latency = Lat::of(&wh);
    h.server_cpu_secs_write = cpu0.zip(cpu1).map(|(a, b)| b - a);
    h.server_cpu_us_per_msg = h.server_cpu_secs_write.filter(|_| h.accepted > 0).map(|c| c * 1e6 / h.accepted as f64);
    if !quiet {
        eprintln!(
            "{label}: wrote {} persisted messages ({} accepted, {}/s) in {:.1} s, POST→202 p50 {:.2} ms p99 {:.2} ms",
            h.sent,
            h.accepted,
            si(h.accepted_per_sec),
            h.write_secs,
            h.write_latency.p50_ms,
            h.write_latency.p99_ms
        );
    }

    // Optional restart: what the log recovers.
    if let Some(how) = args.restart {
        if args.addr.is_some() {
            r.notes.push("--restart ignored: the server was not started by the tool (--addr)".into());
        } else {
            std::thread::sleep(Duration::from_millis(args.restart_after_ms));
            h.restart_after_ms = args.restart_after_ms;
            match how {
                Restart::Term => srv.stop(),
                Restart::Kill => srv.kill(),
            }
            let t = Instant::now();
            *srv = servers::start(ServerKind::Corecast, sopts).map_err(|e| format!("restart: {e}"))?;
            h.restart_secs = Some(t.elapsed().as_secs_f64());
            if !quiet {
                eprintln!(
                    "{label}: restarted the server ({how:?}) in {:.2} s (pid {})",
                    t.elapsed().as_secs_f64(),
                    srv.pid
                );
            }
        }
    }

    // 2. Verify: every accepted message readable exactly once.
    verify(srv.addr, &topics, writers, &acked, &mut h)?;
    if !quiet {
        eprintln!(
            "{label}: read back {} of {} accepted ({} missing, {} duplicated, {} unacknowledged found) in {} pages, {:.1} s",
            h.readable, h.accepted, h.missing, h.duplicated, h.unacknowledged_found, h.pages, h.verify_secs
        );
    }

    // 3. Read latency on a topic with --seed-messages stored messages.
    read_latency(srv, args, &format!("{prefix}r"), size, &mut h, label)?;

    if h.missing > 0 {
        r.notes.push(format!("{} accepted messages were not in the history", h.missing));
    }
    if h.requests_failed > 0 {
        r.notes.push(format!("{} write requests failed (first: {:?})", h.requests_failed, h.write_errors.first()));
    }
    let per_topic = h.accepted / topics.len() as u64;
    if per_topic > args.history_max_messages {
        r.notes.push(format!(
            "{per_topic} messages per topic > --history-max-messages {}: the oldest were trimmed",
            args.history_max_messages
        ));
    }
    r.history = Some(h);
    Ok(())
}

fn verify(
    addr: SocketAddrV4,
    topics: &[String],
    writers: usize,
    acked: &[Vec<bool>],
    h: &mut HistorySummary,
) -> Result<(), String> {
    let t0 = Instant::now();
    let mut c = Http::connect(addr).map_err(|e| format!("verify: connect: {e}"))?;
    let mut found: Vec<Vec<u8>> = acked.iter().map(|a| vec![0u8; a.len()]).collect();
    let mut total = 0u64;
    for topic in topics {
        let mut before: Option<u64> = None;
        loop {
            let path = match before {
                None => format!("/realtime/v1/api/channels/{topic}/messages?limit=1000"),
                Some(b) => format!("/realtime/v1/api/channels/{topic}/messages?limit=1000&before={b}"),
            };
            let (status, body) = c.call("GET", &path, b"").map_err(|e| format!("verify: {e}"))?;
            h.pages += 1;
            if status != 200 {
                note(&mut h.verify_errors, format!("{path}: {status} {}", String::from_utf8_lossy(&body)));
                break;
            }
            let page: Page<'_> = serde_json::from_slice(&body).map_err(|e| format!("verify: {path}: {e}"))?;
            if page.messages.is_empty() {
                break;
            }
            let mut lowest = u64::MAX;
            for m in &page.messages {
                lowest = lowest.min(m.offset);
                total += 1;
                match wire::scan_fields(m.payload.get().as_bytes()) {
                    Some(f)
                        if (f.publisher as usize) < writers && (f.seq as usize) < found[f.publisher as usize].len() =>
                    {
                        let slot = &mut found[f.publisher as usize][f.seq as usize];
                        *slot = slot.saturating_add(1);
                    }
                    _ => h.unparsable += 1,
                }
            }
            if before.is_some_and(|b| lowest >= b) {
                note(&mut h.verify_errors, format!("{topic}: before={before:?} returned offsets ≥ it; stopped"));
                break;
            }
            before = Some(lowest);
        }
    }
    for (a, f) in acked.iter().zip(&found) {
        let newest_found = f.iter().rposition(|n| *n > 0);
        h.missing_holes +=
            newest_found.map_or(0, |k| a[..k].iter().zip(&f[..k]).filter(|(ok, n)| **ok && **n == 0).count() as u64);
        for (ok, n) in a.iter().zip(f) {
            match (*ok, *n) {
                (true, 0) => h.missing += 1,
                (true, 1) => h.readable += 1,
                (true, _) => {
                    h.readable += 1;
                    h.duplicated += 1;
                }
                (false, 0) => {}
                (false, _) => h.unacknowledged_found += 1,
            }
        }
    }
    h.verify_secs = t0.elapsed().as_secs_f64();
    h.verify_msgs_per_sec = total as f64 / h.verify_secs.max(1e-3);
    Ok(())
}

fn read_latency(
    srv: &Running,
    args: &RunArgs,
    topic: &str,
    size: usize,
    h: &mut HistorySummary,
    label: &str,
) -> Result<(), String> {
    let addr = srv.addr;
    let seed = args.seed_messages.max(50);
    let mut c = Http::connect(addr).map_err(|e| format!("seed: connect: {e}"))?;
    let mut body = Vec::new();
    let mut seq = 0u64;
    while seq < seed {
        let n = (seed - seq).min(1000) as usize;
        match publish(&mut c, &mut body, topic, 0, seq, n, size) {
            Ok((202, _)) => {}
            Ok((s, b)) => return Err(format!("seed: {s} {}", String::from_utf8_lossy(&b))),
            Err(e) => return Err(format!("seed: {e}")),
        }
        seq += n as u64;
    }
    let (status, b) = c
        .call("GET", &format!("/realtime/v1/api/channels/{topic}/messages?limit=1"), b"")
        .map_err(|e| format!("read: {e}"))?;
    let newest = serde_json::from_slice::<Page<'_>>(&b)
        .ok()
        .and_then(|p| p.messages.first().map(|m| m.offset))
        .ok_or_else(|| format!("read: no newest message ({status} {})", String::from_utf8_lossy(&b)))?;
    // Offsets of the seeded topic: newest − seed + 1 ..= newest; `before` ∈ (oldest + 50, newest].
    let lo = (newest + 51).saturating_sub(seed);
    let readers = args.readers.max(1);
    let per = args.requests.max(2).div_ceil(readers as u64);
    let cpu0 = srv.cpu_secs();
    let start = Instant::now();
    let handles: Vec<_> = (0..readers)
        .map(|i| {
            let topic = topic.to_string();
            std::thread::spawn(move || -> (Histogram<u64>, Histogram<u64>, u64, u64, Vec<String>) {
                let (mut latest, mut before) = (new_hist(), new_hist());
                let (mut failed, mut short) = (0u64, 0u64);
                let mut errors = Vec::new();
                let mut rng = sys::now_ns() ^ ((i as u64 + 1) << 32) | 1;
                let mut c = match Http::connect(addr) {
                    Ok(c) => c,
                    Err(e) => return (latest, before, per, 0, vec![format!("reader {i}: connect: {e}")]),
                };
                for k in 0..per {
                    let path = if k % 2 == 0 {
                        format!("/realtime/v1/api/channels/{topic}/messages?limit=50")
                    } else {
                        rng ^= rng << 13;
                        rng ^= rng >> 7;
                        rng ^= rng << 17;
                        let b = lo + rng % (newest - lo + 1).max(1);
                        format!("/realtime/v1/api/channels/{topic}/messages?limit=50&before={b}")
                    };
                    let t = Instant::now();
                    match c.call("GET", &path, b"") {
                        Ok((200, body)) => {
                            let us = (t.elapsed().as_micros() as u64).clamp(1, 3_600_000_000);
                            let _ = if k % 2 == 0 { latest.record(us) } else { before.record(us) };
                            if memchr::memmem::find_iter(&body, b"\"offset\":").count() < 50 {
                                short += 1;
                            }
                        }
                        Ok((s, body)) => {
                            failed += 1;
                            note(&mut errors, format!("{path}: {s} {}", String::from_utf8_lossy(&body)));
                        }
                        Err(e) => {
                            failed += 1;
                            note(&mut errors, format!("{path}: {e}"));
                            match Http::connect(addr) {
                                Ok(nc) => c = nc,
                                Err(_) => break,
                            }
                        }
                    }
                }
                (latest, before, failed, short, errors)
            })
        })
        .collect();
    let (mut latest, mut before) = (new_hist(), new_hist());
    for t in handles {
        let (l, b, f, s, e) = t.join().map_err(|_| "a reader thread panicked".to_string())?;
        latest.add(&l).map_err(|e| e.to_string())?;
        before.add(&b).map_err(|e| e.to_string())?;
        h.read_failed += f;
        h.read_short_pages += s;
        for e in e {
            note(&mut h.read_errors, e);
        }
    }
    let secs = start.elapsed().as_secs_f64();
    let cpu1 = srv.cpu_secs();
    h.read_requests = latest.len() + before.len() + h.read_failed;
    h.reads_per_sec = (latest.len() + before.len()) as f64 / secs.max(1e-3);
    h.read_latest = Lat::of(&latest);
    h.read_before = Lat::of(&before);
    h.server_cpu_us_per_read =
        cpu0.zip(cpu1).filter(|_| h.read_requests > 0).map(|(a, b)| (b - a) * 1e6 / h.read_requests as f64);
    if !args.quiet {
        eprintln!(
            "{label}: {} history reads ({}/s): limit=50 p50 {:.2} ms p99 {:.2} ms; with before= p50 {:.2} ms p99 {:.2} ms",
            h.read_requests,
            si(h.reads_per_sec),
            h.read_latest.p50_ms,
            h.read_latest.p99_ms,
            h.read_before.p50_ms,
            h.read_before.p99_ms
        );
    }
    Ok(())
}

/// Lines for the terminal summary.
pub fn summary_text(h: &HistorySummary) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "  write: {} writers × batch {}{}: {} sent, {} accepted = {} persisted msgs/s over {:.1} s; POST→202 ms p50 {:.2} p99 {:.2} max {:.2}; {} requests failed",
        h.writers,
        h.batch,
        h.target_rate.map_or(String::new(), |r| format!(" at {}/s", si(r))),
        h.sent,
        h.accepted,
        si(h.accepted_per_sec),
        h.write_secs,
        h.write_latency.p50_ms,
        h.write_latency.p99_ms,
        h.write_latency.max_ms,
        h.requests_failed
    );
    let _ = writeln!(
        s,
        "    server CPU {} µs per persisted message (server waited {} s for its CPU); generator CPU {:.2} s",
        h.server_cpu_us_per_msg.map_or("–".into(), |c| format!("{c:.2}")),
        h.server_run_wait_write.map_or("–".into(), |c| format!("{c:.2}")),
        h.generator_cpu_write
    );
    let _ = writeln!(
        s,
        "  readable: {} of {} accepted{} (missing {} of which {} holes, duplicated {}, unacknowledged found {}, unparsable {}), {} pages in {:.2} s",
        h.readable,
        h.accepted,
        match (h.restart, h.restart_secs) {
            (Some(r), Some(t)) => {
                format!(" after a {r:?} restart {} ms after the last 202 ({t:.2} s to ready)", h.restart_after_ms)
            }
            _ => String::new(),
        },
        h.missing,
        h.missing_holes,
        h.duplicated,
        h.unacknowledged_found,
        h.unparsable,
        h.pages,
        h.verify_secs
    );
    let _ = writeln!(
        s,
        "  reads ({} stored, {} connections): {} requests, {}/s; limit=50 ms p50 {:.2} p99 {:.2} max {:.2}; before= ms p50 {:.2} p99 {:.2} max {:.2}; {} failed, {} short pages; server CPU {} µs per read",
        h.seed_messages,
        h.readers,
        h.read_requests,
        si(h.reads_per_sec),
        h.read_latest.p50_ms,
        h.read_latest.p99_ms,
        h.read_latest.max_ms,
        h.read_before.p50_ms,
        h.read_before.p99_ms,
        h.read_before.max_ms,
        h.read_failed,
        h.read_short_pages,
        h.server_cpu_us_per_read.map_or("–".into(), |c| format!("{c:.1}"))
    );
    for e in h.write_errors.iter().chain(&h.verify_errors).chain(&h.read_errors).take(6) {
        let _ = writeln!(s, "  error: {e}");
    }
    s
}

/// Markdown section for the run report.
pub fn markdown(h: &HistorySummary) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "\n## History\n\n| metric | value |\n|---|---|");
    let _ = writeln!(
        s,
        "| writers × messages per request | {} × {} ({}) |",
        h.writers,
        h.batch,
        h.target_rate.map_or("as fast as answered".into(), |r| format!("{}/s target", si(r)))
    );
    let _ = writeln!(
        s,
        "| persisted messages sent / accepted (202) | {} / {} over {:.1} s = **{}/s** |",
        h.sent,
        h.accepted,
        h.write_secs,
        si(h.accepted_per_sec)
    );
    let _ = writeln!(
        s,
        "| POST → 202 ms p50 / p90 / p99 / max | {:.2} / {:.2} / **{:.2}** / {:.2} |",
        h.write_latency.p50_ms, h.write_latency.p90_ms, h.write_latency.p99_ms, h.write_latency.max_ms
    );
    let _ = writeln!(
        s,
        "| server CPU per persisted message (server waited for its CPU) | {} µs ({} s) |",
        h.server_cpu_us_per_msg.map_or("–".into(), |c| format!("{c:.2}")),
        h.server_run_wait_write.map_or("–".into(), |c| format!("{c:.2}"))
    );
    if let (Some(r), Some(t)) = (h.restart, h.restart_secs) {
        let _ = writeln!(
            s,
            "| restart before reading | {r:?}, {} ms after the last 202; {t:.2} s until the server answered |",
            h.restart_after_ms
        );
    }
    let _ = writeln!(
        s,
        "| readable (exactly once) / missing (holes) / duplicated | **{}** of {} / {} ({}) / {} |",
        h.readable, h.accepted, h.missing, h.missing_holes, h.duplicated
    );
    let _ = writeln!(
        s,
        "| history pages read (limit=1000) | {} in {:.2} s ({}/s messages) |",
        h.pages,
        h.verify_secs,
        si(h.verify_msgs_per_sec)
    );
    let _ = writeln!(
        s,
        "| read requests ({} stored, {} keep-alive connections) | {} ({}/s), {} failed, {} short pages |",
        h.seed_messages,
        h.readers,
        h.read_requests,
        si(h.reads_per_sec),
        h.read_failed,
        h.read_short_pages
    );
    let _ = writeln!(
        s,
        "| `?limit=50` ms p50 / p90 / p99 / max | {:.2} / {:.2} / **{:.2}** / {:.2} |",
        h.read_latest.p50_ms, h.read_latest.p90_ms, h.read_latest.p99_ms, h.read_latest.max_ms
    );
    let _ = writeln!(
        s,
        "| `?limit=50&before=` ms p50 / p90 / p99 / max | {:.2} / {:.2} / **{:.2}** / {:.2} |",
        h.read_before.p50_ms, h.read_before.p90_ms, h.read_before.p99_ms, h.read_before.max_ms
    );
    let _ = writeln!(
        s,
        "| server CPU per read | {} µs |",
        h.server_cpu_us_per_read.map_or("–".into(), |c| format!("{c:.1}"))
    );
    for e in h.write_errors.iter().chain(&h.verify_errors).chain(&h.read_errors).take(8) {
        let _ = writeln!(s, "- `{}`", e.replace('`', "'"));
    }
    s
}
