//! Durable history in Postgres: the table `corecast.history`, shared by every node that uses
//! the same database (`--history-store postgres`, the default with `--database-url`).
//!
//! The shards are unchanged: each owner shard encodes its persisted messages and checkpoints
//! as [`log`] records, exactly as for the embedded log, and its log writer hands each batch to
//! this module's writer thread instead of a file. The writer (a tokio current-thread runtime on
//! its own thread) decodes the records and writes every batch waiting, from every shard, in one
//! transaction (group commit); once `COMMIT` returns, each shard gets
//! [`ShardMsg::HistorySynced`] and releases the acknowledgements the commit covers. So an
//! acknowledged persisted message is committed (with the server's `synchronous_commit`, by
//! default on: flushed to Postgres's WAL). A database that is down holds the acknowledgements
//! back while the writer retries with backoff; nothing is acknowledged that is not written.
//!
//! At start-up [`recover`] creates the schema when missing, reads every stored message and the
//! checkpoints a clean shutdown wrote (consuming them, so a later crash of this run is not
//! taken for a clean end), and hands the result to the same recovery code as the log.
//! Trimming (`--history-max-messages`, `--history-max-age-secs`, per-message `ttl`) runs at
//! start and then every [`TRIM_INTERVAL`] for the topics written since.
//!
//! Several nodes may share the table: a node that starts (on any machine, with an empty disk)
//! continues each topic's stream from it. A topic's stream must be written by one node at a
//! time; two nodes publishing to the same topic at once keep two streams (two epochs) whose
//! offsets overlap, and a node starting later keeps, per offset, the newest message.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio_postgres::{Client, NoTls, Statement};

use crate::bus::ShardMsg;
use crate::channel::history::{HistoryLimits, StoredMsg};
use crate::ingest::db::describe as why;
use crate::ingest::retry::Backoff;
use crate::protocol::phoenix::session::Payload;
use crate::protocol::phoenix::Topic;
use crate::store::log::{self, Record, Recovered};

/// How often stored messages over the bounds are deleted.
pub const TRIM_INTERVAL: Duration = Duration::from_secs(30);

/// How soon a failed start-up trim is tried again.
const TRIM_RETRY: Duration = Duration::from_secs(1);

/// How long start-up keeps retrying a database that does not answer with
/// `--history-store postgres`; with `auto`, corecast falls back to the log sooner.
pub const CONNECT_PATIENCE: Duration = Duration::from_secs(30);

/// The same with `--history-store auto`.
pub const AUTO_CONNECT_PATIENCE: Duration = Duration::from_secs(5);

