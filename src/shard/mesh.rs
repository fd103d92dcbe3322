//! The only place data crosses cores: [`ShardMsg`], and the full mesh of SPSC channels that
//! carries batches of it between shards.
//!
//! Wiring happens once at start: for every ordered pair of shards (a, b) one glommio
//! `shared_channel` is created on the main thread; shard a gets the sending half, shard b the
//! receiving half, and each connects its halves inside its own executor. Messages travel in
//! batches (`Vec<ShardMsg>`) so a busy tick costs one channel operation per peer, not one per
//! message.

use std::sync::Arc;

use bytes::Bytes;
use glommio::channels::shared_channel::{self, ConnectedReceiver, ConnectedSender, SharedReceiver, SharedSender};

use crate::channel::broadcast::Frames;
use crate::channel::registry::ConnId;
use crate::channel::Format;
use crate::protocol::phoenix::session::{Publish, ReplyTo};
use crate::protocol::phoenix::Topic;

/// Batches in flight per channel before the sender waits.
pub const CHANNEL_CAPACITY: usize = 1024;

/// Where a message came from: used to skip the sender when its channel has `self: false`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Origin {
    pub shard: usize,
    pub conn: ConnId,
}

/// A cross-shard message.
#[derive(Debug)]
pub enum ShardMsg {
    /// To a topic's owner: shard `from` gained its first, or lost its last, subscriber in
    /// `format`. A gain is answered with [`ShardMsg::InterestAck`].
    Interest { topic: Topic, from: usize, format: Format, present: bool },
    /// From a topic's owner: the interest is registered; every message sequenced from now on
    /// reaches the shard, so it may send the held join replies.
    InterestAck { topic: Topic, format: Format },
    /// To a topic's owner: sequence and fan out this message; then tell `ack_to` (shard,
    /// connection) with [`ShardMsg::Sequenced`].
    Publish { publish: Box<Publish>, origin: Option<Origin>, ack_to: Option<(usize, ConnId)> },
    /// From a topic's owner: a message from this connection was sequenced. `frame` is the
    /// WebSocket `ack` reply; `None` counts down an HTTP publish request waiting for its 202.
    Sequenced { conn: ConnId, frame: Option<Bytes> },
    /// From a topic's owner to a shard with subscribers: queue these frames to them.
    Deliver { topic: Topic, frames: Arc<Frames>, exclude: Option<Origin> },
    /// To a topic's owner: track (or update) `conn`'s presence under `key`.
    Track { topic: Topic, from: usize, conn: ConnId, key: Arc<str>, meta: Bytes, reply: ReplyTo },
    /// To a topic's owner: `conn` on shard `from` stopped tracking (untrack, leave, rejoin or
    /// disconnect).
    PresenceLeave { topic: Topic, from: usize, conn: ConnId },
    /// To a topic's owner: `conn` on shard `from` joined with presence; send it the state.
    PresenceSync { topic: Topic, from: usize, conn: ConnId },
    /// From a topic's owner: the answer to a [`ShardMsg::Track`].
    TrackResult { topic: Topic, conn: ConnId, reply: ReplyTo, error: Option<String> },
    /// From a topic's owner: the presence state body (`{"<key>":{"metas":[..]}}`) for `conn`,
    /// shared by every joiner of the same coalescing window.
    PresenceState { topic: Topic, conn: ConnId, body: Bytes },
    /// From a topic's owner: a coalesced `presence_diff`, for presence-enabled subscribers.
    DeliverPresence { topic: Topic, frames: Arc<Frames> },
    /// To a topic's owner: send `conn` (on shard `from`) the messages it asks for, encoded
    /// for `format`. Sent after the interest on the same FIFO, so live messages sequenced
    /// after the backlog follow it with no gap and no duplicate.
    BacklogRequest { topic: Topic, from: usize, conn: ConnId, format: Format, want: Backlog },
    /// From a topic's owner: the backlog frames with their offsets (or a `system` error with
    /// offset 0), in order, and the stream's position (epoch, newest offset) they lead up to.
    BacklogReply { topic: Topic, conn: ConnId, frames: Vec<(u64, Bytes)>, position: Option<(Arc<str>, u64)> },
    /// To a topic's owner: a history page for an HTTP request on shard `from`.
    HistoryRequest { topic: Topic, from: usize, conn: ConnId, before: Option<u64>, limit: usize, keep_alive: bool },
    /// From a topic's owner: the complete HTTP response for a history request.
    HistoryReply { conn: ConnId, response: Bytes },
    /// From the ingest thread: queue each frame on each listed connection of this shard
    /// (Postgres changes, `system` messages). A frame is encoded once for all its connections.
    ToConns { items: Vec<(Bytes, Vec<ConnId>)> },
    /// From the Postgres history writer: this shard's log records up to position `upto` are
    /// committed.
    HistorySynced { upto: u64 },
    /// From the ingest thread: the decision on a private join held by this shard.
    JoinDecision { conn: ConnId, topic: Topic, allowed: bool, reason: String },
    /// From the ingest thread: end this channel with a `system` error and `phx_close`.
    CloseChannel { conn: ConnId, topic: Topic, message: String },
}

