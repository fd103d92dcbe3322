//! Bad input gets a precise reply or close code; the connection alone pays and everybody
//! else carries on.

use std::io::Write;
use std::net::TcpStream;
use std::time::Duration;

use serde_json::json;

use crate::util::{http, jwt, unix_now, Client, Raw, Server};

/// A subscriber that must keep receiving while others misbehave.
struct Bystander {
    sub: Client,
    publ: Client,
    n: u64,
}

impl Bystander {
    fn new(srv: &Server) -> Self {
        let mut sub = Client::connect_on(&srv.ws_url("2.0.0"), 0);
        let mut publ = Client::connect_on(&srv.ws_url("2.0.0"), 1);
        sub.join_v2("calm", "1", json!({}));
        publ.join_v2("calm", "1", json!({}));
        Bystander { sub, publ, n: 0 }
    }

    fn still_fine(&mut self) {
        self.n += 1;
        self.publ.send_json(&json!(["1", null, "realtime:calm", "broadcast", {"type": "broadcast", "event": "e", "payload": {"n": self.n}}]));
        let m = self.sub.recv_json();
        assert_eq!(m[4]["payload"]["n"], self.n, "bystander missed a message");
    }
}

#[test]
fn malformed_frames_get_precise_close_codes() {
    let srv = Server::start(&["--max-frame-bytes", "1024", "--max-message-bytes", "4096"]);
    let mut ok = Bystander::new(&srv);

    // Unmasked client frame: 1002.
    let mut r = Raw::upgrade(srv.addr, "vsn=2.0.0");
    r.s.write_all(&[0x81, 0x02, b'h', b'i']).unwrap();
    assert_eq!(r.read_close().unwrap().0, 1002);
    ok.still_fine();

    // Garbage bytes after the upgrade (reserved bits / bad opcode): 1002.
    let mut r = Raw::upgrade(srv.addr, "vsn=2.0.0");
    r.s.write_all(b"\xff\xff\xff\xffgarbage").unwrap();
    assert_eq!(r.read_close().unwrap().0, 1002);
    ok.still_fine();

    // Oversize frame: 1009 (the header alone is enough to refuse it).
    let mut r = Raw::upgrade(srv.addr, "vsn=2.0.0");
    r.frame(true, 1, &vec![b'a'; 2000]);
    let (code, reason) = r.read_close().unwrap();
    assert_eq!(code, 1009, "{reason}");
    ok.still_fine();

    // Oversize message across fragments: 1009.
    let mut r = Raw::upgrade(srv.addr, "vsn=2.0.0");
    for i in 0..5 {
        r.frame(i == 4, if i == 0 { 1 } else { 0 }, &[b'a'; 1000]);
    }
    assert_eq!(r.read_close().unwrap().0, 1009);

    // Invalid UTF-8 in a text frame: 1007.
    let mut r = Raw::upgrade(srv.addr, "vsn=2.0.0");
    r.frame(true, 1, &[0xc3, 0x28]);
    assert_eq!(r.read_close().unwrap().0, 1007);

    // Invalid JSON: 1007 with the parser's reason.
    let mut r = Raw::upgrade(srv.addr, "vsn=2.0.0");
    r.frame(true, 1, b"{not json");
    let (code, reason) = r.read_close().unwrap();
    assert_eq!(code, 1007);
    assert!(reason.contains("malformed message"), "{reason}");

    // Fragmented ping: 1002. Continuation without a start: 1002.
    let mut r = Raw::upgrade(srv.addr, "vsn=2.0.0");
    r.frame(false, 9, b"x");
    assert_eq!(r.read_close().unwrap().0, 1002);
    let mut r = Raw::upgrade(srv.addr, "vsn=2.0.0");
    r.frame(true, 0, b"x");
    assert_eq!(r.read_close().unwrap().0, 1002);

    // A binary push of a kind corecast does not take: an error reply, and the socket and its
    // channels carry on. A Phoenix kind-0 push (phoenix.js `channel.push(ev, arrayBuffer)`)
    // names its channel, so the reply goes there; other kinds get it on `phoenix`.
    let mut c = crate::util::Client::connect(&srv.ws_url("2.0.0"));
    c.join_v2("kinds", "1", serde_json::json!({"broadcast": {"self": true}}));
    c.send_binary([&[0u8, 1, 1, 14, 2][..], b"1", b"7", b"realtime:kinds", b"ev", &[1, 2]].concat());
    let m = c.recv_json();
    assert_eq!(
        (m[0].as_str(), m[1].as_str(), m[2].as_str(), m[3].as_str()),
        (Some("1"), Some("7"), Some("realtime:kinds"), Some("phx_reply")),
        "{m}"
    );
    assert_eq!(m[4]["status"], "error");
    assert!(m[4]["response"]["reason"].as_str().unwrap().contains("unsupported binary message kind 0"), "{m}");
    c.send_binary(vec![9, 9, 9]);
    let m = c.recv_json();
    assert_eq!((m[2].as_str(), m[4]["status"].as_str()), (Some("phoenix"), Some("error")), "{m}");
    c.send_json(&serde_json::json!(["1", "8", "realtime:kinds", "broadcast", {"type": "broadcast", "event": "e", "payload": {"still": true}}]));
    assert_eq!(c.recv_json()[4]["payload"]["still"], true, "the channel carries on");
    // A truncated kind-3 push cannot be attributed to a channel: 1007.
    let mut r = Raw::upgrade(srv.addr, "vsn=2.0.0");
    r.frame(true, 2, &[3, 9, 9]);
    assert_eq!(r.read_close().unwrap().0, 1007);

    // Truncated frame, then the client vanishes: nothing breaks.
    let mut r = Raw::upgrade(srv.addr, "vsn=2.0.0");
    r.s.write_all(&crate::util::masked_frame(true, 1, b"hello world")[..6]).unwrap();
    drop(r);
    ok.still_fine();

    // Ping gets pong with the same payload; close gets a close echo.
    let mut r = Raw::upgrade(srv.addr, "vsn=2.0.0");
    r.frame(true, 9, b"abc");
    assert_eq!(r.read_frame().unwrap(), (10, b"abc".to_vec()));
    r.frame(true, 8, &1000u16.to_be_bytes());
    assert_eq!(r.read_close().unwrap().0, 1000);
    ok.still_fine();
}

