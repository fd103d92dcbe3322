//! Presence on the shards: the owner side (state, limits, coalesced diffs) and the subscriber
//! side (forwarding tracks, delivering state and diffs).
//!
//! The topic's owner keeps its [`crate::channel::presence::Presence`]. A `track` travels to the
//! owner, which answers the push (so a refusal has a precise reason) and records the change;
//! diffs collect for `--presence-diff-ms` and then go out as one `presence_diff` per
//! subscriber, encoded once per wire format. A join with presence enabled asks the owner for
//! the state after its interest (same FIFO channel), so `presence_state` follows the join reply;
//! the state body is encoded once per window and shared by all joiners of that window.

use std::rc::Rc;
use std::sync::Arc;

use bytes::Bytes;

use crate::bus::ShardMsg;
use crate::channel::broadcast::Frames;
use crate::channel::presence::{MemberId, Presence, Tracked};
use crate::channel::registry::ConnId;
use crate::channel::topic::OwnedTopic;
use crate::channel::Format;
use crate::cluster::{wire, ClusterOut};
use crate::protocol::json::write_str;
use crate::protocol::phoenix::message::{self, Vsn};
use crate::protocol::phoenix::session::ReplyTo;
use crate::protocol::phoenix::Topic;
use crate::protocol::ws::frame::{write_header, OpCode};
use crate::shard::Shard;

/// A connection's id on its shard as a member's `conn`.
pub(super) fn conn_key(conn: ConnId) -> u64 {
    ((conn.index as u64) << 32) | conn.generation as u64
}

impl Shard {
    /// Subscriber side: forwards a track to the owner (which replies).
    pub(super) fn track(&self, id: ConnId, topic: Topic, key: Arc<str>, meta: Bytes, reply: ReplyTo) {
        let Some(enabled) = self.registry.borrow_mut().set_tracked(&topic, id, true) else {
            // The join is still waiting for the database's authorization.
            self.send(id, reply.frame(&topic, Some("presence needs a joined channel: wait for the join reply")));
            return;
        };
        let owner = topic.owner(self.shards);
        self.route(owner, ShardMsg::Track { topic: topic.clone(), from: self.id, conn: id, key, meta, reply });
        if enabled {
            // This track turned presence on for a channel joined without it (a `presence.key`
            // but no `enabled`): like Supabase Realtime, send the state now (after the track on
            // the same FIFO, so it includes this member), then diffs. Without it a client that
            // waits for the first `presence_state` (phoenix.js's Presence) never syncs.
            self.route(owner, ShardMsg::PresenceSync { topic, from: self.id, conn: id });
        }
    }

    /// Subscriber side: stops tracking (untrack, leave, rejoin, disconnect), if tracked.
    pub(super) fn untrack(&self, id: ConnId, topic: &Topic) {
        let tracked = self.registry.borrow().sub(topic, id).is_some_and(|s| s.tracked);
        if tracked {
            let _ = self.registry.borrow_mut().set_tracked(topic, id, false);
            let owner = topic.owner(self.shards);
            self.route(owner, ShardMsg::PresenceLeave { topic: topic.clone(), from: self.id, conn: id });
        }
    }

    /// Owner side: a track.
    pub(super) fn owner_track(&self, topic: Topic, from: usize, conn: ConnId, key: &str, meta: Bytes, reply: ReplyTo) {
        let max = self.cfg.limits.presence_max_entries;
        let result = {
            let mut owned = self.owned.borrow_mut();
            match owned.get_mut(&topic) {
                None => Err("presence needs a joined channel".to_string()),
                Some(t) => {
                    let p = t.presence.get_or_insert_with(|| Presence::new(&self.presence_prefix));
                    let had_diff = p.has_diff();
                    let member = MemberId { run: self.run, shard: from as u32, conn: conn_key(conn) };
                    let r = p.track(member, key, meta.clone(), max).map_err(|e| e.to_string());
                    if let (Some(c), Ok(Tracked::Joined | Tracked::Updated)) = (&self.cluster, &r) {
                        c.send(ClusterOut::Track {
                            topic: topic.clone(),
                            member: wire::Member { shard: from as u32, conn: conn_key(conn) },
                            key: Arc::from(key),
                            meta: meta.clone(),
                        });
                    }
                    if matches!(r, Ok(Tracked::Joined | Tracked::Updated)) && !had_diff {
                        self.presence_dirty.borrow_mut().push(topic.clone());
                    }
                    r.map(|_| ())
                }
            }
        };
        self.wake_presence_flush();
        self.route(from, ShardMsg::TrackResult { topic, conn, reply, error: result.err() });
    }

