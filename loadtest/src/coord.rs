//! The coordinator's side of the worker processes: spawn them (each pinned to the generator
//! CPU), hand out client ranges, drive phases, merge their counters and histograms.

use std::io::{BufRead, BufReader, Write};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::unix::process::CommandExt;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::layout::Layout;
use crate::sys;
use crate::wire::Proto;
use crate::worker::{self, Cmd, Ev, PhaseResult, PhaseSpec, WorkerSpec};

/// How clients are spread over processes and source addresses.
#[derive(Clone, Debug)]
pub struct FleetOpts {
    pub per_worker: usize,
    pub src_addrs: usize,
    pub connect_concurrency: usize,
    pub connect_timeout_ms: u64,
    pub heartbeat_ms: u64,
    pub cpu: Option<usize>,
    pub rest_publish: bool,
    /// Subscribers are SSE streams (corecast and nchan).
    pub sse_subscribers: bool,
    /// Clients count as set up at the WebSocket 101 and send no join (connect-storm's
    /// upgrade-only pass).
    pub upgrade_only: bool,
    /// Speak TLS, trusting this certificate (`--tls`, corecast only).
    pub tls_ca: Option<std::path::PathBuf>,
    pub quiet: bool,
}

pub struct Fleet {
    children: Vec<Child>,
    stdins: Vec<ChildStdin>,
    rx: Receiver<(usize, Option<Ev>)>,
    pub layout: Layout,
    quiet: bool,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct ConnectSummary {
    pub ok: u64,
    pub failed: u64,
    pub secs: f64,
    pub per_sec: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    /// Connect → WebSocket 101, per connection (the rest of p50_ms/p99_ms is the join).
    pub upgrade_p50_ms: f64,
    pub upgrade_p99_ms: f64,
    pub errors: Vec<String>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Sample {
    pub t: f64,
    pub delivered_per_sec: f64,
    pub published_per_sec: f64,
    pub lat_avg_ms: f64,
    pub lat_max_ms: f64,
}

/// Everything one phase measured, merged over workers.
#[derive(Clone, Debug, Serialize)]
pub struct PhaseOutcome {
    pub phase: u32,
    pub target_rate: Option<f64>,
    pub publish_secs: f64,
    /// Seconds from phase start to the last delivery progress (publishing plus drain).
    pub active_secs: f64,
    pub published: u64,
    pub expected: u64,
    pub delivered: u64,
    pub uniq: u64,
    pub dup: u64,
    pub reordered: u64,
    pub late: u64,
    pub other: u64,
    pub lost: u64,
    pub subs: u64,
    pub subs_with_loss: u64,
    pub max_lost_per_sub: u64,
    pub closed: u64,
    pub shortfall: u64,
    pub window_stalls: u64,
    pub deliveries_per_sec: f64,
    pub publish_per_sec: f64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
    pub mean_ms: f64,
    /// Generator CPU seconds (all workers) during the phase.
    pub generator_cpu_secs: f64,
    pub timeline: Vec<Sample>,
    pub errors: Vec<String>,
    #[serde(skip)]
    pub hist: Option<Histogram<u64>>,
}

pub fn ms(us: u64) -> f64 {
    us as f64 / 1000.0
}

impl PhaseOutcome {
    pub fn percentile_ladder(&self) -> Vec<(f64, f64)> {
        let Some(h) = &self.hist else {
            return Vec::new();
        };
        if h.is_empty() {
            return Vec::new();
        }
        let mut v = Vec::new();
        let qs = [0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99, 0.995, 0.999, 0.9995, 0.9999, 0.99999];
        for q in qs {
            v.push((q, ms(h.value_at_quantile(q))));
        }
        v.push((1.0, ms(h.max())));
        v
    }
}

impl Fleet {
    pub fn spawn(proto: Proto, addr: SocketAddrV4, layout: Layout, o: &FleetOpts) -> Result<Fleet, String> {
        let n = layout.clients();
        let per = o.per_worker.max(1);
        let workers = n.div_ceil(per).max(1);
        let src: Vec<Ipv4Addr> = (0..o.src_addrs.max(1)).map(|i| Ipv4Addr::new(127, 0, 0, 1 + i as u8)).collect();
        let exe = std::env::current_exe().map_err(|e| e.to_string())?;
        let (tx, rx) = mpsc::channel();
        let mut children = Vec::new();
        let mut stdins = Vec::new();
        for w in 0..workers {
            // Even split: worker 0 holds client 0 (the publishers come first in every layout).
            let first = n * w / workers;
            let last = n * (w + 1) / workers;
            let spec = WorkerSpec {
                index: w,
                proto,
                addr,
                src_addrs: src.clone(),
                first,
                last,
                layout: layout.clone(),
                connect_concurrency: o.connect_concurrency.div_ceil(workers).max(1),
                connect_timeout_ms: o.connect_timeout_ms,
                heartbeat_ms: o.heartbeat_ms,
                cpu: o.cpu,
                tick_ms: 100,
                rest_publish: o.rest_publish,
                sse_subscribers: o.sse_subscribers,
                upgrade_only: o.upgrade_only,
                tls_ca: o.tls_ca.clone(),
            };
            let mut cmd = Command::new(&exe);
            cmd.arg("worker").stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::inherit());
            // SAFETY: only async-signal-safe calls in the child before exec.
            unsafe {
                cmd.pre_exec(|| {
                    sys::die_with_parent();
                    Ok(())
                });
            }
            let mut child = cmd.spawn().map_err(|e| format!("spawn worker: {e}"))?;
            let mut stdin = child.stdin.take().expect("piped");
            let mut line = serde_json::to_vec(&spec).map_err(|e| e.to_string())?;
            line.push(b'\n');
            stdin.write_all(&line).map_err(|e| format!("worker stdin: {e}"))?;
            let out = child.stdout.take().expect("piped");
            let tx = tx.clone();
            std::thread::spawn(move || {
                let r = BufReader::new(out);
                for line in r.lines() {
                    let Ok(line) = line else { break };
                    match serde_json::from_str::<Ev>(&line) {
                        Ok(ev) => {
                            if tx.send((w, Some(ev))).is_err() {
                                break;
                            }
                        }
                        Err(e) => eprintln!("worker {w}: unreadable event ({e}): {line}"),
                    }
                }
                let _ = tx.send((w, None));
            });
            children.push(child);
            stdins.push(stdin);
        }
        Ok(Fleet { children, stdins, rx, layout, quiet: o.quiet })
    }

    pub fn workers(&self) -> usize {
        self.children.len()
    }

    /// Send a command to every worker (scenarios with their own step protocol: presence).
    pub fn send(&mut self, cmd: &Cmd) {
        self.send_all(cmd);
    }

    /// The next event from any worker within `timeout`: Ok(None) on timeout, Err when a worker
    /// exited or reported a fatal error.
    pub fn recv(&self, timeout: Duration) -> Result<Option<(usize, Ev)>, String> {
        match self.rx.recv_timeout(timeout) {
            Ok((w, Some(Ev::Fatal { msg }))) => Err(format!("worker {w}: {msg}")),
            Ok((w, Some(ev))) => Ok(Some((w, ev))),
            Ok((w, None)) => Err(format!("worker {w} exited")),
            Err(RecvTimeoutError::Timeout) => Ok(None),
            Err(RecvTimeoutError::Disconnected) => Err("workers gone".into()),
        }
    }

    pub fn quiet(&self) -> bool {
        self.quiet
    }

    fn send_all(&mut self, cmd: &Cmd) {
        let mut line = serde_json::to_vec(cmd).expect("serialize cmd");
        line.push(b'\n');
        for s in &mut self.stdins {
            let _ = s.write_all(&line);
            let _ = s.flush();
        }
    }

    /// Connect again every client the server closed; returns how many came back.
    pub fn reconnect(&mut self) -> Result<ConnectSummary, String> {
        self.send_all(&Cmd::Reconnect);
        self.wait_connected(Duration::from_secs(300))
    }

    /// Wait until every worker has connected and joined its clients.
    pub fn wait_connected(&mut self, timeout: Duration) -> Result<ConnectSummary, String> {
        let t0 = Instant::now();
        let mut done = vec![false; self.workers()];
        let mut s = ConnectSummary::default();
        let mut h = worker::new_hist();
        let mut hu = worker::new_hist();
        let mut last_print = Instant::now();
        while done.iter().any(|d| !d) {
            let left = timeout.saturating_sub(t0.elapsed());
            if left.is_zero() {
                return Err("timed out waiting for clients to connect".into());
            }
            match self.rx.recv_timeout(left.min(Duration::from_secs(1))) {
                Ok((w, Some(Ev::Connected { ok, failed, secs, hist, errors, upgrade_hist }))) => {
                    done[w] = true;
                    s.ok += ok;
                    s.failed += failed;
                    s.secs = s.secs.max(secs);
                    worker::hist_add_pairs(&mut h, &hist);
                    worker::hist_add_pairs(&mut hu, &upgrade_hist);
                    for e in errors {
                        if s.errors.len() < 8 {
                            s.errors.push(format!("worker {w}: {e}"));
                        }
                    }
                }
                Ok((w, Some(Ev::Fatal { msg }))) => return Err(format!("worker {w}: {msg}")),
                Ok((w, None)) => return Err(format!("worker {w} exited")),
                Ok(_) => {}
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return Err("workers gone".into()),
            }
            if !self.quiet && last_print.elapsed() > Duration::from_secs(1) {
                last_print = Instant::now();
                eprintln!(
                    "  connecting… {} of {} workers done ({:.0}s)",
                    done.iter().filter(|d| **d).count(),
                    done.len(),
                    t0.elapsed().as_secs_f64()
                );
            }
        }
        s.per_sec = if s.secs > 0.0 { s.ok as f64 / s.secs } else { 0.0 };
        if !h.is_empty() {
            s.p50_ms = ms(h.value_at_quantile(0.5));
            s.p99_ms = ms(h.value_at_quantile(0.99));
            s.max_ms = ms(h.max());
        }
        if !hu.is_empty() {
            s.upgrade_p50_ms = ms(hu.value_at_quantile(0.5));
            s.upgrade_p99_ms = ms(hu.value_at_quantile(0.99));
        }
        Ok(s)
    }

    /// Watch the fleet for `secs` without publishing (idle): returns (closed connections,
    /// timeline of nothing but the clock).
    pub fn hold(&mut self, secs: f64, label: &str) -> u64 {
        let t0 = Instant::now();
        let mut closed = vec![0u64; self.workers()];
        let mut last_print = Instant::now();
        while t0.elapsed().as_secs_f64() < secs {
            if let Ok((w, Some(Ev::Tick { closed: c, .. }))) = self.rx.recv_timeout(Duration::from_millis(200)) {
                closed[w] = c;
            }
            if !self.quiet && last_print.elapsed() >= Duration::from_secs(1) {
                last_print = Instant::now();
                eprintln!(
                    "[{:4.0}s] {label}: holding, {} connections closed by the server",
                    t0.elapsed().as_secs_f64(),
                    closed.iter().sum::<u64>()
                );
            }
        }
        closed.iter().sum()
    }

    /// Run one phase: start publishing everywhere, show progress once a second, wait for the
    /// publishers to finish and the deliveries to drain, then collect the results.
    /// `external` delivers the sent counts of a publisher outside the fleet (the baseline).
    pub fn run_phase(
        &mut self,
        spec: PhaseSpec,
        label: &str,
        external: Option<&Receiver<Vec<(u64, u64)>>>,
        drain_max: Duration,
    ) -> Result<PhaseOutcome, String> {
        let nw = self.workers();
        self.send_all(&Cmd::Phase(spec.clone()));
        let t0 = Instant::now();
        let mut delivered = vec![0u64; nw];
        let mut uniq = vec![0u64; nw];
        let mut published = vec![0u64; nw];
        let mut lat_max = 0u64;
        let mut lat_sum = 0u64;
        let mut lat_n = 0u64;
        let mut pubdone = vec![false; nw];
        let mut sent: Vec<(u64, u64)> = Vec::new();
        let mut shortfall = 0u64;
        let mut external_done = external.is_none();
        let mut publish_end: Option<Instant> = None;
        let mut expected = 0u64;
        let mut last_progress = Instant::now();
        let mut last_uniq_total = 0u64;
        let mut timeline = Vec::new();
        let mut last_sample = (0.0f64, 0u64, 0u64);
        let mut next_sample = 1.0f64;
        let hard_limit = Duration::from_secs_f64(spec.seconds) + drain_max + Duration::from_secs(60);
        loop {
            match self.rx.recv_timeout(Duration::from_millis(50)) {
                Ok((w, Some(ev))) => match ev {
                    Ev::Tick {
                        phase, delivered: d, uniq: u, published: p, lat_max_us, lat_sum_us, lat_n: n, ..
                    } if phase == spec.phase => {
                        delivered[w] = d;
                        uniq[w] = u;
                        published[w] = p;
                        lat_max = lat_max.max(lat_max_us);
                        lat_sum += lat_sum_us;
                        lat_n += n;
                    }
                    Ev::PubDone { phase, sent: s, shortfall: sf } if phase == spec.phase => {
                        pubdone[w] = true;
                        sent.extend(s);
                        shortfall += sf;
                    }
                    Ev::Fatal { msg } => return Err(format!("worker {w}: {msg}")),
                    _ => {}
                },
                Ok((w, None)) => return Err(format!("worker {w} exited during the phase")),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return Err("workers gone".into()),
            }
            if !external_done {
                if let Some(rx) = external {
                    if let Ok(s) = rx.try_recv() {
                        sent.extend(s);
                        external_done = true;
                    }
                }
            }
            let uniq_total: u64 = uniq.iter().sum();
            if uniq_total != last_uniq_total {
                last_uniq_total = uniq_total;
                last_progress = Instant::now();
            }
            let el = t0.elapsed().as_secs_f64();
            if el >= next_sample {
                let d: u64 = delivered.iter().sum();
                let p: u64 = published.iter().sum();
                let dt = el - last_sample.0;
                let s = Sample {
                    t: el,
                    delivered_per_sec: (d - last_sample.1) as f64 / dt,
                    published_per_sec: (p - last_sample.2) as f64 / dt,
                    lat_avg_ms: if lat_n > 0 { lat_sum as f64 / lat_n as f64 / 1000.0 } else { 0.0 },
                    lat_max_ms: ms(lat_max),
                };
                if !self.quiet {
                    eprintln!(
                        "[{:4.0}s] {label}: published {}/s, delivered {}/s (total {}), latency avg {:.2} ms max {:.2} ms",
                        el,
                        si(s.published_per_sec),
                        si(s.delivered_per_sec),
                        si(d as f64),
                        s.lat_avg_ms,
                        s.lat_max_ms
                    );
                }
                timeline.push(s);
                last_sample = (el, d, p);
                lat_max = 0;
                lat_sum = 0;
                lat_n = 0;
                next_sample += 1.0;
            }
            if publish_end.is_none() && external_done && pubdone.iter().all(|d| *d) {
                publish_end = Some(Instant::now());
                expected = sent.iter().map(|&(p, n)| n * self.layout.receivers_of(p)).sum();
            }
            if let Some(pe) = publish_end {
                if uniq_total >= expected {
                    break;
                }
                let stalled = last_progress.elapsed() > Duration::from_secs(2) && pe.elapsed() > Duration::from_secs(2);
                if stalled || pe.elapsed() > drain_max {
                    break;
                }
            }
            if t0.elapsed() > hard_limit {
                return Err("phase did not finish (publishers never reported done)".into());
            }
        }
        let publish_secs = publish_end.map_or(spec.seconds, |pe| (pe - t0).as_secs_f64());
        let active_secs = (last_progress - t0).as_secs_f64().max(publish_secs.min(spec.seconds)).max(1e-3);
        self.send_all(&Cmd::End { sent: sent.clone() });
        let mut results: Vec<Option<PhaseResult>> = vec![None; nw];
        let t1 = Instant::now();
        while results.iter().any(|r| r.is_none()) {
            if t1.elapsed() > Duration::from_secs(60) {
                return Err("workers did not report phase results".into());
            }
            match self.rx.recv_timeout(Duration::from_secs(1)) {
                Ok((w, Some(Ev::Result(r)))) if r.phase == spec.phase => results[w] = Some(r),
                Ok((w, None)) => return Err(format!("worker {w} exited")),
                _ => {}
            }
        }
        let mut h = worker::new_hist();
        let mut o = PhaseOutcome {
            phase: spec.phase,
            target_rate: spec.rate,
            publish_secs,
            active_secs,
            published: sent.iter().map(|s| s.1).sum(),
            expected,
            delivered: 0,
            uniq: 0,
            dup: 0,
            reordered: 0,
            late: 0,
            other: 0,
            lost: 0,
            subs: 0,
            subs_with_loss: 0,
            max_lost_per_sub: 0,
            closed: 0,
            shortfall,
            window_stalls: 0,
            deliveries_per_sec: 0.0,
            publish_per_sec: 0.0,
            p50_ms: 0.0,
            p90_ms: 0.0,
            p99_ms: 0.0,
            p999_ms: 0.0,
            max_ms: 0.0,
            mean_ms: 0.0,
            generator_cpu_secs: 0.0,
            timeline,
            errors: Vec::new(),
            hist: None,
        };
        for (w, r) in results.into_iter().enumerate() {
            let r = r.expect("checked");
            o.delivered += r.delivered;
            o.uniq += r.uniq;
            o.dup += r.dup;
            o.reordered += r.reordered;
            o.late += r.late;
            o.other += r.other;
            o.lost += r.lost;
            o.subs += r.subs;
            o.subs_with_loss += r.subs_with_loss;
            o.max_lost_per_sub = o.max_lost_per_sub.max(r.max_lost_per_sub);
            o.closed += r.closed;
            o.window_stalls += r.window_stalls;
            o.generator_cpu_secs += r.cpu_ns as f64 / 1e9;
            worker::hist_add_pairs(&mut h, &r.hist);
            for e in r.errors {
                if o.errors.len() < 12 {
                    o.errors.push(format!("worker {w}: {e}"));
                }
            }
        }
        o.deliveries_per_sec = o.uniq as f64 / active_secs;
        o.publish_per_sec = o.published as f64 / publish_secs.max(1e-3);
        if !h.is_empty() {
            o.p50_ms = ms(h.value_at_quantile(0.5));
            o.p90_ms = ms(h.value_at_quantile(0.9));
            o.p99_ms = ms(h.value_at_quantile(0.99));
            o.p999_ms = ms(h.value_at_quantile(0.999));
            o.max_ms = ms(h.max());
            o.mean_ms = h.mean() / 1000.0;
        }
        o.hist = Some(h);
        Ok(o)
    }

    pub fn quit(mut self) {
        self.send_all(&Cmd::Quit);
        let t0 = Instant::now();
        for c in &mut self.children {
            loop {
                if let Ok(Some(_)) = c.try_wait() {
                    break;
                }
                if t0.elapsed() > Duration::from_secs(10) {
                    let _ = c.kill();
                    let _ = c.wait();
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        for c in &mut self.children {
            if let Ok(None) = c.try_wait() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}

/// 1234567 → "1.23M".
pub fn si(v: f64) -> String {
    let a = v.abs();
    if a >= 1e9 {
        format!("{:.2}G", v / 1e9)
    } else if a >= 1e6 {
        format!("{:.2}M", v / 1e6)
    } else if a >= 1e4 {
        format!("{:.1}k", v / 1e3)
    } else if a >= 1e3 {
        format!("{:.2}k", v / 1e3)
    } else {
        format!("{v:.0}")
    }
}
