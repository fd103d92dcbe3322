//! `loadtest compare <scenario>`: the raw-socket baseline, then the same scenario against
//! corecast and each peer in turn, one table with ratios to corecast, JSON, markdown and charts.

use std::fmt::Write as _;
use std::path::PathBuf;

use serde::Serialize;

use crate::baseline::{self, BaselineResult};
use crate::coord::si;
use crate::report;
use crate::scenarios::{self, machine, Machine, RunArgs, RunResult, ScenarioKind};
use crate::servers::ServerKind;

#[derive(Serialize)]
struct Row {
    server: String,
    ok: bool,
    error: Option<String>,
    deliveries_per_sec: f64,
    p50_ms: f64,
    p90_ms: f64,
    p99_ms: f64,
    p999_ms: f64,
    max_ms: f64,
    lost: u64,
    duplicated: u64,
    reordered: u64,
    closed: u64,
    published: u64,
    connect_per_sec: f64,
    connect_failed: u64,
    connect_ok: u64,
    /// Per connection: connect → joined, and connect → 101 within it.
    connect_p50_ms: f64,
    connect_p99_ms: f64,
    connect_upgrade_p50_ms: f64,
    connect_upgrade_p99_ms: f64,
    /// connect-storm's upgrade-only pass (no join sent): upgrades/s and connect → 101.
    upgrade_only_per_sec: Option<f64>,
    upgrade_only_p50_ms: Option<f64>,
    upgrade_only_p99_ms: Option<f64>,
    upgrade_only_failed: Option<u64>,
    rss_per_conn_kib: Option<f64>,
    anon_per_conn_kib: Option<f64>,
    frames_per_send: Option<f64>,
    p99_over_floor: Option<f64>,
    server_cpu_secs: Option<f64>,
    server_run_wait_secs: Option<f64>,
    sustained_rate_per_publisher: Option<f64>,
    deliveries_vs_corecast: Option<f64>,
    p99_vs_corecast: Option<f64>,
}

#[derive(Serialize)]
struct BaselineBrief {
    subscribers: usize,
    us_per_send: f64,
    floor_ms: f64,
    generator_ceiling_per_sec: f64,
    generator_ceiling_cpu: f64,
    generator_bound: bool,
    generator_per_cpu_sec: f64,
}

#[derive(Serialize)]
struct CompareDoc<'a> {
    scenario: String,
    machine: &'a Machine,
    subscribers: usize,
    seconds: f64,
    baseline: Option<BaselineBrief>,
    results: Vec<Row>,
    runs: &'a [RunResult],
    baseline_detail: Option<&'a BaselineResult>,
}

fn row(r: &RunResult) -> Row {
    let p = r.headline_phase();
    let c = r.connect.as_ref();
    Row {
        server: r.server.clone(),
        ok: r.ok,
        error: r.error.clone(),
        deliveries_per_sec: r.deliveries_per_sec(),
        p50_ms: p.map_or(0.0, |p| p.p50_ms),
        p90_ms: p.map_or(0.0, |p| p.p90_ms),
        p99_ms: p.map_or(0.0, |p| p.p99_ms),
        p999_ms: p.map_or(0.0, |p| p.p999_ms),
        max_ms: p.map_or(0.0, |p| p.max_ms),
        lost: p.map_or(0, |p| p.lost),
        duplicated: p.map_or(0, |p| p.dup),
        reordered: p.map_or(0, |p| p.reordered),
        closed: p.map_or(0, |p| p.closed),
        published: p.map_or(0, |p| p.published),
        connect_per_sec: c.map_or(0.0, |c| c.per_sec),
        connect_failed: c.map_or(0, |c| c.failed),
        connect_ok: c.map_or(0, |c| c.ok),
        connect_p50_ms: c.map_or(0.0, |c| c.p50_ms),
        connect_p99_ms: c.map_or(0.0, |c| c.p99_ms),
        connect_upgrade_p50_ms: c.map_or(0.0, |c| c.upgrade_p50_ms),
        connect_upgrade_p99_ms: c.map_or(0.0, |c| c.upgrade_p99_ms),
        upgrade_only_per_sec: r.upgrade_only.as_ref().map(|u| u.per_sec),
        upgrade_only_p50_ms: r.upgrade_only.as_ref().map(|u| u.upgrade_p50_ms),
        upgrade_only_p99_ms: r.upgrade_only.as_ref().map(|u| u.upgrade_p99_ms),
        upgrade_only_failed: r.upgrade_only.as_ref().map(|u| u.failed),
        rss_per_conn_kib: r.rss_per_conn_kib,
        anon_per_conn_kib: r.anon_per_conn_kib,
        frames_per_send: r.frames_per_send,
        p99_over_floor: r.p99_over_floor,
        server_cpu_secs: r.server_cpu_secs,
        server_run_wait_secs: r.server_run_wait_secs,
        sustained_rate_per_publisher: r.sweep.as_ref().map(|s| s.sustained_rate),
        deliveries_vs_corecast: None,
        p99_vs_corecast: None,
    }
}

