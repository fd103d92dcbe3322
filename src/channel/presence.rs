//! Presence state of one topic, kept by the topic's owner shard: who is tracked, with what
//! state, and the diffs not yet sent.
//!
//! - One *meta* per tracking connection-channel (`member`), grouped by presence key like
//!   `Phoenix.Presence.group/1`: `{"<key>": {"metas": [{"phx_ref": .., ...state}]}}`.
//! - `phx_ref` is unique per meta; an update leaves the old meta and joins a new one carrying
//!   `phx_ref_prev`. Tracking an unchanged state is a no-op.
//! - Diffs accumulate until [`Presence::take_diff`] (the owner calls it once per coalescing
//!   window), so a burst of N joins costs one diff per subscriber, not N. A meta that joined
//!   and left inside one window cancels out.
//! - [`Presence::state`] is the state *as of the last diff* (current metas minus pending joins
//!   plus pending leaves), encoded once per window and shared by every joiner of that window.
//!   It does not change inside a window, and it plus the pending diff is exactly the current
//!   state, so a joiner that gets it and then the next diff ends up exact.

use std::collections::HashMap;

use bytes::Bytes;

use crate::protocol::json::write_str;

/// Who tracks: the process holding the connection (its cluster run; 0 on a single node), the
/// connection's shard there and its id on that shard (slab index, generation). An address that
/// names a member on any node, so one topic's presence can hold every node's members.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MemberId {
    pub run: u64,
    pub shard: u32,
    pub conn: u64,
}

/// Why a track was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PresenceError {
    #[error("PresenceLimitReached: this channel already has {0} presence entries")]
    TooManyEntries(usize),
}

/// What a track did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tracked {
    Joined,
    Updated,
    Unchanged,
}

#[derive(Debug)]
struct Member {
    key: Box<str>,
    phx_ref: Box<str>,
    /// The state as tracked (a JSON object), to detect unchanged tracks.
    state: Bytes,
    /// The meta as sent: `{"phx_ref":..,["phx_ref_prev":..,]...state}`.
    meta: Bytes,
}

/// Presence of one topic.
#[derive(Debug, Default)]
pub struct Presence {
    members: HashMap<MemberId, Member, ahash::RandomState>,
    /// Pending joins (`None` once cancelled by a leave in the same window) and their index.
    joins: Vec<Option<(Box<str>, Bytes)>>,
    join_index: HashMap<Box<str>, usize, ahash::RandomState>,
    leaves: Vec<(Box<str>, Bytes)>,
    cached_state: Option<Bytes>,
    next_ref: u64,
    /// Per-owner prefix that keeps `phx_ref`s unique across topics and restarts.
    ref_prefix: Box<str>,
}

impl Presence {
    /// Empty presence whose refs start with `ref_prefix`.
    pub fn new(ref_prefix: &str) -> Self {
        Self { ref_prefix: ref_prefix.into(), ..Self::default() }
    }

    /// Number of tracked metas.
    pub fn len(&self) -> usize {
        self.members.len()
    }

    /// Whether nobody is tracked.
    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// Whether a diff is waiting to be sent.
    pub fn has_diff(&self) -> bool {
        !self.leaves.is_empty() || self.joins.iter().any(Option::is_some)
    }

    /// Tracks `member` under `key` with `state` (a JSON object), within `max` entries.
    pub fn track(&mut self, member: MemberId, key: &str, state: Bytes, max: usize) -> Result<Tracked, PresenceError> {
        let prev = match self.members.get(&member) {
            Some(m) if &*m.key == key && m.state == state => return Ok(Tracked::Unchanged),
            Some(_) => self.members.remove(&member),
            None => {
                if self.members.len() >= max {
                    return Err(PresenceError::TooManyEntries(max));
                }
                None
            }
        };
        self.next_ref += 1;
        let phx_ref: Box<str> = format!("{}{:x}", self.ref_prefix, self.next_ref).into();
        // The update's new meta carries `phx_ref_prev` only when the key is unchanged.
        let prev_ref = prev.as_ref().filter(|p| &*p.key == key).map(|p| &*p.phx_ref);
        let meta = build_meta(&phx_ref, prev_ref, &state);
        if let Some(p) = &prev {
            self.leave(&p.key, &p.phx_ref, p.meta.clone());
        }
        self.joins.push(Some((key.into(), meta.clone())));
        self.join_index.insert(phx_ref.clone(), self.joins.len() - 1);
        self.members.insert(member, Member { key: key.into(), phx_ref, state, meta });
        Ok(if prev.is_some() { Tracked::Updated } else { Tracked::Joined })
    }

