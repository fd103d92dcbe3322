//! History, persistence and gapless resume.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};

use crate::util::{http, Client, Msg, Server};

fn get_json(srv: &Server, path: &str) -> (u16, Value) {
    let (st, _, body) = http(srv.addr, "GET", path, &[], b"");
    (st, serde_json::from_slice(&body).unwrap_or(Value::Null))
}

fn publish(srv: &Server, topic: &str, n: u64, persist: bool) {
    let body = json!({"messages": [{"topic": topic, "event": "m", "payload": {"n": n}, "persist": persist}]});
    let (st, _, _) = http(srv.addr, "POST", "/realtime/v1/api/broadcast", &[], body.to_string().as_bytes());
    assert_eq!(st, 202);
}

/// Waits until the stream of `topic` has reached offset `n` (publishes are asynchronous);
/// returns the history page (persisted messages only) with the stream's `epoch` and `offset`.
fn wait_offset(srv: &Server, topic: &str, n: u64) -> Value {
    for _ in 0..200 {
        let (_, v) = get_json(srv, &format!("/realtime/v1/api/channels/{topic}/messages?limit=1000"));
        if v["offset"].as_u64().is_some_and(|o| o >= n) {
            return v;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("the stream of {topic} never reached offset {n}");
}

/// Waits until the history of `topic` has `n` messages (publishes are asynchronous).
fn wait_history(srv: &Server, topic: &str, n: usize) -> Value {
    for _ in 0..200 {
        let (_, v) = get_json(srv, &format!("/realtime/v1/api/channels/{topic}/messages?limit=1000"));
        if v["messages"].as_array().map_or(0, Vec::len) >= n {
            return v;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("history of {topic} never reached {n} messages");
}

#[test]
fn persisted_history_survives_restart_and_pages() {
    let srv = Server::start(&[]);
    for n in 1..=5 {
        publish(&srv, "chat", n, true);
    }
    // a binary message persisted through the single-message endpoint
    let (st, _, _) = http(
        srv.addr,
        "POST",
        "/realtime/v1/api/broadcast/chat/events/bin?persist=true",
        &[("Content-Type", "application/octet-stream")],
        &[1, 2, 3],
    );
    assert_eq!(st, 202);
    publish(&srv, "chat", 7, false); // in the recent window only: not history
    let before = wait_offset(&srv, "chat", 7);
    let epoch = before["epoch"].as_str().unwrap().to_string();
    let msgs = before["messages"].as_array().unwrap();
    assert_eq!(
        msgs.iter().map(|m| m["offset"].as_u64().unwrap()).collect::<Vec<_>>(),
        vec![6, 5, 4, 3, 2, 1],
        "persisted messages only, newest first"
    );
    assert_eq!(before["offset"], 7, "the stream's position counts every message");
    assert_eq!(msgs[0]["payload"], "AQID");
    assert_eq!(msgs[0]["encoding"], "base64");
    assert!(msgs[0]["created_at"].as_str().unwrap().ends_with('Z'));
    assert!(msgs[0]["id"].is_string());
    let (_, page) = get_json(&srv, "/realtime/v1/api/channels/chat/messages?limit=2&before=5");
    assert_eq!(
        page["messages"].as_array().unwrap().iter().map(|m| m["offset"].as_u64().unwrap()).collect::<Vec<_>>(),
        vec![4, 3]
    );

    // Clean restart: persisted messages come back, the epoch continues, the offsets go on.
    let srv = srv.restart();
    let (_, after) = get_json(&srv, "/realtime/v1/api/channels/chat/messages");
    assert_eq!(after["epoch"], epoch.as_str());
    let offs: Vec<u64> = after["messages"].as_array().unwrap().iter().map(|m| m["offset"].as_u64().unwrap()).collect();
    assert_eq!(offs, vec![6, 5, 4, 3, 2, 1], "the non-persisted message 7 is gone; the rest is back");
    publish(&srv, "chat", 8, true);
    let v = wait_offset(&srv, "chat", 8);
    assert_eq!(v["messages"].as_array().unwrap().len(), 7);
    assert_eq!(v["messages"][0]["offset"], 8);
    assert_eq!(v["messages"][0]["epoch"], epoch.as_str());

    // Crash: the durable messages survive, the stream gets a new epoch.
    let srv = srv.crash_and_restart();
    let (_, crashed) = get_json(&srv, "/realtime/v1/api/channels/chat/messages");
    assert_ne!(crashed["epoch"], epoch.as_str());
    assert_eq!(crashed["messages"].as_array().unwrap().len(), 7);
}

#[test]
fn torn_log_tail_is_dropped_at_start() {
    let srv = Server::start(&[]);
    for n in 1..=3 {
        publish(&srv, "torn", n, true);
    }
    wait_history(&srv, "torn", 3);
    let mut srv = srv.restart(); // compacts into a fresh snapshot
    srv.keep_data();
    let dir = srv.data_dir.clone();
    let (st, _) = srv.terminate();
    assert!(st.success());
    // Append half a record and some garbage to the newest segment.
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "log"))
        .collect();
    files.sort();
    let last = files.last().unwrap();
    let mut data = std::fs::read(last).unwrap();
    let good = data.len();
    data.extend_from_slice(&[200, 0, 0, 0, 1, 2, 3, 4, 9, 9, 9]);
    std::fs::write(last, &data).unwrap();
    assert!(std::fs::metadata(last).unwrap().len() as usize > good);
    let srv = Server::launch("127.0.0.1:0", &dir, &[], &[]);
    let (_, v) = get_json(&srv, "/realtime/v1/api/channels/torn/messages");
    assert_eq!(v["messages"].as_array().unwrap().len(), 3, "{v}");
    // The server is healthy and keeps persisting.
    publish(&srv, "torn", 4, true);
    wait_history(&srv, "torn", 4);
    drop(srv);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bad_history_parameters_get_400() {
    let srv = Server::start(&[]);
    for q in ["limit=0", "limit=abc", "limit=5000", "before=-1", "before=x", "private=maybe"] {
        let (st, v) = get_json(&srv, &format!("/realtime/v1/api/channels/t/messages?{q}"));
        assert_eq!(st, 400, "{q}: {v}");
        assert!(v["error"].is_string());
    }
    let (st, v) = get_json(&srv, "/realtime/v1/api/channels/never/messages");
    assert_eq!(st, 200);
    assert_eq!(v, json!({"epoch": null, "offset": null, "messages": []}));
    let (st, _, _) = http(srv.addr, "POST", "/realtime/v1/api/channels/t/messages", &[], b"");
    assert_eq!(st, 405);
}

#[test]
fn gapless_resume_under_concurrent_publishing() {
    let srv = Server::start(&["--window-messages", "100000"]);
    let url = srv.ws_url("2.0.0");
    let mut publ = Client::connect_on(&url, 1);
    publ.join_v2("stream", "p", json!({}));
    let mut sub = Client::connect_on(&url, 0);
    sub.join_v2("stream", "s", json!({}));
    let stop = Arc::new(AtomicBool::new(false));
    let total = 3000u64;
    let publisher = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            for i in 0..total {
                publ.send_json(&json!(["p", null, "realtime:stream", "broadcast", {"type": "broadcast", "event": "n", "payload": {"seq": i}}]));
                if i % 100 == 0 {
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
            stop.store(true, Ordering::SeqCst);
            publ
        })
    };
    let mut seqs = Vec::new();
    let mut last: Option<(String, u64)> = None;
    // Read a while, then vanish mid-stream and come back with resume, twice, on both shards.
    for (round, shard) in [(0, 1usize), (1, 0), (2, 1)] {
        let want = 500 * (round + 1);
        while seqs.len() < want {
            let m = sub.recv_json();
            seqs.push(m[4]["payload"]["seq"].as_u64().unwrap());
            last =
                Some((m[4]["meta"]["epoch"].as_str().unwrap().to_string(), m[4]["meta"]["offset"].as_u64().unwrap()));
        }
        drop(sub);
        std::thread::sleep(Duration::from_millis(30)); // messages keep flowing while away
        let (epoch, offset) = last.clone().unwrap();
        sub = Client::connect_on(&url, shard);
        let r = sub.join_v2("stream", "s", json!({"broadcast": {"resume": {"epoch": epoch, "offset": offset}}}));
        assert_eq!(r[4]["status"], "ok");
    }
    while (seqs.len() as u64) < total {
        let m = sub.recv_json();
        seqs.push(m[4]["payload"]["seq"].as_u64().unwrap());
    }
    let _ = publisher.join().unwrap();
    assert_eq!(seqs, (0..total).collect::<Vec<_>>(), "no gap, no duplicate, in order");
    assert!(sub.try_recv(Duration::from_millis(200)).is_none());
}

#[test]
fn resume_impossible_and_replay() {
    let srv = Server::start(&["--window-messages", "5"]);
    let url = srv.ws_url("2.0.0");
    for n in 1..=10 {
        publish(&srv, "w", n, false);
    }
    let v = wait_offset(&srv, "w", 10);
    assert_eq!(v["messages"], json!([]), "nothing was persisted, so there is no history");
    let epoch = v["epoch"].as_str().unwrap().to_string();
    // Inside the window: every message after offset 7.
    let mut c = Client::connect(&url);
    c.join_v2("w", "1", json!({"broadcast": {"resume": {"epoch": epoch, "offset": 7}}}));
    let got: Vec<u64> = (0..3).map(|_| c.recv_json()[4]["meta"]["offset"].as_u64().unwrap()).collect();
    assert_eq!(got, vec![8, 9, 10]);
    // Outside the window: a system error naming the oldest resumable offset.
    let mut c = Client::connect(&url);
    c.join_v2("w", "1", json!({"broadcast": {"resume": {"epoch": epoch, "offset": 2}}}));
    let m = c.recv_json();
    assert_eq!(m[3], "system");
    assert_eq!(m[4]["status"], "error");
    assert!(m[4]["message"].as_str().unwrap().starts_with("resume impossible"));
    assert_eq!(m[4]["oldest_offset"], 6);
    assert_eq!(m[4]["epoch"], epoch.as_str());
    // Unknown epoch.
    let mut c = Client::connect(&url);
    c.join_v2("w", "1", json!({"broadcast": {"resume": {"epoch": "nope", "offset": 2}}}));
    let m = c.recv_json();
    assert!(m[4]["message"].as_str().unwrap().contains("unknown epoch"), "{m}");
    // The channel stays live after the error.
    publish(&srv, "w", 11, false);
    assert_eq!(c.recv_json()[4]["payload"]["n"], 11);
    // realtime-js replay: persisted messages since a time, marked replayed; the ones that
    // were not persisted are not history, so replay skips them.
    publish(&srv, "w", 12, true);
    publish(&srv, "w", 13, false);
    publish(&srv, "w", 14, true);
    wait_offset(&srv, "w", 14);
    let mut c = Client::connect(&url);
    c.join_v2("w", "1", json!({"broadcast": {"replay": {"since": 0, "limit": 5}}, "private": false}));
    let a = c.recv_json();
    let b = c.recv_json();
    assert_eq!((a[4]["payload"]["n"].as_u64(), b[4]["payload"]["n"].as_u64()), (Some(12), Some(14)));
    assert_eq!(a[4]["meta"]["replayed"], true);
    publish(&srv, "w", 15, false);
    assert_eq!(c.recv_json()[4]["payload"]["n"], 15, "then live, without 13");
    let _ = Msg::Close(None);
}

#[test]
fn persist_from_websocket_kind3_metadata() {
    let srv = Server::start(&[]);
    let mut c = Client::connect(&srv.ws_url("2.0.0"));
    c.join_v2("wsp", "6", json!({"private": true}));
    let meta = br#"{"persist":true}"#;
    let (jr, topic, ev) = ("6", "realtime:wsp", "e");
    let mut f = vec![3, jr.len() as u8, 0, topic.len() as u8, ev.len() as u8, meta.len() as u8, 1];
    f.extend_from_slice(jr.as_bytes());
    f.extend_from_slice(topic.as_bytes());
    f.extend_from_slice(ev.as_bytes());
    f.extend_from_slice(meta);
    f.extend_from_slice(br#"{"x":1}"#);
    c.send_binary(f);
    let v = wait_history(&srv, "wsp", 0);
    let _ = v;
    let v = wait_private(&srv, "wsp");
    assert_eq!(v["messages"][0]["payload"], json!({"x": 1}));
    let srv = srv.restart();
    let (_, v) = get_json(&srv, "/realtime/v1/api/channels/wsp/messages?private=true");
    assert_eq!(v["messages"].as_array().unwrap().len(), 1);
    let (_, v) = get_json(&srv, "/realtime/v1/api/channels/wsp/messages");
    assert_eq!(v["messages"].as_array().unwrap().len(), 0, "public and private are separate topics");
}

fn wait_private(srv: &Server, topic: &str) -> Value {
    for _ in 0..200 {
        let (_, v) = get_json(srv, &format!("/realtime/v1/api/channels/{topic}/messages?private=true"));
        if v["messages"].as_array().is_some_and(|m| !m.is_empty()) {
            return v;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("no private history for {topic}");
}

#[test]
fn clean_restart_keeps_every_stream_resumable() {
    let srv = Server::start(&[]);
    let url = srv.ws_url("2.0.0");
    for n in 1..=2 {
        publish(&srv, "eph", n, false);
    }
    let v = wait_offset(&srv, "eph", 2);
    let epoch = v["epoch"].as_str().unwrap().to_string();
    // Clean restart: the stream keeps its epoch even though nothing was persisted.
    let srv = srv.restart();
    for n in 3..=5 {
        publish(&srv, "eph", n, false);
    }
    let v = wait_offset(&srv, "eph", 5);
    assert_eq!(v["epoch"], epoch.as_str());
    let mut c = Client::connect(&srv.ws_url("2.0.0"));
    c.join_v2("eph", "1", json!({"broadcast": {"resume": {"epoch": epoch, "offset": 2}}}));
    let got: Vec<u64> = (0..3).map(|_| c.recv_json()[4]["payload"]["n"].as_u64().unwrap()).collect();
    assert_eq!(got, vec![3, 4, 5]);
    // A position inside what the restart lost is refused, not silently skipped.
    let mut c = Client::connect(&srv.ws_url("2.0.0"));
    c.join_v2("eph", "1", json!({"broadcast": {"resume": {"epoch": epoch, "offset": 1}}}));
    let m = c.recv_json();
    assert_eq!(m[3], "system");
    assert_eq!(m[4]["oldest_offset"], 3);
    // A crash after the restart (with non-persisted messages published) starts a new epoch.
    let srv = srv.crash_and_restart();
    publish(&srv, "eph", 6, false);
    // (offsets go on from the last durable position: the new epoch tells clients the rest)
    let v = wait_offset(&srv, "eph", 1);
    assert_ne!(v["epoch"], epoch.as_str());
    let _ = url;
}

#[test]
fn an_acknowledged_persisted_message_survives_a_crash() {
    // The 202 for a persisted message comes after the log sync that covers it.
    let srv = Server::start(&["--history-max-messages", "10000"]);
    for batch in 0..20 {
        let msgs: Vec<serde_json::Value> = (0..100)
            .map(|i| json!({"topic": "durable", "event": "m", "payload": {"n": batch * 100 + i}, "persist": true}))
            .collect();
        let body = json!({"messages": msgs});
        let (st, _, _) = http(srv.addr, "POST", "/realtime/v1/api/broadcast", &[], body.to_string().as_bytes());
        assert_eq!(st, 202);
    }
    let srv = srv.crash_and_restart(); // SIGKILL right after the last 202
    let mut seen = std::collections::HashSet::new();
    let mut before: Option<u64> = None;
    loop {
        let path = match before {
            Some(b) => format!("/realtime/v1/api/channels/durable/messages?limit=1000&before={b}"),
            None => "/realtime/v1/api/channels/durable/messages?limit=1000".to_string(),
        };
        let (_, v) = get_json(&srv, &path);
        let msgs = v["messages"].as_array().unwrap();
        if msgs.is_empty() {
            break;
        }
        for m in msgs {
            seen.insert(m["payload"]["n"].as_u64().unwrap());
        }
        before = msgs.last().unwrap()["offset"].as_u64();
    }
    assert_eq!(seen.len(), 2000, "every acknowledged message is on disk");
}

/// Every message records its publisher's identity, the `sub` of its verified token: as
/// `meta.user_id` live (WebSocket and SSE) and `user_id` in history, kept across a restart; a
/// payload cannot set it, and a token without `sub` records none. History also pages by time
/// (`before_ms`).
#[test]
fn publisher_identity_from_the_token_and_history_by_time() {
    publisher_identity(&[]);
}

/// The same with the history in Postgres (`corecast.history.user_id`).
#[test]
fn publisher_identity_in_the_postgres_history_store() {
    let db = crate::util::pg::TestDb::new("cc_hist_uid");
    let (url, slot) = (db.url(), db.slot().to_string());
    publisher_identity(&[("DATABASE_URL", url.as_str()), ("CORECAST_SLOT", slot.as_str())]);
    assert_eq!(
        db.sql("SELECT string_agg(coalesce(user_id, '-'), ',' ORDER BY \"offset\") FROM corecast.history"),
        "bob,-,bob"
    );
}

fn publisher_identity(env: &[(&str, &str)]) {
    use crate::util::{jwt, unix_now, SseClient};
    let secret = "user-id-test-secret-0123456789abcdef";
    let srv = Server::start_with_env(&["--jwt-secret", secret], env);
    let tok = |sub: Option<&str>| {
        let mut c = json!({"role": "authenticated", "exp": unix_now() + 600});
        if let Some(s) = sub {
            c["sub"] = json!(s);
        }
        jwt(secret, c)
    };
    let (alice, bob, nobody) = (tok(Some("alice")), tok(Some("bob")), tok(None));
    let ws = |srv: &Server, t: &str| format!("ws://{}/realtime/v1/websocket?apikey={t}&vsn=2.0.0", srv.addr);
    let mut sub = Client::connect(&ws(&srv, &nobody));
    assert_eq!(sub.join_v2("who", "s", json!({}))[4]["status"], "ok");
    let bearer = |t: &str| format!("Bearer {t}");
    let mut sse =
        SseClient::open(srv.addr, "/realtime/v1/sse?topic=who", &[("authorization", bearer(&nobody).as_str())])
            .unwrap();
    let mut a = Client::connect(&ws(&srv, &alice));
    assert_eq!(a.join_v2("who", "a", json!({"broadcast": {"ack": true}}))[4]["status"], "ok");
    let forged = json!({"user_id": "mallory", "meta": {"user_id": "mallory"}});
    a.send_json(
        &json!(["a", "1", "realtime:who", "broadcast", {"type": "broadcast", "event": "e", "payload": forged}]),
    );
    loop {
        let m = a.recv_json();
        if m[3] == "phx_reply" && m[1] == "1" {
            break;
        }
    }
    let post = |t: &str, n: u64| {
        let body = json!({"messages": [{"topic": "who", "event": "e", "payload": {"n": n}, "persist": true}]});
        let auth = bearer(t);
        let (st, _, _) = http(
            srv.addr,
            "POST",
            "/realtime/v1/api/broadcast",
            &[("authorization", &auth)],
            body.to_string().as_bytes(),
        );
        assert_eq!(st, 202);
        std::thread::sleep(Duration::from_millis(5)); // distinct created_at
    };
    post(&bob, 1);
    post(&nobody, 2);
    post(&bob, 3);
    let mut live = Vec::new();
    while live.len() < 4 {
        let m = sub.recv_json();
        if m[3] == "broadcast" {
            live.push(m[4].clone());
        }
    }
    assert_eq!(live[0]["meta"]["user_id"], "alice", "{}", live[0]);
    assert_eq!(live[0]["payload"]["user_id"], "mallory", "the payload is the payload");
    assert_eq!(live[1]["meta"]["user_id"], "bob");
    assert!(live[2]["meta"].get("user_id").is_none(), "no sub, no user_id: {}", live[2]);
    let first = loop {
        let e = sse.next().expect("sse event");
        if e.event == "broadcast" {
            break e;
        }
    };
    assert_eq!(first.data["meta"]["user_id"], "alice", "{:?}", first.data);
    drop((sub, a, sse));
    let history = |srv: &Server, query: &str| -> Value {
        let auth = bearer(&nobody);
        let path = format!("/realtime/v1/api/channels/who/messages?{query}");
        let (st, _, body) = http(srv.addr, "GET", &path, &[("authorization", &auth)], b"");
        assert_eq!(st, 200, "{}", String::from_utf8_lossy(&body));
        serde_json::from_slice(&body).unwrap()
    };
    let check = |srv: &Server| {
        let v = history(srv, "limit=10");
        let msgs = v["messages"].as_array().unwrap();
        let users: Vec<&Value> = msgs.iter().map(|m| &m["user_id"]).collect();
        assert_eq!(users, [&json!("bob"), &Value::Null, &json!("bob")], "{v}");
        // By time: before the newest one's created_at_ms, then before the middle one's.
        let t3 = msgs[0]["created_at_ms"].as_u64().unwrap();
        let t2 = msgs[1]["created_at_ms"].as_u64().unwrap();
        assert!(t3 > t2, "{v}");
        let older = history(srv, &format!("limit=10&before_ms={t3}"));
        let ns: Vec<u64> =
            older["messages"].as_array().unwrap().iter().map(|m| m["payload"]["n"].as_u64().unwrap()).collect();
        assert_eq!(ns, [2, 1]);
        let oldest = history(srv, &format!("limit=1&before_ms={t2}"));
        assert_eq!(oldest["messages"][0]["payload"]["n"], 1);
    };
    check(&srv);
    let srv = srv.restart();
    check(&srv);
    let auth = bearer(&nobody);
    let (st, _, _) = http(
        srv.addr,
        "GET",
        "/realtime/v1/api/channels/who/messages?before_ms=soon",
        &[("authorization", &auth)],
        b"",
    );
    assert_eq!(st, 400);
}

/// A clean restart (SIGTERM) while publishers on both shards keep publishing (persisted)
/// keeps every stream's epoch: a publish that reaches a topic's owner after the owner wrote
/// its shutdown checkpoints is followed by another checkpoint (or, once the log is closed, not
/// sequenced), so the restart never mistakes the shutdown for a crash. A subscriber resumes
/// after the restart from the last message it saw, with no gap and no duplicate.
#[test]
fn clean_restart_under_steady_publishing_keeps_the_epoch() {
    let mut srv = Server::start(&[]);
    for round in 0..3 {
        let url = srv.ws_url("2.0.0");
        let stop = Arc::new(AtomicBool::new(false));
        let publishers: Vec<_> = (0..2)
            .map(|shard| {
                let (addr, stop) = (srv.addr, stop.clone());
                std::thread::spawn(move || {
                    // REST publishes land on either shard (SO_REUSEPORT); persisted, so the
                    // restart keeps them and a resume from before them is gapless.
                    let mut n = 0u64;
                    while !stop.load(Ordering::SeqCst) {
                        n += 1;
                        let body = json!({"messages": [{"topic": "busy", "event": "m", "payload": {"p": shard, "n": n}, "persist": true}]});
                        let sent = std::panic::catch_unwind(|| {
                            http(addr, "POST", "/realtime/v1/api/broadcast", &[], body.to_string().as_bytes()).0
                        });
                        if !matches!(sent, Ok(202)) {
                            std::thread::sleep(Duration::from_millis(20)); // shutting down or restarting
                        }
                    }
                })
            })
            .collect();
        let mut sub = Client::connect(&url);
        sub.join_v2("busy", "s", json!({}));
        let mut last = None;
        while last.as_ref().is_none_or(|(_, o): &(String, u64)| *o < 200) {
            let m = sub.recv_json();
            if m[3] == "broadcast" {
                last = Some((
                    m[4]["meta"]["epoch"].as_str().unwrap().to_string(),
                    m[4]["meta"]["offset"].as_u64().unwrap(),
                ));
            }
        }
        // Read on until the server closes the socket: the subscriber has seen everything.
        srv = {
            let (tx, rx) = std::sync::mpsc::channel();
            let reader = std::thread::spawn(move || {
                let mut last = last;
                while let Some(Msg::Json(m)) = sub.try_recv(Duration::from_secs(5)) {
                    if m[3] == "broadcast" {
                        last = Some((
                            m[4]["meta"]["epoch"].as_str().unwrap().to_string(),
                            m[4]["meta"]["offset"].as_u64().unwrap(),
                        ));
                    }
                }
                let _ = tx.send(last);
            });
            let srv = srv.restart();
            stop.store(true, Ordering::SeqCst);
            for p in publishers {
                let _ = p.join();
            }
            let _ = reader.join();
            last = rx.recv().unwrap();
            srv
        };
        let (epoch, offset) = last.unwrap();
        let mut c = Client::connect(&srv.ws_url("2.0.0"));
        c.join_v2("busy", "r", json!({"broadcast": {"resume": {"epoch": epoch, "offset": offset}}}));
        publish(&srv, "busy", 0, false);
        let m = loop {
            let m = c.recv_json();
            if m[3] == "broadcast" || m[3] == "system" {
                break m;
            }
        };
        assert_eq!(m[3], "broadcast", "round {round}: resume after a clean restart failed: {m}");
        assert_eq!(m[4]["meta"]["epoch"], epoch.as_str(), "round {round}: the epoch changed: {m}");
        assert_eq!(m[4]["meta"]["offset"], offset + 1, "round {round}: {m}");
    }
}
