//! A topic's message history on its owner shard: the recent window (every message, bounded by
//! count and age) and the durable set (messages published with `persist`, bounded by count,
//! age and per-message TTL). Pure data: time is a parameter.
//!
//! History pages and replays read the durable set only (history is what was persisted); the
//! window exists for gapless resume, which must cover every message.
//!
//! Offsets are dense in the window (it holds every message from its first offset to the
//! newest) and sparse in the durable set. A resume after offset `n` is possible exactly when
//! every offset in `(n, last]` is available from one or the other; otherwise the caller gets
//! the oldest offset from which it would be possible, never a silent gap.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

use crate::protocol::phoenix::session::Payload;

/// One stored message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredMsg {
    pub offset: u64,
    /// The epoch the message was published under (the durable set can span epochs).
    pub epoch: Arc<str>,
    pub id: Arc<str>,
    pub event: Arc<str>,
    pub payload: Payload,
    /// Arrived as a binary frame (vsn 2 subscribers get kind 4).
    pub binary_frame: bool,
    /// Publication time, Unix milliseconds.
    pub created_ms: u64,
    /// Durable only: when it expires (Unix milliseconds).
    pub expires_ms: Option<u64>,
    /// The publisher's identity: the `sub` of its verified token, when it had one.
    pub user_id: Option<Arc<str>>,
}

/// Bounds of the history.
#[derive(Debug, Clone, Copy)]
pub struct HistoryLimits {
    pub window_messages: usize,
    pub window_age_ms: u64,
    pub durable_messages: usize,
    pub durable_age_ms: u64,
}

/// Why a resume cannot be served.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResumeGap {
    /// The oldest offset after which a resume would work now (`offset` to pass is this − 1).
    pub oldest_available: u64,
}

/// History of one topic.
#[derive(Debug, Default)]
pub struct History {
    window: VecDeque<Arc<StoredMsg>>,
    durable: BTreeMap<u64, Arc<StoredMsg>>,
}

impl History {
    /// Records a new message (the newest offset); `durable` when published with `persist`.
    pub fn push(&mut self, msg: Arc<StoredMsg>, durable: bool, limits: &HistoryLimits) {
        if durable {
            self.durable.insert(msg.offset, msg.clone());
            while self.durable.len() > limits.durable_messages {
                self.durable.pop_first();
            }
        }
        self.window.push_back(msg);
        while self.window.len() > limits.window_messages {
            self.window.pop_front();
        }
    }

    /// Forgets the recent window (the stream continues past messages this owner never had).
    pub fn clear_window(&mut self) {
        self.window.clear();
    }

    /// Loads a recovered durable message.
    pub fn restore(&mut self, msg: Arc<StoredMsg>) {
        self.durable.insert(msg.offset, msg);
    }

    /// Drops what is older than the limits at `now_ms`; returns whether the durable set changed.
    pub fn expire(&mut self, now_ms: u64, limits: &HistoryLimits) -> bool {
        while self.window.front().is_some_and(|m| now_ms.saturating_sub(m.created_ms) > limits.window_age_ms) {
            self.window.pop_front();
        }
        let before = self.durable.len();
        self.durable.retain(|_, m| {
            now_ms.saturating_sub(m.created_ms) <= limits.durable_age_ms && m.expires_ms.is_none_or(|e| e > now_ms)
        });
        before != self.durable.len()
    }

    /// Whether nothing is stored.
    pub fn is_empty(&self) -> bool {
        self.window.is_empty() && self.durable.is_empty()
    }

    /// The durable messages, oldest first (for compaction and checkpoints).
    pub fn durable(&self) -> impl Iterator<Item = &Arc<StoredMsg>> {
        self.durable.values()
    }

    /// Whether any durable message exists.
    pub fn has_durable(&self) -> bool {
        !self.durable.is_empty()
    }

    /// The newest durable offset.
    pub fn last_durable_offset(&self) -> Option<u64> {
        self.durable.keys().next_back().copied()
    }

    /// Every message after `after` up to `last` (the stream's newest offset), in order; or the
    /// gap that makes that impossible. Only messages of `epoch` count.
    pub fn resume(&self, epoch: &str, after: u64, last: u64) -> Result<Vec<Arc<StoredMsg>>, ResumeGap> {
        if after >= last {
            return Ok(Vec::new());
        }
        let window_start = self.window.front().map_or(last + 1, |m| m.offset);
        let mut out = Vec::new();
        if after + 1 < window_start {
            // (after, window_start) must all be durable, in this epoch.
            let need = window_start - after - 1;
            let have: Vec<&Arc<StoredMsg>> =
                self.durable.range(after + 1..window_start).map(|(_, m)| m).filter(|m| &*m.epoch == epoch).collect();
            if have.len() as u64 != need {
                return Err(ResumeGap { oldest_available: self.oldest_resumable(epoch, window_start) });
            }
            out.extend(have.into_iter().cloned());
        }
        out.extend(self.window.iter().filter(|m| m.offset > after).cloned());
        Ok(out)
    }

