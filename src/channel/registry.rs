//! The local subscriber registry of one shard: topic → connections subscribed on this shard.
//!
//! It tracks, per topic, how many local subscribers use each wire format, and reports the
//! 0→1 and 1→0 transitions: those (and only those) are sent to the topic's owner as interest
//! changes, so the owner knows which shards to send a message to and which formats to encode.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;

use crate::channel::Format;
use crate::protocol::phoenix::Topic;

/// Identifies a connection on its shard: slab index plus a generation that changes when the
/// slot is reused, so stale ids never reach a new connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ConnId {
    pub index: u32,
    pub generation: u32,
}

/// One local subscription.
#[derive(Debug, Clone)]
pub struct LocalSub {
    pub conn: ConnId,
    pub format: Format,
    /// Presence diffs are delivered to this subscriber.
    pub presence: bool,
    /// Join ref (raw JSON token) for frames that must carry it (`presence_state`).
    pub join_ref: Option<Arc<str>>,
    /// The channel has `postgres_changes` bindings registered with the ingest thread.
    pub pg: bool,
    /// The connection tracks presence on this topic (the owner must be told when it goes).
    pub tracked: bool,
    /// Waiting for its backlog from the owner: live messages are skipped until it arrives
    /// (they are in the backlog).
    pub awaiting_backlog: bool,
}

/// Frames held per connection until a subscription is in effect, in join order.
pub type Held = Vec<(ConnId, Vec<Bytes>)>;

/// Subscribers of one topic on this shard.
#[derive(Debug, Default)]
pub struct LocalTopic {
    pub subs: Vec<LocalSub>,
    /// Position of each connection's entry in `subs`: joins and leaves are O(1) however big
    /// the topic (a reconnect storm into a 50,000-subscriber topic would otherwise be
    /// quadratic).
    index: HashMap<ConnId, u32, ahash::RandomState>,
    counts: [u32; 3],
    presence_count: u32,
    /// Per format: while the owner has not yet acknowledged this shard's interest, the frames
    /// (join replies) held for each new subscriber, released in order on the acknowledgement.
    pending: [Option<Held>; 3],
}

/// A change in what this shard needs from a topic's owner.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InterestChange {
    /// The first local subscriber in this format arrived.
    Added(Format),
    /// The last local subscriber in this format left.
    Removed(Format),
}

/// Topic → local subscribers.
#[derive(Debug, Default)]
pub struct Registry {
    topics: HashMap<Topic, LocalTopic, ahash::RandomState>,
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Local subscribers of `topic`.
    pub fn get(&self, topic: &Topic) -> Option<&LocalTopic> {
        self.topics.get(topic)
    }

    /// `conn`'s subscription to `topic`, if any.
    pub fn sub(&self, topic: &Topic, conn: ConnId) -> Option<&LocalSub> {
        let t = self.topics.get(topic)?;
        t.subs.get(*t.index.get(&conn)? as usize)
    }

    /// Number of topics with local subscribers.
    pub fn topic_count(&self) -> usize {
        self.topics.len()
    }

    /// Adds a subscription (replacing one of the same connection); reports interest changes.
    pub fn add(&mut self, topic: &Topic, sub: LocalSub) -> Vec<InterestChange> {
        let mut changes = self.remove(topic, sub.conn);
        let t = self.topics.entry(topic.clone()).or_default();
        let i = sub.format.index();
        t.counts[i] += 1;
        if sub.presence {
            t.presence_count += 1;
        }
        if t.counts[i] == 1 {
            // A remove+add of the same format cancels out.
            if let Some(pos) = changes.iter().position(|c| *c == InterestChange::Removed(sub.format)) {
                changes.remove(pos);
            } else {
                changes.push(InterestChange::Added(sub.format));
            }
        }
        t.index.insert(sub.conn, t.subs.len() as u32);
        t.subs.push(sub);
        changes
    }

    /// Removes `conn`'s subscription to `topic`, if any; reports interest changes.
    pub fn remove(&mut self, topic: &Topic, conn: ConnId) -> Vec<InterestChange> {
        let Some(t) = self.topics.get_mut(topic) else {
            return Vec::new();
        };
        let Some(pos) = t.index.remove(&conn).map(|p| p as usize) else {
            return Vec::new();
        };
        let sub = t.subs.swap_remove(pos);
        if let Some(moved) = t.subs.get(pos) {
            t.index.insert(moved.conn, pos as u32);
        }
        let i = sub.format.index();
        t.counts[i] -= 1;
        if sub.presence {
            t.presence_count -= 1;
        }
        let mut changes = Vec::new();
        if t.counts[i] == 0 {
            changes.push(InterestChange::Removed(sub.format));
        }
        if t.subs.is_empty() {
            self.topics.remove(topic);
        }
        changes
    }

    /// Holds `frames` for `conn` until the owner acknowledges interest in `format`.
    pub fn hold(&mut self, topic: &Topic, format: Format, conn: ConnId, frames: Vec<Bytes>) {
        if let Some(t) = self.topics.get_mut(topic) {
            t.pending[format.index()].get_or_insert_with(Vec::new).push((conn, frames));
        }
    }

