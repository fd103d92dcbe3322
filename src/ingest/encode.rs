//! The `postgres_changes` payload, byte for byte as Supabase Realtime sends it
//! (`reference/realtime-protocol.md` §1.12):
//!
//! ```text
//! [null,null,"realtime:room","postgres_changes",{"ids":[1000],"data":{"schema":"public",
//!  "table":"todos","commit_timestamp":"2025-01-01T00:00:00.000Z","type":"INSERT",
//!  "columns":[{"name":"id","type":"int4"},…],"record":{"id":1,"task":"x"},"errors":null}}]
//! ```
//!
//! `record` is present for INSERT and UPDATE, `old_record` for UPDATE and DELETE. Values take
//! the shape `to_jsonb` gives them (numbers, booleans, embedded JSON, arrays, ISO timestamps
//! with `T`), converted here from the text output in the WAL; `bytea` is hex without `\x`.
//!
//! The `data` object is written once per change and column set ([`write_data`]); [`frame`]
//! wraps it once per distinct (topic, ids, wire format). A record over
//! [`MAX_RECORD_BYTES`] keeps only its values of at most 64 bytes and reports
//! `"Error 413: Payload Too Large"`, as Supabase does.

use bytes::Bytes;

use super::pgoutput::{Datum, Tuple, PG_EPOCH_OFFSET_MICROS};
use super::types::Kind;
use crate::channel::Format;
use crate::protocol::json::{write_iso8601_ms, write_str, write_u64};
use crate::protocol::phoenix::{message, topic, Vsn};

/// Largest record (JSON bytes) sent whole (Supabase: 1,024 KB).
pub const MAX_RECORD_BYTES: usize = 1 << 20;

/// Largest value kept in an oversized record.
pub const MAX_TRIMMED_VALUE: usize = 64;

/// The three change types clients see.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ChangeType {
    Insert,
    Update,
    Delete,
}

impl ChangeType {
    /// `"INSERT"`, `"UPDATE"` or `"DELETE"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Insert => "INSERT",
            Self::Update => "UPDATE",
            Self::Delete => "DELETE",
        }
    }
}

/// One column as the payload describes it.
#[derive(Debug, Clone, Copy)]
pub struct Col<'a> {
    pub name: &'a str,
    /// `pg_type.typname`.
    pub typname: &'a str,
    pub kind: &'a Kind,
    /// Part of the replica identity key (what `old_record` carries without REPLICA IDENTITY
    /// FULL).
    pub key: bool,
}

/// Everything [`write_data`] needs about one change.
#[derive(Debug, Clone, Copy)]
pub struct Data<'a> {
    pub schema: &'a str,
    pub table: &'a str,
    /// Commit time, microseconds since 2000-01-01 UTC.
    pub commit_time: i64,
    pub change: ChangeType,
    pub columns: &'a [Col<'a>],
    /// New row (INSERT, UPDATE).
    pub new: Option<&'a Tuple>,
    /// Old row (UPDATE with REPLICA IDENTITY FULL or a changed key; DELETE).
    pub old: Option<&'a Tuple>,
    /// `old` carries only the key columns (the others are placeholders).
    pub old_key_only: bool,
    /// Columns the subscriber may see (`None`: all).
    pub visible: Option<&'a [bool]>,
    /// `old_record` restricted to these columns (`None`: as the WAL has it). DELETE on a table
    /// with row-level security carries the primary key only.
    pub old_only: Option<&'a [bool]>,
    /// Extra entries for `errors` (e.g. `"Error 400: Bad Request, no primary key"`); when
    /// present, no `record`/`old_record` values are sent.
    pub error: Option<&'a str>,
}

/// Writes the `data` object of a change.
pub fn write_data(out: &mut Vec<u8>, d: &Data<'_>) {
    let start = out.len();
    if !write_data_limited(out, d, usize::MAX) {
        out.truncate(start);
        write_data_limited(out, d, MAX_TRIMMED_VALUE);
    }
}

