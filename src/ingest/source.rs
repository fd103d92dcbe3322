//! The replication connection: makes sure the publication and the slot exist, streams
//! `pgoutput` over START_REPLICATION (pgwire-replication), assembles committed transactions
//! and hands them to the processor in commit order; acknowledges what the processor reports
//! as handed off; reconnects with backoff when Postgres goes away.
//!
//! At-least-once: the slot's confirmed position only moves to an LSN the processor has
//! delivered (the `ack` channel), so after a corecast crash streaming resumes at the first
//! transaction not handed off. Within one process a reconnect does not repeat transactions:
//! commits at or below the last one passed on are skipped.
//!
//! On a resume with changes waiting in the slot, streaming starts after a grace period
//! (`--pg-resume-grace-ms`) so that clients reconnecting after a corecast restart have
//! rejoined before the backlog is matched against subscriptions.

use std::rc::Rc;
use std::time::Duration;

use pgwire_replication::{Lsn, ReplicationClient, ReplicationConfig, ReplicationEvent};
use tokio::sync::{mpsc, watch};
use tokio_postgres::config::Host;

use super::db::{quote_ident, Conn, Db};
use super::pgoutput::{self, Begin, Commit, Message};
use super::retry::Backoff;
use super::txn::{Assembler, Step, Txn};

/// What the source tells the processor, in stream order.
#[derive(Debug)]
pub enum Event {
    /// The publication and slot exist: changes committed from now on will be delivered.
    SlotReady,
    /// Streaming (re)started.
    Up,
    /// The connection failed or was lost; retrying.
    Down(String),
    /// Postgres had invalidated the slot (it retained more WAL than `max_slot_wal_keep_size`
    /// while nobody read it): it was recreated, and what was committed in between is lost.
    SlotRecreated(String),
    /// A committed transaction.
    Txn(Txn),
    /// Everything up to this LSN was received and no transaction is open: acknowledge it once
    /// the events before it are handled.
    Idle(u64),
}

/// Connection settings of the source.
#[derive(Debug, Clone)]
pub struct SourceCfg {
    pub pg: tokio_postgres::Config,
    pub slot: String,
    pub publication: String,
    pub resume_grace: Duration,
    /// Cluster mode: where the cluster's batches (logical messages with prefix
    /// [`CLUSTER_PREFIX`]) go.
    pub cluster: Option<crate::cluster::Inbound>,
}

/// The `pg_logical_emit_message` prefix of cluster batches.
pub const CLUSTER_PREFIX: &str = "corecast";

/// Session settings for the walsender, so values are printed the same way everywhere: ISO
/// dates, UTC timestamps.
const SESSION_OPTIONS: &str = "-c datestyle=ISO,MDY -c timezone=UTC -c intervalstyle=postgres";

/// The pgwire-replication configuration for `pg` (host, port, user, password, database).
pub fn replication_config(cfg: &SourceCfg) -> ReplicationConfig {
    let pg = &cfg.pg;
    let host = match pg.get_hosts().first() {
        Some(Host::Tcp(h)) => h.clone(),
        #[cfg(unix)]
        Some(Host::Unix(p)) => p.to_string_lossy().into_owned(),
        None => "localhost".to_string(),
    };
    let port = pg.get_ports().first().copied().unwrap_or(5432);
    let user = pg.get_user().unwrap_or("postgres").to_string();
    let password = pg.get_password().map(|p| String::from_utf8_lossy(p).into_owned()).unwrap_or_default();
    let dbname = pg.get_dbname().unwrap_or(&user).to_string();
    ReplicationConfig::new(host, user, password, dbname, cfg.slot.clone(), cfg.publication.clone())
        .with_port(port)
        .with_status_interval(Duration::from_millis(500))
        .with_wakeup_interval(Duration::from_secs(5))
        .with_buffer_size(4096)
        .with_options(SESSION_OPTIONS)
        .with_application_name("corecast-replication")
}

