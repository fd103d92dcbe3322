//! The owner side of a topic's message stream: sequencing (offsets, epoch), the recent window
//! and durable history, backlogs for joiners (gapless resume, replay), history pages, and the
//! shard's log writer.

use std::rc::Rc;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine;
use bytes::Bytes;
use futures_lite::AsyncWriteExt;
use glommio::io::{DmaFile, DmaStreamWriter, DmaStreamWriterBuilder};

use crate::bus::{Backlog, Origin, ShardMsg};
use crate::channel::broadcast::{self, Frames};
use crate::channel::history::StoredMsg;
use crate::channel::registry::ConnId;
use crate::channel::topic::OwnedTopic;
use crate::channel::{Format, FormatSet};
use crate::cluster::wire;
use crate::protocol::http;
use crate::protocol::json::{write_iso8601_ms, write_str, write_u64};
use crate::protocol::phoenix::message;
use crate::protocol::phoenix::session::{uuid_arc, Payload, Persist, Publish};
use crate::protocol::phoenix::{Topic, Vsn};
use crate::shard::stats::ShardStats;
use crate::shard::{Durable, Kind, Shard};
use crate::store::log::{self, Record, RecoveredTopic};
use crate::store::pg::{PgHistory, WriteBatch};

/// Unix time in milliseconds.
pub fn unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

impl Shard {
    /// Installs a topic recovered from the log at start-up.
    pub fn restore_topic(&self, topic: Topic, rt: RecoveredTopic) {
        let epoch = match (&rt.epoch, rt.clean || self.cluster.is_some()) {
            // In cluster mode the epoch is the cluster's (`corecast.topics`), whatever this
            // node's last shutdown was like; the stream's next message says where it stands.
            (Some(e), true) => e.clone(),
            _ => {
                // Not shut down cleanly: messages after the last durable one may be lost, so
                // the stream continues under a new epoch (offsets keep growing).
                self.new_epoch()
            }
        };
        let mut t = OwnedTopic::resume(epoch, rt.last_offset, self.shards);
        t.keep_until_ms = unix_ms() + self.cfg.limits.window_age.as_millis() as u64;
        for m in rt.messages {
            t.history.restore(m);
        }
        let limits = self.cfg.limits.history();
        let mut previous = None;
        for (m, persisted) in rt.recent {
            if previous.is_some_and(|p: u64| p + 1 != m.offset) {
                t.history.clear_window(); // the window holds consecutive offsets only
            }
            previous = Some(m.offset);
            t.history.push(m, persisted, &limits);
        }
        self.owned.borrow_mut().insert(topic, t);
    }

    /// Owner side: assign the next offset, store the message, encode it once per format in
    /// use and send it to every listening shard.
    /// Returns the log position the message must be synced up to (persisted messages only).
    pub(super) fn sequence(&self, p: Publish, origin: Option<Origin>) -> Option<u64> {
        ShardStats::add(&self.my_stats().published, 1);
        if let Some(r) = p.received {
            self.my_stats().publish_sequenced.record(r.elapsed());
        }
        let now = unix_ms();
        let limits = self.cfg.limits.history();
        let mut log_pos = None;
        let (frames, targets) = {
            let mut owned = self.owned.borrow_mut();
            let t = owned.entry(p.topic.clone()).or_insert_with(|| OwnedTopic::new(self.new_epoch(), self.shards));
            let offset = t.next_offset();
            let id: Arc<str> = match &p.id {
                Some(id) => id.clone(),
                None => uuid_arc(crate::entropy::fast_u128()),
            };
            let expires_ms = match p.persist {
                Persist::Ttl(s) => Some(now + s.saturating_mul(1000)),
                _ => None,
            };
            let stored = Arc::new(StoredMsg {
                offset,
                epoch: t.epoch().clone(),
                id,
                event: p.event.clone(),
                payload: p.payload.clone(),
                binary_frame: p.binary_frame,
                created_ms: now,
                expires_ms,
                user_id: p.user_id.clone(),
            });
            let durable = p.persist != Persist::No;
            if durable {
                log_pos = self.log_append(&Record::Message { topic: p.topic.clone(), msg: (*stored).clone() });
            }
            if self.checkpointed.get() {
                // Shutting down, after this shard's checkpoints (a publish routed here from a
                // shard still draining): the stream must still end on a checkpoint, or the
                // restart would take the shutdown for a crash and start a new epoch.
                let cp = Record::Checkpoint { topic: p.topic.clone(), epoch: t.epoch().clone(), last_offset: offset };
                log_pos = self.log_append(&cp).or(log_pos);
            }
            t.history.push(stored.clone(), durable, &limits);
            let formats = t.formats();
            if formats.is_empty() {
                return log_pos;
            }
            let mut frames = encode_stored(&p.topic, &stored, formats, false);
            frames.sequenced = Some(std::time::Instant::now());
            let frames = Arc::new(frames);
            (frames, t.listening_shards().collect::<Vec<usize>>())
        };
        let exclude = if p.exclude_sender { origin } else { None };
        for shard in targets {
            self.route(shard, ShardMsg::Deliver { topic: p.topic.clone(), frames: frames.clone(), exclude });
        }
        log_pos
    }

