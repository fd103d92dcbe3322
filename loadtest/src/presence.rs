//! The presence scenario (corecast only: the peers have no Phoenix presence).
//!
//! N members and a few observers join one room (`realtime:t0`). Step 1: every member tracks its
//! own key (`m<client index>`) at `--rate` per second; step 2: every member leaves (closes its
//! socket, or `--leave untrack`) at the same rate. Observers join with presence enabled and note
//! when each key first appears in a `presence_diff` (joins in step 1, leaves in step 2); workers
//! report when each member's action went out; here the two are matched by key: diff delivery
//! latency = observer receive time − member send time (one `CLOCK_MONOTONIC` for all processes).
//!
//! Also per step: diff frames per observer against events (the coalescing factor), track/untrack
//! reply latency and refusals, how late the members acted against their schedule, and server CPU
//! (utime + stime from `/proc/<pid>/stat` before and after the step) per presence event.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::coord::{ms, si, Fleet};
use crate::scenarios::{LeaveVia, RunArgs, RunResult};
use crate::servers::Running;
use crate::sys;
use crate::worker::presence::{Action, StepResult, StepSpec};
use crate::worker::{self, Cmd, Ev};

/// One step (track, or leave) merged over workers.
#[derive(Clone, Debug, Serialize)]
pub struct StepSummary {
    pub step: String,
    pub target_rate: f64,
    /// Member actions sent, and the rate they went out at (first to last send).
    pub sent: u64,
    pub sent_per_sec: f64,
    pub skipped: u64,
    /// Track/untrack replies: ok, refused (with the first reasons).
    pub acked_ok: u64,
    pub refused: u64,
    pub refusal_reasons: Vec<String>,
    /// Presence events the server had to publish: joins accepted, or leaves.
    pub events: u64,
    pub observers: u64,
    /// (key, observer) pairs expected, seen, missing; repeats; keys of the wrong kind.
    pub expected: u64,
    pub seen: u64,
    pub missing: u64,
    pub repeated: u64,
    pub unexpected: u64,
    /// Diff frames each observer got (mean) and events per diff frame (coalescing factor).
    pub diffs_per_observer: f64,
    pub events_per_diff: f64,
    pub diff_bytes_per_observer: f64,
    /// Diff frames received by listening members (--members-listen), all together.
    pub member_diffs: u64,
    /// Diff delivery latency (member send → observer receive), ms.
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
    pub mean_ms: f64,
    pub latency_ladder: Vec<(f64, f64)>,
    /// Reply latency of track/untrack pushes (send → phx_reply), ms.
    pub ack_p50_ms: f64,
    pub ack_p99_ms: f64,
    /// How late members acted against their schedule (generator lag), ms.
    pub lag_p99_ms: f64,
    pub lag_max_ms: f64,
    /// Seconds from the step's start to the last diff (or the end of the wait).
    pub active_secs: f64,
    pub server_cpu_secs: Option<f64>,
    /// Seconds the server was runnable but waited for its CPU (taken by other processes).
    pub server_run_wait_secs: Option<f64>,
    /// Server CPU µs per presence event.
    pub server_cpu_us_per_event: Option<f64>,
    pub generator_cpu_secs: f64,
    /// Connections the server closed during the step.
    pub closed: u64,
    pub errors: Vec<String>,
}

#[derive(Clone, Debug, Serialize)]
pub struct PresenceSummary {
    pub members: usize,
    pub observers: usize,
    pub members_listen: bool,
    pub leave: LeaveVia,
    pub diff_window_ms: u64,
    pub rate: f64,
    pub steps: Vec<StepSummary>,
    /// Server RSS growth over the track step ÷ members tracked, KiB (state held per entry).
    pub rss_per_entry_kib: Option<f64>,
    /// Server CPU of both steps ÷ all events, µs.
    pub server_cpu_us_per_event: Option<f64>,
}

/// Default joins (and leaves) per second.
pub const DEFAULT_RATE: f64 = 1000.0;