/// Writes `data`; with `max_value < usize::MAX` values longer than that are left out and the
/// 413 error is reported. Returns `false` if the record exceeded [`MAX_RECORD_BYTES`] and
/// `max_value` was unlimited (the caller retries trimmed).
fn write_data_limited(out: &mut Vec<u8>, d: &Data<'_>, max_value: usize) -> bool {
    let visible = |i: usize| d.visible.is_none_or(|v| v.get(i).copied().unwrap_or(false));
    out.extend_from_slice(b"{\"schema\":");
    write_str(out, d.schema);
    out.extend_from_slice(b",\"table\":");
    write_str(out, d.table);
    out.extend_from_slice(b",\"commit_timestamp\":\"");
    write_commit_timestamp(out, d.commit_time);
    out.extend_from_slice(b"\",\"type\":\"");
    out.extend_from_slice(d.change.as_str().as_bytes());
    out.extend_from_slice(b"\",\"columns\":[");
    let mut first = true;
    for (i, c) in d.columns.iter().enumerate() {
        if !visible(i) {
            continue;
        }
        if !first {
            out.push(b',');
        }
        first = false;
        out.extend_from_slice(b"{\"name\":");
        write_str(out, c.name);
        out.extend_from_slice(b",\"type\":");
        write_str(out, c.typname);
        out.push(b'}');
    }
    out.push(b']');
    let limited = max_value != usize::MAX;
    if d.error.is_some() {
        match d.change {
            ChangeType::Insert => out.extend_from_slice(b",\"record\":{}"),
            ChangeType::Update => out.extend_from_slice(b",\"record\":{},\"old_record\":{}"),
            ChangeType::Delete => out.extend_from_slice(b",\"old_record\":{}"),
        }
    } else {
        let body_start = out.len();
        if let (ChangeType::Insert | ChangeType::Update, Some(new)) = (d.change, d.new) {
            out.extend_from_slice(b",\"record\":");
            write_record(out, d.columns, new, d.old.filter(|_| !d.old_key_only), &visible, |_| true, max_value);
        }
        match d.change {
            ChangeType::Insert => {}
            ChangeType::Update | ChangeType::Delete => {
                out.extend_from_slice(b",\"old_record\":");
                let only = |i: usize| d.old_only.is_none_or(|m| m.get(i).copied().unwrap_or(false));
                match d.old {
                    Some(old) if d.old_key_only => {
                        write_record(out, d.columns, old, None, &visible, |i| d.columns[i].key && only(i), max_value)
                    }
                    Some(old) => write_record(out, d.columns, old, None, &visible, only, max_value),
                    // UPDATE without an old tuple: the key did not change, so the new row's key
                    // columns are the old ones (as wal2json reports the identity).
                    None => match d.new {
                        Some(new) => write_record(
                            out,
                            d.columns,
                            new,
                            None,
                            &visible,
                            |i| d.columns[i].key && only(i),
                            max_value,
                        ),
                        None => out.extend_from_slice(b"{}"),
                    },
                }
            }
        }
        if !limited && out.len() - body_start > MAX_RECORD_BYTES {
            return false;
        }
    }
    out.extend_from_slice(b",\"errors\":");
    match (d.error, limited) {
        (Some(e), _) => {
            out.push(b'[');
            write_str(out, e);
            out.push(b']');
        }
        (None, true) => out.extend_from_slice(b"[\"Error 413: Payload Too Large\"]"),
        (None, false) => out.extend_from_slice(b"null"),
    }
    out.push(b'}');
    true
}

fn write_record(
    out: &mut Vec<u8>,
    cols: &[Col<'_>],
    row: &Tuple,
    fallback: Option<&Tuple>,
    visible: &dyn Fn(usize) -> bool,
    include: impl Fn(usize) -> bool,
    max_value: usize,
) {
    out.push(b'{');
    let mut first = true;
    for (i, c) in cols.iter().enumerate() {
        if !visible(i) || !include(i) {
            continue;
        }
        let mut datum = row.0.get(i);
        if matches!(datum, Some(Datum::Unchanged)) {
            // An unchanged TOASTed value: the old row has it with REPLICA IDENTITY FULL.
            datum = fallback.and_then(|f| f.0.get(i)).filter(|d| !matches!(d, Datum::Unchanged));
        }
        let Some(datum) = datum else { continue };
        if let Datum::Text(t) | Datum::Binary(t) = datum {
            if t.len() > max_value {
                continue;
            }
        }
        if !first {
            out.push(b',');
        }
        first = false;
        write_str(out, c.name);
        out.push(b':');
        match datum {
            Datum::Null | Datum::Unchanged => out.extend_from_slice(b"null"),
            Datum::Text(t) => write_value(out, c.kind, t),
            Datum::Binary(b) => {
                out.push(b'"');
                write_hex(out, b);
                out.push(b'"');
            }
        }
    }
    out.push(b'}');
}

fn write_hex(out: &mut Vec<u8>, b: &[u8]) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for &x in b {
        out.extend_from_slice(&[HEX[(x >> 4) as usize], HEX[(x & 15) as usize]]);
    }
}