/// The history tables (created by [`create_schema`]).
const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS corecast.history (
    topic text NOT NULL,
    private boolean NOT NULL,
    \"offset\" bigint NOT NULL,
    epoch text NOT NULL,
    id text NOT NULL,
    event text NOT NULL,
    payload json,
    payload_bytes bytea,
    binary_frame boolean NOT NULL DEFAULT false,
    created_at timestamptz NOT NULL,
    expires_at timestamptz,
    PRIMARY KEY (topic, private, \"offset\", epoch)
);
ALTER TABLE corecast.history ADD COLUMN IF NOT EXISTS user_id text;
CREATE TABLE IF NOT EXISTS corecast.history_checkpoints (
    topic text NOT NULL,
    private boolean NOT NULL,
    epoch text NOT NULL,
    last_offset bigint NOT NULL,
    PRIMARY KEY (topic, private)
);
COMMENT ON TABLE corecast.history IS 'corecast: persisted broadcast messages (history), one row per message';
COMMENT ON TABLE corecast.history_checkpoints IS 'corecast: where each topic''s stream stood at the last clean shutdown';
";

const LOAD: &str = "SELECT topic, private, \"offset\", epoch, id, event, payload::text, payload_bytes, binary_frame, \
     (extract(epoch FROM created_at) * 1000)::int8, (extract(epoch FROM expires_at) * 1000)::int8, user_id \
     FROM corecast.history ORDER BY topic, private, \"offset\", created_at";

const LOAD_CHECKPOINTS: &str = "DELETE FROM corecast.history_checkpoints RETURNING topic, private, epoch, last_offset";

/// Inserts messages (column arrays); also used by the cluster link, in its sequencing transaction.
pub(crate) const INSERT: &str = "INSERT INTO corecast.history \
     (topic, private, \"offset\", epoch, id, event, payload, payload_bytes, binary_frame, created_at, expires_at, user_id) \
     SELECT t, p, o, e, i, ev, pj::json, pb, bf, \
            'epoch'::timestamptz + c * interval '1 millisecond', \
            'epoch'::timestamptz + x * interval '1 millisecond', uid \
     FROM unnest($1::text[], $2::bool[], $3::int8[], $4::text[], $5::text[], $6::text[], $7::text[], \
                 $8::bytea[], $9::bool[], $10::int8[], $11::int8[], $12::text[]) AS u(t, p, o, e, i, ev, pj, pb, bf, c, x, uid) \
     ON CONFLICT DO NOTHING";

const CHECKPOINT: &str = "INSERT INTO corecast.history_checkpoints (topic, private, epoch, last_offset) \
     SELECT * FROM unnest($1::text[], $2::bool[], $3::text[], $4::int8[]) \
     ON CONFLICT (topic, private) DO UPDATE SET epoch = excluded.epoch, last_offset = excluded.last_offset";

/// Deletes expired and too old messages, then all but the newest `$2` per topic, for the
/// topics listed (`$3`, `$4`) or for all (`$3` NULL).
const TRIM: &str = "WITH scope AS (SELECT * FROM unnest($3::text[], $4::bool[]) AS s(topic, private)), \
     gone AS (DELETE FROM corecast.history h WHERE ($3::text[] IS NULL OR (h.topic, h.private) IN (SELECT * FROM scope)) \
              AND (h.expires_at <= now() OR h.created_at < now() - $1::int8 * interval '1 millisecond')) \
     DELETE FROM corecast.history h USING ( \
         SELECT topic, private, \"offset\", epoch, \
                row_number() OVER (PARTITION BY topic, private ORDER BY \"offset\" DESC, created_at DESC) AS n \
         FROM corecast.history WHERE $3::text[] IS NULL OR (topic, private) IN (SELECT * FROM scope)) r \
     WHERE r.n > $2::int8 AND (h.topic, h.private, h.\"offset\", h.epoch) = (r.topic, r.private, r.\"offset\", r.epoch)";

/// Runs `ddl` (idempotent `CREATE … IF NOT EXISTS` statements for corecast's own tables) in the
/// schema `corecast`, in one transaction under an advisory lock: nodes starting at once would
/// otherwise race on `CREATE SCHEMA IF NOT EXISTS` (a unique violation in the catalog). Used by
/// the history store and the cluster link.
pub(crate) async fn create_schema(client: &Client, ddl: &str) -> Result<(), tokio_postgres::Error> {
    let script = format!(
        "BEGIN; SELECT pg_advisory_xact_lock(7236451); SET LOCAL client_min_messages = warning; \
         CREATE SCHEMA IF NOT EXISTS corecast; {ddl} COMMIT;"
    );
    let result = client.batch_execute(&script).await;
    if result.is_err() {
        let _ = client.batch_execute("ROLLBACK").await;
    }
    result
}

/// Why the Postgres history store could not start.
#[derive(Debug, thiserror::Error)]
pub enum PgStoreError {
    #[error("cannot reach the database for history within {after:?} (history is loaded from it before serving; --history-store log keeps it on local disk instead): {}", why(error))]
    Unreachable { after: Duration, error: tokio_postgres::Error },
    #[error("history table: {}", why(error))]
    Sql { error: tokio_postgres::Error },
    #[error("history writer thread: {0}")]
    Thread(std::io::Error),
}

impl From<tokio_postgres::Error> for PgStoreError {
    fn from(error: tokio_postgres::Error) -> Self {
        PgStoreError::Sql { error }
    }
}

fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread().enable_all().build()
}

async fn connect(pg: &tokio_postgres::Config) -> Result<Client, tokio_postgres::Error> {
    let (client, connection) = pg.connect(NoTls).await?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %why(&e), "history: database connection ended");
        }
    });
    Ok(client)
}

