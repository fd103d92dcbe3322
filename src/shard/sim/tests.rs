//! The owner's ordering rules, tested on simulated shards under many seeded interleavings.

use std::collections::{BTreeMap, HashMap};

use serde_json::{json, Value};

use super::{Frame, Sim, SimConn};
use crate::protocol::phoenix::{Topic, Vsn};

/// Interleavings tried per property.
const SEEDS: u64 = 300;

/// A topic name owned by shard `owner` of `n`.
fn topic_owned_by(owner: usize, n: usize, prefix: &str) -> String {
    (0..).map(|i| format!("{prefix}{i}")).find(|t| Topic::new(t, false).unwrap().owner(n) == owner).unwrap()
}

fn join(sim: &mut Sim, c: SimConn, topic: &str, jr: &str, config: Value) {
    let msg = json!([jr, jr, format!("realtime:{topic}"), "phx_join", {"config": config}]);
    sim.push_text(c, &msg.to_string());
}

fn publish(sim: &mut Sim, c: SimConn, topic: &str, jr: &str, n: u64) {
    let msg = json!([jr, format!("p{n}"), format!("realtime:{topic}"), "broadcast", {"type": "broadcast", "event": "m", "payload": {"n": n}}]);
    sim.push_text(c, &msg.to_string());
}

fn is_reply(v: &Value, msg_ref: &str) -> bool {
    v[3] == "phx_reply" && v[1] == msg_ref
}

/// `(n, offset)` of every broadcast among `frames`, in order.
fn broadcasts(frames: &[Value]) -> Vec<(u64, u64)> {
    frames
        .iter()
        .filter(|v| v[3] == "broadcast")
        .map(|v| (v[4]["payload"]["n"].as_u64().unwrap(), v[4]["meta"]["offset"].as_u64().unwrap()))
        .collect()
}

fn texts(frames: Vec<Frame>) -> Vec<Value> {
    frames.into_iter().map(|f| f.json().clone()).collect()
}

/// A joiner on a shard that does not own the topic gets its reply only once the owner has
/// registered the shard's interest, and from then on every message: nothing before the reply,
/// nothing missed after it. Other subscribers of the joiner's shard come and go meanwhile
/// (interest removed and re-added while messages are in flight).
#[test]
fn join_reply_waits_for_the_owner_and_nothing_after_it_is_missed() {
    for seed in 0..SEEDS {
        let mut sim = Sim::new(2, seed, &[]);
        let topic = topic_owned_by(1, 2, "held");
        let p = sim.connect(1, Vsn::V2);
        join(&mut sim, p, &topic, "1", json!({}));
        let mut churn = sim.connect(0, Vsn::V2);
        let c = sim.connect(0, Vsn::V2);
        let mut log: Vec<Value> = Vec::new();
        let (mut published, mut reply_at, mut joined) = (0u64, None, false);
        while published < 40 {
            match sim.rng().u8(0..6) {
                0 | 1 => {
                    published += 1;
                    publish(&mut sim, p, &topic, "1", published);
                }
                2 if !joined => {
                    join(&mut sim, c, &topic, "7", json!({}));
                    joined = true;
                }
                3 => {
                    // churn on the joiner's shard: subscribe, leave, disconnect
                    match sim.rng().u8(0..3) {
                        0 => join(&mut sim, churn, &topic, "3", json!({})),
                        1 => sim.push_text(
                            churn,
                            &json!(["3", "9", format!("realtime:{topic}"), "phx_leave", {}]).to_string(),
                        ),
                        _ => {
                            sim.disconnect(churn);
                            churn = sim.connect(0, Vsn::V2);
                        }
                    }
                }
                _ => {
                    sim.step();
                }
            }
            log.extend(texts(sim.frames(c)));
            if reply_at.is_none() && log.iter().any(|v| is_reply(v, "7")) {
                reply_at = Some(published);
            }
        }
        if !joined {
            join(&mut sim, c, &topic, "7", json!({}));
        }
        sim.settle();
        log.extend(texts(sim.frames(c)));
        let reply_at = reply_at.unwrap_or(published);
        assert!(
            is_reply(&log[0], "7") && log[0][4]["status"] == "ok",
            "seed {seed}: the join reply comes first: {log:?}"
        );
        let got = broadcasts(&log);
        let ns: Vec<u64> = got.iter().map(|g| g.0).collect();
        if let Some(&first) = ns.first() {
            assert_eq!(ns, (first..=published).collect::<Vec<_>>(), "seed {seed}: a gap or a duplicate");
            assert!(first <= reply_at + 1, "seed {seed}: missed {}..{first} after the reply: {log:?}", reply_at + 1);
        } else {
            assert_eq!(reply_at, published, "seed {seed}: nothing received after the reply");
        }
    }
}

