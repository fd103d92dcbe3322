//! The ingest thread: a tokio current-thread runtime pinned to its own core, running
//!
//! - the control loop: [`IngestMsg`]s from the shards (subscriptions, re-auth, private joins);
//! - the [`source`] task: replication stream → committed transactions, in order;
//! - the processor: takes every transaction waiting (a batch), matches it against the
//!   subscriptions, checks column privileges and row-level security for the batch, encodes
//!   each change once per distinct (column set, topic, ids, wire format), hands the frames to
//!   the shards, and only then acknowledges the batch's LSN.
//!
//! Batches form by themselves: while one batch waits for its RLS checks, the next
//! transactions queue up, so under load each check covers more changes and the number of
//! queries stays one per auth context per batch. Within a batch, the deliveries of auth
//! contexts without checks go out first, and each other context's as soon as its own check
//! has answered (not when the slowest of them has): with 1,000 contexts the first subscribers
//! get their changes after one check, the last after all of them. A context's deliveries
//! always leave together and in change order, and a batch is out before the next starts, so
//! no subscriber sees a change before an earlier one. The checks wait until the batch's
//! transactions are visible to new snapshots (see [`rls::committed_visible`]).
//!
//! "Subscribed to PostgreSQL" goes out once a subscription is validated against the catalog
//! *and* the slot exists: from then on every transaction that commits is in the slot and will
//! be matched against it (the matching happens at delivery, after registration).

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, HashSet};
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::{mpsc, watch};

use super::catalog::{self, TableMeta};
use super::db::{self, Db};
use super::encode::{self, ChangeType};
use super::filter;
use super::pgoutput::Datum;
use super::plan::{self, Decision, Item, Routed};
use super::retry::Backoff;
use super::rls;
use super::source::{self, Event, SourceCfg};
use super::subscriptions::{event_mask, AuthCtx, AuthId, Binding, Channel, Key, Pat, Registry};
use super::txn::{Change, Txn};
use super::types::Types;
use super::{IngestMsg, PgSubscribe};
use crate::auth::Claims;
use crate::bus::ShardMsg;
use crate::channel::registry::ConnId;
use crate::protocol::phoenix::Topic;

/// Connections in the pool (catalog, subscription checks, RLS, private channel probes).
pub const POOL_SIZE: usize = 4;

/// How long catalog facts (RLS flag, primary key, column privileges) are trusted before they
/// are read again. A Relation message (schema change) invalidates a table at once.
const CATALOG_TTL: Duration = Duration::from_secs(10);

/// How long a table looked up by name for a new subscription is reused.
const BY_NAME_TTL: Duration = Duration::from_secs(2);

/// How long a private join waits for the database before it is refused.
const AUTHORIZE_DEADLINE: Duration = Duration::from_secs(5);

/// Transactions taken into one batch at most.
const MAX_BATCH_TXNS: usize = 1024;

/// How long RLS checks wait for a committed transaction to become visible to snapshots.
const VISIBLE_DEADLINE: Duration = Duration::from_secs(1);

/// RLS checks sent ahead on each pool connection. Enough to keep its backend busy; with more,
/// the ingest thread would spend the first milliseconds of a large batch queueing every
/// context's statements before it reads the first answer (about 10 ms for 1,000 contexts).
const CHECKS_IN_FLIGHT_PER_CONN: usize = 16;

/// Size of the warned-connections set before it is first pruned of closed connections.
const WARNED_CONNS_MIN: usize = 1024;

/// Everything the ingest needs from the configuration.
#[derive(Debug, Clone)]
pub struct Settings {
    pub source: SourceCfg,
    pub pool_size: usize,
}

/// Starts the ingest thread.
pub fn spawn(
    settings: Settings,
    cpu: Option<usize>,
    rx: flume::Receiver<IngestMsg>,
    shards: Vec<flume::Sender<ShardMsg>>,
    stats: Arc<super::IngestStats>,
) -> std::io::Result<()> {
    std::thread::Builder::new().name("ingest".into()).spawn(move || {
        if let Some(cpu) = cpu {
            if !core_affinity::set_for_current(core_affinity::CoreId { id: cpu }) {
                tracing::warn!(cpu, "cannot pin the ingest thread");
            }
        }
        let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
            Ok(rt) => rt,
            Err(e) => {
                tracing::error!(error = %e, "cannot start the ingest runtime: Postgres changes are off");
                return;
            }
        };
        let local = tokio::task::LocalSet::new();
        local.block_on(&rt, run(settings, rx, shards, stats));
    })?;
    Ok(())
}

struct Pending {
    gen: u64,
    claims: Arc<Claims>,
    /// `claims` are the connect apikey's (no `access_token` yet).
    apikey: bool,
}

/// A cached catalog lookup (`None`: the table or role does not exist).
type TableCache<K> = RefCell<HashMap<K, Cached<Option<Arc<TableMeta>>>>>;
type PrivilegeCache = RefCell<HashMap<(String, u32), Cached<Option<Arc<HashSet<String>>>>>>;

struct Cached<T> {
    at: Instant,
    version: u64,
    value: T,
}