/// Creates the schema when missing and reads the stored history (consuming the clean-shutdown
/// checkpoints). Retries an unreachable database for `patience`.
pub fn recover(pg: &tokio_postgres::Config, patience: Duration) -> Result<Recovered, PgStoreError> {
    runtime().map_err(PgStoreError::Thread)?.block_on(async {
        let started = Instant::now();
        let mut backoff = Backoff::default();
        let mut client = loop {
            match connect(pg).await {
                Ok(c) => break c,
                Err(e) if started.elapsed() < patience => {
                    tracing::warn!(error = %why(&e), "history: database unavailable; retrying");
                    tokio::time::sleep(backoff.next_delay()).await;
                }
                Err(e) => return Err(PgStoreError::Unreachable { after: patience, error: e }),
            }
        };
        create_schema(&client, SCHEMA).await?;
        let tx = client.transaction().await?;
        let rows = tx.query(LOAD, &[]).await?;
        let checkpoints = tx.query(LOAD_CHECKPOINTS, &[]).await?;
        tx.commit().await?;
        let mut rec = Recovered::default();
        for r in rows {
            let (name, private): (String, bool) = (r.get(0), r.get(1));
            let Ok(topic) = Topic::new(&name, private) else {
                tracing::warn!(topic = %name, "history: skipping stored messages of an invalid topic name");
                continue;
            };
            let payload = match (r.get::<_, Option<String>>(6), r.get::<_, Option<Vec<u8>>>(7)) {
                (Some(json), _) => Payload::Json(Bytes::from(json)),
                (None, Some(bytes)) => Payload::Binary(Bytes::from(bytes)),
                (None, None) => Payload::Json(Bytes::from_static(b"null")),
            };
            let msg = StoredMsg {
                offset: r.get::<_, i64>(2) as u64,
                epoch: Arc::from(r.get::<_, &str>(3)),
                id: Arc::from(r.get::<_, &str>(4)),
                event: Arc::from(r.get::<_, &str>(5)),
                payload,
                binary_frame: r.get(8),
                created_ms: r.get::<_, i64>(9).max(0) as u64,
                expires_ms: r.get::<_, Option<i64>>(10).map(|x| x.max(0) as u64),
                user_id: r.get::<_, Option<&str>>(11).map(Arc::from),
            };
            rec.records += 1;
            log::apply(&mut rec.topics, Record::Message { topic, msg });
        }
        // A checkpoint says the previous run ended cleanly after everything it stored.
        for r in checkpoints {
            let (name, private): (String, bool) = (r.get(0), r.get(1));
            let Ok(topic) = Topic::new(&name, private) else { continue };
            rec.records += 1;
            let last_offset = r.get::<_, i64>(3) as u64;
            log::apply(
                &mut rec.topics,
                Record::Checkpoint { topic, epoch: Arc::from(r.get::<_, &str>(2)), last_offset },
            );
        }
        Ok(rec)
    })
}

/// A batch of encoded [`log`] records from one shard; `upto` is the shard's log position at
/// its end.
#[derive(Debug)]
pub struct WriteBatch {
    pub shard: usize,
    pub upto: u64,
    pub records: Vec<u8>,
}

/// Where shards send their batches (cheap to clone, `Send`).
#[derive(Debug, Clone)]
pub struct PgHistory {
    tx: flume::Sender<WriteBatch>,
}

impl PgHistory {
    /// Queues a batch for the writer.
    pub fn send(&self, batch: WriteBatch) {
        let _ = self.tx.send(batch);
    }
}

/// Starts the writer thread (pinned to `cpu` when given).
pub fn start_writer(
    pg: tokio_postgres::Config,
    inboxes: Vec<flume::Sender<ShardMsg>>,
    limits: HistoryLimits,
    cpu: Option<usize>,
    trim_all: bool,
) -> Result<PgHistory, PgStoreError> {
    let (tx, rx) = flume::unbounded();
    std::thread::Builder::new()
        .name("history-pg".into())
        .spawn(move || {
            if let Some(cpu) = cpu {
                core_affinity::set_for_current(core_affinity::CoreId { id: cpu });
            }
            match runtime() {
                Ok(rt) => rt.block_on(Writer { pg, inboxes, limits, conn: None, trim_all }.run(rx)),
                Err(e) => tracing::error!(error = %e, "history: cannot start the writer runtime"),
            }
        })
        .map_err(PgStoreError::Thread)?;
    Ok(PgHistory { tx })
}

/// A connection with its prepared statements.
struct Conn {
    client: Client,
    insert: Statement,
    checkpoint: Statement,
    trim: Statement,
}

/// Whether `e` is the database refusing the data (data exceptions, integrity violations,
/// program limits), which retrying cannot fix; anything else (a lost connection, a database
/// starting or shutting down) is worth retrying.
fn refuses_data(e: &tokio_postgres::Error) -> bool {
    e.as_db_error().is_some_and(|d| matches!(&d.code().code()[..2], "22" | "23" | "54"))
}