#[test]
fn bad_http_and_upgrades_get_400_with_reason() {
    let srv = Server::start(&[]);
    let mut s = TcpStream::connect(srv.addr).unwrap();
    s.write_all(b"\x16\x03\x01garbage that is not http\r\n\r\n").unwrap();
    let mut out = String::new();
    std::io::Read::read_to_string(&mut s, &mut out).unwrap();
    assert!(out.starts_with("HTTP/1.1 400"), "{out}");
    assert!(out.contains("malformed HTTP request"));

    let (st, _, body) = http(srv.addr, "GET", "/realtime/v1/websocket?vsn=2.0.0", &[], b"");
    assert_eq!(st, 400);
    assert!(String::from_utf8_lossy(&body).contains("Upgrade: websocket"));
    let (st, _, body) = http(
        srv.addr,
        "GET",
        "/realtime/v1/websocket?vsn=3.0.0",
        &[
            ("Upgrade", "websocket"),
            ("Connection", "Upgrade"),
            ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
            ("Sec-WebSocket-Version", "13"),
        ],
        b"",
    );
    assert_eq!(st, 400);
    assert!(String::from_utf8_lossy(&body).contains("unsupported vsn"));
    let (st, _, _) = http(
        srv.addr,
        "GET",
        "/realtime/v1/websocket?vsn=2.0.0",
        &[
            ("Upgrade", "websocket"),
            ("Connection", "Upgrade"),
            ("Sec-WebSocket-Key", "short"),
            ("Sec-WebSocket-Version", "13"),
        ],
        b"",
    );
    assert_eq!(st, 400);
    let (st, _, _) = http(srv.addr, "GET", "/nope", &[], b"");
    assert_eq!(st, 404);
}

