//! Cluster mode: how broadcasts, presence and history cross nodes (`--cluster postgres` or
//! `--cluster nats://…`).
//! Cluster traffic enters and leaves a node here and nowhere else; shards only see
//! [`ClusterOut`] (what they hand to the cluster) and [`crate::bus::ShardMsg::Remote`] and
//! friends (what the cluster hands them), never the engine behind it.
//!
//! The design (argued with measurements in the README, "Cluster mode"):
//! - **The engine sequences.** A node does not sequence its own publishes. Its owner shard
//!   hands each one to the link ([`ClusterOut::Publish`]); the link batches what arrived and
//!   commits it in one transaction that takes the topics' next offsets from one row per topic
//!   (`corecast.topics`, locked for the transaction, so per topic commit order is offset order),
//!   inserts the persisted ones into `corecast.history`, and writes the batch into the WAL
//!   (`pg_logical_emit_message`, transactional). The publisher's `ack` / `202` go out after the
//!   commit: sequenced, and persisted ones durable.
//! - **Every node, the publisher included, delivers from the engine's stream**: the batch
//!   arrives on each node's own replication slot (the stream Postgres changes already come
//!   from) and each message goes to its topic's owner shard with its offset and epoch, which
//!   are the same on every node. So all nodes agree on one order per topic, and a client can
//!   resume on any node. A node that missed messages (started later, restarted) sees the gap
//!   in the offsets and never pretends to have them: resume from before it is refused
//!   explicitly unless the messages are in the shared history.
//! - **Presence** changes of local members travel the same way; each node keeps the full
//!   state of every topic (its own members and everyone else's, keyed by the other node's run).
//!   Membership is a lease: every node renews its row in `corecast.nodes` every
//!   [`HEARTBEAT`]; one that has not for [`LEASE`] is gone, and every node drops its members.
//!   When a node (re)appears, every node announces its own members again, so the newcomer
//!   (or a node that was cut off) converges. A restarted node has a new run: the old run's
//!   members leave, nothing comes back as a ghost.
//!
//! The description above is the Postgres backend's; the NATS backend ([`nats`]) has the same
//! shape with JetStream in the database's place: a per-topic compare-and-set publish instead
//! of the row lock, the stream instead of the WAL and `corecast.history`, core-NATS
//! heartbeats instead of `corecast.nodes`.
//!
//! Modules: [`wire`] (the batch format, pure), [`postgres`] (the Postgres backend: schema,
//! sequencing transaction, heartbeats, membership, clean-up of dead nodes' slots), [`nats`]
//! (the NATS backend: stream, compare-and-set sequencing, consumer, presence and leases).

pub mod nats;
pub mod postgres;
pub mod wire;

use std::rc::Rc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;

use crate::bus::{Origin, ShardMsg};
use crate::channel::registry::ConnId;
use crate::protocol::phoenix::session::Publish;
use crate::protocol::phoenix::Topic;

/// How often a node renews its lease.
pub const HEARTBEAT: Duration = Duration::from_secs(1);

/// A node that has not renewed its lease for this long is gone: its presence members leave on
/// every node.
pub const LEASE: Duration = Duration::from_secs(6);

/// Most items the link commits in one transaction.
pub const MAX_BATCH: usize = 4096;

/// The cluster mode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mode {
    /// One node, everything in process.
    None,
    /// Nodes sharing `--database-url`.
    Postgres,
    /// Nodes sharing a NATS server (JetStream enabled): its URLs.
    Nats(Vec<String>),
}

impl Mode {
    /// The name shown in `/health` and `/metrics`.
    pub fn name(&self) -> &'static str {
        match self {
            Mode::None => "none",
            Mode::Postgres => "postgres",
            Mode::Nats(_) => "nats",
        }
    }
}

/// Parses `--cluster`.
pub fn parse_mode(s: &str) -> Result<Mode, String> {
    match s.trim() {
        "" | "none" => Ok(Mode::None),
        "postgres" => Ok(Mode::Postgres),
        s if s.starts_with("nats://") => nats::parse_urls(s).map(Mode::Nats),
        s => Err(format!("--cluster {s:?}: expected none, postgres or nats://HOST:PORT")),
    }
}