pub fn compare(sc: ScenarioKind, args: &RunArgs, servers: &[ServerKind], with_baseline: bool) -> i32 {
    let m = machine();
    let log_dir = std::env::temp_dir().join(format!("loadtest-{}", std::process::id()));
    let subs = args.subscribers_for(sc);
    eprintln!(
        "compare {}: {} subscribers, {} s, servers {:?}; server on CPU {}, generator on CPU {}",
        sc.name(),
        subs,
        args.seconds,
        servers.iter().map(|s| s.name()).collect::<Vec<_>>(),
        args.server_cpu,
        args.client_cpu
    );
    let base = if with_baseline {
        let n = if sc == ScenarioKind::AiTokens { subs / args.streams.max(1) } else { subs };
        let mut o = args.baseline_opts(n.max(1), args.payload_for(sc));
        o.ks = vec![64];
        if sc == ScenarioKind::AiTokens {
            o.paced_rate = args.tokens_per_sec;
        }
        match baseline::run(&o, "baseline") {
            Ok(b) => Some(b),
            Err(e) => {
                eprintln!("baseline failed: {e}");
                None
            }
        }
    } else {
        None
    };
    let mut runs = Vec::new();
    for &k in servers {
        if sc == ScenarioKind::Sse {
            // SSE against WebSocket fan-out: the same publisher, topic and payloads; a server
            // with SSE (corecast, nchan) gives two rows, any other its WebSocket fan-out.
            let mut ws = scenarios::run_one(ScenarioKind::Fanout, k, args, base.as_ref(), log_dir.clone());
            if k.has_sse() {
                ws.server = format!("{}-ws", k.name());
                runs.push(ws);
                let mut sse = scenarios::run_one(ScenarioKind::Sse, k, args, base.as_ref(), log_dir.clone());
                sse.server = format!("{}-sse", k.name());
                runs.push(sse);
            } else {
                runs.push(ws);
            }
            continue;
        }
        let r = scenarios::run_one(sc, k, args, base.as_ref(), log_dir.clone());
        runs.push(r);
    }
    let mut rows: Vec<Row> = runs.iter().map(row).collect();
    // The reference row: corecast's (corecast-ws in `compare sse`).
    let cc = rows.iter().find(|r| r.server.starts_with("corecast") && r.ok).map(|r| (r.deliveries_per_sec, r.p99_ms));
    if let Some((d, p)) = cc {
        for r in &mut rows {
            if r.ok {
                r.deliveries_vs_corecast = (d > 0.0).then(|| r.deliveries_per_sec / d);
                r.p99_vs_corecast = (p > 0.0).then(|| r.p99_ms / p);
            }
        }
    }
    let table = table_text(sc, &rows, base.as_ref());
    println!("{table}");
    let doc = CompareDoc {
        scenario: sc.name().into(),
        machine: &m,
        subscribers: subs,
        seconds: args.seconds,
        baseline: base.as_ref().map(|b| BaselineBrief {
            subscribers: b.subscribers,
            us_per_send: b.us_per_send,
            floor_ms: b.floor_ms,
            generator_ceiling_per_sec: b.generator_ceiling_per_sec,
            generator_ceiling_cpu: b.generator_ceiling_cpu,
            generator_bound: b.generator_bound,
            generator_per_cpu_sec: b.generator_per_cpu_sec,
        }),
        results: rows,
        runs: &runs,
        baseline_detail: base.as_ref(),
    };
    if let Some(p) = &args.json {
        report::write_json(p, &doc);
        eprintln!("wrote {}", p.display());
    }
    if !args.no_report {
        let dir = report::run_dir(args.out.as_deref());
        let stem = format!("compare-{}-{}", sc.name(), report::stamp());
        report::write_json(&dir.join(format!("{stem}.json")), &doc);
        let mut charts = Vec::new();
        let lat: Vec<(String, Vec<(f64, f64)>)> = runs
            .iter()
            .filter_map(|r| {
                let l = r.headline_phase()?.percentile_ladder();
                (!l.is_empty()).then(|| (r.server.clone(), l))
            })
            .chain(base.iter().filter_map(|b| {
                // The raw sender's paced run (ai-tokens) or else its one-frame-per-send run.
                let r = b
                    .runs
                    .iter()
                    .find(|r| r.target_rate.is_some())
                    .or_else(|| b.runs.iter().find(|r| r.frames_per_send == 1))?;
                let l = r.outcome.percentile_ladder();
                (!l.is_empty()).then(|| (format!("raw {}", r.mode), l))
            }))
            .collect();
        if !lat.is_empty() {
            let name = format!("{stem}-latency.svg");
            std::fs::create_dir_all(&dir).ok();
            let _ = std::fs::write(
                dir.join(&name),
                report::latency_chart(&format!("{}: publish→receive latency", sc.name()), &lat),
            );
            charts.push(name);
        }
        let tp: Vec<(String, Vec<(f64, f64)>)> = runs
            .iter()
            .filter_map(|r| {
                let pts = r.throughput_timeline();
                (!pts.is_empty()).then(|| (r.server.clone(), pts))
            })
            .collect();
        if !tp.is_empty() {
            let name = format!("{stem}-throughput.svg");
            let _ = std::fs::write(
                dir.join(&name),
                report::throughput_chart(&format!("{}: deliveries per second", sc.name()), &tp),
            );
            charts.push(name);
        }
        let mut md = String::new();
        let _ = writeln!(md, "# compare {} ({} subscribers)\n", sc.name(), subs);
        md.push_str(&report::machine_md(&m));
        let _ = writeln!(
            md,
            "\nCommand: `cargo run --release -p loadtest -- compare {} --subscribers {} --seconds {}`\n",
            sc.name(),
            subs,
            args.seconds
        );
        let _ = writeln!(md, "```\n{table}\n```\n");
        if let Some(b) = &base {
            md.push_str(&report::baseline_md(b));
            md.push('\n');
        }
        for r in &runs {
            if let Some(e) = &r.error {
                let _ = writeln!(md, "- {}: {e}", r.server);
            }
            for n in &r.notes {
                let _ = writeln!(md, "- {}: {n}", r.server);
            }
        }
        for c in &charts {
            let _ = writeln!(md, "\n![]({c})");
        }
        let p: PathBuf = dir.join(format!("{stem}.md"));
        let _ = std::fs::create_dir_all(&dir);
        let _ = std::fs::write(&p, md);
        eprintln!("results: {}", p.display());
    }
    let _ = std::fs::remove_dir_all(&log_dir);
    if runs.iter().any(|r| r.server.starts_with("corecast") && !r.ok) {
        1
    } else {
        0
    }
}