/// The ingest state, shared by its tasks on one thread. `RefCell`s are never borrowed across
/// an `.await`.
struct Engine {
    shards: Vec<flume::Sender<ShardMsg>>,
    db: Rc<Db>,
    publication: String,
    reg: RefCell<Registry>,
    pending: RefCell<HashMap<Key, Pending>>,
    next_gen: Cell<u64>,
    slot_ready: Cell<bool>,
    /// Becomes `true` with `slot_ready`: subscriptions are checked only after the source
    /// made sure the publication exists (else a table would look unpublished).
    ready: watch::Sender<bool>,
    /// Why the source cannot stream, while it cannot (`None` once it streams): joins waiting
    /// for the slot are told, instead of waiting in silence.
    down_reason: watch::Sender<Option<String>>,
    /// The slot was recreated (changes lost) and until when joins are told so: the clients
    /// rejoining after a restart (within `--pg-resume-grace-ms`) are the ones who missed them.
    lost: RefCell<Option<(String, Instant)>>,
    resume_grace: Duration,
    stream_down: Cell<bool>,
    types: RefCell<Types>,
    tables: TableCache<u32>,
    by_name: TableCache<(String, String)>,
    /// Columns a role may select, by (role, relid); `None`: the role does not exist.
    privileges: PrivilegeCache,
    /// (role, table) pairs already warned about (no SELECT privilege).
    warned: RefCell<HashSet<(String, u32)>>,
    /// Connections already warned that RLS filtered a row for apikey claims (see
    /// [`Engine::warn_apikey_filtered`]); pruned of closed connections as it grows.
    warned_conns: RefCell<HashSet<(usize, ConnId)>>,
    warned_conns_prune_at: Cell<usize>,
    ack: watch::Sender<u64>,
    stats: Arc<super::IngestStats>,
}

async fn run(
    settings: Settings,
    rx: flume::Receiver<IngestMsg>,
    shards: Vec<flume::Sender<ShardMsg>>,
    stats: Arc<super::IngestStats>,
) {
    let db = Rc::new(Db::new(settings.source.pg.clone(), settings.pool_size));
    let (ack_tx, ack_rx) = watch::channel(0u64);
    let (ev_tx, ev_rx) = mpsc::channel(4096);
    let engine = Rc::new(Engine {
        shards,
        db: db.clone(),
        publication: settings.source.publication.clone(),
        reg: RefCell::new(Registry::new()),
        pending: RefCell::new(HashMap::new()),
        next_gen: Cell::new(0),
        slot_ready: Cell::new(false),
        ready: watch::channel(false).0,
        down_reason: watch::channel(None).0,
        lost: RefCell::new(None),
        resume_grace: settings.source.resume_grace,
        stream_down: Cell::new(false),
        types: RefCell::new(Types::new()),
        tables: RefCell::new(HashMap::new()),
        by_name: RefCell::new(HashMap::new()),
        privileges: RefCell::new(HashMap::new()),
        warned: RefCell::new(HashSet::new()),
        warned_conns: RefCell::new(HashSet::new()),
        warned_conns_prune_at: Cell::new(WARNED_CONNS_MIN),
        ack: ack_tx,
        stats,
    });
    tokio::task::spawn_local(engine.clone().sample_slot(settings.source.slot.clone()));
    tokio::task::spawn_local(source::run(settings.source, db, ev_tx, ack_rx));
    tokio::task::spawn_local(engine.clone().process_loop(ev_rx));
    while let Ok(msg) = rx.recv_async().await {
        engine.on_msg(msg);
    }
    tracing::debug!("every shard is gone: ingest stops");
}

fn key(shard: usize, conn: ConnId, topic: Topic) -> Key {
    Key { shard, conn, topic }
}

impl Engine {
    // ---------------------------------------------------------------------------------------
    // Control messages
    // ---------------------------------------------------------------------------------------

    fn on_msg(self: &Rc<Self>, msg: IngestMsg) {
        match msg {
            IngestMsg::Subscribe(s) => {
                let k = key(s.shard, s.conn, s.topic.clone());
                let gen = self.next_gen.get() + 1;
                self.next_gen.set(gen);
                self.pending
                    .borrow_mut()
                    .insert(k.clone(), Pending { gen, claims: s.claims.clone(), apikey: s.apikey_claims });
                tokio::task::spawn_local(self.clone().subscribe(*s, k, gen));
            }
            IngestMsg::Unsubscribe { shard, conn, topic } => {
                let k = key(shard, conn, topic);
                self.pending.borrow_mut().remove(&k);
                self.reg.borrow_mut().remove(&k);
            }
            IngestMsg::Reauth { shard, conn, topic, claims } => {
                let k = key(shard, conn, topic.clone());
                if let Some(p) = self.pending.borrow_mut().get_mut(&k) {
                    p.claims = claims.clone();
                    p.apikey = false;
                }
                self.reg.borrow_mut().reauth(&k, AuthCtx::of(&claims));
                if topic.is_private() {
                    tokio::task::spawn_local(self.clone().recheck_private(k, claims));
                }
            }
            IngestMsg::AuthorizeJoin { shard, conn, topic, claims } => {
                tokio::task::spawn_local(self.clone().authorize(shard, conn, topic, claims));
            }
        }
    }

    /// Queues frames for connections of one shard.
    fn send(&self, shard: usize, items: Vec<(Bytes, Vec<ConnId>)>) {
        let Some(tx) = self.shards.get(shard) else { return };
        if let Err(flume::TrySendError::Full(msg)) = tx.try_send(ShardMsg::ToConns { items }) {
            let tx = tx.clone();
            tokio::task::spawn_local(async move {
                let _ = tx.send_async(msg).await;
            });
        }
    }

    fn system_to(&self, k: &Key, frame: Bytes) {
        self.send(k.shard, vec![(frame, vec![k.conn])]);
    }

