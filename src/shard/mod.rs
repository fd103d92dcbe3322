//! The runtime: one glommio executor per core, each a [`Shard`] owning the connections it
//! accepted, its local subscriber registry and the topics it owns.
//!
//! This is the only layer that ties the others together: the connection driver
//! ([`conn`]) turns socket bytes into protocol actions and executes them against the shard's
//! state; [`mesh`] carries [`crate::bus::ShardMsg`] between shards; [`boot`] starts everything;
//! [`sim`] drives several shards in one thread for tests of the ordering rules.
//!
//! Data flow of a broadcast: a connection's `Publish` goes to the topic's owner shard (local
//! call or mesh), which assigns the offset, encodes the message once per wire format in use
//! ([`crate::channel::broadcast`]) and sends one `Deliver` per listening shard. Each shard
//! appends the shared `Bytes` to its subscribers' outboxes and marks them dirty; the flusher
//! task writes each dirty outbox with one vectored `sendmsg`. Under load more frames queue
//! between flushes, so each send carries more frames: coalescing, never more sends.
//!
//! State is `!Send` and per shard: `RefCell`s that are never borrowed across an `.await`.

pub mod boot;
pub mod conn;
pub mod history;
pub mod mesh;
pub mod presence;
pub mod rest;
pub mod sim;
pub mod sse;
pub mod stats;
pub mod status;

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::os::unix::io::RawFd;
use std::rc::Rc;
use std::sync::Arc;
use std::task::Waker;
use std::time::Instant;

use bytes::Bytes;
use slab::Slab;

use crate::auth::Verifier;
use crate::channel::broadcast::Frames;
use crate::channel::registry::{ConnId, InterestChange, LocalSub, Registry};
use crate::channel::topic::OwnedTopic;
use crate::channel::Format;
use crate::cluster::{ClusterHandle, ClusterOut};
use crate::config::Config;
use crate::ingest::{IngestHandle, IngestMsg, PgSubscribe};
use crate::protocol::phoenix::session::{Action, SessionCtx, Subscription};
use crate::protocol::phoenix::{Session, Topic, Vsn};
use crate::protocol::ws::frame::close_frame;
use crate::protocol::ws::{CloseCode, WsConn};
use crate::transport::poller::{self, Poller, Ready};
use crate::transport::{Flush, Outbox};

use self::stats::ShardStats;
use crate::bus::{Backlog, Origin, ShardMsg};

/// Local subscribers of a topic from which each shard delivers its own copy of a message (see
/// [`Frames::localized`]).
const LOCALIZE_FRAMES_AT: usize = 32;

/// How long a loop may run before [`Shard::relax`] yields to the shard's other tasks.
const RELAX_AFTER: std::time::Duration = std::time::Duration::from_millis(2);

/// Outgoing batch size above which readers on this shard pause until peers catch up.
const CONGESTED: usize = 1 << 16;

/// What a connection is, once its first request was read.
#[derive(Debug)]
pub enum Kind {
    /// Plain HTTP (REST, health, metrics) or not yet known.
    Http,
    /// An upgraded WebSocket with its Phoenix session.
    Ws(Box<WsState>),
    /// A Server-Sent Events stream over several topics.
    Sse(Box<SseState>),
}

/// State of an SSE stream: its topics (in request order) and, per topic, the position of the
/// newest message delivered, which make up its resume token.
///
/// A fresh stream learns each topic's starting position from the topic's owner. Until all are
/// known a complete token cannot be written, so messages wait in `pending` (in arrival order)
/// and go out, each with its token, once the last position arrives.
#[derive(Debug)]
pub struct SseState {
    pub topics: Vec<Topic>,
    positions: Vec<Option<(Arc<str>, u64)>>,
    /// `(topic index, epoch, offset, frame)`; a `None` frame only moves the position.
    pending: Vec<(usize, Arc<str>, u64, Option<Bytes>)>,
    /// Topics whose owner has not answered yet (the stream is held until none is left).
    pub unanswered: usize,
    /// The stream's position went out once every owner had answered ([`SseState::announce`]).
    announced: bool,
}

impl SseState {
    /// A stream over `topics`, resuming from `positions` when given (`Last-Event-ID`; a
    /// topic without one learns it from its owner, as on a fresh stream).
    pub fn new(topics: Vec<Topic>, positions: Option<Vec<Option<(String, u64)>>>) -> Self {
        let positions = match positions {
            Some(p) => p.into_iter().map(|p| p.map(|(e, o)| (Arc::from(e.as_str()), o))).collect(),
            None => vec![None; topics.len()],
        };
        let unanswered = topics.len();
        Self { topics, positions, pending: Vec::new(), unanswered, announced: false }
    }

    fn ready(&self) -> bool {
        self.pending.is_empty() && self.positions.iter().all(Option::is_some)
    }

    fn token_line(&self) -> Bytes {
        let p: Vec<(Arc<str>, u64)> = self.positions.iter().map(|p| p.clone().expect("ready")).collect();
        crate::protocol::sse::id_line(&p)
    }

    /// For a single-topic stream that is ready: records the new position and returns `true`;
    /// the caller then queues the shared event that already carries the token.
    fn single_topic(&mut self, epoch: &Arc<str>, offset: u64) -> bool {
        if self.topics.len() != 1 || !self.ready() {
            return false;
        }
        self.positions[0] = Some((epoch.clone(), offset));
        true
    }

    /// A message at `offset` of `epoch` on `topic`: the pieces to queue now (`id:` line and
    /// frame), or nothing while the stream waits for positions.
    fn message(&mut self, topic: &Topic, epoch: &Arc<str>, offset: u64, frame: Bytes) -> Vec<Bytes> {
        let Some(i) = self.topics.iter().position(|t| t == topic) else { return vec![frame] };
        if !self.ready() {
            self.pending.push((i, epoch.clone(), offset, Some(frame)));
            return Vec::new();
        }
        self.positions[i] = Some((epoch.clone(), offset));
        vec![self.token_line(), frame]
    }

    /// `topic`'s backlog and position arrived: the pieces to queue now.
    fn backlog(&mut self, topic: &Topic, frames: Vec<(u64, Bytes)>, position: Option<(Arc<str>, u64)>) -> Vec<Bytes> {
        let Some(i) = self.topics.iter().position(|t| t == topic) else { return Vec::new() };
        let Some((epoch, last)) = position else {
            return frames.into_iter().map(|(_, f)| f).collect();
        };
        let mut out = Vec::new();
        for (offset, frame) in frames {
            if offset == 0 {
                out.push(frame); // a `system` error: no position
            } else {
                out.extend(self.message(topic, &epoch, offset, frame));
            }
        }
        if self.ready() {
            self.positions[i] = Some((epoch, last));
            self.announce(&mut out);
            return out;
        }
        if self.positions[i].is_none() {
            self.positions[i] = Some((epoch.clone(), last));
        } else {
            self.pending.push((i, epoch, last, None));
        }
        if self.positions.iter().all(Option::is_some) {
            for (i, epoch, offset, frame) in std::mem::take(&mut self.pending) {
                self.positions[i] = Some((epoch, offset));
                if let Some(f) = frame {
                    out.push(self.token_line());
                    out.push(f);
                }
            }
        }
        self.announce(&mut out);
        out
    }