/// A resume during concurrent publishing: the backlog, then live messages, with no gap and no
/// duplicate, wherever the resumer, the publisher and the owner are.
#[test]
fn resume_backlog_then_live_without_gap_or_duplicate() {
    for seed in 0..SEEDS {
        let mut sim = Sim::new(3, seed, &[]);
        let owner = sim.rng().usize(0..3);
        let topic = topic_owned_by(owner, 3, "resume");
        let pub_shard = sim.rng().usize(0..3);
        let p = sim.connect(pub_shard, Vsn::V2);
        join(&mut sim, p, &topic, "1", json!({"broadcast": {"self": true}}));
        sim.settle();
        for n in 1..=10 {
            publish(&mut sim, p, &topic, "1", n);
        }
        sim.settle();
        let seen = texts(sim.frames(p));
        let epoch =
            seen.iter().find(|v| v[3] == "broadcast").unwrap()[4]["meta"]["epoch"].as_str().unwrap().to_string();
        let shard = sim.rng().usize(0..3);
        let c = sim.connect(shard, Vsn::V2);
        let from = sim.rng().u64(0..=10);
        let mut n = 10;
        let mut resumed = false;
        while n < 30 {
            match sim.rng().u8(0..4) {
                0 if !resumed => {
                    join(&mut sim, c, &topic, "5", json!({"broadcast": {"resume": {"epoch": epoch, "offset": from}}}));
                    resumed = true;
                }
                1 | 2 => {
                    n += 1;
                    publish(&mut sim, p, &topic, "1", n);
                }
                _ => {
                    sim.step();
                }
            }
        }
        if !resumed {
            join(&mut sim, c, &topic, "5", json!({"broadcast": {"resume": {"epoch": epoch, "offset": from}}}));
        }
        sim.settle();
        let log = texts(sim.frames(c));
        assert!(is_reply(&log[0], "5"), "seed {seed}: {:?}", log[0]);
        let offsets: Vec<u64> = broadcasts(&log).iter().map(|b| b.1).collect();
        assert_eq!(offsets, (from + 1..=30).collect::<Vec<_>>(), "seed {seed}: resume from {from}");
    }
}

/// A kind-3 push: `[3, lens.., encoding, join_ref, ref, topic, event, metadata, payload]`.
fn kind3(jr: &str, r: &str, topic: &str, metadata: &str, payload: &str) -> Vec<u8> {
    let wire = format!("realtime:{topic}");
    let parts = [jr, r, &wire, "m", metadata];
    let mut b = vec![3];
    b.extend(parts.iter().map(|p| p.len() as u8));
    b.push(1);
    for p in parts {
        b.extend_from_slice(p.as_bytes());
    }
    b.extend_from_slice(payload.as_bytes());
    b
}