/// The replication slot of node `node` in cluster mode: each node reads its own stream.
/// Slot names allow `a-z 0-9 _` and 63 bytes.
pub fn slot_name(base: &str, node: &str) -> String {
    let mut s: String = format!("{base}_{node}")
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_lowercase() } else { '_' })
        .collect();
    if s.len() > 63 {
        let h = crate::protocol::phoenix::topic::stable_hash(s.as_bytes(), false);
        s.truncate(46);
        s.push_str(&format!("_{h:016x}"));
    }
    s
}

/// What a shard hands to the cluster.
#[derive(Debug)]
pub enum ClusterOut {
    /// Sequence this message; then tell `ack_to` ([`ShardMsg::Sequenced`]).
    Publish { publish: Box<Publish>, origin: Option<Origin>, ack_to: Option<(usize, ConnId)> },
    /// A local member tracked (or updated) its presence.
    Track { topic: Topic, member: wire::Member, key: Arc<str>, meta: Bytes },
    /// A local member stopped tracking.
    Untrack { topic: Topic, member: wire::Member },
}

/// A shard's way to the cluster link (cheap to clone, `Send`).
#[derive(Debug, Clone)]
pub struct ClusterHandle {
    tx: flume::Sender<ClusterOut>,
    /// This process's run id (presence members are keyed by it on every node).
    pub run: u64,
    pub mode: Mode,
    members: Arc<Mutex<Vec<String>>>,
    leave: flume::Sender<std::sync::mpsc::Sender<()>>,
}

impl ClusterHandle {
    /// Hands `out` to the link.
    pub fn send(&self, out: ClusterOut) {
        let _ = self.tx.send(out);
    }

    /// Ends this node's lease now (clean shutdown), waiting up to `patience`.
    pub fn leave(&self, patience: Duration) {
        let (tx, rx) = std::sync::mpsc::channel();
        if self.leave.send(tx).is_ok() {
            let _ = rx.recv_timeout(patience);
        }
    }

    /// Node ids of the live members, this node included, sorted.
    pub fn members(&self) -> Vec<String> {
        self.members.lock().map(|m| m.clone()).unwrap_or_default()
    }
}

/// What arrives from the engine: decodes batches and hands each item to its topic's owner
/// shard. Used by the thread that reads the stream (for Postgres, the ingest thread).
#[derive(Debug, Clone)]
pub struct Inbound {
    shards: Vec<flume::Sender<ShardMsg>>,
    run: u64,
    /// Messages committed before this WAL position were sequenced before this process started:
    /// they fill the recent window (for resume) but are not delivered live.
    pub live_from: u64,
}

