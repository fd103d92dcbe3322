//! Who is who in a run: every client (connection) has a global index, and the layout says, from
//! that index alone, which topic it joins, whether it subscribes and whether it publishes. The
//! coordinator and every worker process compute the same answers, so no per-client table travels
//! between processes.

use serde::{Deserialize, Serialize};

/// Publisher ids in payloads are `phase * PHASE_STRIDE + client index`: a message from an earlier
/// phase (a sweep step) is recognised as late and never counted in the current one.
pub const PHASE_STRIDE: u64 = 1_000_000;
/// Client index of the virtual publisher of the raw baseline sender.
pub const EXTERNAL_PUBLISHER: u64 = PHASE_STRIDE - 1;

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Layout {
    /// Clients `[0, pubs)` publish to topic 0 without subscribing; `[pubs, pubs + subs)`
    /// subscribe to topic 0.
    Fanout { subs: usize, pubs: usize },
    /// Clients `[0, streams)` publish stream `i` on topic `i`; subscriber `j` (client
    /// `streams + j`) follows topic `j % streams`.
    Streams { subs: usize, streams: usize },
    /// Client `i` is a member of room `i / room_size`: it subscribes to and publishes on it.
    Rooms { members: usize, room_size: usize },
    /// Clients subscribe to topic `i % topics`; nobody publishes.
    Idle { subs: usize, topics: usize },
    /// Clients subscribe to topic 0; an outside sender (the raw baseline) publishes as
    /// `EXTERNAL_PUBLISHER`.
    External { subs: usize },
    /// Presence room (topic 0): clients `[0, observers)` join with presence enabled and watch
    /// the diffs; `[observers, observers + members)` are members that track (and later leave),
    /// each under its own key, joining with presence enabled only if `members_listen`.
    Presence { members: usize, observers: usize, members_listen: bool },
}

/// What a client does in a presence room.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PresRole {
    None,
    Observer,
    Member,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Role {
    pub topic: u32,
    pub sub: bool,
    pub publ: bool,
}

impl Layout {
    /// Number of client connections.
    pub fn clients(&self) -> usize {
        match *self {
            Layout::Fanout { subs, pubs } => subs + pubs,
            Layout::Streams { subs, streams } => subs + streams,
            Layout::Rooms { members, .. } => members,
            Layout::Idle { subs, .. } => subs,
            Layout::External { subs } => subs,
            Layout::Presence { members, observers, .. } => members + observers,
        }
    }

    /// Number of subscribing clients.
    pub fn subscribers(&self) -> usize {
        match *self {
            Layout::Fanout { subs, .. } => subs,
            Layout::Streams { subs, .. } => subs,
            Layout::Rooms { members, .. } => members,
            Layout::Idle { subs, .. } => subs,
            Layout::External { subs } => subs,
            Layout::Presence { members, .. } => members,
        }
    }

    pub fn role(&self, i: usize) -> Role {
        match *self {
            Layout::Fanout { pubs, .. } => Role { topic: 0, sub: i >= pubs, publ: i < pubs },
            Layout::Streams { streams, .. } => {
                if i < streams {
                    Role { topic: i as u32, sub: false, publ: true }
                } else {
                    Role { topic: ((i - streams) % streams) as u32, sub: true, publ: false }
                }
            }
            Layout::Rooms { room_size, .. } => Role { topic: (i / room_size.max(1)) as u32, sub: true, publ: true },
            Layout::Idle { topics, .. } => Role { topic: (i % topics.max(1)) as u32, sub: true, publ: false },
            Layout::External { .. } => Role { topic: 0, sub: true, publ: false },
            // Neither role publishes broadcasts; observers count as the receiving side.
            Layout::Presence { observers, .. } => Role { topic: 0, sub: i < observers, publ: false },
        }
    }

    /// Presence role of client `i` (`None` outside a presence layout).
    pub fn presence_role(&self, i: usize) -> PresRole {
        match *self {
            Layout::Presence { observers, .. } if i < observers => PresRole::Observer,
            Layout::Presence { .. } => PresRole::Member,
            _ => PresRole::None,
        }
    }

    /// Presence key of client `i`: `o<i>` for observers, `m<i>` for members (`i` = client index,
    /// so the key names the member's connection in every process).
    pub fn presence_key(&self, i: usize) -> String {
        match self.presence_role(i) {
            PresRole::Observer => format!("o{i}"),
            _ => format!("m{i}"),
        }
    }

    /// Whether client `i` joins with presence enabled (gets `presence_state` and every diff).
    pub fn presence_listens(&self, i: usize) -> bool {
        match self.presence_role(i) {
            PresRole::Observer => true,
            PresRole::Member => matches!(self, Layout::Presence { members_listen: true, .. }),
            PresRole::None => false,
        }
    }

    /// Topic a publisher (client index or `EXTERNAL_PUBLISHER`) publishes to.
    pub fn publisher_topic(&self, client: u64) -> Option<u32> {
        if client == EXTERNAL_PUBLISHER {
            return matches!(self, Layout::External { .. }).then_some(0);
        }
        let i = client as usize;
        if i >= self.clients() {
            return None;
        }
        let r = self.role(i);
        r.publ.then_some(r.topic)
    }

    /// How many subscribers receive each message of this publisher (servers are configured not to
    /// echo a message to its own sender).
    pub fn receivers_of(&self, client: u64) -> u64 {
        match *self {
            Layout::Fanout { subs, .. } => subs as u64,
            Layout::External { subs } => subs as u64,
            Layout::Streams { subs, streams } => {
                let s = client as usize;
                // subscribers j with j % streams == s
                (subs / streams + usize::from(s < subs % streams)) as u64
            }
            Layout::Rooms { members, room_size } => {
                let room = client as usize / room_size;
                let lo = room * room_size;
                let hi = (lo + room_size).min(members);
                (hi - lo - 1) as u64
            }
            Layout::Idle { .. } | Layout::Presence { .. } => 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn receivers_match_roles() {
        let layouts = [
            Layout::Fanout { subs: 17, pubs: 2 },
            Layout::Streams { subs: 23, streams: 4 },
            Layout::Rooms { members: 25, room_size: 10 },
        ];
        for l in layouts {
            for p in 0..l.clients() {
                let Some(topic) = l.publisher_topic(p as u64) else {
                    continue;
                };
                let count = (0..l.clients())
                    .filter(|&c| c != p)
                    .filter(|&c| {
                        let r = l.role(c);
                        r.sub && r.topic == topic
                    })
                    .count() as u64;
                assert_eq!(count, l.receivers_of(p as u64), "{l:?} publisher {p}");
            }
        }
    }
}
