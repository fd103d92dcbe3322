//! The `phx_join` payload: `{"config": {broadcast, presence, postgres_changes, private},
//! "access_token"}`, parsed best-effort as Supabase Realtime does (unknown keys ignored,
//! booleans also as `"true"`/`"false"` strings, defaults for anything missing).

use serde_json::value::RawValue;
use serde_json::{Map, Value};

/// What a join asked for.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct JoinConfig {
    /// `broadcast.self`: deliver the sender's own broadcasts back to it.
    pub broadcast_self: bool,
    /// `broadcast.ack`: reply `ok` to each broadcast push.
    pub ack: bool,
    /// `presence.enabled`.
    pub presence_enabled: bool,
    /// `presence.key` (`None` when empty: the server generates one).
    pub presence_key: Option<String>,
    /// `private`.
    pub private: bool,
    /// `postgres_changes`, in order.
    pub postgres_changes: Vec<PgBinding>,
    /// `broadcast.replay`: `{since: ms epoch, limit}`.
    pub replay: Option<Replay>,
    /// `broadcast.resume`: `{epoch, offset}` (corecast extension, gapless resume).
    pub resume: Option<Resume>,
    /// `access_token` from the payload (ignored when it starts with `sb_`).
    pub access_token: Option<String>,
}

/// Replay by time (realtime-js `broadcast.replay`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Replay {
    pub since_ms: u64,
    pub limit: u32,
}

/// Resume after a known position (corecast's gapless resume).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resume {
    pub epoch: String,
    pub offset: u64,
}

/// One `postgres_changes` binding: the client's object (echoed back verbatim with an `id`)
/// and its parsed fields.
#[derive(Debug, Clone, PartialEq)]
pub struct PgBinding {
    /// The object exactly as the client sent it.
    pub raw: String,
    pub event: String,
    pub schema: String,
    pub table: String,
    pub filter: Option<String>,
    /// Stable id: the same binding gets the same id on every shard and every run.
    pub id: u32,
}

impl PgBinding {
    /// The echo for the join reply: the client's object plus `"id"`.
    pub fn echo(&self) -> String {
        let body = self.raw.trim_end();
        let body = body.strip_suffix('}').unwrap_or(body).trim_end();
        let sep = if body.ends_with('{') { "" } else { "," };
        format!("{body}{sep}\"id\":{}}}", self.id)
    }
}

/// Stable 31-bit id of a binding (event, schema, table, filter).
pub fn binding_id(event: &str, schema: &str, table: &str, filter: Option<&str>) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for part in [event, "\0", schema, "\0", table, "\0", filter.unwrap_or("")] {
        for b in part.bytes() {
            h ^= b as u32;
            h = h.wrapping_mul(0x0100_0193);
        }
    }
    h & 0x7fff_ffff
}

/// A flexible boolean: `true`/`false` or those words as strings in any case.
fn flex_bool(v: Option<&Value>) -> Option<bool> {
    match v? {
        Value::Bool(b) => Some(*b),
        Value::String(s) if s.eq_ignore_ascii_case("true") => Some(true),
        Value::String(s) if s.eq_ignore_ascii_case("false") => Some(false),
        _ => None,
    }
}

