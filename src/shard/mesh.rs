//! The full mesh of SPSC channels that carries batches of [`ShardMsg`] (see [`crate::bus`])
//! between shards: the only place data crosses cores.
//!
//! Wiring happens once at start: for every ordered pair of shards (a, b) one glommio
//! `shared_channel` is created on the main thread; shard a gets the sending half, shard b the
//! receiving half, and each connects its halves inside its own executor. Messages travel in
//! batches (`Vec<ShardMsg>`) so a busy tick costs one channel operation per peer, not one per
//! message.

use glommio::channels::shared_channel::{self, ConnectedReceiver, ConnectedSender, SharedReceiver, SharedSender};

use crate::bus::ShardMsg;

/// Batches in flight per channel before the sender waits.
pub const CHANNEL_CAPACITY: usize = 1024;

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
