//! `loadtest cluster`: corecast's cluster mode against a real engine: `--backend postgres`
//! (`--cluster postgres` on `--database-url`) or `--backend nats` (`--cluster nats://…` on a
//! `nats-server -js` this tool starts on a free port with a fresh store, unpinned).
//!
//! The tool starts `--nodes` corecast nodes itself (`--shards 1`, node ids `lt-0 …`, slot base
//! `loadtest_cl`, fresh data dirs, `--cpus` from `--node-cpus`, by default `0,0`: every node's
//! shard and its cluster/replication thread on CPU 0), waits until every node's `GET /health`
//! lists all of them, and drives them from this process: one epoll loop, pinned to
//! `--client-cpu` (1). PostgreSQL is not started here and not pinned.
//!
//! - **latency**: `--subscribers` WebSocket clients (vsn 2.0.0, one channel on one topic)
//!   spread evenly over the nodes, one publisher on node 0 sending broadcasts at `--rate` for
//!   `--seconds`. Each payload (`--payload` bytes) carries its **scheduled** send time in µs
//!   since the Unix epoch (no coordinated omission); a subscriber records receive − send in an
//!   HDR histogram per node. Then the same subscribers, rate and publisher against one node
//!   with `--cluster none` (no database), the baseline: "added by the cluster" is cluster −
//!   single node, for p50 and p99. Loss: every subscriber must get every message (seq 1..=n).
//! - **ceiling**: `--publishers` WebSocket connections on node 0, joined with
//!   `broadcast.ack = true`, each keeping `--window` unacknowledged broadcasts in flight, for
//!   `--seconds`; one subscriber per node. Acknowledged msgs/s (an ack is sent after the
//!   message was sequenced: committed, or stored by JetStream), delivered msgs/s at the
//!   subscriber on node 1, and what each message cost the engine: CPU time of every process
//!   whose `comm` starts with `postgres` (utime + stime, so the walsenders decoding N slots are
//!   in it) or `nats-server`, per 1,000 messages, and bytes per message (WAL written:
//!   `pg_current_wal_lsn()` before and after; NATS: what the server received, `/varz` `in_bytes`).
//!
//! SQL goes through `psql`, as in `pg.rs`.

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::net::{SocketAddrV4, TcpStream};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::coord::si;
use crate::sys;
use crate::wire::{parse_frame_head, push_client_frame, push_payload, read_available, scan_fields, OP_CLOSE, OP_TEXT};

/// Slot base: node `lt-3` streams from `loadtest_cl_lt_3`.
const SLOT: &str = "loadtest_cl";

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    Latency,
    Ceiling,
    /// The ceiling run against one `--cluster none` node: what the cluster adds per message.
    CeilingSingle,
    All,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    Postgres,
    Nats,
}

#[derive(clap::Args, Debug)]
pub struct ClusterArgs {
    /// The cluster engine.
    #[arg(long, value_enum, default_value = "postgres")]
    pub backend: Backend,
    /// Database every node shares (wal_level=logical; schema corecast is created there);
    /// `--backend postgres` only.
    #[arg(long, env = "DATABASE_URL")]
    pub database_url: Option<String>,
    /// nats-server binary (`--backend nats`).
    #[arg(long, default_value = "nats-server")]
    pub nats_server: String,
    /// psql binary.
    #[arg(long, default_value = "psql")]
    pub psql: String,
    /// corecast binary to start.
    #[arg(long, default_value = "target/release/corecast")]
    pub corecast: PathBuf,
    /// Cluster nodes to start.
    #[arg(long, default_value_t = 3)]
    pub nodes: usize,
    /// What to measure.
    #[arg(long, value_enum, default_value = "all")]
    pub mode: Mode,
    /// Latency: subscribers in total, spread evenly over the nodes (one topic).
    #[arg(long, default_value_t = 3000)]
    pub subscribers: usize,
    /// Latency: broadcasts per second from the one publisher on node 0.
    #[arg(long, default_value_t = 10000.0)]
    pub rate: f64,
    /// Seconds of publishing (latency, and ceiling).
    #[arg(long, default_value_t = 10)]
    pub seconds: u64,
    /// Payload object size in bytes (`{"s":…,"t":…,"p":…,"x":"…"}`).
    #[arg(long, default_value_t = 100)]
    pub payload: usize,
    /// Ceiling: publisher connections on node 0 (broadcast acks on).
    #[arg(long, default_value_t = 4)]
    pub publishers: usize,
    /// Ceiling: unacknowledged broadcasts in flight per publisher.
    #[arg(long, default_value_t = 1000)]
    pub window: usize,
    /// `--cpus` of every node: the shard's CPU, then the replication (ingest) thread's. The
    /// single-node baseline gets the first one only.
    #[arg(long, default_value = "0,0")]
    pub node_cpus: String,
    /// CPU of this process (the generator).
    #[arg(long, default_value_t = 1)]
    pub client_cpu: usize,
    /// Longest wait for deliveries after publishing stops, seconds.
    #[arg(long, default_value_t = 30)]
    pub drain_secs: u64,
    /// Skip the single-node baseline of the latency run.
    #[arg(long)]
    pub no_baseline: bool,
    /// Write the results as JSON into this directory (cluster-<date>.json).
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// Latency summary of one set of subscribers.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct Lat {
    pub subscribers: usize,
    pub expected: u64,
    pub received: u64,
    pub lost: u64,
    pub duplicated: u64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
}

#[derive(Debug, Serialize)]
pub struct NodeLat {
    pub node: String,
    #[serde(flatten)]
    pub lat: Lat,
}

/// One latency run (the cluster's or the single node's).
#[derive(Debug, Serialize)]
pub struct LatRun {
    pub published: u64,
    pub publish_secs: f64,
    pub deliveries_per_sec: f64,
    pub per_node: Vec<NodeLat>,
    pub overall: Lat,
    pub generator_cpu_pct: f64,
    pub closed: usize,
}

#[derive(Debug, Serialize)]
pub struct LatencyResult {
    pub subscribers: usize,
    pub rate: f64,
    pub seconds: u64,
    pub cluster: LatRun,
    pub single_node: Option<LatRun>,
    /// cluster − single node.
    pub added_p50_ms: Option<f64>,
    pub added_p99_ms: Option<f64>,
    /// Expected deliveries minus received ones, cluster and single node together.
    pub lost: u64,
}

