//! Worker side of the presence scenario: members that track (then leave) on a global schedule,
//! and observers that read every `presence_diff` and note when each key arrived.
//!
//! A step is one pass over the members: member with ordinal `m` (its position among all members
//! of every worker) acts at `start + m / rate`, so the whole room joins (or leaves) at `rate` per
//! second whatever the number of worker processes. `start` is a `CLOCK_MONOTONIC` instant chosen
//! by the coordinator, the same clock in every process. The worker reports the actual send time
//! of each member's action and the receive time of each key at each observer; the coordinator
//! matches them by key (the send-time map) for the latency.

use serde::{Deserialize, Serialize};

use super::{emit, hist_pairs, new_hist, queue_send, Ev, St, Worker};
use crate::layout::PresRole;
use crate::sys;
use crate::wire;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// `track` with a state of `payload` bytes.
    Track,
    /// `untrack` push (the connection stays open and joined).
    Untrack,
    /// Close the socket (RST): the server removes the member.
    Close,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StepSpec {
    pub step: u32,
    pub action: Action,
    /// `CLOCK_MONOTONIC` ns of member ordinal 0's action.
    pub start_ns: u64,
    /// Member actions per second (all workers together).
    pub rate: f64,
    /// Size of the tracked state object, bytes.
    pub payload: usize,
}

/// What one worker saw during one step.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct StepResult {
    pub step: u32,
    /// (member client index, ns its action was sent).
    pub sends: Vec<(u32, u64)>,
    /// Members whose turn came while they were not connected.
    pub skipped: u64,
    /// Track/untrack replies `ok`, and refusals (error replies) with the member and reason.
    pub acked_ok: u64,
    pub refused: Vec<u32>,
    pub refusal_reasons: Vec<String>,
    /// Reply latency (send → `phx_reply`), µs.
    pub ack_hist: Vec<(u64, u64)>,
    /// How late each action went out against its schedule, µs.
    pub lag_hist: Vec<(u64, u64)>,
    /// (observer client index, member key index, ns the diff naming it arrived) for keys of this
    /// step's kind (joins for a track step, leaves otherwise), first sighting per observer.
    pub recvs: Vec<(u32, u32, u64)>,
    /// Keys of the other kind, or not of a member, seen by observers during the step.
    pub unexpected: u64,
    /// The same key of this step's kind in a second diff at the same observer.
    pub repeated: u64,
    /// `presence_diff` frames received by observers / by listening members, and their bytes.
    pub observer_diffs: u64,
    pub observer_diff_bytes: u64,
    pub member_diffs: u64,
    /// `presence_state` frames received (observers and listening members).
    pub states: u64,
    pub observers: u64,
    /// Connections the server closed during the step.
    pub closed: u64,
    pub cpu_ns: u64,
    pub errors: Vec<String>,
}

/// One step in progress.
pub(super) struct PresenceRun {
    spec: StepSpec,
    /// Local connection indices of this worker's members, in client order.
    members: Vec<usize>,
    /// Global member ordinal of `members[0]`.
    first_ordinal: u64,
    next: usize,
    done_sent: bool,
    /// ns each local connection's action was sent (0 = not sent), for the reply latency.
    sent_ns: Vec<u64>,
    cpu0: u64,
    state: Vec<u8>,
    r: StepResult,
    seen: std::collections::HashSet<u64>,
    ack_hist: hdrhistogram::Histogram<u64>,
    lag_hist: hdrhistogram::Histogram<u64>,
}

impl PresenceRun {
    fn due_at(&self, k: usize) -> u64 {
        let interval = 1e9 / self.spec.rate.max(1e-6);
        self.spec.start_ns + ((self.first_ordinal + k as u64) as f64 * interval) as u64
    }
}

impl Worker {
    /// When the next member acts (for the event loop's timeout).
    pub(super) fn presence_next_due(&self) -> Option<u64> {
        let p = self.pres.as_ref()?;
        (p.next < p.members.len()).then(|| p.due_at(p.next))
    }

    pub(super) fn presence_start(&mut self, spec: StepSpec) {
        let layout = &self.spec.layout;
        let observers = match *layout {
            crate::layout::Layout::Presence { observers, .. } => observers,
            _ => {
                emit(&Ev::Fatal { msg: "presence step without a presence layout".into() });
                return;
            }
        };
        let members: Vec<usize> = (0..self.conns.len())
            .filter(|&ci| layout.presence_role(self.conns[ci].id as usize) == PresRole::Member)
            .collect();
        let first_ordinal = members.first().map_or(0, |&ci| self.conns[ci].id - observers as u64);
        let obs_here =
            self.conns.iter().filter(|c| c.pres == PresRole::Observer && c.state == St::Joined).count() as u64;
        self.phase = spec.step;
        self.delivered = 0;
        self.uniq = 0;
        self.published = 0;
        self.closed = 0;
        self.errors.clear();
        let state = Vec::with_capacity(spec.payload + 64);
        let n = self.conns.len();
        self.pres = Some(Box::new(PresenceRun {
            r: StepResult { step: spec.step, observers: obs_here, ..Default::default() },
            spec,
            members,
            first_ordinal,
            next: 0,
            done_sent: false,
            sent_ns: vec![0; n],
            cpu0: sys::process_cpu_ns(),
            state,
            seen: Default::default(),
            ack_hist: new_hist(),
            lag_hist: new_hist(),
        }));
        self.presence_due(sys::now_ns());
    }