impl Inbound {
    /// Hands the items of one batch (committed at `commit_lsn`) to the owner shards.
    pub async fn deliver(&self, content: &Bytes, commit_lsn: u64) {
        let batch = match wire::decode(content) {
            Ok(b) => b,
            Err(e) => {
                tracing::error!(error = %e, bytes = content.len(), "cluster: dropping a batch that does not decode");
                return;
            }
        };
        let n = self.shards.len();
        let own = batch.run == self.run;
        let live = commit_lsn >= self.live_from;
        if let (true, Some(wire::Item::Publish(m))) = (live, batch.items.first()) {
            let lag = unix_ms().saturating_sub(m.created_ms);
            // At most one line per 10 s: a stall delays every batch behind it.
            static LAST_WARN_MS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
            let now = unix_ms();
            if lag >= SLOW_DELIVERY_MS && now >= LAST_WARN_MS.load(std::sync::atomic::Ordering::Relaxed) + 10_000 {
                LAST_WARN_MS.store(now, std::sync::atomic::Ordering::Relaxed);
                tracing::warn!(lag_ms = lag, "cluster: a batch reached this node's stream late (sequenced → decoded)");
            }
        }
        // One message per owner shard for the broadcasts of this batch (in order), sent before
        // the presence changes that came after them.
        let mut remote: Vec<Vec<(Box<wire::Sequenced>, Option<Origin>)>> = (0..n).map(|_| Vec::new()).collect();
        for item in batch.items {
            let (topic, msg) = match item {
                wire::Item::Publish(m) => {
                    let exclude = m.exclude.filter(|_| own).map(|s| Origin {
                        shard: s.shard as usize,
                        conn: ConnId { index: s.index, generation: s.generation },
                    });
                    remote[m.topic.owner(n)].push((m, exclude));
                    continue;
                }
                // A node's own presence changes are already applied on it. Changes from before
                // this process started are history (a previous run's members, say): the live
                // state comes from the members every node announces when this one joins.
                wire::Item::Track { .. } | wire::Item::Untrack { .. } if own || !live => continue,
                wire::Item::Track { topic, member, key, meta } => {
                    (topic.clone(), ShardMsg::RemoteTrack { topic, run: batch.run, member, key, meta: Some(meta) })
                }
                wire::Item::Untrack { topic, member } => (
                    topic.clone(),
                    ShardMsg::RemoteTrack { topic, run: batch.run, member, key: Arc::from(""), meta: None },
                ),
            };
            let owner = topic.owner(n);
            if !remote[owner].is_empty() {
                let msgs = std::mem::take(&mut remote[owner]);
                if self.shards[owner].send_async(ShardMsg::Remote { msgs, live }).await.is_err() {
                    return;
                }
            }
            if self.shards[owner].send_async(msg).await.is_err() {
                return;
            }
        }
        for (owner, msgs) in remote.into_iter().enumerate().filter(|(_, m)| !m.is_empty()) {
            if self.shards[owner].send_async(ShardMsg::Remote { msgs, live }).await.is_err() {
                return;
            }
        }
    }
}

/// Membership as the link sees it: who joined and who left since the last look.
#[derive(Debug, Default)]
pub struct Membership {
    live: Vec<(String, u64)>,
}

impl Membership {
    /// Applies a fresh list of live `(node, run)`; returns the runs gone and the runs new.
    pub fn update(&mut self, mut now: Vec<(String, u64)>) -> (Vec<u64>, Vec<u64>) {
        now.sort();
        now.dedup();
        let gone = self.live.iter().filter(|m| !now.contains(m)).map(|m| m.1).collect();
        let joined = now.iter().filter(|m| !self.live.contains(m)).map(|m| m.1).collect();
        self.live = now;
        (gone, joined)
    }

    /// The live node ids.
    pub fn nodes(&self) -> Vec<String> {
        let mut v: Vec<String> = self.live.iter().map(|m| m.0.clone()).collect();
        v.dedup();
        v
    }
}

/// Why the cluster link could not do something (the engine's own words).
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct LinkError {
    pub message: String,
    /// The engine refused the data itself (retrying the same cannot succeed), as opposed to
    /// being unreachable or busy.
    pub refused: bool,
}

impl LinkError {
    /// A failure worth retrying.
    pub fn transient(message: impl Into<String>) -> Self {
        Self { message: message.into(), refused: false }
    }
}

/// What a lease renewal found out.
#[derive(Debug, Default)]
pub struct Beat {
    /// The live `(node, run)`s, this one included.
    pub live: Vec<(String, u64)>,
    /// Runs that may have missed presence changes (they, or this node, lost the engine for a
    /// moment without their lease lapsing): every node announces its members again.
    pub resync: Vec<u64>,
}

/// An item of the batch being committed.
#[derive(Debug)]
pub enum Pending {
    /// A broadcast: its epoch and offset are filled in by [`Backend::commit`].
    Publish {
        msg: Box<wire::Sequenced>,
        ack_to: Option<(usize, ConnId)>,
        ack: Option<Bytes>,
        /// Already committed by an earlier, partly failed [`Backend::commit`] of this batch
        /// (a backend that commits a batch in parts sets it; the retry skips it).
        done: bool,
    },
    /// A presence change of a local member.
    Presence(wire::Item),
}

