//! Per-shard domain state as plain data (no executor, no sockets, no clock):
//! - [`registry`]: which local connections subscribe to which topics, in which wire format;
//! - [`topic`]: state of the topics this shard owns (offsets, epoch, which shards listen);
//! - [`broadcast`]: encode a message once per wire format into shareable frames;
//! - [`presence`]: a topic's presence state and coalesced diffs, on its owner.

pub mod broadcast;
pub mod history;
pub mod presence;
pub mod registry;
pub mod topic;

/// How a subscriber wants frames encoded. Each format in use costs one encode per message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Format {
    /// Phoenix vsn 1.0.0: JSON text frames.
    V1,
    /// Phoenix vsn 2.0.0: JSON text arrays, or binary kind 4 for binary-origin broadcasts.
    V2,
    /// Server-Sent Events.
    Sse,
}

impl Format {
    /// All formats, in index order.
    pub const ALL: [Format; 3] = [Format::V1, Format::V2, Format::Sse];

    /// Index into per-format arrays.
    pub fn index(self) -> usize {
        match self {
            Self::V1 => 0,
            Self::V2 => 1,
            Self::Sse => 2,
        }
    }
}

/// A set of formats, as a bit mask.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FormatSet(u8);

impl FormatSet {
    /// Adds a format.
    pub fn insert(&mut self, f: Format) {
        self.0 |= 1 << f.index();
    }

    /// Whether `f` is in the set.
    pub fn contains(self, f: Format) -> bool {
        self.0 & (1 << f.index()) != 0
    }

    /// Whether the set is empty.
    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// Union.
    pub fn union(self, other: Self) -> Self {
        Self(self.0 | other.0)
    }
}
