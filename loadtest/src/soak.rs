//! `loadtest soak`: corecast under a moderate mixed load for `--minutes`, with its memory and
//! file descriptors sampled every `--sample-secs` (10 s), and pass criteria checked at the end.
//!
//! All at once, for the whole load phase (see `soak/clients.rs` and `soak/persist.rs`):
//! - WebSocket churn: `--churn-per-min` connect → upgrade → join (1–3 channels) → hold
//!   (`--hold-min-ms`..`--hold-max-ms`) → leave and/or disconnect cycles, five ways of ending;
//! - a steady broadcast load: `--rate` broadcasts/s over `--topics` topics, one publisher each
//!   (`ack: true`), to `--subscribers` subscribers joined for the whole run, which check that
//!   they got every message, in order;
//! - presence churn: half of the churn clients track on one of `--presence-topics` topics
//!   (some track again with a new state, some untrack before leaving); one observer per topic
//!   keeps the membership from the diffs;
//! - SSE streams: `--sse-per-min` streams opened on a broadcast topic (some with a presence
//!   topic and `presence=true`, some with `track=`), held like churn, closed with RST or FIN;
//! - persisted messages: `--persist-rate` msgs/s over REST and `--ws-persist-rate` msgs/s as
//!   WebSocket kind-3 pushes with `persist`, on `--persist-topics` topics, checked against the
//!   history endpoint while the load runs and once more after it.
//!
//! Then every client disconnects, fresh joins check that the presence topics are empty, and
//! the server's fd count must come back to its baseline.
//!
//! Pass criteria (printed with the figures; the exit code is 1 when one fails):
//! 1. **RSS flat after warm-up**: warm-up = the first 20 % of the run, at least 2 minutes but at
//!    most half the run (`--warmup-minutes` to set it); the level is the mean RSS of the samples
//!    of the first minute after it; every sample of the last minute (or the last 10 % of the
//!    run, whichever is longer; at least 3 samples) is within ±`--rss-tolerance-pct` (5 %) of it.
//! 2. **fds back to baseline**: the baseline is counted after a priming round (one WebSocket,
//!    one SSE stream, one persisted REST publish and one history read, all closed) before the
//!    load; after the teardown the count must come back to it within `--fd-wait-secs`.
//! 3. **Nothing persisted lost**: every acknowledged persisted message was in the history at its
//!    first check, and everything the bound keeps is there at the end, once.
//! 4. **No unexpected errors**: connect failures, timeouts, protocol errors (error replies,
//!    unexpected events, close handshakes not answered), unexpected closes, silent channels,
//!    deliveries after a leave, failed or slow REST requests, failed history reads.
//! 5. **Broadcasts complete**: every steady subscriber got every message of its topic.
//! 6. **Presence empty after the churn**: the observers see no member once the churn stopped,
//!    and fresh joins after the teardown get an empty `presence_state`.

mod clients;
mod persist;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddrV4, TcpStream};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;

use self::clients::{Cmd, Stats};
use self::persist::{Ledger, RestStats, VerifyStats};
use crate::coord::si;
use crate::history::Http;
use crate::report::{self, Series};
use crate::scenarios::{self, Machine};
use crate::servers::{self, Running, ServerKind, ServerOpts};
use crate::sys;

#[derive(Clone, Debug, clap::Args)]
pub struct SoakArgs {
    /// Minutes of load (churn, broadcasts, presence, SSE and persisted messages together).
    #[arg(long, default_value_t = 30.0)]
    pub minutes: f64,
    /// Warm-up excluded from the RSS criterion (default: 20 % of the run, at least 2 minutes,
    /// at most half the run).
    #[arg(long)]
    pub warmup_minutes: Option<f64>,
    /// Seconds between RSS / fd samples.
    #[arg(long, default_value_t = 10.0)]
    pub sample_secs: f64,
    /// RSS criterion: the last samples within this many percent of the post-warm-up level.
    #[arg(long, default_value_t = 5.0)]
    pub rss_tolerance_pct: f64,
    /// Steady WebSocket subscribers (joined for the whole run), spread over --topics.
    #[arg(long, short = 'n', default_value_t = 2000)]
    pub subscribers: usize,
    /// Broadcast topics, one publisher connection each.
    #[arg(long, default_value_t = 20)]
    pub topics: usize,
    /// Broadcasts per second, all topics together.
    #[arg(long, default_value_t = 1000.0)]
    pub rate: f64,
    /// Broadcast payload size, bytes.
    #[arg(long, default_value_t = 100)]
    pub payload: usize,
    /// WebSocket connect/join/leave/disconnect cycles started per minute.
    #[arg(long, default_value_t = 600.0)]
    pub churn_per_min: f64,
    /// Percent of churn cycles that also join (and track on) a presence topic.
    #[arg(long, default_value_t = 50)]
    pub churn_presence_pct: u64,
    /// Percent of churn cycles that also join a topic of their own (`<prefix>-own<cycle>`),
    /// which no other client ever uses.
    #[arg(long, default_value_t = 25)]
    pub churn_own_topic_pct: u64,
    /// Shortest time a churn client (or SSE stream) stays, ms.
    #[arg(long, default_value_t = 2000)]
    pub hold_min_ms: u64,
    /// Longest time a churn client (or SSE stream) stays, ms.
    #[arg(long, default_value_t = 8000)]
    pub hold_max_ms: u64,
    /// Presence topics churn clients track on (one observer each).
    #[arg(long, default_value_t = 4)]
    pub presence_topics: usize,
    /// SSE streams opened (and closed) per minute.
    #[arg(long, default_value_t = 120.0)]
    pub sse_per_min: f64,
    /// Topics of the persisted messages.
    #[arg(long, default_value_t = 4)]
    pub persist_topics: usize,
    /// Persisted messages per second over REST (single and 5-message batch publishes in turn).
    #[arg(long, default_value_t = 20.0)]
    pub persist_rate: f64,
    /// Persisted messages per second over WebSocket (kind-3 pushes with `persist`, `ack: true`).
    #[arg(long, default_value_t = 10.0)]
    pub ws_persist_rate: f64,
    /// Persisted messages kept per topic: passed to corecast as --history-max-messages (unless
    /// given with --corecast-arg); the checks expect exactly this bound.
    #[arg(long, default_value_t = 1000)]
    pub history_bound: u64,
    /// Seconds between rolling history checks.
    #[arg(long, default_value_t = 20.0)]
    pub verify_secs: f64,
    /// Deadline of every protocol step (join, leave, track, ack, response head, close), ms.
    #[arg(long, default_value_t = 10_000)]
    pub timeout_ms: u64,
    /// After the load: quiet time (no churn, no acks pending) before the loss count, s.
    #[arg(long, default_value_t = 3.0)]
    pub drain_secs: f64,
    /// After the teardown: longest wait for the fd count to come back to the baseline, s.
    #[arg(long, default_value_t = 30.0)]
    pub fd_wait_secs: f64,
    /// Use a corecast already running at this address (needs --pid for RSS and fds).
    #[arg(long)]
    pub addr: Option<SocketAddrV4>,
    /// PID of the server given by --addr.
    #[arg(long)]
    pub pid: Option<u32>,
    /// corecast binary (default: <workspace>/target/release/corecast).
    #[arg(long, alias = "server-bin")]
    pub corecast_bin: Option<PathBuf>,
    /// Extra argument passed to corecast (repeatable).
    #[arg(long = "corecast-arg", allow_hyphen_values = true)]
    pub corecast_args: Vec<String>,
    /// CPU the server is pinned to.
    #[arg(long, default_value_t = 0)]
    pub server_cpu: usize,
    /// CPU the generator is pinned to.
    #[arg(long, default_value_t = 1)]
    pub client_cpu: usize,
    /// Source addresses 127.0.0.1 .. 127.0.0.K the clients are spread over.
    #[arg(long, default_value_t = 4)]
    pub src_addrs: usize,
    /// Results directory (default tuning/runs/<YYYY-MM-DD>-<hostname>/).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Write no result files.
    #[arg(long)]
    pub no_report: bool,
    /// Also write the JSON result to this path.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// No progress lines on stderr (the samples are still printed).
    #[arg(long, short = 'q')]
    pub quiet: bool,
}

