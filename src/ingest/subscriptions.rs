//! The registry of `postgres_changes` subscriptions and the matching of a change against it.
//!
//! One [`Channel`] per joined channel with bindings (keyed by shard, connection and topic),
//! each binding indexed by its table: exact `(schema, table)`, `(schema, *)` or `(*, *)`. A
//! change is matched by looking at the bindings of its table only; a channel whose several
//! bindings match gets one hit with all their ids (the `ids` realtime-js dispatches on).
//!
//! Auth contexts (role + claims) are interned: subscribers with the same token share one
//! [`AuthId`], which is what row-level security checks are batched by.

use std::collections::HashMap;
use std::sync::Arc;

use slab::Slab;

use super::filter::{Cell, Filter};
use crate::auth::Claims;
use crate::channel::registry::ConnId;
use crate::channel::Format;
use crate::protocol::phoenix::Topic;

/// Event bits of a binding.
pub const EV_INSERT: u8 = 1;
pub const EV_UPDATE: u8 = 2;
pub const EV_DELETE: u8 = 4;
pub const EV_ALL: u8 = 7;

/// The events a binding's `event` selects: `INSERT`, `UPDATE`, `DELETE` or `*`
/// (case-insensitive; anything else is `*`, as Supabase treats it).
pub fn event_mask(event: &str) -> u8 {
    match event.to_ascii_uppercase().as_str() {
        "INSERT" => EV_INSERT,
        "UPDATE" => EV_UPDATE,
        "DELETE" => EV_DELETE,
        _ => EV_ALL,
    }
}

/// Identifies a channel: the shard and connection that joined it, and its topic.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Key {
    pub shard: usize,
    pub conn: ConnId,
    pub topic: Topic,
}

/// The schema of corecast's own tables (`corecast.history`), never streamed to subscribers.
pub const INTERNAL_SCHEMA: &str = "corecast";

/// A schema or table name, or `*`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pat {
    Any,
    Is(String),
}

impl Pat {
    /// `*` is [`Pat::Any`].
    pub fn new(s: &str) -> Self {
        if s == "*" {
            Self::Any
        } else {
            Self::Is(s.to_string())
        }
    }
}

/// One validated binding.
#[derive(Debug, Clone)]
pub struct Binding {
    pub id: u32,
    pub events: u8,
    pub schema: Pat,
    pub table: Pat,
    pub filter: Filter,
}

/// Interned auth context id.
pub type AuthId = u32;

/// The role and claims a subscriber's RLS checks run with.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct AuthCtx {
    /// The database role (`role` claim, `anon` when absent).
    pub role: String,
    /// The claims as JSON (`request.jwt.claims`).
    pub claims: String,
}

impl AuthCtx {
    /// The context of a token's claims.
    pub fn of(c: &Claims) -> Self {
        let role = if c.role.is_empty() { "anon".to_string() } else { c.role.clone() };
        Self { role, claims: serde_json::Value::Object(c.all.clone()).to_string() }
    }
}

/// A channel with `postgres_changes` bindings.
#[derive(Debug, Clone)]
pub struct Channel {
    pub key: Key,
    /// `realtime:<name>`.
    pub wire: Arc<str>,
    pub join_ref: Option<Arc<str>>,
    pub format: Format,
    pub auth: AuthId,
    pub bindings: Vec<Binding>,
    /// "Subscribed to PostgreSQL" was sent.
    pub announced: bool,
    /// Told that the replication connection is down (and not yet that it is back).
    pub told_down: bool,
    /// Its claims are the connect apikey's: the join carried no `access_token` and none was
    /// pushed since (see `engine`'s warning about rows all filtered by RLS).
    pub apikey: bool,
    /// Matching scratch: (match round, index of this channel's hit in the output).
    mark: (u64, usize),
}

/// A matched channel: its registry index and the ids of its matching bindings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hit {
    pub chan: u32,
    pub ids: Vec<u32>,
}

