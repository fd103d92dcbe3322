//! A WebSocket echo server on corecast's own codec, for conformance runs (Autobahn TestSuite's
//! `fuzzingclient`, see `tests/autobahn/run.sh`).
//!
//! The bytes take the server's own path: the request head is parsed with
//! [`http::parse_request`] and answered by [`handshake::accept`]; every read (into a 64 KiB
//! buffer, the size of a shard's scratch buffer) goes through [`WsConn::handle_input`]; text and
//! binary messages are echoed as one unmasked [`frame`], pings are answered with a pong, and
//! closes are answered as the shard's connection driver does: the peer's code echoed through
//! [`conn::echo_code`] (1000 for no code), a codec error closed with its
//! [`WsError::close_code`](corecast::protocol::error::WsError::close_code) and reason. Then the
//! socket closes the way the driver's lingering close does: flush, shut down writing, drain
//! unread input for a moment.
//!
//! What differs from the real server is only the I/O: blocking `std::net` sockets and a thread
//! per connection instead of a glommio shard, and no Phoenix session (messages are echoed, not
//! decoded). Autobahn runs its cases one connection at a time, so this is plenty.
//!
//! ```sh
//! cargo run --release --example ws_echo -- --listen 127.0.0.1:9001
//! ```

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use clap::Parser;
use corecast::protocol::http::{self, parse_request};
use corecast::protocol::ws::conn::WsLimits;
use corecast::protocol::ws::frame::{close_frame, frame, OpCode};
use corecast::protocol::ws::{handshake, CloseCode, WsConn, WsEvent};
use corecast::shard::conn;

/// Echo server options. The size limits default far above Autobahn's largest case (9.x sends
/// 16 MiB messages, some as one frame).
#[derive(Debug, Parser)]
#[command(about = "WebSocket echo server on corecast's codec (for Autobahn conformance runs)")]
struct Args {
    /// Address to listen on.
    #[arg(long, env = "WS_ECHO_LISTEN", default_value = "127.0.0.1:9001")]
    listen: String,

    /// Largest frame payload accepted (bytes); larger closes with 1009.
    #[arg(long, env = "WS_ECHO_MAX_FRAME_BYTES", default_value_t = 32 << 20)]
    max_frame_bytes: usize,

    /// Largest reassembled message accepted (bytes); larger closes with 1009.
    #[arg(long, env = "WS_ECHO_MAX_MESSAGE_BYTES", default_value_t = 32 << 20)]
    max_message_bytes: usize,

    /// Largest HTTP request head accepted (bytes).
    #[arg(long, env = "WS_ECHO_MAX_HEAD_BYTES", default_value_t = 16 << 10)]
    max_head_bytes: usize,
}

/// Reads per `read` call: a shard's scratch buffer is 64 KiB too, so the codec sees the same
/// splits it would in the server.
const READ_BUF: usize = 64 << 10;
/// How long a closed connection's unread input is drained (as the shard's driver does).
const DRAIN_UNREAD: Duration = Duration::from_millis(500);

fn main() -> io::Result<()> {
    let args = Args::parse();
    let limits = WsLimits { max_frame: args.max_frame_bytes, max_message: args.max_message_bytes };
    let listener = TcpListener::bind(&args.listen)?;
    // The run script waits for this line.
    println!("ws_echo listening on {}", listener.local_addr()?);
    for stream in listener.incoming() {
        let Ok(stream) = stream else { continue };
        let max_head = args.max_head_bytes;
        std::thread::spawn(move || {
            if let Err(e) = serve(stream, limits, max_head) {
                eprintln!("ws_echo: connection ended: {e}");
            }
        });
    }
    Ok(())
}

/// Serves one connection: the HTTP upgrade, then WebSocket echo until either side closes.
fn serve(mut stream: TcpStream, limits: WsLimits, max_head: usize) -> io::Result<()> {
    stream.set_nodelay(true)?;
    let mut buf = vec![0u8; READ_BUF];
    let mut pending = Vec::new();
    let leftover = loop {
        let n = stream.read(&mut buf)?;
        if n == 0 {
            return Ok(());
        }
        pending.extend_from_slice(&buf[..n]);
        let refusal = match parse_request(&pending, max_head) {
            Ok(None) => continue,
            Ok(Some((req, head_len))) => match handshake::accept(&req) {
                Ok(response) => {
                    stream.write_all(&response)?;
                    break pending.split_off(head_len);
                }
                Err(e) => http::json_error(400, &e.to_string(), false),
            },
            Err(e) => http::json_error(e.status(), &e.to_string(), false),
        };
        stream.write_all(&refusal)?;
        return close(stream);
    };

    let mut ws = WsConn::new();
    let mut out = Vec::new();
    let mut alive = true;
    if !leftover.is_empty() {
        let mut data = leftover;
        alive = ws_input(&mut ws, &mut data, limits, &mut out);
    }
    while alive {
        stream.write_all(&out)?;
        out.clear();
        let n = stream.read(&mut buf)?;
        if n == 0 {
            return Ok(());
        }
        alive = ws_input(&mut ws, &mut buf[..n], limits, &mut out);
    }
    stream.write_all(&out)?;
    close(stream)
}

/// Feeds one read through the codec, appending the replies to `out`; returns `false` when the
/// connection must close (the close frame is already in `out`). Mirrors the shard's
/// `ws_input`, with echo in place of the Phoenix session.
fn ws_input(ws: &mut WsConn, data: &mut [u8], limits: WsLimits, out: &mut Vec<u8>) -> bool {
    let mut peer_closed = None;
    let result = ws.handle_input(data, limits, |ev| match ev {
        WsEvent::Text(t) => out.extend_from_slice(&frame(OpCode::Text, t)),
        WsEvent::Binary(b) => out.extend_from_slice(&frame(OpCode::Binary, b)),
        WsEvent::Ping(p) => out.extend_from_slice(&frame(OpCode::Pong, p)),
        WsEvent::Pong => {}
        WsEvent::Close { code, .. } => peer_closed = Some(code),
    });
    if let Err(e) = result {
        out.extend_from_slice(&close_frame(e.close_code(), &e.to_string()));
        return false;
    }
    if let Some(code) = peer_closed {
        let reply = if code == 1005 { CloseCode::Normal } else { conn::echo_code(code) };
        out.extend_from_slice(&close_frame(reply, ""));
        return false;
    }
    true
}

/// The lingering close of the shard's driver: stop writing, then read and discard what the
/// peer still sends for a moment, so that unread input does not turn the close into a reset.
fn close(mut stream: TcpStream) -> io::Result<()> {
    stream.shutdown(Shutdown::Write)?;
    let deadline = Instant::now() + DRAIN_UNREAD;
    let mut sink = [0u8; 4096];
    let mut total = 0usize;
    while total < 4 << 20 {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        stream.set_read_timeout(Some(left))?;
        match stream.read(&mut sink) {
            Ok(0) | Err(_) => break,
            Ok(n) => total += n,
        }
    }
    let _ = stream.shutdown(Shutdown::Both);
    Ok(())
}
