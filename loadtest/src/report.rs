//! Result files: a markdown summary, the JSON of everything measured, and hand-written SVG charts
//! (latency percentile distribution, deliveries per second over time).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::baseline::BaselineResult;
use crate::coord::si;
use crate::scenarios::{Machine, RunResult};
use crate::servers;
use crate::sys;

/// `tuning/runs/<YYYY-MM-DD>-<hostname>/` under the workspace root, or `--out`.
pub fn run_dir(out: Option<&Path>) -> PathBuf {
    match out {
        Some(p) => p.to_path_buf(),
        None => {
            let (d, _) = sys::utc_date_time();
            servers::workspace_root().join("tuning").join("runs").join(format!("{d}-{}", sys::hostname()))
        }
    }
}

pub fn stamp() -> String {
    sys::utc_date_time().1
}

fn write(path: &Path, text: &str) {
    if let Some(d) = path.parent() {
        let _ = std::fs::create_dir_all(d);
    }
    if let Err(e) = std::fs::write(path, text) {
        eprintln!("could not write {}: {e}", path.display());
    }
}

pub fn write_json<T: Serialize>(path: &Path, v: &T) {
    match serde_json::to_string_pretty(v) {
        Ok(s) => write(path, &(s + "\n")),
        Err(e) => eprintln!("json: {e}"),
    }
}

// ------------------------------------------------------------------ SVG