#[derive(Debug, Default)]
struct Auths {
    by_key: HashMap<Arc<AuthCtx>, AuthId>,
    slots: Slab<(Arc<AuthCtx>, usize)>,
}

/// All subscriptions of the ingest.
type Map<K, V> = HashMap<K, V, ahash::RandomState>;

#[derive(Debug, Default)]
pub struct Registry {
    chans: Slab<Channel>,
    by_key: Map<Key, u32>,
    /// schema → table → bindings.
    exact: Map<String, Map<String, Vec<(u32, u16)>>>,
    schema_any: Map<String, Vec<(u32, u16)>>,
    any: Vec<(u32, u16)>,
    auths: Auths,
    /// Match rounds so far (see `Channel::mark`).
    round: u64,
}

impl Registry {
    pub fn new() -> Self {
        Self::default()
    }

    /// Interns an auth context (one reference; release it with the channel).
    pub fn intern(&mut self, ctx: AuthCtx) -> AuthId {
        if let Some(&id) = self.auths.by_key.get(&ctx) {
            self.auths.slots[id as usize].1 += 1;
            return id;
        }
        let ctx = Arc::new(ctx);
        let id = self.auths.slots.insert((ctx.clone(), 1)) as AuthId;
        self.auths.by_key.insert(ctx, id);
        id
    }

    fn release(&mut self, id: AuthId) {
        let Some(slot) = self.auths.slots.get_mut(id as usize) else { return };
        slot.1 -= 1;
        if slot.1 == 0 {
            let (ctx, _) = self.auths.slots.remove(id as usize);
            self.auths.by_key.remove(&ctx);
        }
    }

    /// The context of `id`.
    pub fn auth(&self, id: AuthId) -> &Arc<AuthCtx> {
        &self.auths.slots[id as usize].0
    }

    /// Number of distinct auth contexts.
    pub fn auth_count(&self) -> usize {
        self.auths.slots.len()
    }

    /// Adds a channel (replacing one with the same key). `ctx` is interned here.
    pub fn insert(
        &mut self,
        key: Key,
        wire: Arc<str>,
        join_ref: Option<Arc<str>>,
        format: Format,
        ctx: AuthCtx,
        bindings: Vec<Binding>,
    ) -> u32 {
        self.remove(&key);
        let auth = self.intern(ctx);
        let idx = self.chans.insert(Channel {
            key: key.clone(),
            wire,
            join_ref,
            format,
            auth,
            bindings,
            announced: false,
            told_down: false,
            apikey: false,
            mark: (0, 0),
        }) as u32;
        self.by_key.insert(key, idx);
        let ch = &self.chans[idx as usize];
        for (b, binding) in ch.bindings.iter().enumerate() {
            let entry = (idx, b as u16);
            match (&binding.schema, &binding.table) {
                (Pat::Is(s), Pat::Is(t)) => {
                    self.exact.entry(s.clone()).or_default().entry(t.clone()).or_default().push(entry)
                }
                (Pat::Is(s), Pat::Any) => self.schema_any.entry(s.clone()).or_default().push(entry),
                (Pat::Any, _) => self.any.push(entry),
            }
        }
        idx
    }

    /// Removes a channel; returns it.
    pub fn remove(&mut self, key: &Key) -> Option<Channel> {
        let idx = self.by_key.remove(key)?;
        let ch = self.chans.remove(idx as usize);
        for binding in &ch.bindings {
            let list = match (&binding.schema, &binding.table) {
                (Pat::Is(s), Pat::Is(t)) => self.exact.get_mut(s).and_then(|m| m.get_mut(t)),
                (Pat::Is(s), Pat::Any) => self.schema_any.get_mut(s),
                (Pat::Any, _) => Some(&mut self.any),
            };
            if let Some(list) = list {
                list.retain(|&(c, _)| c != idx);
            }
        }
        for tables in self.exact.values_mut() {
            tables.retain(|_, v| !v.is_empty());
        }
        self.exact.retain(|_, v| !v.is_empty());
        self.schema_any.retain(|_, v| !v.is_empty());
        self.release(ch.auth);
        Some(ch)
    }

