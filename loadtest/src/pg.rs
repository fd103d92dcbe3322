//! `loadtest pg`: Postgres changes end to end, against a real database.
//!
//! Four measurements (`--mode latency|throughput|rls|rls-latency|all`), each on its own table
//! (`loadtest_pg_*`, recreated) and through corecast started here (`--shards 1 --cpus 0,1`:
//! the shard on CPU 0, the ingest thread on CPU 1) on a fresh slot `loadtest_pg`, or a running
//! one (`--addr`, which must stream the same database):
//!
//! - **latency**: `--subscribers` WebSocket clients (one channel each) on an INSERT binding,
//!   a writer committing `--rate` single-row transactions per second for `--seconds`. Each row
//!   carries `clock_timestamp()` in microseconds, taken by the INSERT just before its COMMIT;
//!   the client subtracts it from its receive time (same machine, same clock), so the figure is
//!   commit→client including the commit's WAL flush.
//! - **throughput**: one subscriber, `--rows` rows committed as fast as Postgres takes them in
//!   transactions of `--batch`; changes/s from the first to the last change received.
//! - **rls**: `--users` clients, each with its own token (distinct `sub`: distinct auth
//!   contexts), on a table with row-level security whose policy reads the JWT claims; 90% of
//!   the rows are visible to everyone, 10% to no one. Deliveries/s from the first to the last;
//!   any invisible row delivered is reported as a leak.
//! - **rls-latency**: `--users` clients, each with its own token (distinct `sub`), on a table
//!   with row-level security whose policy shows a row to its owner only; the writer commits
//!   `--rate` single-row transactions per second for `--seconds`, row `i` owned by user
//!   `i % users`. Every change matches every subscriber, so each batch is RLS-checked for all
//!   `--users` auth contexts, and each row is delivered to one of them: commit→client latency
//!   of RLS-checked changes (as in **latency**), and any row delivered to another user is a
//!   leak. `--rls-own-filter`: each user subscribes with `owner=eq.<its sub>`, so a change is
//!   checked for one context only.
//!
//! corecast runs in development mode here, so tokens are unsigned JWTs whose claims it reads.
//! The generator is this process: one epoll loop, pinned to CPU 1. SQL goes through `psql`.

use std::io::{Read, Write};
use std::net::{SocketAddrV4, TcpStream};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::sys;
use crate::wire::{parse_frame_head, push_client_frame, read_available, OP_CLOSE, OP_TEXT};

/// Supabase's published figures for Postgres Changes (docs `apps/docs/data/realtime/
/// throughput.json`, `benchmarks.mdx`), printed beside ours.
const SUPABASE: &str = "Supabase Realtime (published): Postgres Changes are polled every 100 ms and \
RLS-checked once per subscriber per change on one thread; with RLS the total is ~3,000 msgs/s on every \
compute size (4,000 on large-16XL), p95 228-920 ms; without RLS 32,000-50,000 msgs/s total, p95 184-1,349 ms \
(e.g. 500 clients x 64 changes/s = 32,000 msgs/s at p95 184-238 ms).";

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    Latency,
    Throughput,
    Rls,
    RlsLatency,
    All,
}

