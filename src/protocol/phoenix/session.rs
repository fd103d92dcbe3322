//! One socket's Phoenix session: joins, leaves, heartbeats, broadcasts, presence pushes and
//! token refreshes, turned into [`Action`]s for the shard to carry out.
//!
//! Sans-IO: [`Session::handle_text`] / [`Session::handle_binary`] take one decoded WebSocket
//! message plus [`Now`], and append actions; [`Session::poll_timeout`] and
//! [`Session::handle_timeout`] cover token expiry. Replies that need nothing from the rest of
//! the server (heartbeats, acks, errors, join replies) are fully encoded here; anything that
//! touches shared state (subscribing, publishing, presence) is an action.
//!
//! Behaviour follows Phoenix and Supabase Realtime (`reference/realtime-protocol.md` §1):
//! refs are echoed verbatim, messages with a stale `join_ref` are ignored, a duplicate join
//! replaces the live channel (with `phx_close` for the old join ref), `phx_leave` is answered
//! `ok` then `phx_close`, and pushes to topics that are not joined get `unmatched topic`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::auth::{Claims, Verifier};
use crate::protocol::phoenix::config::{self, PgBinding, Replay, Resume};
use crate::protocol::phoenix::message::{self, decode_binary, decode_text, DecodeError, InPayload, Vsn};
use crate::protocol::phoenix::topic::{Topic, PREFIX};
use crate::protocol::ws::CloseCode;

/// The time as the session sees it: a monotonic instant for rate limits and Unix seconds for
/// token expiry.
#[derive(Debug, Clone, Copy)]
pub struct Now {
    pub mono: Instant,
    pub unix_secs: u64,
}

/// Per-shard settings every session reads (built once from the validated config).
#[derive(Debug, Clone)]
pub struct SessionCtx {
    /// Channels one connection may have joined at once.
    pub max_channels: usize,
    /// Joins per second one connection may make (token bucket, burst = the same number).
    pub joins_per_sec: u32,
    /// Presence track/untrack calls per connection per [`SessionCtx::presence_window`].
    pub presence_calls: u32,
    pub presence_window: Duration,
    /// Largest presence state (JSON bytes) one tracked entry may carry.
    pub presence_max_bytes: usize,
    /// Largest broadcast payload; larger gets `payload_size_exceeded`.
    pub max_payload: usize,
    /// Token verification.
    pub verifier: Arc<Verifier>,
    /// Whether a database is configured (Postgres changes available).
    pub postgres: bool,
}

/// Something the shard must do for this session, in order.
#[derive(Debug)]
pub enum Action {
    /// Queue this frame on the connection.
    Send(Bytes),
    /// Subscribe the connection to a topic (the join was accepted and replied to).
    Subscribe(Box<Subscription>),
    /// Remove the connection's subscription to a topic (and its presence there).
    Unsubscribe(Topic),
    /// Publish a broadcast on behalf of this connection.
    Publish(Publish),
    /// Track (or update) this connection's presence on a topic under `key`. The topic's owner
    /// decides (limits) and the shard answers the push with `reply`.
    Track { topic: Topic, key: Arc<str>, meta: Bytes, reply: ReplyTo },
    /// Stop tracking this connection's presence on a topic.
    Untrack { topic: Topic },
    /// The channel's token was refreshed and verified: new claims for its authorization.
    Reauthorized { topic: Topic, claims: Arc<Claims> },
    /// Close the WebSocket with this code and reason.
    Close(CloseCode, String),
}

/// Where to send a deferred reply: the push's refs (raw JSON tokens) and serializer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplyTo {
    pub vsn: Vsn,
    pub join_ref: Option<Arc<str>>,
    pub msg_ref: Option<Arc<str>>,
}

impl ReplyTo {
    /// The reply frame: `ok` with `{}`, or an error with `reason`.
    pub fn frame(&self, topic: &Topic, error: Option<&str>) -> Bytes {
        let wire = topic.wire_name();
        match error {
            None => message::reply(self.vsn, self.join_ref.as_deref(), self.msg_ref.as_deref(), &wire, true, b"{}"),
            Some(e) => message::error_reply(self.vsn, self.join_ref.as_deref(), self.msg_ref.as_deref(), &wire, e),
        }
    }
}

/// A subscription the shard registers after a successful join.
#[derive(Debug, Clone)]
pub struct Subscription {
    pub topic: Topic,
    /// The join ref as a raw JSON token (for messages that must carry it).
    pub join_ref: Option<Arc<str>>,
    pub vsn: Vsn,
    /// Deliver this connection's own broadcasts back to it.
    pub broadcast_self: bool,
    /// Send `presence_state` now and presence diffs from now on.
    pub presence: bool,
    pub presence_key: Arc<str>,
    pub replay: Option<Replay>,
    pub resume: Option<Resume>,
    pub postgres_changes: Vec<PgBinding>,
    pub claims: Arc<Claims>,
    /// `claims` are the connect apikey's: the join carried no `access_token`.
    pub claims_from_apikey: bool,
    /// Frames to send once the subscription is in effect (the join reply first). Phoenix
    /// replies only after subscribing; the shard holds these until the topic's owner has
    /// registered the subscription, so a message published after the client saw its reply
    /// always reaches it.
    pub reply: Vec<Bytes>,
    /// A private join the database must authorize first (RLS on the messages table); on a
    /// refusal the shard calls [`Session::reject_join`] and sends [`Subscription::join_msg_ref`]
    /// an error reply instead of `reply`.
    pub authorize: bool,
    /// The `ref` of the `phx_join` (raw JSON token), for a deferred error reply.
    pub join_msg_ref: Option<Arc<str>>,
}

