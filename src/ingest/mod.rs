//! Postgres changes: logical replication on a dedicated core, filtered and row-level secured.
//!
//! This module is the boundary between the shards (glommio, `!Send`) and the ingest thread
//! (tokio current-thread runtime pinned to its own core). Shards send [`IngestMsg`] through an
//! [`IngestHandle`]; the ingest answers and delivers through each shard's inbox of
//! [`crate::bus::ShardMsg`] (a `flume` channel, which wakes a glommio task from a
//! foreign thread).
//!
//! Contract:
//! - [`IngestMsg::Subscribe`] registers a channel's `postgres_changes` bindings. The ingest
//!   validates each binding (table, columns, filter) and answers with a `system` message per
//!   join (`"Subscribed to PostgreSQL"`, status ok) only once changes will really flow, or an
//!   error `system` message; via [`crate::bus::ShardMsg::ToConns`].
//! - Changes are delivered with [`crate::bus::ShardMsg::ToConns`]: each frame encoded
//!   once per distinct (ids set, wire format) and listed with every connection that gets it.
//! - [`IngestMsg::AuthorizeJoin`] asks whether a private channel join is allowed (RLS on the
//!   corecast-managed messages table); the answer is
//!   [`crate::bus::ShardMsg::JoinDecision`].
//! - Revoked access or failed re-checks end a channel with
//!   [`crate::bus::ShardMsg::CloseChannel`].
//!
//! Modules, pure first:
//! - [`pgoutput`]: the `pgoutput` message decoder; [`txn`]: messages → committed transactions;
//! - [`types`]: type names and value kinds; [`filter`]: filter syntax and typed evaluation;
//! - [`subscriptions`]: the registry and matching; [`encode`]: the payload and frames;
//! - [`plan`]: changes → per-shard frames, each encoded once; [`retry`]: backoff;
//! - I/O, on the ingest thread: [`source`] (publication, slot, START_REPLICATION, ack),
//!   [`db`] (connection pool, pipelining), [`catalog`] (tables, types, privileges),
//!   [`rls`] (batched row-level security, private-channel probes), [`engine`] (the thread,
//!   its tasks and the batch pipeline).
//!
//! Delivery is at-least-once: a transaction's LSN is acknowledged to Postgres only after its
//! frames were handed to the shards, so a crash resumes from the slot at the first
//! transaction not handed off. DELETEs on tables with row-level security cannot be checked
//! (the row is gone) and carry the primary key only in `old_record`, as in Supabase.

pub mod catalog;
pub mod db;
pub mod encode;
pub mod engine;
pub mod filter;
pub mod pgoutput;
pub mod plan;
pub mod retry;
pub mod rls;
pub mod source;
pub mod subscriptions;
pub mod txn;
pub mod types;

use std::sync::Arc;

use crate::auth::Claims;
use crate::channel::registry::ConnId;
use crate::channel::Format;
use crate::protocol::phoenix::config::PgBinding;
use crate::protocol::phoenix::Topic;

/// A message from a shard to the ingest thread.
#[derive(Debug)]
pub enum IngestMsg {
    /// A channel joined with `postgres_changes` bindings.
    Subscribe(Box<PgSubscribe>),
    /// A channel with bindings (or a pending private join) went away: left, rejoined or its
    /// connection closed.
    Unsubscribe { shard: usize, conn: ConnId, topic: Topic },
    /// A channel's token was refreshed (`access_token`): new claims for RLS checks, and for a
    /// private channel a re-check of its read access.
    Reauth { shard: usize, conn: ConnId, topic: Topic, claims: Arc<Claims> },
    /// Decide whether `claims` may join the private `topic`.
    AuthorizeJoin { shard: usize, conn: ConnId, topic: Topic, claims: Arc<Claims> },
}