/// What setting up found.
struct Setup {
    /// Changes were waiting in an existing slot.
    pending: bool,
    /// The slot had been invalidated and was recreated: why, for the subscribers.
    recreated: Option<String>,
}

async fn setup(conn: &Conn, cfg: &SourceCfg, first: bool) -> Result<Setup, String> {
    let e = |e: tokio_postgres::Error| super::db::describe(&e);
    let c = &conn.client;
    let pubs = c.query("SELECT 1 FROM pg_publication WHERE pubname = $1", &[&cfg.publication]).await.map_err(e)?;
    if pubs.is_empty() {
        c.batch_execute(&format!("CREATE PUBLICATION {} FOR ALL TABLES", quote_ident(&cfg.publication)))
            .await
            .map_err(|err| format!("cannot create publication {}: {}", cfg.publication, super::db::describe(&err)))?;
        tracing::info!(publication = %cfg.publication, "created publication FOR ALL TABLES");
    }
    let slot = c
        .query_opt(
            "SELECT plugin::text, database::text, current_database()::text, wal_status::text FROM pg_replication_slots WHERE slot_name = $1",
            &[&cfg.slot],
        )
        .await
        .map_err(e)?;
    let (mut pending, mut recreated) = (false, None);
    let create = || async {
        c.query("SELECT pg_create_logical_replication_slot($1, 'pgoutput')", &[&cfg.slot])
            .await
            .map_err(|err| format!("cannot create replication slot {}: {}", cfg.slot, super::db::describe(&err)))
    };
    match slot {
        None => {
            create().await?;
            tracing::info!(slot = %cfg.slot, "created logical replication slot (pgoutput)");
        }
        Some(row) => {
            let (plugin, db, current): (Option<String>, Option<String>, String) = (row.get(0), row.get(1), row.get(2));
            if plugin.as_deref() != Some("pgoutput") || db.as_deref() != Some(current.as_str()) {
                return Err(format!(
                    "replication slot {} exists but is not a pgoutput slot of database {current} (plugin {plugin:?}, database {db:?}); choose another --slot",
                    cfg.slot
                ));
            }
            if row.get::<_, Option<String>>(3).as_deref() == Some("lost") {
                // Postgres removed WAL the slot still needed (`max_slot_wal_keep_size`): it can
                // never stream again. Staying down helps nobody; start a new one and say loudly
                // that the changes in between are gone.
                c.query("SELECT pg_drop_replication_slot($1)", &[&cfg.slot]).await.map_err(|err| {
                    format!("cannot drop the invalidated replication slot {}: {}", cfg.slot, super::db::describe(&err))
                })?;
                create().await?;
                let why = format!(
                    "replication slot {} had been invalidated by PostgreSQL (it retained more WAL than max_slot_wal_keep_size while corecast was not reading it); it was recreated, and changes committed in between were not delivered",
                    cfg.slot
                );
                tracing::error!(slot = %cfg.slot, "{why}");
                recreated = Some(why);
            } else if first {
                // Decoding stops at the flushed WAL. Under `synchronous_commit = off` the last
                // commits may not be flushed yet (the WAL writer does it within
                // `wal_writer_delay`), and the peek would miss them: wait until what was
                // inserted before now is flushed.
                wait_wal_flushed(c).await;
                // Peeking fails if the slot is still held by a previous session: assume a backlog.
                pending = c
                    .query(
                        "SELECT data FROM pg_logical_slot_peek_binary_changes($1, NULL, $3, 'proto_version', '1', 'publication_names', $2)",
                        &[&cfg.slot, &cfg.publication, &(PEEK_CHANGES as i32)],
                    )
                    .await
                    .map_or(true, |rows| {
                        let data: Vec<Vec<u8>> = rows.iter().map(|r| r.get(0)).collect();
                        waiting_changes(&data, rows.len() >= PEEK_CHANGES)
                    });
            }
        }
    }
    if first {
        if let Err(err) = ensure_messages_table(conn).await {
            tracing::warn!(error = %err, "cannot prepare realtime.messages: private channels will be refused");
        }
    }
    Ok(Setup { pending, recreated })
}

