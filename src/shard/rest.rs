//! HTTP routes other than the WebSocket stream itself: the upgrade decision (auth, `vsn`,
//! handshake), REST broadcast, health and metrics. Each request is answered synchronously;
//! publishes are handed to the topic's owner shard before the `202` goes out.
//!
//! | route | answer |
//! |---|---|
//! | `GET /realtime/v1/websocket`, `GET /socket/websocket` | `101`, or `400`/`401` with a JSON error |
//! | `POST /realtime/v1/api/broadcast` (also `/api/broadcast`) | `202`; `400` bad JSON; `422` invalid message |
//! | `POST /realtime/v1/api/broadcast/{topic}/events/{event}` | `202`; `400`/`415`/`422` |
//! | `GET /health` | `200 {"status":"ok","node":…,"cluster":"none","members":[…]}` |
//! | `GET /metrics` | Prometheus text |
//! | `OPTIONS *` | `204` with CORS headers |

use std::borrow::Cow;
use std::sync::Arc;

use bytes::Bytes;
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::auth::{AuthError, Claims};
use crate::bus::ShardMsg;
use crate::channel::registry::ConnId;
use crate::protocol::error::HandshakeError;
use crate::protocol::http::{self, percent_decode, Request};
use crate::protocol::phoenix::config::{self, PgBinding};
use crate::protocol::phoenix::session::{Payload, Persist, Publish};
use crate::protocol::phoenix::{Topic, Vsn};
use crate::protocol::ws::handshake;
use crate::shard::Shard;

/// Largest number of messages one batch request may carry.
pub const MAX_BATCH: usize = 1000;

/// What to do after a request.
#[derive(Debug)]
pub enum Outcome {
    /// Send this response; keep the connection open if `keep_alive`.
    Respond { bytes: Vec<u8>, keep_alive: bool },
    /// Send the `101` response and switch to WebSocket with this session setup.
    Upgrade { response: Vec<u8>, vsn: Vsn, claims: Arc<Claims> },
    /// Another shard sends the response; then continue if `keep_alive`.
    Deferred { keep_alive: bool },
    /// Start a Server-Sent Events stream.
    Sse(Box<SseRequest>),
}

/// A validated SSE stream request.
#[derive(Debug)]
pub struct SseRequest {
    /// Topics in request order (the order of positions in the resume token).
    pub topics: Vec<Topic>,
    /// Deliver `presence_state` and `presence_diff` events.
    pub presence: bool,
    /// Track this stream's presence on every topic: key and state (a JSON object).
    pub track: Option<(Arc<str>, Bytes)>,
    /// Positions from `Last-Event-ID` (or `last_event_id`), one per topic.
    pub resume: Option<Vec<Option<(String, u64)>>>,
    /// A `Last-Event-ID` was given but does not fit these topics.
    pub bad_resume: Option<String>,
    /// `postgres_changes` bindings per topic (same order as `topics`; empty for most).
    pub pg: Vec<Vec<PgBinding>>,
    /// The stream's claims (RLS on Postgres changes).
    pub claims: Arc<Claims>,
}

fn respond(bytes: Vec<u8>, keep_alive: bool) -> Outcome {
    Outcome::Respond { bytes, keep_alive }
}

