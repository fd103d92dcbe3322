//! The Phoenix channel protocol as Supabase Realtime speaks it (vsn 1.0.0 and 2.0.0):
//! message codec ([`message`]), join configuration ([`config`]) and the per-socket session
//! state machine ([`session`]). See `reference/realtime-protocol.md` for the wire reference.

pub mod config;
pub mod message;
pub mod session;
pub mod topic;

pub use message::{InMessage, InPayload, Vsn};
pub use session::{Action, Session};
pub use topic::Topic;