const COLORS: [&str; 6] = ["#d62728", "#1f77b4", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b"];

pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

fn nice_max(v: f64) -> f64 {
    if v <= 0.0 {
        return 1.0;
    }
    let e = 10f64.powf(v.log10().floor());
    for m in [1.0, 2.0, 2.5, 5.0, 10.0] {
        if m * e >= v {
            return m * e;
        }
    }
    10.0 * e
}

fn fmt_tick(v: f64) -> String {
    if v.abs() >= 1000.0 {
        si(v)
    } else if v.fract() == 0.0 {
        format!("{v:.0}")
    } else if v.abs() >= 1.0 {
        format!("{v:.1}")
    } else if v.abs() >= 0.01 || v == 0.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

/// A line chart. `x_ticks` overrides the x axis labels (value, label); `log_y` plots log10(y).
pub fn line_chart(
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[Series],
    x_ticks: Option<&[(f64, String)]>,
    log_y: bool,
) -> String {
    let (w, h) = (760.0, 420.0);
    let (l, r, t, b) = (80.0, 170.0, 40.0, 50.0);
    let pw = w - l - r;
    let ph = h - t - b;
    let pts = series.iter().flat_map(|s| s.points.iter());
    let xmax = pts.clone().map(|p| p.0).fold(0.0f64, f64::max).max(1e-9);
    let xmin = pts.clone().map(|p| p.0).fold(f64::INFINITY, f64::min).min(xmax);
    let xmin = if xmin.is_finite() { xmin.min(0.0) } else { 0.0 };
    let ty = |y: f64| if log_y { y.max(0.001).log10() } else { y };
    let ymax_raw = pts.clone().map(|p| p.1).fold(0.0f64, f64::max);
    let (ymin_t, ymax_t) = if log_y {
        let lo = pts.clone().map(|p| p.1).filter(|v| *v > 0.0).fold(f64::INFINITY, f64::min);
        let lo = if lo.is_finite() { lo.log10().floor() } else { -1.0 };
        (lo, ymax_raw.max(0.001).log10().ceil().max(lo + 1.0))
    } else {
        (0.0, nice_max(ymax_raw))
    };
    let sx = |x: f64| l + (x - xmin) / (xmax - xmin).max(1e-9) * pw;
    let sy = |y: f64| t + ph - (ty(y) - ymin_t) / (ymax_t - ymin_t).max(1e-9) * ph;
    let mut s = String::new();
    let _ = write!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="12">
<rect width="100%" height="100%" fill="white"/>
<text x="{}" y="22" font-size="15" text-anchor="middle">{}</text>
"#,
        l + pw / 2.0,
        esc(title)
    );
    // y grid
    // Linear: 5 even steps. Log: one line per decade.
    let grid: Vec<f64> = if log_y {
        let (a, b) = (ymin_t.round() as i32, ymax_t.round() as i32);
        (a..=b).map(|e| e as f64).collect()
    } else {
        (0..=5).map(|i| ymin_t + (ymax_t - ymin_t) * i as f64 / 5.0).collect()
    };
    for yt in grid {
        let yv = if log_y { 10f64.powf(yt) } else { yt };
        let py = t + ph - (yt - ymin_t) / (ymax_t - ymin_t).max(1e-9) * ph;
        let _ = writeln!(
            s,
            r##"<line x1="{l}" y1="{py:.1}" x2="{:.1}" y2="{py:.1}" stroke="#ddd"/><text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"##,
            l + pw,
            l - 6.0,
            py + 4.0,
            fmt_tick(yv)
        );
    }
    // x ticks
    let ticks: Vec<(f64, String)> = match x_ticks {
        Some(t) => t.to_vec(),
        None => (0..=6)
            .map(|i| {
                let v = xmin + (xmax - xmin) * i as f64 / 6.0;
                (v, fmt_tick(v))
            })
            .collect(),
    };
    for (v, lab) in ticks {
        let px = sx(v);
        let _ = writeln!(
            s,
            r##"<line x1="{px:.1}" y1="{t}" x2="{px:.1}" y2="{:.1}" stroke="#eee"/><text x="{px:.1}" y="{:.1}" text-anchor="middle">{}</text>"##,
            t + ph,
            t + ph + 18.0,
            esc(&lab)
        );
    }
    let _ = writeln!(
        s,
        r##"<rect x="{l}" y="{t}" width="{pw}" height="{ph}" fill="none" stroke="#333"/>
<text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>
<text x="18" y="{:.1}" text-anchor="middle" transform="rotate(-90 18 {:.1})">{}</text>"##,
        l + pw / 2.0,
        h - 10.0,
        esc(x_label),
        t + ph / 2.0,
        t + ph / 2.0,
        esc(&format!("{y_label}{}", if log_y { " (log)" } else { "" }))
    );
    for (i, se) in series.iter().enumerate() {
        let c = COLORS[i % COLORS.len()];
        if se.points.is_empty() {
            continue;
        }
        let path: Vec<String> = se.points.iter().map(|&(x, y)| format!("{:.1},{:.1}", sx(x), sy(y))).collect();
        let _ = writeln!(s, r#"<polyline fill="none" stroke="{c}" stroke-width="2" points="{}"/>"#, path.join(" "));
        for &(x, y) in &se.points {
            let _ = writeln!(s, r#"<circle cx="{:.1}" cy="{:.1}" r="2.5" fill="{c}"/>"#, sx(x), sy(y));
        }
        let ly = t + 14.0 + 20.0 * i as f64;
        let _ = writeln!(
            s,
            r#"<line x1="{:.1}" y1="{ly:.1}" x2="{:.1}" y2="{ly:.1}" stroke="{c}" stroke-width="3"/><text x="{:.1}" y="{:.1}">{}</text>"#,
            l + pw + 12.0,
            l + pw + 32.0,
            l + pw + 38.0,
            ly + 4.0,
            esc(&se.name)
        );
    }
    s.push_str("</svg>\n");
    s
}

/// Percentile plot: x = log10(1 / (1 − q)) so that 90, 99, 99.9 … are evenly spaced.
pub fn latency_chart(title: &str, series: &[(String, Vec<(f64, f64)>)]) -> String {
    let xq = |q: f64| (1.0 / (1.0 - q.min(0.99999))).log10();
    let s: Vec<Series> = series
        .iter()
        .map(|(n, pts)| Series { name: n.clone(), points: pts.iter().map(|&(q, v)| (xq(q), v)).collect() })
        .collect();
    let ticks: Vec<(f64, String)> = [
        (0.0, "p0"),
        (0.5, "p50"),
        (0.9, "p90"),
        (0.99, "p99"),
        (0.999, "p99.9"),
        (0.9999, "p99.99"),
        (0.99999, "max"),
    ]
    .iter()
    .map(|&(q, l)| (xq(q), l.to_string()))
    .collect();
    line_chart(title, "percentile", "latency ms", &s, Some(&ticks), true)
}

pub fn throughput_chart(title: &str, series: &[(String, Vec<(f64, f64)>)]) -> String {
    let s: Vec<Series> = series.iter().map(|(n, p)| Series { name: n.clone(), points: p.clone() }).collect();
    line_chart(title, "seconds", "deliveries/s", &s, None, false)
}

// ------------------------------------------------------------------ markdown

fn opt(v: Option<f64>, digits: usize) -> String {
    v.map_or("–".into(), |v| format!("{v:.digits$}"))
}

pub fn machine_md(m: &Machine) -> String {
    format!(
        "Machine: `{}`, {} CPUs, kernel {}, load average at start `{}`, {} UTC. Server pinned to one \
         CPU, generator on another. Figures from a shared 2-core VM are noisy: compare ratios \
         measured in the same run.\n",
        m.hostname, m.cpus, m.kernel, m.loadavg_at_start, m.date_utc
    )
}

pub fn run_md(r: &RunResult, m: &Machine, charts: &[String]) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "# {} on {}\n", r.scenario, r.server);
    s.push_str(&machine_md(m));
    s.push('\n');
    if let Some(e) = &r.error {
        let _ = writeln!(s, "**Error:** {e}\n");
    }
    let _ = writeln!(s, "| metric | value |\n|---|---|");
    let _ =
        writeln!(s, "| subscribers / clients / worker processes | {} / {} / {} |", r.subscribers, r.clients, r.workers);
    let _ = writeln!(s, "| payload bytes | {} |", r.payload);
    if let Some(c) = &r.connect {
        let _ = writeln!(
            s,
            "| connect+join | {} ok, {} failed, {:.2} s, **{}/s**, p50 {:.1} ms, p99 {:.1} ms |",
            c.ok,
            c.failed,
            c.secs,
            si(c.per_sec),
            c.p50_ms,
            c.p99_ms
        );
    }
    let _ = writeln!(
        s,
        "| server RSS before / after connect / end (KiB) | {} / {} / {} |",
        r.rss_before_kib.map_or("–".into(), |v| v.to_string()),
        r.rss_after_kib.map_or("–".into(), |v| v.to_string()),
        r.rss_end_kib.map_or("–".into(), |v| v.to_string())
    );
    let _ = writeln!(s, "| server RSS per connection (KiB) | **{}** |", opt(r.rss_per_conn_kib, 2));
    let _ = writeln!(
        s,
        "| anonymous RSS before / after connect (KiB); per connection | {} / {}; **{}** |",
        r.anon_before_kib.map_or("–".into(), |v| v.to_string()),
        r.anon_after_kib.map_or("–".into(), |v| v.to_string()),
        opt(r.anon_per_conn_kib, 2)
    );
    if let Some(p) = r.headline_phase() {
        let _ = writeln!(
            s,
            "| published | {} msgs ({}/s over {:.1} s{}) |",
            p.published,
            si(p.publish_per_sec),
            p.publish_secs,
            p.target_rate.map_or(", as fast as accepted".into(), |r| format!(", target {}/s per publisher", si(r)))
        );
        let _ =
            writeln!(s, "| delivered | {} of {} expected, **{}/s** |", p.uniq, p.expected, si(p.deliveries_per_sec));
        let _ = writeln!(
            s,
            "| latency ms p50 / p90 / p99 / p99.9 / max | {:.2} / {:.2} / **{:.2}** / {:.2} / {:.2} |",
            p.p50_ms, p.p90_ms, p.p99_ms, p.p999_ms, p.max_ms
        );
        let _ = writeln!(
            s,
            "| lost / duplicated / reordered | {} ({} subscribers, max {} each) / {} / {} |",
            p.lost, p.subs_with_loss, p.max_lost_per_sub, p.dup, p.reordered
        );
        let _ = writeln!(s, "| connections closed during the phase | {} |", p.closed);
        let _ = writeln!(
            s,
            "| generator CPU during the phase | {:.2} s ({:.0}% of one core) |",
            p.generator_cpu_secs,
            100.0 * p.generator_cpu_secs / p.active_secs.max(1e-3)
        );
    }
    if let Some(f) = r.frames_per_send {
        let _ = writeln!(s, "| corecast frames per sendmsg (coalescing) | **{f:.2}** |");
    }
    if let Some(c) = r.server_cpu_secs {
        let _ = writeln!(s, "| server CPU seconds | {c:.2} |");
    }
    if let Some(w) = r.server_run_wait_secs {
        let _ = writeln!(s, "| seconds the server waited for its CPU (taken by other processes) | {w:.2} |");
    }
    if let Some(c) = r.idle_closed {
        let _ = writeln!(s, "| connections closed while idle | {c} |");
    }
    if let (Some(f), Some(us)) = (r.floor_ms, r.per_send_us) {
        let _ = writeln!(s, "| latency floor (subscribers per stream × {us:.2} µs per send, 1 shard) | {f:.2} ms |");
        let _ = writeln!(s, "| p99 ÷ floor | **{}** |", opt(r.p99_over_floor, 2));
    }
    if let Some(sw) = &r.sweep {
        let _ = writeln!(
            s,
            "\n## Sweep (pass = nothing lost or closed, publisher on schedule, p99 ≤ {} ms)\n",
            sw.p99_limit_ms
        );
        let _ = writeln!(
            s,
            "Sustained: **{} msgs/s per publisher = {} deliveries/s**.\n",
            si(sw.sustained_rate),
            si(sw.sustained_deliveries_per_sec)
        );
        let _ = writeln!(
            s,
            "| rate/publisher | deliveries/s | p99 ms | lost | frames/send | generator CPU | result |\n|---|---|---|---|---|---|---|"
        );
        for st in &sw.steps {
            let _ = writeln!(
                s,
                "| {} | {} | {:.2} | {} | {} | {:.0}% | {} |",
                si(st.rate_per_publisher),
                si(st.deliveries_per_sec),
                st.p99_ms,
                st.lost,
                opt(st.frames_per_send, 2),
                st.generator_cpu * 100.0,
                if st.pass { "pass".to_string() } else { format!("fail: {}", st.why) }
            );
        }
    }
    if let Some(p) = &r.presence {
        s.push_str(&crate::presence::markdown(p));
    }
    if let Some(h) = &r.history {
        s.push_str(&crate::history::markdown(h));
    }
    if !r.notes.is_empty() {
        s.push_str("\nNotes:\n");
        for n in &r.notes {
            let _ = writeln!(s, "- {n}");
        }
    }
    if let Some(p) = r.headline_phase() {
        if !p.errors.is_empty() {
            s.push_str("\nFirst errors reported by the generator:\n");
            for e in &p.errors {
                let _ = writeln!(s, "- `{}`", e.replace('`', "'"));
            }
        }
    }
    for c in charts {
        let _ = writeln!(s, "\n![]({c})");
    }
    s
}

pub fn baseline_md(b: &BaselineResult) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "Raw-socket baseline ({} subscribers, sender thread pinned to the server CPU, blocking \
         `sendmsg`, the same frames a corecast subscriber receives):\n",
        b.subscribers
    );
    let _ = writeln!(
        s,
        "| mode | µs/send (sender CPU) | sender busy | deliveries/s | p50 ms | p99 ms | lost | round p99 ms |\n|---|---|---|---|---|---|---|---|"
    );
    for r in &b.runs {
        let _ = writeln!(
            s,
            "| {} | {:.2} | {:.0}% | {} | {:.2} | {:.2} | {} | {} |",
            r.mode,
            r.us_per_send,
            r.sender_busy * 100.0,
            si(r.outcome.deliveries_per_sec),
            r.outcome.p50_ms,
            r.outcome.p99_ms,
            r.outcome.lost,
            if r.round_p99_ms > 0.0 { format!("{:.2}", r.round_p99_ms) } else { "–".into() }
        );
    }
    let _ = writeln!(
        s,
        "\nPer-send cost **{:.2} µs** → fan-out floor for {} subscribers on one shard **{:.2} ms**. \
         Generator: at most **{}/s** measured ({:.0}% of its core{}); **{}/s per generator CPU-second** \
         (its ceiling extrapolated to one full core).",
        b.us_per_send,
        b.subscribers,
        b.floor_ms,
        si(b.generator_ceiling_per_sec),
        b.generator_ceiling_cpu * 100.0,
        if b.generator_bound { ", saturated" } else { ", not saturated" },
        si(b.generator_per_cpu_sec)
    );
    s
}