/// A channel's `postgres_changes` subscription.
#[derive(Debug, Clone)]
pub struct PgSubscribe {
    pub shard: usize,
    pub conn: ConnId,
    pub topic: Topic,
    /// The join ref (raw JSON token) for the `system` messages.
    pub join_ref: Option<Arc<str>>,
    pub format: Format,
    pub bindings: Vec<PgBinding>,
    pub claims: Arc<Claims>,
    /// `claims` are the connect apikey's because the join carried no `access_token`: a table
    /// with row-level security that shows such a channel nothing gets one warning per
    /// connection saying why (realtime-js joins before an `accessToken` callback resolved).
    pub apikey_claims: bool,
}

/// What the ingest thread reports for `/metrics`, written by it and read by any shard.
#[derive(Debug, Default)]
pub struct IngestStats {
    /// Whether the slot was sampled at least once (the gauges below mean something).
    pub sampled: std::sync::atomic::AtomicBool,
    /// WAL written by the database that corecast has not confirmed yet (bytes).
    pub lag_bytes: std::sync::atomic::AtomicU64,
    /// WAL the slot keeps on the database server's disk (from its `restart_lsn`, bytes).
    pub retained_bytes: std::sync::atomic::AtomicU64,
    /// Commit → hand-off to the shards of the last transaction delivered (µs).
    pub commit_delay_us: std::sync::atomic::AtomicU64,
    /// The same as a histogram.
    pub commit_to_handoff: crate::metrics::Histogram,
    /// Row-level security checks.
    pub rls_check: crate::metrics::Histogram,
}

/// Where shards send [`IngestMsg`]s (cheap to clone, `Send`).
#[derive(Debug, Clone)]
pub struct IngestHandle {
    tx: flume::Sender<IngestMsg>,
    stats: std::sync::Arc<IngestStats>,
}

impl IngestHandle {
    /// A handle and the ingest side's receiver.
    pub fn channel() -> (Self, flume::Receiver<IngestMsg>) {
        let (tx, rx) = flume::unbounded();
        (Self { tx, stats: Default::default() }, rx)
    }

    /// The ingest thread's gauges.
    pub fn stats(&self) -> &IngestStats {
        &self.stats
    }

    /// Sends a message; a stopped ingest thread drops it.
    pub fn send(&self, msg: IngestMsg) {
        let _ = self.tx.send(msg);
    }
}

/// Parses a database URL, refusing TLS modes this build cannot honour.
pub fn parse_database_url(url: &str) -> Result<tokio_postgres::Config, String> {
    let pg: tokio_postgres::Config = url.parse().map_err(|e| format!("invalid database URL: {e}"))?;
    if pg.get_ssl_mode() == tokio_postgres::config::SslMode::Require {
        return Err("sslmode=require is not supported: corecast connects to Postgres without TLS (use a local \
                    socket, a private network or sslmode=disable)"
            .into());
    }
    Ok(pg)
}

/// Starts the ingest thread for `cfg.database_url`, delivering to `shards` (one inbox per
/// shard, by shard id). Returns the handle shards use, or why it could not start (a URL that
/// does not parse, a TLS mode this build cannot honour). A database that is down is not an
/// error: the ingest retries with backoff and tells subscribers.
pub fn start(
    cfg: &crate::config::Config,
    shards: Vec<flume::Sender<crate::bus::ShardMsg>>,
    cluster: Option<crate::cluster::Inbound>,
) -> Result<IngestHandle, String> {
    let url = cfg.database_url.as_deref().ok_or("no database URL")?;
    let pg = parse_database_url(url)?;
    let settings = engine::Settings {
        source: source::SourceCfg {
            pg,
            slot: cfg.slot.clone(),
            publication: cfg.publication.clone(),
            resume_grace: cfg.pg_resume_grace,
            cluster,
        },
        pool_size: engine::POOL_SIZE,
    };
    let (handle, rx) = IngestHandle::channel();
    engine::spawn(settings, cfg.ingest_cpu, rx, shards, handle.stats.clone())
        .map_err(|e| format!("cannot start the ingest thread: {e}"))?;
    Ok(handle)
}