/// Routes one request with its complete body.
pub fn handle(shard: &Shard, id: ConnId, req: &Request<'_>, body: &[u8]) -> Outcome {
    let ka = req.keep_alive();
    if req.method == "OPTIONS" {
        return respond(http::response(204, "text/plain", b"", ka), ka);
    }
    let path = req.path.trim_end_matches('/');
    let path = if path.is_empty() { "/" } else { path };
    match path {
        "/realtime/v1/websocket" | "/socket/websocket" => return upgrade(shard, req),
        "/health" => return get_only(req, || http::response(200, "application/json", &health(shard), ka)),
        "/" => {
            return get_only(req, || {
                http::response(200, "text/html; charset=utf-8", super::status::PAGE.as_bytes(), ka)
            })
        }
        "/status.json" => {
            return get_only(req, || {
                // Development mode shows everything; with a secret, a service_role token does.
                let details = shard.ctx.verifier.development_mode()
                    || authenticate(shard, token(req, true).as_deref()).is_ok_and(|c| c.role == "service_role");
                http::response(200, "application/json", &super::status::json(shard, details), ka)
            });
        }
        "/metrics" => {
            return get_only(req, || {
                let text = super::stats::render(
                    shard.cfg.node_id(),
                    shard.cfg.cluster.name(),
                    shard.cluster.as_ref().map_or(1, |c| c.members().len()),
                    &shard.stats,
                    shard.ingest.as_ref().map(|i| i.stats()),
                );
                http::response(200, "text/plain; version=0.0.4", text.as_bytes(), ka)
            })
        }
        _ => {}
    }
    if path == "/realtime/v1/sse" || path == "/sse" {
        if req.method != "GET" {
            return respond(http::json_error(405, "use GET", ka), ka);
        }
        return sse(shard, req, ka);
    }
    let api = path.strip_prefix("/realtime/v1").unwrap_or(path);
    if api == "/api/broadcast" {
        if req.method != "POST" {
            return respond(http::json_error(405, "use POST", ka), ka);
        }
        return match batch(shard, req, body, ka) {
            Ok(msgs) => publish_all(shard, id, msgs, http::response(202, "application/json", b"", ka), ka),
            Err(resp) => respond(resp, ka),
        };
    }
    if let Some(topic) = api.strip_prefix("/api/channels/").and_then(|r| r.strip_suffix("/messages")) {
        if req.method != "GET" {
            return respond(http::json_error(405, "use GET", ka), ka);
        }
        return history(shard, id, req, &percent_decode(topic), ka);
    }
    if let Some(rest) = api.strip_prefix("/api/broadcast/") {
        if let Some((topic, event)) = rest.split_once("/events/") {
            if req.method != "POST" {
                return respond(http::json_error(405, "use POST", ka), ka);
            }
            return match single(shard, req, &percent_decode(topic), &percent_decode(event), body, ka) {
                Ok(p) => publish_all(shard, id, vec![p], http::response(202, "application/json", b"", ka), ka),
                Err(resp) => respond(resp, ka),
            };
        }
    }
    respond(http::json_error(404, &format!("no route for {} {}", req.method, req.path), ka), ka)
}

/// `GET /health`: `{"status":"ok","node":…,"cluster":"none"|"postgres","members":[…]}`: the
/// live members (nodes whose lease holds), this one included. A single node is its own only
/// member.
fn health(shard: &Shard) -> Vec<u8> {
    let mut body = Vec::with_capacity(96);
    let node = shard.cfg.node_id();
    body.extend_from_slice(b"{\"status\":\"ok\",\"node\":");
    crate::protocol::json::write_str(&mut body, node);
    body.extend_from_slice(b",\"cluster\":");
    crate::protocol::json::write_str(&mut body, shard.cfg.cluster.name());
    body.extend_from_slice(b",\"members\":[");
    let members = shard.cluster.as_ref().map_or_else(|| vec![node.to_string()], |c| c.members());
    for (i, m) in members.iter().enumerate() {
        if i > 0 {
            body.push(b',');
        }
        crate::protocol::json::write_str(&mut body, m);
    }
    body.extend_from_slice(b"]}");
    body
}