    /// Owner side, cluster mode: a message the cluster sequenced (on any node): store it under
    /// its cluster-wide epoch and offset and, when `live`, deliver it as [`Shard::sequence`]
    /// would. Offsets this owner already has (a batch that came again after a reconnect) are
    /// dropped.
    pub(super) fn sequence_remote(&self, m: wire::Sequenced, exclude: Option<Origin>, live: bool) {
        let limits = self.cfg.limits.history();
        let (topic, persisted) = (m.topic.clone(), m.persisted);
        let (frames, targets) = {
            let mut owned = self.owned.borrow_mut();
            let t = owned
                .entry(topic.clone())
                .or_insert_with(|| OwnedTopic::resume(m.epoch.clone(), m.offset.saturating_sub(1), self.shards));
            if *t.epoch() == m.epoch && m.offset <= t.last_offset() {
                return;
            }
            t.continue_at(&m.epoch, m.offset);
            t.next_offset();
            ShardStats::add(&self.my_stats().published, 1);
            let stored = Arc::new(m.into_stored()); // its epoch is now the topic's
            t.history.push(stored.clone(), persisted, &limits);
            let formats = t.formats();
            if !live || formats.is_empty() {
                return;
            }
            let mut frames = encode_stored(&topic, &stored, formats, false);
            frames.sequenced = Some(std::time::Instant::now());
            let frames = Arc::new(frames);
            (frames, t.listening_shards().collect::<Vec<usize>>())
        };
        for shard in targets {
            self.route(shard, ShardMsg::Deliver { topic: topic.clone(), frames: frames.clone(), exclude });
        }
    }

    /// Owner side: a joiner's backlog.
    pub(super) fn owner_backlog(&self, topic: Topic, from: usize, conn: ConnId, format: Format, want: Backlog) {
        let mut fs = FormatSet::default();
        fs.insert(format);
        let encode = |msgs: Vec<Arc<StoredMsg>>| -> Vec<(u64, Bytes)> {
            msgs.iter()
                .filter_map(|m| Some((m.offset, encode_stored(&topic, m, fs, true).get(format)?.clone())))
                .collect()
        };
        let (frames, position) = {
            let mut owned = self.owned.borrow_mut();
            if let Some(t) = owned.get_mut(&topic).filter(|_| format == Format::Sse) {
                // A position handed out (an SSE stream announces it even before any message) is
                // one a client may resume from: keep the topic, and so its epoch, for at least
                // the window's age after its last subscriber leaves.
                t.keep_until_ms = t.keep_until_ms.max(unix_ms() + self.cfg.limits.window_age.as_millis() as u64);
            }
            let t = owned.get(&topic);
            let position = t.map(|t| (t.epoch().clone(), t.last_offset()));
            let frames = match (&want, t) {
                (Backlog::Position, _) | (Backlog::Replay { .. }, None) => Vec::new(),
                (Backlog::Replay { since_ms, limit }, Some(t)) => encode(t.history.replay(*since_ms, *limit as usize)),
                (Backlog::Resume { epoch, offset }, Some(t)) if **t.epoch() == **epoch => {
                    match t.history.resume(epoch, *offset, t.last_offset()) {
                        Ok(msgs) => encode(msgs),
                        Err(gap) => vec![(
                            0,
                            resume_error(
                                &topic,
                                format,
                                &format!(
                                    "resume impossible: messages after offset {offset} are no longer available; \
                                     the oldest available message has offset {}",
                                    gap.oldest_available
                                ),
                                t.epoch(),
                                gap.oldest_available,
                            ),
                        )],
                    }
                }
                (Backlog::Resume { epoch, .. }, t) => {
                    let (current, oldest) = t.map_or((Arc::from(""), 1), |t| (t.epoch().clone(), t.last_offset() + 1));
                    vec![(
                        0,
                        resume_error(
                            &topic,
                            format,
                            &format!(
                                "resume impossible: unknown epoch {epoch:?} (the stream was lost or never existed)"
                            ),
                            &current,
                            oldest,
                        ),
                    )]
                }
            };
            (frames, position)
        };
        self.route(from, ShardMsg::BacklogReply { topic, conn, frames, position });
    }