/// Changes the start-up peek looks at.
const PEEK_CHANGES: usize = 1000;

/// Whether the peeked pgoutput messages `data` hold a change to a table outside corecast's own
/// schema (cluster mode writes `corecast.topics` with every batch: those are no reason to hold
/// streaming back). `truncated`: the peek hit its limit, so more may follow.
fn waiting_changes(data: &[Vec<u8>], truncated: bool) -> bool {
    let mut schemas: std::collections::HashMap<u32, String> = Default::default();
    let foreign = |relid: &u32, schemas: &std::collections::HashMap<u32, String>| {
        schemas.get(relid).is_none_or(|s| s != "corecast")
    };
    for d in data {
        match pgoutput::decode(&bytes::Bytes::copy_from_slice(d)) {
            Ok(Some(Message::Relation(r))) => {
                schemas.insert(r.relid, r.schema);
            }
            Ok(Some(Message::Insert { relid, .. } | Message::Update { relid, .. } | Message::Delete { relid, .. }))
                if foreign(&relid, &schemas) =>
            {
                return true
            }
            Ok(Some(Message::Truncate { relids, .. })) if relids.iter().any(|r| foreign(r, &schemas)) => return true,
            Ok(_) => {}
            Err(_) => return true,
        }
    }
    truncated
}

/// Waits (at most 2 s) until the WAL is flushed up to its insert position as of now.
async fn wait_wal_flushed(c: &tokio_postgres::Client) {
    let Ok(row) = c.query_one("SELECT pg_current_wal_insert_lsn()::text", &[]).await else { return };
    let target: String = row.get(0);
    for _ in 0..100 {
        match c.query_one("SELECT pg_current_wal_flush_lsn() >= $1::text::pg_lsn", &[&target]).await {
            Ok(r) if !r.get::<_, bool>(0) => tokio::time::sleep(Duration::from_millis(20)).await,
            _ => return,
        }
    }
}

/// The table private-channel policies are written on, created when missing (RLS on, no
/// policy: nothing is readable until the user adds policies), and `realtime.topic()`.
async fn ensure_messages_table(conn: &Conn) -> Result<(), tokio_postgres::Error> {
    let c = &conn.client;
    let exists = c.query_one("SELECT to_regclass('realtime.messages') IS NOT NULL", &[]).await?.get::<_, bool>(0);
    if !exists {
        c.batch_execute(
            "CREATE SCHEMA IF NOT EXISTS realtime;
             CREATE TABLE IF NOT EXISTS realtime.messages (
               id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
               topic text NOT NULL,
               extension text NOT NULL,
               payload jsonb,
               event text,
               private boolean DEFAULT true,
               inserted_at timestamptz NOT NULL DEFAULT now(),
               updated_at timestamptz NOT NULL DEFAULT now());
             ALTER TABLE realtime.messages ENABLE ROW LEVEL SECURITY;
             GRANT USAGE ON SCHEMA realtime TO PUBLIC;
             GRANT SELECT, INSERT ON realtime.messages TO PUBLIC;",
        )
        .await?;
        tracing::info!("created realtime.messages (row-level security on; add policies to allow private channels)");
    }
    let func = c.query_one("SELECT to_regprocedure('realtime.topic()') IS NOT NULL", &[]).await?.get::<_, bool>(0);
    if !func {
        c.batch_execute(
            "CREATE FUNCTION realtime.topic() RETURNS text LANGUAGE sql STABLE \
               AS $$ SELECT nullif(current_setting('realtime.topic', true), '') $$;
             GRANT EXECUTE ON FUNCTION realtime.topic() TO PUBLIC;",
        )
        .await?;
    }
    Ok(())
}

