//! Start-up flags and shutdown.

use std::process::Command;
use std::time::Duration;

use serde_json::json;

use crate::util::{http, Client, Msg, Server};

#[test]
fn sigterm_closes_websockets_with_1001_and_exits_0() {
    let srv = Server::start(&[]);
    let mut clients: Vec<Client> = (0..6).map(|i| Client::connect_on(&srv.ws_url("2.0.0"), i % 2)).collect();
    for c in &mut clients {
        c.join_v2("bye", "1", json!({}));
    }
    let (status, took) = srv.terminate();
    assert!(status.success(), "{status:?}");
    assert!(took < Duration::from_secs(5), "{took:?}");
    for c in &mut clients {
        match c.recv() {
            Msg::Close(Some((code, _))) => assert_eq!(code, 1001),
            other => panic!("expected close 1001, got {other:?}"),
        }
    }
}

#[test]
fn bad_flags_are_clear_errors() {
    let run = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_corecast")).args(args).env_remove("DATABASE_URL").output().unwrap();
        (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let (code, err) = run(&["--shards", "0"]);
    assert_eq!(code, Some(2));
    assert!(err.contains("--shards must be at least 1"), "{err}");
    let (code, err) = run(&["--listen", "nowhere"]);
    assert_eq!(code, Some(2));
    assert!(err.contains("--listen"), "{err}");
    let (code, err) = run(&["--max-frame-bytes", "abc"]);
    assert_eq!(code, Some(2));
    assert!(err.contains("max-frame-bytes"), "{err}");
    let (code, err) = run(&["--no-such-flag"]);
    assert_eq!(code, Some(2));
    assert!(err.contains("no-such-flag"), "{err}");
}

#[test]
fn env_variables_configure_the_server() {
    let srv = Server::start_with_env(&[], &[("CORECAST_MAX_CHANNELS_PER_CONNECTION", "1")]);
    let mut c = Client::connect(&srv.ws_url("2.0.0"));
    assert_eq!(c.join_v2("a", "1", json!({}))[4]["status"], "ok");
    assert_eq!(c.join_v2("b", "2", json!({}))[4]["response"]["reason"], "ChannelRateLimitReached: Too many channels");
}

#[test]
fn idle_sockets_are_closed() {
    let srv = Server::start(&["--idle-timeout-secs", "1"]);
    let mut c = Client::connect(&srv.ws_url("2.0.0"));
    let t = std::time::Instant::now();
    match c.recv() {
        Msg::Close(Some((code, reason))) => {
            assert_eq!(code, 1000);
            assert!(reason.contains("idle"));
        }
        other => panic!("{other:?}"),
    }
    assert!(t.elapsed() < Duration::from_secs(4));
}

#[test]
fn a_data_dir_is_used_by_one_process_at_a_time() {
    let srv = Server::start(&[]);
    let out = Command::new(env!("CARGO_BIN_EXE_corecast"))
        .args(["--listen", "127.0.0.1:0", "--shards", "1"])
        .arg("--data-dir")
        .arg(&srv.data_dir)
        .env_remove("DATABASE_URL")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("in use by another corecast process"), "{err}");
}

/// The PID of `pid`'s only child process (what `unshare --fork` started).
fn child_of(pid: u32) -> u32 {
    for _ in 0..100 {
        let children = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
        if let Some(c) = children.split_whitespace().next() {
            return c.parse().unwrap();
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("process {pid} has no child");
}

/// Every container runs its server as PID 1, started at nearly the same instant after boot:
/// whatever corecast seeds its identifiers with must still differ between such starts, or a
/// resume token from before a crash is accepted against a new stream (a silent gap).
#[test]
fn epochs_and_message_ids_differ_between_starts_as_pid1() {
    let (mut epochs, mut ids) = (Vec::new(), Vec::new());
    for _ in 0..4 {
        let srv = Server::start_as_pid1(&[]);
        let inner = child_of(srv.pid());
        let status = std::fs::read_to_string(format!("/proc/{inner}/status")).unwrap();
        let nspid = status.lines().find(|l| l.starts_with("NSpid:")).unwrap_or_default();
        assert_eq!(nspid.split_whitespace().last(), Some("1"), "corecast is not PID 1 of its namespace: {nspid}");
        let body = json!({"messages": [{"topic": "room", "event": "m", "payload": {}, "persist": true}]});
        let (st, _, _) =
            crate::util::http(srv.addr, "POST", "/realtime/v1/api/broadcast", &[], body.to_string().as_bytes());
        assert_eq!(st, 202);
        let (st, _, page) = crate::util::http(srv.addr, "GET", "/realtime/v1/api/channels/room/messages", &[], b"");
        assert_eq!(st, 200);
        let page: serde_json::Value = serde_json::from_slice(&page).unwrap();
        epochs.push(page["epoch"].as_str().expect("epoch").to_owned());
        ids.push(page["messages"][0]["id"].as_str().expect("message id").to_owned());
    }
    for list in [&epochs, &ids] {
        let mut unique = list.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), list.len(), "repeated across PID-1 starts: {list:?}");
    }
}

