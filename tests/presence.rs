//! Presence across shards: state on join, coalesced diffs, updates, cleanup, limits.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::util::{Client, Msg, Server};

fn track(c: &mut Client, jr: &str, r: &str, topic: &str, state: Value) -> Value {
    c.send_json(&json!([jr, r, format!("realtime:{topic}"), "presence", {"type": "presence", "event": "track", "payload": state}]));
    // skip diffs that may arrive first
    loop {
        let m = c.recv_json();
        if m[3] == "phx_reply" {
            return m;
        }
    }
}

/// Next message with event `ev` (skipping others).
fn next_event(c: &mut Client, ev: &str) -> Value {
    loop {
        let m = c.recv_json();
        if m[3] == ev {
            return m;
        }
    }
}

fn join_presence(c: &mut Client, topic: &str, jr: &str, key: &str) -> Value {
    let r = c.join_v2(topic, jr, json!({"presence": {"key": key, "enabled": true}}));
    assert_eq!(r[4]["status"], "ok", "{r}");
    next_event(c, "presence_state")
}

#[test]
fn state_diffs_updates_and_untrack_across_shards() {
    let srv = Server::start(&[]);
    let url = srv.ws_url("2.0.0");
    let mut a = Client::connect_on(&url, 0);
    let mut b = Client::connect_on(&url, 1);
    // An empty channel still gets presence_state, with the join ref.
    let st = join_presence(&mut a, "lobby", "1", "alice");
    assert_eq!(st, json!(["1", null, "realtime:lobby", "presence_state", {}]));
    let st = join_presence(&mut b, "lobby", "7", "bob");
    assert_eq!(st[4], json!({}));

    let r = track(&mut a, "1", "2", "lobby", json!({"name": "alice"}));
    assert_eq!(r, json!(["1", "2", "realtime:lobby", "phx_reply", {"status": "ok", "response": {}}]));
    // Both the other shard's subscriber and the tracker itself get the diff.
    for c in [&mut a, &mut b] {
        let d = next_event(c, "presence_diff");
        assert_eq!(d[0], Value::Null);
        assert_eq!(d[1], Value::Null);
        let metas = &d[4]["joins"]["alice"]["metas"];
        assert_eq!(metas[0]["name"], "alice");
        assert!(metas[0]["phx_ref"].is_string());
        assert_eq!(d[4]["leaves"], json!({}));
    }

    // A late joiner gets the state.
    let mut c = Client::connect_on(&url, 1);
    let st = join_presence(&mut c, "lobby", "3", "carol");
    let first_ref = st[4]["alice"]["metas"][0]["phx_ref"].as_str().unwrap().to_string();
    assert_eq!(st[4]["alice"]["metas"][0]["name"], "alice");

    // Update: leave of the old meta + join of the new one with phx_ref_prev.
    track(&mut a, "1", "4", "lobby", json!({"name": "alice", "status": "away"}));
    let d = next_event(&mut c, "presence_diff");
    assert_eq!(d[4]["leaves"]["alice"]["metas"][0]["phx_ref"], first_ref.as_str());
    let m = &d[4]["joins"]["alice"]["metas"][0];
    assert_eq!(m["phx_ref_prev"], first_ref.as_str());
    assert_eq!(m["status"], "away");
    assert_ne!(m["phx_ref"], first_ref.as_str());

    // An unchanged track is a no-op (reply ok, no diff).
    track(&mut a, "1", "5", "lobby", json!({"name": "alice", "status": "away"}));
    assert!(c.try_recv(Duration::from_millis(300)).is_none(), "unchanged track produced a diff");

    // Untrack: a leave.
    a.send_json(&json!(["1", "6", "realtime:lobby", "presence", {"type": "presence", "event": "untrack"}]));
    let d = next_event(&mut c, "presence_diff");
    assert!(d[4]["leaves"]["alice"].is_object());
    assert_eq!(d[4]["joins"], json!({}));
}