fn note(r: &Row) -> String {
    if let Some(e) = &r.error {
        let e = e.lines().next().unwrap_or("");
        format!("FAILED: {}", &e[..e.floor_char_boundary(90)])
    } else if r.closed > 0 {
        format!("{} closed", r.closed)
    } else {
        String::new()
    }
}

/// connect-storm's table: the upgrade-only pass (connect → 101, no join sent) and the pass
/// with the protocol's join (connect → joined, and its connect → 101 part).
fn connect_table(rows: &[Row]) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{:<12} {:>10} {:>7} {:>8} {:>8} {:>12} {:>7} {:>8} {:>8} {:>8} {:>8} {:>7} {:>9} {:>9} {:>11}  note",
        "server",
        "upgrade/s",
        "×cc",
        "p50 ms",
        "p99 ms",
        "upg+join/s",
        "×cc",
        "101 p50",
        "101 p99",
        "join p50",
        "join p99",
        "failed",
        "KiB/conn",
        "anon KiB",
        "srv µs/conn"
    );
    let cc = rows.iter().find(|r| r.server.starts_with("corecast") && r.ok);
    let ratio = |v: f64, c: Option<f64>| c.filter(|c| *c > 0.0).map_or("–".to_string(), |c| format!("{:.2}", v / c));
    for r in rows {
        let up = r.upgrade_only_per_sec.unwrap_or(0.0);
        let _ = writeln!(
            s,
            "{:<12} {:>10} {:>7} {:>8.2} {:>8.2} {:>12} {:>7} {:>8.2} {:>8.2} {:>8.2} {:>8.2} {:>7} {:>9} {:>9} {:>11}  {}",
            r.server,
            si(up),
            if r.ok { ratio(up, cc.and_then(|c| c.upgrade_only_per_sec)) } else { "–".into() },
            r.upgrade_only_p50_ms.unwrap_or(0.0),
            r.upgrade_only_p99_ms.unwrap_or(0.0),
            si(r.connect_per_sec),
            if r.ok { ratio(r.connect_per_sec, cc.map(|c| c.connect_per_sec)) } else { "–".into() },
            r.connect_upgrade_p50_ms,
            r.connect_upgrade_p99_ms,
            r.connect_p50_ms,
            r.connect_p99_ms,
            r.connect_failed + r.upgrade_only_failed.unwrap_or(0),
            r.rss_per_conn_kib.map_or("–".to_string(), |v| format!("{v:.2}")),
            r.anon_per_conn_kib.map_or("–".to_string(), |v| format!("{v:.2}")),
            r.server_cpu_secs
                .filter(|_| r.connect_ok > 0)
                .map_or("–".to_string(), |c| format!("{:.1}", c * 1e6 / r.connect_ok as f64)),
            note(r)
        );
    }
    let _ = write!(
        s,
        "scenario connect-storm: upgrade/s = connect + WebSocket upgrade, done at the 101 (no join sent); \
         upg+join/s = connect + upgrade + the protocol's join (corecast: phx_join → phx_reply; nats: \
         CONNECT+SUB+PING → PONG; Socket.IO: 40 → join → joined; ws, uws: the server's \"joined\"; nchan \
         has no join: joined at the 101), with its connect → 101 (101 p50/p99) and connect → joined \
         (join p50/p99) per connection; ×cc = ÷ corecast's; KiB/conn = server RSS growth per joined \
         connection, anon KiB = the same for anonymous memory only (RssAnon: without code pages); \
         srv µs/conn = server CPU time of the join pass ÷ connections (the kernel's TCP work included)"
    );
    s
}

