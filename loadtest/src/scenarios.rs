//! The scenarios (fanout, ai-tokens, chat, idle, connect-storm, and the corecast-only sse,
//! presence and history), the sustained-rate sweep, and running one scenario against one server
//! from start to stop. Scenarios with their own protocol live in their own module (`presence`,
//! `history`) and hook into [`body`] with one match arm.

use std::net::SocketAddrV4;
use std::path::PathBuf;
use std::time::Duration;

use serde::Serialize;

use crate::baseline::{self, BaselineOpts, BaselineResult};
use crate::coord::{si, ConnectSummary, Fleet, FleetOpts, PhaseOutcome};
use crate::layout::Layout;
use crate::servers::{self, Running, ServerKind, ServerOpts};
use crate::sys;
use crate::worker::PhaseSpec;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum ScenarioKind {
    Fanout,
    AiTokens,
    Chat,
    Idle,
    ConnectStorm,
    /// fanout with Server-Sent Events subscribers (corecast only).
    Sse,
    /// Presence room: members track and leave at a rate; observers time the diffs (corecast only).
    Presence,
    /// Persisted publishes and history reads over REST (corecast only).
    History,
}

impl ScenarioKind {
    pub fn name(self) -> &'static str {
        match self {
            ScenarioKind::Fanout => "fanout",
            ScenarioKind::AiTokens => "ai-tokens",
            ScenarioKind::Chat => "chat",
            ScenarioKind::Idle => "idle",
            ScenarioKind::ConnectStorm => "connect-storm",
            ScenarioKind::Sse => "sse",
            ScenarioKind::Presence => "presence",
            ScenarioKind::History => "history",
        }
    }

    /// Scenarios only corecast can run (the peers have no Phoenix presence or history API, and
    /// only nchan has SSE: see [`ServerKind::has_sse`]).
    pub fn corecast_only(self) -> bool {
        matches!(self, ScenarioKind::Sse | ScenarioKind::Presence | ScenarioKind::History)
    }

    fn default_subscribers(self) -> usize {
        match self {
            ScenarioKind::Fanout => 1000,
            ScenarioKind::AiTokens => 5000,
            ScenarioKind::Chat => 1000,
            ScenarioKind::Idle => 5000,
            ScenarioKind::ConnectStorm => 5000,
            ScenarioKind::Sse => 1000,
            ScenarioKind::Presence => 2000,
            ScenarioKind::History => 0,
        }
    }

    fn default_payload(self) -> usize {
        match self {
            ScenarioKind::AiTokens | ScenarioKind::Presence => 50,
            _ => 100,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum PublishVia {
    Ws,
    Rest,
}

/// How a presence member leaves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LeaveVia {
    /// Close the socket (RST), like a closed tab or a lost network.
    Close,
    /// Send `untrack`; the connection stays joined.
    Untrack,
}

/// How the server is restarted before the history is read back.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Restart {
    /// SIGTERM: clean shutdown (the log is flushed and checkpointed).
    Term,
    /// SIGKILL right after the last 202: what was acknowledged but not yet fdatasync'd may be lost.
    Kill,
}

/// Options shared by every scenario (those a scenario does not use are ignored).
#[derive(Clone, Debug, clap::Args)]
pub struct RunArgs {
    /// Subscribers (connections that join and receive). Default: fanout 1000, chat 1000
    /// (members), ai-tokens / idle / connect-storm 5000.
    #[arg(long, short = 'n')]
    pub subscribers: Option<usize>,
    /// Seconds of publishing (idle: seconds of holding the connections).
    #[arg(long, default_value_t = 10.0)]
    pub seconds: f64,
    /// Payload object size in bytes (default 100; ai-tokens 50).
    #[arg(long)]
    pub payload: Option<usize>,

    // fanout
    /// fanout: publishers on the one topic.
    #[arg(long, default_value_t = 1)]
    pub publishers: usize,
    /// fanout: messages/s per publisher (fixed rate). Default: as fast as the server takes them.
    #[arg(long)]
    pub rate: Option<f64>,
    /// fanout without --rate: messages in flight per publisher (sent but not yet received by
    /// every subscriber in the publisher's worker process).
    #[arg(long, default_value_t = 100)]
    pub window: u64,
    /// fanout: find the sustained rate (all delivered and p99 <= --p99-limit-ms) by a
    /// geometric sweep then bisection of fixed-rate steps.
    #[arg(long)]
    pub sweep: bool,
    /// Sweep: first rate (messages/s per publisher).
    #[arg(long, default_value_t = 100.0)]
    pub sweep_start: f64,
    /// Sweep: seconds per step.
    #[arg(long, default_value_t = 5.0)]
    pub step_seconds: f64,
    /// Sweep: bisection steps after the first failure.
    #[arg(long, default_value_t = 4)]
    pub sweep_iters: usize,
    /// Sweep: p99 latency limit of a passing step, ms.
    #[arg(long, default_value_t = 200.0)]
    pub p99_limit_ms: f64,