/// Capacity of each shard's inbox from non-shard threads (the ingest thread).
pub const INBOX_CAPACITY: usize = 1024;

/// What a joining subscriber wants from history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Backlog {
    /// Every message after `offset` of stream `epoch` (gapless resume), or a `system` error.
    Resume { epoch: String, offset: u64 },
    /// The newest `limit` messages published at or after `since_ms` (realtime-js replay).
    Replay { since_ms: u64, limit: u32 },
    /// Nothing but the stream's current position (an SSE stream starting live).
    Position,
}

/// One batch on the wire between two shards.
pub type Batch = Vec<ShardMsg>;

/// A shard's unconnected mesh ends, as created on the main thread.
#[derive(Debug)]
pub struct MeshEnds {
    /// `senders[peer]`: to that peer (`None` for itself).
    pub senders: Vec<Option<SharedSender<Batch>>>,
    /// `(peer, receiver)` for every other shard.
    pub receivers: Vec<(usize, SharedReceiver<Batch>)>,
}

/// Creates the full mesh for `n` shards; element `i` goes to shard `i`.
pub fn full_mesh(n: usize) -> Vec<MeshEnds> {
    let mut ends: Vec<MeshEnds> =
        (0..n).map(|_| MeshEnds { senders: (0..n).map(|_| None).collect(), receivers: Vec::new() }).collect();
    for from in 0..n {
        for to in 0..n {
            if from != to {
                let (tx, rx) = shared_channel::new_bounded(CHANNEL_CAPACITY);
                ends[from].senders[to] = Some(tx);
                ends[to].receivers.push((from, rx));
            }
        }
    }
    ends
}

/// Connected mesh ends, usable inside the shard's executor.
pub struct Mesh {
    pub senders: Vec<Option<ConnectedSender<Batch>>>,
    pub receivers: Vec<(usize, ConnectedReceiver<Batch>)>,
}

impl MeshEnds {
    /// Connects every end; completes once all peers have connected theirs. All ends connect
    /// concurrently: awaiting them one by one would deadlock (each `connect` waits for the
    /// peer's matching end).
    ///
    /// A timer ticks while the handshake runs. glommio 0.9 does not wake an executor when the
    /// peer of a pending `connect` arrives: the waiting side re-checks only when its reactor
    /// wakes for another reason, and at boot nothing else is scheduled, so without the tick a
    /// shard that parked first could wait forever (seen as ~5% of 2-shard starts hanging).
    pub async fn connect(self) -> Mesh {
        let tick = async {
            loop {
                glommio::timer::sleep(std::time::Duration::from_millis(1)).await;
            }
        };
        futures_lite::future::or(self.connect_all(), tick).await
    }

    async fn connect_all(self) -> Mesh {
        let senders: Vec<_> =
            self.senders.into_iter().map(|s| s.map(|s| glommio::spawn_local(s.connect()).detach())).collect();
        let receivers: Vec<_> =
            self.receivers.into_iter().map(|(peer, r)| (peer, glommio::spawn_local(r.connect()).detach())).collect();
        let mut mesh = Mesh { senders: Vec::new(), receivers: Vec::new() };
        for s in senders {
            mesh.senders.push(match s {
                Some(h) => h.await,
                None => None,
            });
        }
        for (peer, h) in receivers {
            if let Some(r) = h.await {
                mesh.receivers.push((peer, r));
            }
        }
        mesh
    }
}