/// Column arrays for one transaction.
#[derive(Default)]
pub(crate) struct Rows {
    topic: Vec<String>,
    private: Vec<bool>,
    offset: Vec<i64>,
    epoch: Vec<String>,
    id: Vec<String>,
    event: Vec<String>,
    json: Vec<Option<String>>,
    bytes: Vec<Option<Vec<u8>>>,
    binary_frame: Vec<bool>,
    created: Vec<i64>,
    expires: Vec<Option<i64>>,
    user_id: Vec<Option<String>>,
    cp_topic: Vec<String>,
    cp_private: Vec<bool>,
    cp_epoch: Vec<String>,
    cp_offset: Vec<i64>,
}

impl Rows {
    /// Adds a message of `topic`.
    pub(crate) fn push_msg(&mut self, topic: &Topic, msg: &StoredMsg) {
        self.add(Record::Message { topic: topic.clone(), msg: msg.clone() });
    }

    /// Whether no message was added.
    pub(crate) fn is_empty(&self) -> bool {
        self.topic.is_empty()
    }

    /// Inserts the messages with `insert` (a prepared [`INSERT`]).
    pub(crate) async fn execute(&self, client: &Client, insert: &Statement) -> Result<u64, tokio_postgres::Error> {
        client
            .execute(
                insert,
                &[
                    &self.topic,
                    &self.private,
                    &self.offset,
                    &self.epoch,
                    &self.id,
                    &self.event,
                    &self.json,
                    &self.bytes,
                    &self.binary_frame,
                    &self.created,
                    &self.expires,
                    &self.user_id,
                ],
            )
            .await
    }

    /// Records (messages and checkpoints).
    fn len(&self) -> usize {
        self.topic.len() + self.cp_topic.len()
    }

    /// Record `i` (messages first, then checkpoints) alone.
    fn single(&self, i: usize) -> Rows {
        let mut one = Rows::default();
        if i < self.topic.len() {
            one.topic.push(self.topic[i].clone());
            one.private.push(self.private[i]);
            one.offset.push(self.offset[i]);
            one.epoch.push(self.epoch[i].clone());
            one.id.push(self.id[i].clone());
            one.event.push(self.event[i].clone());
            one.json.push(self.json[i].clone());
            one.bytes.push(self.bytes[i].clone());
            one.binary_frame.push(self.binary_frame[i]);
            one.created.push(self.created[i]);
            one.expires.push(self.expires[i]);
            one.user_id.push(self.user_id[i].clone());
        } else {
            let j = i - self.topic.len();
            one.cp_topic.push(self.cp_topic[j].clone());
            one.cp_private.push(self.cp_private[j]);
            one.cp_epoch.push(self.cp_epoch[j].clone());
            one.cp_offset.push(self.cp_offset[j]);
        }
        one
    }

    /// Record `i` for a log line.
    fn describe(&self, i: usize) -> String {
        if i < self.topic.len() {
            format!(
                "message {:?} (private: {}) offset {} event {:?}",
                self.topic[i], self.private[i], self.offset[i], self.event[i]
            )
        } else {
            let j = i - self.topic.len();
            format!("checkpoint {:?} (private: {})", self.cp_topic[j], self.cp_private[j])
        }
    }

    fn add(&mut self, rec: Record) {
        match rec {
            Record::Message { topic, msg } => {
                self.topic.push(topic.name().to_owned());
                self.private.push(topic.is_private());
                self.offset.push(msg.offset as i64);
                self.epoch.push(msg.epoch.to_string());
                self.id.push(msg.id.to_string());
                self.event.push(msg.event.to_string());
                match msg.payload {
                    Payload::Json(b) => {
                        self.json.push(Some(String::from_utf8_lossy(&b).into_owned()));
                        self.bytes.push(None);
                    }
                    Payload::Binary(b) => {
                        self.json.push(None);
                        self.bytes.push(Some(b.to_vec()));
                    }
                }
                self.binary_frame.push(msg.binary_frame);
                self.created.push(msg.created_ms as i64);
                self.expires.push(msg.expires_ms.map(|x| x as i64));
                self.user_id.push(msg.user_id.as_deref().map(String::from));
            }
            Record::Checkpoint { topic, epoch, last_offset } => {
                self.cp_topic.push(topic.name().to_owned());
                self.cp_private.push(topic.is_private());
                self.cp_epoch.push(epoch.to_string());
                self.cp_offset.push(last_offset as i64);
            }
        }
    }
}