#[derive(Debug, Serialize)]
pub struct CeilingResult {
    pub publishers: usize,
    pub window: usize,
    /// From the first send to the last ack.
    pub seconds: f64,
    pub sent: u64,
    pub acked: u64,
    pub ack_errors: u64,
    pub acked_per_sec: f64,
    /// At the subscriber on node 1 (node 0 when there is one node), first → last delivery.
    pub delivered_per_sec: f64,
    pub delivered_node: String,
    /// Received by each node's subscriber (every one must equal `acked`).
    pub received: Vec<(String, u64)>,
    pub lost: u64,
    pub ack_p50_ms: f64,
    pub ack_p99_ms: f64,
    /// CPU time of every engine process (`postgres*` / `nats-server`) on this machine, per
    /// 1,000 acknowledged messages.
    pub engine_cpu_ms_per_1000: f64,
    pub engine_cpu_secs: f64,
    /// Bytes the engine took in (WAL written, or bytes nats-server received).
    pub engine_bytes: u64,
    pub engine_bytes_per_msg: f64,
}

#[derive(Debug, Serialize)]
pub struct ClusterResults {
    pub backend: Backend,
    pub nodes: usize,
    pub pinning: String,
    pub host: String,
    pub latency: Option<LatencyResult>,
    pub ceiling: Option<CeilingResult>,
    pub error: Option<String>,
}

fn now_us() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_micros() as u64)
}

// ---------------------------------------------------------------------------------------------
// Pure helpers (unit-tested)

/// A `pg_lsn` (`16/B374D848`) as a byte position.
pub fn parse_lsn(s: &str) -> Option<u64> {
    let (hi, lo) = s.trim().split_once('/')?;
    Some(u64::from_str_radix(hi, 16).ok()? << 32 | u64::from_str_radix(lo, 16).ok()?)
}

/// `(comm, utime + stime)` of one `/proc/<pid>/stat` line.
pub fn parse_stat(s: &str) -> Option<(&str, u64)> {
    let open = s.find('(')?;
    let close = s.rfind(')')?;
    let comm = &s[open + 1..close];
    let f: Vec<&str> = s.get(close + 2..)?.split_whitespace().collect();
    Some((comm, f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?))
}

/// `members` of a `/health` body.
pub fn parse_members(body: &[u8]) -> Option<Vec<String>> {
    let v: serde_json::Value = serde_json::from_slice(body).ok()?;
    v.get("members")?.as_array()?.iter().map(|m| m.as_str().map(String::from)).collect()
}

/// The address in corecast's ready line (`corecast listening on http://ADDR with N shards`).
pub fn parse_ready(line: &str) -> Option<SocketAddrV4> {
    line.trim().strip_prefix("corecast listening on http://")?.split(' ').next()?.parse().ok()
}

/// Messages due `elapsed` after the start at `rate`/s (message 1 is due at 1/rate).
pub fn due(elapsed: Duration, rate: f64) -> u64 {
    (elapsed.as_secs_f64() * rate).floor() as u64
}

/// Scheduled send time (µs since the epoch) of message `seq` of a run that started at `t0_us`.
pub fn scheduled_us(t0_us: u64, seq: u64, rate: f64) -> u64 {
    t0_us + (seq as f64 * 1e6 / rate).round() as u64
}

/// What a subscriber has seen of one publisher's sequence (1, 2, 3 …, one order per topic).
#[derive(Debug, Default, Clone)]
pub struct SeqTrack {
    pub last: u64,
    /// Messages with a sequence above every earlier one.
    pub got: u64,
    /// A sequence at or below the newest seen (duplicate or reordered).
    pub dup: u64,
}

impl SeqTrack {
    /// Records `seq`; true when it counts as a new delivery.
    pub fn see(&mut self, seq: u64) -> bool {
        if seq > self.last {
            self.last = seq;
            self.got += 1;
            true
        } else {
            self.dup += 1;
            false
        }
    }
}

fn ms(h: &Histogram<u64>, q: f64) -> f64 {
    if h.is_empty() {
        0.0
    } else {
        h.value_at_quantile(q) as f64 / 1000.0
    }
}

fn hist() -> Histogram<u64> {
    Histogram::<u64>::new_with_bounds(1, 3_600_000_000, 3).expect("histogram")
}

/// Summary of a histogram (µs values) and the loss figures.
pub fn summarize(h: &Histogram<u64>, subscribers: usize, expected: u64, received: u64, duplicated: u64) -> Lat {
    Lat {
        subscribers,
        expected,
        received,
        lost: expected.saturating_sub(received),
        duplicated,
        p50_ms: ms(h, 0.5),
        p99_ms: ms(h, 0.99),
        p999_ms: ms(h, 0.999),
        max_ms: if h.is_empty() { 0.0 } else { h.max() as f64 / 1000.0 },
    }
}

/// Subscriber `i` of `n` subscribers goes to node `i % nodes`: the counts per node.
pub fn spread(n: usize, nodes: usize) -> Vec<usize> {
    (0..nodes).map(|k| n / nodes + usize::from(k < n % nodes)).collect()
}

// ---------------------------------------------------------------------------------------------
// Database

struct Db<'a> {
    a: &'a ClusterArgs,
    url: String,
}

impl Db<'_> {
    fn sql(&self, sql: &str) -> Result<String, String> {
        let out = Command::new(&self.a.psql)
            .args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-d", &self.url, "-c", sql])
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("cannot run {}: {e}", self.a.psql))?;
        if !out.status.success() {
            return Err(format!("psql failed: {}", String::from_utf8_lossy(&out.stderr)));
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    fn wal_lsn(&self) -> Result<u64, String> {
        let s = self.sql("SELECT pg_current_wal_lsn()")?;
        parse_lsn(&s).ok_or_else(|| format!("unexpected LSN {s:?}"))
    }

    /// The slots of this tool's nodes (inactive ones: after the nodes stopped).
    fn drop_slots(&self) {
        let _ = self.sql(
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots \
             WHERE slot_name LIKE 'loadtest\\_cl\\_%' AND NOT active",
        );
    }

    /// Node leases and topic rows this tool left (the tables exist once a node ran).
    fn clean_rows(&self) {
        let _ = self.sql(
            "DO $$ BEGIN \
               IF to_regclass('corecast.nodes') IS NOT NULL THEN DELETE FROM corecast.nodes WHERE node_id LIKE 'lt-%'; END IF; \
               IF to_regclass('corecast.topics') IS NOT NULL THEN DELETE FROM corecast.topics WHERE topic LIKE 'loadtest-cl-%'; END IF; \
             END $$",
        );
    }
}

/// A `nats-server -js` of this run: a free port, a fresh store, killed on drop.
struct NatsProc {
    child: Child,
    port: u16,
    /// The monitoring port (`/varz`).
    http: u16,
    dir: PathBuf,
}