/// Write a single run's files; returns the markdown path.
pub fn write_run(dir: &Path, r: &RunResult, m: &Machine) -> PathBuf {
    let stem = format!("{}-{}-{}", r.scenario, r.server, stamp());
    let mut charts = Vec::new();
    if let Some(p) = r.headline_phase() {
        let lad = p.percentile_ladder();
        if !lad.is_empty() {
            let name = format!("{stem}-latency.svg");
            write(
                &dir.join(&name),
                &latency_chart(
                    &format!("{} {}: publish→receive latency", r.server, r.scenario),
                    &[(r.server.clone(), lad)],
                ),
            );
            charts.push(name);
        }
        let tl = r.throughput_timeline();
        if !tl.is_empty() {
            let name = format!("{stem}-throughput.svg");
            write(
                &dir.join(&name),
                &throughput_chart(
                    &format!("{} {}: deliveries per second", r.server, r.scenario),
                    &[(r.server.clone(), tl)],
                ),
            );
            charts.push(name);
        }
    }
    // Scenarios with their own latency figures (no publish→receive phase).
    let extra: Vec<(String, Vec<(f64, f64)>)> = match (&r.presence, &r.history) {
        (Some(p), _) => p.steps.iter().map(|s| (format!("{}: diff", s.step), s.latency_ladder.clone())).collect(),
        (_, Some(h)) => vec![
            ("POST persisted → 202".to_string(), h.write_latency.ladder.clone()),
            ("GET limit=50".to_string(), h.read_latest.ladder.clone()),
            ("GET limit=50&before=".to_string(), h.read_before.ladder.clone()),
        ],
        _ => Vec::new(),
    };
    let extra: Vec<_> = extra.into_iter().filter(|(_, l)| !l.is_empty()).collect();
    if !extra.is_empty() {
        let name = format!("{stem}-latency.svg");
        let title = if r.presence.is_some() {
            format!("{} presence: member action → observer diff", r.server)
        } else {
            format!("{} history: request latency", r.server)
        };
        write(&dir.join(&name), &latency_chart(&title, &extra));
        charts.push(name);
    }
    if let Some(h) = r.history.as_ref().filter(|h| !h.timeline.is_empty()) {
        let name = format!("{stem}-throughput.svg");
        let svg = line_chart(
            &format!("{} history: persisted messages accepted per second", r.server),
            "seconds",
            "messages/s",
            &[Series { name: "accepted".into(), points: h.timeline.clone() }],
            None,
            false,
        );
        write(&dir.join(&name), &svg);
        charts.push(name);
    }
    #[derive(Serialize)]
    struct Doc<'a> {
        machine: &'a Machine,
        result: &'a RunResult,
    }
    write_json(&dir.join(format!("{stem}.json")), &Doc { machine: m, result: r });
    let md = dir.join(format!("{stem}.md"));
    write(&md, &run_md(r, m, &charts));
    md
}