    /// The members held by process `run`: `(member, key, state)` (to announce them again).
    pub fn members_of(&self, run: u64) -> Vec<(MemberId, Box<str>, Bytes)> {
        self.members.iter().filter(|(m, _)| m.run == run).map(|(m, v)| (*m, v.key.clone(), v.state.clone())).collect()
    }

    /// Stops tracking every member of process `run` (a node that left); returns whether any
    /// was tracked.
    pub fn untrack_run(&mut self, run: u64) -> bool {
        let gone: Vec<MemberId> = self.members.keys().filter(|m| m.run == run).copied().collect();
        for m in &gone {
            self.untrack(*m);
        }
        !gone.is_empty()
    }

    /// Stops tracking `member`; returns whether it was tracked.
    pub fn untrack(&mut self, member: MemberId) -> bool {
        let Some(m) = self.members.remove(&member) else { return false };
        self.leave(&m.key, &m.phx_ref, m.meta);
        true
    }

    fn leave(&mut self, key: &str, phx_ref: &str, meta: Bytes) {
        match self.join_index.remove(phx_ref) {
            // Joined and left inside one window: nobody needs to hear about it.
            Some(i) => self.joins[i] = None,
            None => self.leaves.push((key.into(), meta)),
        }
    }

    /// The state as of the last [`Presence::take_diff`], as `{"<key>":{"metas":[..]},..}`,
    /// encoded at most once per window. Send it to a joiner; the next diff brings it current.
    pub fn state(&mut self) -> Bytes {
        if let Some(s) = &self.cached_state {
            return s.clone();
        }
        // Metas present at the last diff: current ones that did not join since, plus the ones
        // that left since (a leave is recorded only for metas that were present then).
        let at_last_diff = self
            .members
            .values()
            .filter(|m| !self.join_index.contains_key(&m.phx_ref))
            .map(|m| (&*m.key, &m.meta))
            .chain(self.leaves.iter().map(|(k, m)| (&**k, m)));
        let mut groups: HashMap<&str, Vec<&Bytes>, ahash::RandomState> = HashMap::default();
        let mut order: Vec<&str> = Vec::new();
        for (key, meta) in at_last_diff {
            groups
                .entry(key)
                .or_insert_with(|| {
                    order.push(key);
                    Vec::new()
                })
                .push(meta);
        }
        let mut out = Vec::with_capacity(64 * self.members.len() + 2);
        write_groups(&mut out, order.iter().map(|k| (*k, groups[k].as_slice())));
        let b = Bytes::from(out);
        self.cached_state = Some(b.clone());
        b
    }

    /// Takes the pending diff as `{"joins":{..},"leaves":{..}}`, or `None` if there is none.
    pub fn take_diff(&mut self) -> Option<Bytes> {
        let joins: Vec<(Box<str>, Bytes)> = self.joins.drain(..).flatten().collect();
        self.join_index.clear();
        let leaves = std::mem::take(&mut self.leaves);
        if joins.is_empty() && leaves.is_empty() {
            return None;
        }
        self.cached_state = None;
        let mut out = Vec::with_capacity(64 * (joins.len() + leaves.len()) + 32);
        out.extend_from_slice(b"{\"joins\":");
        write_grouped(&mut out, &joins);
        out.extend_from_slice(b",\"leaves\":");
        write_grouped(&mut out, &leaves);
        out.push(b'}');
        Some(Bytes::from(out))
    }
}

/// `{"phx_ref":R[,"phx_ref_prev":P]` followed by the fields of `state`.
fn build_meta(phx_ref: &str, prev: Option<&str>, state: &[u8]) -> Bytes {
    let mut m = Vec::with_capacity(state.len() + 48);
    m.extend_from_slice(b"{\"phx_ref\":");
    write_str(&mut m, phx_ref);
    if let Some(p) = prev {
        m.extend_from_slice(b",\"phx_ref_prev\":");
        write_str(&mut m, p);
    }
    let inner = trim(state);
    let inner = inner.strip_prefix(b"{").unwrap_or(inner);
    if trim(inner) != b"}" {
        m.push(b',');
    }
    m.extend_from_slice(trim(inner));
    Bytes::from(m)
}

fn trim(b: &[u8]) -> &[u8] {
    let start = b.iter().position(|c| !c.is_ascii_whitespace()).unwrap_or(b.len());
    let end = b.iter().rposition(|c| !c.is_ascii_whitespace()).map_or(start, |e| e + 1);
    &b[start..end]
}