    /// Once every topic's owner has answered: the whole stream's position at once, in an event
    /// with an `id:` and no data (EventSource updates its `lastEventId` and dispatches
    /// nothing), so a client that reconnects before any message arrives resumes instead of
    /// starting live and missing what was published meanwhile.
    fn announce(&mut self, out: &mut Vec<Bytes>) {
        if self.unanswered == 0 && !self.announced && self.ready() {
            self.announced = true;
            out.push(self.token_line());
            out.push(Bytes::from_static(b"\n"));
        }
    }
}

/// Protocol state of a WebSocket connection.
#[derive(Debug)]
pub struct WsState {
    pub ws: WsConn,
    pub session: Session,
}

/// Why and how a connection is being closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Closing {
    /// Flush what is queued (ending with a close frame, if any), then close.
    Graceful,
    /// Close now; the peer stopped reading.
    Abort,
}

/// A connection's shard-side state: what fan-out and the flusher need, plus protocol state.
#[derive(Debug)]
pub struct Slot {
    pub generation: u32,
    pub fd: RawFd,
    pub outbox: Outbox,
    /// The connection task's waker, to wake it for writability waits and closes.
    pub waker: Option<Waker>,
    /// `sendmsg` hit a full socket buffer; the connection task waits for writability and the
    /// flusher leaves this connection alone until then.
    pub blocked: bool,
    /// In the flusher's dirty list.
    pub dirty: bool,
    /// Set when the connection must end; no more frames are queued after that.
    pub closing: Option<Closing>,
    pub last_rx: Instant,
    pub kind: Kind,
    /// A deferred HTTP response (answered by another shard) has been queued: the connection
    /// may go on with its next request.
    pub http_ready: bool,
    /// While `Some`, frames for this connection wait here instead of the outbox: an SSE
    /// stream's response head and events are held until every topic's owner has registered
    /// the stream, so nothing published after the client saw the stream open can be missed.
    pub hold: Option<Vec<Bytes>>,
    /// REST publishes of the current request not yet sequenced by their owners; at zero,
    /// `deferred_response` (the 202) goes out.
    pub awaiting_acks: u32,
    pub deferred_response: Option<Bytes>,
    /// The TLS session, on a TLS listener: frames are encrypted on their way out.
    pub tls: Option<Box<crate::transport::tls::Session>>,
    /// Readiness (see [`crate::transport::poller`]): a read may find input. Cleared by the
    /// connection task when a read comes back empty-handed or short, set by input edges.
    pub readable: bool,
    /// The peer closed its side or the socket failed: reads never block again.
    pub hup: bool,
    /// A write may find buffer space. Cleared when a flush finds the socket full, set by
    /// output edges.
    pub writable: bool,
}

impl Slot {
    /// Writes what is queued without blocking, many frames per `sendmsg` (encrypted first on
    /// a TLS connection).
    pub fn flush(&mut self) -> std::io::Result<crate::transport::Flush> {
        let r = match &mut self.tls {
            Some(t) => t.flush(&mut self.outbox, self.fd),
            None => self.outbox.flush(self.fd),
        };
        if let Ok(Flush::Blocked) = r {
            self.writable = false;
        }
        r
    }
}

/// The poller token of a connection: its slab index and generation.
pub fn token(id: ConnId) -> u64 {
    (u64::from(id.generation) << 32) | u64::from(id.index)
}

/// Wakers waiting for an event, woken all at once. A waiter that is dropped before the event
/// fires (the losing side of a select, e.g. the accept loop's shutdown check, once per
/// accepted connection) takes its waker out again: nothing accumulates while the event waits.
#[derive(Debug, Default)]
pub struct Event {
    fired: Cell<bool>,
    waiters: RefCell<Slab<Waker>>,
}

impl Event {
    /// Fires the event (idempotent) and wakes everyone waiting.
    pub fn fire(&self) {
        self.fired.set(true);
        let waiters = std::mem::take(&mut *self.waiters.borrow_mut());
        for w in waiters {
            w.1.wake();
        }
    }

    /// Whether the event has fired.
    pub fn fired(&self) -> bool {
        self.fired.get()
    }

    /// Waits until fired.
    pub fn wait(&self) -> EventWait<'_> {
        EventWait { event: self, key: None }
    }

    /// Wakers registered now (for tests).
    pub fn waiting(&self) -> usize {
        self.waiters.borrow().len()
    }
}

/// The future of [`Event::wait`].
#[derive(Debug)]
pub struct EventWait<'a> {
    event: &'a Event,
    /// Where this waiter's waker is in `event.waiters`, once registered and until fired.
    key: Option<usize>,
}

impl std::future::Future for EventWait<'_> {
    type Output = ();

    fn poll(mut self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<()> {
        if self.event.fired.get() {
            self.key = None;
            return std::task::Poll::Ready(());
        }
        let mut waiters = self.event.waiters.borrow_mut();
        match self.key {
            Some(k) => {
                if !waiters[k].will_wake(cx.waker()) {
                    waiters[k] = cx.waker().clone();
                }
            }
            None => {
                let k = waiters.insert(cx.waker().clone());
                drop(waiters);
                self.key = Some(k);
            }
        }
        std::task::Poll::Pending
    }
}

impl Drop for EventWait<'_> {
    fn drop(&mut self) {
        // After `fire` the slab was emptied (and nothing registers again): the key is stale.
        if let Some(k) = self.key.take() {
            if !self.event.fired.get() {
                self.event.waiters.borrow_mut().try_remove(k);
            }
        }
    }
}

#[cfg(test)]
mod event_tests {
    use super::Event;
    use std::future::Future;
    use std::pin::pin;
    use std::task::{Context, Poll, Waker};

    #[test]
    fn dropped_waiters_leave_nothing_behind_and_live_ones_are_woken() {
        let ev = Event::default();
        let mut cx = Context::from_waker(Waker::noop());
        for _ in 0..1000 {
            let mut w = pin!(ev.wait());
            assert_eq!(w.as_mut().poll(&mut cx), Poll::Pending);
            assert_eq!(w.as_mut().poll(&mut cx), Poll::Pending);
        }
        assert_eq!(ev.waiting(), 0, "a select that lost left its waker registered");
        let mut live = Box::pin(ev.wait());
        assert_eq!(live.as_mut().poll(&mut cx), Poll::Pending);
        assert_eq!(ev.waiting(), 1);
        ev.fire();
        assert_eq!(ev.waiting(), 0);
        assert_eq!(live.as_mut().poll(&mut cx), Poll::Ready(()));
        drop(live);
        assert_eq!(pin!(ev.wait()).poll(&mut cx), Poll::Ready(()));
        assert_eq!(ev.waiting(), 0);
    }
}

