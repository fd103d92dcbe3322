//! `loadtest`: the corecast load generator and peer comparison.
//!
//! See `loadtest/README.md` for every command and scenario. In short:
//! - `loadtest fanout|ai-tokens|chat|idle|connect-storm [--server corecast|nats|ws|socketio]`
//!   runs one scenario against one server (started here, pinned to CPU 0, or `--addr`);
//! - `loadtest sse|presence|history` run corecast-only scenarios (SSE fan-out, presence diffs,
//!   persisted history);
//! - `loadtest pg` and `loadtest cluster` start corecast themselves against a real PostgreSQL
//!   (Postgres changes; cluster mode across several nodes);
//! - `loadtest soak --minutes N` runs churn, broadcasts, presence, SSE and persisted messages
//!   together and checks that the server's memory and fds stay flat (corecast only);
//! - `loadtest baseline --subscribers N` measures the raw `sendmsg` cost of this machine;
//! - `loadtest compare <scenario>` runs the baseline and then the scenario against corecast and
//!   every peer, and prints a table with ratios to corecast.
//!
//! The generator itself runs in worker processes (`loadtest worker`, internal), each a
//! single-threaded epoll loop pinned to CPU 1.

mod baseline;
mod cluster;
mod compare;
mod coord;
mod history;
mod layout;
mod pg;
mod presence;
mod report;
mod scenarios;
mod servers;
mod soak;
mod sys;
mod tls_cert;
mod wire;
mod worker;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::scenarios::{RunArgs, ScenarioKind};
use crate::servers::ServerKind;

#[derive(Parser)]
#[command(
    name = "loadtest",
    version,
    about = "Load generator for corecast and its peers (nats-server, Node ws, Socket.IO)"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// One topic, N subscribers, publishers as fast as the server takes them (or --rate, or
    /// --sweep for the sustained rate).
    Fanout(RunArgs),
    /// S token streams at T tokens/s, ~50-byte payloads, subscribers each following one stream.
    AiTokens(RunArgs),
    /// Many small rooms (--room-size), every member publishing every --interval-ms.
    Chat(RunArgs),
    /// N idle joined connections held for --seconds: server RSS per connection.
    Idle(RunArgs),
    /// Connect + join N connections as fast as possible: the rate.
    ConnectStorm(RunArgs),
    /// fanout with Server-Sent Events subscribers (corecast only; `compare sse` puts it next to
    /// WebSocket fan-out).
    Sse(RunArgs),
    /// Presence room: N members track then leave at --rate/s; observers time the diffs (corecast
    /// only).
    Presence(RunArgs),
    /// Persisted messages/s over REST, read-back check, history read latency (corecast only).
    History(RunArgs),
    /// Postgres changes end to end (commit→client latency, ingest throughput, RLS-checked
    /// deliveries/s) against a real database; see `pg.rs`.
    Pg(pg::PgArgs),
    /// Cluster mode (`--cluster postgres`): starts --nodes nodes on one database; send→receive
    /// latency across nodes vs one node (`--cluster none`), and the sequencing ceiling with the
    /// database's CPU and WAL bytes per message; see `cluster.rs`.
    Cluster(cluster::ClusterArgs),
    /// Soak (corecast only): WebSocket churn, broadcasts, presence churn, SSE streams and
    /// persisted messages together for --minutes; server RSS and fds sampled every 10 s; pass
    /// criteria checked at the end (exit code 1 when one fails).
    Soak(soak::SoakArgs),
    /// Raw-socket baseline: per-sendmsg cost of this machine and the generator's ceiling.
    Baseline(BaselineArgs),
    /// Baseline, then one scenario against corecast and each peer; table with ratios.
    Compare(CompareArgs),
    /// Internal: a generator worker process (spec and commands on stdin, events on stdout).
    #[command(hide = true)]
    Worker,
}

#[derive(clap::Args)]
struct BaselineArgs {
    /// Frames per sendmsg of the coalesced runs (after the one-frame-per-send run).
    #[arg(long = "k", value_delimiter = ',', default_value = "16,64")]
    ks: Vec<usize>,
    /// Messages per second of the paced run (one frame per send, latency to all subscribers);
    /// 0 skips it.
    #[arg(long, default_value_t = 50.0)]
    paced_rate: f64,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(clap::Args)]
