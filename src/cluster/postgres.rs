//! The Postgres backend of cluster mode: every node with the same `--database-url` and
//! `--cluster postgres` is one cluster, and nothing else is needed.
//!
//! - `corecast.topics (topic, private, epoch, last_offset)`: one row per topic, the cluster's
//!   sequencer. A batch's transaction adds its message count to each of its topics' rows
//!   (`INSERT … ON CONFLICT DO UPDATE … RETURNING`), which locks them until commit: two nodes
//!   publishing to one topic take turns, and commit order is offset order.
//! - The same transaction inserts the persisted messages into `corecast.history` (the history
//!   store every node reads) and writes the whole batch into the WAL with
//!   `pg_logical_emit_message(true, 'corecast', …)`, which every node's replication slot
//!   decodes in commit order ([`crate::ingest::source`] hands it to [`super::Inbound`]). The
//!   link's session runs with `synchronous_commit = on`: once `COMMIT` returns the batch is
//!   flushed to the WAL, and the publishers are acknowledged.
//! - `corecast.nodes (node_id, run, slot, heartbeat, alive)`: the leases. Each node renews
//!   its row every [`super::HEARTBEAT`]; a clean shutdown clears `alive`. Rows older than
//!   `--cluster-slot-ttl-secs` lose their replication slot (dropped by a live node, when inactive),
//!   so a node that is gone for good does not make the database retain WAL.
//!
//! Two connections: one for the sequencing transactions, one for heartbeats and membership,
//! so a slow commit never delays a lease.

use std::collections::HashMap;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use tokio_postgres::{Client, NoTls, Statement};

use super::{wire, Backend, LinkError};
use crate::ingest::db::describe as why;

/// The cluster tables (created by [`crate::store::pg::create_schema`]).
const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS corecast.topics (
    topic text NOT NULL,
    private boolean NOT NULL,
    epoch text NOT NULL,
    last_offset bigint NOT NULL,
    PRIMARY KEY (topic, private)
);
CREATE UNLOGGED TABLE IF NOT EXISTS corecast.nodes (
    node_id text PRIMARY KEY,
    run bigint NOT NULL,
    slot text NOT NULL,
    heartbeat timestamptz NOT NULL,
    alive boolean NOT NULL
);
COMMENT ON TABLE corecast.topics IS 'corecast cluster: each topic''s epoch and newest offset (the sequencer)';
COMMENT ON TABLE corecast.nodes IS 'corecast cluster: node leases (unlogged: renewed every second, not worth WAL)';
";

/// Adds each topic's message count to its row; returns the new newest offsets. Rows are taken
/// in one order so concurrent batches of several topics cannot deadlock.
const SEQUENCE: &str = "INSERT INTO corecast.topics AS t (topic, private, epoch, last_offset) \
     SELECT * FROM unnest($1::text[], $2::bool[], $3::text[], $4::int8[]) AS u(topic, private, epoch, n) \
     ORDER BY topic, private \
     ON CONFLICT (topic, private) DO UPDATE SET last_offset = t.last_offset + excluded.last_offset \
     RETURNING topic, private, epoch, last_offset";

const EMIT: &str = "SELECT pg_logical_emit_message(true, 'corecast', $1::bytea)::text";

const BEAT: &str =
    "INSERT INTO corecast.nodes (node_id, run, slot, heartbeat, alive) VALUES ($1, $2, $3, now(), true) \
     ON CONFLICT (node_id) DO UPDATE SET run = excluded.run, slot = excluded.slot, heartbeat = now(), alive = true";

const LIVE: &str = "SELECT node_id, run FROM corecast.nodes \
     WHERE alive AND heartbeat > now() - $1::int8 * interval '1 millisecond'";

const LEAVE: &str = "UPDATE corecast.nodes SET alive = false, heartbeat = now() WHERE node_id = $1 AND run = $2";

/// Slots of nodes gone for longer than the TTL, not in use.
const DEAD_SLOTS: &str = "SELECT n.node_id, n.slot, s.slot_name IS NOT NULL FROM corecast.nodes n \
     LEFT JOIN pg_replication_slots s ON s.slot_name = n.slot \
     WHERE n.node_id <> $1 AND n.heartbeat < now() - $2::int8 * interval '1 millisecond' \
       AND (s.slot_name IS NULL OR NOT s.active)";

async fn connect(pg: &tokio_postgres::Config) -> Result<Client, LinkError> {
    let (client, connection) = pg.connect(NoTls).await.map_err(|e| LinkError::transient(why(&e)))?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %why(&e), "cluster: database connection ended");
        }
    });
    Ok(client)
}

fn sql(e: tokio_postgres::Error) -> LinkError {
    // Data exceptions, integrity violations, program limits: the same data fails again.
    let refused = e.as_db_error().is_some_and(|d| matches!(&d.code().code()[..2], "22" | "23" | "54"));
    LinkError { message: why(&e), refused }
}

/// A topic as the sequencer's rows name it: (name, private).
type TopicKey = (Arc<str>, bool);

struct SeqConn {
    client: Client,
    sequence: Statement,
    emit: Statement,
    insert: Statement,
}

