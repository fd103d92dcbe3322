//! Fuzz entry points: one function per parser or state machine that takes peer-controlled
//! bytes. Each must never panic, whatever the input. They run under libFuzzer
//! (`fuzz/fuzz_targets/*`, `cargo fuzz run <name>`) and, on random and mutated inputs, in
//! `cargo test` (`tests/fuzz_smoke.rs`), so CI exercises them on the stable toolchain.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::auth::{Claims, Verifier};
use crate::protocol::phoenix::message::{decode_binary, decode_text, Vsn};
use crate::protocol::phoenix::session::{Now, Session, SessionCtx};
use crate::protocol::ws::conn::{WsConn, WsLimits};

/// WebSocket codec: `data` split into reads at positions taken from its first byte.
pub fn ws_conn(data: &[u8]) {
    let Some((&split, rest)) = data.split_first() else { return };
    let limits = WsLimits { max_frame: 1 << 16, max_message: 1 << 17 };
    let mut ws = WsConn::new();
    let step = (split as usize % 61) + 1;
    let mut buf = rest.to_vec();
    for chunk in buf.chunks_mut(step) {
        if ws.handle_input(chunk, limits, |_| {}).is_err() {
            return;
        }
    }
}

/// HTTP request heads, query strings and chunked bodies.
pub fn http_request(data: &[u8]) {
    use crate::protocol::http::{decode_chunked, parse_request, query_pairs, Body};
    if let Ok(Some((req, n))) = parse_request(data, 8192) {
        let _ = req.keep_alive();
        let _ = req.query_param("vsn");
        let _ = query_pairs(req.query).count();
        if let Ok(Body::Chunked) = req.body() {
            let _ = decode_chunked(&data[n..], 1 << 16);
        }
        let _ = crate::protocol::ws::handshake::accept(&req);
    }
    let _ = decode_chunked(data, 1 << 16);
}

/// Phoenix frames: V1/V2 text and binary kind 3.
pub fn phoenix_decode(data: &[u8]) {
    let _ = decode_text(Vsn::V1, data);
    let _ = decode_text(Vsn::V2, data);
    let _ = decode_binary(data);
}

/// The session state machine fed a sequence of messages (separated by `0xff`), text or
/// binary, with a small channel limit so joins, leaves and limits are all reachable.
pub fn session(data: &[u8]) {
    let ctx = SessionCtx {
        max_channels: 3,
        joins_per_sec: 5,
        presence_calls: 3,
        presence_window: Duration::from_secs(30),
        presence_max_bytes: 256,
        max_payload: 512,
        verifier: Arc::new(Verifier::new(None)),
        postgres: data.first().is_some_and(|b| b & 1 == 1),
    };
    let start = Instant::now();
    let mut s = Session::new(Vsn::V2, Claims::anonymous());
    let mut out = Vec::new();
    for (i, msg) in data.split(|&b| b == 0xff).enumerate() {
        let now = Now { mono: start + Duration::from_millis(i as u64 * 50), unix_secs: 1_700_000_000 + i as u64 };
        if msg.first() == Some(&3) {
            s.handle_binary(msg, &ctx, &mut out);
        } else if let Ok(text) = std::str::from_utf8(msg) {
            s.handle_text(now, text.as_bytes(), &ctx, &mut out);
        }
        if i % 7 == 6 {
            s.handle_timeout(Now { unix_secs: u64::MAX / 2, ..now }, &mut out);
        }
        out.clear();
    }
    let _ = s.topics().count();
}

/// Join configuration parsing.
pub fn join_config(data: &[u8]) {
    if let Ok(raw) = serde_json::from_slice::<Box<serde_json::value::RawValue>>(data) {
        let cfg = crate::protocol::phoenix::config::parse(&raw);
        for b in &cfg.postgres_changes {
            let echo = b.echo();
            assert!(serde_json::from_str::<serde_json::Value>(&echo).is_ok(), "binding echo is JSON: {echo}");
        }
    }
}

/// SSE resume tokens.
pub fn sse_token(data: &[u8]) {
    if let Ok(s) = std::str::from_utf8(data) {
        if let Some(p) = crate::protocol::sse::parse_token(s) {
            // Positions as a stream writes them (it never writes `*`).
            let p: Vec<(Arc<str>, u64)> = p.into_iter().flatten().map(|(e, o)| (Arc::from(e.as_str()), o)).collect();
            let t = crate::protocol::sse::encode_token(&p);
            assert_eq!(crate::protocol::sse::parse_token(&t).map(|v| v.len()), Some(p.len()));
        }
    }
}

/// History log records, read until the end, as recovery does.
pub fn log_records(data: &[u8]) {
    let mut pos = 0;
    while let Ok(Some((_, n))) = crate::store::log::decode(&data[pos..]) {
        pos += n;
    }
}

/// Cluster batches as they arrive from another node; what decodes must encode back to the
/// same batch.
pub fn cluster_batch(data: &[u8]) {
    use crate::cluster::wire;
    if let Ok(b) = wire::decode(&Bytes::copy_from_slice(data)) {
        assert_eq!(wire::decode(&Bytes::from(wire::encode(&b))).as_ref(), Ok(&b));
    }
}

/// pgoutput messages from the replication stream.
pub fn pgoutput(data: &[u8]) {
    let _ = crate::ingest::pgoutput::decode(&Bytes::copy_from_slice(data));
}

/// `postgres_changes` filters, and typed value parsing for every comparison class.
pub fn pg_filter(data: &[u8]) {
    use crate::ingest::filter::{parse, parse_typed, Class};
    if let Ok(s) = std::str::from_utf8(data) {
        let _ = parse(s);
    }
    for c in [
        Class::Int,
        Class::Float,
        Class::Numeric,
        Class::Bool,
        Class::Timestamp,
        Class::Timestamptz,
        Class::Date,
        Class::Uuid,
        Class::Text,
    ] {
        let _ = parse_typed(c, data);
    }
}

/// A fuzz target: its name and body.
pub type Target = (&'static str, fn(&[u8]));

/// Every target by name (for the smoke test and the fuzz crate).
pub const TARGETS: &[Target] = &[
    ("ws_conn", ws_conn),
    ("http_request", http_request),
    ("phoenix_decode", phoenix_decode),
    ("session", session),
    ("join_config", join_config),
    ("sse_token", sse_token),
    ("log_records", log_records),
    ("pgoutput", pgoutput),
    ("pg_filter", pg_filter),
    ("cluster_batch", cluster_batch),
];