/// Payload of a broadcast.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Payload {
    /// JSON text (validated).
    Json(Bytes),
    /// Opaque bytes (only vsn 2.0.0 clients can receive these, as kind-4 frames).
    Binary(Bytes),
}

impl Payload {
    /// Size in bytes.
    pub fn len(&self) -> usize {
        match self {
            Self::Json(b) | Self::Binary(b) => b.len(),
        }
    }

    /// Whether the payload is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// How long a message should be kept durably (`persist`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Persist {
    /// Not stored durably (it still enters the recent window).
    No,
    /// Stored for the topic's default retention.
    Default,
    /// Stored for this many seconds.
    Ttl(u64),
}

/// A broadcast to publish.
#[derive(Debug, Clone)]
pub struct Publish {
    pub topic: Topic,
    pub event: Arc<str>,
    pub payload: Payload,
    /// The message arrived as a binary kind-3 frame, so vsn 2 subscribers get kind 4.
    pub binary_frame: bool,
    /// Skip the publishing connection itself (its channel has `self: false`).
    pub exclude_sender: bool,
    pub persist: Persist,
    /// A client-chosen message id (REST `id`), else the owner generates one.
    pub id: Option<Arc<str>>,
    /// The publisher's identity: the `sub` of its verified token (never the payload's word).
    pub user_id: Option<Arc<str>>,
    /// When its connection's shard received it (set by the shard, for the publish →
    /// sequenced histogram).
    pub received: Option<std::time::Instant>,
    /// The `ack` reply for the publisher, sent once the topic's owner has sequenced the
    /// message (so a publisher that waits for its ack never sees a later message of its own
    /// overtake it).
    pub ack: Option<Bytes>,
}

/// One joined channel.
#[derive(Debug)]
struct Channel {
    /// `realtime:<name>`, as the client wrote it.
    wire: Box<str>,
    topic: Topic,
    join_ref: Option<Arc<str>>,
    ack: bool,
    broadcast_self: bool,
    presence_key: Arc<str>,
    claims: Arc<Claims>,
}

/// Per-socket Phoenix session state.
#[derive(Debug)]
pub struct Session {
    vsn: Vsn,
    /// Claims of the connect-time apikey (used when a join has no `access_token`).
    claims: Arc<Claims>,
    /// Joined channels; few per socket (≤ `max_channels`), so a vector scan beats a map.
    channels: Vec<Channel>,
    /// Join rate limiter: tokens left and when they were last refilled.
    join_tokens: f32,
    join_refill: Option<Instant>,
    /// Presence calls in the current window and when the window started.
    presence_calls: u32,
    presence_window_start: Option<Instant>,
}

impl Session {
    /// A session for a socket that connected with `vsn` and whose apikey gave `claims`.
    pub fn new(vsn: Vsn, claims: Arc<Claims>) -> Self {
        Self {
            vsn,
            claims,
            channels: Vec::new(),
            join_tokens: f32::NAN,
            join_refill: None,
            presence_calls: 0,
            presence_window_start: None,
        }
    }

    /// The negotiated serializer.
    pub fn vsn(&self) -> Vsn {
        self.vsn
    }

    /// Topics currently joined (the shard unsubscribes them all when the socket closes).
    pub fn topics(&self) -> impl Iterator<Item = &Topic> {
        self.channels.iter().map(|c| &c.topic)
    }

    /// Number of joined channels.
    pub fn channel_count(&self) -> usize {
        self.channels.len()
    }

    /// The earliest token expiry among joined channels (Unix seconds).
    pub fn poll_timeout(&self) -> Option<u64> {
        self.channels.iter().filter_map(|c| c.claims.exp).min()
    }

    /// Closes every channel whose token has expired at `now`, with a `system` error first.
    pub fn handle_timeout(&mut self, now: Now, out: &mut Vec<Action>) {
        let vsn = self.vsn;
        self.channels.retain(|c| {
            let expired = c.claims.exp.is_some_and(|e| e <= now.unix_secs);
            if expired {
                close_channel(vsn, c, "Token has expired 0 seconds ago", out);
            }
            !expired
        });
    }