fn table_text(sc: ScenarioKind, rows: &[Row], base: Option<&BaselineResult>) -> String {
    if sc == ScenarioKind::ConnectStorm {
        return connect_table(rows);
    }
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{:<12} {:>13} {:>7} {:>9} {:>9} {:>7} {:>9} {:>10} {:>9} {:>9} {:>8} {:>9}  note",
        "server",
        "deliveries/s",
        "×cc",
        "p50 ms",
        "p99 ms",
        "×cc",
        "lost",
        "conn/s",
        "KiB/conn",
        "anon KiB",
        "fr/send",
        "p99/floor"
    );
    for r in rows {
        let note = note(r);
        let f = |v: Option<f64>| v.map_or("–".to_string(), |v| format!("{v:.2}"));
        let _ = writeln!(
            s,
            "{:<12} {:>13} {:>7} {:>9.2} {:>9.2} {:>7} {:>9} {:>10} {:>9} {:>9} {:>8} {:>9}  {}",
            r.server,
            si(r.deliveries_per_sec),
            f(r.deliveries_vs_corecast),
            r.p50_ms,
            r.p99_ms,
            f(r.p99_vs_corecast),
            r.lost,
            si(r.connect_per_sec),
            f(r.rss_per_conn_kib),
            f(r.anon_per_conn_kib),
            f(r.frames_per_send),
            f(r.p99_over_floor),
            note
        );
    }
    if let Some(b) = base {
        let _ = writeln!(
            s,
            "{:<12} {:>13} raw sendmsg: {:.2} µs/send → floor {:.2} ms for {} subscribers/shard; generator {}/s measured ({:.0}% CPU), {}/s per generator CPU-second",
            "baseline",
            "",
            b.us_per_send,
            b.floor_ms,
            b.subscribers,
            si(b.generator_ceiling_per_sec),
            b.generator_ceiling_cpu * 100.0,
            si(b.generator_per_cpu_sec)
        );
    }
    let _ = write!(
        s,
        "scenario {}: ×cc = this server's value ÷ {}'s; deliveries/s {}",
        sc.name(),
        if sc == ScenarioKind::Sse { "corecast-ws" } else { "corecast" },
        if rows.iter().any(|r| r.sustained_rate_per_publisher.is_some()) {
            "= sustained (sweep)"
        } else {
            "= measured at the scenario's load"
        }
    );
    s
}
