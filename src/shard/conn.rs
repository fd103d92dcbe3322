//! The per-connection task: reads socket bytes, feeds them to the protocol state machines and
//! executes the resulting actions against the shard; waits for writability when the flusher
//! found the socket full; closes the connection when asked.
//!
//! Reads go into the shard's shared scratch buffer and are processed before the next
//! `.await`, so an idle connection holds no read buffer. Reads and writes are direct
//! non-blocking system calls; when one would block, the task sleeps until the shard's poller
//! ([`crate::transport::poller`]) reports an edge for the socket, so an idle connection holds
//! no pending I/O request either.
//!
//! Cancel safety: dropping the task drops the socket; [`serve`] always unregisters the
//! connection from the shard first, so no frame is ever written to a recycled fd (and a
//! readiness event for an old connection finds another generation in its slot and is dropped).

use std::io;
use std::os::unix::io::{AsRawFd, OwnedFd, RawFd};
use std::rc::Rc;
use std::task::Poll;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::channel::registry::ConnId;
use crate::protocol::http::{self, parse_request};
use crate::protocol::phoenix::session::{Action, Now};
use crate::protocol::phoenix::Session;
use crate::protocol::ws::frame::{frame, OpCode};
use crate::protocol::ws::{CloseCode, WsConn, WsEvent};
use crate::shard::rest::{self, Outcome};
use crate::shard::{token, Closing, Kind, Shard, Slot, WsState};
use crate::transport::{listener, poller, tls, Flush};

use super::stats::ShardStats;

/// How long a closing connection may take to flush its last frames.
const LINGER: Duration = Duration::from_secs(2);

/// Why [`wait`] returned.
enum Wake {
    Read(usize),
    /// A deferred HTTP response was queued.
    HttpReady,
    Eof,
    Close(Closing),
    Failed,
}

/// The current time for sessions.
pub fn now() -> Now {
    let unix_secs = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    Now { mono: Instant::now(), unix_secs }
}

/// Serves one accepted connection until it ends.
/// `admitted` holds its place under the connection cap until the socket is closed.
pub async fn serve(shard: Rc<Shard>, fd: OwnedFd, admitted: crate::transport::fds::Admitted) {
    let raw = fd.as_raw_fd();
    // TCP_NODELAY comes from the listener (`transport::listener`).
    let id = shard.register(raw);
    ShardStats::add(&shard.my_stats().accepted, 1);
    if let Err(e) = shard.poller().add(raw, token(id)) {
        tracing::warn!(error = %e, "cannot watch a connection");
        shard.unregister(id);
        return;
    }
    if let Some(acceptor) = &shard.tls {
        match tls::Session::new(acceptor.config()) {
            Ok(session) => {
                shard.with_slot(id, |s| s.tls = Some(Box::new(session)));
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot start a TLS session");
                shard.unregister(id);
                return;
            }
        }
    }
    let end = drive(&shard, id).await;
    if end == Some(Closing::Graceful) {
        // From here only `linger` writes; the flusher skips closing connections.
        shard.with_slot(id, |s| s.closing = Some(Closing::Graceful));
        let _ = glommio::timer::timeout(LINGER, async {
            linger(&shard, id).await;
            Ok(())
        })
        .await;
        // Lingering close: stop writing, then read and discard what the peer still sends
        // (say, the body of a refused request) for a moment. Closing with unread input would
        // make the kernel answer with a reset that can destroy the response just sent.
        shard.unregister(id);
        // SAFETY: a shutdown of this connection's own socket.
        unsafe { libc::shutdown(raw, libc::SHUT_WR) };
        let _ = glommio::timer::timeout(DRAIN_UNREAD, async {
            drain_unread(&shard, raw).await;
            Ok(())
        })
        .await;
    } else {
        shard.unregister(id);
    }
    // Dropping `fd` closes the socket (a FIN, or a reset where input is unread) and ends its
    // epoll registration: a `shutdown` first would be one more system call for nothing.
    drop(fd);
    drop(admitted);
}

/// How long a closed connection's unread input is drained before the socket is closed.
const DRAIN_UNREAD: Duration = Duration::from_millis(500);