/// `GET /realtime/v1/api/channels/{topic}/messages?limit=50&before=<offset>[&private=true]`:
/// validated here, answered by the topic's owner shard.
fn history(shard: &Shard, id: ConnId, req: &Request<'_>, topic: &str, ka: bool) -> Outcome {
    let claims = match authenticate(shard, token(req, true).as_deref()) {
        Ok(c) => c,
        Err(e) => return respond(http::json_error(401, &e.to_string(), ka), ka),
    };
    let private = match req.query_param("private").map(|v| parse_bool(&v)) {
        None => false,
        Some(Some(b)) => b,
        Some(None) => return respond(http::json_error(400, "private must be true or false", ka), ka),
    };
    let limit = match req.query_param("limit") {
        None => 50,
        Some(v) => match v.parse::<usize>() {
            Ok(n) if (1..=MAX_HISTORY_PAGE).contains(&n) => n,
            _ => {
                let msg = format!("limit must be a number from 1 to {MAX_HISTORY_PAGE}, got {v:?}");
                return respond(http::json_error(400, &msg, ka), ka);
            }
        },
    };
    // An optional non-negative integer parameter; a malformed one is a 400 naming it.
    let number = |name: &str, what: &str| match req.query_param(name) {
        None => Ok(None),
        Some(v) => v.parse::<u64>().map(Some).map_err(|_| format!("{name} must be {what}, got {v:?}")),
    };
    let (before, before_ms) = match (
        number("before", "a message offset (a non-negative integer)"),
        number("before_ms", "a time in Unix milliseconds"),
    ) {
        (Ok(b), Ok(ms)) => (b, ms),
        (Err(msg), _) | (_, Err(msg)) => return respond(http::json_error(400, &msg, ka), ka),
    };
    let topic = match Topic::new(topic, private) {
        Ok(t) => t,
        Err(e) => return respond(http::json_error(400, &e.to_string(), ka), ka),
    };
    if !may_publish(shard, &claims, &topic) {
        let msg = format!("not allowed to read private topic {:?}", topic.name());
        return respond(http::json_error(403, &msg, ka), ka);
    }
    let owner = topic.owner(shard.shards);
    shard.route(
        owner,
        ShardMsg::HistoryRequest { topic, from: shard.id, conn: id, before, before_ms, limit, keep_alive: ka },
    );
    Outcome::Deferred { keep_alive: ka }
}

/// `GET /realtime/v1/sse?topic=a&topic=b[&private=true][&presence=true]
/// [&track=<json object>&presence_key=<key>][&last_event_id=<token>]
/// [&postgres_changes=<json array of bindings>]`.
fn sse(shard: &Shard, req: &Request<'_>, ka: bool) -> Outcome {
    let bad = |msg: &str| respond(http::json_error(400, msg, ka), ka);
    let claims = match authenticate(shard, token(req, true).as_deref()) {
        Ok(c) => c,
        Err(e) => return respond(http::json_error(401, &e.to_string(), ka), ka),
    };
    let flag = |name: &str| match req.query_param(name) {
        None => Ok(false),
        Some(v) if v.is_empty() => Ok(true),
        Some(v) => parse_bool(&v).ok_or_else(|| format!("{name} must be true or false, got {v:?}")),
    };
    let (private, presence) = match (flag("private"), flag("presence")) {
        (Ok(a), Ok(b)) => (a, b),
        (Err(e), _) | (_, Err(e)) => return bad(&e),
    };
    let mut topics: Vec<Topic> = Vec::new();
    for name in req.query_params("topic") {
        let t = match Topic::new(&name, private) {
            Ok(t) => t,
            Err(e) => return bad(&format!("bad topic {name:?}: {e}")),
        };
        if !topics.contains(&t) {
            topics.push(t);
        }
    }
    if topics.is_empty() {
        return bad("at least one topic is required: /realtime/v1/sse?topic=<name>[&topic=<name>...]");
    }
    let max = shard.cfg.limits.max_channels_per_connection;
    if topics.len() > max {
        return bad(&format!("too many topics: {} (max {max})", topics.len()));
    }
    if let Some(t) = topics.iter().find(|t| !may_publish(shard, &claims, t)) {
        let msg = format!("Unauthorized: You do not have permissions to read from this Channel topic: {}", t.name());
        return respond(http::json_error(403, &msg, ka), ka);
    }
    let track = match req.query_param("track") {
        None => None,
        Some(state) => {
            if !state.trim_start().starts_with('{') || serde_json::from_str::<serde::de::IgnoredAny>(&state).is_err() {
                return bad("track must be a JSON object (the presence state)");
            }
            if state.len() > shard.cfg.limits.presence_max_bytes {
                return bad(&format!("track state is larger than {} bytes", shard.cfg.limits.presence_max_bytes));
            }
            let key = req
                .query_param("presence_key")
                .filter(|k| !k.is_empty())
                .map_or_else(|| format!("sse-{:016x}", fastrand::u64(..)), |k| k.into_owned());
            Some((Arc::from(key.as_str()), Bytes::from(state.into_owned())))
        }
    };
    let mut pg: Vec<Vec<PgBinding>> = vec![Vec::new(); topics.len()];
    if let Some(json) = req.query_param("postgres_changes") {
        if shard.ingest.is_none() {
            return bad("postgres_changes needs a database: start corecast with --database-url (DATABASE_URL)");
        }
        let bindings = match config::parse_sse_bindings(&json) {
            Ok(b) => b,
            Err(e) => return bad(&e),
        };
        for (name, b) in bindings {
            let i = match name {
                None => 0,
                Some(n) => match topics.iter().position(|t| t.name() == n) {
                    Some(i) => i,
                    None => return bad(&format!("postgres_changes: topic {n:?} is not one of this stream's topics")),
                },
            };
            if !pg[i].iter().any(|x| x.id == b.id) {
                pg[i].push(b);
            }
        }
    }
    let last = req.header("last-event-id").map(Cow::Borrowed).or_else(|| req.query_param("last_event_id"));
    let (resume, bad_resume) = match last.as_deref().map(str::trim).filter(|s| !s.is_empty()) {
        None => (None, None),
        Some(tok) => match crate::protocol::sse::parse_token(tok) {
            Some(p) if p.len() == topics.len() => (Some(p), None),
            _ => (None, Some(format!("resume impossible: Last-Event-ID {tok:?} does not match this stream's topics"))),
        },
    };
    Outcome::Sse(Box::new(SseRequest { topics, presence, track, resume, bad_resume, pg, claims }))
}