    /// Replaces a channel's auth context (after `access_token`); its claims are no longer
    /// the apikey's.
    pub fn reauth(&mut self, key: &Key, ctx: AuthCtx) {
        let Some(&idx) = self.by_key.get(key) else { return };
        let new = self.intern(ctx);
        self.chans[idx as usize].apikey = false;
        let old = std::mem::replace(&mut self.chans[idx as usize].auth, new);
        self.release(old);
    }

    /// The channel at `idx`.
    pub fn channel(&self, idx: u32) -> &Channel {
        &self.chans[idx as usize]
    }

    /// The channel at `idx`, mutably.
    pub fn channel_mut(&mut self, idx: u32) -> &mut Channel {
        &mut self.chans[idx as usize]
    }

    /// The index of the channel with `key`.
    pub fn find(&self, key: &Key) -> Option<u32> {
        self.by_key.get(key).copied()
    }

    /// Every channel, with its index.
    pub fn channels(&self) -> impl Iterator<Item = (u32, &Channel)> {
        self.chans.iter().map(|(i, c)| (i as u32, c))
    }

    /// Every channel, mutably.
    pub fn channels_mut(&mut self) -> impl Iterator<Item = &mut Channel> {
        self.chans.iter_mut().map(|(_, c)| c)
    }

    /// Number of channels.
    pub fn len(&self) -> usize {
        self.chans.len()
    }

    /// Whether there are no channels.
    pub fn is_empty(&self) -> bool {
        self.chans.is_empty()
    }

    /// Whether any binding could match a change to `schema.table`. corecast's own tables
    /// (schema [`INTERNAL_SCHEMA`]: the history store) are never streamed.
    pub fn watches(&self, schema: &str, table: &str) -> bool {
        schema != INTERNAL_SCHEMA
            && (!self.any.is_empty()
                || self.schema_any.contains_key(schema)
                || self.exact.get(schema).is_some_and(|t| t.contains_key(table)))
    }