#[test]
fn auth_at_connect() {
    let secret = "test-secret-at-least-32-bytes-long!!";
    let srv = Server::start(&["--jwt-secret", secret]);
    let try_key = |key: &str| {
        http(
            srv.addr,
            "GET",
            &format!("/realtime/v1/websocket?vsn=2.0.0&apikey={key}"),
            &[
                ("Upgrade", "websocket"),
                ("Connection", "Upgrade"),
                ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
                ("Sec-WebSocket-Version", "13"),
            ],
            b"",
        )
    };
    let good = jwt(secret, json!({"role": "anon", "exp": unix_now() + 600}));
    assert_eq!(try_key(&good).0, 101);
    for (key, msg) in [
        ("", "API key is missing"),
        ("not-a-jwt", "not a valid JWT"),
        (&jwt("other-secret-of-enough-length-000000", json!({"role": "anon"})), "signature"),
        (&jwt(secret, json!({"role": "anon", "exp": unix_now() - 10})), "expired"),
        (&jwt(secret, json!({"sub": "x"})), "role"),
    ] {
        let (st, head, body) = try_key(key);
        assert_eq!(st, 401, "{key}");
        assert!(head.contains("application/json"));
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert!(v["error"].as_str().unwrap().contains(msg), "{v} should mention {msg}");
    }
    // The header x-api-key is accepted too.
    let (st, _, _) = http(
        srv.addr,
        "GET",
        "/realtime/v1/websocket?vsn=2.0.0",
        &[
            ("x-api-key", &good),
            ("Upgrade", "websocket"),
            ("Connection", "Upgrade"),
            ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
            ("Sec-WebSocket-Version", "13"),
        ],
        b"",
    );
    assert_eq!(st, 101);

    // Phoenix 1.8's `authToken`: the token in the subprotocols, `phoenix` selected.
    use base64::Engine;
    let with_protocols = |protocols: &str| {
        http(
            srv.addr,
            "GET",
            "/realtime/v1/websocket?vsn=2.0.0",
            &[
                ("Sec-WebSocket-Protocol", protocols),
                ("Upgrade", "websocket"),
                ("Connection", "Upgrade"),
                ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
                ("Sec-WebSocket-Version", "13"),
            ],
            b"",
        )
    };
    let b64 = |t: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(t);
    let (st, head, _) = with_protocols(&format!("phoenix, base64url.bearer.phx.{}", b64(&good)));
    assert_eq!(st, 101, "{head}");
    assert!(head.to_ascii_lowercase().contains("sec-websocket-protocol: phoenix\r\n"), "{head}");
    let expired = jwt(secret, json!({"role": "anon", "exp": unix_now() - 10}));
    let (st, _, body) = with_protocols(&format!("phoenix, base64url.bearer.phx.{}", b64(&expired)));
    assert_eq!(st, 401);
    assert!(String::from_utf8_lossy(&body).contains("expired"));
    let (st, _, body) = with_protocols("phoenix, base64url.bearer.phx.***");
    assert_eq!(st, 401);
    assert!(String::from_utf8_lossy(&body).contains("auth token subprotocol"));
}