/// An acknowledgement waiting for the log: `(log position, shard, connection, ack frame)`.
type DurableAck = (u64, usize, ConnId, Option<Bytes>);

/// One shard.
pub struct Shard {
    pub id: usize,
    pub shards: usize,
    pub cfg: Arc<Config>,
    pub ctx: SessionCtx,
    pub conns: RefCell<Slab<Slot>>,
    pub registry: RefCell<Registry>,
    pub owned: RefCell<HashMap<Topic, OwnedTopic, ahash::RandomState>>,
    /// Connections with frames to flush (slab indexes).
    dirty: RefCell<Vec<u32>>,
    flush_waker: RefCell<Option<Waker>>,
    /// Per peer: messages waiting for that peer's mesh sender task.
    outgoing: Vec<RefCell<Vec<ShardMsg>>>,
    outgoing_wakers: Vec<RefCell<Option<Waker>>>,
    /// Readers waiting for the outgoing queues to drain.
    uncongested: RefCell<Vec<Waker>>,
    /// Read buffer shared by every connection of the shard: a read is processed before the
    /// next `.await`, so no connection needs a buffer of its own.
    pub scratch: RefCell<Vec<u8>>,
    pub stats: Arc<[ShardStats]>,
    pub shutdown: Event,
    /// The Postgres ingest thread, when a database is configured.
    pub ingest: Option<IngestHandle>,
    /// Cluster mode: the link to the other nodes.
    pub cluster: Option<ClusterHandle>,
    /// This process's cluster run (0 on a single node): presence members here carry it.
    pub run: u64,
    /// Node processes known to be gone: late presence changes of theirs are ignored.
    dead_runs: RefCell<std::collections::HashSet<u64>>,
    /// Postgres subscriptions waiting for their join reply to be released.
    pg_after_reply: RefCell<HashMap<(ConnId, Topic), PgSubscribe, ahash::RandomState>>,
    /// Recently verified connect tokens and their claims (see `rest::authenticate`).
    pub claims_cache: RefCell<HashMap<Box<str>, Arc<crate::auth::Claims>, ahash::RandomState>>,
    /// Private joins waiting for the database's decision.
    pending_auth: RefCell<HashMap<(ConnId, Topic), Subscription, ahash::RandomState>>,
    /// Owned topics with a presence diff waiting for the end of the coalescing window.
    presence_dirty: RefCell<Vec<Topic>>,
    presence_waker: RefCell<Option<Waker>>,
    /// Prefix of this shard's `phx_ref`s (OS-random per process, so refs never repeat).
    presence_prefix: Box<str>,
    /// Where persisted messages go.
    durable: Durable,
    /// Postgres store: this shard's log position the writer has committed up to.
    pg_synced: Cell<u64>,
    /// Encoded records waiting for the log writer.
    log_buf: RefCell<Vec<u8>>,
    /// Total bytes ever queued for the log (logical positions for durable acknowledgements).
    log_appended: Cell<u64>,
    /// Acknowledgements of persisted messages waiting for the log sync that covers them:
    /// `(position, shard, connection, ack frame)`, in position order.
    durable_acks: RefCell<std::collections::VecDeque<DurableAck>>,
    log_waker: RefCell<Option<Waker>>,
    /// Asks the log writer to flush and close; it fires `log_closed` when done.
    pub log_stop: Event,
    pub log_closed: Event,
    /// This shard wrote its shutdown checkpoints: every later message is followed by one.
    checkpointed: std::cell::Cell<bool>,
    /// The sequencing time of the first delivery since the last flush round (sampled for
    /// `corecast_sequenced_to_first_write_seconds`).
    first_write: std::cell::Cell<Option<std::time::Instant>>,
    next_generation: Cell<u32>,
    /// When a long loop last yielded (see [`Shard::relax`]).
    last_yield: Cell<Instant>,
    /// The listener's TLS configuration, when it serves TLS.
    pub tls: Option<Arc<crate::transport::tls::Acceptor>>,
    /// Readiness of this shard's sockets (a serving shard has one; the simulator's do not).
    poller: Option<Poller>,
}

/// Where a shard's persisted messages and checkpoints go.
#[derive(Debug, Clone)]
pub enum Durable {
    /// Nowhere: persistence is off.
    Off,
    /// The embedded log: this process's segment generation.
    Log { generation: u64 },
    /// The Postgres table, through its writer thread.
    Postgres(crate::store::pg::PgHistory),
}

impl std::fmt::Debug for Shard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shard").field("id", &self.id).finish_non_exhaustive()
    }
}

impl Shard {
    /// A shard `id` of `cfg.shards`.
    pub fn new(
        id: usize,
        cfg: Arc<Config>,
        verifier: Arc<Verifier>,
        stats: Arc<[ShardStats]>,
        ingest: Option<IngestHandle>,
        durable: Durable,
        cluster: Option<ClusterHandle>,
    ) -> Self {
        let l = &cfg.limits;
        let ctx = SessionCtx {
            max_channels: l.max_channels_per_connection,
            joins_per_sec: l.joins_per_second,
            presence_calls: l.presence_calls_per_30s,
            presence_window: std::time::Duration::from_secs(30),
            presence_max_bytes: l.presence_max_bytes,
            max_payload: l.max_payload_bytes,
            verifier,
            postgres: ingest.is_some(),
        };
        let shards = cfg.shards;
        Self {
            id,
            shards,
            ctx,
            conns: RefCell::new(Slab::new()),
            registry: RefCell::new(Registry::new()),
            owned: RefCell::new(HashMap::default()),
            dirty: RefCell::new(Vec::new()),
            flush_waker: RefCell::new(None),
            outgoing: (0..shards).map(|_| RefCell::new(Vec::new())).collect(),
            outgoing_wakers: (0..shards).map(|_| RefCell::new(None)).collect(),
            uncongested: RefCell::new(Vec::new()),
            scratch: RefCell::new(vec![0u8; 64 << 10]),
            stats,
            shutdown: Event::default(),
            ingest,
            run: cluster.as_ref().map_or(0, |c| c.run),
            cluster,
            dead_runs: RefCell::new(Default::default()),
            pending_auth: RefCell::new(HashMap::default()),
            claims_cache: RefCell::new(HashMap::default()),
            pg_after_reply: RefCell::new(HashMap::default()),
            presence_dirty: RefCell::new(Vec::new()),
            presence_waker: RefCell::new(None),
            presence_prefix: format!("{:08x}.", crate::entropy::u64() as u32).into(),
            durable,
            pg_synced: Cell::new(0),
            log_buf: RefCell::new(Vec::new()),
            log_appended: Cell::new(0),
            durable_acks: RefCell::new(std::collections::VecDeque::new()),
            log_waker: RefCell::new(None),
            log_stop: Event::default(),
            log_closed: Event::default(),
            checkpointed: Default::default(),
            first_write: Default::default(),
            next_generation: Cell::new(0),
            last_yield: Cell::new(Instant::now()),
            tls: None,
            poller: None,
            cfg,
        }
    }

