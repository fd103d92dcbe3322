//! WebSocket (RFC 6455), server role: frame codec, upgrade handshake and the per-connection
//! state machine. No extensions are negotiated (no permessage-deflate), so RSV bits are errors.

pub mod conn;
pub mod frame;
pub mod handshake;

pub use conn::{WsConn, WsEvent};
pub use frame::{CloseCode, OpCode};