/// Groups `(key, meta)` pairs by key (first-seen order) and writes them.
fn write_grouped(out: &mut Vec<u8>, items: &[(Box<str>, Bytes)]) {
    let mut index: HashMap<&str, usize, ahash::RandomState> = HashMap::default();
    let mut groups: Vec<(&str, Vec<&Bytes>)> = Vec::new();
    for (k, m) in items {
        match index.get(&**k) {
            Some(&i) => groups[i].1.push(m),
            None => {
                index.insert(k, groups.len());
                groups.push((k, vec![m]));
            }
        }
    }
    write_groups(out, groups.iter().map(|(k, v)| (*k, v.as_slice())));
}

fn write_groups<'a>(out: &mut Vec<u8>, groups: impl Iterator<Item = (&'a str, &'a [&'a Bytes])>) {
    out.push(b'{');
    for (i, (key, metas)) in groups.enumerate() {
        if i > 0 {
            out.push(b',');
        }
        write_str(out, key);
        out.extend_from_slice(b":{\"metas\":[");
        for (j, m) in metas.iter().enumerate() {
            if j > 0 {
                out.push(b',');
            }
            out.extend_from_slice(m);
        }
        out.extend_from_slice(b"]}");
    }
    out.push(b'}');
}

#[cfg(test)]
mod tests {
    fn mid(shard: u32, conn: u64) -> MemberId {
        MemberId { run: 0, shard, conn }
    }

    use super::*;
    use serde_json::{json, Value};

    fn v(b: &Bytes) -> Value {
        serde_json::from_slice(b).unwrap()
    }

    fn st(s: &str) -> Bytes {
        Bytes::copy_from_slice(s.as_bytes())
    }