#[test]
fn disconnect_and_leave_remove_presence() {
    let srv = Server::start(&[]);
    let url = srv.ws_url("2.0.0");
    let mut watcher = Client::connect_on(&url, 0);
    join_presence(&mut watcher, "room", "1", "w");
    for (i, shard) in [0usize, 1].into_iter().enumerate() {
        let mut gone = Client::connect_on(&url, shard);
        join_presence(&mut gone, "room", "1", &format!("g{i}"));
        track(&mut gone, "1", "2", "room", json!({"i": i}));
        let d = next_event(&mut watcher, "presence_diff");
        assert!(d[4]["joins"][format!("g{i}")].is_object());
        let t = Instant::now();
        drop(gone); // TCP close without a WebSocket close
        let d = next_event(&mut watcher, "presence_diff");
        assert!(d[4]["leaves"][format!("g{i}")].is_object(), "{d}");
        assert!(t.elapsed() < Duration::from_secs(3));
    }
    // phx_leave cleans up too.
    let mut l = Client::connect_on(&url, 1);
    join_presence(&mut l, "room", "5", "leaver");
    track(&mut l, "5", "6", "room", json!({}));
    next_event(&mut watcher, "presence_diff");
    l.send_text(r#"["5","7","realtime:room","phx_leave",{}]"#);
    let d = next_event(&mut watcher, "presence_diff");
    assert!(d[4]["leaves"]["leaver"].is_object());
    // A rejoin (duplicate join) too.
    let mut r = Client::connect_on(&url, 0);
    join_presence(&mut r, "room", "8", "rejoiner");
    track(&mut r, "8", "9", "room", json!({}));
    next_event(&mut watcher, "presence_diff");
    r.send_text(r#"["10","10","realtime:room","phx_join",{"config":{"presence":{"key":"rejoiner","enabled":true}}}]"#);
    let d = next_event(&mut watcher, "presence_diff");
    assert!(d[4]["leaves"]["rejoiner"].is_object());
    let st = next_event(&mut r, "presence_state");
    assert_eq!(st[0], "10");
    // The state is as of the last diff; if it still lists the old meta, the next diff (which
    // this connection also gets) removes it.
    if let Some(old) = st[4].get("rejoiner") {
        let d = next_event(&mut r, "presence_diff");
        assert_eq!(d[4]["leaves"]["rejoiner"]["metas"][0]["phx_ref"], old["metas"][0]["phx_ref"]);
    }
}

#[test]
fn limits_and_bad_payloads() {
    let srv = Server::start(&[
        "--presence-max-entries",
        "2",
        "--presence-max-bytes",
        "100",
        "--presence-calls-per-30s",
        "50",
    ]);
    let url = srv.ws_url("2.0.0");
    let mut cs: Vec<Client> = (0..3).map(|i| Client::connect_on(&url, i % 2)).collect();
    for (i, c) in cs.iter_mut().enumerate() {
        join_presence(c, "small", "1", &format!("u{i}"));
    }
    assert_eq!(track(&mut cs[0], "1", "2", "small", json!({}))[4]["status"], "ok");
    assert_eq!(track(&mut cs[1], "1", "2", "small", json!({}))[4]["status"], "ok");
    let r = track(&mut cs[2], "1", "2", "small", json!({}));
    assert_eq!(r[4]["status"], "error");
    assert!(r[4]["response"]["reason"].as_str().unwrap().starts_with("PresenceLimitReached"), "{r}");
    let c = &mut cs[0];
    let r = track(c, "1", "3", "small", json!("not an object"));
    assert_eq!(r[4]["response"]["reason"], "Presence track payload must be a map");
    let r = track(c, "1", "4", "small", json!({"big": "x".repeat(200)}));
    assert!(r[4]["response"]["reason"].as_str().unwrap().contains("Track message size exceeded"));
    c.send_json(&json!(["1", "5", "realtime:small", "presence", {"type": "presence", "event": "wave"}]));
    let r = next_event(c, "phx_reply");
    assert_eq!(r[4]["response"]["reason"], "presence event must be track or untrack");
}

#[test]
fn track_rate_limit() {
    let srv = Server::start(&["--presence-calls-per-30s", "3"]);
    let mut c = Client::connect(&srv.ws_url("2.0.0"));
    join_presence(&mut c, "r", "1", "k");
    for i in 0..3 {
        assert_eq!(track(&mut c, "1", &i.to_string(), "r", json!({"i": i}))[4]["status"], "ok");
    }
    let r = track(&mut c, "1", "9", "r", json!({"i": 9}));
    assert!(r[4]["response"]["reason"].as_str().unwrap().contains("rate limit"), "{r}");
}

#[test]
fn burst_of_joins_is_coalesced() {
    let srv = Server::start(&["--presence-diff-ms", "50"]);
    let url = srv.ws_url("2.0.0");
    let mut watcher = Client::connect_on(&url, 1);
    join_presence(&mut watcher, "big", "1", "watcher");
    let n = 300;
    let mut members: Vec<Client> = (0..n).map(|i| Client::connect_on(&url, i % 2)).collect();
    for (i, m) in members.iter_mut().enumerate() {
        // join and track without waiting for replies: a burst
        m.send_json(&json!(["1", "1", "realtime:big", "phx_join", {"config": {"presence": {"key": format!("m{i}")}}}]));
        m.send_json(
            &json!(["1", "2", "realtime:big", "presence", {"type": "presence", "event": "track", "payload": {"i": i}}]),
        );
    }
    let mut seen: HashMap<String, Value> = HashMap::new();
    let mut diffs = 0;
    while seen.len() < n {
        let d = next_event(&mut watcher, "presence_diff");
        diffs += 1;
        for (k, v) in d[4]["joins"].as_object().unwrap() {
            seen.insert(k.clone(), v.clone());
        }
    }
    assert!(diffs < n / 5, "{diffs} diffs for {n} joins: not coalesced");
    // A late joiner sees everyone in one presence_state.
    let mut late = Client::connect_on(&url, 0);
    let st = join_presence(&mut late, "big", "9", "late");
    let st = st[4].as_object().unwrap().len();
    // The state is as of the last diff; anything newer arrives in the next diff.
    assert!(st >= n, "state has {st} keys");
    drop(members);
}

#[test]
fn v1_clients_get_presence_in_v1_framing() {
    let srv = Server::start(&[]);
    let mut c = Client::connect(&format!("ws://{}/realtime/v1/websocket?vsn=1.0.0&apikey=x", srv.addr));
    c.send_json(&json!({"topic": "realtime:v1p", "event": "phx_join", "payload": {"config": {"presence": {"key": "k", "enabled": true}}}, "ref": "1", "join_ref": "1"}));
    assert_eq!(c.recv_json()["payload"]["status"], "ok");
    let st = c.recv_json();
    assert_eq!(st, json!({"topic": "realtime:v1p", "event": "presence_state", "payload": {}, "ref": null}));
    c.send_json(&json!({"topic": "realtime:v1p", "event": "presence", "payload": {"type": "presence", "event": "track", "payload": {"a": 1}}, "ref": "2", "join_ref": "1"}));
    let mut got_reply = false;
    let mut got_diff = false;
    while !(got_reply && got_diff) {
        let m = c.recv_json();
        match m["event"].as_str().unwrap() {
            "phx_reply" => got_reply = m["payload"]["status"] == "ok",
            "presence_diff" => got_diff = m["payload"]["joins"]["k"]["metas"][0]["a"] == 1,
            other => panic!("unexpected {other}"),
        }
    }
    let _ = Msg::Close(None);
}

/// A channel joined with a presence key but without `enabled` (what phoenix.js clients send):
/// its first `track` turns presence on, as in Supabase Realtime: `ok`, then `presence_state`
/// with the members so far, then diffs (this member's join included), on both shards.
#[test]
fn track_turns_presence_on_for_a_channel_joined_without_it() {
    let srv = Server::start(&[]);
    let url = srv.ws_url("2.0.0");
    let mut a = Client::connect_on(&url, 0);
    let mut b = Client::connect_on(&url, 1);
    join_presence(&mut a, "plain", "1", "alice");
    let r = track(&mut a, "1", "2", "plain", json!({"n": "alice"}));
    assert_eq!(r[4]["status"], "ok", "{r}");
    let r = b.join_v2("plain", "3", json!({"presence": {"key": "bob"}}));
    assert_eq!(r[4]["status"], "ok", "{r}");
    assert!(b.try_recv(Duration::from_millis(200)).is_none(), "no presence before the track");
    b.send_json(&json!(["3", "4", "realtime:plain", "presence", {"type": "presence", "event": "track", "payload": {"n": "bob"}}]));
    let m = b.recv_json();
    assert_eq!(
        (m[1].as_str(), m[3].as_str(), m[4]["status"].as_str()),
        (Some("4"), Some("phx_reply"), Some("ok")),
        "{m}"
    );
    let st = b.recv_json();
    assert_eq!((st[0].as_str(), st[3].as_str()), (Some("3"), Some("presence_state")), "{st}");
    assert_eq!(st[4]["alice"]["metas"][0]["n"], "alice", "{st}");
    // The state is as of the last coalesced diff; the diff that follows brings it current.
    if st[4]["bob"].is_null() {
        let d = next_event(&mut b, "presence_diff");
        assert_eq!(d[4]["joins"]["bob"]["metas"][0]["n"], "bob", "{d}");
    }
    // Diffs from now on, in both directions.
    loop {
        // (alice's own join may come first)
        let d = next_event(&mut a, "presence_diff");
        if !d[4]["joins"]["bob"].is_null() {
            assert_eq!(d[4]["joins"]["bob"]["metas"][0]["n"], "bob");
            break;
        }
    }
    let r = track(&mut a, "1", "5", "plain", json!({"n": "alice2"}));
    assert_eq!(r[4]["status"], "ok");
    let d = next_event(&mut b, "presence_diff");
    assert_eq!(d[4]["joins"]["alice"]["metas"][0]["n"], "alice2", "{d}");
}
