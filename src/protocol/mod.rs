//! The sans-IO protocol core: bytes (and, where time matters, `now`) in; bytes, events and
//! deadlines out. Nothing here touches a socket, a clock or an executor, which is what lets the
//! benches, the fuzz targets and the unit tests drive it directly.
//!
//! Call order for one connection, as the shard driver does it:
//! 1. [`http::parse_request`] on the first bytes: an HTTP/1.1 request head.
//! 2. For an upgrade, [`ws::handshake::accept`] validates it and builds the `101` response.
//! 3. Every later read goes to [`ws::WsConn::handle_input`], which yields [`ws::WsEvent`]s.
//! 4. Text and binary messages go to [`phoenix::Session::handle_message`], which appends
//!    [`phoenix::Action`]s for the shard to carry out (replies, joins, publishes, closes).
//! 5. [`phoenix::Session::poll_timeout`] tells the driver when the session needs
//!    [`phoenix::Session::handle_timeout`] (the 60 s idle rule).

pub mod error;
pub mod http;
pub mod json;
pub mod phoenix;
pub mod sse;
pub mod ws;
