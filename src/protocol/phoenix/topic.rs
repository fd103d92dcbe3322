//! Topic names. A client joins `realtime:<name>`; internally a topic is the name without the
//! prefix plus its privacy, because private and public channels of one name are separate
//! topics (as in Supabase Realtime).

use std::fmt;
use std::hash::{Hash, Hasher};
use std::sync::Arc;

/// The longest topic name accepted (without the `realtime:` prefix), so that the full topic
/// always fits the one-byte length fields of the binary frames.
pub const MAX_TOPIC_LEN: usize = 255 - PREFIX.len();

/// The prefix realtime-js puts in front of every channel name.
pub const PREFIX: &str = "realtime:";

/// A topic as routed inside corecast. Cheap to clone and `Send` (it crosses shards).
#[derive(Clone, PartialEq, Eq)]
pub struct Topic {
    name: Arc<str>,
    private: bool,
    hash: u64,
}

impl Topic {
    /// A topic from its name (no prefix) and privacy; fails on an empty or too long name.
    pub fn new(name: &str, private: bool) -> Result<Self, TopicError> {
        if name.is_empty() {
            return Err(TopicError::Empty);
        }
        if name.len() > MAX_TOPIC_LEN {
            return Err(TopicError::TooLong);
        }
        let hash = stable_hash(name.as_bytes(), private);
        Ok(Self { name: Arc::from(name), private, hash })
    }

    /// The name without the `realtime:` prefix.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether this is the private channel of that name.
    pub fn is_private(&self) -> bool {
        self.private
    }

    /// A hash that is the same on every shard and every run (used to pick the owner shard).
    pub fn stable_hash(&self) -> u64 {
        self.hash
    }

    /// The shard that owns this topic among `shards`.
    pub fn owner(&self, shards: usize) -> usize {
        (self.hash % shards as u64) as usize
    }

    /// `realtime:<name>` as clients see it.
    pub fn wire_name(&self) -> String {
        let mut s = String::with_capacity(PREFIX.len() + self.name.len());
        s.push_str(PREFIX);
        s.push_str(&self.name);
        s
    }
}

impl Hash for Topic {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write_u64(self.hash);
    }
}

impl fmt::Debug for Topic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}{}", if self.private { "private:" } else { "" }, self.name)
    }
}

/// Why a topic name was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TopicError {
    #[error("TopicNameRequired: You must provide a topic name")]
    Empty,
    #[error("TopicNameTooLong: topic names are limited to 246 bytes")]
    TooLong,
}

/// FNV-1a 64 over the bytes plus the privacy bit: stable across processes and versions.
pub fn stable_hash(bytes: &[u8], private: bool) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes.iter().chain(std::iter::once(&(private as u8))) {
        h ^= b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    // FNV's low bits mix poorly; fold the high half in before taking a modulus.
    h ^ (h >> 29)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn private_and_public_differ() {
        let a = Topic::new("room", false).unwrap();
        let b = Topic::new("room", true).unwrap();
        assert_ne!(a, b);
        assert_ne!(a.stable_hash(), b.stable_hash());
        assert_eq!(a.wire_name(), "realtime:room");
        assert_eq!(Topic::new("", false).unwrap_err(), TopicError::Empty);
        assert!(Topic::new(&"x".repeat(247), false).is_err());
    }

    #[test]
    fn owners_spread() {
        let mut counts = [0usize; 4];
        for i in 0..4000 {
            counts[Topic::new(&format!("room-{i}"), false).unwrap().owner(4)] += 1;
        }
        assert!(counts.iter().all(|&c| c > 800), "{counts:?}");
    }
}