/// What a cluster engine provides; [`run_link`] drives it. Postgres: [`postgres::Postgres`].
#[allow(async_fn_in_trait)]
pub trait Backend {
    /// Sequences `batch` (filling in each message's epoch and offset, the same for every
    /// node), stores its persisted messages and makes it reach every node's stream in that
    /// order. `Ok` once all of it is durable; on `Err` nothing of it was.
    async fn commit(&self, batch: &mut [Pending]) -> Result<(), LinkError>;
    /// Renews this node's lease; returns the live `(node, run)`s, this one included.
    async fn heartbeat(&self) -> Result<Beat, LinkError>;
    /// Whether this node's stream exists, so what others send from now on reaches it.
    async fn ready(&self) -> Result<bool, LinkError>;
    /// Ends this node's lease now (clean shutdown).
    async fn leave(&self) -> Result<(), LinkError>;
    /// Releases what nodes gone for good still hold (for Postgres, their replication slots).
    async fn clean_up(&self) -> Result<(), LinkError>;
}

/// Largest batch content (bytes) the link commits at once (messages themselves are bounded by
/// `--max-payload-bytes`).
const MAX_BATCH_BYTES: usize = 8 << 20;

/// A commit slower than this is logged (WARN): every broadcast of the node waited for it.
const SLOW_COMMIT: Duration = Duration::from_millis(100);

/// A batch decoded this long after the link built it is logged (WARN).
const SLOW_DELIVERY_MS: u64 = 200;

/// How often dead nodes' leftovers are looked for (at most; sooner with a short slot TTL).
const CLEAN_UP_EVERY: Duration = Duration::from_secs(30);

fn pending(out: ClusterOut) -> Pending {
    use crate::protocol::phoenix::session::Persist;
    match out {
        ClusterOut::Publish { mut publish, origin, ack_to } => {
            let now = unix_ms();
            let ack = publish.ack.take();
            let p = *publish;
            let msg = wire::Sequenced {
                topic: p.topic,
                epoch: Arc::from(""),
                offset: 0,
                id: p.id.unwrap_or_else(|| crate::protocol::phoenix::session::uuid_arc(crate::entropy::fast_u128())),
                event: p.event,
                payload: p.payload,
                binary_frame: p.binary_frame,
                created_ms: now,
                persisted: p.persist != Persist::No,
                expires_ms: match p.persist {
                    Persist::Ttl(s) => Some(now + s.saturating_mul(1000)),
                    _ => None,
                },
                user_id: p.user_id,
                exclude: origin.filter(|_| p.exclude_sender).map(|o| wire::Sender {
                    shard: o.shard as u32,
                    index: o.conn.index,
                    generation: o.conn.generation,
                }),
            };
            Pending::Publish { msg: Box::new(msg), ack_to, ack, done: false }
        }
        ClusterOut::Track { topic, member, key, meta } => {
            Pending::Presence(wire::Item::Track { topic, member, key, meta })
        }
        ClusterOut::Untrack { topic, member } => Pending::Presence(wire::Item::Untrack { topic, member }),
    }
}

fn size(p: &Pending) -> usize {
    match p {
        Pending::Publish { msg, .. } => {
            let n = match &msg.payload {
                crate::protocol::phoenix::session::Payload::Json(b)
                | crate::protocol::phoenix::session::Payload::Binary(b) => b.len(),
            };
            n + msg.topic.name().len() + msg.event.len() + 96
        }
        Pending::Presence(wire::Item::Track { meta, .. }) => meta.len() + 64,
        Pending::Presence(_) => 48,
    }
}

/// Unix time in milliseconds (the cluster layer does not reach into the shard layer for it).
fn unix_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// Tells every shard.
async fn broadcast(shards: &[flume::Sender<ShardMsg>], msg: impl Fn() -> ShardMsg) {
    for s in shards {
        let _ = s.send_async(msg()).await;
    }
}