struct Writer {
    pg: tokio_postgres::Config,
    inboxes: Vec<flume::Sender<ShardMsg>>,
    limits: HistoryLimits,
    conn: Option<Conn>,
    /// Trim every topic each time, not only those this node wrote (cluster mode: the cluster
    /// link writes the messages, in its own transactions).
    trim_all: bool,
}

impl Writer {
    async fn run(mut self, rx: flume::Receiver<WriteBatch>) {
        let mut touched: HashSet<(String, bool)> = HashSet::new();
        let mut trimmed_all = false;
        let mut last_trim = Instant::now();
        loop {
            // Trim everything at start (until it succeeds), then the topics written since.
            if !trimmed_all || last_trim.elapsed() >= TRIM_INTERVAL {
                let scope = if trimmed_all && !self.trim_all { Some(std::mem::take(&mut touched)) } else { None };
                if scope.as_ref().is_none_or(|s| !s.is_empty()) && self.trim(scope).await {
                    trimmed_all = true;
                }
                last_trim = Instant::now();
            }
            let wait = if trimmed_all { TRIM_INTERVAL.saturating_sub(last_trim.elapsed()) } else { TRIM_RETRY };
            let first = match tokio::time::timeout(wait, rx.recv_async()).await {
                Ok(Ok(b)) => Some(b),
                Ok(Err(_)) => return, // every shard is gone
                Err(_) => None,
            };
            let mut batches: Vec<WriteBatch> = first.into_iter().collect();
            batches.extend(rx.try_iter());
            if !batches.is_empty() {
                let mut rows = Rows::default();
                for b in &batches {
                    let mut pos = 0;
                    while let Ok(Some((rec, used))) = log::decode(&b.records[pos..]) {
                        pos += used;
                        rows.add(rec);
                    }
                }
                self.commit(&rows).await;
                let mut upto: HashMap<usize, u64> = HashMap::new();
                for b in &batches {
                    let u = upto.entry(b.shard).or_default();
                    *u = (*u).max(b.upto);
                }
                for (shard, upto) in upto {
                    if let Some(inbox) = self.inboxes.get(shard) {
                        let _ = inbox.send_async(ShardMsg::HistorySynced { upto }).await;
                    }
                }
                touched.extend(rows.topic.into_iter().zip(rows.private));
            }
        }
    }

    /// The connection, (re)connecting when needed.
    async fn conn(&mut self) -> Result<&Conn, tokio_postgres::Error> {
        if self.conn.as_ref().is_some_and(|c| c.client.is_closed()) {
            self.conn = None;
        }
        if self.conn.is_none() {
            let client = connect(&self.pg).await?;
            let insert = client.prepare(INSERT).await?;
            let checkpoint = client.prepare(CHECKPOINT).await?;
            let trim = client.prepare(TRIM).await?;
            self.conn = Some(Conn { client, insert, checkpoint, trim });
        }
        Ok(self.conn.as_ref().expect("connected above"))
    }

    /// Writes `rows` in one transaction. If the database refuses the data (say, a NUL
    /// character in an event name), the records are written one by one and those refused are
    /// logged and skipped: one bad record must not hold back every acknowledgement.
    async fn commit(&mut self, rows: &Rows) {
        let Err(e) = self.commit_retrying(rows).await else { return };
        if rows.len() == 1 {
            tracing::error!(error = %why(&e), record = %rows.describe(0), "history: the database refused this record; it is not persisted");
            return;
        }
        tracing::warn!(error = %why(&e), "history: the database refused a batch; writing its records one by one");
        for i in 0..rows.len() {
            let one = rows.single(i);
            if let Err(e) = self.commit_retrying(&one).await {
                tracing::error!(error = %why(&e), record = %rows.describe(i), "history: the database refused this record; it is not persisted");
            }
        }
    }

    /// Writes `rows` in one transaction, retrying connection failures and transient errors
    /// until it commits; returns the database's refusal of the data itself.
    async fn commit_retrying(&mut self, rows: &Rows) -> Result<(), tokio_postgres::Error> {
        let mut backoff = Backoff::default();
        let mut failed = false;
        loop {
            match self.try_commit(rows).await {
                Ok(()) => {
                    if failed {
                        tracing::info!("history: database writes work again");
                    }
                    return Ok(());
                }
                Err(e) if refuses_data(&e) => return Err(e),
                Err(e) => {
                    if !failed {
                        tracing::warn!(error = %why(&e), "history: cannot write to the database; retrying (persisted messages are acknowledged once written)");
                        failed = true;
                    }
                    self.conn = None;
                    tokio::time::sleep(backoff.next_delay()).await;
                }
            }
        }
    }