/// Writes one value from its text output, shaped as `to_jsonb` shapes it.
pub fn write_value(out: &mut Vec<u8>, kind: &Kind, text: &[u8]) {
    let as_str = |out: &mut Vec<u8>, t: &[u8]| write_str(out, &String::from_utf8_lossy(t));
    match kind {
        Kind::Int | Kind::Float | Kind::Numeric => {
            if is_json_number(text) {
                out.extend_from_slice(text);
            } else {
                as_str(out, text);
            }
        }
        Kind::Bool => match text {
            b"t" => out.extend_from_slice(b"true"),
            b"f" => out.extend_from_slice(b"false"),
            other => as_str(out, other),
        },
        Kind::Json => {
            // Postgres validated it on input; fall back to a string if it is not JSON anyway.
            if serde_json::from_slice::<serde::de::IgnoredAny>(text).is_ok() {
                out.extend_from_slice(text);
            } else {
                as_str(out, text);
            }
        }
        Kind::Bytea => as_str(out, text.strip_prefix(b"\\x").unwrap_or(text)),
        Kind::Timestamp => as_str(out, &iso_timestamp(text, false)),
        Kind::Timestamptz => as_str(out, &iso_timestamp(text, true)),
        Kind::Date | Kind::Uuid | Kind::Text => as_str(out, text),
        Kind::Array(elem) => {
            let start = out.len();
            if !write_array(out, elem, text) {
                out.truncate(start);
                as_str(out, text);
            }
        }
    }
}

/// Whether `t` is a JSON number (Postgres prints `NaN`, `Infinity` for floats and numerics,
/// which are not).
fn is_json_number(t: &[u8]) -> bool {
    let mut i = 0;
    if t.first() == Some(&b'-') {
        i = 1;
    }
    let int_start = i;
    while t.get(i).is_some_and(u8::is_ascii_digit) {
        i += 1;
    }
    let int_len = i - int_start;
    if int_len == 0 || (int_len > 1 && t[int_start] == b'0') {
        return false;
    }
    if t.get(i) == Some(&b'.') {
        i += 1;
        let s = i;
        while t.get(i).is_some_and(u8::is_ascii_digit) {
            i += 1;
        }
        if i == s {
            return false;
        }
    }
    if matches!(t.get(i), Some(b'e' | b'E')) {
        i += 1;
        if matches!(t.get(i), Some(b'+' | b'-')) {
            i += 1;
        }
        let s = i;
        while t.get(i).is_some_and(u8::is_ascii_digit) {
            i += 1;
        }
        if i == s {
            return false;
        }
    }
    i == t.len()
}

/// `2024-01-02 03:04:05.5+00` → `2024-01-02T03:04:05.5+00:00` (timestamptz), or without the
/// offset part for timestamp. Special values (`infinity`) pass unchanged.
fn iso_timestamp(t: &[u8], tz: bool) -> Vec<u8> {
    let mut v = t.to_vec();
    if v.len() > 10 && v[10] == b' ' && v[..4].iter().all(u8::is_ascii_digit) {
        v[10] = b'T';
        if tz {
            // The offset starts at the last sign after the time; `+HH` becomes `+HH:00`.
            if let Some(p) = v[11..].iter().rposition(|&c| c == b'+' || c == b'-') {
                let off = &v[11 + p..];
                if off.len() == 3 {
                    v.extend_from_slice(b":00");
                }
            }
        }
    }
    v
}

/// Writes a Postgres array literal (`{1,2}`, `{{a,"b c"},{NULL,d}}`, `[0:1]={x,y}`) as a JSON
/// array. Returns `false` if it is not a well-formed literal.
fn write_array(out: &mut Vec<u8>, elem: &Kind, text: &[u8]) -> bool {
    let mut t = text;
    if t.first() == Some(&b'[') {
        // Dimension decoration: skip up to `=`.
        match t.iter().position(|&c| c == b'=') {
            Some(p) => t = &t[p + 1..],
            None => return false,
        }
    }
    let mut pos = 0;
    if !write_array_level(out, elem, t, &mut pos) {
        return false;
    }
    pos == t.len()
}