#[derive(clap::Args, Debug)]
pub struct PgArgs {
    /// Database to use (wal_level=logical; loadtest_pg_* tables are replaced there).
    #[arg(long, env = "DATABASE_URL")]
    pub database_url: String,
    /// psql binary.
    #[arg(long, default_value = "psql")]
    pub psql: String,
    /// corecast binary to start.
    #[arg(long, default_value = "target/release/corecast")]
    pub corecast: PathBuf,
    /// A running corecast to use instead (streaming the same database).
    #[arg(long)]
    pub addr: Option<SocketAddrV4>,
    /// What to measure.
    #[arg(long, value_enum, default_value = "all")]
    pub mode: Mode,
    /// Latency: subscribers (one channel each).
    #[arg(long, default_value_t = 100)]
    pub subscribers: usize,
    /// Latency and RLS latency: committed changes per second.
    #[arg(long, default_value_t = 1000.0)]
    pub rate: f64,
    /// Latency, RLS and RLS latency: seconds of writing.
    #[arg(long, default_value_t = 10)]
    pub seconds: u64,
    /// Throughput: rows.
    #[arg(long, default_value_t = 200_000)]
    pub rows: usize,
    /// Throughput: rows per transaction.
    #[arg(long, default_value_t = 1000)]
    pub batch: usize,
    /// RLS and RLS latency: distinct users (one connection and auth context each).
    #[arg(long, default_value_t = 1000)]
    pub users: usize,
    /// RLS: rows, written over --seconds (90% visible to every user, 10% to none).
    #[arg(long, default_value_t = 2000)]
    pub rls_rows: usize,
    /// RLS: rows per transaction.
    #[arg(long, default_value_t = 10)]
    pub rls_batch: usize,
    /// RLS latency: each user subscribes with the filter `owner=eq.<its sub>`, so a change
    /// matches one subscriber and is RLS-checked for one auth context (without it every change
    /// is checked for all `--users` contexts).
    #[arg(long)]
    pub rls_own_filter: bool,
    /// Write the results as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

#[derive(Debug, Default, Serialize)]
pub struct PgResults {
    pub latency: Option<LatencyResult>,
    pub throughput: Option<ThroughputResult>,
    pub rls: Option<RlsResult>,
    pub rls_latency: Option<RlsLatencyResult>,
}

#[derive(Debug, Serialize)]
pub struct LatencyResult {
    pub subscribers: usize,
    pub rate: f64,
    pub expected: u64,
    pub delivered: u64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
}

#[derive(Debug, Serialize)]
pub struct ThroughputResult {
    pub rows: usize,
    pub delivered: u64,
    /// From the first change received to the last.
    pub changes_per_sec: f64,
    /// From the writer's start to the last change received (includes Postgres's own insert and
    /// decoding time).
    pub end_to_end_per_sec: f64,
    pub commit_secs: f64,
}

#[derive(Debug, Serialize)]
pub struct RlsResult {
    pub users: usize,
    pub rows: usize,
    pub expected: u64,
    pub delivered: u64,
    pub leaked: u64,
    pub deliveries_per_sec: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
}

#[derive(Debug, Serialize)]
pub struct RlsLatencyResult {
    pub users: usize,
    pub rate: f64,
    /// Subscribers filtered to their own rows (`--rls-own-filter`).
    pub own_filter: bool,
    pub expected: u64,
    pub delivered: u64,
    /// Rows delivered to a user other than their owner.
    pub leaked: u64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
}

const SLOT: &str = "loadtest_pg";

fn now_us() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_micros() as i64)
}

struct Db<'a> {
    a: &'a PgArgs,
}

impl Db<'_> {
    fn sql(&self, sql: &str) -> Result<String, String> {
        let out = Command::new(&self.a.psql)
            .args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-d", &self.a.database_url, "-c", sql])
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("cannot run {}: {e}", self.a.psql))?;
        if !out.status.success() {
            return Err(format!("psql failed: {}", String::from_utf8_lossy(&out.stderr)));
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    /// Runs the script `sql` in the background (the writer). Statements run one by one, each
    /// in its own transaction (psql reads the script from stdin).
    fn spawn(&self, sql: &str) -> Result<Child, String> {
        let mut child = Command::new(&self.a.psql)
            .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", &self.a.database_url, "-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot run {}: {e}", self.a.psql))?;
        let mut stdin = child.stdin.take().expect("piped");
        let script = sql.to_string();
        std::thread::spawn(move || {
            let _ = stdin.write_all(script.as_bytes());
        });
        Ok(child)
    }

    fn drop_slot(&self) {
        let _ = self.sql(&format!(
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = '{SLOT}' AND NOT active"
        ));
    }
}

/// corecast, started here.
struct Corecast {
    child: Child,
    addr: SocketAddrV4,
}