/// Commits `batch`, retrying while the engine is unreachable (and telling the shards when the
/// link degrades and recovers). `Err` only when the engine refuses the data itself.
async fn commit_retrying<B: Backend>(
    b: &B,
    batch: &mut [Pending],
    link: &mut LinkState,
    shards: &[flume::Sender<ShardMsg>],
) -> Result<(), LinkError> {
    loop {
        let started = std::time::Instant::now();
        let result = b.commit(batch).await;
        let took = started.elapsed();
        if took >= SLOW_COMMIT {
            tracing::warn!(
                took_ms = took.as_millis() as u64,
                items = batch.len(),
                ok = result.is_ok(),
                "cluster: slow commit"
            );
        }
        match result {
            Ok(()) => {
                link.backoff.reset();
                if std::mem::take(&mut link.degraded) {
                    tracing::info!("cluster link restored");
                    broadcast(shards, || ShardMsg::ClusterLink {
                        up: true,
                        message: Arc::from("Cluster link restored: messages flow between nodes again"),
                    })
                    .await;
                }
                return Ok(());
            }
            Err(e) if e.refused => return Err(e),
            Err(e) => {
                let delay = link.backoff.next_delay();
                if !link.degraded {
                    link.degraded = true;
                    tracing::error!(error = %e, "cluster link degraded: cannot sequence messages; retrying");
                    let message: Arc<str> = Arc::from(
                        format!(
                            "Cluster link degraded: {e}. Broadcasts are held (and not acknowledged) until it is back; \
                             presence and history on this node still work"
                        )
                        .as_str(),
                    );
                    broadcast(shards, || ShardMsg::ClusterLink { up: false, message: message.clone() }).await;
                } else {
                    tracing::debug!(error = %e, retry_in_ms = delay.as_millis() as u64, "cluster: commit failed");
                }
                tokio::time::sleep(delay).await;
            }
        }
    }
}

/// The sequencer's view of the link.
struct LinkState {
    backoff: crate::ingest::retry::Backoff,
    degraded: bool,
}

/// The sequencing side of the link: batches what the shards hand over, commits each batch
/// (retrying while the engine is unreachable: nothing is acknowledged that is not durable),
/// then acknowledges the publishers. A batch the engine refuses (a persisted message whose
/// event name holds a NUL, which `text` cannot store) is committed item by item, and the item
/// refused alone is dropped with an ERROR log, so one bad message cannot stop the cluster; its
/// publisher is still answered (as the single-node Postgres history store does).
async fn sequencer<B: Backend>(b: Rc<B>, rx: flume::Receiver<ClusterOut>, shards: Vec<flume::Sender<ShardMsg>>) {
    let mut link = LinkState {
        backoff: crate::ingest::retry::Backoff::new(Duration::from_millis(100), Duration::from_secs(2)),
        degraded: false,
    };
    while let Ok(first) = rx.recv_async().await {
        let mut batch = vec![pending(first)];
        let mut bytes = size(&batch[0]);
        while batch.len() < MAX_BATCH && bytes < MAX_BATCH_BYTES {
            match rx.try_recv() {
                Ok(out) => {
                    let p = pending(out);
                    bytes += size(&p);
                    batch.push(p);
                }
                Err(_) => break,
            }
        }
        if let Err(e) = commit_retrying(&*b, &mut batch, &mut link, &shards).await {
            tracing::warn!(error = %e, items = batch.len(), "cluster: the database refused a batch; committing it item by item");
            for i in 0..batch.len() {
                if let Err(e) = commit_retrying(&*b, &mut batch[i..i + 1], &mut link, &shards).await {
                    tracing::error!(error = %e, item = ?describe(&batch[i]), "cluster: the database refused this item; dropped");
                }
            }
        }
        let mut acks: Vec<Vec<(ConnId, Option<Bytes>)>> = shards.iter().map(|_| Vec::new()).collect();
        for p in batch {
            if let Pending::Publish { ack_to: Some((shard, conn)), ack, .. } = p {
                if let Some(a) = acks.get_mut(shard) {
                    a.push((conn, ack));
                }
            }
        }
        for (s, a) in shards.iter().zip(acks).filter(|(_, a)| !a.is_empty()) {
            let _ = s.send_async(ShardMsg::SequencedMany(a)).await;
        }
    }
}

/// An item for a log line.
fn describe(p: &Pending) -> String {
    match p {
        Pending::Publish { msg, .. } => format!("message on {:?}, event {:?}", msg.topic.name(), msg.event),
        Pending::Presence(wire::Item::Track { topic, key, .. }) => format!("track on {:?}, key {key:?}", topic.name()),
        Pending::Presence(_) => "untrack".into(),
    }
}