    /// Handles one text message.
    pub fn handle_text(&mut self, now: Now, data: &[u8], ctx: &SessionCtx, out: &mut Vec<Action>) {
        let msg = match decode_text(self.vsn, data) {
            Ok(m) => m,
            Err(e) => return out.push(Action::Close(CloseCode::InvalidPayload, e.to_string())),
        };
        let InPayload::Json(payload) = msg.payload else {
            return;
        };
        let (jr, mr) = (msg.join_ref, msg.msg_ref);
        let topic: &str = &msg.topic;
        let event: &str = &msg.event;
        if topic == "phoenix" {
            if event == "heartbeat" {
                out.push(Action::Send(message::reply(self.vsn, None, mr, "phoenix", true, b"{}")));
            } else {
                out.push(Action::Send(message::error_reply(self.vsn, None, mr, topic, "unmatched topic")));
            }
            return;
        }
        if event == "phx_join" {
            return self.join(now, jr, mr, topic, payload, ctx, out);
        }
        let Some(idx) = self.channels.iter().position(|c| &*c.wire == topic) else {
            let ok = event == "phx_leave";
            out.push(Action::Send(if ok {
                message::reply(self.vsn, jr, mr, topic, true, b"{}")
            } else {
                message::error_reply(self.vsn, None, mr, topic, "unmatched topic")
            }));
            return;
        };
        if jr.is_some() && jr != self.channels[idx].join_ref.as_deref() {
            return; // a message for an earlier join of this topic: Phoenix drops it silently
        }
        match event {
            "phx_leave" => {
                let c = self.channels.remove(idx);
                out.push(Action::Send(message::reply(self.vsn, jr, mr, topic, true, b"{}")));
                out.push(Action::Send(message::channel_control(self.vsn, c.join_ref.as_deref(), topic, "phx_close")));
                out.push(Action::Unsubscribe(c.topic));
            }
            "broadcast" => self.broadcast_text(idx, jr, mr, payload, ctx, out),
            "presence" => self.presence(now, idx, jr, mr, payload, ctx, out),
            "access_token" => self.access_token(now, idx, payload, ctx, out),
            other => {
                let reason = format!("unknown event {}", crate::protocol::json::quote(other));
                if mr.is_some() {
                    out.push(Action::Send(message::error_reply(self.vsn, jr, mr, topic, &reason)));
                }
            }
        }
    }

    /// Handles one binary message (vsn 2.0.0 kind-3 user broadcast push).
    pub fn handle_binary(&mut self, data: &[u8], ctx: &SessionCtx, out: &mut Vec<Action>) {
        if self.vsn == Vsn::V1 {
            return out.push(Action::Close(CloseCode::InvalidPayload, "binary frames need vsn=2.0.0".into()));
        }
        let p = match decode_binary(data) {
            Ok(p) => p,
            // A well-formed frame of a kind corecast does not take: an error reply, on the
            // channel when the frame says which (Phoenix kind-0 pushes do), and carry on.
            Err(e @ DecodeError::BinaryKind(_)) => {
                let reason = e.to_string();
                let reply = match message::binary_push_address(data) {
                    Some((jr, mr, topic)) => {
                        let (jr, mr) = (quote_ref(jr), quote_ref(mr));
                        message::error_reply(self.vsn, jr.as_deref(), mr.as_deref(), topic, &reason)
                    }
                    None => message::error_reply(self.vsn, None, None, "phoenix", &reason),
                };
                return out.push(Action::Send(reply));
            }
            Err(e) => return out.push(Action::Close(CloseCode::InvalidPayload, e.to_string())),
        };
        let mr = quote_ref(p.msg_ref);
        let mr = mr.as_deref();
        let Some(idx) = self.channels.iter().position(|c| &*c.wire == p.topic) else {
            return out.push(Action::Send(message::error_reply(self.vsn, None, mr, p.topic, "unmatched topic")));
        };
        let c = &self.channels[idx];
        if !p.join_ref.is_empty() && !ref_matches(c.join_ref.as_deref(), p.join_ref) {
            return;
        }
        let jr = c.join_ref.clone();
        if p.json && serde_json::from_slice::<serde::de::IgnoredAny>(p.payload).is_err() {
            return out.push(Action::Send(message::error_reply(
                self.vsn,
                jr.as_deref(),
                mr,
                p.topic,
                "payload is not valid JSON (encoding 1)",
            )));
        }
        if p.payload.len() > ctx.max_payload {
            return out.push(Action::Send(payload_too_large(self.vsn, jr.as_deref(), mr, p.topic)));
        }
        let persist = parse_persist(p.metadata);
        let payload = if p.json {
            Payload::Json(Bytes::copy_from_slice(p.payload))
        } else {
            Payload::Binary(Bytes::copy_from_slice(p.payload))
        };
        out.push(Action::Publish(Publish {
            topic: c.topic.clone(),
            event: Arc::from(p.event),
            payload,
            binary_frame: true,
            exclude_sender: !c.broadcast_self,
            persist,
            id: None,
            user_id: c.claims.sub.clone(),
            received: None,
            ack: (c.ack && mr.is_some()).then(|| message::reply(self.vsn, jr.as_deref(), mr, p.topic, true, b"{}")),
        }));
    }

