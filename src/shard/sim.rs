//! A deterministic simulation of several shards in one thread, for testing the owner's ordering
//! rules directly (quinn-proto's `Pair`/`drive` is the model).
//!
//! [`Sim`] owns N real [`Shard`]s built from a real validated [`Config`]; no executor, no
//! sockets, no clock-driven tasks. What the runtime's tasks would do, the test does by hand:
//! - the mesh: every `route` to another shard lands in that shard's outgoing queue, exactly as
//!   in production; [`Sim::step`] delivers a prefix of one randomly chosen (from, to) queue,
//!   so per-pair FIFO order holds (as the SPSC channels guarantee) while the interleaving
//!   across pairs and with client input is chosen by a seeded RNG;
//! - the presence coalescing window ends when the test calls [`Sim::flush_presence`];
//! - the log writer's `fdatasync` completes when the test calls [`Sim::sync_log`] (records
//!   are buffered as in production, then dropped: nothing touches the disk);
//! - connections are slots whose outbox is never written to a socket: [`Sim::frames`] drains
//!   and decodes it.
//!
//! Client input goes through the real Phoenix session ([`Sim::push_text`],
//! [`Sim::push_binary`]) and the real action executor, so a test sees what a client would.

use std::sync::Arc;

use crate::auth::{Claims, Verifier};
use crate::bus::ShardMsg;
use crate::channel::registry::ConnId;
use crate::config::{Config, RawConfig};
use crate::protocol::phoenix::{Session, Vsn};
use crate::protocol::ws::WsConn;
use crate::shard::stats::ShardStats;
use crate::shard::{Durable, Kind, Shard, WsState};

/// One simulated connection: the shard it is on and its id there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SimConn {
    pub shard: usize,
    pub id: ConnId,
}

/// A server frame as a client decodes it.
#[derive(Debug, Clone, PartialEq)]
pub enum Frame {
    Json(serde_json::Value),
    Binary(Vec<u8>),
    Close(u16),
}

impl Frame {
    /// The JSON of a text frame (`Null` for other frames).
    pub fn json(&self) -> &serde_json::Value {
        match self {
            Frame::Json(v) => v,
            _ => &serde_json::Value::Null,
        }
    }
}

/// Several shards and a test-driven mesh.
pub struct Sim {
    pub shards: Vec<Shard>,
    rng: fastrand::Rng,
}

impl std::fmt::Debug for Sim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sim").field("shards", &self.shards.len()).finish_non_exhaustive()
    }
}

impl Sim {
    /// `n` shards configured like `corecast --shards n` plus `args`, interleavings drawn from
    /// `seed`. Persistence is on (the embedded log, faked: see [`Sim::sync_log`]).
    ///
    /// # Panics
    /// If `args` do not form a valid configuration.
    pub fn new(n: usize, seed: u64, args: &[&str]) -> Self {
        let cpus = (0..n).map(|i| i.to_string()).collect::<Vec<_>>().join(",");
        let shards = n.to_string();
        let argv = ["corecast", "--shards", &shards, "--cpus", &cpus].into_iter().chain(args.iter().copied());
        let raw = <RawConfig as clap::Parser>::try_parse_from(argv).expect("simulation flags");
        let cfg: Arc<Config> = Arc::new(raw.validate(&(0..n).collect::<Vec<_>>()).expect("simulation config"));
        let verifier = Arc::new(Verifier::new(cfg.jwt_secret.as_deref()));
        let stats: Arc<[ShardStats]> = (0..n).map(|_| ShardStats::default()).collect();
        let shards = (0..n)
            .map(|id| {
                Shard::new(id, cfg.clone(), verifier.clone(), stats.clone(), None, Durable::Log { generation: 1 }, None)
            })
            .collect();
        Self { shards, rng: fastrand::Rng::with_seed(seed) }
    }

    /// The simulation's RNG, for tests that draw their own choices from the same seed.
    pub fn rng(&mut self) -> &mut fastrand::Rng {
        &mut self.rng
    }

    /// A new upgraded WebSocket connection on `shard`, with the development-mode claims.
    pub fn connect(&mut self, shard: usize, vsn: Vsn) -> SimConn {
        let s = &self.shards[shard];
        let id = s.register(-1);
        s.with_slot(id, |slot| {
            slot.kind =
                Kind::Ws(Box::new(WsState { ws: WsConn::new(), session: Session::new(vsn, Claims::anonymous()) }))
        });
        SimConn { shard, id }
    }

    /// A Phoenix text message from the client, through its session and the action executor.
    pub fn push_text(&mut self, c: SimConn, text: &str) {
        self.input(c, |session, ctx, out| session.handle_text(super::conn::now(), text.as_bytes(), ctx, out));
    }

    /// A binary message from the client (kind-3 broadcast push and the like).
    pub fn push_binary(&mut self, c: SimConn, data: &[u8]) {
        self.input(c, |session, ctx, out| session.handle_binary(data, ctx, out));
    }

