//! Server-Sent Events: many topics on one stream, Last-Event-ID resume, presence, errors.

use std::time::Duration;

use serde_json::json;

use crate::util::{http, jwt, Client, Server, SseClient};

fn publish(srv: &Server, topic: &str, n: u64) {
    let body = json!({"messages": [{"topic": topic, "event": "m", "payload": {"n": n}}]});
    let (st, _, _) = http(srv.addr, "POST", "/realtime/v1/api/broadcast", &[], body.to_string().as_bytes());
    assert_eq!(st, 202);
}

#[test]
fn one_stream_many_topics_from_rest_and_websocket() {
    let srv = Server::start(&[]);
    let mut s = SseClient::open(srv.addr, "/realtime/v1/sse?topic=a&topic=b&apikey=x", &[]).unwrap();
    assert!(s.head.contains("text/event-stream"));
    publish(&srv, "a", 1);
    publish(&srv, "b", 2);
    let mut ws = Client::connect(&srv.ws_url("2.0.0"));
    ws.join_v2("b", "1", json!({}));
    ws.send_json(
        &json!(["1", null, "realtime:b", "broadcast", {"type": "broadcast", "event": "from-ws", "payload": {"n": 3}}]),
    );
    let mut got = Vec::new();
    for _ in 0..3 {
        let e = s.next().unwrap();
        assert_eq!(e.event, "broadcast");
        assert!(e.id.is_some());
        assert!(e.data["meta"]["offset"].is_u64());
        got.push((e.data["topic"].as_str().unwrap().to_string(), e.data["payload"]["n"].as_u64().unwrap()));
    }
    got.sort();
    assert_eq!(got, vec![("a".into(), 1), ("b".into(), 2), ("b".into(), 3)]);
    // Binary payloads travel as base64.
    let (st, _, _) = http(
        srv.addr,
        "POST",
        "/realtime/v1/api/broadcast/a/events/bin",
        &[("Content-Type", "application/octet-stream")],
        &[1, 2, 3],
    );
    assert_eq!(st, 202);
    let e = s.next().unwrap();
    assert_eq!((e.data["payload"].as_str(), e.data["encoding"].as_str()), (Some("AQID"), Some("base64")));
}

#[test]
fn last_event_id_resumes_every_topic_without_gap_or_duplicate() {
    let srv = Server::start(&[]);
    let path = "/realtime/v1/sse?topic=x&topic=y";
    let mut s = SseClient::open(srv.addr, path, &[]).unwrap();
    for n in 0..10 {
        publish(&srv, if n % 2 == 0 { "x" } else { "y" }, n);
    }
    let mut seen = Vec::new();
    for _ in 0..4 {
        seen.push(s.next().unwrap().data["payload"]["n"].as_u64().unwrap());
    }
    let last = s.last_id.clone().unwrap();
    drop(s);
    // Missed while away: the rest of the 10, plus more.
    for n in 10..14 {
        publish(&srv, if n % 2 == 0 { "x" } else { "y" }, n);
    }
    std::thread::sleep(Duration::from_millis(100));
    let mut s = SseClient::open(srv.addr, path, &[("Last-Event-ID", &last)]).unwrap();
    while seen.len() < 14 {
        let e = s.next().unwrap();
        assert_eq!(e.data["meta"]["replayed"], true);
        seen.push(e.data["payload"]["n"].as_u64().unwrap());
    }
    publish(&srv, "x", 14);
    let e = s.next().unwrap();
    assert_eq!(e.data["payload"]["n"], 14);
    assert!(e.data["meta"].get("replayed").is_none());
    let mut x: Vec<u64> = seen.iter().copied().filter(|n| n % 2 == 0).collect();
    let mut y: Vec<u64> = seen.iter().copied().filter(|n| n % 2 == 1).collect();
    assert_eq!(x, (0..14).step_by(2).collect::<Vec<_>>(), "x in order, once each");
    assert_eq!(y, (1..14).step_by(2).collect::<Vec<_>>(), "y in order, once each");
    x.dedup();
    y.dedup();
    // The query-parameter form works for the first connect.
    let q = format!("{path}&last_event_id={}", last);
    let mut s = SseClient::open(srv.addr, &q, &[]).unwrap();
    assert_eq!(s.next().unwrap().data["meta"]["replayed"], true);
}

