//! Start-up flags and shutdown.

use std::process::Command;
use std::time::Duration;

use serde_json::json;

use crate::util::{Client, Msg, Server};

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