    /// Subscriber side: the backlog arrived: queue it (an SSE stream also gets its resume
    /// token in front of each message), then let live messages through.
    pub(super) fn deliver_backlog(
        &self,
        topic: &Topic,
        conn: ConnId,
        frames: Vec<(u64, Bytes)>,
        position: Option<(Arc<str>, u64)>,
    ) {
        {
            let mut conns = self.conns.borrow_mut();
            let Some(slot) = conns.get_mut(conn.index as usize).filter(|s| s.generation == conn.generation) else {
                return;
            };
            let (pieces, all_answered) = match &mut slot.kind {
                Kind::Sse(sse) => {
                    sse.unanswered = sse.unanswered.saturating_sub(1);
                    (sse.backlog(topic, frames, position), sse.unanswered == 0)
                }
                _ => (frames.into_iter().map(|(_, f)| f).collect(), false),
            };
            for piece in pieces {
                self.enqueue(conn.index, slot, piece);
            }
            drop(conns);
            if all_answered {
                self.release_hold(conn);
            }
        }
        self.registry.borrow_mut().backlog_done(topic, conn);
    }

    /// Owner side: a history page as a complete HTTP response.
    pub(super) fn owner_history(
        &self,
        topic: &Topic,
        before: Option<u64>,
        before_ms: Option<u64>,
        limit: usize,
        keep_alive: bool,
    ) -> Bytes {
        let owned = self.owned.borrow();
        let mut body = Vec::with_capacity(256);
        body.extend_from_slice(b"{\"epoch\":");
        // The stream's position (epoch, newest offset, persisted or not): where a client that
        // read this page resumes from to get everything after it.
        match owned.get(topic) {
            Some(t) => {
                write_str(&mut body, t.epoch());
                body.extend_from_slice(b",\"offset\":");
                write_u64(&mut body, t.last_offset());
            }
            None => body.extend_from_slice(b"null,\"offset\":null"),
        }
        body.extend_from_slice(b",\"messages\":[");
        if let Some(t) = owned.get(topic) {
            for (i, m) in t.history.page(before, before_ms, limit).iter().enumerate() {
                if i > 0 {
                    body.push(b',');
                }
                body.extend_from_slice(b"{\"id\":");
                write_str(&mut body, &m.id);
                body.extend_from_slice(b",\"offset\":");
                write_u64(&mut body, m.offset);
                body.extend_from_slice(b",\"epoch\":");
                write_str(&mut body, &m.epoch);
                body.extend_from_slice(b",\"event\":");
                write_str(&mut body, &m.event);
                body.extend_from_slice(b",\"payload\":");
                match &m.payload {
                    Payload::Json(p) => body.extend_from_slice(p),
                    Payload::Binary(p) => {
                        write_str(&mut body, &base64::engine::general_purpose::STANDARD.encode(p));
                        body.extend_from_slice(b",\"encoding\":\"base64\"");
                    }
                }
                body.extend_from_slice(b",\"created_at\":\"");
                write_iso8601_ms(&mut body, i64::try_from(m.created_ms).unwrap_or(i64::MAX));
                body.extend_from_slice(b"\",\"created_at_ms\":");
                write_u64(&mut body, m.created_ms);
                body.extend_from_slice(b",\"user_id\":");
                match &m.user_id {
                    Some(u) => write_str(&mut body, u),
                    None => body.extend_from_slice(b"null"),
                }
                body.push(b'}');
            }
        }
        body.extend_from_slice(b"]}");
        Bytes::from(http::response(200, "application/json", &body, keep_alive))
    }

    /// Drops expired history and forgets topics nobody needs (called once a second).
    pub(super) fn expire_topics(&self) {
        let now = unix_ms();
        let limits = self.cfg.limits.history();
        let mut owned = self.owned.borrow_mut();
        owned.retain(|_, t| {
            t.history.expire(now, &limits);
            !t.is_disposable(now)
        });
        let members: usize = owned.values().filter_map(|t| t.presence.as_ref()).map(|p| p.len()).sum();
        let st = self.my_stats();
        st.topics.store(owned.len() as i64, std::sync::atomic::Ordering::Relaxed);
        st.presence_members.store(members as i64, std::sync::atomic::Ordering::Relaxed);
    }