    /// This shard serves sockets, watched by `poller`.
    pub fn with_poller(mut self, poller: Poller) -> Self {
        self.poller = Some(poller);
        self
    }

    /// The shard's poller.
    ///
    /// # Panics
    /// On a shard built without one (the simulator's), which never serves a socket.
    pub fn poller(&self) -> &Poller {
        self.poller.as_ref().expect("a serving shard has a poller")
    }

    /// Applies a readiness event to its connection and wakes the connection's task when it
    /// may be waiting for it.
    pub fn on_ready(&self, token: u64, ready: Ready) {
        let (index, generation) = (token as u32, (token >> 32) as u32);
        let waker = {
            let mut conns = self.conns.borrow_mut();
            let Some(slot) = conns.get_mut(index as usize).filter(|s| s.generation == generation) else {
                return;
            };
            // The task sleeps on input only once `readable` is false, and on output only while
            // `blocked`: other edges just record the state.
            let mut wake = false;
            if ready.hup && !slot.hup {
                slot.hup = true;
                slot.readable = true;
                wake = true;
            }
            if ready.read && !slot.readable {
                slot.readable = true;
                wake = true;
            }
            if ready.write && !slot.writable {
                slot.writable = true;
                wake |= slot.blocked;
            }
            if wake {
                slot.waker.take()
            } else {
                None
            }
        };
        if let Some(w) = waker {
            w.wake();
        }
    }

    /// Waits for socket readiness and hands it to the connections, many events per wake-up.
    pub async fn readiness_loop(self: Rc<Self>) {
        let mut events = poller::event_buffer();
        let fd = self.poller().fd();
        loop {
            if let Err(e) = glommio::net::wait_readable(fd).await {
                tracing::error!(shard = self.id, error = %e, "cannot wait for socket readiness");
                glommio::timer::sleep(std::time::Duration::from_millis(10)).await;
            }
            loop {
                let n = match self.poller().take(&mut events, |t, r| self.on_ready(t, r)) {
                    Ok(n) => n,
                    Err(e) => {
                        tracing::error!(shard = self.id, error = %e, "epoll_wait failed");
                        break;
                    }
                };
                if n < poller::BATCH {
                    break;
                }
                self.relax().await;
            }
        }
    }

    /// This shard's listener serves TLS with `acceptor`.
    pub fn with_tls(mut self, acceptor: Option<Arc<crate::transport::tls::Acceptor>>) -> Self {
        self.tls = acceptor;
        self
    }

    /// This shard's stats.
    pub fn my_stats(&self) -> &ShardStats {
        &self.stats[self.id]
    }

    /// Registers a new connection on `fd`.
    pub fn register(&self, fd: RawFd) -> ConnId {
        let generation = self.next_generation.get().wrapping_add(1);
        self.next_generation.set(generation);
        let index = self.conns.borrow_mut().insert(Slot {
            generation,
            fd,
            outbox: Outbox::new(),
            waker: None,
            blocked: false,
            dirty: false,
            closing: None,
            last_rx: Instant::now(),
            kind: Kind::Http,
            http_ready: false,
            hold: None,
            awaiting_acks: 0,
            deferred_response: None,
            tls: None,
            // A new connection is read at once (its request is usually there already: the
            // listener defers accepts until input arrives) and is writable.
            readable: true,
            hup: false,
            writable: true,
        }) as u32;
        ShardStats::gauge(&self.my_stats().connections, 1);
        ConnId { index, generation }
    }

    /// Removes a connection and every subscription it had. Call before closing its fd.
    pub fn unregister(&self, id: ConnId) {
        let slot = {
            let mut conns = self.conns.borrow_mut();
            match conns.get(id.index as usize) {
                Some(s) if s.generation == id.generation => conns.remove(id.index as usize),
                _ => return,
            }
        };
        ShardStats::gauge(&self.my_stats().connections, -1);
        match slot.kind {
            Kind::Ws(ws) => {
                ShardStats::gauge(&self.my_stats().websockets, -1);
                for topic in ws.session.topics() {
                    self.unsubscribe(id, topic);
                }
            }
            Kind::Sse(sse) => {
                ShardStats::gauge(&self.my_stats().sse_streams, -1);
                for topic in &sse.topics {
                    self.unsubscribe(id, topic);
                }
            }
            Kind::Http => {}
        }
    }

    /// Sends what a connection's hold collected, in order, and stops holding.
    pub fn release_hold(&self, id: ConnId) {
        let mut conns = self.conns.borrow_mut();
        let Some(slot) = conns.get_mut(id.index as usize).filter(|s| s.generation == id.generation) else { return };
        for frame in slot.hold.take().unwrap_or_default() {
            self.enqueue(id.index, slot, frame);
        }
    }

    /// Runs `f` on the slot of `id`, if it is still that connection.
    pub fn with_slot<R>(&self, id: ConnId, f: impl FnOnce(&mut Slot) -> R) -> Option<R> {
        let mut conns = self.conns.borrow_mut();
        match conns.get_mut(id.index as usize) {
            Some(s) if s.generation == id.generation => Some(f(s)),
            _ => None,
        }
    }

    /// Queues a frame on a connection (dropped if it is closing); enforces the queue limit.
    pub fn send(&self, id: ConnId, frame: Bytes) {
        let mut conns = self.conns.borrow_mut();
        let Some(slot) = conns.get_mut(id.index as usize).filter(|s| s.generation == id.generation) else {
            return;
        };
        self.enqueue(id.index, slot, frame);
    }

    /// Queues `frame` on `slot` (index `index`), marking it dirty or cutting a slow consumer.
    fn enqueue(&self, index: u32, slot: &mut Slot, frame: Bytes) {
        if slot.closing.is_some() {
            return;
        }
        if let Some(held) = &mut slot.hold {
            held.push(frame);
            return;
        }
        let queued = slot.outbox.push(frame);
        if queued > self.cfg.limits.max_queue_bytes {
            ShardStats::add(&self.my_stats().slow_consumers, 1);
            slot.outbox.truncate_to_partial();
            let reason = format!("slow consumer: more than {} bytes queued", self.cfg.limits.max_queue_bytes);
            if matches!(slot.kind, Kind::Ws(_)) {
                slot.outbox.push(close_frame(CloseCode::Policy, &reason));
            }
            slot.closing = Some(Closing::Abort);
            if let Some(w) = slot.waker.take() {
                w.wake();
            }
            return;
        }
        if !slot.dirty && !slot.blocked {
            slot.dirty = true;
            self.dirty.borrow_mut().push(index);
            if let Some(w) = self.flush_waker.borrow_mut().take() {
                w.wake();
            }
        }
    }

