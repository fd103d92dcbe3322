//! Cluster mode: several real nodes on loopback sharing one real PostgreSQL
//! (`--cluster postgres`) or one real `nats-server -js` (`--cluster nats://…`). Each scenario
//! runs against both engines: broadcasts in one order everywhere (WebSocket, REST, SSE),
//! presence across nodes with a killed node's members leaving and no ghosts after its
//! restart, resume on another node under concurrent publishing, shared history, the engine
//! restarted mid-stream, realtime-js. Postgres only: the clean-up of a dead node's replication
//! slot, a message the database refuses. NATS only: Postgres changes on every node.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::util::nats::Nats;
use crate::util::pg::{PrivatePg, TestDb};
use crate::util::{http, Client, Msg, Server, SseClient};

/// What a test's nodes share.
enum Engine {
    Pg(TestDb),
    Nats(Nats),
}

impl Engine {
    fn pg(name: &str) -> Engine {
        Engine::Pg(TestDb::new(name))
    }

    fn nats() -> Engine {
        Engine::Nats(Nats::start())
    }

    /// A node of this cluster.
    fn node(&self, id: &str, extra: &[&str]) -> Server {
        match self {
            Engine::Pg(db) => node(db, id, extra),
            Engine::Nats(n) => {
                let url = n.url();
                let mut args = vec!["--cluster", &url, "--node-id", id];
                args.extend_from_slice(extra);
                Server::start(&args)
            }
        }
    }
}

/// A node of a cluster on `db`.
fn node(db: &TestDb, id: &str, extra: &[&str]) -> Server {
    let url = db.url();
    let mut args = vec!["--cluster", "postgres", "--slot", db.slot(), "--node-id", id];
    args.extend_from_slice(extra);
    Server::start_with_env(&args, &[("DATABASE_URL", &url)])
}

fn health(srv: &Server) -> Value {
    let (st, _, body) = http(srv.addr, "GET", "/health", &[], b"");
    assert_eq!(st, 200);
    serde_json::from_slice(&body).unwrap()
}

