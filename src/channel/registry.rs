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
    /// Its join reply is held until the owner acknowledges this shard's interest: nothing is
    /// delivered to it before that (a message still in flight from before the interest was
    /// registered would otherwise reach it ahead of its join reply). Set by [`Registry::hold`].
    pub held: bool,
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
    /// Interest additions sent to a remote owner and not yet acknowledged, per topic and
    /// format. It outlives the topic's local entry: when the last subscriber leaves and a new
    /// one joins before the owner answered, the first acknowledgement belongs to the old
    /// addition (the owner may since have dropped that interest), so only the last one may
    /// release the new joiner's reply.
    unacked: HashMap<(Topic, Format), u32, ahash::RandomState>,
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

    /// Every topic with local subscribers.
    pub fn topics(&self) -> impl Iterator<Item = (&Topic, &LocalTopic)> {
        self.topics.iter()
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

    /// An interest addition in `format` went to the topic's (remote) owner.
    pub fn interest_sent(&mut self, topic: &Topic, format: Format) {
        *self.unacked.entry((topic.clone(), format)).or_default() += 1;
    }

    /// Holds `frames` for `conn` until the owner acknowledges interest in `format`; nothing
    /// is delivered to `conn` on `topic` until then.
    pub fn hold(&mut self, topic: &Topic, format: Format, conn: ConnId, frames: Vec<Bytes>) {
        if let Some(t) = self.topics.get_mut(topic) {
            if let Some(s) = t.sub_mut(conn) {
                s.held = true;
            }
            t.pending[format.index()].get_or_insert_with(Vec::new).push((conn, frames));
        }
    }

    /// Whether interest in `format` is waiting for the owner's acknowledgement.
    pub fn is_pending(&self, topic: &Topic, format: Format) -> bool {
        self.unacked.get(&(topic.clone(), format)).is_some_and(|&n| n > 0)
    }

    /// The owner acknowledged one interest addition in `format`. When it was the last one
    /// outstanding, returns the held frames, in join order, and their subscribers go live;
    /// else nothing yet.
    pub fn release(&mut self, topic: &Topic, format: Format) -> Held {
        let key = (topic.clone(), format);
        match self.unacked.get_mut(&key) {
            Some(n) if *n > 1 => {
                *n -= 1;
                return Vec::new();
            }
            _ => {
                self.unacked.remove(&key);
            }
        }
        let Some(t) = self.topics.get_mut(topic) else { return Vec::new() };
        let held = t.pending[format.index()].take().unwrap_or_default();
        for (conn, _) in &held {
            if let Some(s) = t.sub_mut(*conn) {
                s.held = false;
            }
        }
        held
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
            held: false,
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
        r.interest_sent(&t, Format::V2);
        r.hold(&t, Format::V2, ConnId { index: 1, generation: 0 }, vec![Bytes::from_static(b"a")]);
        assert!(r.sub(&t, ConnId { index: 1, generation: 0 }).unwrap().held);
        r.add(&t, sub(2, Format::V2));
        r.hold(&t, Format::V2, ConnId { index: 2, generation: 0 }, vec![Bytes::from_static(b"b")]);
        assert!(r.is_pending(&t, Format::V2));
        let held = r.release(&t, Format::V2);
        assert_eq!(held.iter().map(|(c, _)| c.index).collect::<Vec<_>>(), vec![1, 2]);
        assert!(!r.is_pending(&t, Format::V2));
        assert!(!r.sub(&t, ConnId { index: 1, generation: 0 }).unwrap().held);
        assert!(r.release(&t, Format::V2).is_empty());
    }

    /// The last subscriber leaves and a new one joins before the owner answered the first
    /// addition: the first acknowledgement must not release the new joiner (the owner may
    /// have dropped that interest since); the second does.
    #[test]
    fn only_the_last_outstanding_ack_releases() {
        let t = Topic::new("room", false).unwrap();
        let mut r = Registry::new();
        let (a, b) = (ConnId { index: 1, generation: 0 }, ConnId { index: 2, generation: 0 });
        assert_eq!(r.add(&t, sub(1, Format::V2)), vec![InterestChange::Added(Format::V2)]);
        r.interest_sent(&t, Format::V2);
        r.hold(&t, Format::V2, a, vec![]);
        assert_eq!(r.remove(&t, a), vec![InterestChange::Removed(Format::V2)]);
        assert_eq!(r.add(&t, sub(2, Format::V2)), vec![InterestChange::Added(Format::V2)]);
        r.interest_sent(&t, Format::V2);
        r.hold(&t, Format::V2, b, vec![Bytes::from_static(b"reply")]);
        assert!(r.release(&t, Format::V2).is_empty(), "the old addition's ack");
        assert!(r.is_pending(&t, Format::V2));
        assert!(r.sub(&t, b).unwrap().held);
        let held = r.release(&t, Format::V2);
        assert_eq!(held.iter().map(|(c, _)| c.index).collect::<Vec<_>>(), vec![2]);
        assert!(!r.sub(&t, b).unwrap().held);
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
        assert_eq!(r.set_tracked(&t, id(50), true), Some(true), "tracking turns presence on");
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
