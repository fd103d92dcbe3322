//! Server-Sent Events streams on the shard: one stream subscribes to several topics in the
//! SSE wire format; each topic's owner sends the stream's starting position (or, with
//! `Last-Event-ID`, every missed message) on the same FIFO as live messages, so resuming is
//! gapless per topic, exactly as for WebSocket joins. Postgres changes asked for with
//! `postgres_changes` come from the ingest thread as `postgres_changes` events (not resumable:
//! they carry no offset).

use crate::bus::{Backlog, ShardMsg};
use crate::channel::registry::{ConnId, LocalSub};
use crate::channel::Format;
use crate::ingest::{IngestMsg, PgSubscribe};
use crate::protocol::phoenix::message::Vsn;
use crate::protocol::phoenix::session::ReplyTo;
use crate::shard::rest::SseRequest;
use crate::shard::stats::ShardStats;
use crate::shard::{Kind, Shard, SseState};

impl Shard {
    /// Turns connection `id` into an SSE stream over `req.topics` (the response head is
    /// already queued).
    pub fn sse_open(&self, id: ConnId, req: SseRequest) {
        let state = SseState::new(req.topics.clone(), req.resume.clone());
        // The response head waits, with everything after it, until every owner answered.
        self.with_slot(id, |s| {
            s.kind = Kind::Sse(Box::new(state));
            s.hold = Some(vec![crate::protocol::sse::stream_head().into()]);
        });
        ShardStats::gauge(&self.my_stats().sse_streams, 1);
        for (i, topic) in req.topics.iter().enumerate() {
            if let Some(msg) = &req.bad_resume {
                let data = format!(r#"{{"status":"error","message":{}}}"#, crate::protocol::json::quote(msg));
                self.send(id, crate::protocol::sse::topic_event(topic.name(), "system", data.as_bytes()));
            }
            let local = LocalSub {
                conn: id,
                format: Format::Sse,
                presence: req.presence || req.track.is_some(),
                join_ref: None,
                pg: self.ingest.is_some() && !req.pg[i].is_empty(),
                tracked: false,
                awaiting_backlog: true,
                held: false,
            };
            let changes = self.registry.borrow_mut().add(topic, local);
            ShardStats::gauge(&self.my_stats().subscriptions, 1);
            self.interest_changed(topic, changes);
            let owner = topic.owner(self.shards);
            let want = match req.resume.as_ref().and_then(|p| p[i].as_ref()) {
                Some((epoch, offset)) => Backlog::Resume { epoch: epoch.clone(), offset: *offset },
                None => Backlog::Position,
            };
            self.route(
                owner,
                ShardMsg::BacklogRequest { topic: topic.clone(), from: self.id, conn: id, format: Format::Sse, want },
            );
            if req.presence {
                self.route(owner, ShardMsg::PresenceSync { topic: topic.clone(), from: self.id, conn: id });
            }
            if let (Some(ingest), false) = (&self.ingest, req.pg[i].is_empty()) {
                // Changes and "Subscribed to PostgreSQL" queue behind the held stream head.
                ingest.send(IngestMsg::Subscribe(Box::new(PgSubscribe {
                    shard: self.id,
                    conn: id,
                    topic: topic.clone(),
                    join_ref: None,
                    format: Format::Sse,
                    bindings: req.pg[i].clone(),
                    claims: req.claims.clone(),
                    apikey_claims: false,
                })));
            }
            if let Some((key, state)) = &req.track {
                // SSE streams get no push replies; a refusal arrives as a `system` event.
                let reply = ReplyTo { vsn: Vsn::V2, join_ref: None, msg_ref: None };
                self.track(id, topic.clone(), key.clone(), state.clone(), reply);
            }
        }
    }

    /// Queues a keep-alive comment on every SSE stream of this shard.
    pub fn sse_keep_alive(&self) {
        let ids: Vec<ConnId> = self
            .conns
            .borrow()
            .iter()
            .filter(|(_, s)| matches!(s.kind, Kind::Sse(_)))
            .map(|(i, s)| ConnId { index: i as u32, generation: s.generation })
            .collect();
        for id in ids {
            self.send(id, crate::protocol::sse::keep_alive());
        }
    }
}