/// One sample of the server process.
#[derive(Clone, Debug, Serialize)]
pub struct Sample {
    /// Seconds since the load started.
    pub t_secs: f64,
    pub phase: &'static str,
    pub rss_kib: u64,
    pub fds: u64,
    /// Client sockets to the server open at that moment (WebSocket, SSE, REST writer, verifier).
    pub client_sockets: u64,
    /// fds − baseline − client sockets: server fds that no client connection explains (≈ 0;
    /// connections closed a moment ago and not yet reaped by the server make it wobble).
    pub unexplained_fds: i64,
    pub server_cpu_pct: f64,
    pub generator_cpu_pct: f64,
    pub churn_done: u64,
    pub deliveries: u64,
    pub presence_events: u64,
    pub sse_events: u64,
    pub persisted_acked: u64,
    pub errors: u64,
}

#[derive(Clone, Debug, Serialize)]
pub struct RssVerdict {
    pub warmup_secs: f64,
    /// Mean RSS of the samples in [warm-up, warm-up + 60 s].
    pub level_kib: f64,
    pub level_window: (f64, f64),
    /// Samples the criterion checks: (t, KiB).
    pub last: Vec<(f64, u64)>,
    pub max_dev_pct: f64,
    pub min_after_warmup_kib: u64,
    pub max_after_warmup_kib: u64,
    /// Least-squares slope of the post-warm-up samples, KiB per minute.
    pub slope_kib_per_min: f64,
    pub pass: bool,
}

#[derive(Clone, Debug, Serialize)]
pub struct Criterion {
    pub name: String,
    pub pass: bool,
    pub detail: String,
}

#[derive(Clone, Debug, Serialize)]
pub struct SoakResult {
    pub command: String,
    pub machine: Machine,
    pub server_pid: u32,
    pub minutes: f64,
    pub warmup_minutes: f64,
    pub config: BTreeMap<String, String>,
    pub fd_baseline: u64,
    pub fd_baseline_before_priming: u64,
    pub fd_kinds_baseline: BTreeMap<String, u64>,
    pub fd_after: u64,
    pub fd_kinds_after: BTreeMap<String, u64>,
    pub fd_back_after_secs: Option<f64>,
    pub rss_baseline_kib: u64,
    pub rss_after_kib: u64,
    pub samples: Vec<Sample>,
    pub rss: Option<RssVerdict>,
    pub clients: Stats,
    pub rest: RestStats,
    pub verify: VerifyStats,
    pub server_alive: bool,
    pub server_log_lines: Vec<String>,
    pub criteria: Vec<Criterion>,
    pub pass: bool,
    pub error: Option<String>,
}

/// Default warm-up: 20 % of the run, at least 2 minutes, at most half the run.
pub fn default_warmup_minutes(minutes: f64) -> f64 {
    (0.2 * minutes).max(2.0f64.min(0.5 * minutes))
}