    /// Queues a record for the log writer; returns the logical log position after it (what a
    /// sync must cover before the record is durable), or `None` when the log is off.
    fn log_append(&self, rec: &Record) -> Option<u64> {
        if matches!(self.durable, Durable::Off) {
            return None;
        }
        if self.log_closed.fired() {
            return None; // the writer could not start (or has stopped): nothing to wait for
        }
        let mut buf = self.log_buf.borrow_mut();
        let before = buf.len();
        log::encode(rec, &mut buf);
        let pos = self.log_appended.get() + (buf.len() - before) as u64;
        self.log_appended.set(pos);
        if let Some(w) = self.log_waker.borrow_mut().take() {
            w.wake();
        }
        Some(pos)
    }

    /// Holds the acknowledgement of a persisted message until the log is synced past `pos`.
    pub(super) fn ack_when_durable(&self, pos: u64, shard: usize, conn: ConnId, frame: Option<Bytes>) {
        self.durable_acks.borrow_mut().push_back((pos, shard, conn, frame));
    }

    /// Sends the acknowledgements of every persisted message now synced (up to `synced`).
    pub(super) fn release_durable_acks(&self, synced: u64) {
        loop {
            let next = {
                let mut acks = self.durable_acks.borrow_mut();
                match acks.front() {
                    Some((pos, ..)) if *pos <= synced => acks.pop_front(),
                    _ => None,
                }
            };
            let Some((_, shard, conn, frame)) = next else { return };
            self.route(shard, ShardMsg::Sequenced { conn, frame });
        }
    }

    /// At a clean shutdown: a checkpoint per owned topic, so every stream keeps its epoch
    /// across the restart (a client that had seen everything can resume; one that missed a
    /// message that was not persisted is told so).
    pub fn write_checkpoints(&self) {
        if self.cluster.is_some() {
            return; // the cluster's sequencer keeps every topic's position
        }
        self.checkpointed.set(true);
        let owned = self.owned.borrow();
        for (topic, t) in owned.iter() {
            self.log_append(&Record::Checkpoint {
                topic: topic.clone(),
                epoch: t.epoch().clone(),
                last_offset: t.last_offset(),
            });
        }
    }

    fn snapshot_records(&self) -> Vec<u8> {
        let mut buf = Vec::new();
        for (topic, t) in self.owned.borrow().iter() {
            for m in t.history.durable() {
                log::encode(&Record::Message { topic: topic.clone(), msg: (**m).clone() }, &mut buf);
            }
        }
        buf
    }

    /// The log writer: appends queued records, `fdatasync`s after each batch (records that
    /// arrive during a sync form the next batch: group commit), compacts big segments, and
    /// on shutdown flushes and closes. Runs until shutdown.
    pub async fn log_loop(self: Rc<Self>) {
        let generation = match &self.durable {
            Durable::Off => return,
            Durable::Postgres(pg) => return self.clone().pg_loop(pg.clone()).await,
            Durable::Log { generation } => *generation,
        };
        let dir = self.cfg.data_dir.clone();
        let mut seq = 1u32;
        // Compact when the segment has grown to twice the live data it holds after the last
        // compaction (and at least COMPACT_BYTES): amortized, each record is rewritten O(1) times.
        let mut compact_at = log::COMPACT_BYTES;
        let mut w = match open_segment(&dir, generation, seq, self.id).await {
            Ok(w) => w,
            Err(e) => {
                tracing::error!(shard = self.id, error = %e, "history log: cannot open a segment; persistence is off");
                self.log_closed.fire();
                return;
            }
        };
        loop {
            futures_lite::future::poll_fn(|cx| {
                if self.log_buf.borrow().is_empty() && !self.log_stop.fired() {
                    *self.log_waker.borrow_mut() = Some(cx.waker().clone());
                    std::task::Poll::Pending
                } else {
                    std::task::Poll::Ready(())
                }
            })
            .await;
            let buf = std::mem::take(&mut *self.log_buf.borrow_mut());
            let upto = self.log_appended.get();
            let result = async {
                if !buf.is_empty() {
                    w.write_all(&buf).await?;
                    w.sync().await?;
                }
                Ok::<(), std::io::Error>(())
            }
            .await;
            if let Err(e) = result {
                tracing::error!(shard = self.id, error = %e, "history log: write failed; acknowledging anyway");
            }
            self.release_durable_acks(upto);
            if self.log_stop.fired() && self.log_buf.borrow().is_empty() {
                let _ = w.close().await;
                self.log_closed.fire();
                return;
            }
            // Never at shutdown: the snapshot holds messages only, so compacting after the
            // checkpoints were written would delete them, and the restart would take the clean
            // shutdown for a crash (a new epoch for every topic). The next start compacts.
            if !self.log_stop.fired() && w.current_pos() > compact_at {
                // Rewrite the live durable set into a fresh segment, then drop the old ones.
                seq += 1;
                match open_segment(&dir, generation, seq, self.id).await {
                    Ok(mut nw) => {
                        let snap = self.snapshot_records();
                        compact_at = log::COMPACT_BYTES.max(2 * snap.len() as u64);
                        if nw.write_all(&snap).await.is_ok() && nw.sync().await.is_ok() {
                            let mut old = std::mem::replace(&mut w, nw);
                            let _ = old.close().await;
                            for s in 1..seq {
                                let _ = std::fs::remove_file(dir.join(log::segment_name(generation, s, self.id)));
                            }
                            let _ = log::sync_dir(&dir);
                        }
                    }
                    Err(e) => tracing::error!(shard = self.id, error = %e, "history log: compaction failed"),
                }
            }
        }
    }
}

