//! Server-Sent Events encoding (sans-IO): the stream preamble, events, keep-alives and the
//! stream's resume token.
//!
//! An event is `event: <name>\ndata: <json>\n\n`. The body of an event is the same for every
//! stream and is encoded once per message; the `id:` line (the resume token of the whole
//! stream) is per stream and goes out as its own small piece in front of the shared body (SSE
//! fields may come in any order within an event).
//!
//! The token lists, for each topic of the stream in request order, `<epoch>-<offset>` of the
//! newest message delivered, joined with `.`: `9f2c0a1be44d7a10-42.0c77aa19d2e1f3b4-7`.

use bytes::Bytes;

use crate::protocol::http;

/// The `retry:` hint sent at the start of every stream (milliseconds).
pub const RETRY_MS: u64 = 2000;

/// Interval of keep-alive comments on an idle stream (seconds).
pub const KEEP_ALIVE_SECS: u64 = 15;

/// The response head and preamble of a stream: `200 text/event-stream`, no length (the body
/// ends with the connection), a `retry:` hint and a comment.
pub fn stream_head() -> Vec<u8> {
    let mut out = Vec::with_capacity(512);
    http::head(&mut out, 200, false);
    out.extend_from_slice(
        b"Content-Type: text/event-stream\r\nCache-Control: no-cache, no-transform\r\nX-Accel-Buffering: no\r\n\r\n",
    );
    out.extend_from_slice(format!("retry: {RETRY_MS}\n: corecast stream open\n\n").as_bytes());
    out
}

/// A keep-alive comment.
pub fn keep_alive() -> Bytes {
    Bytes::from_static(b": keep-alive\n\n")
}

/// An event with `name` and `data` (JSON). Line breaks inside `data` (JSON whitespace from a
/// pretty-printed payload) become continuation `data:` lines, which the client joins back with
/// `\n`, so the JSON arrives unchanged.
pub fn event(name: &str, data: &[u8]) -> Bytes {
    let mut out = Vec::with_capacity(data.len() + name.len() + 16);
    out.extend_from_slice(b"event: ");
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b"\ndata: ");
    let mut rest = data;
    while let Some(i) = memchr::memchr2(b'\r', b'\n', rest) {
        out.extend_from_slice(&rest[..i]);
        out.extend_from_slice(b"\ndata: ");
        let crlf = rest[i] == b'\r' && rest.get(i + 1) == Some(&b'\n');
        rest = &rest[i + 1 + usize::from(crlf)..];
    }
    out.extend_from_slice(rest);
    out.extend_from_slice(b"\n\n");
    Bytes::from(out)
}

/// An event of one topic of the stream that carries no resume position (presence,
/// `postgres_changes`, `system`): `event: <event>` and
/// `data: {"topic":<topic>,"event":<event>,"payload":<payload>}`.
pub fn topic_event(topic: &str, event: &str, payload: &[u8]) -> Bytes {
    let mut d = Vec::with_capacity(payload.len() + topic.len() + 48);
    d.extend_from_slice(b"{\"topic\":");
    crate::protocol::json::write_str(&mut d, topic);
    d.extend_from_slice(b",\"event\":");
    crate::protocol::json::write_str(&mut d, event);
    d.extend_from_slice(b",\"payload\":");
    d.extend_from_slice(payload);
    d.push(b'}');
    self::event(event, &d)
}

/// The `id:` line for a stream position.
pub fn id_line(positions: &[(std::sync::Arc<str>, u64)]) -> Bytes {
    let mut out = Vec::with_capacity(5 + positions.len() * 28);
    out.extend_from_slice(b"id: ");
    for (i, (epoch, offset)) in positions.iter().enumerate() {
        if i > 0 {
            out.push(b'.');
        }
        out.extend_from_slice(epoch.as_bytes());
        out.push(b'-');
        crate::protocol::json::write_u64(&mut out, *offset);
    }
    out.push(b'\n');
    Bytes::from(out)
}

/// The resume token for a stream position.
pub fn encode_token(positions: &[(std::sync::Arc<str>, u64)]) -> String {
    let mut s = String::with_capacity(positions.len() * 28);
    for (i, (epoch, offset)) in positions.iter().enumerate() {
        if i > 0 {
            s.push('.');
        }
        s.push_str(epoch);
        s.push('-');
        s.push_str(&offset.to_string());
    }
    s
}

/// Parses a resume token into `(epoch, offset)` per topic, `None` for a topic written `*`
/// (no position yet: a client adding a topic to its stream; that topic starts live); `None`
/// if malformed.
pub fn parse_token(token: &str) -> Option<Vec<Option<(String, u64)>>> {
    token
        .trim()
        .split('.')
        .map(|p| {
            if p == "*" {
                return Some(None);
            }
            let (epoch, offset) = p.rsplit_once('-')?;
            if epoch.is_empty() || !epoch.bytes().all(|b| b.is_ascii_alphanumeric()) {
                return None;
            }
            Some(Some((epoch.to_string(), offset.parse().ok()?)))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    #[test]
    fn events_keep_json_intact_across_lines() {
        assert_eq!(&event("broadcast", b"{\"a\":1}")[..], b"event: broadcast\ndata: {\"a\":1}\n\n");
        let e = event("broadcast", b"{\n  \"a\": 1\r\n}");
        assert_eq!(&e[..], b"event: broadcast\ndata: {\ndata:   \"a\": 1\ndata: }\n\n");
        // Joining the data lines with \n (what EventSource does) gives valid, equal JSON.
        let text = std::str::from_utf8(&e).unwrap();
        let data: Vec<&str> = text.lines().filter_map(|l| l.strip_prefix("data: ")).collect();
        let v: serde_json::Value = serde_json::from_str(&data.join("\n")).unwrap();
        assert_eq!(v["a"], 1);
    }

    #[test]
    fn tokens_round_trip() {
        let pos = vec![(Arc::from("9f2c0a1be44d7a10"), 42), (Arc::from("0c77aa19d2e1f3b4"), 0)];
        let t = encode_token(&pos);
        assert_eq!(t, "9f2c0a1be44d7a10-42.0c77aa19d2e1f3b4-0");
        assert_eq!(
            parse_token(&t),
            Some(vec![Some(("9f2c0a1be44d7a10".into(), 42)), Some(("0c77aa19d2e1f3b4".into(), 0))])
        );
        assert_eq!(parse_token("*.e1-3.*"), Some(vec![None, Some(("e1".into(), 3)), None]));
        assert_eq!(&id_line(&pos)[..], format!("id: {t}\n").as_bytes());
        for bad in ["", "x", "-1", "e-", "e-x", "a b-1", "e-1..f-2", "**", "*-1", "e-1.*x"] {
            assert_eq!(parse_token(bad), None, "{bad}");
        }
    }

    #[test]
    fn stream_head_is_an_event_stream() {
        let h = String::from_utf8(stream_head()).unwrap();
        assert!(h.starts_with("HTTP/1.1 200 OK\r\n"));
        assert!(h.contains("Content-Type: text/event-stream"));
        assert!(!h.contains("Content-Length"));
        assert!(h.ends_with("retry: 2000\n: corecast stream open\n\n"));
    }
}