/// The Postgres backend (see the module docs).
pub struct Postgres {
    pg: tokio_postgres::Config,
    node: String,
    run: u64,
    slot: String,
    slot_ttl: Duration,
    seq: std::cell::RefCell<Option<Rc<SeqConn>>>,
    beat: std::cell::RefCell<Option<Rc<Client>>>,
}

impl Postgres {
    /// A backend for node `node` (process `run`) reading slot `slot`.
    pub fn new(pg: tokio_postgres::Config, node: String, run: u64, slot: String, slot_ttl: Duration) -> Self {
        Self { pg, node, run, slot, slot_ttl, seq: Default::default(), beat: Default::default() }
    }

    /// Creates the schema when missing and returns the WAL position from which messages are
    /// live for this process (see [`super::Inbound::live_from`]).
    pub async fn prepare(&self) -> Result<u64, LinkError> {
        let c = connect(&self.pg).await?;
        crate::store::pg::create_schema(&c, SCHEMA).await.map_err(sql)?;
        let lsn: String = c.query_one("SELECT pg_current_wal_lsn()::text", &[]).await.map_err(sql)?.get(0);
        parse_lsn(&lsn).ok_or_else(|| LinkError::transient(format!("unexpected LSN {lsn:?}")))
    }

    async fn seq_conn(&self) -> Result<Rc<SeqConn>, LinkError> {
        if let Some(c) = self.seq.borrow().as_ref().filter(|c| !c.client.is_closed()) {
            return Ok(c.clone());
        }
        let client = connect(&self.pg).await?;
        client.batch_execute("SET synchronous_commit = on").await.map_err(sql)?;
        let sequence = client.prepare(SEQUENCE).await.map_err(sql)?;
        let emit = client.prepare(EMIT).await.map_err(sql)?;
        let insert = client.prepare(crate::store::pg::INSERT).await.map_err(sql)?;
        let c = Rc::new(SeqConn { client, sequence, emit, insert });
        *self.seq.borrow_mut() = Some(c.clone());
        Ok(c)
    }

    async fn beat_conn(&self) -> Result<Rc<Client>, LinkError> {
        if let Some(c) = self.beat.borrow().as_ref().filter(|c| !c.is_closed()) {
            return Ok(c.clone());
        }
        let c = Rc::new(connect(&self.pg).await?);
        *self.beat.borrow_mut() = Some(c.clone());
        Ok(c)
    }

    async fn try_commit(&self, batch: &mut [super::Pending]) -> Result<(), LinkError> {
        let c = self.seq_conn().await?;
        // Message counts per topic, in first-seen order.
        let mut counts: HashMap<TopicKey, usize, ahash::RandomState> = HashMap::default();
        let (mut names, mut privs, mut epochs, mut ns) = (Vec::new(), Vec::new(), Vec::new(), Vec::<i64>::new());
        for p in batch.iter() {
            if let super::Pending::Publish { msg, .. } = p {
                let key = (Arc::<str>::from(msg.topic.name()), msg.topic.is_private());
                let i = *counts.entry(key).or_insert_with(|| {
                    names.push(msg.topic.name().to_string());
                    privs.push(msg.topic.is_private());
                    epochs.push(format!("{:016x}", crate::entropy::u64()));
                    ns.push(0);
                    ns.len() - 1
                });
                ns[i] += 1;
            }
        }
        let begin = c.client.batch_execute("BEGIN");
        let rows = if names.is_empty() {
            begin.await.map_err(sql)?;
            Vec::new()
        } else {
            let (b, rows) =
                futures_lite::future::zip(begin, c.client.query(&c.sequence, &[&names, &privs, &epochs, &ns])).await;
            b.map_err(sql)?;
            match rows {
                Ok(r) => r,
                Err(e) => {
                    let _ = c.client.batch_execute("ROLLBACK").await;
                    return Err(sql(e));
                }
            }
        };
        // First offset of each topic in this batch.
        let mut next: HashMap<TopicKey, (Arc<str>, u64), ahash::RandomState> = HashMap::default();
        for r in rows {
            let (name, private, epoch, last): (String, bool, String, i64) = (r.get(0), r.get(1), r.get(2), r.get(3));
            let key = (Arc::<str>::from(name.as_str()), private);
            let n = counts.get(&key).map_or(0, |&i| ns[i]);
            next.insert(key, (Arc::from(epoch.as_str()), (last - n + 1).max(1) as u64));
        }
        let mut rows = crate::store::pg::Rows::default();
        let mut content = Vec::with_capacity(256 * batch.len());
        wire::start(self.run, &mut content);
        for p in batch.iter_mut() {
            match p {
                super::Pending::Publish { msg, .. } => {
                    let key = (Arc::<str>::from(msg.topic.name()), msg.topic.is_private());
                    let Some((epoch, offset)) = next.get_mut(&key) else {
                        let _ = c.client.batch_execute("ROLLBACK").await;
                        return Err(LinkError::transient(format!(
                            "no sequence row came back for topic {}",
                            msg.topic.name()
                        )));
                    };
                    msg.epoch = epoch.clone();
                    msg.offset = *offset;
                    *offset += 1;
                    if msg.persisted {
                        rows.push_msg(
                            &msg.topic,
                            &crate::channel::history::StoredMsg {
                                offset: msg.offset,
                                epoch: msg.epoch.clone(),
                                id: msg.id.clone(),
                                event: msg.event.clone(),
                                payload: msg.payload.clone(),
                                binary_frame: msg.binary_frame,
                                created_ms: msg.created_ms,
                                expires_ms: msg.expires_ms,
                                user_id: msg.user_id.clone(),
                            },
                        );
                    }
                    wire::push_publish(msg, &mut content);
                }
                super::Pending::Presence(item) => wire::push(item, &mut content),
            }
        }
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 1] = [&content];
        // One round trip for the rest: the inserts, the emit and COMMIT, pipelined. If the insert
        // or the emit fails, the transaction is aborted and the COMMIT behind them only rolls it
        // back (it answers ROLLBACK, not an error): their results decide, then the commit's.
        let emit = c.client.query_one(&c.emit, &params);
        let commit = c.client.batch_execute("COMMIT");
        let ((inserted, emitted), committed) = if rows.is_empty() {
            let (e, c) = futures_lite::future::zip(emit, commit).await;
            ((Ok(0), e), c)
        } else {
            futures_lite::future::zip(futures_lite::future::zip(rows.execute(&c.client, &c.insert), emit), commit).await
        };
        inserted.map_err(sql)?;
        emitted.map_err(sql)?;
        committed.map_err(sql)?;
        Ok(())
    }
}