/// Largest history page.
pub const MAX_HISTORY_PAGE: usize = 1000;

fn get_only(req: &Request<'_>, f: impl FnOnce() -> Vec<u8>) -> Outcome {
    let ka = req.keep_alive();
    if req.method != "GET" && req.method != "HEAD" {
        return respond(http::json_error(405, "use GET", ka), ka);
    }
    respond(f(), ka)
}

/// The token of a REST or upgrade request: `Authorization: Bearer`, then header `apikey` /
/// `x-api-key`, then the `apikey` query parameter.
fn token<'a>(req: &'a Request<'a>, bearer_first: bool) -> Option<Cow<'a, str>> {
    let bearer = req
        .header("authorization")
        .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
        .map(|t| Cow::Borrowed(t.trim()));
    let header = req.header("x-api-key").or_else(|| req.header("apikey")).map(Cow::Borrowed);
    let query = req.query_param("apikey");
    if bearer_first {
        bearer.or(header).or(query)
    } else {
        header.or(query)
    }
}

fn authenticate(shard: &Shard, tok: Option<&str>) -> Result<Arc<Claims>, AuthError> {
    let now = super::conn::now().unix_secs;
    // Thousands of connections usually present the same apikey: verify it once per shard and
    // share the claims (a signature check per connect, and the claims' memory per connection,
    // would otherwise be paid by every socket). Expiry is still checked at every use.
    let key = tok.map(str::trim).unwrap_or("");
    if let Some(c) = shard.claims_cache.borrow().get(key) {
        if c.exp.is_none_or(|e| e > now) {
            return Ok(c.clone());
        }
    }
    let claims = shard.ctx.verifier.verify(tok, now)?;
    let mut cache = shard.claims_cache.borrow_mut();
    if cache.len() >= CLAIMS_CACHE {
        cache.clear();
    }
    cache.insert(Box::from(key), claims.clone());
    Ok(claims)
}

/// Verified tokens remembered per shard.
const CLAIMS_CACHE: usize = 4096;

fn upgrade(shard: &Shard, req: &Request<'_>) -> Outcome {
    let vsn_raw = req.query_param("vsn");
    let Some(vsn) = Vsn::parse(vsn_raw.as_deref()) else {
        let e = HandshakeError::BadVsn(vsn_raw.unwrap_or_default().into_owned());
        return respond(http::json_error(400, &e.to_string(), false), false);
    };
    // A Phoenix 1.8 `authToken` (in the subprotocols) is the token the client chose for auth:
    // it comes before the apikey header and query parameter.
    let phx_token = match handshake::auth_token(req) {
        Ok(t) => t,
        Err(e) => return respond(http::json_error(401, &e.to_string(), false), false),
    };
    let tok = phx_token.map(Cow::Owned).or_else(|| token(req, false));
    let claims = match authenticate(shard, tok.as_deref()) {
        Ok(c) => c,
        Err(e) => return respond(http::json_error(401, &e.to_string(), false), false),
    };
    match handshake::accept(req) {
        Ok(mut response) => {
            // Which shard serves this socket: useful when debugging placement (and in tests).
            response.truncate(response.len() - 2);
            response.extend_from_slice(format!("X-Corecast-Shard: {}\r\n\r\n", shard.id).as_bytes());
            Outcome::Upgrade { response, vsn, claims }
        }
        Err(e) => respond(http::json_error(400, &e.to_string(), false), false),
    }
}

