//! Durable history: the embedded on-disk log (see [`log`]), or with a database the table
//! `corecast.history` (see [`pg`]), which reuses the log's record encoding and recovery.
//!
//! Every owner shard appends the messages published with `persist` on the topics it owns to
//! its own log segment (glommio's io_uring DMA file API), group-committed with `fdatasync`
//! every [`log::SYNC_INTERVAL`]. At start-up the main thread reads every segment (with plain
//! `std::fs`), keeps what is intact (a torn or corrupt tail is logged and dropped), hands each
//! topic to its current owner shard (the shard count may have changed) and rewrites one
//! compacted snapshot per shard before the shards start. A clean shutdown writes a
//! checkpoint per topic, which lets the topic's stream keep its epoch across the restart.

pub mod log;
pub mod pg;