impl Backend for Postgres {
    async fn commit(&self, batch: &mut [super::Pending]) -> Result<(), LinkError> {
        let r = self.try_commit(batch).await;
        if r.is_err() {
            // Start from a fresh connection: the old one may be mid-transaction or gone.
            self.seq.borrow_mut().take();
        }
        r
    }

    async fn heartbeat(&self) -> Result<super::Beat, LinkError> {
        let r = async {
            let c = self.beat_conn().await?;
            c.execute(BEAT, &[&self.node, &(self.run as i64), &self.slot]).await.map_err(sql)?;
            let rows = c.query(LIVE, &[&(super::LEASE.as_millis() as i64)]).await.map_err(sql)?;
            let live = rows.iter().map(|r| (r.get::<_, String>(0), r.get::<_, i64>(1) as u64)).collect();
            Ok(super::Beat { live, resync: Vec::new() })
        }
        .await;
        if r.is_err() {
            self.beat.borrow_mut().take();
        }
        r
    }

    async fn ready(&self) -> Result<bool, LinkError> {
        let c = self.beat_conn().await?;
        let rows =
            c.query("SELECT 1 FROM pg_replication_slots WHERE slot_name = $1", &[&self.slot]).await.map_err(sql)?;
        Ok(!rows.is_empty())
    }

    async fn leave(&self) -> Result<(), LinkError> {
        let c = self.beat_conn().await?;
        c.execute(LEAVE, &[&self.node, &(self.run as i64)]).await.map_err(sql)?;
        Ok(())
    }

    async fn clean_up(&self) -> Result<(), LinkError> {
        let c = self.beat_conn().await?;
        let rows = c.query(DEAD_SLOTS, &[&self.node, &(self.slot_ttl.as_millis() as i64)]).await.map_err(sql)?;
        for r in rows {
            let (node, slot, exists): (String, String, bool) = (r.get(0), r.get(1), r.get(2));
            if exists {
                match c.execute("SELECT pg_drop_replication_slot($1)", &[&slot]).await {
                    Ok(_) => tracing::warn!(
                        node = %node,
                        slot = %slot,
                        gone_for_s = self.slot_ttl.as_secs(),
                        "cluster: dropped the replication slot of a node gone for good, so the database stops retaining WAL for it"
                    ),
                    Err(e) => {
                        tracing::warn!(node = %node, slot = %slot, error = %why(&e), "cluster: cannot drop a dead node's slot");
                        continue;
                    }
                }
            }
            let _ = c
                .execute(
                    "DELETE FROM corecast.nodes WHERE node_id = $1 AND heartbeat < now() - $2::int8 * interval '1 millisecond'",
                    &[&node, &(self.slot_ttl.as_millis() as i64)],
                )
                .await;
        }
        Ok(())
    }
}

/// Parses `X/Y` (hex halves) into a 64-bit WAL position.
pub fn parse_lsn(s: &str) -> Option<u64> {
    let (hi, lo) = s.split_once('/')?;
    Some((u64::from_str_radix(hi, 16).ok()? << 32) | u64::from_str_radix(lo, 16).ok()?)
}

/// How long a start waits for the database before giving up.
pub const CONNECT_PATIENCE: Duration = Duration::from_secs(30);

#[cfg(test)]
mod tests {
    #[test]
    fn lsns_parse() {
        assert_eq!(super::parse_lsn("0/16B3748"), Some(0x16B_3748));
        assert_eq!(super::parse_lsn("1/0"), Some(1 << 32));
        assert_eq!(super::parse_lsn("zz"), None);
    }
}