    /// Asks a connection to close: queues a WebSocket close frame (for WebSockets) after
    /// what is already queued and wakes its task.
    pub fn close(&self, id: ConnId, code: CloseCode, reason: &str) {
        let mut conns = self.conns.borrow_mut();
        let Some(slot) = conns.get_mut(id.index as usize).filter(|s| s.generation == id.generation) else {
            return;
        };
        close_slot(slot, code, reason);
    }

    /// Executes a session's actions for connection `id`, in order.
    pub fn run_actions(&self, id: ConnId, actions: &mut Vec<Action>) {
        for action in actions.drain(..) {
            match action {
                Action::Send(frame) => self.send(id, frame),
                Action::Subscribe(sub) => match &self.ingest {
                    Some(ingest) if sub.authorize => {
                        let (topic, claims) = (sub.topic.clone(), sub.claims.clone());
                        self.pending_auth.borrow_mut().insert((id, topic.clone()), *sub);
                        ingest.send(IngestMsg::AuthorizeJoin { shard: self.id, conn: id, topic, claims });
                    }
                    _ => self.subscribe(id, *sub),
                },
                Action::Reauthorized { topic, claims } => {
                    let pg = self.registry.borrow().sub(&topic, id).is_some_and(|s| s.pg);
                    if let Some(ingest) = self.ingest.as_ref().filter(|_| pg || topic.is_private()) {
                        ingest.send(IngestMsg::Reauth { shard: self.id, conn: id, topic, claims });
                    }
                }
                Action::Unsubscribe(topic) => self.unsubscribe(id, &topic),
                Action::Publish(mut p) => {
                    p.received = Some(std::time::Instant::now());
                    let owner = p.topic.owner(self.shards);
                    let origin = Some(Origin { shard: self.id, conn: id });
                    let ack_to = p.ack.is_some().then_some((self.id, id));
                    self.route(owner, ShardMsg::Publish { publish: Box::new(p), origin, ack_to });
                }
                Action::Track { topic, key, meta, reply } => self.track(id, topic, key, meta, reply),
                Action::Untrack { topic } => self.untrack(id, &topic),
                Action::Close(code, reason) => {
                    if code == CloseCode::InvalidPayload || code == CloseCode::Protocol {
                        ShardStats::add(&self.my_stats().protocol_errors, 1);
                    }
                    self.close(id, code, &reason);
                }
            }
        }
    }

    /// Registers a subscription. The join reply in `sub.reply` goes out once the subscription
    /// is in effect: at once when this shard already receives the topic in this format (or
    /// owns it), else after the owner's [`ShardMsg::InterestAck`].
    fn subscribe(&self, id: ConnId, sub: Subscription) {
        let format = match sub.vsn {
            Vsn::V1 => Format::V1,
            Vsn::V2 => Format::V2,
        };
        let pg = self.ingest.is_some() && !sub.postgres_changes.is_empty();
        let want = match (&sub.resume, &sub.replay) {
            (Some(r), _) => Some(Backlog::Resume { epoch: r.epoch.clone(), offset: r.offset }),
            (None, Some(r)) => Some(Backlog::Replay { since_ms: r.since_ms, limit: r.limit }),
            (None, None) => None,
        };
        let local = LocalSub {
            conn: id,
            format,
            presence: sub.presence,
            join_ref: sub.join_ref.clone(),
            pg,
            tracked: false,
            awaiting_backlog: want.is_some(),
            held: false,
        };
        let changes = self.registry.borrow_mut().add(&sub.topic, local);
        ShardStats::gauge(&self.my_stats().subscriptions, 1);
        ShardStats::add(&self.my_stats().joins, 1);
        let remote_owner = sub.topic.owner(self.shards) != self.id;
        let added = changes.contains(&InterestChange::Added(format));
        // Interest changes first: a local owner registers them synchronously.
        self.interest_changed(&sub.topic, changes);
        let pg_sub = pg.then(|| PgSubscribe {
            shard: self.id,
            conn: id,
            topic: sub.topic.clone(),
            join_ref: sub.join_ref.clone(),
            format,
            bindings: sub.postgres_changes.clone(),
            claims: sub.claims.clone(),
            apikey_claims: sub.claims_from_apikey,
        });
        let wait = remote_owner && (added || self.registry.borrow().is_pending(&sub.topic, format));
        if wait {
            self.registry.borrow_mut().hold(&sub.topic, format, id, sub.reply);
            // Postgres changes and "Subscribed to PostgreSQL" must follow the join reply: the
            // ingest hears of the subscription only once the reply is out.
            if let Some(p) = pg_sub {
                self.pg_after_reply.borrow_mut().insert((id, sub.topic.clone()), p);
            }
        } else {
            for f in sub.reply {
                self.send(id, f);
            }
            if let (Some(p), Some(ingest)) = (pg_sub, &self.ingest) {
                ingest.send(IngestMsg::Subscribe(Box::new(p)));
            }
        }
        let owner = sub.topic.owner(self.shards);
        // Both after the interest on the same FIFO: they follow the join reply, and live
        // messages sequenced after the backlog follow the backlog.
        if let Some(want) = want {
            self.route(
                owner,
                ShardMsg::BacklogRequest { topic: sub.topic.clone(), from: self.id, conn: id, format, want },
            );
        }
        if sub.presence {
            self.route(owner, ShardMsg::PresenceSync { topic: sub.topic, from: self.id, conn: id });
        }
    }

    fn unsubscribe(&self, id: ConnId, topic: &Topic) {
        self.pg_after_reply.borrow_mut().remove(&(id, topic.clone()));
        let held = self.pending_auth.borrow_mut().remove(&(id, topic.clone())).is_some();
        let pg = self.registry.borrow().sub(topic, id).is_some_and(|s| s.pg);
        if let Some(ingest) = self.ingest.as_ref().filter(|_| held || pg) {
            ingest.send(IngestMsg::Unsubscribe { shard: self.id, conn: id, topic: topic.clone() });
        }
        if held {
            return;
        }
        self.untrack(id, topic);
        let changes = self.registry.borrow_mut().remove(topic, id);
        ShardStats::gauge(&self.my_stats().subscriptions, -1);
        self.interest_changed(topic, changes);
    }

    pub(super) fn interest_changed(&self, topic: &Topic, changes: Vec<InterestChange>) {
        let owner = topic.owner(self.shards);
        for c in changes {
            let (format, present) = match c {
                InterestChange::Added(f) => (f, true),
                InterestChange::Removed(f) => (f, false),
            };
            if present && owner != self.id {
                self.registry.borrow_mut().interest_sent(topic, format);
            }
            self.route(owner, ShardMsg::Interest { topic: topic.clone(), from: self.id, format, present });
        }
    }