    #[allow(clippy::too_many_arguments)]
    fn join(
        &mut self,
        now: Now,
        jr: Option<&str>,
        mr: Option<&str>,
        wire: &str,
        payload: &RawValue,
        ctx: &SessionCtx,
        out: &mut Vec<Action>,
    ) {
        let vsn = self.vsn;
        let err = |out: &mut Vec<Action>, reason: &str| {
            out.push(Action::Send(message::error_reply(vsn, jr, mr, wire, reason)))
        };
        let Some(name) = wire.strip_prefix(PREFIX) else {
            return err(out, "unmatched topic");
        };
        if !self.take_join_token(now, ctx) {
            return err(out, "ClientJoinRateLimitReached: Too many joins per second");
        }
        let cfg = config::parse(payload);
        let topic = match Topic::new(name, cfg.private) {
            Ok(t) => t,
            Err(e) => return err(out, &e.to_string()),
        };
        let existing = self.channels.iter().position(|c| &*c.wire == wire);
        if existing.is_none() && self.channels.len() >= ctx.max_channels {
            return err(out, "ChannelRateLimitReached: Too many channels");
        }
        let claims = match &cfg.access_token {
            Some(t) => match ctx.verifier.verify(Some(t), now.unix_secs) {
                Ok(c) => c,
                Err(e) => return err(out, &format!("{}: {e}", e.code())),
            },
            None => self.claims.clone(),
        };
        // Private channels: development mode allows every join; with a database, RLS policies
        // decide (asynchronously, see `Subscription::authorize`); otherwise the token's claims.
        let authorize = cfg.private && !ctx.verifier.development_mode() && ctx.postgres;
        if cfg.private && !ctx.verifier.development_mode() && !ctx.postgres && !claims.allows_private(name) {
            return err(out, &unauthorized(name));
        }
        if let Some(i) = existing {
            let old = self.channels.remove(i);
            out.push(Action::Send(message::channel_control(vsn, old.join_ref.as_deref(), wire, "phx_close")));
            out.push(Action::Unsubscribe(old.topic));
        }
        let presence_key: Arc<str> = match &cfg.presence_key {
            Some(k) => Arc::from(k.as_str()),
            None => Self::generated_key(),
        };
        let mut response = String::from("{\"postgres_changes\":[");
        for (i, b) in cfg.postgres_changes.iter().enumerate() {
            if i > 0 {
                response.push(',');
            }
            response.push_str(&b.echo());
        }
        response.push_str("]}");
        let join_ref: Option<Arc<str>> = jr.map(Arc::from);
        // Grow by exactly one: most sockets join one or two channels, and every idle socket
        // would otherwise carry spare capacity.
        self.channels.reserve_exact(1);
        self.channels.push(Channel {
            wire: wire.into(),
            topic: topic.clone(),
            join_ref: join_ref.clone(),
            ack: cfg.ack,
            broadcast_self: cfg.broadcast_self,
            presence_key: presence_key.clone(),
            claims: claims.clone(),
        });
        let mut reply = vec![message::reply(vsn, jr, mr, wire, true, response.as_bytes())];
        if !cfg.postgres_changes.is_empty() && !ctx.postgres {
            reply.push(message::system(
                vsn,
                jr,
                wire,
                "postgres_changes",
                false,
                "Postgres changes are not available: corecast runs without a database (set DATABASE_URL)",
            ));
        }
        out.push(Action::Subscribe(Box::new(Subscription {
            topic,
            join_ref,
            vsn,
            broadcast_self: cfg.broadcast_self,
            presence: cfg.presence_enabled,
            presence_key,
            replay: cfg.replay,
            resume: cfg.resume,
            postgres_changes: cfg.postgres_changes,
            claims,
            claims_from_apikey: cfg.access_token.is_none(),
            reply,
            authorize,
            join_msg_ref: mr.map(Arc::from),
        })));
    }