/// Runs until the processor goes away.
pub async fn run(cfg: SourceCfg, db: Rc<Db>, tx: mpsc::Sender<Event>, mut ack: watch::Receiver<u64>) {
    let mut backoff = Backoff::default();
    let (mut first, mut slot_ready, mut down) = (true, false, false);
    let mut asm = Assembler::new();
    let mut last_end = 0u64;
    loop {
        let reason = match attempt(
            &cfg,
            &db,
            &tx,
            &mut ack,
            &mut asm,
            &mut last_end,
            &mut first,
            &mut slot_ready,
            &mut down,
            &mut backoff,
        )
        .await
        {
            Some(r) => r,
            None => return,
        };
        asm.reset();
        if tx.is_closed() {
            return;
        }
        if !down {
            down = true;
            if tx.send(Event::Down(reason.clone())).await.is_err() {
                return;
            }
        }
        let delay = backoff.next_delay();
        tracing::warn!(error = %reason, retry_in_ms = delay.as_millis() as u64, "postgres replication unavailable");
        tokio::time::sleep(delay).await;
    }
}

/// One connection attempt and its stream. `Some(reason)` when it failed or ended; `None` when
/// the processor is gone.
#[allow(clippy::too_many_arguments)]
async fn attempt(
    cfg: &SourceCfg,
    db: &Db,
    tx: &mpsc::Sender<Event>,
    ack: &mut watch::Receiver<u64>,
    asm: &mut Assembler,
    last_end: &mut u64,
    first: &mut bool,
    slot_ready: &mut bool,
    down: &mut bool,
    backoff: &mut Backoff,
) -> Option<String> {
    let conn = match db.get(0).await {
        Ok(c) => c,
        Err(e) => return Some(super::db::describe(&e)),
    };
    let info = match setup(&conn, cfg, *first).await {
        Ok(i) => i,
        Err(e) => return Some(e),
    };
    if !*slot_ready {
        *slot_ready = true;
        tx.send(Event::SlotReady).await.ok()?;
    }
    if let Some(why) = info.recreated.clone() {
        tx.send(Event::SlotRecreated(why)).await.ok()?;
    }
    if std::mem::take(first) && info.pending {
        // Counted from now, when the slot is ready and joins can first be subscribed, not from
        // process start: a slow start (Postgres recovering, a busy host) must not eat it.
        let wait = cfg.resume_grace;
        if !wait.is_zero() {
            tracing::info!(
                grace_ms = wait.as_millis() as u64,
                "changes waiting in the slot: letting clients rejoin first"
            );
            tokio::time::sleep(wait).await;
        }
    }
    let mut client = match ReplicationClient::connect(replication_config(cfg)).await {
        Ok(c) => c,
        Err(e) => return Some(e.to_string()),
    };
    match tokio::time::timeout(Duration::from_secs(10), client.wait_started()).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Some(e.to_string()),
        Err(_) => return Some("START_REPLICATION was not accepted within 10 s".into()),
    }
    let acked = *ack.borrow_and_update();
    if acked > 0 {
        client.update_applied_lsn(Lsn::from_u64(acked));
    }
    backoff.reset();
    *down = false;
    tx.send(Event::Up).await.ok()?;
    tracing::info!(slot = %cfg.slot, publication = %cfg.publication, "streaming changes");
    let reason = stream(&mut client, tx, ack, asm, last_end, cfg.cluster.as_ref()).await;
    client.abort();
    reason
}

enum Sel {
    Ack(bool),
    Ev(pgwire_replication::Result<Option<ReplicationEvent>>),
}