    /// The smallest offset `o` such that all of `[o, last]` is available.
    fn oldest_resumable(&self, epoch: &str, window_start: u64) -> u64 {
        let mut o = window_start;
        while o > 1 && self.durable.get(&(o - 1)).is_some_and(|m| &*m.epoch == epoch) {
            o -= 1;
        }
        o
    }

    /// A history page: up to `limit` persisted messages with offset < `before` and published
    /// before `before_ms` (each bound off when `None`), newest first. History is what was
    /// published with `persist`; the window's other messages (typing indicators, cursor moves)
    /// only back gapless resume.
    pub fn page(&self, before: Option<u64>, before_ms: Option<u64>, limit: usize) -> Vec<Arc<StoredMsg>> {
        self.durable
            .range(..before.unwrap_or(u64::MAX))
            .rev()
            .filter(|(_, m)| before_ms.is_none_or(|b| m.created_ms < b))
            .take(limit)
            .map(|(_, m)| m.clone())
            .collect()
    }

    /// realtime-js `broadcast.replay`: the newest `limit` persisted messages published at or
    /// after `since_ms`, oldest first.
    pub fn replay(&self, since_ms: u64, limit: usize) -> Vec<Arc<StoredMsg>> {
        let mut v: Vec<Arc<StoredMsg>> =
            self.durable.values().rev().take_while(|m| m.created_ms >= since_ms).take(limit).cloned().collect();
        v.reverse();
        v
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;

    const L: HistoryLimits =
        HistoryLimits { window_messages: 5, window_age_ms: 1000, durable_messages: 100, durable_age_ms: 100_000 };

    fn msg(offset: u64, t: u64) -> Arc<StoredMsg> {
        Arc::new(StoredMsg {
            offset,
            epoch: Arc::from("e"),
            id: Arc::from(format!("id{offset}").as_str()),
            event: Arc::from("ev"),
            payload: Payload::Json(Bytes::from(format!("{{\"n\":{offset}}}"))),
            binary_frame: false,
            created_ms: t,
            expires_ms: None,
            user_id: None,
        })
    }

    fn offsets(v: &[Arc<StoredMsg>]) -> Vec<u64> {
        v.iter().map(|m| m.offset).collect()
    }

    #[test]
    fn resume_from_window() {
        let mut h = History::default();
        for o in 1..=10 {
            h.push(msg(o, o), false, &L);
        }
        // window holds 6..=10
        assert_eq!(offsets(&h.resume("e", 7, 10).unwrap()), vec![8, 9, 10]);
        assert_eq!(offsets(&h.resume("e", 5, 10).unwrap()), vec![6, 7, 8, 9, 10]);
        assert_eq!(h.resume("e", 10, 10).unwrap(), vec![]);
        assert_eq!(h.resume("e", 3, 10), Err(ResumeGap { oldest_available: 6 }));
    }

    #[test]
    fn durable_fills_the_gap_only_when_dense() {
        let mut h = History::default();
        for o in 1..=10 {
            h.push(msg(o, o), o >= 3, &L);
        }
        // 3..=5 durable + window 6..=10
        assert_eq!(offsets(&h.resume("e", 2, 10).unwrap()), (3..=10).collect::<Vec<_>>());
        assert_eq!(h.resume("e", 1, 10), Err(ResumeGap { oldest_available: 3 }));
        // other epoch's durable messages do not count
        assert!(h.resume("other", 2, 10).is_err());
    }

    #[test]
    fn pages_and_replay() {
        let mut h = History::default();
        for o in 1..=10 {
            h.push(msg(o, o * 10), o % 2 == 0, &L);
        }
        // durable 2,4,6,8,10 (window 6..=10): history and replay show persisted messages only
        assert_eq!(offsets(&h.page(None, None, 3)), vec![10, 8, 6]);
        assert_eq!(offsets(&h.page(Some(8), None, 10)), vec![6, 4, 2]);
        assert_eq!(offsets(&h.page(Some(2), None, 10)), Vec::<u64>::new());
        // by time: created_ms = offset * 10; before 80 ms → offsets below 8
        assert_eq!(offsets(&h.page(None, Some(80), 2)), vec![6, 4]);
        assert_eq!(offsets(&h.page(Some(6), Some(80), 10)), vec![4, 2]);
        assert_eq!(offsets(&h.replay(70, 10)), vec![8, 10]);
        assert_eq!(offsets(&h.replay(0, 2)), vec![8, 10]);
        // ... while resume still covers every message of the window
        assert_eq!(offsets(&h.resume("e", 6, 10).unwrap()), vec![7, 8, 9, 10]);
    }

    #[test]
    fn expiry_by_age_and_ttl() {
        let mut h = History::default();
        h.push(msg(1, 0), true, &L);
        let mut m = (*msg(2, 0)).clone();
        m.expires_ms = Some(50);
        h.push(Arc::new(m), true, &L);
        assert!(h.expire(100, &L));
        assert_eq!(offsets(&h.page(None, None, 10)), vec![1], "the ttl removed 2 from history");
        assert_eq!(offsets(&h.resume("e", 0, 2).unwrap()), vec![1, 2], "the window still has both");
        h.expire(2000, &L);
        assert_eq!(offsets(&h.page(None, None, 10)), vec![1]);
        h.expire(200_000, &L);
        assert!(h.is_empty());
    }
}
