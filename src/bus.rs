//! The cross-shard vocabulary: [`ShardMsg`], the one message type that crosses a core, and its
//! parts ([`Origin`], [`Backlog`]). Shards send it to each other over the mesh
//! ([`crate::shard::mesh`]); the ingest thread and the Postgres history writer send it to shards
//! over their inboxes. It lives below `shard/` so that `ingest/` and `store/` speak it without
//! depending on the shard layer.

use std::sync::Arc;

use bytes::Bytes;

use crate::channel::broadcast::Frames;
use crate::channel::registry::ConnId;
use crate::channel::Format;
use crate::protocol::phoenix::session::{Publish, ReplyTo};
use crate::protocol::phoenix::Topic;

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
    /// From the cluster link: several [`ShardMsg::Sequenced`] at once, in order.
    SequencedMany(Vec<(ConnId, Option<Bytes>)>),
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
    HistoryRequest {
        topic: Topic,
        from: usize,
        conn: ConnId,
        /// Only messages with a smaller offset.
        before: Option<u64>,
        /// Only messages published before this time (Unix ms).
        before_ms: Option<u64>,
        limit: usize,
        keep_alive: bool,
    },
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
    /// From the cluster (to the topics' owner): messages the cluster sequenced, in order, with
    /// their cluster-wide epoch and offset (one batch's worth for this shard). `exclude`: the
    /// publisher, when it is on this node and its channel has `self: false`. Not `live`:
    /// sequenced before this process started (they only fill the recent window).
    Remote { msgs: Vec<(Box<crate::cluster::wire::Sequenced>, Option<Origin>)>, live: bool },
    /// From the cluster (to the topic's owner): another node's member tracked (`meta` is its
    /// state) or stopped tracking (`meta` is `None`).
    RemoteTrack { topic: Topic, run: u64, member: crate::cluster::wire::Member, key: Arc<str>, meta: Option<Bytes> },
    /// From the cluster link: these node processes left (their members leave) and these
    /// joined (every shard announces its members again, so they learn them).
    Members { gone: Arc<[u64]>, joined: Arc<[u64]> },
    /// From the cluster link: it degraded or recovered; tell every channel.
    ClusterLink { up: bool, message: Arc<str> },
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