    fn input(
        &mut self,
        c: SimConn,
        f: impl FnOnce(
            &mut Session,
            &crate::protocol::phoenix::session::SessionCtx,
            &mut Vec<crate::protocol::phoenix::session::Action>,
        ),
    ) {
        let s = &self.shards[c.shard];
        let mut actions = Vec::new();
        s.with_slot(c.id, |slot| {
            if let Kind::Ws(state) = &mut slot.kind {
                f(&mut state.session, &s.ctx, &mut actions);
            }
        });
        s.run_actions(c.id, &mut actions);
    }

    /// The connection goes away (as when its socket closes): every subscription and presence
    /// entry it had is removed.
    pub fn disconnect(&mut self, c: SimConn) {
        self.shards[c.shard].unregister(c.id);
    }

    /// Mesh queues with messages waiting: `(from, to)`.
    fn pending(&self) -> Vec<(usize, usize)> {
        let mut v = Vec::new();
        for (from, s) in self.shards.iter().enumerate() {
            for (to, q) in s.outgoing.iter().enumerate() {
                if !q.borrow().is_empty() {
                    v.push((from, to));
                }
            }
        }
        v
    }

    /// Whether any mesh message waits.
    pub fn idle(&self) -> bool {
        self.pending().is_empty()
    }

    /// Delivers a random non-empty prefix of one random non-empty mesh queue, in order.
    /// Returns `false` when nothing was waiting.
    pub fn step(&mut self) -> bool {
        let pending = self.pending();
        if pending.is_empty() {
            return false;
        }
        let (from, to) = pending[self.rng.usize(..pending.len())];
        let msgs: Vec<ShardMsg> = {
            let mut q = self.shards[from].outgoing[to].borrow_mut();
            let k = self.rng.usize(1..=q.len());
            q.drain(..k).collect()
        };
        for m in msgs {
            self.shards[to].handle(m);
        }
        true
    }

    /// Steps until no mesh message waits.
    pub fn run(&mut self) {
        while self.step() {}
    }

    /// Ends the presence coalescing window on `shard` (its pending diffs go out).
    pub fn flush_presence(&mut self, shard: usize) {
        self.shards[shard].flush_presence_diffs();
    }

    /// Completes a log sync on `shard` covering everything queued so far: the persisted
    /// messages' acknowledgements are released, as after `fdatasync`.
    pub fn sync_log(&mut self, shard: usize) {
        let s = &self.shards[shard];
        let upto = s.log_appended.get();
        s.log_buf.borrow_mut().clear();
        s.release_durable_acks(upto);
    }

    /// Runs the mesh, presence windows and log syncs until nothing is left to do.
    pub fn settle(&mut self) {
        loop {
            self.run();
            for i in 0..self.shards.len() {
                self.flush_presence(i);
                self.sync_log(i);
            }
            if self.idle() {
                return;
            }
        }
    }

    /// Drains and decodes what the server queued for `c` (empty once it is gone).
    pub fn frames(&mut self, c: SimConn) -> Vec<Frame> {
        let s = &self.shards[c.shard];
        s.dirty.borrow_mut().clear();
        let mut bytes = Vec::new();
        s.with_slot(c.id, |slot| {
            slot.dirty = false;
            while let Some(front) = slot.outbox.front() {
                let n = front.len();
                bytes.extend_from_slice(front);
                slot.outbox.advance(n);
            }
        });
        decode_frames(&bytes)
    }

    /// Whether `c` was told to close (slow consumer, protocol error...).
    pub fn closing(&self, c: SimConn) -> bool {
        self.shards[c.shard].with_slot(c.id, |s| s.closing.is_some()).unwrap_or(true)
    }
}

/// Decodes unmasked server frames (whole frames only: the outbox holds whole frames).
fn decode_frames(mut b: &[u8]) -> Vec<Frame> {
    let mut out = Vec::new();
    while b.len() >= 2 {
        let opcode = b[0] & 0x0f;
        let (len, head) = match b[1] & 0x7f {
            126 => (u16::from_be_bytes([b[2], b[3]]) as usize, 4),
            127 => (u64::from_be_bytes(b[2..10].try_into().expect("8 bytes")) as usize, 10),
            n => (n as usize, 2),
        };
        let payload = &b[head..head + len];
        out.push(match opcode {
            1 => Frame::Json(serde_json::from_slice(payload).expect("server text frames are JSON")),
            2 => Frame::Binary(payload.to_vec()),
            8 => Frame::Close(payload.get(..2).map_or(1005, |c| u16::from_be_bytes([c[0], c[1]]))),
            other => panic!("unexpected server opcode {other}"),
        });
        b = &b[head + len..];
    }
    assert!(b.is_empty(), "a partial frame in the outbox");
    out
}

#[cfg(test)]
mod tests;