fn write_array_level(out: &mut Vec<u8>, elem: &Kind, t: &[u8], pos: &mut usize) -> bool {
    if t.get(*pos) != Some(&b'{') {
        return false;
    }
    *pos += 1;
    out.push(b'[');
    if t.get(*pos) == Some(&b'}') {
        *pos += 1;
        out.push(b']');
        return true;
    }
    let mut first = true;
    loop {
        if !first {
            out.push(b',');
        }
        first = false;
        while t.get(*pos) == Some(&b' ') {
            *pos += 1;
        }
        match t.get(*pos) {
            Some(b'{') => {
                if !write_array_level(out, elem, t, pos) {
                    return false;
                }
            }
            Some(b'"') => {
                *pos += 1;
                let mut val = Vec::new();
                loop {
                    match t.get(*pos) {
                        Some(b'\\') => {
                            let Some(&c) = t.get(*pos + 1) else { return false };
                            val.push(c);
                            *pos += 2;
                        }
                        Some(b'"') => {
                            *pos += 1;
                            break;
                        }
                        Some(&c) => {
                            val.push(c);
                            *pos += 1;
                        }
                        None => return false,
                    }
                }
                write_value(out, elem, &val);
            }
            Some(_) => {
                let start = *pos;
                while let Some(&c) = t.get(*pos) {
                    if c == b',' || c == b'}' {
                        break;
                    }
                    *pos += 1;
                }
                let raw = trim_ascii(&t[start..*pos]);
                if raw.eq_ignore_ascii_case(b"NULL") {
                    out.extend_from_slice(b"null");
                } else {
                    write_value(out, elem, raw);
                }
            }
            None => return false,
        }
        while t.get(*pos) == Some(&b' ') {
            *pos += 1;
        }
        match t.get(*pos) {
            Some(b',') => *pos += 1,
            Some(b'}') => {
                *pos += 1;
                out.push(b']');
                return true;
            }
            _ => return false,
        }
    }
}

fn trim_ascii(b: &[u8]) -> &[u8] {
    let s = b.iter().position(|c| !c.is_ascii_whitespace()).unwrap_or(b.len());
    let e = b.iter().rposition(|c| !c.is_ascii_whitespace()).map_or(s, |e| e + 1);
    &b[s..e]
}

/// Writes `YYYY-MM-DDTHH:MM:SS.mmmZ` (UTC, milliseconds) for a Postgres timestamp
/// (microseconds since 2000-01-01).
pub fn write_commit_timestamp(out: &mut Vec<u8>, pg_micros: i64) {
    write_iso8601_ms(out, pg_micros.saturating_add(PG_EPOCH_OFFSET_MICROS).div_euclid(1000));
}

/// The `postgres_changes` frame for one topic: `{"ids":[…],"data":…}` with null refs (an
/// SSE `postgres_changes` event with that payload for SSE streams).
pub fn frame(format: Format, wire_topic: &str, ids: &[u32], data: &[u8]) -> Bytes {
    let mut p = Vec::with_capacity(data.len() + 16 + ids.len() * 11);
    p.extend_from_slice(b"{\"ids\":[");
    for (i, id) in ids.iter().enumerate() {
        if i > 0 {
            p.push(b',');
        }
        write_u64(&mut p, *id as u64);
    }
    p.extend_from_slice(b"],\"data\":");
    p.extend_from_slice(data);
    p.push(b'}');
    envelope(format, wire_topic, "postgres_changes", &p)
}

/// A `system` message about an extension (e.g. "Subscribed to PostgreSQL") in `format`.
pub fn system(
    format: Format,
    join_ref: Option<&str>,
    wire_topic: &str,
    extension: &str,
    ok: bool,
    text: &str,
) -> Bytes {
    match format {
        Format::V1 => message::system(Vsn::V1, join_ref, wire_topic, extension, ok, text),
        Format::V2 => message::system(Vsn::V2, join_ref, wire_topic, extension, ok, text),
        Format::Sse => {
            envelope(format, wire_topic, "system", &message::system_payload(wire_topic, extension, ok, text))
        }
    }
}