/// The RSS criterion over the load samples `(t, KiB)` (t in seconds since the load started).
pub fn rss_verdict(samples: &[(f64, u64)], load_secs: f64, warmup_secs: f64, tol_pct: f64) -> Option<RssVerdict> {
    let after: Vec<(f64, u64)> =
        samples.iter().copied().filter(|&(t, _)| t >= warmup_secs - 1e-6 && t <= load_secs + 1e-6).collect();
    let first = after.first()?.0;
    let win = (first, first + 60.0);
    let lvl: Vec<f64> = after.iter().filter(|&&(t, _)| t <= win.1 + 1e-6).map(|&(_, v)| v as f64).collect();
    let level = lvl.iter().sum::<f64>() / lvl.len() as f64;
    let span = 60.0f64.max(0.1 * load_secs);
    let mut last: Vec<(f64, u64)> = after.iter().copied().filter(|&(t, _)| t >= load_secs - span - 1e-6).collect();
    if last.len() < 3 {
        last = after[after.len().saturating_sub(3)..].to_vec();
    }
    let max_dev_pct = last.iter().map(|&(_, v)| (v as f64 - level) / level * 100.0).fold(0.0f64, |a, d| {
        if d.abs() > a.abs() {
            d
        } else {
            a
        }
    });
    let n = after.len() as f64;
    let (mt, mv) = (after.iter().map(|p| p.0).sum::<f64>() / n, after.iter().map(|p| p.1 as f64).sum::<f64>() / n);
    let cov: f64 = after.iter().map(|&(t, v)| (t - mt) * (v as f64 - mv)).sum();
    let var: f64 = after.iter().map(|&(t, _)| (t - mt).powi(2)).sum();
    Some(RssVerdict {
        warmup_secs,
        level_kib: level,
        level_window: win,
        pass: max_dev_pct.abs() <= tol_pct,
        max_dev_pct,
        min_after_warmup_kib: after.iter().map(|p| p.1).min().unwrap_or(0),
        max_after_warmup_kib: after.iter().map(|p| p.1).max().unwrap_or(0),
        slope_kib_per_min: if var > 0.0 { cov / var * 60.0 } else { 0.0 },
        last,
    })
}

fn fd_count(pid: u32) -> Option<u64> {
    Some(std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count() as u64)
}

/// The server's fds by kind: `socket`, `pipe`, `anon_inode:[io_uring]`, … or the file's path.
fn fd_kinds(pid: u32) -> BTreeMap<String, u64> {
    let mut m = BTreeMap::new();
    if let Ok(d) = std::fs::read_dir(format!("/proc/{pid}/fd")) {
        for e in d.flatten() {
            let t = std::fs::read_link(e.path()).map(|p| p.to_string_lossy().into_owned()).unwrap_or_default();
            let k = if let Some(i) = t.find(":[") {
                if t.starts_with("anon_inode") {
                    t
                } else {
                    t[..i].to_string()
                }
            } else {
                // A file: its name (the data directory is a temporary one).
                t.rsplit('/').next().unwrap_or(&t).to_string()
            };
            *m.entry(k).or_insert(0) += 1;
        }
    }
    m
}

fn kinds_text(m: &BTreeMap<String, u64>) -> String {
    m.iter().map(|(k, v)| format!("{v} {k}")).collect::<Vec<_>>().join(", ")
}

/// One of each kind of connection, all closed again, so that whatever the server opens lazily
/// (its log segment, buffers) is open before the fd baseline is counted.
fn prime(addr: SocketAddrV4, prefix: &str) -> Result<(), String> {
    let mut h = Http::connect(addr).map_err(|e| format!("connect: {e}"))?;
    let mut body = Vec::new();
    let topic = format!("{prefix}-prime");
    match crate::history::publish(&mut h, &mut body, &topic, 9, 0, 1, 50) {
        Ok((202, _)) => {}
        other => return Err(format!("persisted publish: {other:?}")),
    }
    match h.call("GET", &format!("/realtime/v1/api/channels/{topic}/messages?limit=10"), b"") {
        Ok((200, _)) => {}
        other => return Err(format!("history read: {other:?}")),
    }
    drop(h);
    let read_head = |s: &mut TcpStream| -> Result<String, String> {
        s.set_read_timeout(Some(Duration::from_secs(5))).map_err(|e| e.to_string())?;
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        while memchr::memmem::find(&buf, b"\r\n\r\n").is_none() {
            let n = s.read(&mut chunk).map_err(|e| e.to_string())?;
            if n == 0 {
                break;
            }
            buf.extend_from_slice(&chunk[..n]);
        }
        Ok(String::from_utf8_lossy(&buf).lines().next().unwrap_or("").to_string())
    };
    let mut ws = TcpStream::connect(addr).map_err(|e| e.to_string())?;
    ws.write_all(&crate::wire::upgrade_request(crate::wire::Proto::Phoenix, 0, &addr.to_string()))
        .map_err(|e| e.to_string())?;
    let l = read_head(&mut ws)?;
    if !l.starts_with("HTTP/1.1 101") {
        return Err(format!("upgrade: {l:?}"));
    }
    let mut join = Vec::new();
    let msg = format!("[\"1\",\"1\",\"realtime:{topic}\",\"phx_join\",{{\"config\":{{}}}}]");
    crate::wire::push_client_frame(&mut join, crate::wire::OP_TEXT, msg.as_bytes(), [1, 2, 3, 4]);
    ws.write_all(&join).map_err(|e| e.to_string())?;
    std::thread::sleep(Duration::from_millis(200));
    drop(ws);
    let mut sse = TcpStream::connect(addr).map_err(|e| e.to_string())?;
    let req = format!(
        "GET /realtime/v1/sse?topic={topic}&apikey=loadtest HTTP/1.1\r\nHost: {addr}\r\nAccept: text/event-stream\r\n\r\n"
    );
    sse.write_all(req.as_bytes()).map_err(|e| e.to_string())?;
    let l = read_head(&mut sse)?;
    if !l.starts_with("HTTP/1.1 200") {
        return Err(format!("sse: {l:?}"));
    }
    drop(sse);
    Ok(())
}

fn phase_name(t: f64, warmup: f64, load: f64) -> &'static str {
    if t < 0.5 {
        "start"
    } else if t <= warmup + 1e-6 {
        "warm-up"
    } else if t <= load + 1e-6 {
        "load"
    } else {
        "after"
    }
}

struct Sampler {
    pid: u32,
    fd_baseline: u64,
    last: Option<(Instant, f64, u64)>,
    samples: Vec<Sample>,
}