pub fn run(fleet: &mut Fleet, srv: &Running, args: &RunArgs, r: &mut RunResult, label: &str) -> Result<(), String> {
    let rate = args.rate.unwrap_or(DEFAULT_RATE).max(0.1);
    let members = r.subscribers;
    let observers = args.observers.max(1);
    let mut sum = PresenceSummary {
        members,
        observers,
        members_listen: args.members_listen,
        leave: args.leave,
        diff_window_ms: args.presence_diff_ms,
        rate,
        steps: Vec::new(),
        rss_per_entry_kib: None,
        server_cpu_us_per_event: None,
    };
    let leave = match args.leave {
        LeaveVia::Close => Action::Close,
        LeaveVia::Untrack => Action::Untrack,
    };
    let drain = Duration::from_secs_f64(args.drain_secs);
    let rss0 = srv.rss_kib();
    let mut result = Ok(());
    for (step, action) in [(1u32, Action::Track), (2, leave)] {
        let spec = StepSpec {
            step,
            action,
            start_ns: 0,
            rate,
            payload: args.payload_for(crate::scenarios::ScenarioKind::Presence),
        };
        match run_step(fleet, srv, spec, members, label, drain) {
            Ok(s) => {
                if step == 1 {
                    if let (Some(a), Some(b)) = (rss0, srv.rss_kib()) {
                        sum.rss_per_entry_kib = (s.events > 0).then(|| (b as f64 - a as f64) / s.events as f64);
                    }
                }
                print_step(&s, label, fleet.quiet());
                sum.steps.push(s);
            }
            Err(e) => {
                result = Err(e);
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    let cpu: Option<f64> = sum.steps.iter().map(|s| s.server_cpu_secs).sum();
    let events: u64 = sum.steps.iter().map(|s| s.events).sum();
    sum.server_cpu_us_per_event = cpu.filter(|_| events > 0).map(|c| c * 1e6 / events as f64);
    for s in &sum.steps {
        if s.refused > 0 {
            r.notes.push(format!(
                "{}: {} presence calls refused (first: {:?})",
                s.step,
                s.refused,
                s.refusal_reasons.first()
            ));
        }
        if s.missing > 0 {
            r.notes.push(format!("{}: {} (key, observer) diffs never arrived", s.step, s.missing));
        }
        if s.closed > 0 {
            r.notes.push(format!("{}: the server closed {} connections", s.step, s.closed));
        }
        if s.lag_p99_ms > (sum.diff_window_ms as f64).max(10.0) || s.sent_per_sec < 0.9 * s.target_rate {
            r.notes.push(format!(
                "{}: members acted up to {:.1} ms late (p99 {:.1} ms; {}/s of {}/s): the generator was busy \
                 (latency counts from the actual send, so only the rate suffers)",
                s.step,
                s.lag_max_ms,
                s.lag_p99_ms,
                si(s.sent_per_sec),
                si(s.target_rate)
            ));
        }
    }
    r.presence = Some(sum);
    result
}

fn run_step(
    fleet: &mut Fleet,
    srv: &Running,
    mut spec: StepSpec,
    members: usize,
    label: &str,
    drain: Duration,
) -> Result<StepSummary, String> {
    let nw = fleet.workers();
    let name = match spec.action {
        Action::Track => "track",
        Action::Untrack => "leave (untrack)",
        Action::Close => "leave (close)",
    };
    let cpu0 = srv.cpu_secs();
    let wait0 = srv.run_wait_secs();
    // A common start a little ahead, so that every worker's schedule begins at the same instant.
    spec.start_ns = sys::now_ns() + 100_000_000;
    let t0 = Instant::now() + Duration::from_millis(100);
    fleet.send(&Cmd::PresenceStep(spec.clone()));
    let mut sent = vec![0u64; nw];
    let mut seen = vec![0u64; nw];
    let mut diffs = vec![0u64; nw];
    let mut done = vec![false; nw];
    // A worker's `sent` count is only final in a tick that came after its PubDone: judging
    // completion on an older tick would end the step before the last diffs arrived.
    let mut final_tick = vec![false; nw];
    let mut last_progress = Instant::now();
    let mut last_seen = 0u64;
    let mut all_sent: Option<Instant> = None;
    let mut last_print = Instant::now();
    let schedule = Duration::from_secs_f64(members as f64 / spec.rate);
    let hard = schedule + drain + Duration::from_secs(60);
    loop {
        if let Some((w, ev)) = fleet.recv(Duration::from_millis(50))? {
            match ev {
                Ev::Tick { phase, delivered, uniq, published, .. } if phase == spec.step => {
                    sent[w] = published;
                    seen[w] = uniq;
                    diffs[w] = delivered;
                    final_tick[w] = done[w];
                }
                Ev::PubDone { phase, .. } if phase == spec.step => done[w] = true,
                _ => {}
            }
        }
        let seen_total: u64 = seen.iter().sum();
        if seen_total != last_seen {
            last_seen = seen_total;
            last_progress = Instant::now();
        }
        if all_sent.is_none() && done.iter().all(|d| *d) {
            all_sent = Some(Instant::now());
        }
        let sent_total: u64 = sent.iter().sum();
        if !fleet.quiet() && last_print.elapsed() >= Duration::from_secs(1) {
            last_print = Instant::now();
            eprintln!(
                "[{:4.0}s] {label} {name}: sent {} of {members}, keys seen by observers {}, diffs {}",
                t0.elapsed().as_secs_f64().max(0.0),
                sent_total,
                seen_total,
                diffs.iter().sum::<u64>()
            );
        }
        if let Some(a) = all_sent {
            // Done when every observer saw every key (a refused track never shows up: then the
            // stall ends the wait).
            let stalled = last_progress.elapsed() > Duration::from_secs(2) && a.elapsed() > Duration::from_secs(2);
            let counted = final_tick.iter().all(|f| *f);
            if stalled || a.elapsed() > drain || (counted && seen_total > 0 && complete(seen_total, sent_total, fleet))
            {
                break;
            }
        }
        if t0.elapsed() > hard {
            return Err(format!("presence {name}: step did not finish"));
        }
    }
    let active_secs = last_progress.saturating_duration_since(t0).as_secs_f64().max(1e-3);
    let cpu1 = srv.cpu_secs();
    let wait = wait0.zip(srv.run_wait_secs()).map(|(a, b)| b - a);
    fleet.send(&Cmd::PresenceEnd { step: spec.step });
    let mut results: Vec<Option<StepResult>> = vec![None; nw];
    let t1 = Instant::now();
    while results.iter().any(|r| r.is_none()) {
        if t1.elapsed() > Duration::from_secs(60) {
            return Err("workers did not report presence results".into());
        }
        if let Some((w, Ev::PresenceResult(r))) = fleet.recv(Duration::from_secs(1))? {
            if r.step == spec.step {
                results[w] = Some(r);
            }
        }
    }
    let results: Vec<StepResult> = results.into_iter().map(|r| r.expect("checked")).collect();
    let mut s = merge(name, &spec, results, active_secs, cpu0.zip(cpu1).map(|(a, b)| b - a));
    s.server_run_wait_secs = wait;
    Ok(s)
}

/// Whether the observers' key sightings reached actions sent × observers.
fn complete(seen: u64, sent: u64, fleet: &Fleet) -> bool {
    let obs = match fleet.layout {
        crate::layout::Layout::Presence { observers, .. } => observers as u64,
        _ => 1,
    };
    seen >= sent * obs
}

fn merge(name: &str, spec: &StepSpec, results: Vec<StepResult>, active_secs: f64, cpu: Option<f64>) -> StepSummary {
    let mut send_at: HashMap<u32, u64> = HashMap::new();
    let mut refused: std::collections::HashSet<u32> = Default::default();
    let mut ack = worker::new_hist();
    let mut lag = worker::new_hist();
    let mut lat = worker::new_hist();
    let mut s = StepSummary {
        step: name.into(),
        target_rate: spec.rate,
        sent: 0,
        sent_per_sec: 0.0,
        skipped: 0,
        acked_ok: 0,
        refused: 0,
        refusal_reasons: Vec::new(),
        events: 0,
        observers: 0,
        expected: 0,
        seen: 0,
        missing: 0,
        repeated: 0,
        unexpected: 0,
        diffs_per_observer: 0.0,
        events_per_diff: 0.0,
        diff_bytes_per_observer: 0.0,
        member_diffs: 0,
        p50_ms: 0.0,
        p90_ms: 0.0,
        p99_ms: 0.0,
        p999_ms: 0.0,
        max_ms: 0.0,
        mean_ms: 0.0,
        latency_ladder: Vec::new(),
        ack_p50_ms: 0.0,
        ack_p99_ms: 0.0,
        lag_p99_ms: 0.0,
        lag_max_ms: 0.0,
        active_secs,
        server_cpu_secs: cpu,
        server_run_wait_secs: None,
        server_cpu_us_per_event: None,
        generator_cpu_secs: 0.0,
        closed: 0,
        errors: Vec::new(),
    };
    let (mut first, mut last) = (u64::MAX, 0u64);
    let (mut diffs, mut diff_bytes) = (0u64, 0u64);
    for r in &results {
        for &(k, t) in &r.sends {
            send_at.insert(k, t);
            first = first.min(t);
            last = last.max(t);
        }
        refused.extend(r.refused.iter().copied());
        s.skipped += r.skipped;
        s.acked_ok += r.acked_ok;
        for e in &r.refusal_reasons {
            if s.refusal_reasons.len() < 8 {
                s.refusal_reasons.push(e.clone());
            }
        }
        s.observers += r.observers;
        s.repeated += r.repeated;
        s.unexpected += r.unexpected;
        diffs += r.observer_diffs;
        diff_bytes += r.observer_diff_bytes;
        s.member_diffs += r.member_diffs;
        s.closed += r.closed;
        s.generator_cpu_secs += r.cpu_ns as f64 / 1e9;
        worker::hist_add_pairs(&mut ack, &r.ack_hist);
        worker::hist_add_pairs(&mut lag, &r.lag_hist);
        for e in &r.errors {
            if s.errors.len() < 12 {
                s.errors.push(e.clone());
            }
        }
    }
    s.sent = send_at.len() as u64;
    s.refused = refused.len() as u64;
    s.sent_per_sec = if last > first { (s.sent.saturating_sub(1)) as f64 / ((last - first) as f64 / 1e9) } else { 0.0 };
    // A refused track publishes nothing; every leave of a tracked member does.
    s.events = s.sent - if spec.action == Action::Track { s.refused } else { 0 };
    s.expected = s.events * s.observers;
    for r in &results {
        for &(_obs, k, t) in &r.recvs {
            if let Some(&sent) = send_at.get(&k) {
                s.seen += 1;
                let _ = lat.record((t.saturating_sub(sent) / 1000).clamp(1, 3_600_000_000));
            } else {
                s.unexpected += 1;
            }
        }
    }
    s.missing = s.expected.saturating_sub(s.seen);
    if s.missing > 0 {
        // Which keys, and how many observers missed each: one key missed by every observer
        // was never in a diff; a whole diff missed by one observer is a delivery problem.
        let mut seen_by: std::collections::HashMap<u32, u64> = std::collections::HashMap::new();
        for r in &results {
            for &(_obs, k, _) in &r.recvs {
                *seen_by.entry(k).or_default() += 1;
            }
        }
        let mut short: Vec<(u32, u64)> = send_at
            .keys()
            .filter(|k| !refused.contains(k))
            .map(|&k| (k, s.observers - seen_by.get(&k).copied().unwrap_or(0).min(s.observers)))
            .filter(|&(_, n)| n > 0)
            .collect();
        short.sort_unstable();
        let list: Vec<String> = short.iter().take(12).map(|(k, n)| format!("member {k} ({n} observers)")).collect();
        s.errors.push(format!(
            "{} keys missed: {}{}",
            short.len(),
            list.join(", "),
            if short.len() > 12 { ", …" } else { "" }
        ));
    }
    if s.observers > 0 {
        s.diffs_per_observer = diffs as f64 / s.observers as f64;
        s.diff_bytes_per_observer = diff_bytes as f64 / s.observers as f64;
    }
    if s.diffs_per_observer > 0.0 {
        s.events_per_diff = s.events as f64 / s.diffs_per_observer;
    }
    if !lat.is_empty() {
        s.p50_ms = ms(lat.value_at_quantile(0.5));
        s.p90_ms = ms(lat.value_at_quantile(0.9));
        s.p99_ms = ms(lat.value_at_quantile(0.99));
        s.p999_ms = ms(lat.value_at_quantile(0.999));
        s.max_ms = ms(lat.max());
        s.mean_ms = lat.mean() / 1000.0;
        let qs = [0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99, 0.995, 0.999, 0.9995, 0.9999, 0.99999];
        s.latency_ladder = qs.iter().map(|&q| (q, ms(lat.value_at_quantile(q)))).collect();
        s.latency_ladder.push((1.0, ms(lat.max())));
    }
    if !ack.is_empty() {
        s.ack_p50_ms = ms(ack.value_at_quantile(0.5));
        s.ack_p99_ms = ms(ack.value_at_quantile(0.99));
    }
    if !lag.is_empty() {
        s.lag_p99_ms = ms(lag.value_at_quantile(0.99));
        s.lag_max_ms = ms(lag.max());
    }
    s.server_cpu_us_per_event = cpu.filter(|_| s.events > 0).map(|c| c * 1e6 / s.events as f64);
    s
}

fn print_step(s: &StepSummary, label: &str, quiet: bool) {
    if quiet {
        return;
    }
    eprintln!(
        "{label} {}: {} events, diff latency p50 {:.2} ms p99 {:.2} ms, {:.1} events per diff, missing {}, refused {}",
        s.step, s.events, s.p50_ms, s.p99_ms, s.events_per_diff, s.missing, s.refused
    );
}

/// Lines for the terminal summary.
pub fn summary_text(p: &PresenceSummary) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "  room: {} members + {} observers, {} joins/s then leaves/s ({}), diff window {} ms{}",
        p.members,
        p.observers,
        si(p.rate),
        match p.leave {
            LeaveVia::Close => "close",
            LeaveVia::Untrack => "untrack",
        },
        p.diff_window_ms,
        if p.members_listen { ", members listen" } else { "" }
    );
    for s in &p.steps {
        let _ = writeln!(
            out,
            "  {}: {} sent ({}/s), {} events; diff latency ms p50 {:.2} p90 {:.2} p99 {:.2} p99.9 {:.2} max {:.2}",
            s.step,
            s.sent,
            si(s.sent_per_sec),
            s.events,
            s.p50_ms,
            s.p90_ms,
            s.p99_ms,
            s.p999_ms,
            s.max_ms
        );
        let _ = writeln!(
            out,
            "    {:.1} diffs per observer = {:.1} events per diff ({:.0} bytes each); {} diffs to members; seen {} of {} (missing {}, repeated {}, unexpected {}); reply ms {}; refused {}; closed {}",
            s.diffs_per_observer,
            s.events_per_diff,
            s.diff_bytes_per_observer / s.diffs_per_observer.max(1.0),
            s.member_diffs,
            s.seen,
            s.expected,
            s.missing,
            s.repeated,
            s.unexpected,
            if s.acked_ok > 0 { format!("p50 {:.2} p99 {:.2}", s.ack_p50_ms, s.ack_p99_ms) } else { "–".into() },
            s.refused,
            s.closed
        );
        let _ = writeln!(
            out,
            "    server CPU {} s = {} µs per event (waited {} s for its CPU); generator CPU {:.2} s; member schedule lag p99 {:.2} ms",
            s.server_cpu_secs.map_or("–".into(), |c| format!("{c:.2}")),
            s.server_cpu_us_per_event.map_or("–".into(), |c| format!("{c:.1}")),
            s.server_run_wait_secs.map_or("–".into(), |c| format!("{c:.2}")),
            s.generator_cpu_secs,
            s.lag_p99_ms
        );
    }
    if let Some(c) = p.server_cpu_us_per_event {
        let _ = writeln!(out, "  server CPU per presence event (both steps): {c:.1} µs");
    }
    if let Some(k) = p.rss_per_entry_kib {
        let _ = writeln!(out, "  server RSS per tracked entry: {k:.2} KiB");
    }
    out
}

/// Markdown section for the run report.
pub fn markdown(p: &PresenceSummary) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "\n## Presence\n\n{} members + {} observers in one room, {} joins/s then {} leaves/s ({}), \
         diff window {} ms{}.\n",
        p.members,
        p.observers,
        si(p.rate),
        si(p.rate),
        match p.leave {
            LeaveVia::Close => "socket closed",
            LeaveVia::Untrack => "untrack",
        },
        p.diff_window_ms,
        if p.members_listen { ", members listen to presence too" } else { "" }
    );
    let _ = writeln!(
        s,
        "| step | sent (/s) | events | diff latency ms p50 / p90 / p99 / p99.9 / max | diffs per observer | events per diff | diffs to members | seen / expected | refused | reply p99 ms | server CPU µs/event | server waited for CPU s | lag p99 ms |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|"
    );
    for st in &p.steps {
        let _ = writeln!(
            s,
            "| {} | {} ({}) | {} | {:.2} / {:.2} / **{:.2}** / {:.2} / {:.2} | {:.1} | **{:.1}** | {} | {} / {} | {} | {} | **{}** | {} | {:.2} |",
            st.step,
            st.sent,
            si(st.sent_per_sec),
            st.events,
            st.p50_ms,
            st.p90_ms,
            st.p99_ms,
            st.p999_ms,
            st.max_ms,
            st.diffs_per_observer,
            st.events_per_diff,
            si(st.member_diffs as f64),
            st.seen,
            st.expected,
            st.refused,
            if st.acked_ok > 0 { format!("{:.2}", st.ack_p99_ms) } else { "–".into() },
            st.server_cpu_us_per_event.map_or("–".into(), |c| format!("{c:.1}")),
            st.server_run_wait_secs.map_or("–".into(), |c| format!("{c:.2}")),
            st.lag_p99_ms
        );
    }
    if let Some(c) = p.server_cpu_us_per_event {
        let _ = writeln!(s, "\nServer CPU per presence event (both steps): **{c:.1} µs**.");
    }
    if let Some(k) = p.rss_per_entry_kib {
        let _ = writeln!(s, "Server RSS per tracked entry: {k:.2} KiB.");
    }
    for st in &p.steps {
        for e in st.refusal_reasons.iter().chain(st.errors.iter()).take(6) {
            let _ = writeln!(s, "- {}: `{}`", st.step, e.replace('`', "'"));
        }
    }
    s
}