    // ai-tokens
    /// ai-tokens: token streams (topics), each with one publisher.
    #[arg(long, default_value_t = 1)]
    pub streams: usize,
    /// ai-tokens: tokens per second per stream.
    #[arg(long, default_value_t = 50.0)]
    pub tokens_per_sec: f64,
    /// ai-tokens: per-send cost in µs for the latency floor (skips the baseline run).
    #[arg(long)]
    pub per_send_us: Option<f64>,
    /// ai-tokens: seconds of the raw-socket baseline run that measures the per-send cost.
    #[arg(long, default_value_t = 2.0)]
    pub baseline_seconds: f64,

    // chat
    /// chat: members per room.
    #[arg(long, default_value_t = 10)]
    pub room_size: usize,
    /// chat: each member publishes once per this many ms (start times spread at random).
    #[arg(long, default_value_t = 1000)]
    pub interval_ms: u64,

    // idle
    /// idle / connect-storm: topics the connections are spread over; history: topics the
    /// writers are spread over.
    #[arg(long, default_value_t = 1)]
    pub topics: usize,

    // presence (also: -n = members, --rate = joins and leaves per second, default 1000)
    /// presence: connections that join with presence enabled and time the diffs.
    #[arg(long, default_value_t = 3)]
    pub observers: usize,
    /// presence: how members leave.
    #[arg(long, value_enum, default_value_t = LeaveVia::Close)]
    pub leave: LeaveVia,
    /// presence: members also join with presence enabled (each gets presence_state and every
    /// diff: N × diffs frames, and state bodies that grow with the room).
    #[arg(long)]
    pub members_listen: bool,
    /// presence: corecast's diff coalescing window (passed as --presence-diff-ms).
    #[arg(long, default_value_t = 20)]
    pub presence_diff_ms: u64,

    // history (also: --rate = total messages/s, default as fast as accepted; --topics)
    /// history: REST writer connections (one request in flight each).
    #[arg(long, default_value_t = 4)]
    pub writers: usize,
    /// history: messages per request (1 = `POST .../broadcast/{topic}/events/m?persist=true`,
    /// more = the batch endpoint with `"persist": true` per message; corecast's max is 1000).
    #[arg(long, default_value_t = 100)]
    pub batch: usize,
    /// history: stop writing after this many messages (default: write for --seconds).
    #[arg(long)]
    pub messages: Option<u64>,
    /// history: read-latency connections (keep-alive, one request in flight each).
    #[arg(long, default_value_t = 4)]
    pub readers: usize,
    /// history: read requests in total (half `?limit=50`, half `?limit=50&before=<offset>`).
    #[arg(long, default_value_t = 10_000)]
    pub requests: u64,
    /// history: messages stored on the read-latency topic before reading.
    #[arg(long, default_value_t = 1000)]
    pub seed_messages: u64,
    /// history: corecast's --history-max-messages (per topic), so nothing written is trimmed.
    #[arg(long, default_value_t = 1_000_000)]
    pub history_max_messages: u64,
    /// history: restart the server before reading everything back (term: clean; kill: SIGKILL).
    #[arg(long, value_enum)]
    pub restart: Option<Restart>,
    /// history: wait this long after the last 202 before --restart (how far durability lags).
    #[arg(long, default_value_t = 0)]
    pub restart_after_ms: u64,