async fn stream(
    client: &mut ReplicationClient,
    tx: &mpsc::Sender<Event>,
    ack: &mut watch::Receiver<u64>,
    asm: &mut Assembler,
    last_end: &mut u64,
    cluster: Option<&crate::cluster::Inbound>,
) -> Option<String> {
    let mut last_idle = 0u64;
    let mut commit_lsn = 0u64;
    loop {
        let sel = futures_lite::future::or(async { Sel::Ack(ack.changed().await.is_ok()) }, async {
            Sel::Ev(client.recv().await)
        })
        .await;
        let ev = match sel {
            Sel::Ack(true) => {
                client.update_applied_lsn(Lsn::from_u64(*ack.borrow_and_update()));
                continue;
            }
            Sel::Ack(false) => return None,
            Sel::Ev(Ok(Some(ev))) => ev,
            Sel::Ev(Ok(None)) => return Some("the replication stream ended".into()),
            Sel::Ev(Err(e)) => return Some(e.to_string()),
        };
        let msg = match ev {
            ReplicationEvent::Begin { final_lsn, xid, commit_time_micros } => {
                commit_lsn = final_lsn.as_u64();
                Message::Begin(Begin { final_lsn: final_lsn.as_u64(), commit_time: commit_time_micros, xid })
            }
            ReplicationEvent::Commit { lsn, end_lsn, commit_time_micros } => Message::Commit(Commit {
                flags: 0,
                commit_lsn: lsn.as_u64(),
                end_lsn: end_lsn.as_u64(),
                commit_time: commit_time_micros,
            }),
            ReplicationEvent::XLogData { data, .. } => match pgoutput::decode(&data) {
                Ok(Some(m)) => m,
                Ok(None) => continue,
                Err(e) => return Some(format!("cannot decode the replication stream: {e}")),
            },
            ReplicationEvent::KeepAlive { wal_end, .. } => {
                let lsn = wal_end.as_u64();
                if !asm.in_transaction() && lsn > last_idle && lsn > *last_end {
                    last_idle = lsn;
                    tx.send(Event::Idle(lsn)).await.ok()?;
                }
                continue;
            }
            ReplicationEvent::Message { transactional, lsn, prefix, content } => {
                // `pg_logical_emit_message` output (pgwire-replication starts pgoutput with
                // `messages 'true'`): cluster batches are transactional, decoded once committed,
                // in commit order. A batch already passed on before a reconnect comes again:
                // the owners drop offsets they have.
                tracing::trace!(transactional, lsn = lsn.as_u64(), %prefix, bytes = content.len(), "logical message");
                if let (Some(c), true, CLUSTER_PREFIX) = (cluster, transactional, prefix.as_str()) {
                    c.deliver(&content, commit_lsn).await;
                }
                continue;
            }
            ReplicationEvent::StoppedAt { .. } => return Some("the replication stream stopped".into()),
        };
        match asm.push(msg) {
            Step::None => {}
            Step::Commit(t) => {
                if t.end_lsn <= *last_end {
                    continue; // Already passed on before a reconnect.
                }
                *last_end = t.end_lsn;
                tx.send(Event::Txn(t)).await.ok()?;
            }
            Step::UnknownRelation(relid) => {
                return Some(format!("the stream referenced relation {relid} before describing it"));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::waiting_changes;

    fn relation(relid: u32, schema: &str, name: &str) -> Vec<u8> {
        let mut m = vec![b'R'];
        m.extend_from_slice(&relid.to_be_bytes());
        for s in [schema, name] {
            m.extend_from_slice(s.as_bytes());
            m.push(0);
        }
        m.push(b'd');
        m.extend_from_slice(&1u16.to_be_bytes());
        m.push(1);
        m.extend_from_slice(b"id\0");
        m.extend_from_slice(&23u32.to_be_bytes());
        m.extend_from_slice(&(-1i32).to_be_bytes());
        m
    }

    fn insert(relid: u32) -> Vec<u8> {
        let mut m = vec![b'I'];
        m.extend_from_slice(&relid.to_be_bytes());
        m.push(b'N');
        m.extend_from_slice(&1u16.to_be_bytes());
        m.push(b'n');
        m
    }

    #[test]
    fn only_changes_outside_corecast_hold_streaming_back() {
        let own = [relation(1, "corecast", "topics"), insert(1)];
        assert!(!waiting_changes(&own, false), "the cluster's own sequencer rows");
        assert!(waiting_changes(&own, true), "a peek cut at its limit may hide more");
        let user = [relation(1, "corecast", "topics"), insert(1), relation(2, "public", "todos"), insert(2)];
        assert!(waiting_changes(&user, false));
        assert!(waiting_changes(&[insert(9)], false), "a relation not described is not known to be ours");
        assert!(!waiting_changes(&[], false));
    }
}