    #[test]
    fn join_update_leave_diffs() {
        let mut p = Presence::new("F");
        assert_eq!(p.track(mid(0, 1), "u1", st(r#"{"name":"alice"}"#), 10), Ok(Tracked::Joined));
        let d = v(&p.take_diff().unwrap());
        assert_eq!(d["joins"]["u1"]["metas"][0]["name"], "alice");
        let r1 = d["joins"]["u1"]["metas"][0]["phx_ref"].as_str().unwrap().to_string();
        assert_eq!(d["leaves"], json!({}));
        // unchanged: no-op
        assert_eq!(p.track(mid(0, 1), "u1", st(r#"{"name":"alice"}"#), 10), Ok(Tracked::Unchanged));
        assert!(p.take_diff().is_none());
        // update: leave of the old meta + join with phx_ref_prev
        assert_eq!(p.track(mid(0, 1), "u1", st(r#"{"name":"alice","away":true}"#), 10), Ok(Tracked::Updated));
        let d = v(&p.take_diff().unwrap());
        assert_eq!(d["leaves"]["u1"]["metas"][0]["phx_ref"], r1.as_str());
        let m = &d["joins"]["u1"]["metas"][0];
        assert_eq!(m["phx_ref_prev"], r1.as_str());
        assert_ne!(m["phx_ref"], r1.as_str());
        assert_eq!(m["away"], true);
        assert!(p.untrack(mid(0, 1)));
        assert!(!p.untrack(mid(0, 1)));
        let d = v(&p.take_diff().unwrap());
        assert_eq!(d["leaves"]["u1"]["metas"].as_array().unwrap().len(), 1);
        assert!(p.is_empty());
    }

    #[test]
    fn state_groups_by_key_and_refs_are_unique() {
        let mut p = Presence::new("F");
        p.track(mid(0, 1), "u1", st("{}"), 10).unwrap();
        p.track(mid(1, 1), "u1", st(r#"{"tab":2}"#), 10).unwrap();
        p.track(mid(0, 2), "u2", st(r#"{ "x" : 1 }"#), 10).unwrap();
        assert_eq!(v(&p.state()), json!({}), "state as of the last diff");
        p.take_diff();
        let s = v(&p.state());
        assert_eq!(s["u1"]["metas"].as_array().unwrap().len(), 2);
        assert_eq!(s["u2"]["metas"][0]["x"], 1);
        let refs: std::collections::HashSet<String> = ["u1", "u2"]
            .iter()
            .flat_map(|k| s[*k]["metas"].as_array().unwrap().iter().map(|m| m["phx_ref"].as_str().unwrap().to_string()))
            .collect();
        assert_eq!(refs.len(), 3);
        assert_eq!(v(&Presence::new("F").state()), json!({}));
    }

    #[test]
    fn join_and_leave_in_one_window_cancel() {
        let mut p = Presence::new("F");
        p.track(mid(0, 1), "a", st("{}"), 10).unwrap();
        p.take_diff();
        p.track(mid(0, 2), "b", st("{}"), 10).unwrap();
        p.untrack(mid(0, 2));
        p.untrack(mid(0, 1));
        let d = v(&p.take_diff().unwrap());
        assert_eq!(d["joins"], json!({}));
        assert_eq!(d["leaves"]["a"]["metas"].as_array().unwrap().len(), 1);
        assert!(d["leaves"].get("b").is_none());
    }

    #[test]
    fn limit_and_cache() {
        let mut p = Presence::new("F");
        p.track(mid(0, 1), "a", st("{}"), 2).unwrap();
        p.track(mid(0, 2), "b", st("{}"), 2).unwrap();
        assert_eq!(p.track(mid(0, 3), "c", st("{}"), 2), Err(PresenceError::TooManyEntries(2)));
        // updating an existing member is fine at the limit
        assert_eq!(p.track(mid(0, 2), "b", st(r#"{"k":1}"#), 2), Ok(Tracked::Updated));
        p.take_diff();
        let a = p.state();
        p.untrack(mid(0, 1));
        let b = p.state();
        assert_eq!(a.as_ptr(), b.as_ptr(), "one encoding per window, shared by its joiners");
        p.take_diff();
        assert_ne!(p.state(), a);
    }

    /// Replays Phoenix's client-side `syncDiff` (joins, then leaves, matched by `phx_ref`).
    fn apply(state: &mut Value, diff: &Value) {
        for (key, g) in diff["joins"].as_object().unwrap() {
            let new: Vec<Value> = g["metas"].as_array().unwrap().clone();
            let refs: Vec<&Value> = new.iter().map(|m| &m["phx_ref"]).collect();
            let cur = state.as_object_mut().unwrap().entry(key).or_insert(json!({"metas": []}));
            let mut metas: Vec<Value> =
                cur["metas"].as_array().unwrap().iter().filter(|m| !refs.contains(&&m["phx_ref"])).cloned().collect();
            metas.extend(new.iter().cloned());
            cur["metas"] = Value::Array(metas);
        }
        for (key, g) in diff["leaves"].as_object().unwrap() {
            let refs: Vec<Value> = g["metas"].as_array().unwrap().iter().map(|m| m["phx_ref"].clone()).collect();
            if let Some(cur) = state.get_mut(key) {
                let metas: Vec<Value> = cur["metas"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .filter(|m| !refs.contains(&m["phx_ref"]))
                    .cloned()
                    .collect();
                if metas.is_empty() {
                    state.as_object_mut().unwrap().remove(key);
                } else {
                    cur["metas"] = Value::Array(metas);
                }
            }
        }
    }

    fn canon(s: &Value) -> Vec<(String, String)> {
        let mut v: Vec<(String, String)> = s
            .as_object()
            .unwrap()
            .iter()
            .flat_map(|(k, g)| g["metas"].as_array().unwrap().iter().map(move |m| (k.clone(), m.to_string())))
            .collect();
        v.sort();
        v
    }

    #[test]
    fn state_plus_next_diff_is_exact_for_any_interleaving() {
        // A joiner that fetches the state at any point inside a window, then applies the
        // window's diff, must see exactly the current state.
        let mut rng = fastrand::Rng::with_seed(7);
        let mut p = Presence::new("F");
        for _round in 0..300 {
            let mut joiners: Vec<Value> = Vec::new();
            for _ in 0..rng.usize(1..12) {
                let m = MemberId { run: 0, shard: 0, conn: rng.u64(0..6) };
                match rng.u8(0..4) {
                    0 => {
                        p.untrack(m);
                    }
                    _ => {
                        let key = format!("k{}", rng.u8(0..3));
                        let _ = p.track(m, &key, st(&format!(r#"{{"v":{}}}"#, rng.u8(0..3))), 100);
                    }
                }
                if rng.bool() {
                    joiners.push(v(&p.state()));
                }
            }
            let diff = p.take_diff().map(|d| v(&d));
            let truth = v(&p.state());
            for mut j in joiners {
                if let Some(d) = &diff {
                    apply(&mut j, d);
                }
                assert_eq!(canon(&j), canon(&truth));
            }
        }
    }

    #[test]
    fn burst_is_one_diff() {
        let mut p = Presence::new("F");
        for i in 0..10_000u64 {
            p.track(mid(0, i), &format!("user-{i}"), st(r#"{"online":true}"#), 20_000).unwrap();
        }
        let d = v(&p.take_diff().unwrap());
        assert_eq!(d["joins"].as_object().unwrap().len(), 10_000);
        assert_eq!(v(&p.state()).as_object().unwrap().len(), 10_000);
    }
}