#[test]
fn resume_outside_the_window_says_so() {
    let srv = Server::start(&["--window-messages", "3"]);
    let mut s = SseClient::open(srv.addr, "/realtime/v1/sse?topic=w", &[]).unwrap();
    publish(&srv, "w", 1);
    s.next().unwrap();
    let last = s.last_id.clone().unwrap();
    drop(s);
    for n in 2..10 {
        publish(&srv, "w", n);
    }
    std::thread::sleep(Duration::from_millis(100));
    let mut s = SseClient::open(srv.addr, "/realtime/v1/sse?topic=w", &[("Last-Event-ID", &last)]).unwrap();
    let e = s.next().unwrap();
    assert_eq!(e.event, "system");
    assert_eq!(e.data["topic"], "w");
    assert!(e.data["payload"]["message"].as_str().unwrap().starts_with("resume impossible"));
    assert_eq!(e.data["payload"]["oldest_offset"], 7);
    // a token that does not fit the topics
    let mut s = SseClient::open(srv.addr, "/realtime/v1/sse?topic=w&topic=v", &[("Last-Event-ID", &last)]).unwrap();
    let e = s.next().unwrap();
    assert_eq!(e.event, "system");
    assert!(e.data["payload"]["message"].as_str().unwrap().contains("does not match"));
}

#[test]
fn presence_over_sse() {
    let srv = Server::start(&[]);
    let mut ws = Client::connect(&srv.ws_url("2.0.0"));
    ws.join_v2("room", "1", json!({"presence": {"key": "ws-user", "enabled": true}}));
    let mut s = SseClient::open(
        srv.addr,
        "/realtime/v1/sse?topic=room&presence=true&presence_key=sse-user&track=%7B%22via%22%3A%22sse%22%7D",
        &[],
    )
    .unwrap();
    let e = s.next().unwrap();
    assert_eq!(e.event, "presence_state");
    assert_eq!(e.data["topic"], "room");
    // The WebSocket member sees the SSE stream join...
    let d = loop {
        let m = ws.recv_json();
        if m[3] == "presence_diff" && m[4]["joins"].get("sse-user").is_some() {
            break m;
        }
    };
    assert_eq!(d[4]["joins"]["sse-user"]["metas"][0]["via"], "sse");
    // ...the stream sees its own join as a diff...
    let e = loop {
        let e = s.next().unwrap();
        if e.event == "presence_diff" {
            break e;
        }
    };
    assert!(e.data["payload"]["joins"]["sse-user"].is_object());
    // ...and its leave when the stream closes.
    drop(s);
    loop {
        let m = ws.recv_json();
        if m[3] == "presence_diff" && m[4]["leaves"].get("sse-user").is_some() {
            break;
        }
    }
}

#[test]
fn bad_sse_requests() {
    let secret = "sse-secret-sse-secret-sse-secret-000";
    let srv = Server::start(&["--jwt-secret", secret, "--max-channels-per-connection", "3"]);
    let key = jwt(secret, json!({"role": "anon"}));
    let open = |q: &str| SseClient::open(srv.addr, &format!("/realtime/v1/sse?{q}"), &[]).err();
    assert_eq!(open(&format!("apikey={key}")).unwrap().0, 400);
    assert_eq!(open(&format!("apikey={key}&topic=a&topic=b&topic=c&topic=d")).unwrap().0, 400);
    assert_eq!(open(&format!("apikey={key}&topic={}", "x".repeat(300))).unwrap().0, 400);
    assert_eq!(open(&format!("apikey={key}&topic=a&presence=maybe")).unwrap().0, 400);
    assert_eq!(open(&format!("apikey={key}&topic=a&track=notjson")).unwrap().0, 400);
    // Postgres changes need a database (tests/pg.rs covers them with one).
    let (st, body) = open(&format!("apikey={key}&topic=a&postgres_changes=%5B%7B%22table%22%3A%22t%22%7D%5D")).unwrap();
    assert_eq!(st, 400);
    assert!(body.contains("needs a database"), "{body}");
    let (st, body) = open("topic=a&apikey=bad").unwrap();
    assert_eq!(st, 401, "{body}");
    let (st, body) = open(&format!("apikey={key}&topic=a&private=true")).unwrap();
    assert_eq!(st, 403);
    assert!(body.contains("Unauthorized"));
    let ok = jwt(secret, json!({"role": "authenticated", "topics": ["a"]}));
    assert!(SseClient::open(srv.addr, &format!("/realtime/v1/sse?topic=a&private=true&apikey={ok}"), &[]).is_ok());
    // the header form of the key
    assert!(SseClient::open(srv.addr, "/realtime/v1/sse?topic=a", &[("apikey", &key)]).is_ok());
}