    fn broadcast_text(
        &mut self,
        idx: usize,
        jr: Option<&str>,
        mr: Option<&str>,
        payload: &RawValue,
        ctx: &SessionCtx,
        out: &mut Vec<Action>,
    ) {
        #[derive(Deserialize)]
        struct Push<'a> {
            #[serde(borrow)]
            event: Option<std::borrow::Cow<'a, str>>,
            #[serde(borrow)]
            payload: Option<&'a RawValue>,
        }
        let c = &self.channels[idx];
        let push: Push<'_> = match serde_json::from_str(payload.get()) {
            Ok(p) => p,
            Err(_) => {
                return out.push(Action::Send(message::error_reply(
                    self.vsn,
                    jr,
                    mr,
                    &c.wire,
                    "broadcast payload must be an object",
                )))
            }
        };
        let Some(event) = push.event else {
            return out.push(Action::Send(message::error_reply(
                self.vsn,
                jr,
                mr,
                &c.wire,
                "broadcast payload needs an `event` string",
            )));
        };
        let body = push.payload.map_or("null", RawValue::get);
        if body.len() > ctx.max_payload {
            return out.push(Action::Send(payload_too_large(self.vsn, jr, mr, &c.wire)));
        }
        out.push(Action::Publish(Publish {
            topic: c.topic.clone(),
            event: Arc::from(&*event),
            payload: Payload::Json(Bytes::copy_from_slice(body.as_bytes())),
            binary_frame: false,
            exclude_sender: !c.broadcast_self,
            persist: Persist::No,
            id: None,
            user_id: c.claims.sub.clone(),
            received: None,
            ack: (c.ack && mr.is_some()).then(|| message::reply(self.vsn, jr, mr, &c.wire, true, b"{}")),
        }));
    }

    #[allow(clippy::too_many_arguments)]
    fn presence(
        &mut self,
        now: Now,
        idx: usize,
        jr: Option<&str>,
        mr: Option<&str>,
        payload: &RawValue,
        ctx: &SessionCtx,
        out: &mut Vec<Action>,
    ) {
        #[derive(Deserialize)]
        struct Push<'a> {
            #[serde(borrow)]
            event: Option<std::borrow::Cow<'a, str>>,
            #[serde(borrow)]
            payload: Option<&'a RawValue>,
        }
        let vsn = self.vsn;
        let wire = self.channels[idx].wire.clone();
        let err = |out: &mut Vec<Action>, reason: &str| {
            out.push(Action::Send(message::error_reply(vsn, jr, mr, &wire, reason)))
        };
        let Ok(push) = serde_json::from_str::<Push<'_>>(payload.get()) else {
            return err(out, "presence payload must be an object");
        };
        let event = push.event.as_deref().unwrap_or("").to_ascii_lowercase();
        if event != "track" && event != "untrack" {
            return err(out, "presence event must be track or untrack");
        }
        if !self.take_presence_call(now, ctx) {
            // Supabase closes the channel here; a reply keeps the connection and channel usable.
            return err(out, "PresenceRateLimitReached: Client presence rate limit exceeded");
        }
        let c = &self.channels[idx];
        if event == "untrack" {
            out.push(Action::Untrack { topic: c.topic.clone() });
        } else {
            let meta = push.payload.map_or("", RawValue::get);
            if !meta.trim_start().starts_with('{') {
                return err(out, "Presence track payload must be a map");
            }
            if meta.len() > ctx.presence_max_bytes {
                return err(
                    out,
                    &format!("Track message size exceeded: {} bytes, limit {}", meta.len(), ctx.presence_max_bytes),
                );
            }
            let reply = ReplyTo { vsn, join_ref: jr.map(Arc::from), msg_ref: mr.map(Arc::from) };
            return out.push(Action::Track {
                topic: c.topic.clone(),
                key: c.presence_key.clone(),
                meta: Bytes::copy_from_slice(meta.as_bytes()),
                reply,
            });
        }
        out.push(Action::Send(message::reply(vsn, jr, mr, &wire, true, b"{}")));
    }

    fn access_token(&mut self, now: Now, idx: usize, payload: &RawValue, ctx: &SessionCtx, out: &mut Vec<Action>) {
        #[derive(Deserialize)]
        struct Push {
            access_token: Option<String>,
        }
        let token = serde_json::from_str::<Push>(payload.get()).ok().and_then(|p| p.access_token);
        let Some(token) = token.filter(|t| !t.starts_with("sb_") && !t.is_empty()) else {
            return;
        };
        if *self.channels[idx].claims.token == *token {
            return;
        }
        match ctx.verifier.verify(Some(&token), now.unix_secs) {
            Ok(claims) => {
                let c = &mut self.channels[idx];
                if c.topic.is_private()
                    && !ctx.verifier.development_mode()
                    && !ctx.postgres
                    && !claims.allows_private(c.topic.name())
                {
                    let msg =
                        format!("You no longer have permission to read from this Channel topic: {}", c.topic.name());
                    let c = self.channels.remove(idx);
                    return close_channel(self.vsn, &c, &msg, out);
                }
                c.claims = claims.clone();
                out.push(Action::Reauthorized { topic: c.topic.clone(), claims });
            }
            Err(e) => {
                let c = self.channels.remove(idx);
                close_channel(self.vsn, &c, &e.to_string(), out);
            }
        }
    }

    /// The database refused a held private join: forget the channel (if `join_ref` still names
    /// it) and return the error reply for the client.
    pub fn reject_join(&mut self, topic: &Topic, join_ref: Option<&str>, msg_ref: Option<&str>) -> Option<Bytes> {
        let idx = self.channels.iter().position(|c| &c.topic == topic && c.join_ref.as_deref() == join_ref)?;
        let c = self.channels.remove(idx);
        Some(message::error_reply(self.vsn, join_ref, msg_ref, &c.wire, &unauthorized(topic.name())))
    }

    /// Ends the channel on `topic` with a `system` error carrying `message`, then `phx_close`.
    pub fn close_topic(&mut self, topic: &Topic, message: &str, out: &mut Vec<Action>) {
        if let Some(idx) = self.channels.iter().position(|c| &c.topic == topic) {
            let c = self.channels.remove(idx);
            close_channel(self.vsn, &c, message, out);
        }
    }

    fn take_join_token(&mut self, now: Now, ctx: &SessionCtx) -> bool {
        let cap = ctx.joins_per_sec.max(1) as f32;
        let last = self.join_refill.unwrap_or(now.mono);
        if self.join_tokens.is_nan() {
            self.join_tokens = cap;
        }
        let dt = now.mono.saturating_duration_since(last).as_secs_f32();
        self.join_tokens = (self.join_tokens + dt * cap).min(cap);
        self.join_refill = Some(now.mono);
        if self.join_tokens >= 1.0 {
            self.join_tokens -= 1.0;
            true
        } else {
            false
        }
    }

    fn take_presence_call(&mut self, now: Now, ctx: &SessionCtx) -> bool {
        match self.presence_window_start {
            Some(s) if now.mono.saturating_duration_since(s) < ctx.presence_window => {}
            _ => {
                self.presence_window_start = Some(now.mono);
                self.presence_calls = 0;
            }
        }
        if self.presence_calls >= ctx.presence_calls {
            return false;
        }
        self.presence_calls += 1;
        true
    }

    /// A UUID-shaped random key, as Supabase generates (UUID v1 there).
    fn generated_key() -> Arc<str> {
        Arc::from(format_uuid(crate::entropy::fast_u128()).as_str())
    }
}