/// Parses a join payload. Never fails: invalid parts fall back to their defaults.
pub fn parse(payload: &RawValue) -> JoinConfig {
    let mut cfg = JoinConfig::default();
    let Ok(Value::Object(root)) = serde_json::from_str::<Value>(payload.get()) else {
        return cfg;
    };
    cfg.access_token = root
        .get("access_token")
        .and_then(Value::as_str)
        .filter(|t| !t.starts_with("sb_") && !t.is_empty())
        .map(str::to_string);
    let Some(Value::Object(config)) = root.get("config") else {
        return cfg;
    };
    let obj = |k: &str| config.get(k).and_then(Value::as_object);
    if let Some(b) = obj("broadcast") {
        cfg.broadcast_self = flex_bool(b.get("self")).unwrap_or(false);
        cfg.ack = flex_bool(b.get("ack")).unwrap_or(false);
        cfg.replay = b.get("replay").and_then(Value::as_object).map(|r| Replay {
            since_ms: r.get("since").and_then(Value::as_u64).unwrap_or(0),
            limit: r.get("limit").and_then(Value::as_u64).unwrap_or(10).clamp(1, 1000) as u32,
        });
        cfg.resume = b.get("resume").and_then(Value::as_object).and_then(parse_resume);
    }
    if let Some(p) = obj("presence") {
        cfg.presence_enabled = flex_bool(p.get("enabled")).unwrap_or(false);
        cfg.presence_key = match p.get("key") {
            Some(Value::String(s)) if !s.is_empty() => Some(s.clone()),
            Some(Value::Number(n)) => Some(n.to_string()),
            _ => None,
        };
    }
    cfg.private = flex_bool(config.get("private")).unwrap_or(false);
    if let Some(Value::Array(list)) = config.get("postgres_changes") {
        cfg.postgres_changes = list.iter().filter_map(Value::as_object).map(binding).collect();
    }
    cfg
}

/// Most bindings one SSE stream may ask for.
pub const MAX_SSE_BINDINGS: usize = 100;

/// The `postgres_changes` query parameter of an SSE stream: a JSON array of binding objects
/// (`{"event","schema","table","filter"}`, the same fields and defaults as in a join), each
/// with an optional `"topic"` naming which of the stream's topics delivers its changes
/// (default: the first). Unlike a join payload this is strict: a bad value is the request's
/// error. Returns `(topic name or None, binding)` pairs.
pub fn parse_sse_bindings(json: &str) -> Result<Vec<(Option<String>, PgBinding)>, String> {
    const FIELDS: [&str; 5] = ["event", "schema", "table", "filter", "topic"];
    const SHAPE: &str = "postgres_changes must be a JSON array of objects like \
                         {\"event\":\"*\",\"schema\":\"public\",\"table\":\"todos\",\"filter\":\"id=eq.1\"}";
    let list = match serde_json::from_str::<Value>(json) {
        Ok(Value::Array(list)) => list,
        Ok(Value::Object(o)) => vec![Value::Object(o)],
        Ok(_) => return Err(SHAPE.into()),
        Err(e) => return Err(format!("{SHAPE}: {e}")),
    };
    if list.is_empty() {
        return Err(format!("{SHAPE}: the array is empty"));
    }
    if list.len() > MAX_SSE_BINDINGS {
        return Err(format!("too many postgres_changes bindings: {} (max {MAX_SSE_BINDINGS})", list.len()));
    }
    let mut out = Vec::with_capacity(list.len());
    for v in &list {
        let Value::Object(o) = v else { return Err(SHAPE.into()) };
        for key in FIELDS {
            if o.get(key).is_some_and(|v| !v.is_string()) {
                return Err(format!("postgres_changes: \"{key}\" must be a string"));
            }
        }
        if let Some(k) = o.keys().find(|k| !FIELDS.contains(&k.as_str())) {
            return Err(format!(
                "postgres_changes: unknown field {k:?} (expected event, schema, table, filter, topic)"
            ));
        }
        let topic = o.get("topic").and_then(Value::as_str).map(str::to_string);
        let mut fields = o.clone();
        fields.remove("topic");
        out.push((topic, binding(&fields)));
    }
    Ok(out)
}

fn parse_resume(r: &Map<String, Value>) -> Option<Resume> {
    let epoch = r.get("epoch").and_then(Value::as_str)?.to_string();
    let offset = match r.get("offset")? {
        Value::Number(n) => n.as_u64()?,
        Value::String(s) => s.parse().ok()?,
        _ => return None,
    };
    Some(Resume { epoch, offset })
}

