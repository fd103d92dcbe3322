//! Socket I/O adapters, knowing nothing of protocols or shards: the per-connection
//! [`outbox::Outbox`] flushed with one vectored `sendmsg`, and listener setup.

pub mod listener;
pub mod outbox;

pub use outbox::{Flush, Outbox};