impl Shard {
    /// The log writer for the Postgres store: hands each batch of records to the writer
    /// thread and releases its acknowledgements once the commit is reported; records queued
    /// meanwhile form the next batch (group commit).
    async fn pg_loop(self: Rc<Self>, pg: PgHistory) {
        loop {
            self.wait_log(|| !self.log_buf.borrow().is_empty() || self.log_stop.fired()).await;
            let records = std::mem::take(&mut *self.log_buf.borrow_mut());
            let upto = self.log_appended.get();
            if !records.is_empty() {
                pg.send(WriteBatch { shard: self.id, upto, records });
                self.wait_log(|| self.pg_synced.get() >= upto).await;
            }
            self.release_durable_acks(upto);
            if self.log_stop.fired() && self.log_buf.borrow().is_empty() {
                self.log_closed.fire();
                return;
            }
        }
    }

    /// Waits until `ready` holds, woken through `log_waker`.
    async fn wait_log(&self, ready: impl Fn() -> bool) {
        futures_lite::future::poll_fn(|cx| {
            if ready() {
                std::task::Poll::Ready(())
            } else {
                *self.log_waker.borrow_mut() = Some(cx.waker().clone());
                std::task::Poll::Pending
            }
        })
        .await;
    }
}

async fn open_segment(
    dir: &std::path::Path,
    generation: u64,
    seq: u32,
    shard: usize,
) -> std::io::Result<DmaStreamWriter> {
    let path = dir.join(log::segment_name(generation, seq, shard));
    let f = DmaFile::create(&path).await.map_err(|e| std::io::Error::other(e.to_string()))?;
    Ok(DmaStreamWriterBuilder::new(f).with_buffer_size(128 << 10).with_write_behind(2).build())
}

/// Frames of a stored message for `formats` (`replayed` marks history deliveries).
fn encode_stored(topic: &Topic, m: &StoredMsg, formats: FormatSet, replayed: bool) -> Frames {
    let wire = topic.wire_name();
    broadcast::encode(
        &broadcast::Message {
            wire_topic: &wire,
            event: &m.event,
            payload: &m.payload,
            binary_frame: m.binary_frame,
            id: &m.id,
            epoch: &m.epoch,
            offset: m.offset,
            replayed,
            user_id: m.user_id.as_deref(),
        },
        formats,
    )
}

/// The `system` error for an impossible resume, with where resuming would work now.
fn resume_error(topic: &Topic, format: Format, message: &str, epoch: &str, oldest: u64) -> Bytes {
    let vsn = match format {
        Format::V1 => Vsn::V1,
        _ => Vsn::V2,
    };
    let wire = topic.wire_name();
    let mut p = Vec::with_capacity(message.len() + 160);
    p.extend_from_slice(b"{\"extension\":\"system\",\"status\":\"error\",\"message\":");
    write_str(&mut p, message);
    p.extend_from_slice(b",\"channel\":");
    write_str(&mut p, topic.name());
    p.extend_from_slice(b",\"epoch\":");
    write_str(&mut p, epoch);
    p.extend_from_slice(b",\"oldest_offset\":");
    write_u64(&mut p, oldest);
    p.push(b'}');
    if format == Format::Sse {
        return crate::protocol::sse::topic_event(topic.name(), "system", &p);
    }
    message::encode(vsn, None, None, &wire, "system", &p)
}
