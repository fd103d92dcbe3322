//! WebSocket + Phoenix protocol behaviour with Rust clients, publisher and subscribers on
//! different shards, for vsn 2.0.0 and 1.0.0.

use std::time::Duration;

use serde_json::{json, Value};

use std::io::Write;

use crate::util::{masked_frame, rounds_held_for_a_delayed_ack, Client, Msg, Raw, Server, DELAYED_ACK};

fn ok_join(reply: &Value) {
    assert_eq!(reply[3], "phx_reply", "{reply}");
    assert_eq!(reply[4]["status"], "ok", "{reply}");
}

#[test]
fn v2_broadcast_across_shards_with_self_and_ack() {
    let srv = Server::start(&[]);
    let url = srv.ws_url("2.0.0");
    let mut sub = Client::connect_on(&url, 0);
    let mut publ = Client::connect_on(&url, 1);
    ok_join(&sub.join_v2("room1", "1", json!({"broadcast": {"self": false}})));
    let r = publ.join_v2("room1", "6", json!({"broadcast": {"self": true, "ack": true}, "presence": {"key": "", "enabled": false}, "postgres_changes": [], "private": false}));
    assert_eq!(
        r,
        json!(["6", "6", "realtime:room1", "phx_reply", {"status": "ok", "response": {"postgres_changes": []}}])
    );

    publ.send_json(&json!(["6", "7", "realtime:room1", "broadcast", {"type": "broadcast", "event": "cursor", "payload": {"x": 1}}]));
    // The publisher (self: true) gets its own message and the ack, in either order.
    let mut got_ack = false;
    let mut got_self = false;
    for _ in 0..2 {
        let m = publ.recv_json();
        if m[3] == "phx_reply" {
            assert_eq!(m, json!(["6", "7", "realtime:room1", "phx_reply", {"status": "ok", "response": {}}]));
            got_ack = true;
        } else {
            assert_eq!(m[3], "broadcast");
            got_self = true;
        }
    }
    assert!(got_ack && got_self);
    let m = sub.recv_json();
    assert_eq!(m[0], Value::Null);
    assert_eq!(m[1], Value::Null);
    assert_eq!(m[2], "realtime:room1");
    assert_eq!(m[3], "broadcast");
    assert_eq!(m[4]["type"], "broadcast");
    assert_eq!(m[4]["event"], "cursor");
    assert_eq!(m[4]["payload"], json!({"x": 1}));
    assert_eq!(m[4]["meta"]["offset"], 1);
    assert!(m[4]["meta"]["id"].is_string() && m[4]["meta"]["epoch"].is_string());

    // self: false (the default) excludes the sender.
    sub.send_json(&json!(["1", "2", "realtime:room1", "broadcast", {"type": "broadcast", "event": "e", "payload": {"from": "sub"}}]));
    let m = publ.recv_json();
    assert_eq!(m[4]["payload"]["from"], "sub");
    assert_eq!(m[4]["meta"]["offset"], 2);
    assert!(sub.try_recv(Duration::from_millis(300)).is_none(), "sender with self:false got its own message");
}