    /// Sends `msg` to shard `to`: handled right here when that is this shard.
    pub fn route(&self, to: usize, msg: ShardMsg) {
        if to == self.id {
            self.handle(msg);
            return;
        }
        self.outgoing[to].borrow_mut().push(msg);
        if let Some(w) = self.outgoing_wakers[to].borrow_mut().take() {
            w.wake();
        }
    }

    /// Handles one message addressed to this shard.
    pub fn handle(&self, msg: ShardMsg) {
        match msg {
            ShardMsg::Interest { topic, from, format, present } => {
                let mut owned = self.owned.borrow_mut();
                if !present && !owned.contains_key(&topic) {
                    return;
                }
                let t = owned.entry(topic.clone()).or_insert_with(|| OwnedTopic::new(self.new_epoch(), self.shards));
                t.set_interest(from, format, present);
                if t.is_disposable(history::unix_ms()) {
                    owned.remove(&topic);
                }
                drop(owned);
                if present && from != self.id {
                    self.route(from, ShardMsg::InterestAck { topic, format });
                }
            }
            ShardMsg::ToConns { items } => {
                let mut n = 0;
                for (frame, conns) in items {
                    n += conns.len() as u64;
                    for conn in conns {
                        self.send(conn, frame.clone());
                    }
                }
                ShardStats::add(&self.my_stats().deliveries, n);
            }
            ShardMsg::HistorySynced { upto } => {
                self.pg_synced.set(self.pg_synced.get().max(upto));
                self.wake_log();
            }
            ShardMsg::JoinDecision { conn, topic, allowed, reason } => {
                let Some(sub) = self.pending_auth.borrow_mut().remove(&(conn, topic.clone())) else { return };
                if allowed {
                    self.subscribe(conn, sub);
                    return;
                }
                tracing::debug!(%reason, ?topic, "private join refused");
                let reply = self
                    .with_slot(conn, |slot| match &mut slot.kind {
                        Kind::Ws(ws) => {
                            ws.session.reject_join(&topic, sub.join_ref.as_deref(), sub.join_msg_ref.as_deref())
                        }
                        Kind::Http | Kind::Sse(_) => None,
                    })
                    .flatten();
                if let Some(reply) = reply {
                    self.send(conn, reply);
                }
            }
            ShardMsg::CloseChannel { conn, topic, message } => {
                let mut actions = Vec::new();
                self.with_slot(conn, |slot| {
                    if let Kind::Ws(ws) = &mut slot.kind {
                        ws.session.close_topic(&topic, &message, &mut actions);
                    }
                });
                self.run_actions(conn, &mut actions);
            }
            ShardMsg::Track { topic, from, conn, key, meta, reply } => {
                self.owner_track(topic, from, conn, &key, meta, reply)
            }
            ShardMsg::PresenceLeave { topic, from, conn } => self.owner_untrack(&topic, from, conn),
            ShardMsg::PresenceSync { topic, from, conn } => self.owner_sync(topic, from, conn),
            ShardMsg::TrackResult { topic, conn, reply, error } => {
                let sse = self.with_slot(conn, |s| matches!(s.kind, Kind::Sse(_))).unwrap_or(false);
                match (sse, error) {
                    (false, error) => self.send(conn, reply.frame(&topic, error.as_deref())),
                    (true, Some(e)) => {
                        let data = format!(r#"{{"status":"error","message":{}}}"#, crate::protocol::json::quote(&e));
                        self.send(conn, crate::protocol::sse::topic_event(topic.name(), "system", data.as_bytes()));
                    }
                    (true, None) => {}
                }
            }
            ShardMsg::PresenceState { topic, conn, body } => self.deliver_presence_state(&topic, conn, body),
            ShardMsg::BacklogRequest { topic, from, conn, format, want } => {
                self.owner_backlog(topic, from, conn, format, want)
            }
            ShardMsg::BacklogReply { topic, conn, frames, position } => {
                self.deliver_backlog(&topic, conn, frames, position)
            }
            ShardMsg::HistoryRequest { topic, from, conn, before, before_ms, limit, keep_alive } => {
                let response = self.owner_history(&topic, before, before_ms, limit, keep_alive);
                self.route(from, ShardMsg::HistoryReply { conn, response });
            }
            ShardMsg::HistoryReply { conn, response } => {
                self.send(conn, response);
                self.with_slot(conn, |s| {
                    s.http_ready = true;
                    if let Some(w) = s.waker.take() {
                        w.wake();
                    }
                });
            }
            ShardMsg::DeliverPresence { topic, frames } => self.deliver_presence_diff(&topic, &frames),
            ShardMsg::InterestAck { topic, format } => {
                let held = self.registry.borrow_mut().release(&topic, format);
                for (conn, frames) in held {
                    for f in frames {
                        self.send(conn, f);
                    }
                    let pg = self.pg_after_reply.borrow_mut().remove(&(conn, topic.clone()));
                    if let (Some(p), Some(ingest)) = (pg, &self.ingest) {
                        ingest.send(IngestMsg::Subscribe(Box::new(p)));
                    }
                }
            }
            ShardMsg::Publish { publish, origin, ack_to } if self.cluster.is_some() => {
                // The cluster sequences; this node delivers it when its stream brings it back.
                if let Some(c) = &self.cluster {
                    c.send(ClusterOut::Publish { publish, origin, ack_to });
                }
            }
            ShardMsg::Remote { msgs, live } => {
                for (msg, exclude) in msgs {
                    self.sequence_remote(*msg, exclude, live);
                }
            }
            ShardMsg::RemoteTrack { topic, run, member, key, meta } => {
                self.owner_remote_track(topic, run, member, &key, meta)
            }
            ShardMsg::Members { gone, joined } => self.members_changed(&gone, &joined),
            ShardMsg::ClusterLink { up, message } => self.tell_channels("cluster", up, &message),
            ShardMsg::Publish { .. } if self.log_stop.fired() => {
                // Shutting down and the log is closed: a message sequenced now could not be
                // recorded, and the restarted stream would reuse its offset. Not sequenced, not
                // acknowledged (its connection is being closed).
                tracing::debug!(shard = self.id, "dropping a publish that arrived after the log closed at shutdown");
            }
            ShardMsg::Publish { mut publish, origin, ack_to } => {
                let ack = publish.ack.take();
                let durable_at = self.sequence(*publish, origin);
                match (ack_to, durable_at) {
                    // A persisted message is acknowledged once it is synced to disk.
                    (Some((shard, conn)), Some(pos)) => self.ack_when_durable(pos, shard, conn, ack),
                    (Some((shard, conn)), None) => self.route(shard, ShardMsg::Sequenced { conn, frame: ack }),
                    (None, _) => {}
                }
            }
            ShardMsg::SequencedMany(acks) => {
                for (conn, frame) in acks {
                    self.handle(ShardMsg::Sequenced { conn, frame });
                }
            }
            ShardMsg::Sequenced { conn, frame: Some(frame) } => self.send(conn, frame),
            ShardMsg::Sequenced { conn, frame: None } => {
                let done = self
                    .with_slot(conn, |s| {
                        s.awaiting_acks = s.awaiting_acks.saturating_sub(1);
                        if s.awaiting_acks == 0 {
                            s.http_ready = true;
                            if let Some(w) = s.waker.take() {
                                w.wake();
                            }
                            s.deferred_response.take()
                        } else {
                            None
                        }
                    })
                    .flatten();
                if let Some(response) = done {
                    self.send(conn, response);
                }
            }
            ShardMsg::Deliver { topic, frames, exclude } => self.deliver(&topic, &frames, exclude),
        }
    }

    /// Sends a `system` message about `extension` to every channel on this shard.
    fn tell_channels(&self, extension: &str, ok: bool, message: &str) {
        let mut out = Vec::new();
        for (topic, local) in self.registry.borrow().topics() {
            let wire = topic.wire_name();
            let mut by_format: [Option<Bytes>; 3] = [None, None, None];
            for sub in local.subs.iter().filter(|s| !s.held) {
                let f = by_format[sub.format.index()].get_or_insert_with(|| {
                    crate::ingest::encode::system(sub.format, None, &wire, extension, ok, message)
                });
                out.push((sub.conn, f.clone()));
            }
        }
        for (conn, frame) in out {
            self.send(conn, frame);
        }
    }

    /// Queues `frames` to every local subscriber of `topic`.
    fn deliver(&self, topic: &Topic, frames: &Frames, exclude: Option<Origin>) {
        if let (Some(t), None) = (frames.sequenced, self.first_write.get()) {
            self.first_write.set(Some(t));
        }
        let registry = self.registry.borrow();
        let Some(local) = registry.get(topic) else {
            return;
        };
        let skip = exclude.filter(|o| o.shard == self.id).map(|o| o.conn);
        let localized;
        let frames = if self.shards > 1 && local.subs.len() >= LOCALIZE_FRAMES_AT {
            localized = frames.localized();
            &localized
        } else {
            frames
        };
        let mut conns = self.conns.borrow_mut();
        let mut n = 0u64;
        for sub in &local.subs {
            if Some(sub.conn) == skip || sub.awaiting_backlog || sub.held {
                continue;
            }
            let Some(frame) = frames.get(sub.format) else {
                continue;
            };
            let Some(slot) = conns.get_mut(sub.conn.index as usize) else {
                continue;
            };
            if slot.generation != sub.conn.generation {
                continue;
            }
            if let Kind::Sse(sse) = &mut slot.kind {
                match &frames.sse_with_id {
                    // One topic: the shared event already carries the whole token.
                    Some(shared) if sse.single_topic(&frames.epoch, frames.offset) => {
                        self.enqueue(sub.conn.index, slot, shared.clone())
                    }
                    // Several topics: the stream's own token goes in front of the shared event.
                    _ => {
                        for piece in sse.message(topic, &frames.epoch, frames.offset, frame.clone()) {
                            self.enqueue(sub.conn.index, slot, piece);
                        }
                    }
                }
            } else {
                self.enqueue(sub.conn.index, slot, frame.clone());
            }
            n += 1;
        }
        ShardStats::add(&self.my_stats().deliveries, n);
    }

    /// Lets other tasks of the shard run, and the shard poll its sockets, if the current task
    /// has run for long (2 ms): called inside long loops (flushing, handling batches) so reads
    /// and accepts are not starved.
    ///
    /// A plain `yield_now` is not enough: glommio 0.9 polls I/O only when its task queues run
    /// dry or its preempt timer (100 ms) fires, so a task that keeps yielding keeps sockets
    /// unread. Sleeping for a microsecond parks this task until the executor has been through
    /// its reactor, which reads what arrived meanwhile (say, the next token of a stream while
    /// the previous one is still being written to 5,000 subscribers).
    pub async fn relax(&self) {
        let now = Instant::now();
        if now.saturating_duration_since(self.last_yield.get()) >= RELAX_AFTER {
            self.last_yield.set(now);
            glommio::timer::sleep(std::time::Duration::from_micros(1)).await;
        }
    }

    /// Wakes the log writer (after `log_stop` fired).
    pub fn wake_log(&self) {
        if let Some(w) = self.log_waker.borrow_mut().take() {
            w.wake();
        }
    }

    /// A fresh stream epoch, straight from the OS: it must differ from every epoch any earlier
    /// process gave out, or a resume token from before a restart would match the new stream.
    fn new_epoch(&self) -> Arc<str> {
        let r = crate::entropy::u64();
        Arc::from(format!("{r:016x}").as_str())
    }

    /// Whether this shard's outgoing queues are long enough that readers should pause.
    pub fn congested(&self) -> bool {
        self.outgoing.iter().any(|q| q.borrow().len() > CONGESTED)
    }

    /// Waits until the outgoing queues are short again.
    pub async fn wait_uncongested(&self) {
        futures_lite::future::poll_fn(|cx| {
            if !self.congested() {
                return std::task::Poll::Ready(());
            }
            self.uncongested.borrow_mut().push(cx.waker().clone());
            std::task::Poll::Pending
        })
        .await
    }

    /// The flusher: writes every dirty outbox, many frames per `sendmsg`. Runs forever.
    pub async fn flush_loop(self: Rc<Self>) {
        let mut batch: Vec<u32> = Vec::new();
        loop {
            futures_lite::future::poll_fn(|cx| {
                if self.dirty.borrow().is_empty() {
                    *self.flush_waker.borrow_mut() = Some(cx.waker().clone());
                    std::task::Poll::Pending
                } else {
                    std::task::Poll::Ready(())
                }
            })
            .await;
            std::mem::swap(&mut batch, &mut *self.dirty.borrow_mut());
            let (mut frames, mut sends) = (0u64, 0u64);
            for (i, &index) in batch.iter().enumerate() {
                {
                    let mut conns = self.conns.borrow_mut();
                    if let Some(slot) = conns.get_mut(index as usize) {
                        slot.dirty = false;
                        if !slot.blocked && slot.closing.is_none() {
                            let (f0, s0) = slot.outbox.counters();
                            match slot.flush() {
                                Ok(Flush::Drained) => {}
                                Ok(Flush::Blocked) => {
                                    slot.blocked = true;
                                    if let Some(w) = slot.waker.take() {
                                        w.wake();
                                    }
                                }
                                Err(_) => {
                                    slot.closing = Some(Closing::Abort);
                                    if let Some(w) = slot.waker.take() {
                                        w.wake();
                                    }
                                }
                            }
                            let (f1, s1) = slot.outbox.counters();
                            frames += f1 - f0;
                            sends += s1 - s0;
                        }
                    }
                }
                if i % 64 == 63 {
                    self.relax().await;
                }
            }
            batch.clear();
            let st = self.my_stats();
            ShardStats::add(&st.frames_sent, frames);
            ShardStats::add(&st.sends, sends);
            if sends > 0 {
                if let Some(t) = self.first_write.take() {
                    st.sequenced_to_write.record(t.elapsed());
                }
            }
        }
    }

    /// Sends this shard's outgoing batches to peer `peer`. Runs until the mesh closes.
    pub async fn mesh_send_loop(
        self: Rc<Self>,
        peer: usize,
        tx: glommio::channels::shared_channel::ConnectedSender<mesh::Batch>,
    ) {
        loop {
            futures_lite::future::poll_fn(|cx| {
                if self.outgoing[peer].borrow().is_empty() {
                    *self.outgoing_wakers[peer].borrow_mut() = Some(cx.waker().clone());
                    std::task::Poll::Pending
                } else {
                    std::task::Poll::Ready(())
                }
            })
            .await;
            let batch = std::mem::take(&mut *self.outgoing[peer].borrow_mut());
            if tx.send(batch).await.is_err() {
                return;
            }
            if !self.congested() {
                for w in self.uncongested.borrow_mut().drain(..) {
                    w.wake();
                }
            }
        }
    }

    /// Handles messages from non-shard threads (the ingest thread). Runs until all senders
    /// are gone.
    pub async fn inbox_loop(self: Rc<Self>, rx: flume::Receiver<ShardMsg>) {
        while let Ok(msg) = rx.recv_async().await {
            self.handle(msg);
            self.relax().await;
        }
    }

    /// Handles batches from peer shards. Runs until the mesh closes.
    pub async fn mesh_recv_loop(self: Rc<Self>, rx: glommio::channels::shared_channel::ConnectedReceiver<mesh::Batch>) {
        while let Some(batch) = rx.recv().await {
            for (i, msg) in batch.into_iter().enumerate() {
                self.handle(msg);
                if i % 256 == 255 {
                    self.relax().await;
                }
            }
        }
    }
}

/// Marks `slot` as closing gracefully with a close frame (WebSockets) and wakes its task.
pub fn close_slot(slot: &mut Slot, code: CloseCode, reason: &str) {
    if slot.closing.is_some() {
        return;
    }
    if matches!(slot.kind, Kind::Ws(_)) {
        slot.outbox.push(close_frame(code, reason));
    }
    slot.closing = Some(Closing::Graceful);
    if let Some(w) = slot.waker.take() {
        w.wake();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(s: &str) -> Bytes {
        Bytes::copy_from_slice(s.as_bytes())
    }

    fn text(pieces: &[Bytes]) -> String {
        pieces.iter().map(|p| String::from_utf8_lossy(p).into_owned()).collect()
    }

    #[test]
    fn fresh_sse_stream_waits_for_every_position() {
        let (ta, tb) = (Topic::new("a", false).unwrap(), Topic::new("b", false).unwrap());
        let mut s = SseState::new(vec![ta.clone(), tb.clone()], None);
        let (ea, eb): (Arc<str>, Arc<str>) = (Arc::from("ea"), Arc::from("eb"));
        assert!(s.backlog(&ta, vec![], Some((ea.clone(), 4))).is_empty());
        // a's live message must wait: b's position is unknown, so no complete token exists
        assert!(s.message(&ta, &ea, 5, b("A5")).is_empty());
        let out = s.backlog(&tb, vec![], Some((eb.clone(), 9)));
        assert_eq!(text(&out), "id: ea-5.eb-9\nA5");
        assert_eq!(text(&s.message(&tb, &eb, 10, b("B10"))), "id: ea-5.eb-10\nB10");
    }

    #[test]
    fn resumed_sse_stream_starts_from_its_token() {
        let (ta, tb) = (Topic::new("a", false).unwrap(), Topic::new("b", false).unwrap());
        let mut s =
            SseState::new(vec![ta.clone(), tb.clone()], Some(vec![Some(("ea".into(), 2)), Some(("eb".into(), 7))]));
        let ea: Arc<str> = Arc::from("ea");
        let out = s.backlog(&ta, vec![(3, b("A3")), (4, b("A4"))], Some((ea.clone(), 4)));
        assert_eq!(text(&out), "id: ea-3.eb-7\nA3id: ea-4.eb-7\nA4");
        // a `system` error (offset 0) carries no id
        let out = s.backlog(&tb, vec![(0, b("ERR"))], Some((Arc::from("eb2"), 11)));
        assert_eq!(text(&out), "ERR");
        assert_eq!(text(&s.message(&ta, &ea, 5, b("A5"))), "id: ea-5.eb2-11\nA5");
    }

    #[test]
    fn the_stream_announces_its_position_once_every_owner_answered() {
        let (ta, tb) = (Topic::new("a", false).unwrap(), Topic::new("b", false).unwrap());
        let (ea, eb): (Arc<str>, Arc<str>) = (Arc::from("ea"), Arc::from("eb"));
        let mut s = SseState::new(vec![ta.clone(), tb.clone()], None);
        s.unanswered -= 1; // as the caller counts answers
        assert!(s.backlog(&ta, Vec::new(), Some((ea.clone(), 4))).is_empty());
        s.unanswered -= 1;
        assert_eq!(text(&s.backlog(&tb, Vec::new(), Some((eb.clone(), 9)))), "id: ea-4.eb-9\n\n");
        // Once only; messages carry their own token from now on.
        assert_eq!(text(&s.message(&ta, &ea, 5, b("A5"))), "id: ea-5.eb-9\nA5");
        // A resumed stream whose last answer comes for a topic that was already positioned.
        let mut s = SseState::new(vec![ta.clone(), tb.clone()], Some(vec![None, Some(("eb".into(), 9))]));
        s.unanswered -= 1;
        assert!(s.backlog(&ta, Vec::new(), Some((ea.clone(), 4))).is_empty());
        s.unanswered -= 1;
        assert_eq!(text(&s.backlog(&tb, Vec::new(), Some((eb.clone(), 9)))), "id: ea-4.eb-9\n\n");
    }

    #[test]
    fn a_topic_added_with_no_position_starts_live_and_holds_the_stream_until_known() {
        let (ta, tb) = (Topic::new("a", false).unwrap(), Topic::new("b", false).unwrap());
        let mut s = SseState::new(vec![ta.clone(), tb.clone()], Some(vec![Some(("ea".into(), 2)), None]));
        let (ea, eb): (Arc<str>, Arc<str>) = (Arc::from("ea"), Arc::from("eb"));
        // a's backlog arrives first: held, b's position is not known yet
        assert!(s.backlog(&ta, vec![(3, b("A3"))], Some((ea.clone(), 3))).is_empty());
        // b's owner answers with its position (no backlog: it starts live)
        let out = s.backlog(&tb, Vec::new(), Some((eb.clone(), 40)));
        assert_eq!(text(&out), "id: ea-3.eb-40\nA3");
        assert_eq!(text(&s.message(&tb, &eb, 41, b("B41"))), "id: ea-3.eb-41\nB41");
    }
}