    // where and how
    /// Server under test (ignored by compare).
    #[arg(long, value_enum, default_value_t = ServerKind::Corecast)]
    pub server: ServerKind,
    /// Use a server already running at this address instead of starting one.
    #[arg(long)]
    pub addr: Option<SocketAddrV4>,
    /// PID of the server given by --addr (for RSS and CPU figures).
    #[arg(long)]
    pub pid: Option<u32>,
    /// Publish over WebSocket or over REST (corecast only; peers always use WebSocket).
    #[arg(long, value_enum, default_value_t = PublishVia::Ws)]
    pub publish: PublishVia,
    /// Clients per worker process (each process may hold ~19,000 sockets at the 20,000 fd limit).
    #[arg(long, default_value_t = 8000)]
    pub per_worker: usize,
    /// Source addresses 127.0.0.1.. 127.0.0.K the clients are spread over.
    #[arg(long, default_value_t = 4)]
    pub src_addrs: usize,
    /// Connections being set up at once (connect + upgrade + join), over all workers.
    #[arg(long, default_value_t = 256)]
    pub connect_concurrency: usize,
    /// Connect + join timeout per connection, ms.
    #[arg(long, default_value_t = 15000)]
    pub connect_timeout_ms: u64,
    /// Longest wait for deliveries after publishing stops, s.
    #[arg(long, default_value_t = 15.0)]
    pub drain_secs: f64,
    /// CPU the server is pinned to.
    #[arg(long, default_value_t = 0)]
    pub server_cpu: usize,
    /// CPU the generator (all worker processes) is pinned to.
    #[arg(long, default_value_t = 1)]
    pub client_cpu: usize,
    /// corecast binary (default: <workspace>/target/release/corecast).
    #[arg(long)]
    pub corecast_bin: Option<PathBuf>,
    /// TLS (corecast only): the server gets a fresh self-signed certificate (`--tls-cert`,
    /// `--tls-key`, made with `openssl`) and every client connection makes a full TLS handshake
    /// and speaks wss/https. Peers are run without TLS; compare a `--tls` run with a plain one.
    #[arg(long)]
    pub tls: bool,
    /// Extra argument passed to corecast (repeatable), e.g. --corecast-arg=--max-queue-bytes=8388608.
    #[arg(long = "corecast-arg", allow_hyphen_values = true)]
    pub corecast_args: Vec<String>,
    /// Results directory (default tuning/runs/<YYYY-MM-DD>-<hostname>/).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Write no result files.
    #[arg(long)]
    pub no_report: bool,
    /// Also write the JSON result to this path.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// No per-second progress lines.
    #[arg(long, short = 'q')]
    pub quiet: bool,
}

impl RunArgs {
    pub fn subscribers_for(&self, sc: ScenarioKind) -> usize {
        self.subscribers.unwrap_or(sc.default_subscribers())
    }

    pub fn payload_for(&self, sc: ScenarioKind) -> usize {
        self.payload.unwrap_or(sc.default_payload())
    }

    fn cpu(&self, c: usize) -> Option<usize> {
        (c < sys::online_cpus()).then_some(c)
    }

    pub fn fleet_opts(&self, server: ServerKind) -> FleetOpts {
        FleetOpts {
            per_worker: self.per_worker,
            src_addrs: self.src_addrs,
            connect_concurrency: self.connect_concurrency,
            connect_timeout_ms: self.connect_timeout_ms,
            heartbeat_ms: if server == ServerKind::Corecast { 25_000 } else { 0 },
            cpu: self.cpu(self.client_cpu),
            rest_publish: self.publish == PublishVia::Rest && server == ServerKind::Corecast,
            sse_subscribers: false,
            upgrade_only: false,
            tls_ca: (self.tls && server == ServerKind::Corecast).then(|| tls_files().0),
            quiet: self.quiet,
        }
    }

    pub fn server_opts(&self, log_dir: PathBuf) -> ServerOpts {
        let mut corecast_args = self.corecast_args.clone();
        if self.tls {
            let (cert, key) = tls_files();
            corecast_args.push(format!("--tls-cert={}", cert.display()));
            corecast_args.push(format!("--tls-key={}", key.display()));
        }
        ServerOpts { cpu: self.cpu(self.server_cpu), corecast_bin: self.corecast_bin.clone(), corecast_args, log_dir }
    }

    /// [`RunArgs::server_opts`] plus the corecast flags scenario `sc` needs, unless given with
    /// --corecast-arg: presence lifts the per-connection presence call limit (10 per 30 s) and
    /// the entry limit above the room size and sets the diff window; history keeps every
    /// message written.
    pub fn server_opts_for(&self, sc: ScenarioKind, log_dir: PathBuf) -> ServerOpts {
        let mut o = self.server_opts(log_dir);
        let mut add = |flag: &str, v: String| {
            let given = o.corecast_args.iter().any(|a| a == flag || a.starts_with(&format!("{flag}=")));
            if !given {
                o.corecast_args.push(format!("{flag}={v}"));
            }
        };
        match sc {
            ScenarioKind::Presence => {
                let room = self.subscribers_for(sc) + self.observers;
                add("--presence-calls-per-30s", "1000000".into());
                add("--presence-max-entries", room.max(20_000).to_string());
                add("--presence-diff-ms", self.presence_diff_ms.max(1).to_string());
            }
            ScenarioKind::History => {
                add("--history-max-messages", self.history_max_messages.max(1).to_string());
            }
            _ => {}
        }
        o
    }