/// Supabase's reply to a broadcast over the payload limit; the connection carries on.
fn payload_too_large(vsn: Vsn, jr: Option<&str>, mr: Option<&str>, topic: &str) -> Bytes {
    message::reply(vsn, jr, mr, topic, false, br#"{"error":"payload_size_exceeded"}"#)
}

/// The join error for a private topic the token may not read.
fn unauthorized(name: &str) -> String {
    format!("Unauthorized: You do not have permissions to read from this Channel topic: {name}")
}

/// Pushes `system` error + `phx_close` for a channel and unsubscribes it.
fn close_channel(vsn: Vsn, c: &Channel, message: &str, out: &mut Vec<Action>) {
    out.push(Action::Send(message::system(vsn, c.join_ref.as_deref(), &c.wire, "system", false, message)));
    out.push(Action::Send(message::channel_control(vsn, c.join_ref.as_deref(), &c.wire, "phx_close")));
    out.push(Action::Unsubscribe(c.topic.clone()));
}

/// A bare binary-header ref as a JSON token (`None` when empty).
fn quote_ref(r: &str) -> Option<String> {
    (!r.is_empty()).then(|| crate::protocol::json::quote(r))
}

/// Compares a raw JSON ref token (`"6"` or `6`) with a bare ref string (`6`).
fn ref_matches(token: Option<&str>, bare: &str) -> bool {
    match token {
        Some(t) => t.strip_prefix('"').and_then(|t| t.strip_suffix('"')).unwrap_or(t) == bare,
        None => false,
    }
}

/// `persist` in kind-3 metadata: `true` or `{"ttl": seconds}`.
pub fn parse_persist(metadata: &str) -> Persist {
    if metadata.is_empty() {
        return Persist::No;
    }
    let Ok(serde_json::Value::Object(m)) = serde_json::from_str(metadata) else {
        return Persist::No;
    };
    match m.get("persist") {
        Some(serde_json::Value::Bool(true)) => Persist::Default,
        Some(serde_json::Value::Object(o)) => {
            o.get("ttl").and_then(|t| t.as_u64()).map_or(Persist::Default, Persist::Ttl)
        }
        _ => Persist::No,
    }
}

/// Formats 128 random bits as a version-4 UUID string.
pub fn format_uuid(r: u128) -> String {
    uuid_text(&uuid_bytes(r)).to_string()
}

/// [`format_uuid`] straight into an `Arc<str>` (one allocation: message ids are made per
/// message on the publish path).
pub fn uuid_arc(r: u128) -> std::sync::Arc<str> {
    std::sync::Arc::from(uuid_text(&uuid_bytes(r)))
}

fn uuid_bytes(r: u128) -> [u8; 36] {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let r = (r & !(0xf000u128 << 64) | (0x4000u128 << 64)) & !(0xc000u128 << 48) | (0x8000u128 << 48);
    let mut out = [b'-'; 36];
    let mut j = 0;
    for i in 0..32 {
        if matches!(j, 8 | 13 | 18 | 23) {
            j += 1;
        }
        out[j] = HEX[((r >> (124 - 4 * i)) & 0xf) as usize];
        j += 1;
    }
    out
}

fn uuid_text(b: &[u8; 36]) -> &str {
    std::str::from_utf8(b).unwrap_or_default() // ASCII hex and dashes: always UTF-8
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::ws::frame::parse_header;

    #[test]
    fn uuids_are_v4_and_formatted_like_the_reference() {
        let r = 0x0123_4567_89ab_cdef_fedc_ba98_7654_3210u128;
        let m = (r & !(0xf000u128 << 64) | (0x4000u128 << 64)) & !(0xc000u128 << 48) | (0x8000u128 << 48);
        let h = format!("{m:032x}");
        let want = format!("{}-{}-{}-{}-{}", &h[0..8], &h[8..12], &h[12..16], &h[16..20], &h[20..32]);
        assert_eq!(format_uuid(r), want);
        assert_eq!(&*uuid_arc(r), want);
        assert_eq!(&want[14..15], "4");
        assert!(matches!(&want[19..20], "8" | "9" | "a" | "b"));
    }

    fn ctx() -> SessionCtx {
        SessionCtx {
            max_channels: 3,
            joins_per_sec: 100,
            presence_calls: 5,
            presence_window: Duration::from_secs(30),
            presence_max_bytes: 4096,
            max_payload: 1000,
            verifier: Arc::new(Verifier::new(None)),
            postgres: false,
        }
    }

    fn now() -> Now {
        Now { mono: Instant::now(), unix_secs: 1_700_000_000 }
    }

    /// Runs one text message and returns (frames as strings, other actions).
    fn run(s: &mut Session, msg: &str) -> (Vec<String>, Vec<Action>) {
        let mut out = Vec::new();
        s.handle_text(now(), msg.as_bytes(), &ctx(), &mut out);
        let mut frames = Vec::new();
        let mut rest = Vec::new();
        let text = |b: &Bytes| {
            let (_, n) = parse_header(b).unwrap().unwrap();
            String::from_utf8(b[n..].to_vec()).unwrap()
        };
        for a in out {
            match a {
                Action::Send(b) => frames.push(text(&b)),
                Action::Subscribe(s) => {
                    frames.extend(s.reply.iter().map(text));
                    rest.push(Action::Subscribe(s));
                }
                a => rest.push(a),
            }
        }
        (frames, rest)
    }

    fn v2() -> Session {
        Session::new(Vsn::V2, Claims::anonymous())
    }

    const JOIN: &str = r#"["6","6","realtime:room1","phx_join",{"config":{"broadcast":{"self":true,"ack":true},"presence":{"key":"u1","enabled":true},"postgres_changes":[],"private":false}}]"#;

    #[test]
    fn heartbeat_is_answered() {
        let (f, _) = run(&mut v2(), r#"[null,"7","phoenix","heartbeat",{}]"#);
        assert_eq!(f, vec![r#"[null,"7","phoenix","phx_reply",{"status":"ok","response":{}}]"#]);
    }

    #[test]
    fn join_then_leave_matches_capture() {
        let mut s = v2();
        let (f, a) = run(&mut s, JOIN);
        assert_eq!(
            f,
            vec![r#"["6","6","realtime:room1","phx_reply",{"status":"ok","response":{"postgres_changes":[]}}]"#]
        );
        assert!(
            matches!(&a[..], [Action::Subscribe(sub)] if sub.presence && sub.broadcast_self && &*sub.presence_key == "u1")
        );
        let (f, a) = run(&mut s, r#"["6","10","realtime:room1","phx_leave",{}]"#);
        assert_eq!(
            f,
            vec![
                r#"["6","10","realtime:room1","phx_reply",{"status":"ok","response":{}}]"#.to_string(),
                r#"["6","6","realtime:room1","phx_close",{}]"#.to_string(),
            ]
        );
        assert!(matches!(&a[..], [Action::Unsubscribe(_)]));
        assert_eq!(s.channel_count(), 0);
    }

    #[test]
    fn pg_bindings_echoed_in_order_with_ids() {
        let mut s = v2();
        let (f, _) = run(
            &mut s,
            r#"["1","1","realtime:db","phx_join",{"config":{"postgres_changes":[{"event":"INSERT","schema":"public","table":"todos","filter":"id=eq.1"},{"event":"*","schema":"public"}]}}]"#,
        );
        let v: serde_json::Value = serde_json::from_str(&f[0]).unwrap();
        let pc = &v[4]["response"]["postgres_changes"];
        assert_eq!(pc[0]["event"], "INSERT");
        assert_eq!(pc[0]["filter"], "id=eq.1");
        assert!(pc[0]["id"].is_u64() && pc[1]["id"].is_u64());
        assert_eq!(pc[1]["event"], "*");
        assert!(pc[1].get("table").is_none());
        // without a database, a system message says so and the channel stays joined
        assert!(f[1].contains("\"system\"") && f[1].contains("without a database"));
    }

    #[test]
    fn duplicate_join_closes_old_join_ref() {
        let mut s = v2();
        run(&mut s, JOIN);
        let (f, a) = run(&mut s, &JOIN.replace(r#""6","6""#, r#""9","9""#));
        assert_eq!(f[0], r#"["6","6","realtime:room1","phx_close",{}]"#);
        assert!(f[1].starts_with(r#"["9","9","realtime:room1","phx_reply""#));
        assert!(matches!(&a[..], [Action::Unsubscribe(_), Action::Subscribe(_)]));
        // a push with the old join_ref is now stale and ignored
        let (f, a) =
            run(&mut s, r#"["6","11","realtime:room1","broadcast",{"type":"broadcast","event":"e","payload":{}}]"#);
        assert!(f.is_empty() && a.is_empty());
    }

    #[test]
    fn unmatched_topics() {
        let mut s = v2();
        let (f, _) = run(&mut s, r#"["1","2","realtime:nope","broadcast",{"event":"e","payload":{}}]"#);
        assert_eq!(
            f,
            vec![
                r#"[null,"2","realtime:nope","phx_reply",{"status":"error","response":{"reason":"unmatched topic"}}]"#
            ]
        );
        let (f, _) = run(&mut s, r#"["1","1","rooms:lobby","phx_join",{}]"#);
        assert!(f[0].contains("unmatched topic"));
        let (f, _) = run(&mut s, r#"["1","3","realtime:nope","phx_leave",{}]"#);
        assert!(f[0].contains(r#""status":"ok""#));
        let (f, _) = run(&mut s, r#"["1","1","realtime:","phx_join",{}]"#);
        assert!(f[0].contains("TopicNameRequired"));
    }

    #[test]
    fn broadcast_with_ack_and_self() {
        let mut s = v2();
        run(&mut s, JOIN);
        let (f, a) = run(
            &mut s,
            r#"["6","7","realtime:room1","broadcast",{"type":"broadcast","event":"cursor","payload":{"x":1}}]"#,
        );
        assert!(f.is_empty(), "the ack waits for the owner");
        let Action::Publish(p) = &a[0] else { panic!() };
        let ack = p.ack.as_ref().unwrap();
        let (_, n) = parse_header(ack).unwrap().unwrap();
        assert_eq!(&ack[n..], br#"["6","7","realtime:room1","phx_reply",{"status":"ok","response":{}}]"#);
        assert_eq!((&*p.event, p.exclude_sender), ("cursor", false));
        assert_eq!(p.payload, Payload::Json(Bytes::from_static(b"{\"x\":1}")));
        let (f, a) = run(&mut s, r#"["6","8","realtime:room1","broadcast",{"type":"broadcast","payload":{}}]"#);
        assert!(f[0].contains("needs an `event`") && a.is_empty());
    }

    #[test]
    fn kind3_binary_push() {
        let mut s = v2();
        run(&mut s, JOIN);
        let hex = "0301010e06000136377265616c74696d653a726f6f6d31637572736f727b2278223a327d";
        let bytes: Vec<u8> =
            (0..hex.len()).step_by(2).map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap()).collect();
        let mut out = Vec::new();
        s.handle_binary(&bytes, &ctx(), &mut out);
        let Action::Publish(p) = &out[0] else { panic!("{out:?}") };
        assert!(p.binary_frame);
        assert!(p.ack.is_some(), "ack reply travels with the publish");
    }

    #[test]
    fn limits_channels_and_joins() {
        let mut s = v2();
        for i in 0..3 {
            let (f, _) = run(&mut s, &format!(r#"["{i}","{i}","realtime:r{i}","phx_join",{{}}]"#));
            assert!(f[0].contains(r#""status":"ok""#));
        }
        let (f, _) = run(&mut s, r#"["9","9","realtime:r9","phx_join",{}]"#);
        assert!(f[0].contains("ChannelRateLimitReached"));
        let mut c = ctx();
        c.joins_per_sec = 2;
        let mut s = v2();
        let n = now();
        let mut errors = 0;
        for i in 0..5 {
            let mut out = Vec::new();
            s.handle_text(n, format!(r#"["{i}","{i}","realtime:a","phx_join",{{}}]"#).as_bytes(), &c, &mut out);
            errors += out
                .iter()
                .filter(|a| matches!(a, Action::Send(b) if String::from_utf8_lossy(b).contains("ClientJoinRateLimitReached")))
                .count();
        }
        assert_eq!(errors, 3);
    }

    #[test]
    fn malformed_json_closes_1007() {
        let (_, a) = run(&mut v2(), "{not json");
        assert!(matches!(&a[..], [Action::Close(CloseCode::InvalidPayload, _)]));
    }

    #[test]
    fn unknown_event_gets_error() {
        let mut s = v2();
        run(&mut s, JOIN);
        let (f, _) = run(&mut s, r#"["6","12","realtime:room1","shout",{}]"#);
        assert!(f[0].contains(r#"unknown event \"shout\""#), "{f:?}");
    }

    #[test]
    fn presence_validation() {
        let mut s = v2();
        run(&mut s, JOIN);
        let (f, a) = run(
            &mut s,
            r#"["6","8","realtime:room1","presence",{"type":"presence","event":"track","payload":{"online":true}}]"#,
        );
        assert!(f.is_empty(), "the owner answers a track");
        assert!(matches!(&a[..], [Action::Track { meta, .. }] if &meta[..] == b"{\"online\":true}"));
        let (f, a) =
            run(&mut s, r#"["6","9","realtime:room1","presence",{"type":"presence","event":"track","payload":[1]}]"#);
        assert!(f[0].contains("must be a map") && a.is_empty());
    }

    #[test]
    fn expired_tokens_close_channels() {
        let secret = "k";
        let tok = |exp: u64| {
            jsonwebtoken::encode(
                &jsonwebtoken::Header::default(),
                &serde_json::json!({"role":"authenticated","exp":exp}),
                &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
            )
            .unwrap()
        };
        let mut c = ctx();
        c.verifier = Arc::new(Verifier::new(Some(secret)));
        let n = now();
        let mut s = Session::new(Vsn::V2, c.verifier.verify(Some(&tok(n.unix_secs + 10)), n.unix_secs).unwrap());
        let mut out = Vec::new();
        s.handle_text(n, JOIN.as_bytes(), &c, &mut out);
        assert_eq!(s.poll_timeout(), Some(n.unix_secs + 10));
        out.clear();
        s.handle_timeout(Now { unix_secs: n.unix_secs + 10, ..n }, &mut out);
        assert_eq!(out.len(), 3);
        assert_eq!(s.channel_count(), 0);
        // an invalid refreshed token also closes the channel
        let mut out = Vec::new();
        s.handle_text(n, JOIN.as_bytes(), &c, &mut out);
        out.clear();
        s.handle_text(n, br#"["6","20","realtime:room1","access_token",{"access_token":"bad.token.x"}]"#, &c, &mut out);
        assert_eq!(out.len(), 3, "{out:?}");
    }

    #[test]
    fn uuid_shape() {
        let u = format_uuid(u128::MAX);
        assert_eq!(u.len(), 36);
        assert_eq!(&u[14..15], "4");
        assert!(matches!(&u[19..20], "8" | "9" | "a" | "b"));
    }
}
