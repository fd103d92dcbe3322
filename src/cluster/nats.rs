//! The NATS backend of cluster mode (`--cluster nats://HOST:PORT[,…]`): every node pointed at
//! the same NATS server (JetStream enabled) is one cluster. JetStream sequences and keeps the
//! messages; core NATS carries presence and the leases.
//!
//! - **One stream, one subject per topic.** Stream [`STREAM`] holds subjects `corecast.t.>`; a
//!   topic's subject is `corecast.t.<0|1>.<hex of its name>` (1: private), see [`subject`].
//!   Each stream message is a [`wire::Batch`] of one topic's messages with dense offsets.
//! - **Sequencing without an owner node.** A node publishes a topic's next batch with
//!   `Nats-Expected-Last-Subject-Sequence` set to the stream sequence of the topic's last batch
//!   it knows, and offsets following that batch's last one. JetStream stores it only if nothing
//!   else was stored on the subject meanwhile, so each topic has one order and dense offsets
//!   whoever publishes. On a conflict (another node published first) the node reads the
//!   subject's last batch, takes its epoch and offset and tries again. `Nats-Msg-Id` (this
//!   process's run, the topic's epoch and the first offset) makes a retry after a lost ack
//!   idempotent within the stream's duplicate window (two nodes never share an id: the server
//!   checks ids before the expected sequence). The JetStream ack is the commit: `ack` and `202` go out after it.
//! - **Every node reads the whole stream** with an ordered push consumer: at start up to the
//!   stream's last sequence, before the node serves clients, which fills the recent windows
//!   and the history (the stream *is* the history: `max_age` and `max_msgs_per_subject` come
//!   from `--history-max-age-secs` / `--history-max-messages` when the stream is created); then
//!   live, in stream order.
//! - **Presence** changes of local members go out on core subject `corecast.p`; **leases** are
//!   heartbeats on `corecast.hb` every [`super::HEARTBEAT`] (a node not heard from for
//!   [`super::LEASE`] is gone) and `corecast.leave` on a clean stop. After this node's
//!   connection to NATS drops and comes back, it may have missed presence changes: it forgets the
//!   other nodes' members, then asks everyone (a flag in its next heartbeats) to announce theirs.
//! - With `--database-url`, the node also keeps its lease row in `corecast.nodes`, so that dead
//!   nodes' replication slots are dropped as in Postgres mode.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::fmt::Write as _;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream;
use bytes::Bytes;
use futures_lite::StreamExt;

use super::{wire, Backend, Beat, LinkError, Pending};
use crate::channel::history::HistoryLimits;
use crate::protocol::phoenix::Topic;
use crate::store::log::RecoveredTopic;

/// The JetStream stream every node shares.
pub const STREAM: &str = "CORECAST";
const TOPICS: &str = "corecast.t.>";
const PRESENCE: &str = "corecast.p";
const BEATS: &str = "corecast.hb";
const LEAVES: &str = "corecast.leave";

/// JetStream requests and publish acks wait this long before the link counts the server as
/// unreachable (and retries).
const JS_TIMEOUT: Duration = Duration::from_secs(2);

/// Room left in a stream message for headers and the batch header.
const HEADROOM: usize = 1024;

/// Heartbeats after a reconnect that ask the others to announce their members again.
const RESYNC_BEATS: u32 = 3;

/// How long a start waits for the NATS server before giving up.
pub const CONNECT_PATIENCE: Duration = Duration::from_secs(30);

/// Parses the URLs of `--cluster nats://HOST:PORT[,…]` (each `nats://`, `tls://` or bare
/// `HOST:PORT`).
pub fn parse_urls(s: &str) -> Result<Vec<String>, String> {
    let urls: Vec<String> = s.split(',').map(str::trim).filter(|u| !u.is_empty()).map(String::from).collect();
    if urls.is_empty() {
        return Err(format!("--cluster {s:?}: no NATS server URL"));
    }
    for u in &urls {
        u.parse::<async_nats::ServerAddr>().map_err(|e| format!("--cluster: {u:?} is not a NATS URL: {e}"))?;
    }
    Ok(urls)
}