    async fn try_commit(&mut self, rows: &Rows) -> Result<(), tokio_postgres::Error> {
        let conn = self.conn().await?;
        let (client, insert, checkpoint) = (&conn.client, conn.insert.clone(), conn.checkpoint.clone());
        client.batch_execute("BEGIN").await?;
        let result = async {
            if !rows.topic.is_empty() {
                rows.execute(client, &insert).await?;
            }
            if !rows.cp_topic.is_empty() {
                client
                    .execute(&checkpoint, &[&rows.cp_topic, &rows.cp_private, &rows.cp_epoch, &rows.cp_offset])
                    .await?;
            }
            client.batch_execute("COMMIT").await
        }
        .await;
        if result.is_err() {
            let _ = client.batch_execute("ROLLBACK").await;
        }
        result
    }

    /// Deletes what is over the bounds, for `scope` (or every topic); true when it ran.
    async fn trim(&mut self, scope: Option<HashSet<(String, bool)>>) -> bool {
        let max_age = self.limits.durable_age_ms as i64;
        let keep = self.limits.durable_messages as i64;
        let (topics, private): (Option<Vec<String>>, Option<Vec<bool>>) = match scope {
            Some(s) => {
                let (t, p) = s.into_iter().unzip();
                (Some(t), Some(p))
            }
            None => (None, None),
        };
        let result = async {
            let conn = self.conn().await?;
            conn.client.execute(&conn.trim, &[&max_age, &keep, &topics, &private]).await
        }
        .await;
        match result {
            Ok(n) => {
                if n > 0 {
                    tracing::debug!(deleted = n, "history: trimmed");
                }
                true
            }
            Err(e) => {
                tracing::warn!(error = %why(&e), "history: trimming failed; will try again");
                self.conn = None;
                false
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(offset: u64, payload: Payload) -> StoredMsg {
        StoredMsg {
            offset,
            epoch: Arc::from("ep"),
            id: Arc::from(format!("id{offset}").as_str()),
            event: Arc::from("e"),
            payload,
            binary_frame: false,
            created_ms: 1_700_000_000_000 + offset,
            expires_ms: (offset == 2).then_some(1_800_000_000_000),
            user_id: (offset == 1).then(|| Arc::from("u-1")),
        }
    }

    #[test]
    fn log_records_become_column_arrays() {
        let t = Topic::new("room", true).unwrap();
        let mut buf = Vec::new();
        for rec in [
            Record::Message { topic: t.clone(), msg: msg(1, Payload::Json(Bytes::from_static(b"{\"a\":1}"))) },
            Record::Message { topic: t.clone(), msg: msg(2, Payload::Binary(Bytes::from_static(&[0, 255]))) },
            Record::Checkpoint { topic: t, epoch: Arc::from("ep"), last_offset: 9 },
        ] {
            log::encode(&rec, &mut buf);
        }
        let mut rows = Rows::default();
        let mut pos = 0;
        while let Ok(Some((rec, used))) = log::decode(&buf[pos..]) {
            pos += used;
            rows.add(rec);
        }
        assert_eq!(rows.len(), 3);
        assert_eq!(rows.json, vec![Some("{\"a\":1}".to_string()), None]);
        assert_eq!(rows.bytes, vec![None, Some(vec![0, 255])]);
        assert_eq!(rows.expires, vec![None, Some(1_800_000_000_000)]);
        assert_eq!(rows.user_id, vec![Some("u-1".to_string()), None]);
        assert_eq!((rows.private.clone(), rows.offset.clone()), (vec![true, true], vec![1, 2]));
        let one = rows.single(1);
        assert_eq!((one.len(), one.offset.clone(), one.id.clone()), (1, vec![2], vec!["id2".to_string()]));
        let cp = rows.single(2);
        assert_eq!((cp.len(), cp.cp_offset.clone(), cp.topic.len()), (1, vec![9], 0));
        assert!(rows.describe(0).contains("offset 1") && rows.describe(2).starts_with("checkpoint"));
    }
}