/// A flexible boolean in REST bodies and query strings.
fn flex(v: Option<&serde_json::Value>) -> Option<bool> {
    match v? {
        serde_json::Value::Bool(b) => Some(*b),
        serde_json::Value::String(s) => parse_bool(s),
        _ => None,
    }
}

fn parse_bool(s: &str) -> Option<bool> {
    if s.eq_ignore_ascii_case("true") || s == "1" {
        Some(true)
    } else if s.eq_ignore_ascii_case("false") || s == "0" {
        Some(false)
    } else {
        None
    }
}

/// Checks that `claims` may publish to `topic` (private topics need the claims rule, or
/// development mode).
fn may_publish(shard: &Shard, claims: &Claims, topic: &Topic) -> bool {
    !topic.is_private() || shard.ctx.verifier.development_mode() || claims.allows_private(topic.name())
}

/// Hands `msgs` to their owner shards and answers `response` (the 202) once every one has
/// been sequenced, so a client that waits for the 202 before publishing again keeps its order.
fn publish_all(shard: &Shard, id: ConnId, msgs: Vec<Publish>, response: Vec<u8>, ka: bool) -> Outcome {
    // Set the count first: a local owner acknowledges synchronously.
    shard.with_slot(id, |s| {
        s.awaiting_acks = msgs.len() as u32;
        s.deferred_response = Some(Bytes::from(response.clone()));
    });
    if msgs.is_empty() {
        shard.with_slot(id, |s| s.deferred_response = None);
        return respond(response, ka);
    }
    for p in msgs {
        let owner = p.topic.owner(shard.shards);
        let p = Publish { received: Some(std::time::Instant::now()), ..p };
        shard.route(owner, ShardMsg::Publish { publish: Box::new(p), origin: None, ack_to: Some((shard.id, id)) });
    }
    Outcome::Deferred { keep_alive: ka }
}

fn batch(shard: &Shard, req: &Request<'_>, body: &[u8], ka: bool) -> Result<Vec<Publish>, Vec<u8>> {
    #[derive(Deserialize)]
    struct Body<'a> {
        #[serde(borrow)]
        messages: Option<Vec<&'a RawValue>>,
    }
    let claims =
        authenticate(shard, token(req, true).as_deref()).map_err(|e| http::json_error(401, &e.to_string(), ka))?;
    let parsed: Body<'_> =
        serde_json::from_slice(body).map_err(|e| http::json_error(400, &format!("invalid JSON body: {e}"), ka))?;
    let Some(messages) = parsed.messages else {
        return Err(http::json_error(422, "body needs a `messages` array", ka));
    };
    if messages.len() > MAX_BATCH {
        let msg = format!("too many messages in one batch: {} (max {MAX_BATCH})", messages.len());
        return Err(http::json_error(422, &msg, ka));
    }
    let mut out = Vec::with_capacity(messages.len());
    let user_id = claims.sub.clone();
    for (i, raw) in messages.iter().enumerate() {
        match batch_message(raw).map(|p| Publish { user_id: user_id.clone(), ..p }) {
            Ok(p) if !may_publish(shard, &claims, &p.topic) => {
                let msg = format!("messages[{i}]: not allowed to publish to private topic {:?}", p.topic.name());
                return Err(http::json_error(403, &msg, ka));
            }
            Ok(p) if p.payload.len() > shard.cfg.limits.max_payload_bytes => {
                let msg =
                    format!("messages[{i}]: payload_size_exceeded (max {} bytes)", shard.cfg.limits.max_payload_bytes);
                return Err(http::json_error(413, &msg, ka));
            }
            Ok(p) => out.push(p),
            Err(e) => return Err(http::json_error(422, &format!("messages[{i}]: {e}"), ka)),
        }
    }
    Ok(out)
}