/// The URLs for a log line, credentials replaced by `***`.
pub fn redacted(urls: &[String]) -> String {
    urls.iter()
        .map(|u| match (u.find("://"), u.rfind('@')) {
            (Some(s), Some(at)) if at > s => format!("{}***{}", &u[..s + 3], &u[at..]),
            (None, Some(at)) => format!("***{}", &u[at..]),
            _ => u.clone(),
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// The stream subject of `topic`.
pub fn subject(topic: &Topic) -> String {
    let name = topic.name();
    let mut s = String::with_capacity(13 + 2 * name.len());
    s.push_str(if topic.is_private() { "corecast.t.1." } else { "corecast.t.0." });
    for b in name.bytes() {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// What this node knows of a topic's newest batch in the stream.
#[derive(Debug, Clone)]
struct TopicState {
    epoch: Arc<str>,
    last_offset: u64,
    /// Stream sequence of that batch (0: the subject has none).
    seq: u64,
}

/// Other nodes as heard from their heartbeats.
#[derive(Debug, Default)]
struct Peers {
    seen: HashMap<u64, (String, Instant)>,
    /// Runs that asked for a resync since the last look.
    resync: Vec<u64>,
}

/// Heartbeat payload: `run u64 LE`, `flags u8` (1: resync), node id.
fn beat_payload(run: u64, resync: bool, node: &str) -> Bytes {
    let mut b = Vec::with_capacity(9 + node.len());
    b.extend_from_slice(&run.to_le_bytes());
    b.push(resync as u8);
    b.extend_from_slice(node.as_bytes());
    b.into()
}

fn parse_beat(b: &[u8]) -> Option<(u64, bool, String)> {
    let run = u64::from_le_bytes(b.get(..8)?.try_into().ok()?);
    let flags = *b.get(8)?;
    let node = std::str::from_utf8(b.get(9..)?).ok()?;
    Some((run, flags & 1 == 1, node.to_string()))
}

fn unreachable(e: impl std::fmt::Display) -> LinkError {
    LinkError::transient(format!("NATS: {e}"))
}

/// The NATS backend (see the module docs).
pub struct Nats {
    client: async_nats::Client,
    js: jetstream::Context,
    stream: jetstream::stream::Stream,
    node: String,
    run: u64,
    topics: RefCell<HashMap<Topic, TopicState, ahash::RandomState>>,
    peers: Rc<RefCell<Peers>>,
    /// Set by the connection's event callback when it came back after a drop.
    reconnected: Arc<AtomicBool>,
    /// 1: the next heartbeat starts the resync; >1: heartbeats left that carry the flag.
    resync: Cell<u32>,
    /// Largest batch content per stream message (from the server's `max_payload`).
    max_chunk: usize,
    /// The database's lease row (only for the clean-up of dead nodes' replication slots).
    pg: Option<super::postgres::Postgres>,
}

impl Nats {
    /// The topic's state, read from the stream when this node has none.
    async fn state(&self, topic: &Topic) -> Result<TopicState, LinkError> {
        if let Some(s) = self.topics.borrow().get(topic) {
            return Ok(s.clone());
        }
        let fresh = || TopicState {
            epoch: Arc::from(format!("{:016x}", crate::entropy::u64()).as_str()),
            last_offset: 0,
            seq: 0,
        };
        let s = match self.stream.get_last_raw_message_by_subject(&subject(topic)).await {
            Ok(m) => match wire::decode(&m.payload) {
                Ok(batch) => match batch.items.iter().rev().find_map(|i| match i {
                    wire::Item::Publish(p) => Some(p),
                    _ => None,
                }) {
                    Some(p) => TopicState { epoch: p.epoch.clone(), last_offset: p.offset, seq: m.sequence },
                    None => TopicState { seq: m.sequence, ..fresh() },
                },
                // Not ours to read: continue after it under a new epoch.
                Err(_) => TopicState { seq: m.sequence, ..fresh() },
            },
            Err(e) if e.kind() == jetstream::stream::LastRawMessageErrorKind::NoMessageFound => fresh(),
            Err(e) => return Err(unreachable(e)),
        };
        let mut topics = self.topics.borrow_mut();
        if topics.len() >= 100_000 {
            topics.clear(); // a cache: re-read from the stream when needed
        }
        topics.insert(topic.clone(), s.clone());
        Ok(s)
    }

    async fn publish_presence(&self, batch: &[Pending]) -> Result<(), LinkError> {
        let mut content = Vec::new();
        for p in batch {
            if let Pending::Presence(item) = p {
                if content.is_empty() {
                    wire::start(self.run, &mut content);
                }
                wire::push(item, &mut content);
                if content.len() >= self.max_chunk {
                    let full = std::mem::take(&mut content);
                    self.client.publish(PRESENCE, full.into()).await.map_err(unreachable)?;
                }
            }
        }
        if !content.is_empty() {
            self.client.publish(PRESENCE, content.into()).await.map_err(unreachable)?;
        }
        Ok(())
    }
}

/// One topic's part of a batch: indexes into it, in order, and how far it got.
struct Group {
    topic: Topic,
    items: Vec<usize>,
    next: usize,
}

impl Backend for Nats {
    async fn commit(&self, batch: &mut [Pending]) -> Result<(), LinkError> {
        self.publish_presence(batch).await?;
        let mut groups: Vec<Group> = Vec::new();
        let mut index: HashMap<Topic, usize, ahash::RandomState> = HashMap::default();
        for (i, p) in batch.iter().enumerate() {
            if let Pending::Publish { msg, done: false, .. } = p {
                let g = *index.entry(msg.topic.clone()).or_insert_with(|| {
                    groups.push(Group { topic: msg.topic.clone(), items: Vec::new(), next: 0 });
                    groups.len() - 1
                });
                groups[g].items.push(i);
            }
        }
        // Rounds: each topic's next chunk, all topics at once; a topic's next chunk needs the
        // previous one's stream sequence.
        loop {
            let mut round = Vec::new();
            for (gi, g) in groups.iter().enumerate().filter(|(_, g)| g.next < g.items.len()) {
                let state = self.state(&g.topic).await?;
                let mut content = Vec::with_capacity(256);
                wire::start(self.run, &mut content);
                let (first, mut offset, mut end) = (state.last_offset + 1, state.last_offset, g.next);
                while end < g.items.len() && (end == g.next || content.len() < self.max_chunk) {
                    let Pending::Publish { msg, .. } = &mut batch[g.items[end]] else { unreachable!() };
                    offset += 1;
                    msg.epoch = state.epoch.clone();
                    msg.offset = offset;
                    let before = content.len();
                    wire::push_publish(msg, &mut content);
                    if end > g.next && content.len() > self.max_chunk {
                        content.truncate(before); // the next chunk's first message
                        offset -= 1;
                        break;
                    }
                    end += 1;
                }
                let publish = jetstream::message::PublishMessage::build()
                    .payload(content.into())
                    .message_id(format!("{:x}.{}.{first}", self.run, state.epoch))
                    .expected_last_subject_sequence(state.seq);
                let ack = self.js.send_publish(subject(&g.topic), publish).await;
                round.push((gi, end, offset, state, ack));
            }
            if round.is_empty() {
                return Ok(());
            }
            let mut failure = None;
            for (gi, end, last_offset, state, ack) in round {
                let result = match ack {
                    Ok(ack) => ack.await,
                    Err(e) => Err(e),
                };
                let g = &mut groups[gi];
                match result {
                    Ok(ack) => {
                        self.topics
                            .borrow_mut()
                            .insert(g.topic.clone(), TopicState { epoch: state.epoch, last_offset, seq: ack.sequence });
                        for &i in &g.items[g.next..end] {
                            if let Pending::Publish { done, .. } = &mut batch[i] {
                                *done = true;
                            }
                        }
                        g.next = end;
                    }
                    Err(e) if e.kind() == jetstream::context::PublishErrorKind::WrongLastSequence => {
                        // Another node published on the topic: read where it stands, go again.
                        self.topics.borrow_mut().remove(&g.topic);
                    }
                    Err(e) if e.kind() == jetstream::context::PublishErrorKind::MaxPayloadExceeded => {
                        return Err(LinkError {
                            message: format!(
                                "NATS: a message is larger than the server's max_payload ({} bytes)",
                                self.client.server_info().max_payload
                            ),
                            refused: true,
                        });
                    }
                    Err(e) => {
                        failure.get_or_insert(unreachable(e));
                    }
                }
            }
            if let Some(e) = failure {
                return Err(e);
            }
        }
    }

    async fn heartbeat(&self) -> Result<Beat, LinkError> {
        if let Some(pg) = &self.pg {
            if let Err(e) = pg.heartbeat().await {
                tracing::debug!(error = %e, "cluster: cannot renew this node's row in corecast.nodes");
            }
        }
        if self.reconnected.swap(false, Ordering::AcqRel) {
            // Presence changes may have been missed while disconnected: forget the others'
            // members now (they are gone this beat); they come back, and announce again
            // because of the flag, from the beat after next.
            tracing::warn!("cluster: the NATS connection came back; resynchronizing presence");
            self.resync.set(RESYNC_BEATS + 2);
            self.beat(false).await?;
            return Ok(Beat { live: vec![(self.node.clone(), self.run)], resync: Vec::new() });
        }
        let left = self.resync.get();
        let flag = left > 0 && left <= RESYNC_BEATS;
        self.resync.set(left.saturating_sub(1));
        self.beat(flag).await?;
        let mut peers = self.peers.borrow_mut();
        peers.seen.retain(|_, (_, at)| at.elapsed() < super::LEASE);
        let mut live: Vec<(String, u64)> = peers.seen.iter().map(|(&run, (node, _))| (node.clone(), run)).collect();
        live.push((self.node.clone(), self.run));
        Ok(Beat { live, resync: std::mem::take(&mut peers.resync) })
    }

    async fn ready(&self) -> Result<bool, LinkError> {
        Ok(true) // the stream was read up to date and the subscriptions exist before the link runs
    }

    async fn leave(&self) -> Result<(), LinkError> {
        if let Some(pg) = &self.pg {
            let _ = pg.leave().await;
        }
        self.client.publish(LEAVES, Bytes::copy_from_slice(&self.run.to_le_bytes())).await.map_err(unreachable)?;
        self.client.flush().await.map_err(unreachable)
    }

    async fn clean_up(&self) -> Result<(), LinkError> {
        match &self.pg {
            Some(pg) => pg.clean_up().await,
            None => Ok(()),
        }
    }
}

impl Nats {
    async fn beat(&self, resync: bool) -> Result<(), LinkError> {
        self.client.publish(BEATS, beat_payload(self.run, resync, &self.node)).await.map_err(unreachable)
    }
}

/// What the stream held when this node started, per topic (see [`recover`]).
pub type Recovered = HashMap<Topic, RecoveredTopic>;

/// Adds one batch read from the stream at start to `rec`. A topic's messages are kept in
/// order with their persisted flag; a new epoch replaces what came before it; at most
/// `keep` per topic (the rest are older than any window or history bound keeps).
fn recover_batch(rec: &mut Recovered, batch: wire::Batch, keep: usize) {
    for item in batch.items {
        let wire::Item::Publish(m) = item else { continue };
        let t = rec.entry(m.topic.clone()).or_default();
        if t.epoch.as_deref() != Some(&*m.epoch) {
            t.epoch = Some(m.epoch.clone());
            t.recent.clear();
        } else if m.offset <= t.last_offset {
            continue;
        }
        t.last_offset = m.offset;
        t.clean = true;
        let persisted = m.persisted;
        t.recent.push((Arc::new(m.into_stored()), persisted));
        if t.recent.len() >= 2 * keep {
            t.recent.drain(..keep);
        }
    }
}

/// Starts cluster mode `--cluster nats://…` for node `node`: connects (retrying for
/// [`CONNECT_PATIENCE`]), creates the stream when missing, reads it up to date (returned, for
/// the shards to start from), then runs the link, the stream consumer and the presence and
/// lease subscriptions on their own thread.
pub fn start_nats(
    urls: Vec<String>,
    node: String,
    shards: Vec<flume::Sender<crate::bus::ShardMsg>>,
    cpu: Option<usize>,
    limits: HistoryLimits,
    max_payload_bytes: usize,
    pg: Option<(tokio_postgres::Config, String, Duration)>,
) -> Result<(super::ClusterHandle, Recovered), String> {
    let run = crate::entropy::u64().max(1);
    let (tx, rx) = flume::unbounded();
    let (leave_tx, leave_rx) = flume::bounded(1);
    let members = Arc::new(Mutex::new(vec![node.clone()]));
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let m2 = members.clone();
    let mode = super::Mode::Nats(urls.clone());
    let clean_every = pg.as_ref().map_or(super::CLEAN_UP_EVERY, |p| super::CLEAN_UP_EVERY.min(p.2 / 2));
    super::spawn_link_thread(cpu, ready_tx, move |ready_tx| async move {
        let started = match open(urls, node, run, limits, max_payload_bytes, pg).await {
            Ok(s) => s,
            Err(e) => {
                let _ = ready_tx.send(Err(e));
                return;
            }
        };
        let Started { backend, consumer, presence, beats, leaves, recovered, live_from } = started;
        let _ = ready_tx.send(Ok(recovered));
        let inbound = super::Inbound { shards: shards.clone(), run, live_from };
        tokio::task::spawn_local(consume(consumer, inbound.clone()));
        tokio::task::spawn_local(async move {
            let mut presence = presence;
            while let Some(m) = presence.next().await {
                inbound.deliver(&m.payload, u64::MAX).await;
            }
        });
        let peers = backend.peers.clone();
        tokio::task::spawn_local(listen_beats(beats, leaves, peers, run));
        super::run_link(backend, rx, shards, m2, run, leave_rx, clean_every).await;
    })?;
    let recovered = ready_rx.recv().map_err(|_| "the cluster thread stopped".to_string())??;
    let handle = super::ClusterHandle { tx, run, mode, members, leave: leave_tx };
    Ok((handle, recovered))
}

use std::sync::Mutex;

struct Started {
    backend: Nats,
    consumer: jetstream::consumer::push::Ordered,
    presence: async_nats::Subscriber,
    beats: async_nats::Subscriber,
    leaves: async_nats::Subscriber,
    recovered: Recovered,
    live_from: u64,
}

async fn open(
    urls: Vec<String>,
    node: String,
    run: u64,
    limits: HistoryLimits,
    max_payload_bytes: usize,
    pg: Option<(tokio_postgres::Config, String, Duration)>,
) -> Result<Started, String> {
    let addrs: Vec<async_nats::ServerAddr> = urls.iter().filter_map(|u| u.parse().ok()).collect();
    let reconnected = Arc::new(AtomicBool::new(false));
    let flag = reconnected.clone();
    let was_down = Arc::new(AtomicBool::new(false));
    // Credentials in the URL (`nats://user:pass@host`, or `nats://token@host`): the client
    // library does not take them from the address itself.
    let credentials = addrs
        .iter()
        .find(|a| a.has_user_pass())
        .map(|a| (a.username().unwrap_or_default().to_string(), a.password().map(str::to_string)));
    let options = || {
        let (flag, was_down) = (flag.clone(), was_down.clone());
        let base = match credentials.clone() {
            Some((user, Some(pass))) => async_nats::ConnectOptions::with_user_and_password(user, pass),
            Some((token, None)) => async_nats::ConnectOptions::with_token(token),
            None => async_nats::ConnectOptions::new(),
        };
        base.name(format!("corecast {node}"))
            .connection_timeout(Duration::from_secs(2))
            .max_reconnects(None)
            .event_callback(move |event| {
                let (flag, was_down) = (flag.clone(), was_down.clone());
                async move {
                    match event {
                        async_nats::Event::Disconnected => {
                            was_down.store(true, Ordering::Release);
                            tracing::error!("cluster: lost the connection to NATS; reconnecting");
                        }
                        async_nats::Event::Connected if was_down.swap(false, Ordering::AcqRel) => {
                            tracing::info!("cluster: connected to NATS again");
                            flag.store(true, Ordering::Release);
                        }
                        async_nats::Event::SlowConsumer(_) => {
                            tracing::warn!("cluster: NATS reports this node as a slow consumer")
                        }
                        _ => {}
                    }
                }
            })
    };
    let started = Instant::now();
    let mut backoff = crate::ingest::retry::Backoff::default();
    let client = loop {
        match options().connect(addrs.clone()).await {
            Ok(c) => break c,
            // The server answered and refused: retrying the same credentials cannot help.
            Err(e)
                if matches!(
                    e.kind(),
                    async_nats::ConnectErrorKind::Authentication | async_nats::ConnectErrorKind::AuthorizationViolation
                ) =>
            {
                return Err(format!(
                    "NATS at {} refused this node's credentials ({e}): check the user and password (or token) in --cluster",
                    redacted(&urls)
                ));
            }
            Err(e) if started.elapsed() < CONNECT_PATIENCE => {
                tracing::warn!(error = %e, "cluster: NATS unavailable; retrying");
                tokio::time::sleep(backoff.next_delay()).await;
            }
            Err(e) => return Err(format!("cannot reach NATS at {} within {CONNECT_PATIENCE:?}: {e}", redacted(&urls))),
        }
    };
    let server_max = client.server_info().max_payload;
    if server_max < max_payload_bytes + HEADROOM {
        tracing::warn!(
            nats_max_payload = server_max,
            max_payload_bytes,
            "cluster: the NATS server's max_payload is below --max-payload-bytes: larger broadcasts are refused (raise max_payload in nats-server or lower --max-payload-bytes)"
        );
    }
    let js = jetstream::ContextBuilder::new().timeout(JS_TIMEOUT).build(client.clone());
    let config = jetstream::stream::Config {
        name: STREAM.into(),
        description: Some("corecast cluster: every topic's messages, one subject per topic".into()),
        subjects: vec![TOPICS.into()],
        max_age: Duration::from_millis(limits.durable_age_ms.max(limits.window_age_ms)),
        max_messages_per_subject: limits.durable_messages.max(limits.window_messages) as i64,
        storage: jetstream::stream::StorageType::File,
        duplicate_window: Duration::from_secs(120),
        allow_direct: true,
        ..Default::default()
    };
    let js_err = |what: &str, e: &dyn std::fmt::Display| {
        format!("NATS JetStream: cannot {what}: {e} (is JetStream enabled? nats-server -js)")
    };
    let mut stream = loop {
        match js.get_or_create_stream(config.clone()).await {
            Ok(s) => break s,
            Err(e) if !client.server_info().jetstream => {
                let info = client.server_info();
                return Err(format!(
                    "the NATS server {} ({}:{}) does not have JetStream enabled, which --cluster nats needs \
                     for ordering and history: start it with -js (or a jetstream {{}} block in its \
                     configuration) ({e})",
                    info.server_name, info.host, info.port
                ));
            }
            Err(e) if started.elapsed() < CONNECT_PATIENCE => {
                tracing::warn!(error = %e, "cluster: cannot open the JetStream stream yet; retrying");
                tokio::time::sleep(backoff.next_delay()).await;
            }
            Err(e) => return Err(js_err("open the stream", &e)),
        }
    };
    let state = stream.info().await.map_err(|e| js_err("read the stream's state", &e))?.state.clone();
    let consumer = stream
        .create_consumer(jetstream::consumer::push::OrderedConfig {
            deliver_subject: client.new_inbox(),
            filter_subject: TOPICS.into(),
            deliver_policy: jetstream::consumer::DeliverPolicy::All,
            ..Default::default()
        })
        .await
        .map_err(|e| js_err("create this node's consumer", &e))?;
    let mut consumer = consumer.messages().await.map_err(|e| js_err("read the stream", &e))?;
    // Subscribe before reading: nothing published from now on is missed.
    let sub = |s: &'static str| {
        let client = client.clone();
        async move { client.subscribe(s).await.map_err(|e| format!("NATS: cannot subscribe to {s}: {e}")) }
    };
    let (presence, beats, leaves) = (sub(PRESENCE).await?, sub(BEATS).await?, sub(LEAVES).await?);
    let mut recovered = Recovered::new();
    let keep = limits.window_messages + limits.durable_messages;
    let mut read = 0u64;
    if state.messages > 0 {
        let t0 = Instant::now();
        loop {
            let next = tokio::time::timeout(Duration::from_secs(10), consumer.next()).await;
            let m = match next {
                Ok(Some(Ok(m))) => m,
                Ok(Some(Err(e))) => return Err(js_err("read the stream", &e)),
                Ok(None) => return Err("NATS: the stream consumer ended while reading the stream".into()),
                Err(_) => return Err("NATS: reading the stream stalled for 10 s".into()),
            };
            let (seq, pending) = m.info().map(|i| (i.stream_sequence, i.pending)).unwrap_or((u64::MAX, 0));
            match wire::decode(&m.payload) {
                Ok(batch) => recover_batch(&mut recovered, batch, keep),
                Err(e) => tracing::error!(error = %e, seq, "cluster: skipping a stream message that does not decode"),
            }
            read += 1;
            if seq >= state.last_sequence || pending == 0 {
                break;
            }
        }
        tracing::info!(
            batches = read,
            topics = recovered.len(),
            took_ms = t0.elapsed().as_millis() as u64,
            "cluster: read the NATS stream up to date"
        );
    }
    let pg = match pg {
        Some((config, slot, ttl)) => {
            let p = super::postgres::Postgres::new(config, node.clone(), run, slot, ttl);
            if let Err(e) = p.prepare().await {
                tracing::warn!(error = %e, "cluster: cannot prepare corecast.nodes (dead nodes' slots are not dropped until it works)");
            }
            Some(p)
        }
        None => None,
    };
    let backend = Nats {
        client,
        js,
        stream,
        node,
        run,
        topics: RefCell::default(),
        peers: Rc::default(),
        reconnected,
        resync: Cell::new(0),
        max_chunk: server_max.saturating_sub(HEADROOM).max(1024),
        pg,
    };
    Ok(Started { backend, consumer, presence, beats, leaves, recovered, live_from: state.last_sequence + 1 })
}

/// Delivers the stream, live, from the consumer to the owner shards.
async fn consume(mut consumer: jetstream::consumer::push::Ordered, inbound: super::Inbound) {
    while let Some(m) = consumer.next().await {
        match m {
            Ok(m) => {
                let seq = m.info().map_or(u64::MAX, |i| i.stream_sequence);
                inbound.deliver(&m.payload, seq).await;
            }
            Err(e) => tracing::warn!(error = %e, "cluster: the stream consumer reports an error (it recreates itself)"),
        }
    }
    tracing::error!("cluster: the stream consumer ended; this node no longer receives other nodes' messages");
}

/// Keeps [`Peers`] from the heartbeats and leaves of the other nodes.
async fn listen_beats(
    mut beats: async_nats::Subscriber,
    mut leaves: async_nats::Subscriber,
    peers: Rc<RefCell<Peers>>,
    run: u64,
) {
    loop {
        let beat =
            futures_lite::future::or(async { beats.next().await.map(Ok) }, async { leaves.next().await.map(Err) })
                .await;
        match beat {
            Some(Ok(m)) => {
                let Some((r, resync, node)) = parse_beat(&m.payload) else { continue };
                if r == run {
                    continue;
                }
                let mut p = peers.borrow_mut();
                p.seen.insert(r, (node, Instant::now()));
                if resync && !p.resync.contains(&r) {
                    p.resync.push(r);
                }
            }
            Some(Err(m)) => {
                if let Ok(r) = <[u8; 8]>::try_from(&m.payload[..]).map(u64::from_le_bytes) {
                    peers.borrow_mut().seen.remove(&r);
                }
            }
            None => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_are_valid_tokens_and_distinct() {
        let open = Topic::new("room:a.b *>", false).unwrap();
        let private = Topic::new("room:a.b *>", true).unwrap();
        let s = subject(&open);
        assert!(s.starts_with("corecast.t.0."));
        assert!(!s["corecast.t.0.".len()..].contains(['.', '*', '>', ' ']));
        assert_ne!(s, subject(&private));
        assert_ne!(subject(&Topic::new("ab", false).unwrap()), subject(&Topic::new("a", false).unwrap()));
    }

    #[test]
    fn beats_round_trip_and_bad_ones_are_ignored() {
        assert_eq!(parse_beat(&beat_payload(7, true, "node-a")), Some((7, true, "node-a".into())));
        assert_eq!(parse_beat(&beat_payload(7, false, "")), Some((7, false, String::new())));
        assert_eq!(parse_beat(b"short"), None);
    }

    #[test]
    fn credentials_never_reach_the_log() {
        let urls = vec!["nats://u:secret@a:4222".to_string(), "nats://b:4222".into(), "tok@c:1".into()];
        assert_eq!(redacted(&urls), "nats://***@a:4222,nats://b:4222,***@c:1");
    }

    #[test]
    fn urls_parse() {
        assert_eq!(parse_urls("nats://127.0.0.1:4222").unwrap(), vec!["nats://127.0.0.1:4222"]);
        assert_eq!(parse_urls("nats://a:1, nats://b:2").unwrap().len(), 2);
        assert!(parse_urls("nats://").is_err() || parse_urls(",").is_err());
    }

    fn msg(topic: &Topic, epoch: &str, offset: u64, persisted: bool) -> wire::Item {
        wire::Item::Publish(Box::new(wire::Sequenced {
            topic: topic.clone(),
            epoch: Arc::from(epoch),
            offset,
            id: Arc::from(format!("id{offset}").as_str()),
            event: Arc::from("e"),
            payload: crate::protocol::phoenix::session::Payload::Json(Bytes::from_static(b"{}")),
            binary_frame: false,
            created_ms: 1,
            persisted,
            expires_ms: None,
            user_id: None,
            exclude: None,
        }))
    }

    #[test]
    fn recovery_keeps_order_drops_replays_and_restarts_on_a_new_epoch() {
        let t = Topic::new("t", false).unwrap();
        let mut rec = Recovered::new();
        let b = |items| wire::Batch { run: 1, items };
        recover_batch(&mut rec, b(vec![msg(&t, "e1", 1, true), msg(&t, "e1", 2, false)]), 100);
        recover_batch(&mut rec, b(vec![msg(&t, "e1", 2, false), msg(&t, "e1", 3, true)]), 100);
        let r = &rec[&t];
        assert_eq!(
            r.recent.iter().map(|(m, p)| (m.offset, *p)).collect::<Vec<_>>(),
            vec![(1, true), (2, false), (3, true)]
        );
        assert_eq!((r.last_offset, r.epoch.as_deref()), (3, Some("e1")));
        recover_batch(&mut rec, b(vec![msg(&t, "e2", 1, false)]), 100);
        let r = &rec[&t];
        assert_eq!((r.recent.len(), r.last_offset, r.epoch.as_deref()), (1, 1, Some("e2")));
        for o in 2..=50 {
            recover_batch(&mut rec, b(vec![msg(&t, "e2", o, false)]), 10);
        }
        let r = &rec[&t];
        assert!(r.recent.len() < 20 && r.recent.last().unwrap().0.offset == 50);
    }
}