impl NatsProc {
    fn start(bin: &str) -> Result<NatsProc, String> {
        let free = || -> Result<u16, String> {
            let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
            Ok(l.local_addr().map_err(|e| e.to_string())?.port())
        };
        let (port, http) = (free()?, free()?);
        let dir = std::env::temp_dir().join(format!("loadtest-cl-nats-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        let log = dir.join("log");
        let child = Command::new(bin)
            .args(["-a", "127.0.0.1", "-p", &port.to_string(), "-m", &http.to_string(), "-js", "-sd"])
            .arg(dir.join("store"))
            .arg("-l")
            .arg(&log)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot start {bin}: {e} (apt-get install nats-server)"))?;
        let n = NatsProc { child, port, http, dir };
        let deadline = Instant::now() + Duration::from_secs(15);
        while !std::fs::read_to_string(&log).unwrap_or_default().contains("Server is ready") {
            if Instant::now() > deadline {
                return Err(format!(
                    "nats-server did not become ready: {}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(n)
    }

    /// Bytes the server has received from its clients (`/varz` `in_bytes`): the published
    /// batches, plus small change (heartbeats, presence, consumer flow control).
    fn in_bytes(&self) -> Result<u64, String> {
        let mut c = TcpStream::connect(("127.0.0.1", self.http)).map_err(|e| format!("nats /varz: {e}"))?;
        c.write_all(b"GET /varz HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").map_err(|e| e.to_string())?;
        let mut body = String::new();
        c.read_to_string(&mut body).map_err(|e| e.to_string())?;
        parse_in_bytes(&body).ok_or_else(|| "nats /varz: no in_bytes".to_string())
    }
}

impl Drop for NatsProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// What the nodes share.
enum Engine<'a> {
    Pg(Db<'a>),
    Nats(NatsProc),
}

impl Engine<'_> {
    /// The `--cluster …` arguments and environment of a node.
    fn node_args(&self) -> (Vec<String>, Vec<(String, String)>) {
        match self {
            Engine::Pg(db) => (
                vec!["--cluster".into(), "postgres".into(), "--slot".into(), SLOT.into()],
                vec![("DATABASE_URL".into(), db.url.clone())],
            ),
            Engine::Nats(n) => (vec!["--cluster".into(), format!("nats://127.0.0.1:{}", n.port)], Vec::new()),
        }
    }

    /// Bytes the engine has written so far.
    fn bytes(&self) -> Result<u64, String> {
        match self {
            Engine::Pg(db) => db.wal_lsn(),
            Engine::Nats(n) => n.in_bytes(),
        }
    }

    /// CPU ticks of the engine's processes.
    fn ticks(&self) -> u64 {
        match self {
            Engine::Pg(_) => process_ticks("postgres"),
            Engine::Nats(_) => process_ticks("nats-server"),
        }
    }

    fn name(&self) -> &'static str {
        match self {
            Engine::Pg(_) => "postgres",
            Engine::Nats(_) => "nats-server",
        }
    }
}

/// `"in_bytes": N` of a `/varz` response.
pub fn parse_in_bytes(body: &str) -> Option<u64> {
    let rest = &body[body.find("\"in_bytes\"")? + 10..];
    let rest = rest.trim_start().strip_prefix(':')?.trim_start();
    rest[..rest.find(|c: char| !c.is_ascii_digit()).unwrap_or(rest.len())].parse().ok()
}

/// CPU ticks of every process on this machine whose comm starts with `prefix`.
fn process_ticks(prefix: &str) -> u64 {
    let Ok(rd) = std::fs::read_dir("/proc") else { return 0 };
    rd.flatten()
        .filter(|e| e.file_name().to_str().is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit())))
        .filter_map(|e| std::fs::read_to_string(e.path().join("stat")).ok())
        .filter_map(|s| parse_stat(&s).filter(|(c, _)| c.starts_with(prefix)).map(|(_, t)| t))
        .sum()
}

// ---------------------------------------------------------------------------------------------
// Nodes

struct Node {
    child: Child,
    addr: SocketAddrV4,
    id: String,
    dir: PathBuf,
}

impl Node {
    /// Node `idx`: a cluster node, or (`cluster == false`) the single-node baseline.
    fn start(a: &ClusterArgs, idx: usize, engine: Option<&Engine<'_>>) -> Result<Node, String> {
        let cluster = engine.is_some();
        let id = format!("lt-{idx}");
        let dir = std::env::temp_dir().join(format!("loadtest-cl-{}-{id}-{}", std::process::id(), cluster));
        let _ = std::fs::remove_dir_all(&dir);
        let cpus = if cluster { a.node_cpus.clone() } else { a.node_cpus.split(',').next().unwrap_or("0").into() };
        let mut cmd = Command::new(&a.corecast);
        cmd.args(["--listen", "127.0.0.1:0", "--shards", "1", "--cpus", &cpus, "--node-id", &id])
            .args(["--idle-timeout-secs", "600", "--max-queue-bytes", "268435456"])
            .arg("--data-dir")
            .arg(&dir)
            .env("RUST_LOG", "warn")
            .env_remove("CORECAST_JWT_SECRET")
            .env_remove("CORECAST_DATABASE_URL")
            .env_remove("CORECAST_CLUSTER")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        if let Some(e) = engine {
            let (args, env) = e.node_args();
            cmd.args(args).envs(env);
        } else {
            cmd.args(["--cluster", "none"]).env_remove("DATABASE_URL");
        }
        let mut child = cmd
            .spawn()
            .map_err(|e| format!("cannot start {}: {e} (build it: cargo build --release)", a.corecast.display()))?;
        let mut out = child.stdout.take().expect("piped");
        let mut line = Vec::new();
        let mut b = [0u8; 1];
        while !line.ends_with(b"\n") {
            match out.read(&mut b) {
                Ok(1) => line.push(b[0]),
                _ => {
                    let _ = child.wait();
                    return Err(format!("corecast node {id} exited before it was ready"));
                }
            }
        }
        let line = String::from_utf8_lossy(&line).to_string();
        let Some(addr) = parse_ready(&line) else {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!("unexpected ready line: {line}"));
        };
        std::thread::spawn(move || {
            let mut sink = Vec::new();
            let _ = out.read_to_end(&mut sink);
        });
        Ok(Node { child, addr, id, dir })
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        // SAFETY: plain kill(2) of our child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `GET /health` of `addr`: its members.
fn health_members(addr: SocketAddrV4) -> Result<Vec<String>, String> {
    let mut s = TcpStream::connect(addr).map_err(|e| format!("connect {addr}: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok();
    s.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").map_err(|e| e.to_string())?;
    let mut b = Vec::new();
    let _ = s.read_to_end(&mut b);
    let body = memchr::memmem::find(&b, b"\r\n\r\n").map(|i| &b[i + 4..]).ok_or("no HTTP response")?;
    parse_members(body).ok_or_else(|| format!("no members in /health: {}", String::from_utf8_lossy(body)))
}

fn wait_members(nodes: &[Node], timeout: Duration) -> Result<(), String> {
    let mut want: Vec<String> = nodes.iter().map(|n| n.id.clone()).collect();
    want.sort();
    let deadline = Instant::now() + timeout;
    for n in nodes {
        loop {
            let m = health_members(n.addr)?;
            if m == want {
                break;
            }
            if Instant::now() > deadline {
                return Err(format!("node {} lists members {m:?}, not {want:?}, after {timeout:?}", n.id));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Clients: one epoll loop

/// A message a client received.
enum Got {
    Broadcast { seq: u64, t_us: u64, publisher: usize },
    Reply { ok: bool },
}

struct Conn {
    idx: usize,
    /// Joined with `broadcast.ack = true`.
    ack: bool,
    s: TcpStream,
    buf: Vec<u8>,
    out: Vec<u8>,
    node: usize,
    joined: bool,
    closed: bool,
    /// Per publisher id (the payload's `"p"`): each publisher's messages keep their order.
    tracks: Vec<SeqTrack>,
    /// Publishers: send times (µs) of the unacknowledged broadcasts, oldest first.
    inflight: VecDeque<u64>,
}

impl Conn {
    /// Records `seq` of `publisher`; true when it is a new delivery.
    fn see(&mut self, publisher: usize, seq: u64) -> bool {
        if publisher >= self.tracks.len() {
            if publisher > 1024 {
                return false;
            }
            self.tracks.resize(publisher + 1, SeqTrack::default());
        }
        self.tracks[publisher].see(seq)
    }

    fn got(&self) -> u64 {
        self.tracks.iter().map(|t| t.got).sum()
    }

    fn dup(&self) -> u64 {
        self.tracks.iter().map(|t| t.dup).sum()
    }
}

struct Net {
    conns: Vec<Conn>,
    ep: sys::Epoll,
    errors: Vec<String>,
    last_hb: Instant,
    chunk: Vec<u8>,
    events: Vec<libc::epoll_event>,
}

fn frame(text: &[u8]) -> Vec<u8> {
    let mut v = Vec::new();
    push_client_frame(&mut v, OP_TEXT, text, [1, 2, 3, 4]);
    v
}

/// The broadcast frame a publisher sends (`["1",SEQ,"realtime:TOPIC","broadcast",{…}]`).
fn push_broadcast(
    out: &mut Vec<u8>,
    topic: &str,
    publisher: usize,
    seq: u64,
    t_us: u64,
    size: usize,
    body: &mut Vec<u8>,
) {
    body.clear();
    body.extend_from_slice(b"[\"1\",\"");
    body.extend_from_slice(seq.to_string().as_bytes());
    body.extend_from_slice(b"\",\"realtime:");
    body.extend_from_slice(topic.as_bytes());
    body.extend_from_slice(b"\",\"broadcast\",{\"type\":\"broadcast\",\"event\":\"m\",\"payload\":");
    push_payload(body, seq, t_us, publisher as u64, size);
    body.extend_from_slice(b"}]");
    push_client_frame(out, OP_TEXT, body, [7, 7, 7, 7]);
}

impl Net {
    fn new() -> Result<Net, String> {
        Ok(Net {
            conns: Vec::new(),
            ep: sys::Epoll::new().map_err(|e| e.to_string())?,
            errors: Vec::new(),
            last_hb: Instant::now(),
            chunk: vec![0u8; 1 << 16],
            events: vec![libc::epoll_event { events: 0, u64: 0 }; 512],
        })
    }

    /// Connects, upgrades (vsn 2.0.0) and sends the join of `realtime:<topic>`.
    fn connect(&mut self, addr: SocketAddrV4, node: usize, topic: &str, ack: bool) -> Result<usize, String> {
        let mut s = TcpStream::connect(addr).map_err(|e| format!("connect {addr}: {e}"))?;
        s.set_nodelay(true).ok();
        s.write_all(
            b"GET /realtime/v1/websocket?apikey=loadtest&vsn=2.0.0 HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n\
              Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        )
        .map_err(|e| e.to_string())?;
        let mut head = Vec::new();
        let mut b = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            if s.read(&mut b).map_err(|e| e.to_string())? == 0 {
                return Err("closed during the upgrade".into());
            }
            head.push(b[0]);
        }
        if !head.starts_with(b"HTTP/1.1 101") {
            return Err(format!("upgrade refused: {}", String::from_utf8_lossy(&head)));
        }
        let join = format!(
            r#"["1","j","realtime:{topic}","phx_join",{{"config":{{"broadcast":{{"ack":{ack},"self":false}},"presence":{{"key":"","enabled":false}},"private":false}}}}]"#
        );
        s.write_all(&frame(join.as_bytes())).map_err(|e| e.to_string())?;
        s.set_nonblocking(true).map_err(|e| e.to_string())?;
        let i = self.conns.len();
        self.ep.add(s.as_raw_fd(), libc::EPOLLIN as u32, i as u64).map_err(|e| e.to_string())?;
        self.conns.push(Conn {
            idx: i,
            ack,
            s,
            buf: Vec::with_capacity(1 << 16),
            out: Vec::new(),
            node,
            joined: false,
            closed: false,
            tracks: Vec::new(),
            inflight: VecDeque::new(),
        });
        Ok(i)
    }

    /// Writes what is queued for `i` as far as the socket takes it.
    fn flush(&mut self, i: usize) {
        let c = &mut self.conns[i];
        let mut off = 0;
        while off < c.out.len() {
            match c.s.write(&c.out[off..]) {
                Ok(0) => break,
                Ok(k) => off += k,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(_) => {
                    c.closed = true;
                    break;
                }
            }
        }
        c.out.drain(..off);
    }

    /// Reads for up to `d` (returns after the first batch of events), calling `on(conn, got,
    /// now_us)` for each broadcast and reply.
    fn poll(&mut self, d: Duration, mut on: impl FnMut(&mut Conn, Got, u64)) {
        let n = self.ep.wait_ns(&mut self.events, Some(d.as_nanos() as u64));
        for k in 0..n {
            let i = self.events[k].u64 as usize;
            let c = &mut self.conns[i];
            if c.closed {
                continue;
            }
            if !read_available(&mut c.s, &mut self.chunk, &mut c.buf) {
                c.closed = true;
            }
            let t = now_us();
            let mut pos = 0;
            while let Some(h) = parse_frame_head(&c.buf[pos..]) {
                let end = pos + h.header_len + h.payload_len;
                if end > c.buf.len() {
                    break;
                }
                let p = &c.buf[pos + h.header_len..end];
                if h.opcode == OP_CLOSE {
                    c.closed = true;
                } else if h.opcode == OP_TEXT {
                    if memchr::memmem::find(p, b"\"broadcast\",{").is_some() {
                        if let Some(f) = scan_fields(p) {
                            on(c, Got::Broadcast { seq: f.seq, t_us: f.t_ns, publisher: f.publisher as usize }, t);
                        }
                    } else if memchr::memmem::find(p, b"\"phx_reply\"").is_some() {
                        let ok = memchr::memmem::find(p, b"\"status\":\"ok\"").is_some();
                        if p.starts_with(b"[\"1\",\"j\",") {
                            c.joined = ok;
                            if !ok && self.errors.len() < 10 {
                                self.errors.push(String::from_utf8_lossy(p).into_owned());
                            }
                        } else if !p.starts_with(b"[null,\"hb\"") {
                            if !ok && self.errors.len() < 10 {
                                self.errors.push(String::from_utf8_lossy(p).into_owned());
                            }
                            on(c, Got::Reply { ok }, t);
                        }
                    } else if memchr::memmem::find(p, b"\"phx_error\"").is_some() && self.errors.len() < 10 {
                        self.errors.push(String::from_utf8_lossy(p).into_owned());
                    }
                }
                pos = end;
            }
            c.buf.drain(..pos);
            if c.closed {
                self.ep.delete(c.s.as_raw_fd());
            }
        }
        if self.last_hb.elapsed() > Duration::from_secs(20) {
            self.last_hb = Instant::now();
            let hb = frame(br#"[null,"hb","phoenix","heartbeat",{}]"#);
            for i in 0..self.conns.len() {
                self.conns[i].out.extend_from_slice(&hb);
                self.flush(i);
            }
        }
    }

    fn wait_joined(&mut self, timeout: Duration) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.conns.iter().all(|c| c.joined) {
                return Ok(());
            }
            self.poll(Duration::from_millis(20), |_, _, _| {});
        }
        let n = self.conns.iter().filter(|c| c.joined).count();
        Err(format!("only {n} of {} joined in {timeout:?}; errors: {:?}", self.conns.len(), self.errors))
    }

    fn closed(&self) -> usize {
        self.conns.iter().filter(|c| c.closed).count()
    }

    /// Publishes warm-up broadcasts (seq 0) from `publisher` until every subscriber in `subs`
    /// got one: every node's stream is live before the measurement starts.
    fn warm_up(&mut self, publisher: usize, subs: &[usize], topic: &str, timeout: Duration) -> Result<(), String> {
        let mut got = vec![false; self.conns.len()];
        let deadline = Instant::now() + timeout;
        let mut body = Vec::new();
        let mut last_send = None::<Instant>;
        let acks = self.conns[publisher].inflight.len();
        while !subs.iter().all(|&i| got[i]) {
            if Instant::now() > deadline {
                let n = subs.iter().filter(|&&i| got[i]).count();
                return Err(format!(
                    "warm-up: {n} of {} subscribers got a broadcast; errors: {:?}",
                    subs.len(),
                    self.errors
                ));
            }
            if last_send.is_none_or(|t| t.elapsed() > Duration::from_millis(250)) {
                last_send = Some(Instant::now());
                let mut out = std::mem::take(&mut self.conns[publisher].out);
                push_broadcast(&mut out, topic, 0, 0, now_us(), 20, &mut body);
                self.conns[publisher].out = out;
                self.conns[publisher].inflight.push_back(now_us());
                self.flush(publisher);
            }
            self.poll(Duration::from_millis(10), |c, g, _| match g {
                Got::Broadcast { seq: 0, .. } => got[c.idx] = true,
                Got::Reply { .. } => {
                    c.inflight.pop_front();
                }
                _ => {}
            });
        }
        // The warm-up messages' acks must not count in the measurement: wait for them.
        let until = Instant::now() + Duration::from_secs(5);
        while self.conns[publisher].ack && self.conns[publisher].inflight.len() > acks && Instant::now() < until {
            self.poll(Duration::from_millis(10), |c, g, _| {
                if let Got::Reply { .. } = g {
                    c.inflight.pop_front();
                }
            });
        }
        self.conns[publisher].inflight.clear();
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Latency

fn latency_run(a: &ClusterArgs, nodes: &[Node], label: &str, topic: &str) -> Result<LatRun, String> {
    let mut net = Net::new()?;
    let counts = spread(a.subscribers, nodes.len());
    let mut subs = Vec::with_capacity(a.subscribers);
    for i in 0..a.subscribers {
        let k = i % nodes.len();
        subs.push(net.connect(nodes[k].addr, k, topic, false)?);
        if i % 256 == 255 {
            // Keep the joins' replies from piling up.
            net.poll(Duration::ZERO, |_, _, _| {});
        }
    }
    // Warm-up acks tell the publisher's session that its messages were sequenced.
    let publisher = net.connect(nodes[0].addr, 0, topic, false)?;
    net.wait_joined(Duration::from_secs(60))?;
    net.warm_up(publisher, &subs, topic, Duration::from_secs(30))?;
    eprintln!(
        "{label}: {} subscribers joined and live; publishing {} msgs/s for {} s",
        a.subscribers, a.rate, a.seconds
    );

    let n = (a.rate * a.seconds as f64).round() as u64;
    let mut hs: Vec<Histogram<u64>> = nodes.iter().map(|_| hist()).collect();
    let mut body = Vec::new();
    let cpu0 = sys::process_cpu_ns();
    let t0 = Instant::now();
    let t0_us = now_us();
    let mut sent = 0u64;
    let mut last_delivery = t0;
    let mut last_progress = Instant::now();
    let mut publish_secs = 0.0;
    let expected = n * a.subscribers as u64;
    let mut received = 0u64;
    loop {
        if sent < n {
            let want = due(t0.elapsed(), a.rate).min(n);
            if want > sent {
                let mut out = std::mem::take(&mut net.conns[publisher].out);
                for seq in sent + 1..=want {
                    push_broadcast(&mut out, topic, 0, seq, scheduled_us(t0_us, seq, a.rate), a.payload, &mut body);
                }
                net.conns[publisher].out = out;
                sent = want;
                if sent == n {
                    publish_secs = t0.elapsed().as_secs_f64();
                }
            }
        }
        if !net.conns[publisher].out.is_empty() {
            net.flush(publisher);
        }
        let next = if sent < n {
            let at = Duration::from_secs_f64((sent + 1) as f64 / a.rate);
            at.saturating_sub(t0.elapsed()).min(Duration::from_millis(1))
        } else {
            Duration::from_millis(10)
        };
        let before = received;
        net.poll(next, |c, g, now| {
            if let Got::Broadcast { seq, t_us, publisher } = g {
                if seq > 0 && c.see(publisher, seq) {
                    received += 1;
                    let _ = hs[c.node].record(now.saturating_sub(t_us).max(1));
                }
            }
        });
        if received > before {
            last_delivery = Instant::now();
            last_progress = last_delivery;
        }
        if sent == n && net.conns[publisher].out.is_empty() {
            if received >= expected {
                break;
            }
            if last_progress.elapsed() > Duration::from_secs(3)
                || t0.elapsed() > Duration::from_secs(a.seconds + a.drain_secs)
            {
                break;
            }
        }
    }
    let cpu = (sys::process_cpu_ns() - cpu0) as f64 / 1e9;
    let span = last_delivery.duration_since(t0).as_secs_f64().max(1e-6);
    let mut all = hist();
    let mut per_node = Vec::new();
    let mut dup_total = 0;
    for (k, node) in nodes.iter().enumerate() {
        let mine = net.conns.iter().take(a.subscribers).filter(|c| c.node == k);
        let (got, dup) = mine.fold((0, 0), |(g, d), c| (g + c.got(), d + c.dup()));
        dup_total += dup;
        all.add(&hs[k]).expect("same bounds");
        per_node
            .push(NodeLat { node: node.id.clone(), lat: summarize(&hs[k], counts[k], n * counts[k] as u64, got, dup) });
    }
    Ok(LatRun {
        published: sent,
        publish_secs,
        deliveries_per_sec: received as f64 / span,
        per_node,
        overall: summarize(&all, a.subscribers, expected, received, dup_total),
        generator_cpu_pct: 100.0 * cpu / t0.elapsed().as_secs_f64().max(1e-6),
        closed: net.closed(),
    })
}

// ---------------------------------------------------------------------------------------------
// Ceiling

fn ceiling_run(a: &ClusterArgs, engine: &Engine<'_>, nodes: &[Node], topic: &str) -> Result<CeilingResult, String> {
    let mut net = Net::new()?;
    let subs: Vec<usize> =
        (0..nodes.len()).map(|k| net.connect(nodes[k].addr, k, topic, false)).collect::<Result<_, _>>()?;
    let pubs: Vec<usize> =
        (0..a.publishers.max(1)).map(|_| net.connect(nodes[0].addr, 0, topic, true)).collect::<Result<_, _>>()?;
    net.wait_joined(Duration::from_secs(30))?;
    net.warm_up(pubs[0], &subs, topic, Duration::from_secs(30))?;
    eprintln!(
        "ceiling: {} publishers × window {} on {}, one subscriber per node; {} s",
        pubs.len(),
        a.window,
        nodes[0].id,
        a.seconds
    );
    let watch = if nodes.len() > 1 { subs[1] } else { subs[0] };
    let mut ack_h = hist();
    let mut body = Vec::new();
    let (mut sent, mut acked, mut ack_errors) = (0u64, 0u64, 0u64);
    let mut seqs = vec![0u64; pubs.len()];
    let mut last_ack = None::<Instant>;
    let (mut first, mut last) = (None::<Instant>, Instant::now());
    let mut watch_got = 0u64;
    let bytes0 = engine.bytes()?;
    let ticks0 = engine.ticks();
    let t0 = Instant::now();
    let stop = Duration::from_secs(a.seconds);
    let mut stopped_at = None;
    let mut last_progress = Instant::now();
    loop {
        let publishing = t0.elapsed() < stop;
        if publishing {
            let now = now_us();
            for (pi, &p) in pubs.iter().enumerate() {
                let room = a.window.saturating_sub(net.conns[p].inflight.len());
                if room == 0 {
                    continue;
                }
                let mut out = std::mem::take(&mut net.conns[p].out);
                for _ in 0..room {
                    sent += 1;
                    seqs[pi] += 1;
                    push_broadcast(&mut out, topic, pi, seqs[pi], now, a.payload, &mut body);
                    net.conns[p].inflight.push_back(now);
                }
                net.conns[p].out = out;
                net.flush(p);
            }
        } else if stopped_at.is_none() {
            stopped_at = Some(t0.elapsed().as_secs_f64());
        }
        for &p in &pubs {
            if !net.conns[p].out.is_empty() {
                net.flush(p);
            }
        }
        let mut progress = false;
        net.poll(Duration::from_millis(1), |c, g, now| match g {
            Got::Reply { ok } => {
                if let Some(t) = c.inflight.pop_front() {
                    let _ = ack_h.record(now.saturating_sub(t).max(1));
                }
                last_ack = Some(Instant::now());
                if ok {
                    acked += 1;
                } else {
                    ack_errors += 1;
                }
                progress = true;
            }
            Got::Broadcast { seq, publisher, .. } => {
                if seq > 0 && c.see(publisher, seq) && c.idx == watch {
                    watch_got += 1;
                    let t = Instant::now();
                    first.get_or_insert(t);
                    last = t;
                }
                progress = true;
            }
        });
        if progress {
            last_progress = Instant::now();
        }
        if !publishing {
            let inflight: usize = pubs.iter().map(|&p| net.conns[p].inflight.len()).sum();
            let all_in = subs.iter().all(|&s| net.conns[s].got() >= acked);
            let stalled = last_progress.elapsed() > Duration::from_secs(5);
            let late = t0.elapsed() > stop + Duration::from_secs(a.drain_secs);
            if inflight == 0 && all_in {
                break;
            }
            if stalled || late {
                let got: Vec<u64> = subs.iter().map(|&s| net.conns[s].got()).collect();
                eprintln!(
                    "ceiling: drain ended ({}): {inflight} unacknowledged, received per subscriber {got:?} of {acked} acked; closed {}; errors {:?}",
                    if stalled { "nothing arrived for 5 s" } else { "--drain-secs passed" },
                    net.closed(),
                    net.errors
                );
                break;
            }
        }
    }
    let ticks = engine.ticks().saturating_sub(ticks0);
    let bytes = engine.bytes()?.saturating_sub(bytes0);
    // From the first send to the last ack (the windows still in flight at the stop drain).
    let secs = last_ack.map_or(stopped_at.unwrap_or(a.seconds as f64), |t| t.duration_since(t0).as_secs_f64());
    let cpu_secs = ticks as f64 / sys::clock_ticks_per_sec() as f64;
    let received: Vec<(String, u64)> =
        subs.iter().map(|&s| (nodes[net.conns[s].node].id.clone(), net.conns[s].got())).collect();
    let lost = received.iter().map(|(_, g)| acked.saturating_sub(*g)).sum();
    let span = first.map_or(0.0, |f| last.duration_since(f).as_secs_f64());
    if net.closed() > 0 {
        eprintln!("warning: {} connections were closed; errors: {:?}", net.closed(), net.errors);
    }
    Ok(CeilingResult {
        publishers: pubs.len(),
        window: a.window,
        seconds: secs,
        sent,
        acked,
        ack_errors,
        acked_per_sec: acked as f64 / secs.max(1e-6),
        delivered_per_sec: if span > 0.0 { watch_got as f64 / span } else { 0.0 },
        delivered_node: nodes[net.conns[watch].node].id.clone(),
        received,
        lost,
        ack_p50_ms: ms(&ack_h, 0.5),
        ack_p99_ms: ms(&ack_h, 0.99),
        engine_cpu_ms_per_1000: if acked > 0 { cpu_secs * 1e3 * 1000.0 / acked as f64 } else { 0.0 },
        engine_cpu_secs: cpu_secs,
        engine_bytes: bytes,
        engine_bytes_per_msg: if acked > 0 { bytes as f64 / acked as f64 } else { 0.0 },
    })
}

// ---------------------------------------------------------------------------------------------
// Output

fn lat_row(name: &str, l: &Lat) -> String {
    format!(
        "  {:<14} {:>6} {:>10} {:>10} {:>6} {:>8.2} {:>8.2} {:>8.2} {:>8.2}\n",
        name, l.subscribers, l.expected, l.received, l.lost, l.p50_ms, l.p99_ms, l.p999_ms, l.max_ms
    )
}

fn lat_table(title: &str, r: &LatRun) -> String {
    let mut s = format!(
        "{title}: published {} in {:.2} s, {} deliveries/s, generator CPU {:.0}%{}\n",
        r.published,
        r.publish_secs,
        si(r.deliveries_per_sec),
        r.generator_cpu_pct,
        if r.closed > 0 { format!(", {} connections closed", r.closed) } else { String::new() }
    );
    s.push_str(&format!(
        "  {:<14} {:>6} {:>10} {:>10} {:>6} {:>8} {:>8} {:>8} {:>8}\n",
        "node", "subs", "expected", "received", "lost", "p50 ms", "p99 ms", "p99.9", "max ms"
    ));
    for n in &r.per_node {
        s.push_str(&lat_row(&n.node, &n.lat));
    }
    if r.per_node.len() > 1 {
        s.push_str(&lat_row("all", &r.overall));
    }
    s
}

/// The readable summary.
pub fn summary_text(r: &ClusterResults) -> String {
    let mut s = format!("cluster ({:?}): {} nodes on {}; {}\n", r.backend, r.nodes, r.host, r.pinning);
    if let Some(l) = &r.latency {
        s.push_str(&format!(
            "latency ({} subscribers, {} msgs/s, {} s, send→receive):\n",
            l.subscribers, l.rate, l.seconds
        ));
        s.push_str(&lat_table("cluster", &l.cluster));
        if let Some(b) = &l.single_node {
            s.push_str(&lat_table("single node (--cluster none)", b));
        }
        if let (Some(p50), Some(p99)) = (l.added_p50_ms, l.added_p99_ms) {
            s.push_str(&format!("  added by the cluster: p50 {p50:+.2} ms, p99 {p99:+.2} ms\n"));
        }
        s.push_str(&format!("  messages lost: {}{}\n", l.lost, if l.lost == 0 { "" } else { "  <-- FAIL" }));
    }
    if let Some(c) = &r.ceiling {
        s.push_str(&format!(
            "ceiling ({} publishers × window {}, {:.1} s):\n  acknowledged {} msgs/s ({} acked, {} errors; ack p50 {:.1} ms, p99 {:.1} ms)\n  delivered at {}: {} msgs/s\n  received per node: {}\n  lost {}{}\n  {} CPU {:.2} s = {:.1} ms per 1,000 messages; {} {} bytes = {:.0} bytes per message\n",
            c.publishers,
            c.window,
            c.seconds,
            si(c.acked_per_sec),
            c.acked,
            c.ack_errors,
            c.ack_p50_ms,
            c.ack_p99_ms,
            c.delivered_node,
            si(c.delivered_per_sec),
            c.received.iter().map(|(n, g)| format!("{n} {g}")).collect::<Vec<_>>().join(", "),
            c.lost,
            if c.lost == 0 { "" } else { "  <-- FAIL" },
            if r.backend == Backend::Nats { "nats-server" } else { "postgres" },
            c.engine_cpu_secs,
            c.engine_cpu_ms_per_1000,
            if r.backend == Backend::Nats { "sent to nats-server" } else { "WAL" },
            c.engine_bytes,
            c.engine_bytes_per_msg
        ));
    }
    if let Some(e) = &r.error {
        s.push_str(&format!("ERROR: {e}\n"));
    }
    s
}

// ---------------------------------------------------------------------------------------------

/// Runs the measurements; returns the process exit code.
pub fn run(a: ClusterArgs) -> std::process::ExitCode {
    let lim = sys::raise_nofile();
    if lim < a.subscribers as u64 + 256 {
        eprintln!("warning: open-files limit is {lim}; --subscribers {} needs more (ulimit -n)", a.subscribers);
    }
    let pinned = sys::pin_to_cpu(a.client_cpu);
    if !pinned {
        eprintln!("warning: CPU {} does not exist here; generator not pinned", a.client_cpu);
    }
    let nodes_n = a.nodes.max(1);
    let engine = match a.backend {
        Backend::Postgres => match &a.database_url {
            Some(url) => Engine::Pg(Db { a: &a, url: url.clone() }),
            None => {
                eprintln!("loadtest cluster --backend postgres needs --database-url (DATABASE_URL)");
                return std::process::ExitCode::FAILURE;
            }
        },
        Backend::Nats => match NatsProc::start(&a.nats_server) {
            Ok(n) => Engine::Nats(n),
            Err(e) => {
                eprintln!("{e}");
                return std::process::ExitCode::FAILURE;
            }
        },
    };
    let mut res = ClusterResults {
        backend: a.backend,
        nodes: nodes_n,
        pinning: format!(
            "pinned: every node --shards 1 --cpus {} (shard CPU, then cluster/replication thread CPU), generator {}, {} not pinned",
            a.node_cpus,
            if pinned { format!("CPU {}", a.client_cpu) } else { "unpinned".into() },
            engine.name()
        ),
        host: sys::hostname(),
        latency: None,
        ceiling: None,
        error: None,
    };
    let run_id = std::process::id();
    let outcome = (|| -> Result<(), String> {
        if let Engine::Pg(db) = &engine {
            db.sql("SELECT 1")?;
            db.drop_slots();
        }
        let want = |m: Mode| a.mode == m || a.mode == Mode::All;
        if a.mode == Mode::CeilingSingle {
            let single = [Node::start(&a, 0, None)?];
            res.ceiling = Some(ceiling_run(&a, &engine, &single, &format!("loadtest-cl-{run_id}-ceil1"))?);
            res.nodes = 1;
            res.pinning = format!("single node --cluster none; {}", res.pinning);
        } else {
            let mut nodes = Vec::new();
            for i in 0..nodes_n {
                nodes.push(Node::start(&a, i, Some(&engine))?);
            }
            eprintln!(
                "started {} nodes: {}",
                nodes.len(),
                nodes.iter().map(|n| format!("{} {}", n.id, n.addr)).collect::<Vec<_>>().join(", ")
            );
            wait_members(&nodes, Duration::from_secs(30))?;
            if want(Mode::Latency) {
                let cl = latency_run(&a, &nodes, "cluster latency", &format!("loadtest-cl-{run_id}-lat"))?;
                res.latency = Some(LatencyResult {
                    subscribers: a.subscribers,
                    rate: a.rate,
                    seconds: a.seconds,
                    lost: cl.overall.lost,
                    cluster: cl,
                    single_node: None,
                    added_p50_ms: None,
                    added_p99_ms: None,
                });
            }
            if want(Mode::Ceiling) {
                res.ceiling = Some(ceiling_run(&a, &engine, &nodes, &format!("loadtest-cl-{run_id}-ceil"))?);
            }
        }
        if want(Mode::Latency) && !a.no_baseline {
            let single = [Node::start(&a, 0, None)?];
            let b = latency_run(&a, &single, "single-node latency", &format!("loadtest-cl-{run_id}-lat1"))?;
            if let Some(l) = res.latency.as_mut() {
                l.added_p50_ms = Some(l.cluster.overall.p50_ms - b.overall.p50_ms);
                l.added_p99_ms = Some(l.cluster.overall.p99_ms - b.overall.p99_ms);
                l.lost += b.overall.lost;
                l.single_node = Some(b);
            }
        }
        Ok(())
    })();
    // The nodes are stopped (dropped) by now: their slots are inactive.
    if let Engine::Pg(db) = &engine {
        db.drop_slots();
        db.clean_rows();
    }
    if let Err(e) = &outcome {
        res.error = Some(e.clone());
    }
    print!("{}", summary_text(&res));
    if let Some(dir) = &a.out {
        let _ = std::fs::create_dir_all(dir);
        let p = dir.join(format!("cluster-{}.json", crate::report::stamp()));
        crate::report::write_json(&p, &res);
        eprintln!("results: {}", p.display());
    }
    let lost = res.latency.as_ref().map_or(0, |l| l.lost) + res.ceiling.as_ref().map_or(0, |c| c.lost);
    if outcome.is_ok() && lost == 0 {
        std::process::ExitCode::SUCCESS
    } else {
        std::process::ExitCode::FAILURE
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lsn_parses_as_a_byte_position() {
        assert_eq!(parse_lsn("0/16B3748"), Some(0x16B3748));
        assert_eq!(parse_lsn("1/0\n"), Some(1 << 32));
        assert_eq!(parse_lsn("16/B374D848").unwrap() - parse_lsn("16/B374D800").unwrap(), 0x48);
        assert_eq!(parse_lsn("nope"), None);
    }

    #[test]
    fn stat_gives_comm_and_cpu_ticks() {
        let s = "4242 (postgres) S 1 4242 4242 0 -1 4194560 1000 0 0 0 17 5 0 0 20 0 1 0 100 0 0";
        assert_eq!(parse_stat(s), Some(("postgres", 22)));
        // A comm with spaces and parentheses.
        let s = "7 (a (b) c) R 1 7 7 0 -1 0 0 0 0 0 3 4 0 0 20 0 1 0 1 0 0";
        assert_eq!(parse_stat(s), Some(("a (b) c", 7)));
        assert_eq!(parse_stat("garbage"), None);
    }

    #[test]
    fn varz_in_bytes() {
        assert_eq!(
            parse_in_bytes("HTTP/1.0 200 OK\r\n\r\n{\n  \"in_msgs\": 3,\n  \"in_bytes\": 12345,\n}"),
            Some(12345)
        );
        assert_eq!(parse_in_bytes("{}"), None);
    }

    #[test]
    fn health_members_and_ready_line() {
        let body = br#"{"status":"ok","node":"lt-0","cluster":"postgres","members":["lt-0","lt-1"]}"#;
        assert_eq!(parse_members(body), Some(vec!["lt-0".to_string(), "lt-1".to_string()]));
        assert_eq!(parse_members(br#"{"status":"ok"}"#), None);
        assert_eq!(
            parse_ready("corecast listening on http://127.0.0.1:4567 with 1 shards\n"),
            Some("127.0.0.1:4567".parse().unwrap())
        );
        assert_eq!(parse_ready("hello"), None);
    }

    #[test]
    fn pacing() {
        assert_eq!(due(Duration::from_millis(999), 1000.0), 999);
        assert_eq!(due(Duration::ZERO, 1000.0), 0);
        assert_eq!(scheduled_us(1_000_000, 10, 10_000.0), 1_001_000);
    }

    #[test]
    fn seq_track_counts_new_and_duplicates() {
        let mut t = SeqTrack::default();
        assert!(t.see(1));
        assert!(t.see(3));
        assert!(!t.see(2));
        assert!(!t.see(3));
        assert_eq!((t.last, t.got, t.dup), (3, 2, 2));
    }

    #[test]
    fn subscribers_spread_evenly() {
        assert_eq!(spread(3000, 3), vec![1000, 1000, 1000]);
        assert_eq!(spread(10, 3), vec![4, 3, 3]);
        assert_eq!(spread(10, 3).iter().sum::<usize>(), 10);
    }

    #[test]
    fn summary_and_broadcast_frame() {
        let mut h = hist();
        for v in 1..=1000u64 {
            h.record(v * 10).unwrap();
        }
        let l = summarize(&h, 10, 1000, 990, 1);
        assert_eq!(l.lost, 10);
        assert!((l.p50_ms - 5.0).abs() < 0.05, "{}", l.p50_ms);
        assert!((l.max_ms - 10.0).abs() < 0.05);
        let empty = summarize(&hist(), 0, 0, 0, 0);
        assert_eq!(empty.p99_ms, 0.0);

        let (mut out, mut body) = (Vec::new(), Vec::new());
        push_broadcast(&mut out, "t", 3, 5, 1_700_000_000_000_000, 100, &mut body);
        let j: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(j[2], "realtime:t");
        assert_eq!(j[4]["payload"]["s"], 5);
        assert_eq!(j[4]["payload"]["t"], 1_700_000_000_000_000u64);
        assert_eq!(j[4]["payload"].to_string().len(), 100);
        let f = scan_fields(&body).unwrap();
        assert_eq!((f.seq, f.t_ns, f.publisher), (5, 1_700_000_000_000_000, 3));
        let h = parse_frame_head(&out).unwrap();
        assert_eq!(h.header_len + h.payload_len, out.len());
    }
}