fn batch_message(raw: &RawValue) -> Result<Publish, String> {
    #[derive(Deserialize)]
    struct Msg<'a> {
        topic: Option<Cow<'a, str>>,
        event: Option<Cow<'a, str>>,
        #[serde(borrow)]
        payload: Option<&'a RawValue>,
        private: Option<serde_json::Value>,
        id: Option<Cow<'a, str>>,
        persist: Option<serde_json::Value>,
    }
    let m: Msg<'_> = serde_json::from_str(raw.get()).map_err(|_| "each message must be an object".to_string())?;
    let topic = m.topic.filter(|t| !t.is_empty()).ok_or("`topic` is required")?;
    let event = m.event.filter(|e| !e.is_empty()).ok_or("`event` is required")?;
    let payload = m.payload.ok_or("`payload` is required")?;
    if !payload.get().starts_with('{') {
        return Err("`payload` must be an object".into());
    }
    let private = flex(m.private.as_ref()).unwrap_or(false);
    let topic = Topic::new(&topic, private).map_err(|e| e.to_string())?;
    if let Some(id) = &m.id {
        if id.is_empty() || id.len() > 128 {
            return Err("`id` must be a non-empty string of at most 128 bytes".into());
        }
    }
    let persist = match &m.persist {
        Some(serde_json::Value::Object(o)) => {
            o.get("ttl").and_then(|t| t.as_u64()).map_or(Persist::Default, Persist::Ttl)
        }
        v => {
            if flex(v.as_ref()).unwrap_or(false) {
                Persist::Default
            } else {
                Persist::No
            }
        }
    };
    Ok(Publish {
        topic,
        event: Arc::from(&*event),
        payload: Payload::Json(Bytes::copy_from_slice(payload.get().as_bytes())),
        binary_frame: false,
        exclude_sender: false,
        persist,
        id: m.id.map(|i| Arc::from(&*i)),
        user_id: None, // the caller's (from the request's token)
        received: None,
        ack: None,
    })
}

fn single(
    shard: &Shard,
    req: &Request<'_>,
    topic: &str,
    event: &str,
    body: &[u8],
    ka: bool,
) -> Result<Publish, Vec<u8>> {
    let claims =
        authenticate(shard, token(req, true).as_deref()).map_err(|e| http::json_error(401, &e.to_string(), ka))?;
    let private = req.query_param("private").and_then(|v| parse_bool(&v)).unwrap_or(false);
    let topic = Topic::new(topic, private).map_err(|e| http::json_error(422, &e.to_string(), ka))?;
    if event.is_empty() || event.len() > 255 {
        return Err(http::json_error(422, "event must be 1 to 255 bytes", ka));
    }
    if !may_publish(shard, &claims, &topic) {
        let msg = format!("not allowed to publish to private topic {:?}", topic.name());
        return Err(http::json_error(403, &msg, ka));
    }
    if body.len() > shard.cfg.limits.max_payload_bytes {
        let msg = format!("payload_size_exceeded (max {} bytes)", shard.cfg.limits.max_payload_bytes);
        return Err(http::json_error(413, &msg, ka));
    }
    let ctype = req.header("content-type").unwrap_or("").split(';').next().unwrap_or("").trim().to_ascii_lowercase();
    let payload = match ctype.as_str() {
        "application/octet-stream" => Payload::Binary(Bytes::copy_from_slice(body)),
        "application/json" | "" | "text/plain" => {
            if serde_json::from_slice::<serde::de::IgnoredAny>(body).is_err() {
                let msg = "body is not valid JSON (send application/octet-stream for bytes)";
                return Err(http::json_error(400, msg, ka));
            }
            Payload::Json(Bytes::copy_from_slice(body))
        }
        other => {
            let msg = format!("unsupported Content-Type {other:?}: use application/json or application/octet-stream");
            return Err(http::json_error(415, &msg, ka));
        }
    };
    let persist = if let Some(ttl) = req.query_param("persist[ttl]") {
        match ttl.parse() {
            Ok(t) => Persist::Ttl(t),
            Err(_) => return Err(http::json_error(400, "persist[ttl] must be a number of seconds", ka)),
        }
    } else if req.query_param("persist").and_then(|v| parse_bool(&v)).unwrap_or(false) {
        Persist::Default
    } else {
        Persist::No
    };
    Ok(Publish {
        topic,
        event: Arc::from(event),
        payload,
        binary_frame: false,
        exclude_sender: false,
        persist,
        id: None,
        user_id: claims.sub.clone(),
        received: None,
        ack: None,
    })
}