#[test]
fn unknown_events_and_unjoined_topics_get_errors() {
    let srv = Server::start(&[]);
    let mut ok = Bystander::new(&srv);
    let mut c = Client::connect(&srv.ws_url("2.0.0"));
    c.join_v2("x", "1", json!({}));
    c.send_text(r#"["1","2","realtime:x","fly",{}]"#);
    let m = c.recv_json();
    assert_eq!(m[4]["status"], "error");
    assert_eq!(m[4]["response"]["reason"], "unknown event \"fly\"");
    c.send_text(r#"["1","3","realtime:y","broadcast",{"event":"e","payload":{}}]"#);
    assert_eq!(c.recv_json()[4]["response"]["reason"], "unmatched topic");
    c.send_text(r#"["1","4","realtime:x","broadcast",{"payload":{}}]"#);
    assert!(c.recv_json()[4]["response"]["reason"].as_str().unwrap().contains("event"));
    c.send_text(r#"["1","5","realtime:x","presence",{"type":"presence","event":"track","payload":"str"}]"#);
    assert_eq!(c.recv_json()[4]["response"]["reason"], "Presence track payload must be a map");
    ok.still_fine();
}

#[test]
fn a_thousand_rapid_joins_each_get_a_reply() {
    let srv = Server::start(&["--joins-per-second", "100", "--max-channels-per-connection", "100"]);
    let mut ok = Bystander::new(&srv);
    let mut c = Client::connect(&srv.ws_url("2.0.0"));
    for i in 0..1000 {
        c.send_text(&format!(r#"["{i}","{i}","realtime:j{i}","phx_join",{{}}]"#));
    }
    let (mut okc, mut rate, mut chans) = (0, 0, 0);
    let mut seen = std::collections::HashSet::new();
    for _ in 0..1000 {
        // Replies to joins of different topics may interleave (clients match them by ref), but
        // every join gets exactly one, with its refs echoed.
        let m = c.recv_json();
        let r: usize = m[1].as_str().unwrap().parse().unwrap();
        assert_eq!(m[0], m[1]);
        assert_eq!(m[2], format!("realtime:j{r}"));
        assert!(seen.insert(r), "two replies for ref {r}");
        match m[4]["status"].as_str().unwrap() {
            "ok" => okc += 1,
            _ => {
                let reason = m[4]["response"]["reason"].as_str().unwrap();
                if reason.starts_with("ClientJoinRateLimitReached") {
                    rate += 1;
                } else if reason.starts_with("ChannelRateLimitReached") {
                    chans += 1;
                } else {
                    panic!("unexpected reason {reason}");
                }
            }
        }
    }
    assert_eq!(okc + rate + chans, 1000);
    assert!((100..=105).contains(&okc), "ok joins limited by the bucket: {okc}");
    assert!(rate > 800, "{rate}");
    ok.still_fine();
    // The socket is still usable.
    c.send_text(r#"[null,"x","phoenix","heartbeat",{}]"#);
    assert_eq!(c.recv_json()[1], "x");
}

#[test]
fn slow_reader_is_cut_and_others_get_everything() {
    let srv = Server::start(&["--max-queue-bytes", "2097152"]);
    let url = srv.ws_url("2.0.0");
    // The slow reader joins and then never reads.
    let mut slow = crate::util::Raw::upgrade(srv.addr, "vsn=2.0.0");
    slow.frame(true, 1, br#"["1","1","realtime:flood","phx_join",{}]"#);
    let _ = slow.read_frame();
    let mut fast = Client::connect(&url);
    fast.join_v2("flood", "1", json!({}));
    let mut publ = Client::connect(&url);
    publ.join_v2("flood", "1", json!({}));
    let pad = "x".repeat(10_000);
    // 40 MB: far more than the slow reader's kernel buffers plus its 2 MiB queue.
    let n = 4000;
    let (progress_tx, progress_rx) = std::sync::mpsc::channel::<i64>();
    let reader = std::thread::spawn(move || {
        for i in 0..n {
            let m = fast.recv_json();
            assert_eq!(m[4]["payload"]["i"], i);
            if i % 50 == 0 {
                let _ = progress_tx.send(i);
            }
        }
    });
    let mut seen = -1i64;
    for i in 0..n {
        publ.send_json(&json!(["1", null, "realtime:flood", "broadcast", {"type": "broadcast", "event": "e", "payload": {"i": i, "pad": pad}}]));
        // Keep the healthy reader's backlog well under the limit: it is fast, not infinitely so.
        while i - seen > 100 {
            seen = progress_rx.recv_timeout(Duration::from_secs(10)).expect("fast reader stalled");
        }
    }
    reader.join().unwrap();
    let (_, _, body) = http(srv.addr, "GET", "/metrics", &[], b"");
    let metrics = String::from_utf8(body).unwrap();
    let cut: u64 = metrics
        .lines()
        .filter(|l| l.starts_with("corecast_slow_consumers_total{"))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap() as u64)
        .sum();
    assert_eq!(cut, 1, "{metrics}");
    // The slow reader's stream ends with close 1008 after what was buffered, or, if the close
    // frame could not be written, with the TCP connection closed.
    slow.s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    if let Some((code, reason)) = slow.read_close() {
        assert_eq!(code, 1008);
        assert!(reason.contains("slow consumer"));
    }
}
