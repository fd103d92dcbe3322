//! Socket I/O adapters, knowing nothing of protocols or shards: the per-connection
//! [`outbox::Outbox`] flushed with one vectored `sendmsg`, the descriptor budget ([`fds`]),
//! listener setup, socket readiness
//! ([`poller`]: one epoll instance per shard), and TLS
//! ([`tls`]: certificates, reloads, the per-connection session).

pub mod fds;
pub mod listener;
pub mod outbox;
pub mod poller;
pub mod tls;

pub use outbox::{Flush, Outbox};