/// Reads and discards input until the peer closes (at most 4 MiB). The connection is no longer
/// registered, so no readiness edge reaches it: this looks again every few milliseconds, which
/// only a peer that keeps sending after the response ever waits for.
async fn drain_unread(shard: &Shard, fd: RawFd) {
    let mut total = 0usize;
    while total < 4 << 20 {
        let r = poller::recv(fd, &mut shard.scratch.borrow_mut()[..]);
        match r {
            Ok(Some(0)) | Err(_) => return,
            Ok(Some(n)) => total += n,
            Ok(None) => glommio::timer::sleep(Duration::from_millis(10)).await,
        }
    }
}

/// Writes out what is queued (used after a graceful close was requested); a TLS connection
/// ends with `close_notify`.
async fn linger(shard: &Shard, id: ConnId) {
    futures_lite::future::poll_fn(|cx| {
        shard
            .with_slot(id, |slot| loop {
                match poll_out(shard, slot, cx) {
                    Poll::Ready(Ok(())) => match &mut slot.tls {
                        Some(t) if !t.closed() => t.close_notify(),
                        _ => return Poll::Ready(()),
                    },
                    Poll::Ready(Err(_)) => return Poll::Ready(()),
                    Poll::Pending => return Poll::Pending,
                }
            })
            .unwrap_or(Poll::Ready(()))
    })
    .await
}

/// Keeps `cx`'s waker on `slot`, for the shard to wake on readiness and requests.
fn keep_waker(slot: &mut Slot, cx: &std::task::Context<'_>) {
    match &slot.waker {
        Some(w) if w.will_wake(cx.waker()) => {}
        _ => slot.waker = Some(cx.waker().clone()),
    }
}

/// Writes everything queued on `slot`, encrypting it first on a TLS connection; `Pending`
/// (until an output edge wakes the task) while the socket buffer is full.
fn poll_out(shard: &Shard, slot: &mut Slot, cx: &mut std::task::Context<'_>) -> Poll<io::Result<()>> {
    if !slot.writable {
        // `blocked`: the output edge wakes this task (`Shard::on_ready`).
        slot.blocked = true;
        keep_waker(slot, cx);
        return Poll::Pending;
    }
    let before = slot.outbox.counters();
    let r = slot.flush();
    let after = slot.outbox.counters();
    let st = shard.my_stats();
    ShardStats::add(&st.frames_sent, after.0 - before.0);
    ShardStats::add(&st.sends, after.1 - before.1);
    match r {
        Ok(Flush::Drained) => Poll::Ready(Ok(())),
        Ok(Flush::Blocked) => {
            slot.blocked = true;
            keep_waker(slot, cx);
            Poll::Pending
        }
        Err(e) => Poll::Ready(Err(e)),
    }
}

/// Runs the connection; returns how it should be closed (`None`: the peer is gone).
async fn drive(shard: &Rc<Shard>, id: ConnId) -> Option<Closing> {
    let mut pending: Vec<u8> = Vec::new();
    // HTTP phase: requests (keep-alive, pipelined) until an upgrade or the end.
    let leftover = 'http: loop {
        match wait(shard, id).await {
            Wake::Read(n) => pending.extend_from_slice(&shard.scratch.borrow()[..n]),
            Wake::HttpReady => {}
            Wake::Eof | Wake::Failed => return None,
            Wake::Close(c) => return Some(c),
        }
        loop {
            match http_step(shard, id, &mut pending) {
                Step::NeedMore => {
                    if !pending.is_empty() {
                        // The client is still sending this request.
                        ack_unanswered(shard, id);
                    }
                    break;
                }
                Step::Continue => continue,
                Step::Close => return Some(Closing::Graceful),
                Step::Upgraded => break 'http std::mem::take(&mut pending),
                Step::Sse => {
                    // The stream only flows out; whatever the client sends is ignored.
                    drop(pending);
                    loop {
                        match wait(shard, id).await {
                            Wake::Read(_) | Wake::HttpReady => {}
                            Wake::Eof | Wake::Failed => return None,
                            Wake::Close(c) => return Some(c),
                        }
                    }
                }
                Step::Deferred { keep_alive } => {
                    // Another shard answers; later requests wait so responses stay in order.
                    loop {
                        match wait(shard, id).await {
                            Wake::Read(n) => pending.extend_from_slice(&shard.scratch.borrow()[..n]),
                            Wake::HttpReady => break,
                            Wake::Eof | Wake::Failed => return None,
                            Wake::Close(c) => return Some(c),
                        }
                    }
                    if !keep_alive {
                        return Some(Closing::Graceful);
                    }
                }
            }
        }
    };
    drop(pending);
    // WebSocket phase. The request's buffer goes before the first wait: kept in this future,
    // its capacity (the size of the upgrade request) would cost every idle connection.
    let mut buf = leftover;
    if !buf.is_empty() && !ws_input(shard, id, &mut buf) {
        return Some(Closing::Graceful);
    }
    drop(buf);
    loop {
        if shard.congested() {
            shard.wait_uncongested().await;
        }
        match wait(shard, id).await {
            Wake::Read(n) => {
                let mut scratch = shard.scratch.borrow_mut();
                let alive = ws_input(shard, id, &mut scratch[..n]);
                drop(scratch);
                if !alive {
                    return Some(Closing::Graceful);
                }
            }
            Wake::HttpReady => {}
            Wake::Eof | Wake::Failed => return None,
            Wake::Close(c) => return Some(c),
        }
    }
}