    /// Appends to `out` one hit per channel with a binding matching an `event` (one of the
    /// `EV_*` bits) on `schema.table` whose filter passes for the row `cell` describes.
    pub fn matches<'a>(
        &mut self,
        schema: &str,
        table: &str,
        event: u8,
        cell: impl Fn(&str) -> Cell<'a>,
        out: &mut Vec<Hit>,
    ) {
        let first = out.len();
        self.round += 1;
        let round = self.round;
        let exact = self.exact.get(schema).and_then(|t| t.get(table));
        let schema_any = self.schema_any.get(schema);
        let lists = [exact.map(Vec::as_slice), schema_any.map(Vec::as_slice), Some(self.any.as_slice())];
        for &(chan, b) in lists.into_iter().flatten().flatten() {
            let ch = &mut self.chans[chan as usize];
            let binding = &ch.bindings[b as usize];
            if binding.events & event == 0 {
                continue;
            }
            if let (Pat::Any, Pat::Is(t)) = (&binding.schema, &binding.table) {
                if t != table {
                    continue;
                }
            }
            if !binding.filter.is_empty() && !binding.filter.matches(&cell) {
                continue;
            }
            let id = binding.id;
            if ch.mark.0 == round {
                let ids = &mut out[ch.mark.1].ids;
                if !ids.contains(&id) {
                    ids.push(id);
                }
            } else {
                ch.mark = (round, out.len());
                out.push(Hit { chan, ids: vec![id] });
            }
        }
        debug_assert!(out[first..].iter().all(|h| !h.ids.is_empty()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ingest::filter;
    use crate::ingest::types::Kind;

    fn key(conn: u32, topic: &str) -> Key {
        Key { shard: 0, conn: ConnId { index: conn, generation: 1 }, topic: Topic::new(topic, false).unwrap() }
    }

    fn binding(id: u32, event: &str, schema: &str, table: &str, flt: &str) -> Binding {
        Binding {
            id,
            events: event_mask(event),
            schema: Pat::new(schema),
            table: Pat::new(table),
            filter: filter::parse(flt).unwrap(),
        }
    }

    fn ctx(role: &str) -> AuthCtx {
        AuthCtx { role: role.into(), claims: "{}".into() }
    }

    fn matches(r: &mut Registry, schema: &str, table: &str, event: u8, id: &str) -> Vec<Hit> {
        let mut out = Vec::new();
        let kind = Kind::Int;
        r.matches(
            schema,
            table,
            event,
            |c| if c == "id" { Cell::Value(&kind, id.as_bytes()) } else { Cell::Missing },
            &mut out,
        );
        out
    }

    #[test]
    fn matches_by_table_event_and_filter() {
        let mut r = Registry::new();
        let a = r.insert(
            key(1, "a"),
            "realtime:a".into(),
            None,
            Format::V2,
            ctx("anon"),
            vec![binding(10, "INSERT", "public", "todos", ""), binding(11, "*", "public", "todos", "id=eq.5")],
        );
        let b = r.insert(
            key(2, "b"),
            "realtime:b".into(),
            None,
            Format::V1,
            ctx("anon"),
            vec![binding(20, "*", "public", "*", "")],
        );
        let c = r.insert(
            key(3, "c"),
            "realtime:c".into(),
            None,
            Format::V2,
            ctx("x"),
            vec![binding(30, "delete", "*", "*", "")],
        );
        assert_eq!(r.auth_count(), 2);
        assert_eq!(
            matches(&mut r, "public", "todos", EV_INSERT, "5"),
            vec![Hit { chan: a, ids: vec![10, 11] }, Hit { chan: b, ids: vec![20] }]
        );
        assert_eq!(matches(&mut r, "public", "todos", EV_UPDATE, "4"), vec![Hit { chan: b, ids: vec![20] }]);
        assert_eq!(matches(&mut r, "other", "t", EV_DELETE, "4"), vec![Hit { chan: c, ids: vec![30] }]);
        assert!(r.watches("public", "x") && r.watches("z", "y"));
        assert!(!r.watches(INTERNAL_SCHEMA, "history"), "corecast's own tables are never streamed");
        r.remove(&key(3, "c"));
        assert!(!r.watches("z", "y"));
        assert_eq!(r.auth_count(), 1);
        r.remove(&key(1, "a"));
        r.remove(&key(2, "b"));
        assert!(r.is_empty() && r.auth_count() == 0);
        assert!(!r.watches("public", "todos"));
    }

    #[test]
    fn replacing_and_reauth_keep_counts_right() {
        let mut r = Registry::new();
        r.insert(
            key(1, "a"),
            "realtime:a".into(),
            None,
            Format::V2,
            ctx("anon"),
            vec![binding(1, "*", "public", "t", "")],
        );
        r.insert(
            key(1, "a"),
            "realtime:a".into(),
            None,
            Format::V2,
            ctx("anon"),
            vec![binding(2, "*", "public", "t", "")],
        );
        assert_eq!(r.len(), 1);
        assert_eq!(matches(&mut r, "public", "t", EV_INSERT, "1")[0].ids, vec![2]);
        let idx = r.find(&key(1, "a")).unwrap();
        r.channel_mut(idx).apikey = true;
        r.reauth(&key(1, "a"), ctx("authenticated"));
        assert!(!r.channel(idx).apikey, "claims from an access_token are no longer the apikey's");
        assert_eq!(r.auth(r.channel(idx).auth).role, "authenticated");
        assert_eq!(r.auth_count(), 1);
    }

    #[test]
    fn event_names() {
        assert_eq!(event_mask("insert"), EV_INSERT);
        assert_eq!(event_mask("*"), EV_ALL);
        assert_eq!(event_mask("bogus"), EV_ALL);
    }
}
