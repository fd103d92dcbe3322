//! REST broadcast endpoints, health and metrics.

use std::time::Duration;

use serde_json::json;

use crate::util::{http, jwt, read_until, rounds_held_for_a_delayed_ack, unix_now, Client, Msg, Server};

#[test]
fn batch_and_single_publish_reach_subscribers() {
    let srv = Server::start(&[]);
    let mut sub = Client::connect(&srv.ws_url("2.0.0"));
    sub.join_v2("news", "1", json!({}));
    let mut private = Client::connect(&srv.ws_url("2.0.0"));
    private.join_v2("news", "1", json!({"private": true}));

    let body = json!({"messages": [
        {"topic": "news", "event": "a", "payload": {"n": 1}},
        {"topic": "news", "event": "b", "payload": {"n": 2}, "id": "my-id-1"},
        {"topic": "news", "event": "p", "payload": {"n": 3}, "private": true}
    ]});
    let (st, head, _) = http(
        srv.addr,
        "POST",
        "/realtime/v1/api/broadcast",
        &[("Content-Type", "application/json")],
        body.to_string().as_bytes(),
    );
    assert_eq!(st, 202, "{head}");
    assert!(head.contains("Access-Control-Allow-Origin: *"));
    let m = sub.recv_json();
    assert_eq!((m[4]["event"].as_str(), m[4]["payload"]["n"].as_i64()), (Some("a"), Some(1)));
    let m = sub.recv_json();
    assert_eq!(m[4]["meta"]["id"], "my-id-1");
    // Private and public channels of one name are separate topics.
    let m = private.recv_json();
    assert_eq!(m[4]["payload"]["n"], 3);
    assert!(sub.try_recv(Duration::from_millis(200)).is_none());

    let (st, _, _) = http(
        srv.addr,
        "POST",
        "/realtime/v1/api/broadcast/news/events/ev2?apikey=x&vsn=2.0.0",
        &[("Content-Type", "application/json")],
        br#"{"b":2}"#,
    );
    assert_eq!(st, 202);
    let m = sub.recv_json();
    assert_eq!((m[4]["event"].as_str(), &m[4]["payload"]), (Some("ev2"), &json!({"b": 2})));
    let (st, _, _) = http(
        srv.addr,
        "POST",
        "/api/broadcast/news/events/bin",
        &[("Content-Type", "application/octet-stream")],
        &[0, 1, 2, 255],
    );
    assert_eq!(st, 202);
    let Msg::Binary(b) = sub.recv() else { panic!("expected kind 4") };
    assert_eq!(b[0], 4);
    assert_eq!(b[4], 0);
    assert!(b.ends_with(&[0, 1, 2, 255]));
}