/// The membership side of the link: waits for this node's stream, then renews the lease every
/// [`HEARTBEAT`], tells the shards who left and who (re)joined, keeps the member list for
/// `/health`, cleans up after dead nodes, and ends the lease on `leave`.
async fn membership<B: Backend>(
    b: Rc<B>,
    shards: Vec<flume::Sender<ShardMsg>>,
    members: Arc<Mutex<Vec<String>>>,
    run: u64,
    leave: flume::Receiver<std::sync::mpsc::Sender<()>>,
    clean_every: Duration,
) {
    loop {
        match b.ready().await {
            Ok(true) => break,
            Ok(false) => {}
            Err(e) => tracing::warn!(error = %e, "cluster: cannot check this node's replication slot yet"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut m = Membership::default();
    let mut failing = false;
    let mut last_clean = std::time::Instant::now();
    loop {
        match b.heartbeat().await {
            Ok(Beat { live, resync }) => {
                let (gone, mut joined) = m.update(live);
                for r in resync {
                    if !joined.contains(&r) {
                        joined.push(r);
                    }
                }
                if std::mem::take(&mut failing) && !joined.contains(&run) {
                    // Others may have dropped this node's members meanwhile: announce them again.
                    joined.push(run);
                }
                if !gone.is_empty() || !joined.is_empty() {
                    tracing::info!(members = ?m.nodes(), gone = gone.len(), joined = joined.len(), "cluster membership changed");
                    let (gone, joined): (Arc<[u64]>, Arc<[u64]>) = (gone.into(), joined.into());
                    broadcast(&shards, || ShardMsg::Members { gone: gone.clone(), joined: joined.clone() }).await;
                }
                if let Ok(mut l) = members.lock() {
                    *l = m.nodes();
                }
            }
            Err(e) => {
                if !failing {
                    tracing::error!(error = %e, "cluster: cannot renew this node's lease; retrying");
                }
                failing = true;
            }
        }
        if last_clean.elapsed() >= clean_every {
            last_clean = std::time::Instant::now();
            if let Err(e) = b.clean_up().await {
                tracing::warn!(error = %e, "cluster: clean-up of dead nodes failed");
            }
        }
        let left = futures_lite::future::or(async { leave.recv_async().await.ok() }, async {
            tokio::time::sleep(HEARTBEAT).await;
            None
        })
        .await;
        if let Some(done) = left {
            if let Err(e) = b.leave().await {
                tracing::warn!(error = %e, "cluster: cannot end this node's lease; the others wait for it to lapse");
            }
            let _ = done.send(());
            return;
        }
    }
}

/// Runs the link over backend `b` until every shard is gone.
async fn run_link<B: Backend + 'static>(
    b: B,
    rx: flume::Receiver<ClusterOut>,
    shards: Vec<flume::Sender<ShardMsg>>,
    members: Arc<Mutex<Vec<String>>>,
    run: u64,
    leave: flume::Receiver<std::sync::mpsc::Sender<()>>,
    clean_every: Duration,
) {
    let b = Rc::new(b);
    tokio::task::spawn_local(membership(b.clone(), shards.clone(), members, run, leave, clean_every));
    sequencer(b, rx, shards).await;
}

/// Runs the link on its own thread ("cluster", pinned to `cpu` when given) in a
/// current-thread tokio runtime: `body` gets `ready` back and must answer it (`Ok` once the
/// backend is prepared, `Err` with why not); a runtime that cannot start answers it here.
fn spawn_link_thread<T, F, Fut>(
    cpu: Option<usize>,
    ready: std::sync::mpsc::Sender<Result<T, String>>,
    body: F,
) -> Result<(), String>
where
    T: Send + 'static,
    F: FnOnce(std::sync::mpsc::Sender<Result<T, String>>) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + 'static,
{
    std::thread::Builder::new()
        .name("cluster".into())
        .spawn(move || {
            if let Some(cpu) = cpu {
                core_affinity::set_for_current(core_affinity::CoreId { id: cpu });
            }
            let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = ready.send(Err(format!("cannot start the cluster runtime: {e}")));
                    return;
                }
            };
            tokio::task::LocalSet::new().block_on(&rt, body(ready));
        })
        .map(|_| ())
        .map_err(|e| format!("cannot start the cluster thread: {e}"))
}