/// Waits until every node lists exactly `ids` as its members.
fn wait_members(nodes: &[&Server], ids: &[&str]) {
    let want: Vec<Value> = ids.iter().map(|s| json!(s)).collect();
    let deadline = Instant::now() + Duration::from_secs(20);
    for n in nodes {
        loop {
            let h = health(n);
            if h["members"].as_array() == Some(&want) {
                assert!(h["cluster"] == "postgres" || h["cluster"] == "nats", "{h}");
                break;
            }
            assert!(Instant::now() < deadline, "members never became {ids:?}: {h}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

fn broadcast(topic: &str, seq: u64) -> Value {
    json!(["p", null, format!("realtime:{topic}"), "broadcast", {"type": "broadcast", "event": "n", "payload": {"seq": seq}}])
}

/// The next broadcast's (offset, payload) (skipping replies and system messages).
fn next_broadcast(c: &mut Client) -> (u64, Value) {
    loop {
        let m = c.recv_json();
        if m[3] == "broadcast" {
            return (m[4]["meta"]["offset"].as_u64().unwrap(), m[4]["payload"].clone());
        }
    }
}

#[test]
fn cluster_broadcasts_reach_every_node_in_one_order() {
    one_order(Engine::pg("cc_cl_order"));
}

#[test]
fn nats_cluster_broadcasts_reach_every_node_in_one_order() {
    one_order(Engine::nats());
}

/// A WebSocket publisher on A and REST on B, both on one topic (the engine must serialize two
/// nodes publishing at once): one dense order on all three nodes and over SSE on C.
fn one_order(e: Engine) {
    let nodes = [e.node("n-a", &[]), e.node("n-b", &[]), e.node("n-c", &[])];
    wait_members(&[&nodes[0], &nodes[1], &nodes[2]], &["n-a", "n-b", "n-c"]);
    for n in &nodes {
        let (st, headers, _) = http(n.addr, "GET", "/health", &[], b"");
        assert_eq!(st, 200);
        assert!(headers.to_ascii_lowercase().contains("x-corecast-node: n-"), "{headers}");
    }
    // A subscriber on every node, an SSE stream on the third.
    let mut subs: Vec<Client> = nodes
        .iter()
        .map(|n| {
            let mut c = Client::connect(&n.ws_url("2.0.0"));
            assert_eq!(c.join_v2("room", "s", json!({}))[4]["status"], "ok");
            c
        })
        .collect();
    let mut sse = SseClient::open(nodes[2].addr, "/realtime/v1/sse?topic=room", &[]).unwrap();
    // Two publishers at once: a WebSocket on node A (acks, self: false) and REST on node B.
    let mut wsp = Client::connect(&nodes[0].ws_url("2.0.0"));
    let r = wsp.join_v2("room", "p", json!({"broadcast": {"ack": true, "self": false}}));
    assert_eq!(r[4]["status"], "ok");
    let per = 150u64;
    let rest_addr = nodes[1].addr;
    let rest = std::thread::spawn(move || {
        for i in 0..per {
            let body = json!({"messages": [{"topic": "room", "event": "n", "payload": {"rest": i}}]}).to_string();
            let (st, _, _) = http(
                rest_addr,
                "POST",
                "/realtime/v1/api/broadcast",
                &[("content-type", "application/json")],
                body.as_bytes(),
            );
            assert_eq!(st, 202);
        }
    });
    let mut acks = 0;
    for i in 0..per {
        wsp.send_json(&json!(["p", i.to_string(), "realtime:room", "broadcast", {"type": "broadcast", "event": "n", "payload": {"ws": i}}]));
    }
    while acks < per {
        let m = wsp.recv_json();
        match m[3].as_str() {
            Some("phx_reply") => {
                assert_eq!(m[4]["status"], "ok", "{m}");
                acks += 1;
            }
            Some("broadcast") if m[4]["payload"]["ws"].is_u64() => {
                panic!("self: false, yet the publisher got its own message: {m}")
            }
            _ => {}
        }
    }
    rest.join().unwrap();
    let total = 2 * per;
    let mut seen: Vec<Vec<(u64, Value)>> = Vec::new();
    for c in subs.iter_mut() {
        seen.push((0..total).map(|_| next_broadcast(c)).collect());
    }
    let offsets: Vec<u64> = seen[0].iter().map(|m| m.0).collect();
    assert_eq!(offsets, (1..=total).collect::<Vec<_>>(), "one dense sequence of cluster-wide offsets");
    for (i, s) in seen.iter().enumerate().skip(1) {
        assert_eq!(s, &seen[0], "node {i} delivered another order than node 0");
    }
    // Each publisher's messages keep their order.
    for key in ["ws", "rest"] {
        let mine: Vec<u64> = seen[0].iter().filter_map(|m| m.1[key].as_u64()).collect();
        assert_eq!(mine, (0..per).collect::<Vec<_>>(), "{key}");
    }
    let mut sse_offsets = Vec::new();
    while sse_offsets.len() < total as usize {
        let e = sse.next().expect("sse event");
        if e.event == "broadcast" {
            sse_offsets.push(e.data["meta"]["offset"].as_u64().unwrap());
        }
    }
    assert_eq!(sse_offsets, offsets, "SSE on node C: the same order");
    for c in subs.iter_mut() {
        assert!(c.try_recv(Duration::from_millis(200)).is_none(), "no duplicate");
    }
}

fn track(c: &mut Client, jr: &str, topic: &str, state: Value) {
    c.send_json(&json!([jr, "t", format!("realtime:{topic}"), "presence", {"type": "presence", "event": "track", "payload": state}]));
}

/// Presence as a client on `node` sees it: the keys in a fresh `presence_state`.
fn presence_keys(node: &Server, topic: &str) -> HashSet<String> {
    let mut c = Client::connect(&node.ws_url("2.0.0"));
    let r = c.join_v2(topic, "q", json!({"presence": {"key": "observer", "enabled": true}}));
    assert_eq!(r[4]["status"], "ok");
    loop {
        let m = c.recv_json();
        if m[3] == "presence_state" {
            return m[4].as_object().unwrap().keys().cloned().collect();
        }
    }
}

fn wait_presence(node: &Server, topic: &str, want: &[&str], within: Duration) -> Duration {
    let t0 = Instant::now();
    let want: HashSet<String> = want.iter().map(|s| s.to_string()).collect();
    loop {
        let got = presence_keys(node, topic);
        if got == want {
            return t0.elapsed();
        }
        assert!(t0.elapsed() < within, "presence on {} is {got:?}, want {want:?}", node.addr);
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn cluster_presence_spans_nodes_and_a_killed_node_leaves_without_ghosts() {
    presence_across_nodes(Engine::pg("cc_cl_pres"));
}

#[test]
fn nats_cluster_presence_spans_nodes_and_a_killed_node_leaves_without_ghosts() {
    presence_across_nodes(Engine::nats());
}

fn presence_across_nodes(e: Engine) {
    let a = e.node("p-a", &[]);
    let b = e.node("p-b", &[]);
    let c = e.node("p-c", &[]);
    wait_members(&[&a, &b, &c], &["p-a", "p-b", "p-c"]);
    // Alice on A, Bob on B; Carol watches on C through diffs.
    let mut carol = Client::connect(&c.ws_url("2.0.0"));
    assert_eq!(carol.join_v2("lobby", "c", json!({"presence": {"key": "carol", "enabled": true}}))[4]["status"], "ok");
    let mut alice = Client::connect(&a.ws_url("2.0.0"));
    assert_eq!(alice.join_v2("lobby", "a", json!({"presence": {"key": "alice", "enabled": true}}))[4]["status"], "ok");
    track(&mut alice, "a", "lobby", json!({"status": "online"}));
    let mut bob = Client::connect(&b.ws_url("2.0.0"));
    assert_eq!(bob.join_v2("lobby", "b", json!({"presence": {"key": "bob", "enabled": true}}))[4]["status"], "ok");
    track(&mut bob, "b", "lobby", json!({"status": "away"}));
    let mut joined = HashSet::new();
    let t0 = Instant::now();
    while joined.len() < 2 {
        let m = carol.recv_json();
        if m[3] == "presence_diff" {
            for (k, v) in m[4]["joins"].as_object().unwrap() {
                if k == "alice" {
                    assert_eq!(v["metas"][0]["status"], "online");
                }
                joined.insert(k.clone());
            }
        }
        assert!(t0.elapsed() < Duration::from_secs(10));
    }
    assert_eq!(joined, HashSet::from(["alice".to_string(), "bob".to_string()]));
    for n in [&a, &b, &c] {
        wait_presence(n, "lobby", &["alice", "bob"], Duration::from_secs(5));
    }
    // An update on A is seen on C as leave + join.
    track(&mut alice, "a", "lobby", json!({"status": "busy"}));
    loop {
        let m = carol.recv_json();
        if m[3] == "presence_diff" && m[4]["joins"]["alice"].is_object() {
            assert_eq!(m[4]["joins"]["alice"]["metas"][0]["status"], "busy");
            assert!(m[4]["leaves"]["alice"].is_object());
            break;
        }
    }
    // SIGKILL node A: alice leaves everywhere within the lease.
    let t_kill = Instant::now();
    drop(alice);
    let a = a.crash_and_restart_later();
    loop {
        assert!(t_kill.elapsed() < Duration::from_secs(15), "alice never left");
        if let Some(Msg::Json(m)) = carol.try_recv(Duration::from_millis(500)) {
            if m[3] == "presence_diff" && m[4]["leaves"]["alice"].is_object() {
                break;
            }
        }
    }
    let took = t_kill.elapsed();
    assert!(took < Duration::from_secs(10), "alice left after {took:?}");
    wait_presence(&b, "lobby", &["bob"], Duration::from_secs(2));
    // A comes back (same node id and data dir): no ghost of alice, and its new members count.
    let a = a.start();
    wait_members(&[&a, &b, &c], &["p-a", "p-b", "p-c"]);
    for n in [&a, &b, &c] {
        wait_presence(n, "lobby", &["bob"], Duration::from_secs(5));
    }
    let mut dave = Client::connect(&a.ws_url("2.0.0"));
    assert_eq!(dave.join_v2("lobby", "d", json!({"presence": {"key": "dave", "enabled": true}}))[4]["status"], "ok");
    track(&mut dave, "d", "lobby", json!({}));
    wait_presence(&c, "lobby", &["bob", "dave"], Duration::from_secs(5));
    // Bob's node stops cleanly: its members leave at once, not after the lease.
    drop(bob);
    let t_stop = Instant::now();
    let (status, _) = b.terminate();
    assert!(status.success());
    wait_presence(&c, "lobby", &["dave"], Duration::from_secs(3));
    assert!(t_stop.elapsed() < Duration::from_secs(5));
}

#[test]
fn cluster_resume_on_another_node_is_gapless_under_concurrent_publishing() {
    resume_elsewhere(Engine::pg("cc_cl_resume"));
}

#[test]
fn nats_cluster_resume_on_another_node_is_gapless_under_concurrent_publishing() {
    resume_elsewhere(Engine::nats());
}

fn resume_elsewhere(e: Engine) {
    let w = ["--window-messages", "100000"];
    let nodes = [e.node("r-a", &w), e.node("r-b", &w), e.node("r-c", &w)];
    wait_members(&[&nodes[0], &nodes[1], &nodes[2]], &["r-a", "r-b", "r-c"]);
    let mut publ = Client::connect(&nodes[0].ws_url("2.0.0"));
    publ.join_v2("stream", "p", json!({}));
    let mut sub = Client::connect(&nodes[1].ws_url("2.0.0"));
    sub.join_v2("stream", "s", json!({}));
    let total = 2000u64;
    let done = Arc::new(AtomicBool::new(false));
    let publisher = {
        let done = done.clone();
        std::thread::spawn(move || {
            for i in 0..total {
                publ.send_json(&broadcast("stream", i));
                if i % 50 == 0 {
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
            done.store(true, Ordering::SeqCst);
            publ
        })
    };
    let mut seqs = Vec::new();
    let mut last: Option<(String, u64)> = None;
    // Read a while, vanish mid-stream, resume on another node; three times.
    for (round, to) in [(0usize, 2usize), (1, 0), (2, 1)] {
        while seqs.len() < 400 * (round + 1) {
            let m = sub.recv_json();
            if m[3] != "broadcast" {
                continue;
            }
            seqs.push(m[4]["payload"]["seq"].as_u64().unwrap());
            last =
                Some((m[4]["meta"]["epoch"].as_str().unwrap().to_string(), m[4]["meta"]["offset"].as_u64().unwrap()));
        }
        drop(sub);
        std::thread::sleep(Duration::from_millis(50)); // messages keep flowing while away
        let (epoch, offset) = last.clone().unwrap();
        sub = Client::connect(&nodes[to].ws_url("2.0.0"));
        let r = sub.join_v2("stream", "s", json!({"broadcast": {"resume": {"epoch": epoch, "offset": offset}}}));
        assert_eq!(r[4]["status"], "ok", "{r}");
    }
    while (seqs.len() as u64) < total {
        let m = sub.recv_json();
        if m[3] == "system" {
            panic!("resume failed: {m}");
        }
        if m[3] == "broadcast" {
            seqs.push(m[4]["payload"]["seq"].as_u64().unwrap());
        }
    }
    let _ = publisher.join().unwrap();
    assert_eq!(seqs, (0..total).collect::<Vec<_>>(), "no gap, no duplicate, in order");
    assert!(sub.try_recv(Duration::from_millis(300)).is_none());
    let late = e.node("r-late", &w);
    let mut c = Client::connect(&late.ws_url("2.0.0"));
    let (epoch, _) = last.unwrap();
    c.join_v2("stream", "s", json!({"broadcast": {"resume": {"epoch": epoch, "offset": 5}}}));
    match e {
        // Postgres: a node that started after the messages were sent has none of them
        // (unpersisted messages are not kept in the database): resuming there from an old
        // offset is refused explicitly, never a silent gap.
        Engine::Pg(_) => {
            let m = c.recv_json();
            assert_eq!(m[3], "system", "{m}");
            assert!(m[4]["message"].as_str().unwrap().starts_with("resume impossible"), "{m}");
        }
        // NATS: the stream holds them; the late node read it at start and serves the resume.
        Engine::Nats(_) => {
            let mut offsets = Vec::new();
            while (offsets.len() as u64) < total - 5 {
                let m = c.recv_json();
                assert_ne!(m[3], "system", "{m}");
                if m[3] == "broadcast" {
                    offsets.push(m[4]["meta"]["offset"].as_u64().unwrap());
                }
            }
            assert_eq!(offsets, (6..=total).collect::<Vec<_>>());
        }
    }
}

#[test]
fn cluster_persisted_history_is_shared_and_acknowledged_after_commit() {
    shared_history(Engine::pg("cc_cl_hist"));
}

#[test]
fn nats_cluster_persisted_history_is_shared_and_acknowledged_after_commit() {
    shared_history(Engine::nats());
}

fn shared_history(e: Engine) {
    let a = e.node("h-a", &[]);
    let b = e.node("h-b", &[]);
    wait_members(&[&a, &b], &["h-a", "h-b"]);
    for i in 0..5 {
        let body =
            json!({"messages": [{"topic": "log", "event": "e", "payload": {"i": i}, "persist": true}]}).to_string();
        let (st, _, _) = http(
            a.addr,
            "POST",
            "/realtime/v1/api/broadcast",
            &[("content-type", "application/json")],
            body.as_bytes(),
        );
        assert_eq!(st, 202);
    }
    // 202 came after the commit: the rows are in the shared table, with cluster offsets.
    if let Engine::Pg(db) = &e {
        assert_eq!(
            db.sql(
                "SELECT string_agg(\"offset\"::text, ',' ORDER BY \"offset\") FROM corecast.history WHERE topic = 'log'"
            ),
            "1,2,3,4,5"
        );
    }
    // Node B serves them as history (it got them from the stream).
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (st, _, body) = http(b.addr, "GET", "/realtime/v1/api/channels/log/messages?limit=10", &[], b"");
        assert_eq!(st, 200);
        let v: Value = serde_json::from_slice(&body).unwrap();
        let offs: Vec<u64> = v["messages"].as_array().unwrap().iter().map(|m| m["offset"].as_u64().unwrap()).collect();
        if offs == [5, 4, 3, 2, 1] {
            break;
        }
        assert!(Instant::now() < deadline, "history on B: {v}");
        std::thread::sleep(Duration::from_millis(50));
    }
    // A node started now loads them from the table (the stream, with NATS).
    let c = e.node("h-c", &[]);
    let (_, _, body) = http(c.addr, "GET", "/realtime/v1/api/channels/log/messages?limit=10", &[], b"");
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["messages"].as_array().unwrap().len(), 5, "{v}");
}

#[test]
fn cluster_survives_postgres_restart_without_losing_acknowledged_messages() {
    let pg = PrivatePg::start();
    let e = Engine::Pg(TestDb::on(pg.pg(), "cc_cl_pgrestart"));
    let outage = |up: bool| if up { pg.pg().start_again() } else { pg.pg().stop() };
    engine_outage(&e, Duration::from_millis(500), &outage);
}

#[test]
fn nats_cluster_survives_a_nats_restart_without_losing_acknowledged_messages() {
    let e = Engine::nats();
    let Engine::Nats(n) = &e else { unreachable!() };
    // Longer than the link's ack timeout (2 s), so that it degrades rather than waits.
    let outage = |up: bool| if up { n.start_again() } else { n.stop() };
    engine_outage(&e, Duration::from_secs(3), &outage);
}

/// The engine stops abruptly mid-stream (`outage(false)`) for at least `down`, then comes back
/// (`outage(true)`): nothing is acknowledged meanwhile, the publisher's channel is told the
/// link degraded, and everything reaches another node once, in order.
fn engine_outage(e: &Engine, down: Duration, outage: &dyn Fn(bool)) {
    let a = e.node("g-a", &[]);
    let b = e.node("g-b", &[]);
    wait_members(&[&a, &b], &["g-a", "g-b"]);
    let mut sub = Client::connect(&b.ws_url("2.0.0"));
    sub.join_v2("feed", "s", json!({}));
    let mut publ = Client::connect(&a.ws_url("2.0.0"));
    publ.join_v2("feed", "p", json!({"broadcast": {"ack": true}}));
    let total = 60u64;
    let mut acked = 0u64;
    let mut system = Vec::new();
    for i in 0..total {
        if i == 20 {
            outage(false);
        }
        if i == 30 {
            std::thread::sleep(down); // messages 20..29 wait for the engine meanwhile
            outage(true);
        }
        publ.send_json(&json!(["p", i.to_string(), "realtime:feed", "broadcast", {"type": "broadcast", "event": "n", "payload": {"seq": i}}]));
        // Up to message 20 every ack arrives promptly; while the database is down none does.
        if i < 20 {
            loop {
                let m = publ.recv_json();
                if m[3] == "phx_reply" {
                    acked += 1;
                    break;
                }
            }
        } else if (20..30).contains(&i) {
            while let Some(Msg::Json(m)) = publ.try_recv(Duration::from_millis(20)) {
                if m[3] == "phx_reply" {
                    panic!("acknowledged while the database is down: {m}");
                }
                if m[3] == "system" {
                    system.push(m);
                }
            }
        }
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while acked < total {
        assert!(Instant::now() < deadline, "only {acked} of {total} acknowledged after the restart");
        if let Some(Msg::Json(m)) = publ.try_recv(Duration::from_millis(500)) {
            match m[3].as_str() {
                Some("phx_reply") => acked += 1,
                Some("system") => system.push(m),
                _ => {}
            }
        }
    }
    assert!(
        system.iter().any(|m| m[4]["message"].as_str().is_some_and(|s| s.contains("Cluster link degraded"))),
        "the publisher's channel was told the link degraded: {system:?}"
    );
    // Everything acknowledged reaches the subscriber on B, once, in order.
    let mut seqs = Vec::new();
    while seqs.len() < total as usize {
        let m = sub.recv_json();
        if m[3] == "broadcast" {
            seqs.push(m[4]["payload"]["seq"].as_u64().unwrap());
        }
    }
    assert_eq!(seqs, (0..total).collect::<Vec<_>>());
    while let Some(Msg::Json(m)) = sub.try_recv(Duration::from_millis(300)) {
        assert_ne!(m[3], "broadcast", "duplicate: {m}");
    }
}

#[test]
fn cluster_drops_the_slot_of_a_node_gone_for_good() {
    let db = TestDb::new("cc_cl_slot");
    let ttl = ["--cluster-slot-ttl-secs", "2"];
    let a = node(&db, "s-a", &ttl);
    let b = node(&db, "s-b", &ttl);
    wait_members(&[&a, &b], &["s-a", "s-b"]);
    let slot_a = format!("{}_s_a", db.slot());
    let slots = |db: &TestDb| db.sql("SELECT string_agg(slot_name, ',' ORDER BY slot_name) FROM pg_replication_slots");
    assert!(slots(&db).contains(&slot_a), "{}", slots(&db));
    drop(a); // SIGKILL
    let deadline = Instant::now() + Duration::from_secs(20);
    while slots(&db).contains(&slot_a) {
        assert!(Instant::now() < deadline, "slot of the dead node still there: {}", slots(&db));
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(slots(&db).contains(&format!("{}_s_b", db.slot())), "the live node keeps its slot");
    wait_members(&[&b], &["s-b"]);
}

/// The unmodified realtime-js client against three nodes: `tests/js/cluster.test.mjs`.
#[test]
fn cluster_realtime_js() {
    let db = TestDb::new("cc_cl_js");
    let (url, slot) = (db.url(), db.slot().to_string());
    let env = [("DATABASE_URL", url.as_str()), ("CORECAST_SLOT", slot.as_str())];
    crate::interop::run_js_with("cluster.test.mjs", &env, Duration::from_secs(120));
}

/// The same over NATS (`CORECAST_TEST_CLUSTER` names the server).
#[test]
fn nats_cluster_realtime_js() {
    let n = Nats::start();
    let url = n.url();
    crate::interop::run_js_with(
        "cluster.test.mjs",
        &[("CORECAST_TEST_CLUSTER", url.as_str())],
        Duration::from_secs(120),
    );
}

/// NATS mode with a database: Postgres changes reach subscribers on every node (each node reads
/// its own replication slot), and a dead node's slot is dropped as in Postgres mode.
#[test]
fn nats_cluster_postgres_changes_reach_every_node() {
    let n = Nats::start();
    let db = TestDb::new("cc_cl_natspg");
    db.sql("CREATE TABLE items (id int PRIMARY KEY, name text)");
    let (url, nats) = (db.url(), n.url());
    let ttl = "2";
    let start = |id: &str| {
        let args = ["--cluster", nats.as_str(), "--slot", db.slot(), "--node-id", id, "--cluster-slot-ttl-secs", ttl];
        Server::start_with_env(&args, &[("DATABASE_URL", &url)])
    };
    let (a, b) = (start("q-a"), start("q-b"));
    wait_members(&[&a, &b], &["q-a", "q-b"]);
    let mut subs: Vec<Client> = [&a, &b]
        .iter()
        .map(|n| {
            let mut c = Client::connect(&n.ws_url("2.0.0"));
            let config =
                json!({"config": {"postgres_changes": [{"event": "INSERT", "schema": "public", "table": "items"}]}});
            c.send_json(&json!(["1", "1", "realtime:db", "phx_join", config]));
            let deadline = Instant::now() + Duration::from_secs(15);
            loop {
                assert!(Instant::now() < deadline, "never subscribed to PostgreSQL");
                let m = c.recv_json();
                if m[3] == "system" {
                    assert_eq!(m[4]["message"], "Subscribed to PostgreSQL", "{m}");
                    break;
                }
            }
            c
        })
        .collect();
    db.sql("INSERT INTO items VALUES (1, 'one'), (2, 'two')");
    for c in subs.iter_mut() {
        let ids: Vec<i64> = (0..2)
            .map(|_| loop {
                let m = c.recv_json();
                if m[3] == "postgres_changes" {
                    break m[4]["data"]["record"]["id"].as_i64().unwrap();
                }
            })
            .collect();
        assert_eq!(ids, [1, 2]);
    }
    let slot_a = format!("{}_q_a", db.slot());
    let slots = || db.sql("SELECT string_agg(slot_name, ',' ORDER BY slot_name) FROM pg_replication_slots");
    assert!(slots().contains(&slot_a), "{}", slots());
    drop(a); // SIGKILL
    let deadline = Instant::now() + Duration::from_secs(30);
    while slots().contains(&slot_a) {
        assert!(Instant::now() < deadline, "slot of the dead node still there: {}", slots());
        std::thread::sleep(Duration::from_millis(200));
    }
    wait_members(&[&b], &["q-b"]);
}

/// A message the database refuses (a NUL in a persisted message's event name: `text` cannot
/// hold it) is dropped alone; the rest of its batch and everything after go through.
#[test]
fn cluster_a_message_the_database_refuses_does_not_stop_the_link() {
    let db = TestDb::new("cc_cl_refuse");
    let a = node(&db, "f-a", &[]);
    let b = node(&db, "f-b", &[]);
    wait_members(&[&a, &b], &["f-a", "f-b"]);
    let mut sub = Client::connect(&b.ws_url("2.0.0"));
    sub.join_v2("t", "s", json!({}));
    let body = json!({"messages": [
        {"topic": "t", "event": "ok", "payload": {"n": 1}, "persist": true},
        {"topic": "t", "event": "bad\u{0}event", "payload": {"n": 2}, "persist": true},
        {"topic": "t", "event": "ok", "payload": {"n": 3}, "persist": true},
    ]})
    .to_string();
    let (st, _, _) =
        http(a.addr, "POST", "/realtime/v1/api/broadcast", &[("content-type", "application/json")], body.as_bytes());
    assert_eq!(st, 202);
    let body = json!({"messages": [{"topic": "t", "event": "ok", "payload": {"n": 4}}]}).to_string();
    let (st, _, _) =
        http(a.addr, "POST", "/realtime/v1/api/broadcast", &[("content-type", "application/json")], body.as_bytes());
    assert_eq!(st, 202);
    let got: Vec<u64> = (0..3).map(|_| next_broadcast(&mut sub).1["n"].as_u64().unwrap()).collect();
    assert_eq!(got, [1, 3, 4]);
    assert_eq!(db.sql("SELECT count(*) FROM corecast.history WHERE topic = 't'"), "2");
}

/// A NATS server without JetStream is a set-up mistake: the node exits at once (not after the
/// 30 s connect patience) with a message that says what to do. A URL nothing listens on fails
/// after the patience, naming it; a malformed one is refused by the flag parser.
#[test]
fn nats_cluster_without_jetstream_fails_fast_and_clearly() {
    let n = Nats::start_without_jetstream();
    let dir = crate::util::temp_dir("nojs");
    let t0 = Instant::now();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_corecast"))
        .args(["--listen", "127.0.0.1:0", "--cluster", &n.url(), "--data-dir"])
        .arg(&dir)
        .env_remove("DATABASE_URL")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("does not have JetStream enabled") && err.contains("-js"), "{err}");
    assert!(t0.elapsed() < Duration::from_secs(10), "took {:?}", t0.elapsed());
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_corecast"))
        .args(["--cluster", "nats://exa mple:4222"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not a NATS URL"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let _ = std::fs::remove_dir_all(dir);
}

/// A NATS server that requires a user and password, given in the URL as NATS clients accept
/// them (`nats://user:pass@host:port`): two nodes form a cluster and exchange a broadcast; the
/// password never appears in the log.
#[test]
fn nats_cluster_with_credentials_in_the_url() {
    let n = Nats::start_with_auth("corecast", "s3cret-pass");
    let url = format!("nats://corecast:s3cret-pass@127.0.0.1:{}", n.port);
    let start = |id: &str| Server::start_with_env(&["--cluster", &url, "--node-id", id], &[("RUST_LOG", "info")]);
    let (a, b) = (start("u-a"), start("u-b"));
    wait_members(&[&a, &b], &["u-a", "u-b"]);
    let mut sub = Client::connect(&b.ws_url("2.0.0"));
    sub.join_v2("auth", "s", json!({}));
    let body = json!({"messages": [{"topic": "auth", "event": "n", "payload": {"seq": 1}}]}).to_string();
    let (st, _, _) = http(a.addr, "POST", "/realtime/v1/api/broadcast", &[], body.as_bytes());
    assert_eq!(st, 202);
    assert_eq!(next_broadcast(&mut sub), (1, json!({"seq": 1})));
    // A wrong password is a clear start failure, not a hang.
    let bad = format!("nats://corecast:wrong@127.0.0.1:{}", n.port);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_corecast"))
        .args(["--listen", "127.0.0.1:0", "--cluster", &bad, "--data-dir"])
        .arg(crate::util::temp_dir("badauth"))
        .env("RUST_LOG", "info")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(!err.contains("wrong") && !err.contains("s3cret"), "credentials in the log: {err}");
    assert!(err.contains("refused this node's credentials"), "{err}");
}