fn binding(o: &Map<String, Value>) -> PgBinding {
    let s = |k: &str| o.get(k).and_then(Value::as_str);
    let event = s("event").unwrap_or("*").to_string();
    let schema = s("schema").unwrap_or("public").to_string();
    let table = s("table").unwrap_or("*").to_string();
    let filter = s("filter").filter(|f| !f.is_empty()).map(str::to_string);
    let id = binding_id(&event, &schema, &table, filter.as_deref());
    // serde_json without `preserve_order` sorts keys; the client compares fields, not order.
    let raw = Value::Object(o.clone()).to_string();
    PgBinding { raw, event, schema, table, filter, id }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> JoinConfig {
        parse(&serde_json::from_str::<Box<RawValue>>(s).unwrap())
    }

    #[test]
    fn captured_join_payloads() {
        let c = p(
            r#"{"config":{"broadcast":{"self":true,"ack":true},"presence":{"key":"u1","enabled":true},"postgres_changes":[{"event":"INSERT","schema":"public","table":"todos","filter":"id=eq.1"}],"private":false}}"#,
        );
        assert!(c.broadcast_self && c.ack && c.presence_enabled && !c.private);
        assert_eq!(c.presence_key.as_deref(), Some("u1"));
        assert_eq!(c.postgres_changes.len(), 1);
        let b = &c.postgres_changes[0];
        assert_eq!((b.event.as_str(), b.table.as_str(), b.filter.as_deref()), ("INSERT", "todos", Some("id=eq.1")));
        let echo: Value = serde_json::from_str(&b.echo()).unwrap();
        assert_eq!(echo["id"], b.id);
        assert_eq!(echo["filter"], "id=eq.1");
        let d = p(
            r#"{"config":{"broadcast":{"ack":false,"self":false},"presence":{"key":"","enabled":false},"postgres_changes":[],"private":true}}"#,
        );
        assert!(d.private && d.presence_key.is_none() && !d.presence_enabled);
    }

    #[test]
    fn flexible_and_best_effort() {
        let c = p(
            r#"{"config":{"broadcast":{"self":"TRUE","replay":{"since":5,"limit":3},"resume":{"epoch":"e1","offset":"42"}},"private":"true","presence":7},"access_token":"jwt"}"#,
        );
        assert!(c.broadcast_self && c.private);
        assert_eq!(c.replay, Some(Replay { since_ms: 5, limit: 3 }));
        assert_eq!(c.resume, Some(Resume { epoch: "e1".into(), offset: 42 }));
        assert_eq!(c.access_token.as_deref(), Some("jwt"));
        assert_eq!(p("[]"), JoinConfig::default());
        assert_eq!(p(r#"{"access_token":"sb_publishable_x"}"#).access_token, None);
    }

    #[test]
    fn ids_are_stable_and_echo_handles_empty() {
        assert_eq!(binding_id("*", "public", "t", None), binding_id("*", "public", "t", None));
        assert_ne!(binding_id("*", "public", "t", None), binding_id("*", "public", "t", Some("id=eq.1")));
        let b = PgBinding {
            raw: "{}".into(),
            event: "*".into(),
            schema: "public".into(),
            table: "*".into(),
            filter: None,
            id: 5,
        };
        assert_eq!(b.echo(), r#"{"id":5}"#);
    }

    #[test]
    fn sse_bindings_are_strict() {
        let v =
            parse_sse_bindings(r#"[{"event":"INSERT","table":"todos"},{"table":"t","filter":"id=eq.1","topic":"b"}]"#)
                .unwrap();
        assert_eq!(v.len(), 2);
        assert_eq!((v[0].0.as_deref(), &*v[0].1.schema, &*v[0].1.event), (None, "public", "INSERT"));
        assert_eq!((v[1].0.as_deref(), v[1].1.filter.as_deref()), (Some("b"), Some("id=eq.1")));
        assert_eq!(v[1].1.id, binding_id("*", "public", "t", Some("id=eq.1")));
        assert_eq!(parse_sse_bindings(r#"{"table":"t"}"#).unwrap().len(), 1);
        for bad in ["", "[", "[]", "3", "[1]", r#"[{"table":5}]"#, r#"[{"tabel":"t"}]"#] {
            assert!(parse_sse_bindings(bad).is_err(), "{bad:?}");
        }
        let many = format!("[{}]", vec![r#"{"table":"t"}"#; MAX_SSE_BINDINGS + 1].join(","));
        assert!(parse_sse_bindings(&many).unwrap_err().contains("too many"));
    }
}