#[test]
fn binary_kind3_in_kind4_out_and_json_for_v1() {
    let srv = Server::start(&[]);
    let mut v2 = Client::connect_on(&srv.ws_url("2.0.0"), 0);
    let mut v1 = Client::connect_on(&srv.ws_url("1.0.0"), 1);
    let mut publ = Client::connect_on(&srv.ws_url("2.0.0"), 1);
    ok_join(&v2.join_v2("bin", "1", json!({})));
    v1.send_json(
        &json!({"topic": "realtime:bin", "event": "phx_join", "payload": {"config": {}}, "ref": "3", "join_ref": "3"}),
    );
    let r = v1.recv_json();
    assert_eq!(
        r,
        json!({"topic": "realtime:bin", "event": "phx_reply", "payload": {"status": "ok", "response": {"postgres_changes": []}}, "ref": "3"})
    );
    ok_join(&publ.join_v2("bin", "6", json!({"broadcast": {"ack": true}})));

    // kind 3, JSON payload (encoding 1): v2 gets kind 4, v1 gets JSON text.
    let kind3 = |ref_: &str, enc: u8, payload: &[u8]| {
        let (jr, topic, ev) = ("6", "realtime:bin", "cursor");
        let mut f = vec![3, jr.len() as u8, ref_.len() as u8, topic.len() as u8, ev.len() as u8, 0, enc];
        f.extend_from_slice(jr.as_bytes());
        f.extend_from_slice(ref_.as_bytes());
        f.extend_from_slice(topic.as_bytes());
        f.extend_from_slice(ev.as_bytes());
        f.extend_from_slice(payload);
        f
    };
    publ.send_binary(kind3("7", 1, br#"{"x":2}"#));
    assert_eq!(publ.recv_json(), json!(["6", "7", "realtime:bin", "phx_reply", {"status": "ok", "response": {}}]));
    let Msg::Binary(b) = v2.recv() else { panic!("v2 expected kind 4") };
    assert_eq!(b[0], 4);
    let (tl, el, ml, enc) = (b[1] as usize, b[2] as usize, b[3] as usize, b[4]);
    assert_eq!(enc, 1);
    assert_eq!(&b[5..5 + tl], b"realtime:bin");
    assert_eq!(&b[5 + tl..5 + tl + el], b"cursor");
    let meta: Value = serde_json::from_slice(&b[5 + tl + el..5 + tl + el + ml]).unwrap();
    assert_eq!(meta["offset"], 1);
    assert_eq!(&b[5 + tl + el + ml..], br#"{"x":2}"#);
    let m = v1.recv_json();
    assert_eq!(m["event"], "broadcast");
    assert_eq!(m["payload"]["event"], "cursor");
    assert_eq!(m["payload"]["payload"], json!({"x": 2}));

    // Binary payload (encoding 0): v2 gets kind 4 with encoding 0; v1 cannot carry it.
    publ.send_binary(kind3("8", 0, &[1, 2, 3]));
    publ.recv_json();
    let Msg::Binary(b) = v2.recv() else { panic!() };
    assert_eq!(b[4], 0);
    assert!(b.ends_with(&[1, 2, 3]));
    assert!(v1.try_recv(Duration::from_millis(300)).is_none(), "binary payload reached a vsn 1 client");
}

#[test]
fn v1_protocol_round_trip() {
    let srv = Server::start(&[]);
    // A missing vsn means 1.0.0.
    let url = format!("ws://{}/socket/websocket?apikey=x", srv.addr);
    let mut a = Client::connect_on(&url, 0);
    let mut b = Client::connect_on(&url, 1);
    for (c, r) in [(&mut a, "1"), (&mut b, "2")] {
        c.send_json(&json!({"topic": "realtime:v1room", "event": "phx_join", "payload": {"config": {"broadcast": {"self": false}}}, "ref": r, "join_ref": r}));
        assert_eq!(c.recv_json()["payload"]["status"], "ok");
    }
    a.send_json(&json!({"topic": "realtime:v1room", "event": "broadcast", "payload": {"type": "broadcast", "event": "e", "payload": {"b": 2}}, "ref": "7", "join_ref": "1"}));
    let m = b.recv_json();
    assert_eq!(m["topic"], "realtime:v1room");
    assert_eq!(m["event"], "broadcast");
    assert_eq!(m["payload"]["payload"], json!({"b": 2}));
    assert_eq!(m["ref"], Value::Null);
    assert!(m.get("join_ref").is_none(), "V1 serializer never emits join_ref");
    a.send_json(&json!({"topic": "phoenix", "event": "heartbeat", "payload": {}, "ref": "8"}));
    assert_eq!(
        a.recv_json(),
        json!({"topic": "phoenix", "event": "phx_reply", "payload": {"status": "ok", "response": {}}, "ref": "8"})
    );
    a.send_json(&json!({"topic": "realtime:v1room", "event": "phx_leave", "payload": {}, "ref": "9", "join_ref": "1"}));
    assert_eq!(a.recv_json()["payload"]["status"], "ok");
    assert_eq!(a.recv_json(), json!({"topic": "realtime:v1room", "event": "phx_close", "payload": {}, "ref": "1"}));
}

#[test]
fn heartbeat_leave_duplicate_join_and_unmatched() {
    let srv = Server::start(&[]);
    let mut c = Client::connect(&srv.ws_url("2.0.0"));
    c.send_text(r#"[null,"7","phoenix","heartbeat",{}]"#);
    assert_eq!(c.recv_json(), json!([null, "7", "phoenix", "phx_reply", {"status": "ok", "response": {}}]));
    ok_join(&c.join_v2("r", "6", json!({})));
    // Duplicate join: phx_close for the old join ref, then the new reply.
    c.send_text(r#"["10","10","realtime:r","phx_join",{"config":{}}]"#);
    assert_eq!(c.recv_json(), json!(["6", "6", "realtime:r", "phx_close", {}]));
    assert_eq!(c.recv_json()[1], "10");
    // Leave: ok reply, then phx_close with ref == join_ref.
    c.send_text(r#"["10","11","realtime:r","phx_leave",{}]"#);
    assert_eq!(c.recv_json(), json!(["10", "11", "realtime:r", "phx_reply", {"status": "ok", "response": {}}]));
    assert_eq!(c.recv_json(), json!(["10", "10", "realtime:r", "phx_close", {}]));
    // Pushes to topics that are not joined.
    c.send_text(r#"["10","12","realtime:r","broadcast",{"type":"broadcast","event":"e","payload":{}}]"#);
    assert_eq!(
        c.recv_json(),
        json!([null, "12", "realtime:r", "phx_reply", {"status": "error", "response": {"reason": "unmatched topic"}}])
    );
    c.send_text(r#"["1","1","room:lobby","phx_join",{}]"#);
    assert_eq!(c.recv_json()[4]["response"]["reason"], "unmatched topic");
}

#[test]
fn postgres_bindings_echoed_with_ids() {
    let srv = Server::start(&[]);
    let mut c = Client::connect(&srv.ws_url("2.0.0"));
    let r = c.join_v2(
        "db",
        "1",
        json!({"postgres_changes": [
            {"event": "INSERT", "schema": "public", "table": "todos", "filter": "id=eq.1"},
            {"event": "*", "schema": "public"}
        ]}),
    );
    let pc = &r[4]["response"]["postgres_changes"];
    assert_eq!(pc[0]["event"], "INSERT");
    assert_eq!(pc[0]["table"], "todos");
    assert_eq!(pc[0]["filter"], "id=eq.1");
    assert!(pc[0]["id"].is_u64());
    assert_eq!(pc[1]["event"], "*");
    assert_ne!(pc[0]["id"], pc[1]["id"]);
    // Without a database: a system message says so, and the channel stays usable.
    let sys = c.recv_json();
    assert_eq!(sys[3], "system");
    assert_eq!(sys[4]["extension"], "postgres_changes");
    assert_eq!(sys[4]["status"], "error");
}

#[test]
fn many_subscribers_on_both_shards_each_get_every_message_in_order() {
    let srv = Server::start(&[]);
    let url = srv.ws_url("2.0.0");
    let mut subs: Vec<Client> = (0..20).map(|i| Client::connect_on(&url, i % 2)).collect();
    for (i, s) in subs.iter_mut().enumerate() {
        ok_join(&s.join_v2("fan", &i.to_string(), json!({})));
    }
    let mut publ = Client::connect_on(&url, 1);
    ok_join(&publ.join_v2("fan", "p", json!({})));
    for i in 0..200 {
        publ.send_json(
            &json!(["p", null, "realtime:fan", "broadcast", {"type": "broadcast", "event": "n", "payload": {"i": i}}]),
        );
    }
    for s in &mut subs {
        for i in 0..200 {
            let m = s.recv_json();
            assert_eq!(m[4]["payload"]["i"], i);
            assert_eq!(m[4]["meta"]["offset"], i + 1);
        }
    }
}

/// The WebSocket side of `rest::a_request_written_in_pieces_is_not_held_for_a_delayed_ack`:
/// a client with Nagle's algorithm on that writes a frame's header and payload separately
/// sends the payload only once the header is acknowledged, which a delayed ACK would hold
/// for at least 40 ms per message (this counts the messages that took that long).
#[test]
fn a_frame_written_in_pieces_is_not_held_for_a_delayed_ack() {
    let srv = Server::start(&[]);
    let mut raw = Raw::upgrade(srv.addr, "apikey=x&vsn=1.0.0");
    assert!(!raw.s.nodelay().unwrap(), "the client keeps Nagle's algorithm on");
    let join = r#"{"topic":"realtime:pieces","event":"phx_join","payload":{"config":{"broadcast":{"self":false,"ack":true}}},"ref":"1"}"#;
    raw.frame(true, 1, join.as_bytes());
    let (_, reply) = raw.read_frame().expect("join reply");
    assert!(String::from_utf8_lossy(&reply).contains(r#""status":"ok""#), "{}", String::from_utf8_lossy(&reply));
    let rounds = 20;
    let frames: Vec<Vec<u8>> = (0..rounds)
        .map(|i| {
            let msg = format!(
                r#"{{"topic":"realtime:pieces","event":"broadcast","payload":{{"type":"broadcast","event":"e","payload":{{"i":{i}}}}},"ref":"{}"}}"#,
                i + 2
            );
            masked_frame(true, 1, msg.as_bytes())
        })
        .collect();
    let slow = rounds_held_for_a_delayed_ack(rounds, |i| {
        raw.s.write_all(&frames[i][..6]).unwrap();
        raw.s.write_all(&frames[i][6..]).unwrap();
        let (_, ack) = raw.read_frame().expect("broadcast ack");
        assert!(String::from_utf8_lossy(&ack).contains("phx_reply"), "{}", String::from_utf8_lossy(&ack));
    });
    assert!(slow < rounds / 2, "{slow} of {rounds} messages waited for a delayed ACK");
}

/// A publisher with Nagle's algorithm on that sends messages back to back (each its own
/// write; broadcasts without `ack`, so nothing comes back to it) holds each message until the
/// previous one is acknowledged. The publisher here is tungstenite's client with Nagle turned
/// back on, as tokio-tungstenite's `connect_async` and plain Java or Erlang sockets leave it.
/// The server acknowledges input nothing answers at once: left to the kernel's delayed ACK,
/// every message would reach the subscriber at least 40 ms late. This counts the messages that
/// took that long from the publisher's write to the subscriber.
#[test]
fn back_to_back_messages_from_a_nagle_client_are_not_held_for_a_delayed_ack() {
    let srv = Server::start(&[]);
    let join = json!({"topic":"realtime:nagle","event":"phx_join","payload":{"config":{"broadcast":{"self":false,"ack":false}}},"ref":"1"});
    let mut sub = Client::connect(&srv.ws_url("1.0.0"));
    let mut publisher = Client::connect(&srv.ws_url("1.0.0"));
    let tungstenite::stream::MaybeTlsStream::Plain(s) = publisher.ws.get_ref() else { unreachable!("plain ws://") };
    s.set_nodelay(false).unwrap();
    for c in [&mut sub, &mut publisher] {
        c.send_json(&join);
        let reply = c.recv_json();
        assert_eq!(reply["payload"]["status"], "ok", "{reply}");
    }
    let rounds = 20;
    let start = std::time::Instant::now();
    let mut sent_at = Vec::new();
    for i in 0..rounds {
        sent_at.push(start.elapsed());
        publisher.send_json(&json!({"topic":"realtime:nagle","event":"broadcast","payload":{"type":"broadcast","event":"e","payload":{"i":i}},"ref":format!("{}", i + 2)}));
    }
    let mut slow = 0;
    for i in 0..rounds {
        let m = sub.recv_json();
        assert_eq!(m["payload"]["payload"]["i"], i, "{m}");
        if start.elapsed() - sent_at[i as usize] >= DELAYED_ACK {
            slow += 1;
        }
    }
    assert!(slow < rounds / 2, "{slow} of {rounds} messages waited for a delayed ACK");
}