    /// Owner side: a member went away.
    pub(super) fn owner_untrack(&self, topic: &Topic, from: usize, conn: ConnId) {
        let mut owned = self.owned.borrow_mut();
        let Some(p) = owned.get_mut(topic).and_then(|t| t.presence.as_mut()) else { return };
        let had_diff = p.has_diff();
        let untracked = p.untrack(MemberId { run: self.run, shard: from as u32, conn: conn_key(conn) });
        if untracked && !had_diff && p.has_diff() {
            self.presence_dirty.borrow_mut().push(topic.clone());
        }
        if let (Some(c), true) = (&self.cluster, untracked) {
            c.send(ClusterOut::Untrack {
                topic: topic.clone(),
                member: wire::Member { shard: from as u32, conn: conn_key(conn) },
            });
        }
        drop(owned);
        self.wake_presence_flush();
    }

    /// Owner side: another node's member tracked (`meta`: its state) or left (`None`).
    pub(super) fn owner_remote_track(
        &self,
        topic: Topic,
        run: u64,
        member: wire::Member,
        key: &str,
        meta: Option<Bytes>,
    ) {
        if self.dead_runs.borrow().contains(&run) {
            return; // a late change from a node already gone: it would come back as a ghost
        }
        let id = MemberId { run, shard: member.shard, conn: member.conn };
        let mut owned = self.owned.borrow_mut();
        let t = owned.entry(topic.clone()).or_insert_with(|| OwnedTopic::new(self.new_epoch(), self.shards));
        let p = t.presence.get_or_insert_with(|| Presence::new(&self.presence_prefix));
        let had_diff = p.has_diff();
        let changed = match meta {
            // The limit is each node's to enforce for its own members; a remote one is taken as is.
            Some(state) => matches!(p.track(id, key, state, usize::MAX), Ok(Tracked::Joined | Tracked::Updated)),
            None => p.untrack(id),
        };
        if changed && !had_diff && p.has_diff() {
            self.presence_dirty.borrow_mut().push(topic);
        }
        drop(owned);
        self.wake_presence_flush();
    }

    /// Owner side: node processes `gone` left (their members leave everywhere); `joined`
    /// appeared (this shard announces its own members again, so they learn them).
    pub(super) fn members_changed(&self, gone: &[u64], joined: &[u64]) {
        {
            let mut dead = self.dead_runs.borrow_mut();
            dead.extend(gone.iter().copied().filter(|&r| r != self.run));
            for r in joined {
                dead.remove(r);
            }
        }
        let mut owned = self.owned.borrow_mut();
        let mut dirty = self.presence_dirty.borrow_mut();
        for (topic, t) in owned.iter_mut() {
            let Some(p) = t.presence.as_mut() else { continue };
            let had_diff = p.has_diff();
            for &r in gone.iter().filter(|&&r| r != self.run) {
                p.untrack_run(r);
            }
            if !had_diff && p.has_diff() {
                dirty.push(topic.clone());
            }
            if let (Some(c), false) = (&self.cluster, joined.is_empty()) {
                for (m, key, state) in p.members_of(self.run) {
                    c.send(ClusterOut::Track {
                        topic: topic.clone(),
                        member: wire::Member { shard: m.shard, conn: m.conn },
                        key: Arc::from(&*key),
                        meta: state,
                    });
                }
            }
        }
        drop((owned, dirty));
        self.wake_presence_flush();
    }

    /// Owner side: a joiner wants the state.
    pub(super) fn owner_sync(&self, topic: Topic, from: usize, conn: ConnId) {
        let body = {
            let mut owned = self.owned.borrow_mut();
            match owned.get_mut(&topic) {
                Some(t) => t.presence.get_or_insert_with(|| Presence::new(&self.presence_prefix)).state(),
                None => Bytes::from_static(b"{}"),
            }
        };
        self.route(from, ShardMsg::PresenceState { topic, conn, body });
    }

    fn wake_presence_flush(&self) {
        if !self.presence_dirty.borrow().is_empty() {
            if let Some(w) = self.presence_waker.borrow_mut().take() {
                w.wake();
            }
        }
    }