/// Starts cluster mode `--cluster postgres` for node `node`: prepares the schema (retrying an
/// unreachable database for a while), then runs the link on its own thread. Returns the
/// shards' handle and what the stream reader hands batches to.
pub fn start_postgres(
    pg: tokio_postgres::Config,
    node: String,
    slot: String,
    shards: Vec<flume::Sender<ShardMsg>>,
    cpu: Option<usize>,
    slot_ttl: Duration,
) -> Result<(ClusterHandle, Inbound), String> {
    let run = crate::entropy::u64().max(1);
    let (tx, rx) = flume::unbounded();
    let (leave_tx, leave_rx) = flume::bounded(1);
    let members = Arc::new(Mutex::new(vec![node.clone()]));
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let (inboxes, m2) = (shards.clone(), members.clone());
    spawn_link_thread(cpu, ready_tx, move |ready_tx| async move {
        let b = postgres::Postgres::new(pg, node, run, slot, slot_ttl);
        let started = std::time::Instant::now();
        let mut backoff = crate::ingest::retry::Backoff::default();
        let live_from = loop {
            match b.prepare().await {
                Ok(lsn) => break lsn,
                Err(e) if started.elapsed() < postgres::CONNECT_PATIENCE => {
                    tracing::warn!(error = %e, "cluster: database unavailable; retrying");
                    tokio::time::sleep(backoff.next_delay()).await;
                }
                Err(e) => {
                    let _ = ready_tx
                        .send(Err(format!("cannot reach the database within {:?}: {e}", postgres::CONNECT_PATIENCE)));
                    return;
                }
            }
        };
        let _ = ready_tx.send(Ok(live_from));
        run_link(b, rx, inboxes, m2, run, leave_rx, CLEAN_UP_EVERY.min(slot_ttl / 2)).await;
    })?;
    let live_from = ready_rx.recv().map_err(|_| "the cluster thread stopped".to_string())??;
    let handle = ClusterHandle { tx, run, mode: Mode::Postgres, members, leave: leave_tx };
    Ok((handle, Inbound { shards, run, live_from }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slot_names_are_valid_and_distinct() {
        assert_eq!(slot_name("corecast", "cc-0123abcd"), "corecast_cc_0123abcd");
        assert_eq!(slot_name("corecast", "Node.A"), "corecast_node_a");
        let long = slot_name("corecast", &"x".repeat(64));
        assert!(long.len() <= 63, "{long}");
        assert_ne!(long, slot_name("corecast", &format!("{}y", "x".repeat(63))));
    }

    #[test]
    fn modes_parse() {
        assert_eq!(parse_mode("none"), Ok(Mode::None));
        assert_eq!(parse_mode("postgres"), Ok(Mode::Postgres));
        assert_eq!(parse_mode("nats://127.0.0.1:4222"), Ok(Mode::Nats(vec!["nats://127.0.0.1:4222".into()])));
        assert_eq!(parse_mode("nats://a:1,nats://b:2"), Ok(Mode::Nats(vec!["nats://a:1".into(), "nats://b:2".into()])));
        assert!(parse_mode("redis").is_err());
    }

    #[test]
    fn membership_reports_departures_and_arrivals_by_run() {
        let mut m = Membership::default();
        assert_eq!(m.update(vec![("a".into(), 1), ("b".into(), 2)]), (vec![], vec![1, 2]));
        assert_eq!(m.update(vec![("b".into(), 2), ("a".into(), 1)]), (vec![], vec![]));
        // b restarted: its old run left, its new run joined.
        assert_eq!(m.update(vec![("a".into(), 1), ("b".into(), 3)]), (vec![2], vec![3]));
        assert_eq!(m.update(vec![("b".into(), 3)]), (vec![1], vec![]));
        assert_eq!(m.nodes(), vec!["b".to_string()]);
    }
}
