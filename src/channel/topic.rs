//! State of a topic on its owner shard: the epoch and next offset of its message stream, and
//! which shards listen in which wire formats.
//!
//! The owner sequences every message of the topic: each gets the next offset under the
//! current epoch. The epoch is a random token created with the stream; if the stream is lost
//! (the topic was dropped and recreated, or the server restarted without durable history) the
//! new stream gets a new epoch, so a client can tell "continue after offset N" from "your
//! position means nothing any more".

use std::sync::Arc;

use crate::channel::history::History;
use crate::channel::presence::Presence;
use crate::channel::{Format, FormatSet};

/// Owner-side topic state.
#[derive(Debug)]
pub struct OwnedTopic {
    epoch: Arc<str>,
    /// Offset the next message gets (offsets start at 1).
    next_offset: u64,
    /// `interest[shard]`: formats that shard's subscribers use.
    interest: Vec<FormatSet>,
    /// Presence, once anyone tracked or asked for it.
    pub presence: Option<Presence>,
    /// Recent window and durable messages.
    pub history: History,
    /// A topic restored at start-up is kept (with its epoch) until this time (Unix ms) even
    /// when empty, so clients reconnecting after a clean restart can still resume its stream.
    pub keep_until_ms: u64,
}

impl OwnedTopic {
    /// A new stream with a fresh `epoch` for a cluster of `shards`.
    pub fn new(epoch: Arc<str>, shards: usize) -> Self {
        Self {
            epoch,
            next_offset: 1,
            interest: vec![FormatSet::default(); shards],
            presence: None,
            history: History::default(),
            keep_until_ms: 0,
        }
    }

    /// A stream continuing an existing one (recovered from durable history).
    pub fn resume(epoch: Arc<str>, last_offset: u64, shards: usize) -> Self {
        Self {
            epoch,
            next_offset: last_offset + 1,
            interest: vec![FormatSet::default(); shards],
            presence: None,
            history: History::default(),
            keep_until_ms: 0,
        }
    }

    /// The stream's epoch.
    pub fn epoch(&self) -> &Arc<str> {
        &self.epoch
    }

    /// The offset of the newest message (0 if none yet).
    pub fn last_offset(&self) -> u64 {
        self.next_offset - 1
    }

    /// Assigns the next offset.
    pub fn next_offset(&mut self) -> u64 {
        let o = self.next_offset;
        self.next_offset += 1;
        o
    }

    /// Continues the stream as the cluster numbers it: the next message is `offset` of
    /// `epoch`. When that is not simply the next one of the current stream (another epoch, or
    /// offsets this node never saw), the recent window is dropped: it must stay dense, and the
    /// missing messages are not here (a resume from before them is refused, never a silent gap).
    pub fn continue_at(&mut self, epoch: &Arc<str>, offset: u64) {
        if *self.epoch != **epoch || offset != self.next_offset {
            self.history.clear_window();
            self.epoch = epoch.clone();
        }
        self.next_offset = offset;
    }

    /// Records that `shard` gained or lost its last subscriber in `format`.
    pub fn set_interest(&mut self, shard: usize, format: Format, present: bool) {
        let s = &mut self.interest[shard];
        let mut next = FormatSet::default();
        for f in Format::ALL {
            if (f == format && present) || (f != format && s.contains(f)) {
                next.insert(f);
            }
        }
        *s = next;
    }

    /// Formats used by any shard (what to encode).
    pub fn formats(&self) -> FormatSet {
        self.interest.iter().fold(FormatSet::default(), |a, b| a.union(*b))
    }

    /// Shards with at least one subscriber (where to send).
    pub fn listening_shards(&self) -> impl Iterator<Item = usize> + '_ {
        self.interest.iter().enumerate().filter(|(_, f)| !f.is_empty()).map(|(i, _)| i)
    }

    /// Whether no shard listens.
    pub fn is_idle(&self) -> bool {
        self.interest.iter().all(|f| f.is_empty())
    }

    /// Whether the topic can be forgotten: nobody listens, nothing is stored, nobody is
    /// tracked. Forgetting it ends its stream (a later message starts a new epoch).
    pub fn is_disposable(&self, now_ms: u64) -> bool {
        self.is_idle()
            && self.history.is_empty()
            && now_ms >= self.keep_until_ms
            && self.presence.as_ref().is_none_or(|p| p.is_empty() && !p.has_diff())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_and_interest() {
        let mut t = OwnedTopic::new(Arc::from("e1"), 3);
        assert_eq!((t.next_offset(), t.next_offset(), t.last_offset()), (1, 2, 2));
        assert!(t.is_idle());
        t.set_interest(2, Format::V2, true);
        t.set_interest(0, Format::V1, true);
        t.set_interest(2, Format::Sse, true);
        assert_eq!(t.listening_shards().collect::<Vec<_>>(), vec![0, 2]);
        let f = t.formats();
        assert!(f.contains(Format::V1) && f.contains(Format::V2) && f.contains(Format::Sse));
        t.set_interest(2, Format::V2, false);
        t.set_interest(2, Format::Sse, false);
        assert_eq!(t.listening_shards().collect::<Vec<_>>(), vec![0]);
        assert_eq!(OwnedTopic::resume(Arc::from("e"), 41, 1).next_offset(), 42);
    }
}