impl Sampler {
    fn take(&mut self, srv: &Running, t: f64, phase: &'static str, st: &Stats, rest: &RestStats, extra_sockets: u64) {
        let now = Instant::now();
        let cpu = srv.cpu_secs().unwrap_or(0.0);
        let gen = sys::process_cpu_ns();
        let (scpu, gcpu) = match self.last {
            Some((t0, c0, g0)) => {
                let dt = now.duration_since(t0).as_secs_f64().max(1e-3);
                ((cpu - c0) / dt * 100.0, (gen - g0) as f64 / 1e9 / dt * 100.0)
            }
            None => (0.0, 0.0),
        };
        self.last = Some((now, cpu, gen));
        let rss = sys::rss_kib(self.pid).unwrap_or(0);
        let fds = fd_count(self.pid).unwrap_or(0);
        let sockets = st.open_sockets + extra_sockets;
        let s = Sample {
            t_secs: t,
            phase,
            rss_kib: rss,
            fds,
            client_sockets: sockets,
            unexplained_fds: fds as i64 - self.fd_baseline as i64 - sockets as i64,
            server_cpu_pct: scpu,
            generator_cpu_pct: gcpu,
            churn_done: st.churn_done,
            deliveries: st.delivered_steady + st.delivered_churn,
            presence_events: st.presence_diff_frames + st.presence_state_frames + st.sse_presence_events,
            sse_events: st.sse_broadcast_events + st.sse_presence_events + st.sse_other_events,
            persisted_acked: st.ws_persist_acked + rest.messages_acked,
            errors: st.errors() + rest.requests_failed + rest.requests_slow,
        };
        println!(
            "[{:5.0}s] {:<7} rss {:>7} KiB  fds {:>5} (unexplained {:+})  clients {:>5} | churn {:>6} deliveries {:>7} presence ev {:>6} sse ev {:>6} persisted {:>6} | server CPU {:3.0}% gen CPU {:3.0}% | errors {}",
            s.t_secs,
            s.phase,
            s.rss_kib,
            s.fds,
            s.unexplained_fds,
            s.client_sockets,
            s.churn_done,
            si(s.deliveries as f64),
            si(s.presence_events as f64),
            si(s.sse_events as f64),
            s.persisted_acked,
            s.server_cpu_pct,
            s.generator_cpu_pct,
            s.errors
        );
        self.samples.push(s);
    }
}

fn setup(a: &SoakArgs) {
    let lim = sys::raise_nofile();
    if lim < 8192 {
        eprintln!("warning: open-files limit is {lim}; the soak needs a few thousand (ulimit -n)");
    }
    if a.client_cpu < sys::online_cpus() {
        sys::pin_to_cpu(a.client_cpu);
    } else {
        eprintln!("warning: CPU {} does not exist here; generator not pinned", a.client_cpu);
    }
}

