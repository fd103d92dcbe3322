//! The single integration-test binary (ripgrep style): every module boots the real `corecast`
//! binary on port 0 and talks to it over real sockets.
//!
//! Where new tests go:
//! - `ws`: WebSocket, Phoenix protocol and broadcast behaviour with Rust clients;
//! - `bad_input`: malformed frames/JSON/requests, floods, slow readers;
//! - `rest`: REST endpoints;
//! - `presence`: presence across shards;
//! - `history`: history, persistence, resume and replay;
//! - `sse`: Server-Sent Events streams;
//! - `lifecycle`: start-up flags, shutdown;
//! - `cluster`: several nodes sharing a real PostgreSQL (`--cluster postgres`);
//! - `pg`: Postgres changes against a real PostgreSQL (tests/util/pg.rs), realtime-js included;
//! - `tls`: the listener over TLS (`--tls-cert`), certificate checks and reloads;
//! - `interop`: the unmodified `@supabase/realtime-js` under Node (tests/js).

mod util;

mod bad_input;
mod client_js;
mod cluster;
mod history;
mod interop;
mod lifecycle;
mod pg;
mod presence;
mod rest;
mod sse;
mod tls;
mod ws;