#[test]
fn slow_sse_reader_is_cut() {
    let srv = Server::start(&["--max-queue-bytes", "1048576"]);
    let slow = SseClient::open(srv.addr, "/realtime/v1/sse?topic=flood", &[]).unwrap();
    let pad = "p".repeat(20_000);
    for i in 0..1500 {
        let body = json!({"messages": [{"topic": "flood", "event": "m", "payload": {"i": i, "pad": pad}}]});
        http(srv.addr, "POST", "/realtime/v1/api/broadcast", &[], body.to_string().as_bytes());
    }
    std::thread::sleep(Duration::from_millis(300));
    let (_, _, body) = http(srv.addr, "GET", "/metrics", &[], b"");
    let m = String::from_utf8(body).unwrap();
    let cut: f64 = m
        .lines()
        .filter(|l| l.starts_with("corecast_slow_consumers_total{"))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
        .sum();
    assert_eq!(cut, 1.0, "{m}");
    drop(slow);
}

#[test]
fn a_message_published_right_after_the_stream_opens_arrives() {
    // The response head is held until every topic's owner registered the stream.
    let srv = Server::start(&[]);
    for i in 0..60 {
        let topic = format!("race-{i}");
        let mut s = SseClient::open(srv.addr, &format!("/realtime/v1/sse?topic={topic}&topic=other-{i}"), &[]).unwrap();
        publish(&srv, &topic, i);
        let e = s.next().expect("the message published after open");
        assert_eq!(e.data["payload"]["n"], i);
    }
}

/// A client adding a topic to its stream reopens it with the token it has and `*` for the new
/// topic: the old topics resume without a gap or duplicate, the new one starts live (what was
/// published to it before is not replayed), and the next token covers all three.
#[test]
fn a_topic_added_to_a_resumed_stream_with_no_position_starts_live() {
    let srv = Server::start(&[]);
    let mut s = SseClient::open(srv.addr, "/realtime/v1/sse?topic=p&topic=q", &[]).unwrap();
    publish(&srv, "p", 1);
    publish(&srv, "q", 2);
    let got: Vec<u64> = (0..2).map(|_| s.next().unwrap().data["payload"]["n"].as_u64().unwrap()).collect();
    assert_eq!(got, [1, 2]);
    let last = s.last_id.clone().unwrap();
    drop(s);
    publish(&srv, "p", 3); // missed: comes back with the resume
    publish(&srv, "r", 4); // published to the new topic before it was added: not replayed
    std::thread::sleep(Duration::from_millis(100));
    let token = format!("{last}.*");
    let path = "/realtime/v1/sse?topic=p&topic=q&topic=r";
    let mut s = SseClient::open(srv.addr, path, &[("Last-Event-ID", &token)]).unwrap();
    let e = s.next().unwrap();
    assert_eq!((e.event.as_str(), e.data["payload"]["n"].as_u64()), ("broadcast", Some(3)), "{:?}", e.data);
    publish(&srv, "r", 5);
    let e = s.next().unwrap();
    assert_eq!((e.data["topic"].as_str(), e.data["payload"]["n"].as_u64()), (Some("r"), Some(5)), "{:?}", e.data);
    assert_eq!(e.id.as_deref().map(|t| t.split('.').count()), Some(3), "{:?}", e.id);
    assert!(!e.id.unwrap().contains('*'));
    // A malformed entry is still refused explicitly.
    let mut s = SseClient::open(srv.addr, "/realtime/v1/sse?topic=p&topic=q", &[("Last-Event-ID", "**.*")]).unwrap();
    let e = s.next().unwrap();
    assert_eq!(e.event, "system");
    assert!(
        e.data["payload"]["message"]
            .as_str()
            .or(e.data["message"].as_str())
            .unwrap_or("")
            .contains("resume impossible"),
        "{:?}",
        e.data
    );
}

/// A stream announces its position as soon as every topic's owner has answered (an `id:`
/// event with no data), so a client that drops before any message arrives resumes with
/// `Last-Event-ID` and gets what was published meanwhile, instead of starting live.
#[test]
fn a_new_stream_announces_its_position_before_any_message() {
    let srv = Server::start(&[]);
    let path = "/realtime/v1/sse?topic=quiet1&topic=quiet2";
    let mut s = SseClient::open(srv.addr, path, &[]).unwrap();
    assert!(s.try_next(Duration::from_millis(500)).is_none(), "no message yet");
    let last = s.last_id.clone().expect("the stream's position, announced without a message");
    assert_eq!(last.split('.').count(), 2, "{last}");
    drop(s);
    publish(&srv, "quiet2", 1);
    publish(&srv, "quiet1", 2);
    std::thread::sleep(Duration::from_millis(100));
    let mut s = SseClient::open(srv.addr, path, &[("Last-Event-ID", &last)]).unwrap();
    let mut got: Vec<u64> = (0..2).map(|_| s.next().unwrap().data["payload"]["n"].as_u64().unwrap()).collect();
    got.sort();
    assert_eq!(got, [1, 2], "both messages published while away");
}