    /// Sends every member action whose time has come.
    pub(super) fn presence_due(&mut self, now: u64) {
        let Some(mut p) = self.pres.take() else { return };
        while p.next < p.members.len() {
            let due = p.due_at(p.next);
            if due > now {
                break;
            }
            let ci = p.members[p.next];
            p.next += 1;
            if self.conns[ci].state != St::Joined {
                p.r.skipped += 1;
                continue;
            }
            let t = sys::now_ns();
            let _ = p.lag_hist.record((t.saturating_sub(due) / 1000).clamp(1, 3_600_000_000));
            let id = self.conns[ci].id;
            match p.spec.action {
                Action::Track => {
                    p.state.clear();
                    wire::push_payload(&mut p.state, 0, t, id, p.spec.payload);
                    let mut body = Vec::with_capacity(p.state.len() + 96);
                    wire::push_presence(&mut body, self.conns[ci].topic, Some(&p.state));
                    self.presence_send(ci, &body);
                }
                Action::Untrack => {
                    let mut body = Vec::with_capacity(96);
                    wire::push_presence(&mut body, self.conns[ci].topic, None);
                    self.presence_send(ci, &body);
                }
                Action::Close => self.presence_close(ci),
            }
            p.sent_ns[ci] = t;
            p.r.sends.push((id as u32, t));
            self.published += 1;
        }
        if p.next >= p.members.len() && !p.done_sent {
            p.done_sent = true;
            emit(&Ev::PubDone { phase: p.spec.step, sent: Vec::new(), shortfall: p.r.skipped });
        }
        self.pres = Some(p);
    }

    fn presence_send(&mut self, ci: usize, body: &[u8]) {
        let mask = (self.rand() as u32).to_ne_bytes();
        let mut f = Vec::with_capacity(body.len() + 14);
        wire::push_client_frame(&mut f, wire::OP_TEXT, body, mask);
        let c = &mut self.conns[ci];
        if let Err(e) = queue_send(&self.ep, ci, c, &f) {
            self.fail(ci, &format!("presence send: {e}"));
        }
    }

    /// A member leaves by closing its socket: not a server close, so not counted as one.
    fn presence_close(&mut self, ci: usize) {
        self.drop_socket(ci);
    }

    /// A Phoenix message on a presence-room connection; true if handled here.
    pub(super) fn on_presence_message(&mut self, ci: usize, m: &[u8], now: u64) -> bool {
        if self.conns[ci].state != St::Joined {
            return false;
        }
        let role = self.conns[ci].pres;
        match wire::phoenix_event(m) {
            Some(b"presence_diff") => {
                if role == PresRole::Observer {
                    self.observer_diff(ci, m, now);
                } else if let Some(p) = self.pres.as_mut() {
                    p.r.member_diffs += 1;
                }
                true
            }
            Some(b"presence_state") => {
                if let Some(p) = self.pres.as_mut() {
                    p.r.states += 1;
                }
                true
            }
            Some(b"phx_reply") if role == PresRole::Member => {
                let track = wire::is_reply_to(m, wire::TRACK_REF);
                if !(track || wire::is_reply_to(m, wire::UNTRACK_REF)) {
                    return false;
                }
                let ok = memchr::memmem::find(m, b"\"status\":\"ok\"").is_some();
                let id = self.conns[ci].id as u32;
                if let Some(p) = self.pres.as_mut() {
                    let t = p.sent_ns[ci];
                    if ok {
                        p.r.acked_ok += 1;
                        if t > 0 {
                            let _ = p.ack_hist.record((now.saturating_sub(t) / 1000).clamp(1, 3_600_000_000));
                        }
                    } else {
                        p.r.refused.push(id);
                        if p.r.refusal_reasons.len() < 8 {
                            let s = String::from_utf8_lossy(&m[..m.len().min(300)]).into_owned();
                            p.r.refusal_reasons.push(format!("member {id}: {s}"));
                        }
                    }
                }
                true
            }
            _ => false,
        }
    }

    fn observer_diff(&mut self, ci: usize, m: &[u8], now: u64) {
        let Some(mut p) = self.pres.take() else { return };
        p.r.observer_diffs += 1;
        p.r.observer_diff_bytes += m.len() as u64;
        self.delivered += 1;
        let want_joins = p.spec.action == Action::Track;
        let obs = self.conns[ci].id as u32;
        let mut fresh = 0u64;
        let ok = wire::presence_diff_keys(m, |is_join, key| {
            let idx = key.strip_prefix('m').and_then(|k| k.parse::<u32>().ok());
            match idx {
                Some(k) if is_join == want_joins => {
                    if p.seen.insert(((obs as u64) << 32) | k as u64) {
                        p.r.recvs.push((obs, k, now));
                        fresh += 1;
                    } else {
                        p.r.repeated += 1;
                    }
                }
                _ => p.r.unexpected += 1,
            }
        });
        if !ok && p.r.errors.len() < 8 {
            p.r.errors.push(format!("unparsable presence_diff: {}", String::from_utf8_lossy(&m[..m.len().min(200)])));
        }
        self.uniq += fresh;
        self.pres = Some(p);
    }

    /// The step is over: report it.
    pub(super) fn presence_end(&mut self, step: u32) {
        let Some(mut p) = self.pres.take() else {
            emit(&Ev::PresenceResult(StepResult { step, ..Default::default() }));
            return;
        };
        p.r.ack_hist = hist_pairs(&p.ack_hist);
        p.r.lag_hist = hist_pairs(&p.lag_hist);
        p.r.closed = self.closed;
        p.r.cpu_ns = sys::process_cpu_ns() - p.cpu0;
        let mut errors = std::mem::take(&mut self.errors);
        errors.append(&mut p.r.errors);
        errors.truncate(12);
        p.r.errors = errors;
        emit(&Ev::PresenceResult(p.r));
    }
}