    /// Subscriber side: `presence_state` for one connection, built as three pieces so the
    /// (possibly large) shared body is never copied: frame header + prefix with this
    /// connection's join ref, the body, and the closing bytes.
    pub(super) fn deliver_presence_state(&self, topic: &Topic, conn: ConnId, body: Bytes) {
        let Some((format, join_ref)) = self.registry.borrow().sub(topic, conn).map(|s| (s.format, s.join_ref.clone()))
        else {
            return;
        };
        let wire = topic.wire_name();
        let mut prefix = Vec::with_capacity(wire.len() + 48);
        let suffix: &'static [u8] = match format {
            Format::V2 => {
                prefix.push(b'[');
                prefix.extend_from_slice(join_ref.as_deref().unwrap_or("null").as_bytes());
                prefix.extend_from_slice(b",null,");
                write_str(&mut prefix, &wire);
                prefix.extend_from_slice(b",\"presence_state\",");
                b"]"
            }
            Format::V1 => {
                prefix.extend_from_slice(b"{\"topic\":");
                write_str(&mut prefix, &wire);
                prefix.extend_from_slice(b",\"event\":\"presence_state\",\"payload\":");
                b",\"ref\":null}"
            }
            Format::Sse => {
                // Shared: the state body is large, the framing small; one copy per stream.
                self.send(conn, crate::protocol::sse::topic_event(topic.name(), "presence_state", &body));
                return;
            }
        };
        let mut head = Vec::with_capacity(10 + prefix.len());
        write_header(&mut head, OpCode::Text, true, prefix.len() + body.len() + suffix.len());
        head.extend_from_slice(&prefix);
        for piece in [Bytes::from(head), body, Bytes::from_static(suffix)] {
            self.send(conn, piece);
        }
    }

    /// Subscriber side: a diff for every presence-enabled subscriber of `topic`.
    pub(super) fn deliver_presence_diff(&self, topic: &Topic, frames: &Frames) {
        let registry = self.registry.borrow();
        let Some(local) = registry.get(topic) else { return };
        let mut conns = self.conns.borrow_mut();
        for sub in local.subs.iter().filter(|s| s.presence && !s.held) {
            let Some(frame) = frames.get(sub.format) else { continue };
            let Some(slot) = conns.get_mut(sub.conn.index as usize) else { continue };
            if slot.generation == sub.conn.generation {
                self.enqueue(sub.conn.index, slot, frame.clone());
            }
        }
    }

    /// Owner side: at the end of each coalescing window, sends every pending diff. Runs
    /// forever.
    pub async fn presence_flush_loop(self: Rc<Self>) {
        let window = self.cfg.limits.presence_diff;
        loop {
            futures_lite::future::poll_fn(|cx| {
                if self.presence_dirty.borrow().is_empty() {
                    *self.presence_waker.borrow_mut() = Some(cx.waker().clone());
                    std::task::Poll::Pending
                } else {
                    std::task::Poll::Ready(())
                }
            })
            .await;
            glommio::timer::sleep(window).await;
            self.flush_presence_diffs();
        }
    }

    /// Owner side: the end of a coalescing window: sends every pending diff to the shards
    /// listening to its topic.
    pub(super) fn flush_presence_diffs(&self) {
        let topics = std::mem::take(&mut *self.presence_dirty.borrow_mut());
        for topic in topics {
            let out = {
                let mut owned = self.owned.borrow_mut();
                let Some(t) = owned.get_mut(&topic) else { continue };
                let Some(diff) = t.presence.as_mut().and_then(Presence::take_diff) else { continue };
                let formats = t.formats();
                let wire = topic.wire_name();
                let mut by_format: [Option<Bytes>; 3] = [None, None, None];
                for (f, vsn) in [(Format::V1, Vsn::V1), (Format::V2, Vsn::V2)] {
                    if formats.contains(f) {
                        by_format[f.index()] = Some(message::encode(vsn, None, None, &wire, "presence_diff", &diff));
                    }
                }
                if formats.contains(Format::Sse) {
                    by_format[Format::Sse.index()] =
                        Some(crate::protocol::sse::topic_event(topic.name(), "presence_diff", &diff));
                }
                let targets: Vec<usize> = t.listening_shards().collect();
                (
                    Arc::new(Frames {
                        by_format,
                        offset: 0,
                        epoch: t.epoch().clone(),
                        sse_with_id: None,
                        sequenced: None,
                    }),
                    targets,
                )
            };
            let (frames, targets) = out;
            for shard in targets {
                self.route(shard, ShardMsg::DeliverPresence { topic: topic.clone(), frames: frames.clone() });
            }
        }
    }
}