#[test]
fn rest_errors_are_precise() {
    let srv = Server::start(&[]);
    let post = |path: &str, ct: &str, body: &[u8]| {
        let (st, _, b) = http(srv.addr, "POST", path, &[("Content-Type", ct)], body);
        (st, String::from_utf8_lossy(&b).into_owned())
    };
    let (st, b) = post("/realtime/v1/api/broadcast", "application/json", b"{nope");
    assert_eq!(st, 400, "{b}");
    assert!(b.contains("invalid JSON"));
    let (st, b) =
        post("/realtime/v1/api/broadcast", "application/json", br#"{"messages":[{"event":"e","payload":{}}]}"#);
    assert_eq!(st, 422);
    assert!(b.contains("messages[0]") && b.contains("topic"), "{b}");
    let (st, b) = post(
        "/realtime/v1/api/broadcast",
        "application/json",
        br#"{"messages":[{"topic":"t","event":"e","payload":5}]}"#,
    );
    assert_eq!(st, 422);
    assert!(b.contains("payload"), "{b}");
    let (st, _) = post("/realtime/v1/api/broadcast", "application/json", br#"{"other":1}"#);
    assert_eq!(st, 422);
    let (st, _) = post("/realtime/v1/api/broadcast/t/events/e", "application/json", b"{bad");
    assert_eq!(st, 400);
    let (st, _) = post("/realtime/v1/api/broadcast/t/events/e", "image/png", b"x");
    assert_eq!(st, 415);
    let (st, _, _) = http(srv.addr, "GET", "/realtime/v1/api/broadcast", &[], b"");
    assert_eq!(st, 405);
    let (st, _, b) = http(srv.addr, "POST", "/realtime/v1/api/broadcast", &[], &vec![b'x'; 5 << 20]);
    assert_eq!(st, 413, "{}", String::from_utf8_lossy(&b));
}

#[test]
fn rest_auth_with_secret() {
    let secret = "rest-secret-rest-secret-rest-secret!";
    let srv = Server::start(&["--jwt-secret", secret]);
    let body = br#"{"messages":[{"topic":"t","event":"e","payload":{}}]}"#;
    let (st, _, b) = http(srv.addr, "POST", "/realtime/v1/api/broadcast", &[], body);
    assert_eq!(st, 401, "{}", String::from_utf8_lossy(&b));
    let anon = jwt(secret, json!({"role": "anon", "exp": unix_now() + 60}));
    let bearer = format!("Bearer {anon}");
    let (st, _, _) = http(srv.addr, "POST", "/realtime/v1/api/broadcast", &[("Authorization", &bearer)], body);
    assert_eq!(st, 202);
    let (st, _, _) = http(srv.addr, "POST", "/realtime/v1/api/broadcast", &[("apikey", &anon)], body);
    assert_eq!(st, 202);
    // Private topics need service_role or a matching `topics` claim.
    let private = br#"{"messages":[{"topic":"secret","event":"e","payload":{},"private":true}]}"#;
    let (st, _, _) = http(srv.addr, "POST", "/realtime/v1/api/broadcast", &[("Authorization", &bearer)], private);
    assert_eq!(st, 403);
    let svc = format!("Bearer {}", jwt(secret, json!({"role": "service_role"})));
    let (st, _, _) = http(srv.addr, "POST", "/realtime/v1/api/broadcast", &[("Authorization", &svc)], private);
    assert_eq!(st, 202);
}

#[test]
fn health_metrics_and_cors_preflight() {
    let srv = Server::start(&["--node-id", "edge-1"]);
    let (st, head, b) = http(srv.addr, "GET", "/health", &[], b"");
    let health: serde_json::Value = serde_json::from_slice(&b).unwrap();
    assert_eq!(
        (st, health),
        (200, json!({"status": "ok", "node": "edge-1", "cluster": "none", "members": ["edge-1"]}))
    );
    assert!(head.contains("X-Corecast-Node: edge-1\r\n"), "{head}");
    let (st, _, b) = http(srv.addr, "GET", "/metrics", &[], b"");
    assert_eq!(st, 200);
    let text = String::from_utf8(b).unwrap();
    assert!(text.contains("corecast_node_info{node=\"edge-1\",cluster=\"none\"} 1"), "{text}");
    assert!(text.contains("# TYPE corecast_connections gauge"));
    assert!(text.contains("corecast_sends_total{shard=\"1\"}"));
    // Latency histograms, after a message went from a publisher to a subscriber.
    let mut sub = crate::util::Client::connect(&srv.ws_url("2.0.0"));
    sub.join_v2("m", "s", json!({}));
    let body = json!({"messages": [{"topic": "m", "event": "e", "payload": {}}]}).to_string();
    assert_eq!(http(srv.addr, "POST", "/realtime/v1/api/broadcast", &[], body.as_bytes()).0, 202);
    while sub.recv_json()[3] != "broadcast" {}
    let count = |text: &str, name: &str| -> u64 {
        text.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok()).unwrap_or(0)
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let text = loop {
        let text = String::from_utf8(http(srv.addr, "GET", "/metrics", &[], b"").2).unwrap();
        if count(&text, "corecast_sequenced_to_first_write_seconds_count") >= 1 || std::time::Instant::now() > deadline
        {
            break text;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    assert!(text.contains("# TYPE corecast_publish_sequenced_seconds histogram"), "{text}");
    assert!(count(&text, "corecast_publish_sequenced_seconds_count") >= 1, "{text}");
    assert!(count(&text, "corecast_publish_sequenced_seconds_bucket{le=\"+Inf\"}") >= 1, "{text}");
    assert!(count(&text, "corecast_sequenced_to_first_write_seconds_count") >= 1, "{text}");
    let (st, head, _) = http(srv.addr, "OPTIONS", "/realtime/v1/api/broadcast", &[("Origin", "http://x")], b"");
    assert_eq!(st, 204);
    assert!(head.contains("Access-Control-Allow-Headers"));
}

/// Without `--node-id` the id is generated on the first start and kept in the data dir: a
/// restarted node has the same name, a node with another data dir another one.
#[test]
fn a_generated_node_id_survives_a_restart() {
    let node = |srv: &Server| {
        let (_, _, b) = http(srv.addr, "GET", "/health", &[], b"");
        serde_json::from_slice::<serde_json::Value>(&b).unwrap()["node"].as_str().unwrap().to_string()
    };
    let srv = Server::start(&[]);
    let first = node(&srv);
    assert!(first.starts_with("cc-") && first.len() == 15, "{first}");
    let kept = std::fs::read_to_string(srv.data_dir.join("node-id")).unwrap();
    assert_eq!(kept.trim(), first);
    let srv = srv.crash_and_restart();
    assert_eq!(node(&srv), first);
    assert_ne!(node(&Server::start(&[])), first);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_corecast")).args(["--node-id", "a b"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("is not a node id"));
}

#[test]
fn chunked_bodies_are_accepted() {
    let srv = Server::start(&[]);
    let mut sub = Client::connect(&srv.ws_url("2.0.0"));
    sub.join_v2("ch", "1", json!({}));
    let body = br#"{"messages":[{"topic":"ch","event":"e","payload":{"chunked":true}}]}"#;
    let (a, b) = body.split_at(20);
    let mut chunked = format!("{:x}\r\n", a.len()).into_bytes();
    chunked.extend_from_slice(a);
    chunked.extend_from_slice(format!("\r\n{:x}\r\n", b.len()).as_bytes());
    chunked.extend_from_slice(b);
    chunked.extend_from_slice(b"\r\n0\r\n\r\n");
    let mut s = std::net::TcpStream::connect(srv.addr).unwrap();
    use std::io::{Read, Write};
    s.write_all(b"POST /realtime/v1/api/broadcast HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n").unwrap();
    s.write_all(&chunked).unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    assert!(resp.starts_with("HTTP/1.1 202"), "{resp}");
    assert_eq!(sub.recv_json()[4]["payload"]["chunked"], true);
}

#[test]
fn awaited_rest_publishes_keep_their_order() {
    // Each request on a new connection (so on either shard); each waits for its 202.
    let srv = Server::start(&[]);
    let mut sub = Client::connect(&srv.ws_url("2.0.0"));
    sub.join_v2("ordered", "1", json!({}));
    for i in 0..300 {
        let (st, _, _) = http(
            srv.addr,
            "POST",
            "/realtime/v1/api/broadcast/ordered/events/o",
            &[("Content-Type", "application/json")],
            format!("{{\"i\":{i}}}").as_bytes(),
        );
        assert_eq!(st, 202);
    }
    for i in 0..300 {
        assert_eq!(sub.recv_json()[4]["payload"]["i"], i);
    }
}

#[test]
fn oversize_payloads_are_refused_without_closing() {
    let srv = Server::start(&["--max-payload-bytes", "1000"]);
    let mut c = Client::connect(&srv.ws_url("2.0.0"));
    c.join_v2("big", "1", json!({"broadcast": {"ack": true}}));
    c.send_json(&json!(["1", "2", "realtime:big", "broadcast", {"type": "broadcast", "event": "e", "payload": {"x": "y".repeat(2000)}}]));
    assert_eq!(
        c.recv_json(),
        json!(["1", "2", "realtime:big", "phx_reply", {"status": "error", "response": {"error": "payload_size_exceeded"}}])
    );
    c.send_text(r#"[null,"3","phoenix","heartbeat",{}]"#);
    assert_eq!(c.recv_json()[1], "3", "the connection carries on");
    let body = json!({"messages": [{"topic": "big", "event": "e", "payload": {"x": "y".repeat(2000)}}]});
    let (st, _, b) = http(srv.addr, "POST", "/realtime/v1/api/broadcast", &[], body.to_string().as_bytes());
    assert_eq!(st, 413);
    assert!(String::from_utf8_lossy(&b).contains("payload_size_exceeded"));
}

/// A client whose receive buffer is 4 KiB: the server's sends block after a few kilobytes.
fn connect_small_window(addr: std::net::SocketAddr) -> std::net::TcpStream {
    use std::os::fd::FromRawFd;
    let std::net::SocketAddr::V4(v4) = addr else { panic!("IPv4 test address") };
    // SAFETY: plain socket calls on a descriptor this function owns until it is wrapped.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        assert!(fd >= 0);
        let size: libc::c_int = 4096;
        let len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        libc::setsockopt(fd, libc::SOL_SOCKET, libc::SO_RCVBUF, (&size as *const libc::c_int).cast(), len);
        let sa = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: v4.port().to_be(),
            sin_addr: libc::in_addr { s_addr: u32::from(*v4.ip()).to_be() },
            sin_zero: [0; 8],
        };
        let r = libc::connect(
            fd,
            (&sa as *const libc::sockaddr_in).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        );
        assert_eq!(r, 0, "connect: {}", std::io::Error::last_os_error());
        std::net::TcpStream::from_raw_fd(fd)
    }
}

/// A `Connection: close` response far bigger than the socket buffers, to a client that starts
/// reading late: the closing connection goes on writing as the client makes room (each output
/// edge wakes it), and the whole response arrives before the close.
#[test]
fn a_closing_response_bigger_than_the_socket_buffers_arrives_whole() {
    use std::io::{Read, Write};
    let srv = Server::start(&[]);
    let big = "x".repeat(1000);
    for batch in 0..10 {
        let messages: Vec<_> = (0..100)
            .map(|i| json!({"topic": "big", "event": "m", "payload": {"n": batch * 100 + i, "pad": big}, "persist": true}))
            .collect();
        let (st, _, _) = http(
            srv.addr,
            "POST",
            "/realtime/v1/api/broadcast",
            &[],
            json!({ "messages": messages }).to_string().as_bytes(),
        );
        assert_eq!(st, 202);
    }
    let path = "/realtime/v1/api/channels/big/messages?limit=1000";
    for _ in 0..200 {
        let (_, _, body) = http(srv.addr, "GET", path, &[], b"");
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
        if v["messages"].as_array().map_or(0, Vec::len) == 1000 {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut s = connect_small_window(srv.addr);
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes()).unwrap();
    // The server fills the socket buffers and waits for room.
    std::thread::sleep(Duration::from_millis(500));
    let mut resp = Vec::new();
    s.read_to_end(&mut resp).unwrap();
    let end = resp.windows(4).position(|w| w == b"\r\n\r\n").expect("response head") + 4;
    let head = String::from_utf8_lossy(&resp[..end]).to_ascii_lowercase();
    let length: usize =
        head.lines().find_map(|l| l.strip_prefix("content-length:")).expect("content-length").trim().parse().unwrap();
    assert!(length > 1_000_000, "a response of {length} bytes");
    assert_eq!(resp.len() - end, length, "the whole body before the close");
    let v: serde_json::Value = serde_json::from_slice(&resp[end..]).unwrap();
    assert_eq!(v["messages"].as_array().map(Vec::len), Some(1000));
}

/// A client that leaves Nagle's algorithm on and writes a request's head and body separately
/// holds the body until the head is acknowledged. The server must acknowledge a partial
/// request at once: with its delayed ACK (which Linux uses once a connection has had a quick
/// reply, and corecast from the start) every such request would wait for the delayed-ACK
/// timer, never less than 40 ms (`TCP_ATO_MIN`). So this counts requests that took that long:
/// with the stall every one does, whatever the machine's load; without it almost none.
#[test]
fn a_request_written_in_pieces_is_not_held_for_a_delayed_ack() {
    use std::io::Write;
    let srv = Server::start(&[]);
    let mut s = std::net::TcpStream::connect(srv.addr).unwrap();
    assert!(!s.nodelay().unwrap(), "the client keeps Nagle's algorithm on");
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let body = br#"{"messages":[{"topic":"pieces","event":"e","payload":{}}]}"#;
    let head = format!(
        "POST /realtime/v1/api/broadcast HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    let rounds = 20;
    let slow = rounds_held_for_a_delayed_ack(rounds, |_| {
        s.write_all(head.as_bytes()).unwrap();
        s.write_all(body).unwrap();
        let resp = read_until(&mut s, b"\r\n\r\n");
        assert!(resp.starts_with("HTTP/1.1 202"), "{resp}");
    });
    assert!(slow < rounds / 2, "{slow} of {rounds} requests waited for a delayed ACK");
}

/// `Expect: 100-continue` (curl sends it for bodies over 1 MiB, then waits a second for the
/// answer before sending the body anyway): the server answers `100 Continue` once the head is
/// acceptable, and refuses an oversize body at once with its final status instead.
#[test]
fn expect_100_continue_is_answered_before_the_body() {
    use std::io::Write;
    let srv = Server::start(&[]);
    let mut sub = Client::connect(&srv.ws_url("2.0.0"));
    sub.join_v2("expect", "1", json!({}));
    let body = br#"{"messages":[{"topic":"expect","event":"e","payload":{"waited":false}}]}"#;
    for framing in ["Content-Length", "chunked"] {
        let mut s = std::net::TcpStream::connect(srv.addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let (header, payload) = if framing == "chunked" {
            let mut c = format!("{:x}\r\n", body.len()).into_bytes();
            c.extend_from_slice(body);
            c.extend_from_slice(b"\r\n0\r\n\r\n");
            ("Transfer-Encoding: chunked".to_string(), c)
        } else {
            (format!("Content-Length: {}", body.len()), body.to_vec())
        };
        write!(s, "POST /realtime/v1/api/broadcast HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n{header}\r\nExpect: 100-continue\r\n\r\n").unwrap();
        // The body goes only after the interim answer, as a waiting client sends it.
        assert_eq!(read_until(&mut s, b"\r\n\r\n"), "HTTP/1.1 100 Continue\r\n\r\n", "{framing}");
        s.write_all(&payload).unwrap();
        let head = read_until(&mut s, b"\r\n\r\n");
        assert!(head.starts_with("HTTP/1.1 202"), "{framing}: {head}");
        assert_eq!(sub.recv_json()[4]["payload"]["waited"], false, "{framing}");
    }
    // Too large: the final status at once, no 100, and the body is never needed.
    let mut s = std::net::TcpStream::connect(srv.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "POST /realtime/v1/api/broadcast HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 999999999\r\nExpect: 100-continue\r\n\r\n").unwrap();
    let head = read_until(&mut s, b"\r\n\r\n");
    assert!(head.starts_with("HTTP/1.1 413"), "{head}");
}