/// Result of trying to handle one HTTP request from the pending bytes.
enum Step {
    NeedMore,
    Continue,
    Close,
    Upgraded,
    /// The response comes later (from the topic's owner shard).
    Deferred {
        keep_alive: bool,
    },
    /// The connection is now a Server-Sent Events stream.
    Sse,
}

/// Parses and handles one request at the front of `pending`, consuming it.
fn http_step(shard: &Shard, id: ConnId, pending: &mut Vec<u8>) -> Step {
    if pending.is_empty() {
        return Step::NeedMore;
    }
    let limits = &shard.cfg.limits;
    let (outcome, consumed) = match parse_request(pending, limits.max_head_bytes) {
        Err(e) => {
            shard.send(id, http::json_error(e.status(), &e.to_string(), false).into());
            return Step::Close;
        }
        Ok(None) => return Step::NeedMore,
        Ok(Some((req, head_len))) => {
            let refuse = |e: crate::protocol::error::HttpError| {
                shard.send(id, http::json_error(e.status(), &e.to_string(), false).into());
                Step::Close
            };
            let max = limits.max_message_bytes;
            match req.body() {
                Ok(http::Body::Length(n)) if n > max => {
                    return refuse(crate::protocol::error::HttpError::BodyTooLarge(max))
                }
                Ok(http::Body::Length(n)) => {
                    if pending.len() < head_len + n {
                        answer_expect(shard, id, &req, pending.len() == head_len);
                        return Step::NeedMore;
                    }
                    ShardStats::add(&shard.my_stats().http_requests, 1);
                    (rest::handle(shard, id, &req, &pending[head_len..head_len + n]), head_len + n)
                }
                Ok(http::Body::Chunked) => match http::decode_chunked(&pending[head_len..], max) {
                    Ok(None) => {
                        answer_expect(shard, id, &req, pending.len() == head_len);
                        return Step::NeedMore;
                    }
                    Ok(Some((body, used))) => {
                        ShardStats::add(&shard.my_stats().http_requests, 1);
                        (rest::handle(shard, id, &req, &body), head_len + used)
                    }
                    Err(e) => return refuse(e),
                },
                Err(e) => return refuse(e),
            }
        }
    };
    pending.drain(..consumed);
    match outcome {
        Outcome::Respond { bytes, keep_alive } => {
            shard.send(id, bytes.into());
            if keep_alive {
                Step::Continue
            } else {
                Step::Close
            }
        }
        Outcome::Deferred { keep_alive } => Step::Deferred { keep_alive },
        Outcome::Sse(req) => {
            shard.sse_open(id, *req);
            Step::Sse
        }
        Outcome::Upgrade { response, vsn, claims } => {
            shard.send(id, response.into());
            shard.with_slot(id, |s| {
                s.kind = Kind::Ws(Box::new(WsState { ws: WsConn::new(), session: Session::new(vsn, claims) }));
            });
            ShardStats::gauge(&shard.my_stats().websockets, 1);
            Step::Upgraded
        }
    }
}

/// Acknowledges the connection's input at once when nothing is queued to go back to it. The
/// kernel would otherwise acknowledge it only with its delayed-ACK timer, and a client whose
/// next small write waits for that ACK (Nagle's algorithm: tokio-tungstenite's
/// `connect_async`, plain Java and Erlang sockets) would send it 40 ms late, write after
/// write. That ACK would be a packet of its own anyway; a queued reply carries it instead.
fn ack_unanswered(shard: &Shard, id: ConnId) {
    if let Some(Some(fd)) = shard.with_slot(id, |s| (s.outbox.is_empty() && s.closing.is_none()).then_some(s.fd)) {
        listener::ack_now(fd);
    }
}