/// Started at a soft open-files limit of 256 (hard 4,096), as systemd starts services at
/// 1,024: the server raises its soft limit to the hard one, so 600 connections held open at
/// once are all served (at the soft limit, accepts past it would fail with EMFILE).
#[test]
fn a_low_soft_open_files_limit_is_raised_to_the_hard_limit() {
    use std::io::{Read, Write};
    let srv = Server::start_with_open_files(256, 4096, &[]);
    let mut held = Vec::new();
    for i in 0..600 {
        let mut s = std::net::TcpStream::connect(srv.addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        let mut buf = [0u8; 1024];
        let n = s.read(&mut buf).unwrap_or_else(|e| panic!("connection {i}: no response: {e}"));
        let head = String::from_utf8_lossy(&buf[..n]);
        assert!(head.starts_with("HTTP/1.1 200"), "connection {i}: {head}");
        held.push(s);
    }
    // Every held connection is still served.
    for (i, s) in held.iter_mut().enumerate().step_by(50) {
        s.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        let mut buf = [0u8; 1024];
        let n = s.read(&mut buf).unwrap();
        assert!(buf[..n].starts_with(b"HTTP/1.1 200"), "connection {i} again");
    }
}

/// At the connection cap (the open-files limit, 80 here with two shards, less a reserve),
/// connections past it are refused at once with a `503` and `Retry-After` instead of waiting
/// in the listen queue, the refusals are counted in `/metrics`, and once connections close
/// the server takes new ones again.
#[test]
fn past_the_connection_cap_new_connections_get_a_503() {
    use std::io::{Read, Write};
    let srv = Server::start_with_open_files(80, 80, &[]);
    let (mut held, mut refused, mut hung) = (Vec::new(), 0, 0);
    for _ in 0..150 {
        if refused >= 10 {
            break;
        }
        let mut s = std::net::TcpStream::connect(srv.addr).unwrap();
        s.set_read_timeout(Some(Duration::from_millis(1500))).unwrap();
        s.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        let mut buf = [0u8; 1024];
        match s.read(&mut buf) {
            Ok(n) if buf[..n].starts_with(b"HTTP/1.1 200") => held.push(s),
            Ok(n) => {
                let resp = String::from_utf8_lossy(&buf[..n]).into_owned();
                assert!(resp.starts_with("HTTP/1.1 503"), "{resp}");
                assert!(resp.contains("\r\nRetry-After: 1\r\n"), "{resp}");
                assert!(
                    resp.ends_with(r#"{"error":"the server is at its connection limit (open files); retry later"}"#),
                    "{resp}"
                );
                refused += 1;
            }
            Err(_) => hung += 1,
        }
    }
    assert!(held.len() >= 40, "served {} before the limit", held.len());
    assert_eq!((refused, hung), (10, 0), "refused at once, none left waiting");
    drop(held);
    std::thread::sleep(Duration::from_millis(300));
    let (status, _, body) = http(srv.addr, "GET", "/metrics", &[], b"");
    assert_eq!(status, 200);
    let body = String::from_utf8_lossy(&body);
    let counted: f64 = body
        .lines()
        .filter(|l| l.starts_with("corecast_connections_refused_no_fds_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert!(counted >= refused as f64, "metrics count {counted} refusals, the test saw {refused}");
}