impl Corecast {
    fn start(a: &PgArgs) -> Result<Corecast, String> {
        let mut child = Command::new(&a.corecast)
            .args(["--listen", "127.0.0.1:0", "--shards", "1", "--cpus", "0,1", "--slot", SLOT])
            .args(["--pg-resume-grace-ms", "0", "--idle-timeout-secs", "600"])
            // The throughput run bursts 200,000 changes at one subscriber: measure the ingest,
            // not the slow-consumer cut-off.
            .args(["--max-queue-bytes", "1073741824"])
            .arg("--data-dir")
            .arg(std::env::temp_dir().join(format!("loadtest-pg-{}", std::process::id())))
            .env("DATABASE_URL", &a.database_url)
            .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()))
            .env_remove("CORECAST_JWT_SECRET")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| format!("cannot start {}: {e} (build it: cargo build --release)", a.corecast.display()))?;
        let mut out = child.stdout.take().expect("piped");
        let mut line = Vec::new();
        let mut b = [0u8; 1];
        while !line.ends_with(b"\n") {
            match out.read(&mut b) {
                Ok(1) => line.push(b[0]),
                _ => return Err("corecast exited before it was ready".into()),
            }
        }
        let line = String::from_utf8_lossy(&line).to_string();
        let addr = line
            .strip_prefix("corecast listening on http://")
            .and_then(|r| r.split(' ').next())
            .and_then(|a| a.parse().ok())
            .ok_or_else(|| format!("unexpected ready line: {line}"))?;
        std::thread::spawn(move || {
            let mut sink = Vec::new();
            let _ = out.read_to_end(&mut sink);
        });
        Ok(Corecast { child, addr })
    }
}

impl Drop for Corecast {
    fn drop(&mut self) {
        // SAFETY: plain kill(2) of our child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(std::env::temp_dir().join(format!("loadtest-pg-{}", std::process::id())));
    }
}

