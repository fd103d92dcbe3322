//! corecast: a thread-per-core realtime server for Postgres-backed apps.
//!
//! # Layout
//! Dependencies point one way: `protocol` ← `channel` ← `shard` → `transport`.
//! - [`protocol`]: sans-IO. HTTP heads, WebSocket frames, the Phoenix channel protocol (vsn
//!   1.0.0 and 2.0.0) and SSE encoding. Bytes and `now` in; bytes, events, actions out.
//! - [`channel`]: per-shard domain state as plain data: the local subscriber registry, owned
//!   topics (offsets, epochs, interest), encode-once broadcast frames.
//! - [`transport`]: sockets only: the per-connection outbox of `Bytes` flushed with one
//!   vectored `sendmsg`, and listener setup. Knows nothing of protocols or shards.
//! - [`shard`]: the runtime. One glommio executor per core, the mesh (the one cross-core
//!   message type), the connection driver that ties protocol, channel and transport together.
//! - [`cluster`]: cluster mode, the only way traffic crosses nodes (one backend per engine
//!   behind one trait); shards see its messages on [`bus`], never its transport.
//! - [`config`], [`auth`] and [`entropy`]: leaf utilities (validated configuration; token
//!   verification; OS randomness for identifiers).

pub mod auth;
pub mod bus;
pub mod channel;
pub mod cluster;
pub mod config;
pub mod entropy;
pub mod fuzzing;
pub mod ingest;
pub mod metrics;
pub mod node;
pub mod protocol;
pub mod shard;
pub mod store;
pub mod transport;