/// A server push (`ref` null) of `event` with `payload` on `wire_topic`, in `format`.
fn envelope(format: Format, wire_topic: &str, event: &str, payload: &[u8]) -> Bytes {
    match format {
        Format::V1 => message::encode(Vsn::V1, None, None, wire_topic, event, payload),
        Format::V2 => message::encode(Vsn::V2, None, None, wire_topic, event, payload),
        Format::Sse => crate::protocol::sse::topic_event(
            wire_topic.strip_prefix(topic::PREFIX).unwrap_or(wire_topic),
            event,
            payload,
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::ws::frame::parse_header;
    use serde_json::{json, Value};

    fn value(kind: &Kind, text: &str) -> String {
        let mut out = Vec::new();
        write_value(&mut out, kind, text.as_bytes());
        String::from_utf8(out).unwrap()
    }

    fn t(vals: &[Option<&str>]) -> Tuple {
        Tuple(
            vals.iter()
                .map(|v| match v {
                    Some(s) => Datum::Text(Bytes::copy_from_slice(s.as_bytes())),
                    None => Datum::Null,
                })
                .collect(),
        )
    }

    #[test]
    fn values_match_to_jsonb() {
        // Expected strings are what `to_jsonb` gives for the same values (checked on PG 15).
        assert_eq!(value(&Kind::Int, "-42"), "-42");
        assert_eq!(value(&Kind::Numeric, "1.50"), "1.50");
        assert_eq!(value(&Kind::Numeric, "NaN"), "\"NaN\"");
        assert_eq!(value(&Kind::Float, "Infinity"), "\"Infinity\"");
        assert_eq!(value(&Kind::Float, "1e+100"), "1e+100");
        assert_eq!(value(&Kind::Bool, "t"), "true");
        assert_eq!(value(&Kind::Json, r#"{"a": [1, 2]}"#), r#"{"a": [1, 2]}"#);
        assert_eq!(value(&Kind::Bytea, "\\x0102"), "\"0102\"");
        assert_eq!(value(&Kind::Timestamp, "2024-01-02 03:04:05.5"), "\"2024-01-02T03:04:05.5\"");
        assert_eq!(value(&Kind::Timestamptz, "2024-01-01 21:34:05+00"), "\"2024-01-01T21:34:05+00:00\"");
        assert_eq!(value(&Kind::Timestamptz, "2024-01-01 21:34:05.123+05:30"), "\"2024-01-01T21:34:05.123+05:30\"");
        assert_eq!(value(&Kind::Timestamptz, "infinity"), "\"infinity\"");
        assert_eq!(value(&Kind::Text, "q\"uote"), r#""q\"uote""#);
        let arr = |k: Kind| Kind::Array(Box::new(k));
        assert_eq!(value(&arr(Kind::Int), "{1,2,NULL}"), "[1,2,null]");
        assert_eq!(value(&arr(Kind::Text), r#"{"a b",c,NULL,"\"q\""}"#), r#"["a b","c",null,"\"q\""]"#);
        assert_eq!(value(&arr(Kind::Int), "{{1,2},{3,4}}"), "[[1,2],[3,4]]");
        assert_eq!(value(&arr(Kind::Int), "[1:2]={5,6}"), "[5,6]");
        assert_eq!(value(&arr(Kind::Bool), "{t,f}"), "[true,false]");
        assert_eq!(value(&arr(Kind::Json), r#"{"{\"a\": 1}"}"#), r#"[{"a": 1}]"#);
        assert_eq!(value(&arr(Kind::Int), "{}"), "[]");
        assert_eq!(value(&arr(Kind::Int), "{1,2"), "\"{1,2\"");
        for n in ["0", "-0", "1.5", "1e5", "1E-7", "-12.25e+3"] {
            assert!(is_json_number(n.as_bytes()), "{n}");
        }
        for n in ["", "-", "01", "1.", ".5", "1e", "NaN", "+1", "1 "] {
            assert!(!is_json_number(n.as_bytes()), "{n}");
        }
    }

    #[test]
    fn commit_timestamps() {
        let mut out = Vec::new();
        write_commit_timestamp(&mut out, 0);
        assert_eq!(out, b"2000-01-01T00:00:00.000Z");
        // 2025-11-19T00:22:40.877Z, the reference's example.
        let unix_ms: i64 = 1_763_511_760_877;
        out.clear();
        write_commit_timestamp(&mut out, unix_ms * 1000 + 123 - PG_EPOCH_OFFSET_MICROS);
        assert_eq!(out, b"2025-11-19T00:22:40.877Z");
    }

    fn cols() -> Vec<Col<'static>> {
        static INT: Kind = Kind::Int;
        static TEXT: Kind = Kind::Text;
        vec![
            Col { name: "id", typname: "int4", kind: &INT, key: true },
            Col { name: "task", typname: "text", kind: &TEXT, key: false },
        ]
    }

    fn data(d: &Data<'_>) -> Value {
        let mut out = Vec::new();
        write_data(&mut out, d);
        serde_json::from_slice(&out).unwrap()
    }

    fn base<'a>(cols: &'a [Col<'a>], change: ChangeType) -> Data<'a> {
        Data {
            schema: "public",
            table: "todos",
            commit_time: 1_735_689_600_000_000 - PG_EPOCH_OFFSET_MICROS,
            change,
            columns: cols,
            new: None,
            old: None,
            old_key_only: false,
            visible: None,
            old_only: None,
            error: None,
        }
    }

    #[test]
    fn insert_is_byte_exact_with_the_capture() {
        let cols = cols();
        let new = t(&[Some("1"), Some("x")]);
        let mut out = Vec::new();
        write_data(&mut out, &Data { new: Some(&new), ..base(&cols, ChangeType::Insert) });
        let f = frame(Format::V2, "realtime:room1", &[1000], &out);
        let (_, n) = parse_header(&f).unwrap().unwrap();
        assert_eq!(
            std::str::from_utf8(&f[n..]).unwrap(),
            r#"[null,null,"realtime:room1","postgres_changes",{"ids":[1000],"data":{"schema":"public","table":"todos","commit_timestamp":"2025-01-01T00:00:00.000Z","type":"INSERT","columns":[{"name":"id","type":"int4"},{"name":"task","type":"text"}],"record":{"id":1,"task":"x"},"errors":null}}]"#
        );
    }

    #[test]
    fn update_and_delete_shapes() {
        let cols = cols();
        let new = t(&[Some("1"), Some("y")]);
        let old = t(&[Some("1"), Some("x")]);
        // Default replica identity: the key columns of the new row.
        let v = data(&Data { new: Some(&new), ..base(&cols, ChangeType::Update) });
        assert_eq!(v["old_record"], json!({"id": 1}));
        assert_eq!(v["record"], json!({"id": 1, "task": "y"}));
        // REPLICA IDENTITY FULL.
        let v = data(&Data { new: Some(&new), old: Some(&old), ..base(&cols, ChangeType::Update) });
        assert_eq!(v["old_record"], json!({"id": 1, "task": "x"}));
        // Unchanged TOAST in the new row comes from the full old row.
        let toast = Tuple(vec![Datum::Text(Bytes::from_static(b"1")), Datum::Unchanged]);
        let v = data(&Data { new: Some(&toast), old: Some(&old), ..base(&cols, ChangeType::Update) });
        assert_eq!(v["record"], json!({"id": 1, "task": "x"}));
        let v = data(&Data { new: Some(&toast), ..base(&cols, ChangeType::Update) });
        assert_eq!(v["record"], json!({"id": 1}));
        // DELETE, key only.
        let key = t(&[Some("1"), None]);
        let v = data(&Data { old: Some(&key), old_key_only: true, ..base(&cols, ChangeType::Delete) });
        assert_eq!(v["old_record"], json!({"id": 1}));
        assert!(v.get("record").is_none());
        // DELETE on an RLS table: primary key only, even with a full old row.
        let pk = [true, false];
        let v = data(&Data { old: Some(&old), old_only: Some(&pk), ..base(&cols, ChangeType::Delete) });
        assert_eq!(v["old_record"], json!({"id": 1}));
        // Column privileges.
        let vis = [false, true];
        let v = data(&Data { new: Some(&new), visible: Some(&vis), ..base(&cols, ChangeType::Insert) });
        assert_eq!(v["columns"], json!([{"name": "task", "type": "text"}]));
        assert_eq!(v["record"], json!({"task": "y"}));
        let v =
            data(&Data { new: Some(&new), error: Some("Error 401: Unauthorized"), ..base(&cols, ChangeType::Insert) });
        assert_eq!(v["errors"], json!(["Error 401: Unauthorized"]));
        assert_eq!(v["record"], json!({}));
    }

    #[test]
    fn oversized_records_are_trimmed() {
        let cols = cols();
        let big = "x".repeat(MAX_RECORD_BYTES + 10);
        let new = t(&[Some("7"), Some(&big)]);
        let v = data(&Data { new: Some(&new), ..base(&cols, ChangeType::Insert) });
        assert_eq!(v["record"], json!({"id": 7}));
        assert_eq!(v["errors"], json!(["Error 413: Payload Too Large"]));
    }
}