/// An unsigned JWT with `claims` (corecast's development mode reads the claims as they are).
fn token(claims: &serde_json::Value) -> String {
    fn b64(b: &[u8]) -> String {
        const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        let mut s = String::new();
        for c in b.chunks(3) {
            let n = (c[0] as u32) << 16 | (*c.get(1).unwrap_or(&0) as u32) << 8 | *c.get(2).unwrap_or(&0) as u32;
            for i in 0..=c.len() {
                s.push(T[(n >> (18 - 6 * i) & 63) as usize] as char);
            }
        }
        s
    }
    format!("{}.{}.unsigned", b64(br#"{"alg":"HS256","typ":"JWT"}"#), b64(claims.to_string().as_bytes()))
}

/// One subscriber connection.
struct Sub {
    s: TcpStream,
    buf: Vec<u8>,
    subscribed: bool,
    closed: bool,
}

/// What a received change carried.
struct Seen {
    t_us: i64,
    hidden: bool,
    /// `N` of an `"owner":"user-N"` column.
    owner: Option<usize>,
    /// The record's `id`, when it is the first column.
    id: Option<u64>,
}

/// The subscribers of one measurement, on one epoll loop.
struct Subs {
    subs: Vec<Sub>,
    ep: sys::Epoll,
    errors: Vec<String>,
    last_hb: Instant,
}

fn frame(text: &str) -> Vec<u8> {
    let mut v = Vec::new();
    push_client_frame(&mut v, OP_TEXT, text.as_bytes(), [1, 2, 3, 4]);
    v
}

impl Subs {
    /// Connects `n` clients; client `i` uses token `tokens(i)` and joins `realtime:<topic(i)>`
    /// with an INSERT binding on `table`, filtered by `filter(i)` when it is `Some`.
    fn connect(
        addr: SocketAddrV4,
        n: usize,
        table: &str,
        tokens: impl Fn(usize) -> String,
        topic: impl Fn(usize) -> String,
        filter: impl Fn(usize) -> Option<String>,
    ) -> Result<Subs, String> {
        let ep = sys::Epoll::new().map_err(|e| e.to_string())?;
        let mut subs = Vec::with_capacity(n);
        for i in 0..n {
            let mut s = TcpStream::connect(addr).map_err(|e| format!("connect: {e}"))?;
            s.set_nodelay(true).ok();
            let req = format!(
                "GET /realtime/v1/websocket?apikey={}&vsn=2.0.0 HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n\
                 Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
                tokens(i)
            );
            s.write_all(req.as_bytes()).map_err(|e| e.to_string())?;
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
            let filter = filter(i).map_or(String::new(), |f| format!(r#","filter":"{f}""#));
            let join = format!(
                r#"["1","1","realtime:{}","phx_join",{{"config":{{"broadcast":{{"ack":false,"self":false}},"presence":{{"key":"","enabled":false}},"postgres_changes":[{{"event":"INSERT","schema":"public","table":"{table}"{filter}}}],"private":false}}}}]"#,
                topic(i)
            );
            s.write_all(&frame(&join)).map_err(|e| e.to_string())?;
            s.set_nonblocking(true).map_err(|e| e.to_string())?;
            ep.add(s.as_raw_fd(), libc::EPOLLIN as u32, i as u64).map_err(|e| e.to_string())?;
            subs.push(Sub { s, buf: Vec::with_capacity(1 << 16), subscribed: false, closed: false });
        }
        Ok(Subs { subs, ep, errors: Vec::new(), last_hb: Instant::now() })
    }

    /// Reads for up to `d`, calling `on_change(subscriber, seen)` for each change received.
    fn poll(&mut self, d: Duration, mut on_change: impl FnMut(usize, Seen)) {
        let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 256];
        let deadline = Instant::now() + d;
        let mut chunk = vec![0u8; 1 << 16];
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let n = self.ep.wait_ns(&mut events, Some(left.as_nanos() as u64));
            for ev in &events[..n] {
                let i = ev.u64 as usize;
                let sub = &mut self.subs[i];
                if sub.closed {
                    continue;
                }
                if !read_available(&mut sub.s, &mut chunk, &mut sub.buf) {
                    sub.closed = true;
                }
                let t = now_us();
                let mut pos = 0;
                while let Some(h) = parse_frame_head(&sub.buf[pos..]) {
                    let end = pos + h.header_len + h.payload_len;
                    if end > sub.buf.len() {
                        break;
                    }
                    let p = &sub.buf[pos + h.header_len..end];
                    if h.opcode == OP_CLOSE {
                        sub.closed = true;
                    } else if h.opcode == OP_TEXT {
                        if let Some(seen) = scan_change(p) {
                            on_change(i, Seen { t_us: t - seen.t_us, ..seen });
                        } else if memchr::memmem::find(p, b"\"system\"").is_some() {
                            if memchr::memmem::find(p, b"Subscribed to PostgreSQL").is_some() {
                                sub.subscribed = true;
                            } else if self.errors.len() < 10 {
                                self.errors.push(String::from_utf8_lossy(p).into_owned());
                            }
                        }
                    }
                    pos = end;
                }
                sub.buf.drain(..pos);
                if sub.closed {
                    self.ep.delete(sub.s.as_raw_fd());
                }
            }
            if self.last_hb.elapsed() > Duration::from_secs(20) {
                self.last_hb = Instant::now();
                let hb = frame(r#"[null,"hb","phoenix","heartbeat",{}]"#);
                for s in &mut self.subs {
                    let _ = s.s.write_all(&hb);
                }
            }
            if Instant::now() >= deadline {
                return;
            }
        }
    }

    /// Waits until every client got "Subscribed to PostgreSQL".
    fn wait_subscribed(&mut self, timeout: Duration) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.subs.iter().all(|s| s.subscribed) {
                return Ok(());
            }
            self.poll(Duration::from_millis(50), |_, _| {});
        }
        let n = self.subs.iter().filter(|s| s.subscribed).count();
        Err(format!("only {n} of {} subscribed in {timeout:?}; errors: {:?}", self.subs.len(), self.errors))
    }

    fn closed(&self) -> usize {
        self.subs.iter().filter(|s| s.closed).count()
    }
}

/// The decimal number right after the first `key` in `p`.
fn number_after<T: std::str::FromStr>(p: &[u8], key: &[u8]) -> Option<T> {
    let digits = &p[memchr::memmem::find(p, key)? + key.len()..];
    let n = digits.iter().take_while(|c| c.is_ascii_digit()).count();
    std::str::from_utf8(&digits[..n]).ok()?.parse().ok()
}

/// A `postgres_changes` frame's `t_us` (0 when absent), whether it is a hidden-tenant row, and
/// its owner.
fn scan_change(p: &[u8]) -> Option<Seen> {
    memchr::memmem::find(p, b"\"postgres_changes\",{\"ids\":")?;
    let t_us = match memchr::memmem::find(p, b"\"t_us\":") {
        Some(_) => number_after(p, b"\"t_us\":")?,
        None => 0,
    };
    Some(Seen {
        t_us,
        hidden: memchr::memmem::find(p, b"\"tenant\":\"t2\"").is_some(),
        owner: number_after(p, b"\"owner\":\"user-"),
        id: number_after(p, b"\"record\":{\"id\":"),
    })
}

fn ms(h: &Histogram<u64>, q: f64) -> f64 {
    h.value_at_quantile(q) as f64 / 1000.0
}

fn latency(a: &PgArgs, db: &Db<'_>, addr: SocketAddrV4) -> Result<LatencyResult, String> {
    db.sql("DROP TABLE IF EXISTS loadtest_pg_lat; CREATE TABLE loadtest_pg_lat (id bigint PRIMARY KEY, t_us bigint NOT NULL, body text); GRANT SELECT ON loadtest_pg_lat TO PUBLIC;")?;
    let mut subs = Subs::connect(
        addr,
        a.subscribers,
        "loadtest_pg_lat",
        |_| "anon-key".into(),
        |i| format!("pg-lat-{i}"),
        |_| None,
    )?;
    subs.wait_subscribed(Duration::from_secs(30))?;
    let n = (a.rate * a.seconds as f64).round() as u64;
    let writer = format!(
        "SET synchronous_commit = on;
         DO $$ DECLARE started timestamptz := clock_timestamp(); i bigint := 0; BEGIN
           WHILE i < {n} LOOP
             i := i + 1;
             WHILE clock_timestamp() < started + make_interval(secs => i / {rate}::float8) LOOP
               PERFORM pg_sleep(0.0001);
             END LOOP;
             INSERT INTO loadtest_pg_lat VALUES (i, (extract(epoch FROM clock_timestamp()) * 1e6)::bigint, 'a 100-byte-ish body for the latency run, like a chat message would carry, more or less');
             COMMIT;
           END LOOP;
         END $$;",
        rate = a.rate
    );
    let mut w = db.spawn(&writer)?;
    let mut h = Histogram::<u64>::new_with_bounds(1, 600_000_000, 3).expect("histogram");
    let expected = n * a.subscribers as u64;
    let mut delivered = 0u64;
    let deadline = Instant::now() + Duration::from_secs(a.seconds + 30);
    while delivered < expected && Instant::now() < deadline {
        subs.poll(Duration::from_millis(100), |_, s| {
            delivered += 1;
            let _ = h.record(s.t_us.max(1) as u64);
        });
        if let Ok(Some(st)) = w.try_wait() {
            if !st.success() {
                return Err("the writer failed".into());
            }
        }
    }
    let _ = w.wait();
    if subs.closed() > 0 {
        eprintln!("warning: {} subscribers were closed", subs.closed());
    }
    Ok(LatencyResult {
        subscribers: a.subscribers,
        rate: a.rate,
        expected,
        delivered,
        p50_ms: ms(&h, 0.5),
        p90_ms: ms(&h, 0.9),
        p99_ms: ms(&h, 0.99),
        p999_ms: ms(&h, 0.999),
        max_ms: h.max() as f64 / 1000.0,
    })
}

fn throughput(a: &PgArgs, db: &Db<'_>, addr: SocketAddrV4) -> Result<ThroughputResult, String> {
    db.sql("DROP TABLE IF EXISTS loadtest_pg_tp; CREATE TABLE loadtest_pg_tp (id bigint PRIMARY KEY, t_us bigint NOT NULL, body text); GRANT SELECT ON loadtest_pg_tp TO PUBLIC;")?;
    let mut subs = Subs::connect(addr, 1, "loadtest_pg_tp", |_| "anon-key".into(), |_| "pg-tp".into(), |_| None)?;
    subs.wait_subscribed(Duration::from_secs(30))?;
    let mut sql = String::from("SET synchronous_commit = on;\n");
    let mut start = 1;
    while start <= a.rows {
        let end = (start + a.batch - 1).min(a.rows);
        sql.push_str(&format!(
            "INSERT INTO loadtest_pg_tp SELECT g, 0, repeat('x', 100) FROM generate_series({start}, {end}) g;\n"
        ));
        start = end + 1;
    }
    let t0 = Instant::now();
    let mut w = db.spawn(&sql)?;
    let (mut first, mut last, mut delivered) = (None, t0, 0u64);
    let mut commit_secs = None;
    let deadline = Instant::now() + Duration::from_secs(120);
    while delivered < a.rows as u64 && Instant::now() < deadline {
        subs.poll(Duration::from_millis(50), |_, _| {
            delivered += 1;
            let now = Instant::now();
            first.get_or_insert(now);
            last = now;
        });
        if commit_secs.is_none() {
            if let Ok(Some(_)) = w.try_wait() {
                commit_secs = Some(t0.elapsed().as_secs_f64());
            }
        }
    }
    let _ = w.wait();
    let span = first.map_or(0.0, |f| last.duration_since(f).as_secs_f64());
    Ok(ThroughputResult {
        rows: a.rows,
        delivered,
        changes_per_sec: if span > 0.0 { delivered as f64 / span } else { 0.0 },
        end_to_end_per_sec: delivered as f64 / last.duration_since(t0).as_secs_f64().max(1e-6),
        commit_secs: commit_secs.unwrap_or(t0.elapsed().as_secs_f64()),
    })
}

fn rls(a: &PgArgs, db: &Db<'_>, addr: SocketAddrV4) -> Result<RlsResult, String> {
    db.sql(
        "DO $$ BEGIN CREATE ROLE authenticated NOLOGIN; EXCEPTION WHEN duplicate_object THEN NULL; END $$;
         DROP TABLE IF EXISTS loadtest_pg_rls;
         CREATE TABLE loadtest_pg_rls (id bigint PRIMARY KEY, tenant text NOT NULL, t_us bigint NOT NULL, body text);
         ALTER TABLE loadtest_pg_rls ENABLE ROW LEVEL SECURITY;
         CREATE POLICY same_tenant ON loadtest_pg_rls FOR SELECT TO authenticated
           USING (tenant = current_setting('request.jwt.claims', true)::jsonb ->> 'tenant');
         GRANT SELECT ON loadtest_pg_rls TO authenticated;",
    )?;
    let tok =
        |i: usize| token(&serde_json::json!({"role": "authenticated", "sub": format!("user-{i}"), "tenant": "t1"}));
    let mut subs = Subs::connect(addr, a.users, "loadtest_pg_rls", tok, |i| format!("pg-rls-{i}"), |_| None)?;
    subs.wait_subscribed(Duration::from_secs(60))?;
    // Paced: `rls_rows` rows over `seconds`, `rls_batch` per transaction, so the figure is a
    // sustained rate (a backlog would show as growing latency, not as a burst).
    let txns = a.rls_rows.div_ceil(a.rls_batch);
    let sql = format!(
        "SET synchronous_commit = on;
         DO $$ DECLARE started timestamptz := clock_timestamp(); t bigint := 0; BEGIN
           WHILE t < {txns} LOOP
             WHILE clock_timestamp() < started + make_interval(secs => t * {secs}::float8 / {txns}) LOOP
               PERFORM pg_sleep(0.0005);
             END LOOP;
             INSERT INTO loadtest_pg_rls
               SELECT g, CASE WHEN g % 10 = 0 THEN 't2' ELSE 't1' END,
                      (extract(epoch FROM clock_timestamp()) * 1e6)::bigint, 'body'
               FROM generate_series(t * {batch} + 1, least((t + 1) * {batch}, {rows})) g;
             COMMIT;
             t := t + 1;
           END LOOP;
         END $$;",
        secs = a.seconds,
        batch = a.rls_batch,
        rows = a.rls_rows
    );
    let visible = (1..=a.rls_rows).filter(|g| g % 10 != 0).count() as u64;
    let expected = visible * a.users as u64;
    let mut w = db.spawn(&sql)?;
    let mut h = Histogram::<u64>::new_with_bounds(1, 600_000_000, 3).expect("histogram");
    let t0 = Instant::now();
    let (mut first, mut last, mut delivered, mut leaked) = (None, t0, 0u64, 0u64);
    let deadline = Instant::now() + Duration::from_secs(300);
    let mut idle_since = Instant::now();
    while delivered < expected && Instant::now() < deadline {
        let before = delivered;
        subs.poll(Duration::from_millis(100), |_, s| {
            if s.hidden {
                leaked += 1;
            }
            delivered += 1;
            let _ = h.record(s.t_us.max(1) as u64);
            let now = Instant::now();
            first.get_or_insert(now);
            last = now;
        });
        if delivered > before {
            idle_since = Instant::now();
        } else if delivered > 0 && idle_since.elapsed() > Duration::from_secs(10) {
            break;
        }
    }
    let _ = w.wait();
    // From the writer's start (not the first delivery): a slow first batch counts against us.
    let span = first.map_or(0.0, |_| last.duration_since(t0).as_secs_f64());
    Ok(RlsResult {
        users: a.users,
        rows: a.rls_rows,
        expected,
        delivered,
        leaked,
        deliveries_per_sec: if span > 0.0 { delivered as f64 / span } else { 0.0 },
        p50_ms: ms(&h, 0.5),
        p99_ms: ms(&h, 0.99),
    })
}

fn rls_latency(a: &PgArgs, db: &Db<'_>, addr: SocketAddrV4) -> Result<RlsLatencyResult, String> {
    db.sql(
        "DO $$ BEGIN CREATE ROLE authenticated NOLOGIN; EXCEPTION WHEN duplicate_object THEN NULL; END $$;
         DROP TABLE IF EXISTS loadtest_pg_rlslat;
         CREATE TABLE loadtest_pg_rlslat (id bigint PRIMARY KEY, owner text NOT NULL, t_us bigint NOT NULL, body text);
         ALTER TABLE loadtest_pg_rlslat ENABLE ROW LEVEL SECURITY;
         CREATE POLICY own_rows ON loadtest_pg_rlslat FOR SELECT TO authenticated
           USING (owner = current_setting('request.jwt.claims', true)::jsonb ->> 'sub');
         GRANT SELECT ON loadtest_pg_rlslat TO authenticated;",
    )?;
    let tok = |i: usize| token(&serde_json::json!({"role": "authenticated", "sub": format!("user-{i}")}));
    let own = |i: usize| a.rls_own_filter.then(|| format!("owner=eq.user-{i}"));
    let mut subs = Subs::connect(addr, a.users, "loadtest_pg_rlslat", tok, |i| format!("pg-rlslat-{i}"), own)?;
    subs.wait_subscribed(Duration::from_secs(60))?;
    let n = (a.rate * a.seconds as f64).round() as u64;
    let writer = format!(
        "SET synchronous_commit = on;
         DO $$ DECLARE started timestamptz := clock_timestamp(); i bigint := 0; BEGIN
           WHILE i < {n} LOOP
             i := i + 1;
             WHILE clock_timestamp() < started + make_interval(secs => i / {rate}::float8) LOOP
               PERFORM pg_sleep(0.0001);
             END LOOP;
             INSERT INTO loadtest_pg_rlslat VALUES (i, 'user-' || (i % {users}), (extract(epoch FROM clock_timestamp()) * 1e6)::bigint, 'a short body');
             COMMIT;
           END LOOP;
         END $$;",
        rate = a.rate,
        users = a.users
    );
    let mut w = db.spawn(&writer)?;
    let mut h = Histogram::<u64>::new_with_bounds(1, 600_000_000, 3).expect("histogram");
    let (mut delivered, mut leaked) = (0u64, 0u64);
    let mut seen = vec![false; n as usize + 1];
    let deadline = Instant::now() + Duration::from_secs(a.seconds + 30);
    let mut writer_done = None;
    while delivered + leaked < n && Instant::now() < deadline {
        subs.poll(Duration::from_millis(100), |i, s| {
            if s.owner == Some(i) {
                if let Some(slot) = s.id.and_then(|id| seen.get_mut(id as usize)) {
                    *slot = true;
                }
                delivered += 1;
                let _ = h.record(s.t_us.max(1) as u64);
            } else {
                leaked += 1;
            }
        });
        if writer_done.is_none() {
            if let Ok(Some(st)) = w.try_wait() {
                if !st.success() {
                    return Err("the writer failed".into());
                }
                writer_done = Some(Instant::now());
            }
        }
        // Everything committed has had 10 s to arrive.
        if writer_done.is_some_and(|t| t.elapsed() > Duration::from_secs(10)) {
            break;
        }
    }
    let _ = w.wait();
    if subs.closed() > 0 {
        eprintln!("warning: {} subscribers were closed", subs.closed());
    }
    let missing: Vec<usize> = (1..seen.len()).filter(|&id| !seen[id]).collect();
    if !missing.is_empty() {
        eprintln!(
            "rls-latency: {} rows never arrived, first ids {:?}",
            missing.len(),
            &missing[..missing.len().min(20)]
        );
    }
    Ok(RlsLatencyResult {
        users: a.users,
        rate: a.rate,
        own_filter: a.rls_own_filter,
        expected: n,
        delivered,
        leaked,
        p50_ms: ms(&h, 0.5),
        p90_ms: ms(&h, 0.9),
        p99_ms: ms(&h, 0.99),
        p999_ms: ms(&h, 0.999),
        max_ms: h.max() as f64 / 1000.0,
    })
}

/// Runs the measurements; returns the process exit code.
pub fn run(a: PgArgs) -> std::process::ExitCode {
    if !sys::pin_to_cpu(1) {
        eprintln!("warning: CPU 1 does not exist here; generator not pinned");
    }
    let lim = sys::raise_nofile();
    if lim < (a.users as u64 + 64) {
        eprintln!("warning: open-files limit is {lim}; --users {} needs more (ulimit -n)", a.users);
    }
    let db = Db { a: &a };
    let mut results = PgResults::default();
    let outcome = (|| -> Result<(), String> {
        db.sql("SELECT 1")?;
        let started = match a.addr {
            Some(_) => None,
            None => {
                db.drop_slot();
                Some(Corecast::start(&a)?)
            }
        };
        let addr = a.addr.or(started.as_ref().map(|c| c.addr)).expect("an address");
        let want = |m: Mode| a.mode == m || a.mode == Mode::All;
        if want(Mode::Latency) {
            let r = latency(&a, &db, addr)?;
            println!(
                "latency: {} subscribers, {} changes/s: delivered {} of {}; commit→client ms p50 {:.2}  p90 {:.2}  p99 {:.2}  p99.9 {:.2}  max {:.2}",
                r.subscribers, r.rate, r.delivered, r.expected, r.p50_ms, r.p90_ms, r.p99_ms, r.p999_ms, r.max_ms
            );
            results.latency = Some(r);
        }
        if want(Mode::Throughput) {
            let r = throughput(&a, &db, addr)?;
            println!(
                "throughput: 1 subscriber, {} rows committed in {:.2} s: delivered {} at {:.0} changes/s (first→last), {:.0}/s from the first insert",
                r.rows, r.commit_secs, r.delivered, r.changes_per_sec, r.end_to_end_per_sec
            );
            results.throughput = Some(r);
        }
        if want(Mode::Rls) {
            let r = rls(&a, &db, addr)?;
            println!(
                "rls: {} users (distinct auth contexts), {} rows (90% visible): delivered {} of {} at {:.0} RLS-checked deliveries/s; leaked {}; commit→client ms p50 {:.1} p99 {:.1}",
                r.users, r.rows, r.delivered, r.expected, r.deliveries_per_sec, r.leaked, r.p50_ms, r.p99_ms
            );
            results.rls = Some(r);
        }
        if want(Mode::RlsLatency) {
            let r = rls_latency(&a, &db, addr)?;
            println!(
                "rls-latency: {} users (distinct auth contexts), {} changes/s, each row visible to its owner only, {}: delivered {} of {}; leaked {}; commit→client ms p50 {:.2}  p90 {:.2}  p99 {:.2}  p99.9 {:.2}  max {:.2}",
                r.users, r.rate, if r.own_filter { "each user subscribed to its own rows (filter owner=eq.<sub>)" } else { "no filter (every change checked for every user)" }, r.delivered, r.expected, r.leaked, r.p50_ms, r.p90_ms, r.p99_ms, r.p999_ms, r.max_ms
            );
            results.rls_latency = Some(r);
        }
        drop(started);
        if a.addr.is_none() {
            db.drop_slot();
        }
        Ok(())
    })();
    println!("{SUPABASE}");
    if let Some(p) = &a.json {
        match serde_json::to_vec_pretty(&results) {
            Ok(b) => {
                if let Err(e) = std::fs::write(p, b) {
                    eprintln!("cannot write {}: {e}", p.display());
                }
            }
            Err(e) => eprintln!("cannot encode results: {e}"),
        }
    }
    match outcome {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("pg: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