/// Sends `100 Continue` to a client that waits for it before sending its body, once the head
/// has passed the checks that could refuse it (its size, its framing) and while no body byte
/// has come (`no_body_yet`): after that the client is sending anyway, and a request is
/// parsed again only when more of it arrives, so it is answered once.
fn answer_expect(shard: &Shard, id: ConnId, req: &http::Request<'_>, no_body_yet: bool) {
    if no_body_yet && req.expects_continue() {
        shard.send(id, http::CONTINUE.into());
    }
}

/// Feeds WebSocket bytes through the codec and the session; returns `false` when the
/// connection must close (the close frame is already queued).
fn ws_input(shard: &Shard, id: ConnId, data: &mut [u8]) -> bool {
    // Per read, not per connection: a kept buffer would cost every idle connection its capacity.
    let mut actions: Vec<Action> = Vec::new();
    let actions = &mut actions;
    let now = now();
    let limits = crate::protocol::ws::conn::WsLimits {
        max_frame: shard.cfg.limits.max_frame_bytes,
        max_message: shard.cfg.limits.max_message_bytes,
    };
    let mut messages = 0u64;
    let mut peer_closed = None;
    let result = {
        let mut conns = shard.conns.borrow_mut();
        let Some(slot) = conns.get_mut(id.index as usize).filter(|s| s.generation == id.generation) else {
            return false;
        };
        slot.last_rx = now.mono;
        let Kind::Ws(state) = &mut slot.kind else {
            return false;
        };
        let WsState { ws, session } = &mut **state;
        ws.handle_input(data, limits, |ev| match ev {
            WsEvent::Text(t) => {
                messages += 1;
                session.handle_text(now, t, &shard.ctx, actions);
            }
            WsEvent::Binary(b) => {
                messages += 1;
                session.handle_binary(b, &shard.ctx, actions);
            }
            WsEvent::Ping(p) => actions.push(Action::Send(frame(OpCode::Pong, p))),
            WsEvent::Pong => {}
            WsEvent::Close { code, .. } => peer_closed = Some(code),
        })
    };
    ShardStats::add(&shard.my_stats().messages_in, messages);
    shard.run_actions(id, actions);
    if let Err(e) = result {
        ShardStats::add(&shard.my_stats().protocol_errors, 1);
        shard.close(id, e.close_code(), &e.to_string());
        return false;
    }
    if let Some(code) = peer_closed {
        // Echo the peer's code (1005 "no code" is answered with 1000), then close.
        let reply = if code == 1005 { CloseCode::Normal } else { echo_code(code) };
        shard.close(id, reply, "");
        return false;
    }
    // A broadcast without `ack`, part of a frame: input nothing may answer. (Not for a
    // connection that is closing: nothing more is read from it.)
    ack_unanswered(shard, id);
    shard.with_slot(id, |s| s.closing.is_none()).unwrap_or(false)
}

/// The close code sent in answer to a peer's close with `code`: the same code where the server
/// has one of its own for it, 1000 otherwise. Public for the conformance echo example.
pub fn echo_code(code: u16) -> CloseCode {
    match code {
        1001 => CloseCode::GoingAway,
        1002 => CloseCode::Protocol,
        1007 => CloseCode::InvalidPayload,
        1008 => CloseCode::Policy,
        1009 => CloseCode::TooBig,
        1011 => CloseCode::Internal,
        _ => CloseCode::Normal,
    }
}