    /// Whether interest in `format` is waiting for the owner's acknowledgement.
    pub fn is_pending(&self, topic: &Topic, format: Format) -> bool {
        self.topics.get(topic).is_some_and(|t| t.pending[format.index()].is_some())
    }

    /// The owner acknowledged interest in `format`: returns the held frames, in join order.
    pub fn release(&mut self, topic: &Topic, format: Format) -> Held {
        self.topics.get_mut(topic).and_then(|t| t.pending[format.index()].take()).unwrap_or_default()
    }

    /// Marks `conn`'s backlog on `topic` as delivered.
    pub fn backlog_done(&mut self, topic: &Topic, conn: ConnId) {
        if let Some(s) = self.topics.get_mut(topic).and_then(|t| t.sub_mut(conn)) {
            s.awaiting_backlog = false;
        }
    }

    /// Records whether `conn` tracks presence on `topic`; tracking also turns presence on for
    /// a subscription that joined without it (as Supabase Realtime does). `None` when the
    /// subscription does not exist, else whether this call turned presence on (the caller then
    /// owes the subscriber a `presence_state`).
    pub fn set_tracked(&mut self, topic: &Topic, conn: ConnId, tracked: bool) -> Option<bool> {
        let t = self.topics.get_mut(topic)?;
        let s = t.sub_mut(conn)?;
        s.tracked = tracked;
        let enabled = tracked && !s.presence;
        if enabled {
            s.presence = true;
            t.presence_count += 1;
        }
        Some(enabled)
    }
}

impl LocalTopic {
    fn sub_mut(&mut self, conn: ConnId) -> Option<&mut LocalSub> {
        let i = *self.index.get(&conn)? as usize;
        self.subs.get_mut(i)
    }

    /// Subscribers that receive presence diffs.
    pub fn presence_subscribers(&self) -> u32 {
        self.presence_count
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sub(i: u32, f: Format) -> LocalSub {
        LocalSub {
            conn: ConnId { index: i, generation: 0 },
            format: f,
            presence: false,
            join_ref: None,
            pg: false,
            tracked: false,
            awaiting_backlog: false,
        }
    }

    #[test]
    fn reports_only_transitions() {
        let t = Topic::new("room", false).unwrap();
        let mut r = Registry::new();
        assert_eq!(r.add(&t, sub(1, Format::V2)), vec![InterestChange::Added(Format::V2)]);
        assert_eq!(r.add(&t, sub(2, Format::V2)), vec![]);
        assert_eq!(r.add(&t, sub(3, Format::V1)), vec![InterestChange::Added(Format::V1)]);
        assert_eq!(r.remove(&t, ConnId { index: 1, generation: 0 }), vec![]);
        assert_eq!(r.remove(&t, ConnId { index: 2, generation: 0 }), vec![InterestChange::Removed(Format::V2)]);
        assert_eq!(r.remove(&t, ConnId { index: 9, generation: 0 }), vec![]);
        assert_eq!(r.remove(&t, ConnId { index: 3, generation: 0 }), vec![InterestChange::Removed(Format::V1)]);
        assert_eq!(r.topic_count(), 0);
    }

    #[test]
    fn holds_and_releases_in_order() {
        let t = Topic::new("room", false).unwrap();
        let mut r = Registry::new();
        r.add(&t, sub(1, Format::V2));
        assert!(!r.is_pending(&t, Format::V2));
        r.hold(&t, Format::V2, ConnId { index: 1, generation: 0 }, vec![Bytes::from_static(b"a")]);
        r.add(&t, sub(2, Format::V2));
        r.hold(&t, Format::V2, ConnId { index: 2, generation: 0 }, vec![Bytes::from_static(b"b")]);
        assert!(r.is_pending(&t, Format::V2));
        let held = r.release(&t, Format::V2);
        assert_eq!(held.iter().map(|(c, _)| c.index).collect::<Vec<_>>(), vec![1, 2]);
        assert!(!r.is_pending(&t, Format::V2));
        assert!(r.release(&t, Format::V2).is_empty());
    }

    #[test]
    fn index_stays_right_through_swaps() {
        let t = Topic::new("big", false).unwrap();
        let mut r = Registry::new();
        let id = |i: u32| ConnId { index: i, generation: 0 };
        for i in 0..100 {
            r.add(&t, sub(i, Format::V2));
        }
        // remove every third, in an order that forces swaps from the end
        for i in (0..100).step_by(3) {
            r.remove(&t, id(i));
        }
        for i in 0..100 {
            assert_eq!(r.sub(&t, id(i)).is_some(), i % 3 != 0, "conn {i}");
            if i % 3 != 0 {
                assert_eq!(r.sub(&t, id(i)).unwrap().conn, id(i));
            }
        }
        assert_eq!(r.set_tracked(&t, id(50), true), Some(false));
        assert!(r.sub(&t, id(50)).unwrap().tracked);
    }

    #[test]
    fn rejoin_same_format_is_no_change() {
        let t = Topic::new("room", false).unwrap();
        let mut r = Registry::new();
        r.add(&t, sub(1, Format::V2));
        assert_eq!(r.add(&t, sub(1, Format::V2)), vec![]);
        assert_eq!(r.get(&t).unwrap().subs.len(), 1);
    }
}