pub fn run(a: SoakArgs) -> ExitCode {
    setup(&a);
    let machine = scenarios::machine();
    let log_dir = std::env::temp_dir().join(format!("loadtest-soak-{}", std::process::id()));
    let r = soak(&a, machine, &log_dir);
    let _ = std::fs::remove_dir_all(&log_dir);
    if let Some(p) = &a.json {
        report::write_json(p, &r);
    }
    if !a.no_report {
        let dir = report::run_dir(a.out.as_deref());
        let md = write_report(&dir, &r);
        eprintln!("results: {}", md.display());
    }
    if r.pass {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn empty_result(a: &SoakArgs, machine: Machine) -> SoakResult {
    let mut config = BTreeMap::new();
    let warm = a.warmup_minutes.unwrap_or_else(|| default_warmup_minutes(a.minutes));
    for (k, v) in [
        ("subscribers", a.subscribers.to_string()),
        ("topics", a.topics.to_string()),
        ("rate", format!("{} broadcasts/s", a.rate)),
        ("payload", format!("{} B", a.payload)),
        ("churn_per_min", a.churn_per_min.to_string()),
        ("churn_mix", format!("{} % presence, {} % own topic", a.churn_presence_pct, a.churn_own_topic_pct)),
        ("hold_ms", format!("{}..{}", a.hold_min_ms, a.hold_max_ms)),
        ("presence_topics", a.presence_topics.to_string()),
        ("sse_per_min", a.sse_per_min.to_string()),
        ("persist_topics", a.persist_topics.to_string()),
        ("persist_rate", format!("{} msgs/s REST + {} msgs/s WebSocket", a.persist_rate, a.ws_persist_rate)),
        ("history_bound", a.history_bound.to_string()),
        ("verify_secs", a.verify_secs.to_string()),
        ("timeout_ms", a.timeout_ms.to_string()),
        ("corecast_args", a.corecast_args.join(" ")),
    ] {
        config.insert(k.to_string(), v);
    }
    SoakResult {
        command: std::env::args().collect::<Vec<_>>().join(" "),
        machine,
        server_pid: 0,
        minutes: a.minutes,
        warmup_minutes: warm,
        config,
        fd_baseline: 0,
        fd_baseline_before_priming: 0,
        fd_kinds_baseline: BTreeMap::new(),
        fd_after: 0,
        fd_kinds_after: BTreeMap::new(),
        fd_back_after_secs: None,
        rss_baseline_kib: 0,
        rss_after_kib: 0,
        samples: Vec::new(),
        rss: None,
        clients: Stats::default(),
        rest: RestStats::default(),
        verify: VerifyStats::default(),
        server_alive: true,
        server_log_lines: Vec::new(),
        criteria: Vec::new(),
        pass: false,
        error: None,
    }
}

fn soak(a: &SoakArgs, machine: Machine, log_dir: &std::path::Path) -> SoakResult {
    let mut r = empty_result(a, machine);
    let quiet = a.quiet;
    let mut corecast_args = a.corecast_args.clone();
    if !corecast_args.iter().any(|x| x.starts_with("--history-max-messages")) {
        corecast_args.push(format!("--history-max-messages={}", a.history_bound.max(1)));
    }
    let sopts = ServerOpts {
        cpu: (a.server_cpu < sys::online_cpus()).then_some(a.server_cpu),
        corecast_bin: a.corecast_bin.clone(),
        corecast_args,
        log_dir: log_dir.to_path_buf(),
    };
    let mut srv = match a.addr {
        Some(addr) => Running::external(ServerKind::Corecast, addr, a.pid),
        None => match servers::start(ServerKind::Corecast, &sopts) {
            Ok(s) => s,
            Err(e) => {
                r.error = Some(format!("server did not start: {e}"));
                println!("soak: ERROR: server did not start: {e}");
                return r;
            }
        },
    };
    r.server_pid = srv.pid;
    if srv.pid == 0 {
        r.error = Some("--addr without --pid: the server's RSS and fds cannot be sampled".into());
        println!("soak: ERROR: {}", r.error.as_deref().unwrap_or(""));
        return r;
    }
    let (_, hms) = sys::utc_date_time();
    let prefix = format!("soak{hms}p{}", std::process::id());
    std::thread::sleep(Duration::from_millis(300));
    r.fd_baseline_before_priming = fd_count(srv.pid).unwrap_or(0);
    if let Err(e) = prime(srv.addr, &prefix) {
        r.error = Some(format!("priming: {e}"));
        println!("soak: ERROR: priming: {e}");
        return r;
    }
    std::thread::sleep(Duration::from_millis(1000));
    r.fd_baseline = fd_count(srv.pid).unwrap_or(0);
    r.fd_kinds_baseline = fd_kinds(srv.pid);
    r.rss_baseline_kib = srv.rss_kib().unwrap_or(0);
    println!(
        "soak: corecast pid {} at {}; fd baseline {} ({}; {} before priming), RSS {} KiB",
        srv.pid,
        srv.addr,
        r.fd_baseline,
        kinds_text(&r.fd_kinds_baseline),
        r.fd_baseline_before_priming,
        r.rss_baseline_kib
    );
    let warm = r.warmup_minutes;
    println!(
        "soak: {} min of load; warm-up {:.1} min (the first 20 % of the run, at least 2 min, at most half the run, unless --warmup-minutes); samples every {} s",
        a.minutes, warm, a.sample_secs
    );

    // Clients.
    let cfg = clients::Cfg {
        addr: srv.addr,
        src_addrs: (1..=a.src_addrs.clamp(1, 250) as u8).map(|i| Ipv4Addr::new(127, 0, 0, i)).collect(),
        prefix: prefix.clone(),
        subscribers: a.subscribers,
        topics: a.topics.max(1),
        rate: a.rate,
        payload: a.payload,
        churn_per_min: a.churn_per_min,
        churn_presence_pct: a.churn_presence_pct.min(100),
        churn_own_topic_pct: a.churn_own_topic_pct.min(100),
        hold_min_ms: a.hold_min_ms,
        hold_max_ms: a.hold_max_ms,
        presence_topics: a.presence_topics,
        sse_per_min: a.sse_per_min,
        persist_topics: a.persist_topics,
        ws_persist_rate: a.ws_persist_rate,
        timeout_ms: a.timeout_ms,
        drain_ms: (a.drain_secs * 1000.0) as u64,
    };
    let persist_topics: Vec<String> = (0..a.persist_topics).map(|k| cfg.persist_topic(k)).collect();
    let ledger = Arc::new(Mutex::new(Ledger::new(a.persist_topics)));
    let shared = Arc::new(Mutex::new(Stats::default()));
    let (tx, rx) = mpsc::channel();
    let client = {
        let (cfg, shared, ledger) = (cfg.clone(), shared.clone(), ledger.clone());
        std::thread::spawn(move || clients::run(cfg, rx, shared, ledger))
    };
    let snapshot = |s: &Arc<Mutex<Stats>>| s.lock().unwrap().clone();
    let t_connect = Instant::now();
    loop {
        let s = snapshot(&shared);
        if s.ready || s.done {
            if !quiet {
                eprintln!(
                    "soak: {} steady connections joined, {} failed, in {:.1} s",
                    s.steady_joined,
                    s.steady_failed,
                    t_connect.elapsed().as_secs_f64()
                );
            }
            break;
        }
        if t_connect.elapsed() > Duration::from_secs(300) {
            r.error = Some("steady connections not set up within 300 s".into());
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }

    // Load.
    let stop_rest = Arc::new(AtomicBool::new(false));
    let rest_stats = Arc::new(Mutex::new(RestStats::default()));
    let verify_stats = Arc::new(Mutex::new(VerifyStats::default()));
    let rest = {
        let c = persist::RestCfg {
            addr: srv.addr,
            topics: persist_topics.clone(),
            rate: a.persist_rate,
            payload: a.payload,
            slow_ms: a.timeout_ms,
        };
        let (stop, ledger, stats) = (stop_rest.clone(), ledger.clone(), rest_stats.clone());
        std::thread::spawn(move || persist::rest_writer(c, stop, ledger, stats))
    };
    let verifier = {
        let v = persist::Verifier::new(srv.addr, persist_topics.clone(), a.history_bound.max(1));
        let every = Duration::from_secs_f64(a.verify_secs.max(1.0));
        let (stop, ledger, stats) = (stop_rest.clone(), ledger.clone(), verify_stats.clone());
        std::thread::spawn(move || persist::verifier_thread(v, every, stop, ledger, stats))
    };
    let mut sampler = Sampler { pid: srv.pid, fd_baseline: r.fd_baseline, last: None, samples: Vec::new() };
    // REST writer and verifier keep one keep-alive connection each.
    let extra = |rs: &RestStats| u64::from(rs.connections > 0) + u64::from(a.persist_topics > 0);
    let _ = tx.send(Cmd::Start);
    let t0 = Instant::now();
    let load_secs = a.minutes * 60.0;
    let warm_secs = warm * 60.0;
    let every = a.sample_secs.max(1.0);
    let mut k = 0u64;
    loop {
        let due = k as f64 * every;
        if due > load_secs + 1e-6 {
            break;
        }
        let wait = due - t0.elapsed().as_secs_f64();
        if wait > 0.0 {
            std::thread::sleep(Duration::from_secs_f64(wait));
        }
        let st = snapshot(&shared);
        let rs = rest_stats.lock().unwrap().clone();
        // Load samples are labelled with their scheduled time (0, 10, 20, … s).
        sampler.take(&srv, due, phase_name(due, warm_secs, load_secs), &st, &rs, extra(&rs));
        k += 1;
        if !srv.alive() {
            r.error = Some("the server exited during the load".into());
            break;
        }
    }

    // Stop the load; let the cycles under way finish.
    let _ = tx.send(Cmd::StopLoad);
    stop_rest.store(true, Ordering::Relaxed);
    let _ = rest.join();
    let mut verifier = verifier.join().ok();
    if !quiet {
        eprintln!("soak: load stopped at {:.1} s; waiting for the churn to finish", t0.elapsed().as_secs_f64());
    }
    let t_stop = Instant::now();
    let quiesce_limit = Duration::from_millis(a.hold_max_ms + 3 * a.timeout_ms) + Duration::from_secs_f64(a.drain_secs);
    let mut next_sample = t0 + Duration::from_secs_f64(k as f64 * every);
    loop {
        let st = snapshot(&shared);
        if st.quiesced || st.done {
            break;
        }
        if t_stop.elapsed() > quiesce_limit {
            r.error.get_or_insert_with(|| "the churn did not finish after the load stopped".into());
            break;
        }
        if Instant::now() >= next_sample {
            let rs = rest_stats.lock().unwrap().clone();
            sampler.take(&srv, t0.elapsed().as_secs_f64(), "drain", &st, &rs, 1);
            next_sample += Duration::from_secs_f64(every);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    // The rolling checks' connection is closed before the teardown's fd count.
    if let Some(v) = verifier.as_mut() {
        v.disconnect();
    }
    let _ = tx.send(Cmd::Teardown);
    let t_td = Instant::now();
    loop {
        let st = snapshot(&shared);
        if st.done {
            break;
        }
        if t_td.elapsed() > Duration::from_millis(3 * a.timeout_ms + 5000) {
            r.error.get_or_insert_with(|| "the teardown did not finish".into());
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    drop(tx);
    if snapshot(&shared).done {
        let _ = client.join();
    }
    // Final history check (its connection closed afterwards).
    if let Some(v) = verifier.as_mut() {
        v.final_check(&ledger);
        v.disconnect();
        r.verify = v.stats.clone();
    } else {
        r.error.get_or_insert_with(|| "the verifier thread panicked".into());
    }
    // fds back to the baseline?
    let t_fd = Instant::now();
    loop {
        let n = fd_count(srv.pid).unwrap_or(u64::MAX);
        if n <= r.fd_baseline {
            r.fd_back_after_secs = Some(t_fd.elapsed().as_secs_f64());
            break;
        }
        if t_fd.elapsed().as_secs_f64() > a.fd_wait_secs {
            break;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    r.clients = snapshot(&shared);
    r.rest = rest_stats.lock().unwrap().clone();
    sampler.take(&srv, t0.elapsed().as_secs_f64(), "after", &r.clients, &r.rest, 0);
    r.fd_after = fd_count(srv.pid).unwrap_or(0);
    r.fd_kinds_after = fd_kinds(srv.pid);
    // And once more 10 s later: does the server's memory settle once it is idle?
    std::thread::sleep(Duration::from_secs(10));
    sampler.take(&srv, t0.elapsed().as_secs_f64(), "after", &r.clients, &r.rest, 0);
    r.rss_after_kib = srv.rss_kib().unwrap_or(0);
    r.server_alive = srv.alive();
    r.samples = sampler.samples;
    let load: Vec<(f64, u64)> =
        r.samples.iter().filter(|s| s.phase != "drain" && s.phase != "after").map(|s| (s.t_secs, s.rss_kib)).collect();
    r.rss = rss_verdict(&load, load_secs, warm_secs, a.rss_tolerance_pct);
    srv.stop();
    if let Ok(log) = std::fs::read_to_string(&srv.log) {
        r.server_log_lines = log.lines().filter(|l| !l.trim().is_empty()).take(50).map(str::to_string).collect();
    }
    judge(&mut r, a);
    print_summary(&r, a);
    r
}

fn judge(r: &mut SoakResult, a: &SoakArgs) {
    let c = &r.clients;
    let mut crit = Vec::new();
    let mut add = |name: &str, pass: bool, detail: String| crit.push(Criterion { name: name.into(), pass, detail });
    match &r.rss {
        Some(v) => add(
            "RSS flat after warm-up",
            v.pass,
            format!(
                "level {:.0} KiB (mean of the samples at {:.0}–{:.0} s); last {} samples ({:.0}–{:.0} s) {}–{} KiB, max deviation {:+.2} % (limit ±{} %); post-warm-up slope {:+.1} KiB/min",
                v.level_kib,
                v.level_window.0,
                v.level_window.1,
                v.last.len(),
                v.last.first().map_or(0.0, |x| x.0),
                v.last.last().map_or(0.0, |x| x.0),
                v.last.iter().map(|x| x.1).min().unwrap_or(0),
                v.last.iter().map(|x| x.1).max().unwrap_or(0),
                v.max_dev_pct,
                a.rss_tolerance_pct,
                v.slope_kib_per_min
            ),
        ),
        None => add("RSS flat after warm-up", false, "no samples after the warm-up".into()),
    }
    let peak = r.samples.iter().map(|s| s.fds).max().unwrap_or(0);
    let fd_ok = r.fd_after <= r.fd_baseline;
    add(
        "fds back to baseline",
        fd_ok,
        format!(
            "baseline {} ({}), peak {peak}, after the teardown {} ({}){}",
            r.fd_baseline,
            kinds_text(&r.fd_kinds_baseline),
            r.fd_after,
            kinds_text(&r.fd_kinds_after),
            r.fd_back_after_secs.map_or(format!(", not back within {} s", a.fd_wait_secs), |s| format!(
                ", back {s:.1} s after the last client closed"
            ))
        ),
    );
    let v = &r.verify;
    let acked = c.ws_persist_acked + r.rest.messages_acked;
    let persist_ok = v.lost == 0 && v.final_missing == 0 && v.duplicates == 0 && (acked == 0 || v.verified > 0);
    add(
        "nothing persisted lost",
        persist_ok,
        format!(
            "{acked} acknowledged ({} REST, {} WebSocket); {} found at their first check after the ack, {} lost, {} unverifiable (bound); final: {} kept by the bound, {} missing, {} duplicated, {} unacknowledged found",
            r.rest.messages_acked,
            c.ws_persist_acked,
            v.verified,
            v.lost,
            v.unverifiable,
            v.final_checked,
            v.final_missing,
            v.duplicates,
            v.unacknowledged_found
        ),
    );
    let errors =
        c.errors() + r.rest.requests_failed + r.rest.requests_slow + v.http_errors + v.out_of_order + v.unparsable;
    let errors_ok = errors == 0 && r.server_alive && r.error.is_none() && c.steady_failed == 0;
    add(
        "no unexpected errors",
        errors_ok,
        format!(
            "{errors}: connect {}, timeouts {}, protocol {}, unexpected closes {}, silent channels {}, deliveries after leave {}; REST failed {}, slow {}; history reads failed {}, out of order {}{}{}",
            c.err_connect,
            c.err_timeout,
            c.err_protocol,
            c.err_unexpected_close,
            c.err_silent,
            c.err_after_leave,
            r.rest.requests_failed,
            r.rest.requests_slow,
            v.http_errors,
            v.out_of_order,
            if r.server_alive { "" } else { "; THE SERVER EXITED" },
            r.error.as_ref().map_or(String::new(), |e| format!("; {e}"))
        ),
    );
    add(
        "broadcasts complete",
        c.steady_lost == 0 && c.steady_repeats == 0 && (c.steady_expected > 0 || a.rate <= 0.0),
        format!(
            "published {}, acked {}; steady subscribers got {} of {} ({} lost, {} subscribers with loss, {} repeated)",
            c.published,
            c.publish_acked,
            c.delivered_steady,
            c.steady_expected,
            c.steady_lost,
            c.steady_subs_with_loss,
            c.steady_repeats
        ),
    );
    let probes_empty = c.probe_members.iter().all(|(_, n)| *n == 0) && c.probe_members.len() == a.presence_topics;
    add(
        "presence empty after the churn",
        c.observer_left_over == 0 && probes_empty,
        format!(
            "observers saw {} members left after the churn; fresh joins after the teardown: {}",
            c.observer_left_over,
            if c.probe_members.is_empty() {
                "none answered".to_string()
            } else {
                c.probe_members.iter().map(|(t, n)| format!("{t} {n}")).collect::<Vec<_>>().join(", ")
            }
        ),
    );
    r.pass = crit.iter().all(|c| c.pass);
    r.criteria = crit;
}

fn counts_lines(r: &SoakResult) -> Vec<(String, String)> {
    let c = &r.clients;
    let lat = |l: &Option<crate::history::Lat>| {
        l.as_ref()
            .map_or("–".into(), |l| format!("p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms", l.p50_ms, l.p99_ms, l.max_ms))
    };
    vec![
        (
            "connections".into(),
            format!(
                "{} TCP connections ({} WebSocket upgrades, {} SSE streams), {} steady",
                c.connections, c.ws_upgraded, c.sse_opened, c.steady_target
            ),
        ),
        (
            "churn cycles".into(),
            format!(
                "{} done of {} started ({} leave+close, {} leave+RST, {} RST, {} close frame, {} FIN; {} aborted), {} with a topic of their own",
                c.churn_done,
                c.churn_started,
                c.churn_leave_close,
                c.churn_leave_rst,
                c.churn_rst,
                c.churn_close_frame,
                c.churn_fin,
                c.churn_aborted,
                c.churn_own_topics
            ),
        ),
        ("churn connect+upgrade+join".into(), lat(&c.churn_join_latency)),
        ("joins".into(), format!("{} sent, {} ok; leaves {} sent, {} ok", c.joins_sent, c.joins_ok, c.leaves_sent, c.leaves_ok)),
        (
            "broadcasts".into(),
            format!(
                "{} published, {} acked; delivered {} to steady subscribers, {} to churn clients",
                c.published, c.publish_acked, c.delivered_steady, c.delivered_churn
            ),
        ),
        ("broadcast latency (steady)".into(), lat(&c.latency)),
        (
            "presence".into(),
            format!(
                "{} tracks sent ({} ok, {} re-tracks), {} untracks ({} ok); {} presence_state and {} presence_diff frames; observers saw {} joins and {} leaves",
                c.tracks_sent,
                c.tracks_ok,
                c.retracks,
                c.untracks_sent,
                c.untracks_ok,
                c.presence_state_frames,
                c.presence_diff_frames,
                c.observer_joins,
                c.observer_leaves
            ),
        ),
        (
            "SSE".into(),
            format!(
                "{} streams opened of {} started ({} with track=); events: {} broadcast, {} presence, {} other, {} keep-alives",
                c.sse_opened, c.sse_started, c.sse_tracked, c.sse_broadcast_events, c.sse_presence_events, c.sse_other_events, c.sse_keepalives
            ),
        ),
        (
            "persisted".into(),
            format!(
                "REST {} sent, {} acknowledged ({} requests ok, {} failed, POST→202 {}); WebSocket {} sent, {} acknowledged; {} history pages read in {} rounds",
                r.rest.messages_sent,
                r.rest.messages_acked,
                r.rest.requests_ok,
                r.rest.requests_failed,
                lat(&r.rest.latency),
                c.ws_persist_sent,
                c.ws_persist_acked,
                r.verify.pages,
                r.verify.rounds
            ),
        ),
        ("heartbeats".into(), format!("{} sent, {} replies", c.heartbeats_sent, c.heartbeat_replies)),
        (
            "server RSS".into(),
            format!("{} KiB before the load, {} KiB 10 s after the teardown", r.rss_baseline_kib, r.rss_after_kib),
        ),
        ("generator loop CPU".into(), format!("{:.1} s", c.generator_loop_cpu_secs)),
    ]
}

fn print_summary(r: &SoakResult, a: &SoakArgs) {
    println!();
    println!("soak on corecast: {} min of load, warm-up {:.1} min", a.minutes, r.warmup_minutes);
    if let Some(e) = &r.error {
        println!("  ERROR: {e}");
    }
    for (k, v) in counts_lines(r) {
        println!("  {k}: {v}");
    }
    let mut errs = r.clients.error_samples.clone();
    errs.extend(r.rest.errors.iter().map(|e| format!("REST {e}")));
    errs.extend(r.verify.samples.iter().map(|e| format!("history {e}")));
    for e in errs.iter().take(20) {
        println!("  error: {e}");
    }
    if !r.server_log_lines.is_empty() {
        println!("  server log ({} lines, first ones):", r.server_log_lines.len());
        for l in r.server_log_lines.iter().take(10) {
            println!("    {l}");
        }
    }
    println!();
    for c in &r.criteria {
        println!("  [{}] {}: {}", if c.pass { "PASS" } else { "FAIL" }, c.name, c.detail);
    }
    println!("VERDICT: {}", if r.pass { "PASS" } else { "FAIL" });
}

fn write_report(dir: &std::path::Path, r: &SoakResult) -> PathBuf {
    let stem = format!("soak-corecast-{}", report::stamp());
    report::write_json(&dir.join(format!("{stem}.json")), r);
    let pts = |f: &dyn Fn(&Sample) -> f64| r.samples.iter().map(|s| (s.t_secs / 60.0, f(s))).collect::<Vec<_>>();
    let rss_svg = report::line_chart(
        "corecast soak: server RSS",
        "minutes",
        "RSS MiB",
        &[Series { name: "VmRSS".into(), points: pts(&|s| s.rss_kib as f64 / 1024.0) }],
        None,
        false,
    );
    let fd_svg = report::line_chart(
        "corecast soak: server fds and client sockets",
        "minutes",
        "count",
        &[
            Series { name: "server fds".into(), points: pts(&|s| s.fds as f64) },
            Series { name: "client sockets".into(), points: pts(&|s| s.client_sockets as f64) },
        ],
        None,
        false,
    );
    let _ = std::fs::create_dir_all(dir);
    let _ = std::fs::write(dir.join(format!("{stem}-rss.svg")), rss_svg);
    let _ = std::fs::write(dir.join(format!("{stem}-fds.svg")), fd_svg);
    let mut md = String::new();
    let _ = writeln!(md, "# corecast soak ({} min)\n", r.minutes);
    md.push_str(&report::machine_md(&r.machine));
    let _ = writeln!(md, "\nCommand: `{}`\n", r.command);
    let _ = writeln!(md, "**Verdict: {}**\n", if r.pass { "PASS" } else { "FAIL" });
    if let Some(e) = &r.error {
        let _ = writeln!(md, "Error: {e}\n");
    }
    md.push_str("| criterion | result | detail |\n|---|---|---|\n");
    for c in &r.criteria {
        let _ = writeln!(md, "| {} | {} | {} |", c.name, if c.pass { "PASS" } else { "FAIL" }, c.detail);
    }
    md.push_str("\n| count | value |\n|---|---|\n");
    for (k, v) in counts_lines(r) {
        let _ = writeln!(md, "| {k} | {v} |");
    }
    md.push_str("\n| setting | value |\n|---|---|\n");
    for (k, v) in &r.config {
        let _ = writeln!(md, "| {k} | {v} |");
    }
    let _ = writeln!(md, "| warm-up | {:.1} min |", r.warmup_minutes);
    let _ = writeln!(md, "\n![]({stem}-rss.svg)\n\n![]({stem}-fds.svg)\n");
    md.push_str("## Samples\n\n| t s | phase | RSS KiB | fds | client sockets | unexplained fds | server CPU % | generator CPU % | churn cycles | deliveries | presence events | SSE events | persisted | errors |\n|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
    for s in &r.samples {
        let _ = writeln!(
            md,
            "| {:.0} | {} | {} | {} | {} | {:+} | {:.0} | {:.0} | {} | {} | {} | {} | {} | {} |",
            s.t_secs,
            s.phase,
            s.rss_kib,
            s.fds,
            s.client_sockets,
            s.unexplained_fds,
            s.server_cpu_pct,
            s.generator_cpu_pct,
            s.churn_done,
            s.deliveries,
            s.presence_events,
            s.sse_events,
            s.persisted_acked,
            s.errors
        );
    }
    let errs: Vec<&String> =
        r.clients.error_samples.iter().chain(&r.rest.errors).chain(&r.verify.samples).take(40).collect();
    if !errs.is_empty() {
        md.push_str("\n## First errors\n\n");
        for e in errs {
            let _ = writeln!(md, "- {e}");
        }
    }
    if !r.server_log_lines.is_empty() {
        md.push_str("\n## Server log (first lines)\n\n```\n");
        for l in &r.server_log_lines {
            let _ = writeln!(md, "{l}");
        }
        md.push_str("```\n");
    }
    let p = dir.join(format!("{stem}.md"));
    let _ = std::fs::write(&p, md);
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_defaults() {
        assert!((default_warmup_minutes(30.0) - 6.0).abs() < 1e-9);
        assert!((default_warmup_minutes(5.0) - 2.0).abs() < 1e-9);
        assert!((default_warmup_minutes(3.0) - 1.5).abs() < 1e-9);
        assert!((default_warmup_minutes(2.0) - 1.0).abs() < 1e-9);
    }

    #[test]
    fn rss_flat_and_growing() {
        let flat: Vec<(f64, u64)> = (0..=180).step_by(10).map(|t| (t as f64, 20_000 + (t % 20) as u64)).collect();
        let v = rss_verdict(&flat, 180.0, 60.0, 5.0).unwrap();
        assert!(v.pass, "{v:?}");
        assert_eq!(v.level_window, (60.0, 120.0));
        assert!(v.last.len() >= 3);
        assert!(v.last.iter().all(|p| p.0 >= 120.0));
        let grow: Vec<(f64, u64)> = (0..=180).step_by(10).map(|t| (t as f64, 20_000 + 20 * t as u64)).collect();
        let v = rss_verdict(&grow, 180.0, 60.0, 5.0).unwrap();
        assert!(!v.pass, "{v:?}");
        assert!(v.slope_kib_per_min > 1000.0);
        assert!(rss_verdict(&flat[..3], 180.0, 60.0, 5.0).is_none());
    }
}