/// The `ack` of a persisted message comes only after the owner's log sync covers it; one of a
/// message that was not persisted does not wait; acknowledgements keep their order.
#[test]
fn durable_ack_follows_its_sync() {
    for seed in 0..20 {
        let mut sim = Sim::new(2, seed, &[]);
        let topic = topic_owned_by(1, 2, "durable");
        let c = sim.connect(0, Vsn::V2);
        join(&mut sim, c, &topic, "1", json!({"broadcast": {"ack": true}}));
        sim.settle();
        assert!(is_reply(&sim.frames(c)[0].json().clone(), "1"));
        sim.push_binary(c, &kind3("1", "20", &topic, r#"{"persist":true}"#, r#"{"n":1}"#));
        sim.push_binary(c, &kind3("1", "21", &topic, "", r#"{"n":2}"#));
        sim.push_binary(c, &kind3("1", "22", &topic, r#"{"persist":true}"#, r#"{"n":3}"#));
        sim.run();
        let acks = |frames: Vec<Frame>| -> Vec<String> {
            frames
                .iter()
                .filter(|f| f.json()[3] == "phx_reply")
                .map(|f| f.json()[1].as_str().unwrap().to_string())
                .collect()
        };
        assert_eq!(
            acks(sim.frames(c)),
            ["21"],
            "seed {seed}: only the non-persisted message is acknowledged before the sync"
        );
        sim.sync_log(0);
        sim.run();
        assert!(acks(sim.frames(c)).is_empty(), "seed {seed}: another shard's sync covers nothing");
        sim.sync_log(1);
        sim.run();
        assert_eq!(acks(sim.frames(c)), ["20", "22"], "seed {seed}: the owner's sync releases both, in order");
    }
}

/// After the reply to a `phx_leave` (or a disconnect), no broadcast of that channel reaches the
/// connection, whatever is still in flight; a rejoin gets messages again only after its reply.
#[test]
fn no_delivery_after_leave() {
    for seed in 0..SEEDS {
        let mut sim = Sim::new(2, seed, &[]);
        let topic = topic_owned_by(1, 2, "leave");
        let p = sim.connect(1, Vsn::V2);
        join(&mut sim, p, &topic, "1", json!({}));
        let c = sim.connect(0, Vsn::V2);
        join(&mut sim, c, &topic, "2", json!({}));
        let gone = sim.connect(0, Vsn::V2);
        join(&mut sim, gone, &topic, "3", json!({}));
        let (mut n, mut left, mut rejoined) = (0, false, false);
        let mut log = Vec::new();
        while n < 40 {
            match sim.rng().u8(0..8) {
                0 if !left => {
                    sim.push_text(c, &json!(["2", "L", format!("realtime:{topic}"), "phx_leave", {}]).to_string());
                    left = true;
                }
                1 if left && !rejoined => {
                    join(&mut sim, c, &topic, "4", json!({}));
                    rejoined = true;
                }
                2 => sim.disconnect(gone),
                3..=5 => {
                    n += 1;
                    publish(&mut sim, p, &topic, "1", n);
                }
                _ => {
                    sim.step();
                }
            }
            log.extend(texts(sim.frames(c)));
        }
        sim.settle();
        log.extend(texts(sim.frames(c)));
        assert!(sim.frames(gone).is_empty() && sim.closing(gone));
        if !left {
            continue;
        }
        let leave_at =
            log.iter().position(|v| is_reply(v, "L")).unwrap_or_else(|| panic!("seed {seed}: no leave reply"));
        let rejoin_at = log.iter().position(|v| is_reply(v, "4")).unwrap_or(log.len());
        assert!(rejoin_at > leave_at);
        assert!(
            log[leave_at..rejoin_at].iter().all(|v| v[3] != "broadcast"),
            "seed {seed}: a broadcast between the leave and the rejoin: {:?}",
            &log[leave_at..rejoin_at]
        );
        let before = broadcasts(&log[..leave_at]);
        let after = broadcasts(&log[rejoin_at.min(log.len())..]);
        for part in [before, after] {
            let ns: Vec<u64> = part.iter().map(|b| b.0).collect();
            if let (Some(&a), Some(&b)) = (ns.first(), ns.last()) {
                assert_eq!(ns, (a..=b).collect::<Vec<_>>(), "seed {seed}: gap or duplicate");
            }
        }
    }
}

/// A presence client as phoenix.js and realtime-js implement it: diffs before the first state
/// are held and applied after it; a state replaces everything; joins are deduplicated by
/// `phx_ref`, leaves remove by `phx_ref`.
#[derive(Default, Debug)]
struct View {
    synced: bool,
    pending: Vec<Value>,
    /// key → metas
    state: BTreeMap<String, Vec<Value>>,
}

impl View {
    fn on(&mut self, v: &Value) {
        match v[3].as_str() {
            Some("presence_state") => {
                self.state = v[4]
                    .as_object()
                    .unwrap()
                    .iter()
                    .map(|(k, e)| (k.clone(), e["metas"].as_array().unwrap().clone()))
                    .collect();
                self.synced = true;
                for d in std::mem::take(&mut self.pending) {
                    self.diff(&d);
                }
            }
            Some("presence_diff") if !self.synced => self.pending.push(v[4].clone()),
            Some("presence_diff") => self.diff(&v[4].clone()),
            _ => {}
        }
    }

    fn diff(&mut self, d: &Value) {
        for (k, e) in d["joins"].as_object().unwrap() {
            let metas = self.state.entry(k.clone()).or_default();
            for m in e["metas"].as_array().unwrap() {
                if !metas.iter().any(|x| x["phx_ref"] == m["phx_ref"]) {
                    metas.push(m.clone());
                }
            }
        }
        for (k, e) in d["leaves"].as_object().unwrap() {
            if let Some(metas) = self.state.get_mut(k) {
                for m in e["metas"].as_array().unwrap() {
                    metas.retain(|x| x["phx_ref"] != m["phx_ref"]);
                }
                if metas.is_empty() {
                    self.state.remove(k);
                }
            }
        }
    }

    /// `(key, v)` of every meta, sorted.
    fn members(&self) -> Vec<(String, u64)> {
        let mut v: Vec<(String, u64)> = self
            .state
            .iter()
            .flat_map(|(k, metas)| metas.iter().map(move |m| (k.clone(), m["v"].as_u64().unwrap())))
            .collect();
        v.sort();
        v
    }
}

/// One simulated client of the presence property test.
struct Member {
    conn: SimConn,
    key: String,
    /// The join ref of the current join, if joined.
    joined: Option<u32>,
    tracked: Option<u64>,
    view: View,
}

/// Presence converges: under random interleavings of join, track (and re-track), untrack,
/// leave, disconnect and mesh delivery across three shards, once everything is delivered every
/// joined client's view equals the set of members actually tracked.
#[test]
fn presence_converges_under_random_interleavings() {
    let mut nontrivial = 0;
    for seed in 0..SEEDS {
        let mut sim = Sim::new(3, seed, &[]);
        let owner = sim.rng().usize(0..3);
        let topic = topic_owned_by(owner, 3, "pres");
        let wire = format!("realtime:{topic}");
        let mut members: Vec<Member> = Vec::new();
        let mut next_ref = 10u32;
        for op in 0..120 {
            let i = sim.rng().usize(0..8);
            if i >= members.len() {
                let shard = sim.rng().usize(0..3);
                let conn = sim.connect(shard, Vsn::V2);
                // a few shared keys: several connections of one user
                let key = format!("user{}", sim.rng().u8(0..5));
                members.push(Member { conn, key, joined: None, tracked: None, view: View::default() });
                continue;
            }
            let m = &mut members[i];
            for f in sim.frames(m.conn) {
                m.view.on(f.json());
            }
            match sim.rng().u8(0..10) {
                0 | 1 if m.joined.is_none() => {
                    next_ref += 1;
                    m.view = View::default();
                    let cfg = json!({"presence": {"key": m.key, "enabled": true}});
                    join(&mut sim, m.conn, &topic, &next_ref.to_string(), cfg);
                    m.joined = Some(next_ref);
                }
                2 | 3 if m.joined.is_some() => {
                    let v = sim.rng().u64(0..1000);
                    let jr = m.joined.unwrap().to_string();
                    let msg = json!([jr, format!("t{op}"), wire, "presence", {"type": "presence", "event": "track", "payload": {"v": v}}]);
                    sim.push_text(m.conn, &msg.to_string());
                    m.tracked = Some(v);
                }
                4 if m.joined.is_some() => {
                    let jr = m.joined.unwrap().to_string();
                    let msg = json!([jr, format!("u{op}"), wire, "presence", {"type": "presence", "event": "untrack"}]);
                    sim.push_text(m.conn, &msg.to_string());
                    m.tracked = None;
                }
                5 if m.joined.is_some() => {
                    let jr = m.joined.unwrap().to_string();
                    sim.push_text(m.conn, &json!([jr, format!("l{op}"), wire, "phx_leave", {}]).to_string());
                    m.joined = None;
                    m.tracked = None;
                }
                6 => {
                    sim.disconnect(m.conn);
                    let shard = sim.rng().usize(0..3);
                    m.conn = sim.connect(shard, Vsn::V2);
                    m.joined = None;
                    m.tracked = None;
                    m.view = View::default();
                }
                7 => sim.flush_presence(owner),
                _ => {
                    for _ in 0..sim.rng().usize(1..4) {
                        sim.step();
                    }
                }
            }
        }
        sim.settle();
        let mut expected: Vec<(String, u64)> =
            members.iter().filter(|m| m.joined.is_some()).filter_map(|m| Some((m.key.clone(), m.tracked?))).collect();
        expected.sort();
        nontrivial += usize::from(expected.len() >= 2);
        let mut seen: HashMap<usize, Vec<(String, u64)>> = HashMap::new();
        for (i, m) in members.iter_mut().enumerate() {
            for f in sim.frames(m.conn) {
                m.view.on(f.json());
            }
            if m.joined.is_some() {
                assert!(m.view.synced, "seed {seed}: member {i} never got presence_state");
                seen.insert(i, m.view.members());
            }
        }
        for (i, got) in seen {
            assert_eq!(got, expected, "seed {seed}: member {i}'s view differs from the tracked members");
        }
    }
    assert!(nontrivial as u64 > SEEDS / 4, "only {nontrivial} runs ended with two or more members");
}