struct CompareArgs {
    /// Scenario to compare.
    #[arg(value_enum)]
    scenario: ScenarioKind,
    /// Servers, in order (default: corecast,nats,ws,socketio,uws,nchan; sse: corecast,nchan,
    /// which give the rows corecast-ws, corecast-sse, nchan-ws and nchan-sse; another peer in
    /// sse gives its WebSocket fan-out row). presence and history run on corecast only.
    #[arg(long, value_enum, value_delimiter = ',')]
    servers: Option<Vec<ServerKind>>,
    /// Skip the raw-socket baseline.
    #[arg(long)]
    no_baseline: bool,
    #[command(flatten)]
    run: RunArgs,
}

fn setup(args: &RunArgs) {
    let lim = sys::raise_nofile();
    if lim < 4096 {
        eprintln!("warning: open-files limit is {lim}; large runs need more (ulimit -n)");
    }
    // The coordinator (and npm, if it runs) stays off the server's CPU.
    if args.client_cpu < sys::online_cpus() {
        sys::pin_to_cpu(args.client_cpu);
    } else {
        eprintln!("warning: CPU {} does not exist here; generator not pinned", args.client_cpu);
    }
}

fn run_scenario(sc: ScenarioKind, args: RunArgs) -> ExitCode {
    setup(&args);
    let m = scenarios::machine();
    let base = scenarios::quick_baseline(&args, sc);
    let log_dir = std::env::temp_dir().join(format!("loadtest-{}", std::process::id()));
    let r = scenarios::run_one(sc, args.server, &args, base.as_ref(), log_dir.clone());
    let _ = std::fs::remove_dir_all(&log_dir);
    print_summary(&r);
    if let Some(p) = &args.json {
        report::write_json(p, &r);
    }
    if !args.no_report {
        let dir = report::run_dir(args.out.as_deref());
        let md = report::write_run(&dir, &r, &m);
        eprintln!("results: {}", md.display());
    }
    if r.ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn print_summary(r: &scenarios::RunResult) {
    use coord::si;
    println!("{} on {}:", r.scenario, r.server);
    if let Some(e) = &r.error {
        println!("  ERROR: {e}");
    }
    if let Some(c) = &r.connect {
        println!(
            "  connect+join: {} ok, {} failed, {}/s (p50 {:.1} ms, p99 {:.1} ms)",
            c.ok,
            c.failed,
            si(c.per_sec),
            c.p50_ms,
            c.p99_ms
        );
    }
    if let Some(v) = r.rss_per_conn_kib {
        println!(
            "  server RSS: {} → {} KiB, {:.2} KiB per connection (anonymous: {} → {} KiB, {} KiB per connection)",
            r.rss_before_kib.unwrap_or(0),
            r.rss_after_kib.unwrap_or(0),
            v,
            r.anon_before_kib.unwrap_or(0),
            r.anon_after_kib.unwrap_or(0),
            r.anon_per_conn_kib.map_or("–".into(), |v| format!("{v:.2}"))
        );
    }
    if let Some(p) = r.headline_phase() {
        println!(
            "  published {} ({}/s); delivered {} of {} ({}/s)",
            p.published,
            si(p.publish_per_sec),
            p.uniq,
            p.expected,
            si(p.deliveries_per_sec)
        );
        println!(
            "  latency ms: p50 {:.2}  p90 {:.2}  p99 {:.2}  p99.9 {:.2}  max {:.2}",
            p.p50_ms, p.p90_ms, p.p99_ms, p.p999_ms, p.max_ms
        );
        println!(
            "  lost {} ({} subscribers), duplicated {}, reordered {}, closed {}, generator CPU {:.0}%",
            p.lost,
            p.subs_with_loss,
            p.dup,
            p.reordered,
            p.closed,
            100.0 * p.generator_cpu_secs / p.active_secs.max(1e-3)
        );
        for e in p.errors.iter().take(5) {
            println!("  error: {e}");
        }
    }
    if let Some(s) = &r.sweep {
        println!(
            "  sustained: {} msg/s per publisher = {} deliveries/s (p99 ≤ {} ms, nothing lost)",
            si(s.sustained_rate),
            si(s.sustained_deliveries_per_sec),
            s.p99_limit_ms
        );
    }
    if let Some(f) = r.frames_per_send {
        println!("  corecast frames per sendmsg: {f:.2}");
    }
    if let (Some(c), Some(w)) = (r.server_cpu_secs, r.server_run_wait_secs) {
        println!("  server CPU {c:.2} s; it waited {w:.2} s for its CPU (other processes on it)");
    }
    if let (Some(f), Some(q)) = (r.floor_ms, r.p99_over_floor) {
        println!("  latency floor {f:.2} ms; p99 / floor = {q:.2}");
    }
    if let Some(c) = r.idle_closed {
        println!("  closed while idle: {c}");
    }
    if let Some(p) = &r.presence {
        print!("{}", presence::summary_text(p));
    }
    if let Some(h) = &r.history {
        print!("{}", history::summary_text(h));
    }
    for n in &r.notes {
        println!("  note: {n}");
    }
}

fn run_baseline(a: BaselineArgs) -> ExitCode {
    setup(&a.run);
    let n = a.run.subscribers.unwrap_or(5000);
    let mut o = a.run.baseline_opts(n, a.run.payload.unwrap_or(100));
    o.ks = a.ks;
    o.paced_rate = a.paced_rate;
    match baseline::run(&o, "baseline") {
        Ok(b) => {
            let md = report::baseline_md(&b);
            println!("{md}");
            if let Some(p) = &a.run.json {
                report::write_json(p, &b);
            }
            if !a.run.no_report {
                let m = scenarios::machine();
                let dir = report::run_dir(a.run.out.as_deref());
                let stem = format!("baseline-{}", report::stamp());
                report::write_json(&dir.join(format!("{stem}.json")), &(&m, &b));
                let lat: Vec<(String, Vec<(f64, f64)>)> = b
                    .runs
                    .iter()
                    .map(|r| (r.mode.clone(), r.outcome.percentile_ladder()))
                    .filter(|(_, l)| !l.is_empty())
                    .collect();
                let svg = format!("{stem}-latency.svg");
                let _ = std::fs::write(
                    dir.join(&svg),
                    report::latency_chart("raw sendmsg baseline: send→receive latency", &lat),
                );
                let text = format!(
                    "# raw-socket baseline ({n} subscribers)\n\n{}\n{md}\n![]({svg})\n",
                    report::machine_md(&m)
                );
                let p = dir.join(format!("{stem}.md"));
                let _ = std::fs::write(&p, text);
                eprintln!("results: {}", p.display());
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("baseline failed: {e}");
            ExitCode::FAILURE
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Worker => worker::run_worker(),
        Cmd::Fanout(a) => run_scenario(ScenarioKind::Fanout, a),
        Cmd::AiTokens(a) => run_scenario(ScenarioKind::AiTokens, a),
        Cmd::Chat(a) => run_scenario(ScenarioKind::Chat, a),
        Cmd::Idle(a) => run_scenario(ScenarioKind::Idle, a),
        Cmd::ConnectStorm(a) => run_scenario(ScenarioKind::ConnectStorm, a),
        Cmd::Sse(a) => run_scenario(ScenarioKind::Sse, a),
        Cmd::Presence(a) => run_scenario(ScenarioKind::Presence, a),
        Cmd::History(a) => run_scenario(ScenarioKind::History, a),
        Cmd::Pg(a) => pg::run(a),
        Cmd::Cluster(a) => cluster::run(a),
        Cmd::Soak(a) => soak::run(a),
        Cmd::Baseline(a) => run_baseline(a),
        Cmd::Compare(a) if matches!(a.scenario, ScenarioKind::Presence | ScenarioKind::History) => {
            // No peer has Phoenix presence or a history API: the comparison is corecast's run.
            eprintln!("compare {}: corecast only (the peers have no equivalent); running it once", a.scenario.name());
            run_scenario(a.scenario, a.run)
        }
        Cmd::Compare(a) => {
            setup(&a.run);
            let default = if a.scenario == ScenarioKind::Sse {
                vec![ServerKind::Corecast, ServerKind::Nchan]
            } else {
                ServerKind::ALL.to_vec()
            };
            let servers = a.servers.unwrap_or(default);
            let code = compare::compare(a.scenario, &a.run, &servers, !a.no_baseline);
            ExitCode::from(code as u8)
        }
    }
}