/// Waits until the socket has input (read into the shard's scratch buffer; plaintext on a
/// TLS connection), the shard asks this connection to close, or the socket fails. While the
/// outbox is blocked, it also writes whenever the socket has room again.
async fn wait(shard: &Shard, id: ConnId) -> Wake {
    futures_lite::future::poll_fn(|cx| loop {
        let (fd, tls) = {
            let mut conns = shard.conns.borrow_mut();
            let Some(slot) = conns.get_mut(id.index as usize).filter(|s| s.generation == id.generation) else {
                return Poll::Ready(Wake::Failed);
            };
            if let Some(c) = slot.closing {
                return Poll::Ready(Wake::Close(c));
            }
            if std::mem::take(&mut slot.http_ready) {
                return Poll::Ready(Wake::HttpReady);
            }
            if slot.blocked {
                match poll_out(shard, slot, cx) {
                    Poll::Ready(Ok(())) => slot.blocked = false,
                    Poll::Ready(Err(_)) => return Poll::Ready(Wake::Failed),
                    Poll::Pending => {}
                }
            }
            // Input rustls decrypted earlier than the scratch buffer could take.
            if let Some(t) = slot.tls.as_mut() {
                if t.has_input() {
                    let mut scratch = shard.scratch.borrow_mut();
                    match t.plaintext(&mut scratch[..]) {
                        Ok(0) => {}
                        Ok(n) => return Poll::Ready(Wake::Read(n)),
                        Err(_) => return Poll::Ready(Wake::Failed),
                    }
                }
            }
            if !slot.readable {
                keep_waker(slot, cx);
                return Poll::Pending;
            }
            (slot.fd, slot.tls.is_some())
        };
        let mut scratch = shard.scratch.borrow_mut();
        let n = match poller::recv(fd, &mut scratch[..]) {
            Ok(Some(0)) => return Poll::Ready(Wake::Eof),
            Ok(Some(n)) => {
                if n < scratch.len() {
                    // A short read took everything there was; the next input is a new edge.
                    // Not after the peer's FIN, which no later edge would report again.
                    shard.with_slot(id, |s| s.readable = s.hup);
                }
                n
            }
            Ok(None) => {
                shard.with_slot(id, |s| s.readable = false);
                continue;
            }
            Err(_) => return Poll::Ready(Wake::Failed),
        };
        if !tls {
            return Poll::Ready(Wake::Read(n));
        }
        match shard.with_slot(id, |slot| tls_input(shard, slot, &mut scratch[..], n)) {
            Some(TlsInput::Plain(0)) => continue,
            Some(TlsInput::Plain(n)) => return Poll::Ready(Wake::Read(n)),
            Some(TlsInput::Closed) => return Poll::Ready(Wake::Eof),
            Some(TlsInput::Failed) | None => return Poll::Ready(Wake::Failed),
        }
    })
    .await
}

/// What a read on a TLS connection gave.
enum TlsInput {
    /// Plaintext bytes now at the front of the scratch buffer (0: none yet, read again).
    Plain(usize),
    /// The peer sent `close_notify`.
    Closed,
    Failed,
}

/// Decrypts the `n` raw bytes at the front of `scratch` into plaintext at its front, and
/// writes what the TLS session has to say (handshake messages, alerts, frames queued during
/// the handshake).
fn tls_input(shard: &Shard, slot: &mut Slot, scratch: &mut [u8], n: usize) -> TlsInput {
    let Some(t) = slot.tls.as_mut() else { return TlsInput::Failed };
    let handshaking = !t.established();
    if t.absorb(&scratch[..n]) == tls::Opening::PlainHttp {
        ShardStats::add(&shard.my_stats().tls_failures, 1);
        plain_refusal(slot.fd);
        return TlsInput::Failed;
    }
    let result = t.plaintext(scratch);
    if handshaking && t.established() {
        ShardStats::add(&shard.my_stats().tls_handshakes, 1);
    }
    let failed = result.is_err();
    if failed {
        ShardStats::add(&shard.my_stats().tls_failures, 1);
    }
    if t.wants_write() || (t.established() && !slot.outbox.is_empty()) {
        // Best effort for the alert of a failed session.
        match slot.flush() {
            Ok(Flush::Blocked) => slot.blocked = true,
            Ok(Flush::Drained) => {}
            Err(_) => return TlsInput::Failed,
        }
    }
    match result {
        Err(_) => TlsInput::Failed,
        Ok(0) if slot.tls.as_ref().is_some_and(|t| t.peer_closed()) => TlsInput::Closed,
        Ok(n) => TlsInput::Plain(n),
    }
}

/// The answer to a plain HTTP request on the TLS port, written straight to the socket (the
/// connection has no TLS session to write it through).
fn plain_refusal(fd: std::os::unix::io::RawFd) {
    let body = r#"{"error":"this port speaks TLS: use https:// or wss://"}"#;
    let response = format!(
        "HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    // SAFETY: a send of a local buffer on the connection's own fd.
    unsafe {
        libc::send(fd, response.as_ptr().cast(), response.len(), libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL);
    }
}