    async fn subscribe(self: Rc<Self>, s: PgSubscribe, k: Key, gen: u64) {
        self.wait_ready(&s, &k, gen).await;
        let mut backoff = Backoff::default();
        let result = loop {
            if self.pending.borrow().get(&k).is_none_or(|p| p.gen != gen) {
                return;
            }
            match self.validate(&s).await {
                Ok(r) => break r,
                Err(e) => {
                    let delay = backoff.next_delay();
                    tracing::warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "cannot check a subscription yet");
                    tokio::time::sleep(delay).await;
                }
            }
        };
        let pending = {
            let mut pending = self.pending.borrow_mut();
            match pending.get(&k) {
                Some(p) if p.gen == gen => pending.remove(&k),
                _ => None,
            }
        };
        let Some(Pending { claims, apikey, .. }) = pending else { return };
        let wire = k.topic.wire_name();
        match result {
            Ok(bindings) => {
                let idx = {
                    let mut reg = self.reg.borrow_mut();
                    let idx = reg.insert(k, wire.into(), s.join_ref, s.format, AuthCtx::of(&claims), bindings);
                    reg.channel_mut(idx).apikey = apikey;
                    idx
                };
                if self.slot_ready.get() {
                    self.announce(idx);
                }
            }
            Err(reason) => {
                tracing::debug!(%reason, "postgres_changes subscription refused");
                let frame = encode::system(s.format, s.join_ref.as_deref(), &wire, "postgres_changes", false, &reason);
                self.system_to(&k, frame);
            }
        }
    }

    /// Waits until the slot is ready. While the source cannot stream (no replication slot free,
    /// the database unreachable, a slot of the wrong kind), the join is told once why, with a
    /// `system` error; "Subscribed to PostgreSQL" follows when it works.
    async fn wait_ready(&self, s: &PgSubscribe, k: &Key, gen: u64) {
        let (mut ready, mut down) = (self.ready.subscribe(), self.down_reason.subscribe());
        let mut told = false;
        while !*ready.borrow_and_update() {
            let reason = down.borrow_and_update().clone();
            if let (false, Some(reason)) = (told, reason) {
                told = true;
                if self.pending.borrow().get(k).is_some_and(|p| p.gen == gen) {
                    let text = format!(
                        "Postgres changes are not available yet: {reason}. Retrying; \"Subscribed to PostgreSQL\" follows once they are."
                    );
                    let frame = encode::system(
                        s.format,
                        s.join_ref.as_deref(),
                        &k.topic.wire_name(),
                        "postgres_changes",
                        false,
                        &text,
                    );
                    self.system_to(k, frame);
                }
            }
            futures_lite::future::or(
                async {
                    let _ = ready.changed().await;
                },
                async {
                    let _ = down.changed().await;
                },
            )
            .await;
        }
    }

    /// "Subscribed to PostgreSQL", once per channel.
    fn announce(&self, idx: u32) {
        let (k, frames) = {
            let mut reg = self.reg.borrow_mut();
            let ch = reg.channel_mut(idx);
            if ch.announced {
                return;
            }
            ch.announced = true;
            let frame = encode::system(
                ch.format,
                ch.join_ref.as_deref(),
                &ch.wire,
                "postgres_changes",
                true,
                "Subscribed to PostgreSQL",
            );
            let lost = self.lost.borrow().as_ref().filter(|(_, until)| Instant::now() < *until).map(|(why, _)| {
                encode::system(ch.format, ch.join_ref.as_deref(), &ch.wire, "postgres_changes", false, why)
            });
            (ch.key.clone(), [Some(frame), lost])
        };
        for frame in frames.into_iter().flatten() {
            self.system_to(&k, frame);
        }
    }

    /// Checks every binding of a join: `Ok(Ok(bindings))`, `Ok(Err(reason))` for a binding that
    /// can never work (the client gets a `system` error), `Err` when the database could not be
    /// asked (retried).
    async fn validate(&self, s: &PgSubscribe) -> Result<Result<Vec<Binding>, String>, tokio_postgres::Error> {
        let mut out = Vec::with_capacity(s.bindings.len());
        for b in &s.bindings {
            let invalid = |reason: String| {
                Ok(Err(format!(
                    "Unable to subscribe to changes with given parameters. Please check Realtime is enabled for the given connect parameters: [event: {}, schema: {}, table: {}, filters: [{}]]: {reason}",
                    b.event,
                    b.schema,
                    b.table,
                    b.filter.as_deref().unwrap_or("")
                )))
            };
            let mut flt = match filter::parse(b.filter.as_deref().unwrap_or("")) {
                Ok(f) => f,
                Err(e) => return invalid(e.to_string()),
            };
            let (schema, table) = (Pat::new(&b.schema), Pat::new(&b.table));
            match (&schema, &table) {
                (Pat::Is(sn), Pat::Is(tn)) => {
                    let Some(meta) = self.table_by_name(sn, tn).await? else {
                        return invalid(format!("relation {sn}.{tn} does not exist"));
                    };
                    if !meta.published {
                        return invalid(format!(
                            "table {} is not in publication {}",
                            meta.qualified(),
                            self.publication
                        ));
                    }
                    let oids: Vec<u32> = meta.columns.iter().map(|c| c.type_oid).collect();
                    self.ensure_types(&oids).await?;
                    let types = self.types.borrow();
                    let bound = flt.bind(&meta.qualified(), |col| {
                        meta.columns
                            .iter()
                            .find(|c| c.name == col)
                            .map(|c| (types.kind(c.type_oid), c.typname.as_str()))
                    });
                    if let Err(e) = bound {
                        return invalid(e.to_string());
                    }
                }
                (Pat::Is(sn), Pat::Any) => {
                    let conn = self.db.any().await?;
                    if !catalog::schema_exists(&conn, sn).await? {
                        return invalid(format!("schema {sn} does not exist"));
                    }
                }
                (Pat::Any, _) => {}
            }
            out.push(Binding { id: b.id, events: event_mask(&b.event), schema, table, filter: flt });
        }
        Ok(Ok(out))
    }

    async fn authorize(self: Rc<Self>, shard: usize, conn: ConnId, topic: Topic, claims: Arc<Claims>) {
        let (allowed, reason) = match self.probe(&topic, &claims).await {
            Some(true) => (true, String::new()),
            Some(false) => (false, "no policy on realtime.messages allows reading this topic".to_string()),
            None => (false, "UnableToConnectToProject: the database did not answer".to_string()),
        };
        if let Some(tx) = self.shards.get(shard) {
            let _ = tx.send_async(ShardMsg::JoinDecision { conn, topic, allowed, reason }).await;
        }
    }

    async fn recheck_private(self: Rc<Self>, k: Key, claims: Arc<Claims>) {
        if self.probe(&k.topic, &claims).await == Some(false) {
            let message = format!("You no longer have permission to read from this Channel topic: {}", k.topic.name());
            if let Some(tx) = self.shards.get(k.shard) {
                let _ = tx.send_async(ShardMsg::CloseChannel { conn: k.conn, topic: k.topic, message }).await;
            }
        }
    }

    /// The private-channel probe, retried until [`AUTHORIZE_DEADLINE`]; `None` if the database
    /// never answered.
    async fn probe(&self, topic: &Topic, claims: &Claims) -> Option<bool> {
        let ctx = AuthCtx::of(claims);
        let deadline = Instant::now() + AUTHORIZE_DEADLINE;
        // realtime.messages is created by the source's setup: wait for it (within the deadline).
        let mut ready = self.ready.subscribe();
        if tokio::time::timeout(AUTHORIZE_DEADLINE, ready.wait_for(|r| *r)).await.is_err() {
            tracing::warn!("private channel check: the database is not set up yet; refusing the join");
            return None;
        }
        let mut backoff = Backoff::default();
        loop {
            let err = match self.db.any().await {
                Ok(c) => match rls::authorize_private(&c, &ctx, topic.name()).await {
                    Ok(allowed) => return Some(allowed),
                    Err(e) => e,
                },
                Err(e) => e,
            };
            if Instant::now() >= deadline {
                tracing::warn!(error = %err, "private channel check failed: refusing the join");
                return None;
            }
            tokio::time::sleep(backoff.next_delay()).await;
        }
    }

    // ---------------------------------------------------------------------------------------
    // Catalog caches
    // ---------------------------------------------------------------------------------------

    async fn table_by_name(&self, schema: &str, table: &str) -> Result<Option<Arc<TableMeta>>, tokio_postgres::Error> {
        let k = (schema.to_string(), table.to_string());
        if let Some(c) = self.by_name.borrow().get(&k).filter(|c| c.at.elapsed() < BY_NAME_TTL) {
            return Ok(c.value.clone());
        }
        let conn = self.db.any().await?;
        let meta = catalog::table_by_name(&conn, schema, table, &self.publication).await?.map(Arc::new);
        self.by_name.borrow_mut().insert(k, Cached { at: Instant::now(), version: 0, value: meta.clone() });
        Ok(meta)
    }

    /// Resolves type OIDs not known yet (domains, enums, extension types, their arrays).
    async fn ensure_types(&self, oids: &[u32]) -> Result<(), tokio_postgres::Error> {
        let mut missing: Vec<u32> = oids.iter().copied().filter(|o| !self.types.borrow().contains(*o)).collect();
        missing.sort_unstable();
        missing.dedup();
        if missing.is_empty() {
            return Ok(());
        }
        let conn = self.db.any().await?;
        let mut rows = catalog::types(&conn, &missing).await?;
        for _ in 0..4 {
            let more = self.types.borrow().needed(&rows);
            if more.is_empty() {
                break;
            }
            rows.extend(catalog::types(&conn, &more).await?);
        }
        self.types.borrow_mut().insert(&rows);
        Ok(())
    }

    /// Table facts for each relation, fresh enough for `version` (the relation's shape).
    async fn tables_for(
        &self,
        rels: &[(u32, u64)],
    ) -> Result<HashMap<u32, Option<Arc<TableMeta>>>, tokio_postgres::Error> {
        let mut out = HashMap::new();
        for &(relid, version) in rels {
            let cached = self
                .tables
                .borrow()
                .get(&relid)
                .filter(|c| c.version == version && c.at.elapsed() < CATALOG_TTL)
                .map(|c| c.value.clone());
            let meta = match cached {
                Some(m) => m,
                None => {
                    let conn = self.db.any().await?;
                    let m = catalog::table_by_oid(&conn, relid, &self.publication).await?;
                    self.tables.borrow_mut().insert(relid, Cached { at: Instant::now(), version, value: m.clone() });
                    m
                }
            };
            out.insert(relid, meta);
        }
        Ok(out)
    }

    async fn privileges_for(
        &self,
        pairs: &[(String, u32, u64)],
    ) -> Result<HashMap<(String, u32), Option<Arc<HashSet<String>>>>, tokio_postgres::Error> {
        let mut out = HashMap::new();
        for (role, relid, version) in pairs {
            let k = (role.clone(), *relid);
            let cached = self
                .privileges
                .borrow()
                .get(&k)
                .filter(|c| c.version == *version && c.at.elapsed() < CATALOG_TTL)
                .map(|c| c.value.clone());
            let value = match cached {
                Some(v) => v,
                None => {
                    let conn = self.db.any().await?;
                    let v = catalog::column_privileges(&conn, role, *relid)
                        .await?
                        .map(|cols| Arc::new(cols.into_iter().collect::<HashSet<_>>()));
                    if v.is_none() {
                        tracing::debug!(%role, "role does not exist in the database: tables without RLS are sent whole");
                    }
                    self.privileges
                        .borrow_mut()
                        .insert(k.clone(), Cached { at: Instant::now(), version: *version, value: v.clone() });
                    v
                }
            };
            out.insert(k, value);
        }
        Ok(out)
    }

    /// Runs `f` until it succeeds, backing off between attempts (the database is down: the
    /// batch waits, unacknowledged, rather than deliver without its security checks).
    async fn retry<T, F, Fut>(&self, what: &str, mut f: F) -> T
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, tokio_postgres::Error>>,
    {
        let mut backoff = Backoff::default();
        loop {
            match f().await {
                Ok(v) => return v,
                Err(e) => {
                    let delay = backoff.next_delay();
                    tracing::warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "{what} failed; retrying");
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }

    // ---------------------------------------------------------------------------------------
    // The processor
    // ---------------------------------------------------------------------------------------

    async fn process_loop(self: Rc<Self>, mut rx: mpsc::Receiver<Event>) {
        let mut events = Vec::with_capacity(MAX_BATCH_TXNS);
        while rx.recv_many(&mut events, MAX_BATCH_TXNS).await > 0 {
            let mut txns = Vec::new();
            let mut ack = 0u64;
            for ev in events.drain(..) {
                match ev {
                    Event::Txn(t) => {
                        ack = ack.max(t.end_lsn);
                        txns.push(t);
                    }
                    Event::Idle(lsn) => ack = ack.max(lsn),
                    other => {
                        if !txns.is_empty() {
                            self.deliver_timed(std::mem::take(&mut txns)).await;
                        }
                        self.on_source(other);
                    }
                }
            }
            if !txns.is_empty() {
                self.deliver_timed(txns).await;
            }
            if ack > *self.ack.borrow() {
                self.ack.send_replace(ack);
            }
        }
    }

    /// [`Engine::deliver`], then records how long after its commit the batch's newest
    /// transaction was handed to the shards (`corecast_pg_commit_to_handoff_seconds`).
    async fn deliver_timed(&self, txns: Vec<Txn>) {
        let newest = txns.iter().map(|t| t.commit_time).max();
        self.deliver(txns).await;
        if let Some(pg_micros) = newest {
            let now_us =
                std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_micros() as i64);
            let delay =
                now_us.saturating_sub(pg_micros.saturating_add(super::pgoutput::PG_EPOCH_OFFSET_MICROS)).max(0) as u64;
            self.stats.commit_delay_us.store(delay, std::sync::atomic::Ordering::Relaxed);
            self.stats.commit_to_handoff.record_us(delay);
        }
    }

    /// Every 5 s: how far the slot is behind the database's WAL (not yet confirmed) and how
    /// much WAL it keeps on the server's disk, for `/metrics`.
    async fn sample_slot(self: Rc<Self>, slot: String) {
        use std::sync::atomic::Ordering::Relaxed;
        const SQL: &str = "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)::int8, \
                           pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::int8 \
                           FROM pg_replication_slots WHERE slot_name = $1";
        loop {
            if let Ok(conn) = self.db.get(0).await {
                match conn.client.query_opt(SQL, &[&slot]).await {
                    Ok(Some(row)) => {
                        let (lag, kept): (Option<i64>, Option<i64>) = (row.get(0), row.get(1));
                        self.stats.lag_bytes.store(lag.unwrap_or(0).max(0) as u64, Relaxed);
                        self.stats.retained_bytes.store(kept.unwrap_or(0).max(0) as u64, Relaxed);
                        self.stats.sampled.store(true, Relaxed);
                    }
                    Ok(None) => {}
                    Err(e) => tracing::debug!(error = %super::db::describe(&e), "cannot sample the replication slot"),
                }
            }
            tokio::time::sleep(Duration::from_secs(5)).await;
        }
    }

    fn on_source(&self, ev: Event) {
        match ev {
            Event::SlotReady => {
                self.slot_ready.set(true);
                self.ready.send_replace(true);
                let waiting: Vec<u32> =
                    self.reg.borrow().channels().filter(|(_, c)| !c.announced).map(|(i, _)| i).collect();
                for idx in waiting {
                    self.announce(idx);
                }
            }
            Event::Up => {
                self.down_reason.send_replace(None);
                if self.stream_down.replace(false) {
                    self.broadcast_system(true, "Replication connection re-established");
                }
            }
            Event::Down(reason) => {
                self.down_reason.send_replace(Some(reason.clone()));
                if !self.stream_down.replace(true) {
                    self.broadcast_system(
                        false,
                        &format!(
                            "Replication connection lost ({reason}); retrying. Changes are kept in the replication slot and delivered once it is back."
                        ),
                    );
                }
            }
            Event::SlotRecreated(why) => {
                // To every announced channel, whatever it was told before (this is news even
                // to one that knows the connection was down), and to joins of the next grace.
                let why = format!("Changes were lost: {why}.");
                self.system_to_all(false, &why);
                *self.lost.borrow_mut() = Some((why, Instant::now() + self.resume_grace.max(Duration::from_secs(1))));
            }
            Event::Txn(_) | Event::Idle(_) => {}
        }
    }

    /// A `postgres_changes` system message to every announced channel.
    /// An error (`ok == false`) goes to every announced channel and marks it; the recovery
    /// message goes to the marked ones only.
    fn broadcast_system(&self, ok: bool, text: &str) {
        self.system_where(ok, text, |ch| {
            let pick = ch.announced && ch.told_down == ok;
            if pick {
                ch.told_down = !ok;
            }
            pick
        });
    }

    /// A `postgres_changes` system message to every announced channel, marks untouched.
    fn system_to_all(&self, ok: bool, text: &str) {
        self.system_where(ok, text, |ch| ch.announced);
    }

    /// A `postgres_changes` system message to the channels `pick` chooses (it may update them).
    fn system_where(&self, ok: bool, text: &str, mut pick: impl FnMut(&mut Channel) -> bool) {
        let mut per_shard: Vec<Vec<(Bytes, Vec<ConnId>)>> = self.shards.iter().map(|_| Vec::new()).collect();
        let mut reg = self.reg.borrow_mut();
        for ch in reg.channels_mut() {
            if !pick(ch) {
                continue;
            }
            let frame = encode::system(ch.format, ch.join_ref.as_deref(), &ch.wire, "postgres_changes", ok, text);
            if let Some(items) = per_shard.get_mut(ch.key.shard) {
                items.push((frame, vec![ch.key.conn]));
            }
        }
        for (shard, items) in per_shard.into_iter().enumerate() {
            if !items.is_empty() {
                self.send(shard, items);
            }
        }
    }

    /// Matches, secures, encodes and hands off a batch of transactions.
    async fn deliver(&self, txns: Vec<Txn>) {
        if self.reg.borrow().is_empty() {
            return;
        }
        let items: Vec<Item<'_>> = txns
            .iter()
            .flat_map(|t| t.changes.iter().map(move |c| Item { change: c, commit_time: t.commit_time }))
            .collect();
        // Types of the watched tables' columns.
        let oids: Vec<u32> = {
            let reg = self.reg.borrow();
            let mut seen = HashSet::new();
            items
                .iter()
                .filter(|i| seen.insert(i.change.rel.relid) && reg.watches(&i.change.rel.schema, &i.change.rel.name))
                .flat_map(|i| i.change.rel.columns.iter().map(|c| c.type_oid))
                .collect()
        };
        if let Err(e) = self.ensure_types(&oids).await {
            tracing::warn!(error = %e, "cannot resolve column types: unknown types are sent as text");
        }
        let mut planned = Vec::new();
        {
            let types = self.types.borrow();
            plan::match_changes(&mut self.reg.borrow_mut(), &types, &items, &mut planned);
        }
        if planned.is_empty() {
            return;
        }
        let ctxs: Vec<Arc<AuthCtx>> = {
            let reg = self.reg.borrow();
            planned.iter().map(|p| reg.auth(p.target.auth).clone()).collect()
        };
        // Table facts and column privileges.
        let mut rels: Vec<(u32, u64)> = planned
            .iter()
            .map(|p| (items[p.item as usize].change.rel.relid, items[p.item as usize].change.rel.version))
            .collect();
        rels.sort_unstable();
        rels.dedup();
        let metas = self.retry("reading table facts", || self.tables_for(&rels)).await;
        let mut pairs: Vec<(String, u32, u64)> = planned
            .iter()
            .zip(&ctxs)
            .map(|(p, c)| {
                let rel = &items[p.item as usize].change.rel;
                (c.role.clone(), rel.relid, rel.version)
            })
            .collect();
        pairs.sort_unstable();
        pairs.dedup();
        let privileges = self.retry("reading column privileges", || self.privileges_for(&pairs)).await;
        let item_xid: Vec<u32> = txns.iter().flat_map(|t| t.changes.iter().map(move |_| t.xid)).collect();
        let sec = Security::new(&items, &item_xid, &planned, &ctxs, &metas, &privileges);
        for (role, relid) in &sec.no_privilege {
            if self.warned.borrow_mut().insert((role.clone(), *relid)) {
                let table = metas.get(relid).cloned().flatten().map_or_else(|| relid.to_string(), |m| m.qualified());
                tracing::warn!(%role, %table, "role has no SELECT privilege on the table: its subscribers get no changes (GRANT SELECT to it)");
            }
        }
        // Row-level security: one transaction per auth context for the whole batch, and each
        // context's deliveries go out as soon as its check has answered. All deliveries of a
        // context (checked or not: DELETEs, tables without RLS) leave together in change order,
        // so no subscriber sees a change before an earlier one; the next batch starts once this
        // one is out, which keeps every context's order across batches.
        let job_of: HashMap<AuthId, usize> = sec.jobs.iter().enumerate().map(|(j, job)| (job.auth, j)).collect();
        let mut per_job: Vec<Vec<u32>> = vec![Vec::new(); sec.jobs.len()];
        let mut unchecked = Vec::new();
        for (i, p) in planned.iter().enumerate() {
            match job_of.get(&p.target.auth) {
                Some(&j) => per_job[j].push(i as u32),
                None => unchecked.push(i as u32),
            }
        }
        let mut enc = plan::Encoder::new(&sec.masks);
        let nothing = HashSet::new();
        self.hand_off(&items, &planned, &unchecked, |i| sec.decide(i, &nothing), &mut enc).await;
        if sec.jobs.is_empty() {
            return;
        }
        let started = Instant::now();
        let conns = self.retry("connecting for row-level security", || self.pool()).await;
        let visibility_waits = self.wait_visible(&conns[0], &sec.xids).await;
        let mut checks = tokio::task::JoinSet::new();
        let mut job_of_task = HashMap::with_capacity(sec.jobs.len());
        let in_flight = Rc::new(tokio::sync::Semaphore::new(CHECKS_IN_FLIGHT_PER_CONN * conns.len()));
        for (j, job) in sec.jobs.iter().enumerate() {
            let slot = j % conns.len();
            let (db, conn, job, in_flight) =
                (self.db.clone(), conns[slot].clone(), Rc::new(job.clone()), in_flight.clone());
            let stats = self.stats.clone();
            let task = checks.spawn_local(async move {
                let _permit = in_flight.acquire().await;
                let t0 = Instant::now();
                let visible = check_until_answered(db, slot, conn, job).await;
                stats.rls_check.record(t0.elapsed());
                visible
            });
            job_of_task.insert(task.id(), j);
        }
        let mut first_ms = None;
        while let Some(done) = checks.join_next_with_id().await {
            let (j, visible) = match done {
                Ok((id, visible)) => (job_of_task[&id], visible.into_iter().collect::<HashSet<i32>>()),
                Err(e) => {
                    // Nothing is known visible: the context's checked changes are not sent.
                    tracing::error!(error = %e, "RLS check task failed");
                    (job_of_task[&e.id()], HashSet::new())
                }
            };
            first_ms.get_or_insert_with(|| started.elapsed().as_secs_f64() * 1e3);
            self.hand_off(&items, &planned, &per_job[j], |i| sec.decide(i, &visible), &mut enc).await;
            self.warn_apikey_filtered(&items, &planned, &ctxs, &per_job[j], &sec, &visible);
        }
        tracing::debug!(
            txns = txns.len(),
            changes = items.len(),
            planned = planned.len(),
            contexts = sec.jobs.len(),
            visibility_waits,
            first_ms,
            all_ms = started.elapsed().as_secs_f64() * 1e3,
            "batch checked for row-level security"
        );
    }

    /// Waits (up to [`VISIBLE_DEADLINE`]) until the batch's transactions are visible to new
    /// snapshots, so that RLS checks see their rows (see [`rls::committed_visible`]). Returns
    /// how many times it waited.
    async fn wait_visible(&self, conn: &db::Conn, xids: &[u32]) -> u32 {
        let deadline = Instant::now() + VISIBLE_DEADLINE;
        let mut waits = 0;
        loop {
            match rls::committed_visible(conn, xids).await {
                Ok(true) => return waits,
                Ok(false) if Instant::now() < deadline => {
                    // Usually a fraction of a millisecond: probe again at once a few times (a
                    // round trip each), then every millisecond.
                    waits += 1;
                    if waits > 4 {
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                }
                Ok(false) => {
                    tracing::warn!(?xids, "committed transactions still not visible to new snapshots; checking anyway");
                    return waits;
                }
                // The checks will find the connection broken and retry.
                Err(e) => {
                    tracing::debug!(error = %e, "visibility probe failed");
                    return waits;
                }
            }
        }
    }

    /// The pool's connections, connected.
    async fn pool(&self) -> Result<Vec<Rc<db::Conn>>, tokio_postgres::Error> {
        let mut conns = Vec::with_capacity(self.db.size());
        for i in 0..self.db.size() {
            conns.push(self.db.get(i).await?);
        }
        Ok(conns)
    }

    /// Encodes the planned deliveries `sel` that `decide` lets through and hands them to the
    /// shards, in order.
    async fn hand_off<'p>(
        &self,
        items: &[Item<'_>],
        planned: &'p [plan::Planned],
        sel: &[u32],
        decide: impl FnMut(usize) -> Option<Decision>,
        enc: &mut plan::Encoder<'p>,
    ) {
        if sel.is_empty() {
            return;
        }
        let mut routed = Routed::new(self.shards.len());
        {
            let types = self.types.borrow();
            plan::route_selected(items, &types, planned, sel, decide, enc, &mut routed);
        }
        for (shard, items) in routed.per_shard.into_iter().enumerate() {
            if items.is_empty() {
                continue;
            }
            if let Some(tx) = self.shards.get(shard) {
                let _ = tx.send_async(ShardMsg::ToConns { items }).await;
            }
        }
    }

    /// Says, once per connection, why a channel that runs with the connect apikey's claims
    /// (an API key: no `sub`) because its join carried no `access_token` had a change filtered
    /// by row-level security: the usual cause is realtime-js with an `accessToken` callback,
    /// which joins before the callback resolved and never pushes the token afterwards.
    fn warn_apikey_filtered(
        &self,
        items: &[Item<'_>],
        planned: &[plan::Planned],
        ctxs: &[Arc<AuthCtx>],
        sel: &[u32],
        sec: &Security,
        visible: &HashSet<i32>,
    ) {
        for &pi in sel {
            let (pi, p) = (pi as usize, &planned[pi as usize]);
            let filtered = p.target.apikey && sec.needs[pi].is_some_and(|(_, item)| !visible.contains(&item));
            if !filtered || self.warned_conns.borrow().contains(&(p.target.shard, p.target.conn)) {
                continue;
            }
            let ctx = &ctxs[pi];
            let user = serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(&ctx.claims)
                .is_ok_and(|c| c.contains_key("sub"));
            if user {
                continue;
            }
            self.remember_warned(p.target.shard, p.target.conn);
            let rel = &items[p.item as usize].change.rel;
            tracing::warn!(
                channel = p.target.wire.strip_prefix("realtime:").unwrap_or(&p.target.wire),
                role = %ctx.role,
                table = %format!("{}.{}", rel.schema, rel.name),
                "postgres_changes: row-level security filtered a change for this channel, which runs with the role \
                 and claims of the connect apikey because its join carried no access_token. To run as a signed-in \
                 user, call `await client.setAuth()` (with an `accessToken` callback) or `setAuth(token)` before \
                 subscribing, or connect with the user's token as apikey. (Logged once per connection.)"
            );
        }
    }

    fn remember_warned(&self, shard: usize, conn: ConnId) {
        let mut warned = self.warned_conns.borrow_mut();
        warned.insert((shard, conn));
        if warned.len() > self.warned_conns_prune_at.get() {
            let live: HashSet<(usize, ConnId)> =
                self.reg.borrow().channels().map(|(_, c)| (c.key.shard, c.key.conn)).collect();
            warned.retain(|k| live.contains(k));
            self.warned_conns_prune_at.set((2 * warned.len()).max(WARNED_CONNS_MIN));
        }
    }
}

/// One context's RLS check on `conn` (pool slot `slot`), retried with backoff on a fresh
/// connection until the database answers: the changes wait, unsent, rather than go out
/// unchecked.
async fn check_until_answered(db: Rc<Db>, slot: usize, conn: Rc<db::Conn>, job: Rc<rls::CtxRows>) -> Vec<i32> {
    let mut conn = Ok(conn);
    let mut backoff = Backoff::default();
    loop {
        let err = match conn {
            Ok(c) => match rls::check_one(&c, &job).await {
                Ok(visible) => return visible,
                Err(e) => e,
            },
            Err(e) => e,
        };
        let delay = backoff.next_delay();
        tracing::warn!(error = %err, retry_in_ms = delay.as_millis() as u64, "checking row-level security failed; retrying");
        tokio::time::sleep(delay).await;
        conn = db.get(slot).await;
    }
}

/// Per-batch security facts: which planned deliveries need an RLS check, the column masks, and
/// the decision for each delivery.
struct Security {
    /// Per planned delivery: how it goes out if allowed.
    base: Vec<Option<Decision>>,
    /// Per planned delivery: the (context, item) pair the RLS check must have found visible.
    needs: Vec<Option<(AuthId, i32)>>,
    masks: Vec<Vec<bool>>,
    jobs: Vec<rls::CtxRows>,
    /// Transactions with rows to check (distinct).
    xids: Vec<u32>,
    /// (role, table) pairs whose role may select no column: their subscribers get nothing.
    no_privilege: Vec<(String, u32)>,
}

const NO_PK: &str = "Error 400: Bad Request, no primary key";

impl Security {
    fn new(
        items: &[Item<'_>],
        item_xid: &[u32],
        planned: &[plan::Planned],
        ctxs: &[Arc<AuthCtx>],
        metas: &HashMap<u32, Option<Arc<TableMeta>>>,
        privileges: &HashMap<(String, u32), Option<Arc<HashSet<String>>>>,
    ) -> Self {
        let mut masks: Vec<Vec<bool>> = Vec::new();
        let mut mask_ids: HashMap<(String, u32), Option<u32>> = HashMap::new();
        let mut pk_masks: HashMap<u32, u32> = HashMap::new();
        let mut sqls: HashMap<u32, Option<Arc<rls::Check>>> = HashMap::new();
        let mut rows = Vec::new();
        let mut seen = HashSet::new();
        let mut xids = HashSet::new();
        let mut no_privilege: Vec<(String, u32)> = Vec::new();
        let mut base = Vec::with_capacity(planned.len());
        let mut needs = Vec::with_capacity(planned.len());
        for (p, ctx) in planned.iter().zip(ctxs) {
            let change: &Change = items[p.item as usize].change;
            let rel = &change.rel;
            let meta = metas.get(&rel.relid).cloned().flatten();
            // A table that vanished is treated as secured with no usable key.
            let rls = meta.as_ref().is_none_or(|m| m.rls);
            // Column privileges: a mask, or `None` when the role sees nothing.
            let mask = *mask_ids.entry((ctx.role.clone(), rel.relid)).or_insert_with(|| {
                match privileges.get(&(ctx.role.clone(), rel.relid)).cloned().flatten() {
                    None => Some(0),
                    Some(cols) => {
                        let m: Vec<bool> = rel.columns.iter().map(|c| cols.contains(&c.name)).collect();
                        if m.iter().all(|&v| v) {
                            Some(0)
                        } else if m.iter().all(|&v| !v) {
                            None
                        } else {
                            masks.push(m);
                            Some(masks.len() as u32)
                        }
                    }
                }
            });
            let Some(mask) = mask else {
                if !no_privilege.iter().any(|(r, t): &(String, u32)| *r == ctx.role && *t == rel.relid) {
                    no_privilege.push((ctx.role.clone(), rel.relid));
                }
                base.push(None);
                needs.push(None);
                continue;
            };
            let pk_names: Vec<&str> =
                meta.as_ref().map(|m| m.pk().map(|c| c.name.as_str()).collect()).unwrap_or_default();
            let mut decision = Decision { mask, old_only: 0, error: None };
            let mut need = None;
            if rls {
                match change.op {
                    ChangeType::Delete => {
                        // Cannot be checked (the row is gone): sent with the primary key only.
                        if !pk_names.is_empty() {
                            decision.old_only = *pk_masks.entry(rel.relid).or_insert_with(|| {
                                masks.push(rel.columns.iter().map(|c| pk_names.contains(&c.name.as_str())).collect());
                                masks.len() as u32
                            });
                        }
                    }
                    ChangeType::Insert | ChangeType::Update => {
                        let sql = sqls
                            .entry(rel.relid)
                            .or_insert_with(|| meta.as_ref().and_then(|m| rls::check_sql(m)).map(Arc::new))
                            .clone();
                        match sql {
                            None => decision.error = Some(NO_PK),
                            Some(sql) => {
                                let key = pk_names
                                    .iter()
                                    .map(|n| {
                                        let i = *rel.index.get(*n)?;
                                        match change.new.as_ref()?.0.get(i)? {
                                            Datum::Text(t) => Some(String::from_utf8_lossy(t).into_owned()),
                                            _ => None,
                                        }
                                    })
                                    .collect::<Option<Vec<String>>>();
                                let Some(key) = key else {
                                    base.push(None);
                                    needs.push(None);
                                    continue;
                                };
                                let pair = (p.target.auth, p.item as i32);
                                if seen.insert(pair) {
                                    rows.push((p.target.auth, ctx.clone(), sql, p.item as i32, key));
                                    xids.insert(item_xid[p.item as usize]);
                                }
                                need = Some(pair);
                            }
                        }
                    }
                }
            }
            base.push(Some(decision));
            needs.push(need);
        }
        Self { base, needs, masks, jobs: rls::group(rows), xids: xids.into_iter().collect(), no_privilege }
    }

    /// The decision for planned delivery `i`, given the changes its context's check found
    /// `visible`.
    fn decide(&self, i: usize, visible: &HashSet<i32>) -> Option<Decision> {
        let d = self.base[i]?;
        match self.needs[i] {
            Some((_, item)) if !visible.contains(&item) => None,
            _ => Some(d),
        }
    }
}