    pub fn baseline_opts(&self, subscribers: usize, payload: usize) -> BaselineOpts {
        BaselineOpts {
            subscribers,
            seconds: self.baseline_seconds,
            ks: vec![],
            paced_rate: 0.0,
            payload,
            server_cpu: self.cpu(self.server_cpu),
            fleet: self.fleet_opts(ServerKind::Corecast),
        }
    }

    pub fn layout(&self, sc: ScenarioKind) -> Layout {
        let n = self.subscribers_for(sc);
        match sc {
            ScenarioKind::Fanout | ScenarioKind::Sse => Layout::Fanout { subs: n, pubs: self.publishers.max(1) },
            ScenarioKind::Presence => {
                Layout::Presence { members: n, observers: self.observers.max(1), members_listen: self.members_listen }
            }
            ScenarioKind::History => Layout::Idle { subs: 0, topics: 1 },
            ScenarioKind::AiTokens => Layout::Streams { subs: n, streams: self.streams.max(1) },
            ScenarioKind::Chat => Layout::Rooms { members: n, room_size: self.room_size.max(2) },
            ScenarioKind::Idle | ScenarioKind::ConnectStorm => Layout::Idle { subs: n, topics: self.topics.max(1) },
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct SweepStep {
    pub rate_per_publisher: f64,
    pub deliveries_per_sec: f64,
    pub p99_ms: f64,
    pub lost: u64,
    pub pass: bool,
    pub why: String,
    pub frames_per_send: Option<f64>,
    /// Generator CPU utilisation during the step (>= 0.9: the generator may be the limit).
    pub generator_cpu: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct SweepSummary {
    /// Highest passing rate, messages/s per publisher (0 if none passed).
    pub sustained_rate: f64,
    /// Deliveries/s at that rate (rate × publishers × subscribers).
    pub sustained_deliveries_per_sec: f64,
    pub p99_limit_ms: f64,
    pub steps: Vec<SweepStep>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Machine {
    pub hostname: String,
    pub cpus: usize,
    pub kernel: String,
    pub loadavg_at_start: String,
    pub date_utc: String,
}

pub fn machine() -> Machine {
    let (d, t) = sys::utc_date_time();
    Machine {
        hostname: sys::hostname(),
        cpus: sys::online_cpus(),
        kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim().to_string(),
        loadavg_at_start: std::fs::read_to_string("/proc/loadavg").unwrap_or_default().trim().to_string(),
        date_utc: format!("{d} {}:{}:{}", &t[..2], &t[2..4], &t[4..]),
    }
}

/// One scenario against one server.
#[derive(Clone, Debug, Serialize)]
pub struct RunResult {
    pub scenario: String,
    pub server: String,
    pub ok: bool,
    pub error: Option<String>,
    pub subscribers: usize,
    pub clients: usize,
    pub workers: usize,
    pub payload: usize,
    pub connect: Option<ConnectSummary>,
    /// connect-storm: the same storm with every client done at its WebSocket 101 (no join sent).
    pub upgrade_only: Option<ConnectSummary>,
    pub rss_before_kib: Option<u64>,
    pub rss_after_kib: Option<u64>,
    pub rss_end_kib: Option<u64>,
    /// (RSS after connecting − before) ÷ connections, KiB.
    pub rss_per_conn_kib: Option<f64>,
    /// The same for anonymous memory only (`RssAnon`: what connections allocate, without the
    /// code pages that a first run of a path faults in), KiB.
    pub anon_before_kib: Option<u64>,
    pub anon_after_kib: Option<u64>,
    pub anon_per_conn_kib: Option<f64>,
    pub phases: Vec<PhaseOutcome>,
    /// Index in `phases` of the phase the summary quotes (the best passing sweep step).
    pub headline: Option<usize>,
    pub sweep: Option<SweepSummary>,
    /// corecast: frames sent ÷ sendmsg calls during the headline phase (or all phases).
    pub frames_per_send: Option<f64>,
    pub server_cpu_secs: Option<f64>,
    /// Seconds the server was runnable but waited for its CPU over the run (a busy machine).
    pub server_run_wait_secs: Option<f64>,
    pub idle_closed: Option<u64>,
    /// ai-tokens: subscribers per stream × per-send cost (one shard), ms.
    pub floor_ms: Option<f64>,
    pub per_send_us: Option<f64>,
    pub p99_over_floor: Option<f64>,
    /// presence: the steps' figures.
    pub presence: Option<crate::presence::PresenceSummary>,
    /// history: write, verify and read figures.
    pub history: Option<crate::history::HistorySummary>,
    pub notes: Vec<String>,
}

impl RunResult {
    fn empty(sc: ScenarioKind, server: ServerKind, args: &RunArgs) -> RunResult {
        let layout = args.layout(sc);
        RunResult {
            scenario: sc.name().into(),
            server: server.name().into(),
            ok: false,
            error: None,
            subscribers: layout.subscribers(),
            clients: layout.clients(),
            workers: 0,
            payload: args.payload_for(sc),
            connect: None,
            upgrade_only: None,
            rss_before_kib: None,
            rss_after_kib: None,
            rss_end_kib: None,
            rss_per_conn_kib: None,
            anon_before_kib: None,
            anon_after_kib: None,
            anon_per_conn_kib: None,
            phases: Vec::new(),
            headline: None,
            sweep: None,
            frames_per_send: None,
            server_cpu_secs: None,
            server_run_wait_secs: None,
            idle_closed: None,
            floor_ms: None,
            per_send_us: None,
            p99_over_floor: None,
            presence: None,
            history: None,
            notes: Vec::new(),
        }
    }

    pub fn headline_phase(&self) -> Option<&PhaseOutcome> {
        self.headline.and_then(|i| self.phases.get(i))
    }

    /// Deliveries per second over the run, one point per second of every phase in order, for
    /// the throughput charts.
    pub fn throughput_timeline(&self) -> Vec<(f64, f64)> {
        self.phases
            .iter()
            .flat_map(|p| p.timeline.iter())
            .enumerate()
            .map(|(i, s)| (i as f64 + 1.0, s.delivered_per_sec))
            .collect()
    }

    /// The deliveries/s figure compare quotes: sustained rate for a sweep, else the phase's.
    pub fn deliveries_per_sec(&self) -> f64 {
        if let Some(s) = &self.sweep {
            return s.sustained_deliveries_per_sec;
        }
        self.headline_phase().map_or(0.0, |p| p.deliveries_per_sec)
    }
}

fn ratio(a: Option<(f64, f64)>, b: Option<(f64, f64)>) -> Option<f64> {
    let (fa, sa) = a?;
    let (fb, sb) = b?;
    let ds = sb - sa;
    (ds > 0.0).then(|| (fb - fa) / ds)
}

/// Run scenario `sc` against `server` (started here unless `--addr`). Never panics on a server
/// that misbehaves: the error goes into the result.
pub fn run_one(
    sc: ScenarioKind,
    server: ServerKind,
    args: &RunArgs,
    baseline: Option<&BaselineResult>,
    log_dir: PathBuf,
) -> RunResult {
    let mut r = RunResult::empty(sc, server, args);
    let label = format!("{} {}", server.name(), sc.name());
    let peer_sse = sc == ScenarioKind::Sse && server.has_sse();
    if sc.corecast_only() && server != ServerKind::Corecast && !peer_sse {
        let why = match sc {
            ScenarioKind::Presence => "peers have no Phoenix presence",
            ScenarioKind::Sse => "this peer has no Server-Sent Events endpoint",
            _ => "peers have no history API",
        };
        r.error = Some(format!("{}: corecast only ({why})", sc.name()));
        return r;
    }
    let sopts = args.server_opts_for(sc, log_dir);
    let mut srv = match args.addr {
        Some(a) => Running::external(server, a, args.pid),
        None => match servers::start(server, &sopts) {
            Ok(s) => s,
            Err(e) => {
                eprintln!("{label}: server did not start: {e}");
                r.error = Some(format!("server did not start: {e}"));
                return r;
            }
        },
    };
    if !args.quiet {
        eprintln!("{label}: server at {} (pid {})", srv.addr, srv.pid);
    }
    std::thread::sleep(Duration::from_millis(300));
    match body(sc, &mut srv, args, baseline, &mut r, &label, &sopts) {
        Ok(()) => r.ok = true,
        Err(e) => {
            eprintln!("{label}: {e}");
            r.error = Some(e);
        }
    }
    if !srv.alive() {
        r.ok = false;
        let msg = format!("server exited during the run (log: {})", srv.log.display());
        r.error = Some(r.error.take().map_or(msg.clone(), |e| format!("{e}; {msg}")));
    }
    srv.stop();
    r
}

fn body(
    sc: ScenarioKind,
    srv: &mut Running,
    args: &RunArgs,
    baseline: Option<&BaselineResult>,
    r: &mut RunResult,
    label: &str,
    sopts: &ServerOpts,
) -> Result<(), String> {
    if sc == ScenarioKind::History {
        // REST only, no subscriber fleet.
        return crate::history::run(srv, args, r, label, sopts);
    }
    let layout = args.layout(sc);
    let payload = args.payload_for(sc);
    r.rss_before_kib = srv.rss_kib();
    r.anon_before_kib = srv.anon_kib();
    let cpu_before = srv.cpu_secs();
    let wait_before = srv.run_wait_secs();
    let mut fleet_opts = args.fleet_opts(srv.kind);
    if sc == ScenarioKind::ConnectStorm {
        fleet_opts.connect_timeout_ms = fleet_opts.connect_timeout_ms.max(30_000);
    }
    fleet_opts.sse_subscribers = sc == ScenarioKind::Sse;
    let mut fleet = Fleet::spawn(srv.kind.proto(), srv.addr, layout.clone(), &fleet_opts)?;
    r.workers = fleet.workers();
    if !args.quiet {
        eprintln!(
            "{label}: {} clients ({} subscribers) from {} worker process(es) on CPU {:?}",
            layout.clients(),
            layout.subscribers(),
            fleet.workers(),
            fleet_opts.cpu
        );
    }
    let connect = fleet.wait_connected(Duration::from_secs(600))?;
    if !args.quiet {
        eprintln!(
            "{label}: {} connected+joined, {} failed, in {:.2}s ({}/s, p50 {:.1} ms, p99 {:.1} ms)",
            connect.ok,
            connect.failed,
            connect.secs,
            si(connect.per_sec),
            connect.p50_ms,
            connect.p99_ms
        );
        for e in &connect.errors {
            eprintln!("  {e}");
        }
    }
    let ok_conns = connect.ok;
    r.connect = Some(connect);
    if ok_conns == 0 {
        fleet.quit();
        return Err("no client could connect and join".into());
    }
    // Let the server settle (allocators, lazy buffers) before reading its memory.
    std::thread::sleep(Duration::from_millis(500));
    r.rss_after_kib = srv.rss_kib();
    r.anon_after_kib = srv.anon_kib();
    if let (Some(a), Some(b)) = (r.rss_before_kib, r.rss_after_kib) {
        r.rss_per_conn_kib = Some((b as f64 - a as f64) / ok_conns as f64);
    }
    if let (Some(a), Some(b)) = (r.anon_before_kib, r.anon_after_kib) {
        r.anon_per_conn_kib = Some((b as f64 - a as f64) / ok_conns as f64);
    }
    let drain = Duration::from_secs_f64(args.drain_secs);
    let counters0 = srv.send_counters();
    let result = match sc {
        ScenarioKind::ConnectStorm => Ok(()),
        ScenarioKind::Idle => {
            r.idle_closed = Some(fleet.hold(args.seconds, label));
            Ok(())
        }
        ScenarioKind::Presence => crate::presence::run(&mut fleet, srv, args, r, label),
        ScenarioKind::History => unreachable!("handled above"),
        ScenarioKind::Fanout | ScenarioKind::Sse if args.sweep => sweep(&mut fleet, srv, args, payload, label, r),
        ScenarioKind::Fanout | ScenarioKind::Sse | ScenarioKind::AiTokens | ScenarioKind::Chat => {
            let (rate, jitter, window) = match sc {
                ScenarioKind::Fanout | ScenarioKind::Sse => (args.rate, false, args.window),
                ScenarioKind::AiTokens => (Some(args.tokens_per_sec), args.streams > 1, 1),
                _ => (Some(1000.0 / args.interval_ms.max(1) as f64), true, 1),
            };
            let spec = PhaseSpec { phase: 1, seconds: args.seconds, rate, window, payload, jitter };
            fleet.run_phase(spec, label, None, drain).map(|o| {
                r.phases.push(o);
                r.headline = Some(0);
            })
        }
    };
    let counters1 = srv.send_counters();
    if r.frames_per_send.is_none() {
        r.frames_per_send = ratio(counters0, counters1);
    }
    r.rss_end_kib = srv.rss_kib();
    r.server_cpu_secs = match (cpu_before, srv.cpu_secs()) {
        (Some(a), Some(b)) => Some(b - a),
        _ => None,
    };
    r.server_run_wait_secs = wait_before.zip(srv.run_wait_secs()).map(|(a, b)| b - a);
    if sc == ScenarioKind::AiTokens {
        let per_stream = layout.subscribers() as f64 / args.streams.max(1) as f64;
        let per_send = args.per_send_us.or_else(|| baseline.map(|b| b.us_per_send)).filter(|v| *v > 0.0);
        if let Some(us) = per_send {
            let floor = per_stream * us / 1000.0;
            r.per_send_us = Some(us);
            r.floor_ms = Some(floor);
            if let Some(p) = r.headline_phase() {
                r.p99_over_floor = Some(p.p99_ms / floor);
            }
        }
    }
    fleet.quit();
    if sc == ScenarioKind::ConnectStorm && result.is_ok() {
        // The same storm again with every client done at its 101 and no join sent: the rate of
        // upgrades alone, comparable across servers whatever their join (nchan has none). On a
        // fresh server, like the first pass: a second storm on the same one measured ~25% slower
        // for nchan, whose two passes are the same protocol.
        srv.restart(sopts)?;
        std::thread::sleep(Duration::from_millis(300));
        let o = FleetOpts { upgrade_only: true, ..fleet_opts.clone() };
        let mut f = Fleet::spawn(srv.kind.proto(), srv.addr, layout.clone(), &o)?;
        let c = f.wait_connected(Duration::from_secs(600));
        f.quit();
        let c = c?;
        if !args.quiet {
            eprintln!(
                "{label}: upgrade only: {} upgraded, {} failed, in {:.2}s ({}/s, p50 {:.1} ms, p99 {:.1} ms)",
                c.ok,
                c.failed,
                c.secs,
                si(c.per_sec),
                c.upgrade_p50_ms,
                c.upgrade_p99_ms
            );
        }
        r.upgrade_only = Some(c);
    }
    if let Some(cpu) = r.headline_phase().map(|p| p.generator_cpu_secs / p.active_secs.max(1e-3)) {
        if cpu >= 0.9 {
            r.notes.push(format!("generator CPU {:.0}%: the generator may be the bottleneck of this run", cpu * 100.0));
        }
    }
    if let Some((closed, shortfall)) = r.headline_phase().map(|p| (p.closed, p.shortfall)) {
        if closed > 0 {
            r.notes.push(format!("{closed} subscriber connections closed during the run"));
        }
        if shortfall > 0 {
            r.notes.push(format!(
                "publishers skipped {shortfall} scheduled messages (their connection had megabytes queued)"
            ));
        }
    }
    result
}

fn judge(o: &PhaseOutcome, target_total: f64, p99_limit: f64) -> (bool, String) {
    let mut why = Vec::new();
    if o.lost > 0 {
        why.push(format!("{} lost", o.lost));
    }
    if o.closed > 0 {
        why.push(format!("{} closed", o.closed));
    }
    if o.p99_ms > p99_limit {
        why.push(format!("p99 {:.1} ms > {p99_limit} ms", o.p99_ms));
    }
    if o.shortfall > 0 {
        why.push(format!("publisher fell {} messages behind", o.shortfall));
    }
    let achieved = o.published as f64 / o.publish_secs.max(1e-3);
    if achieved < 0.9 * target_total {
        why.push(format!("published {:.0}/s of {:.0}/s", achieved, target_total));
    }
    if o.uniq == 0 {
        why.push("nothing delivered".into());
    }
    (why.is_empty(), why.join(", "))
}

fn sweep(
    fleet: &mut Fleet,
    srv: &Running,
    args: &RunArgs,
    payload: usize,
    label: &str,
    r: &mut RunResult,
) -> Result<(), String> {
    let pubs = args.publishers.max(1) as f64;
    let subs = fleet.layout.subscribers() as f64;
    let mut rate = args.sweep_start.max(1.0);
    let (mut lo, mut hi): (Option<f64>, Option<f64>) = (None, None);
    let mut best: Option<usize> = None;
    let mut steps = Vec::new();
    let mut bisect = 0;
    for step in 0..40u32 {
        let spec = PhaseSpec {
            phase: step + 1,
            seconds: args.step_seconds,
            rate: Some(rate),
            window: 1,
            payload,
            jitter: false,
        };
        let c0 = srv.send_counters();
        let o = fleet.run_phase(
            spec,
            &format!("{label} sweep {} msg/s", si(rate * pubs)),
            None,
            Duration::from_secs_f64(args.drain_secs),
        )?;
        let fps = ratio(c0, srv.send_counters());
        let (pass, why) = judge(&o, rate * pubs, args.p99_limit_ms);
        if !args.quiet {
            eprintln!(
                "{label} sweep: {} msg/s → {} deliveries/s, p99 {:.1} ms, lost {}, generator CPU {:.0}%: {}",
                si(rate * pubs),
                si(o.deliveries_per_sec),
                o.p99_ms,
                o.lost,
                100.0 * o.generator_cpu_secs / o.active_secs.max(1e-3),
                if pass { "PASS".to_string() } else { format!("FAIL ({why})") }
            );
        }
        steps.push(SweepStep {
            rate_per_publisher: rate,
            deliveries_per_sec: o.deliveries_per_sec,
            p99_ms: o.p99_ms,
            lost: o.lost,
            pass,
            why,
            frames_per_send: fps,
            generator_cpu: o.generator_cpu_secs / o.active_secs.max(1e-3),
        });
        let closed = o.closed;
        r.phases.push(o);
        if closed > 0 {
            let c = fleet.reconnect()?;
            if !args.quiet {
                eprintln!(
                    "{label} sweep: the server closed {closed} connections; reconnected {} ({} failed)",
                    c.ok, c.failed
                );
            }
            if c.failed > 0 {
                r.notes.push(format!("sweep stopped: {} connections could not reconnect", c.failed));
                break;
            }
        }
        if pass {
            if lo.is_none_or(|l| rate > l) {
                lo = Some(rate);
                best = Some(r.phases.len() - 1);
                r.frames_per_send = fps;
            }
        } else if hi.is_none_or(|h| rate < h) {
            hi = Some(rate);
        }
        rate = match (lo, hi) {
            (Some(l), None) => l * 2.0,
            (None, Some(h)) => {
                if h / 2.0 < 1.0 {
                    break;
                }
                h / 2.0
            }
            (Some(l), Some(h)) => {
                if bisect >= args.sweep_iters || h / l < 1.05 {
                    break;
                }
                bisect += 1;
                (l + h) / 2.0
            }
            (None, None) => break,
        };
        // Let the server's queues empty between steps.
        std::thread::sleep(Duration::from_millis(500));
    }
    let sustained = lo.unwrap_or(0.0);
    r.headline = best.or(Some(r.phases.len().saturating_sub(1)));
    r.sweep = Some(SweepSummary {
        sustained_rate: sustained,
        sustained_deliveries_per_sec: sustained * pubs * subs,
        p99_limit_ms: args.p99_limit_ms,
        steps,
    });
    Ok(())
}

/// The baseline run standalone scenarios (ai-tokens) use for the per-send cost.
pub fn quick_baseline(args: &RunArgs, sc: ScenarioKind) -> Option<BaselineResult> {
    if args.per_send_us.is_some() || sc != ScenarioKind::AiTokens {
        return None;
    }
    let n = args.subscribers_for(sc) / args.streams.max(1);
    let o = args.baseline_opts(n.max(1), args.payload_for(sc));
    match baseline::run(&o, "baseline") {
        Ok(b) => Some(b),
        Err(e) => {
            eprintln!("baseline failed: {e}");
            None
        }
    }
}

/// The certificate and key of this process's `--tls` runs (made once, in a temporary
/// directory); exits with a message when `openssl` is missing.
pub fn tls_files() -> (PathBuf, PathBuf) {
    static FILES: std::sync::OnceLock<(PathBuf, PathBuf)> = std::sync::OnceLock::new();
    FILES
        .get_or_init(|| {
            let dir = std::env::temp_dir().join(format!("loadtest-tls-{}", std::process::id()));
            crate::tls_cert::make(&dir).unwrap_or_else(|e| {
                eprintln!("--tls: {e}");
                std::process::exit(2)
            })
        })
        .clone()
}
