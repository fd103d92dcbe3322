//! Listening sockets: one per shard on the same address with `SO_REUSEPORT`, so the kernel
//! spreads incoming connections across shards. With port 0 the first socket picks the port
//! and the others bind to the same one.
//!
//! `SO_REUSEPORT` would also let this process join listeners that another process (of the same
//! user) still holds on the port: a second corecast started by mistake, or one just killed
//! whose io_uring teardown has not yet released its sockets. The kernel would then hand part
//! of the new connections to sockets nobody accepts from, and reset them. So before binding,
//! the address is claimed once without `SO_REUSEPORT`: while anything listens there, that
//! fails, and corecast waits a moment for a dying process to let go, then refuses to start.
//!
//! Three options set here save every connection work:
//! - `TCP_NODELAY` on the listener: Linux copies it into each accepted socket, so no
//!   `setsockopt` per connection.
//! - `TCP_DEFER_ACCEPT`: a connection is handed to `accept` once its first bytes (the HTTP
//!   request, the TLS ClientHello) have arrived, so the first read succeeds at once instead of
//!   failing with `EAGAIN` and arming a readiness poll. Every protocol on the port speaks
//!   first from the client side. A client silent for longer than [`DEFER_ACCEPT_SECS`] is
//!   accepted anyway (the kernel then completes the handshake without data), so nothing that
//!   connects early and sends late (a browser's preconnect) is lost.
//! - `TCP_QUICKACK` off (set after `listen`, which would reset it), which accepted sockets
//!   inherit: the client's first segment (the request) is then acknowledged by the response,
//!   not by a bare ACK of its own first. Linux starts every connection acknowledging at once
//!   and switches to delayed, piggybacked ACKs after the first quick reply anyway; this only
//!   moves that switch to the start, and saves one packet (and its processing on both ends)
//!   per connection. Delayed ACKs cost a client with Nagle's algorithm on (which holds its
//!   next small write until the previous one is acknowledged) 40 ms per write whenever the
//!   server has nothing to send back: the rest of a request or a frame written in pieces, the
//!   next message of a publisher whose broadcasts nobody answers. So the connection task
//!   acknowledges at once ([`ack_now`]) whenever a read leaves a request incomplete, or WebSocket
//!   input leaves nothing queued to go back (that ACK would be a packet of its own anyway).

use std::io;
use std::net::SocketAddr;
use std::os::unix::io::{AsRawFd, IntoRawFd, RawFd};
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, Socket, Type};

/// Listen backlog requested (the kernel caps it at `net.core.somaxconn`).
pub const BACKLOG: i32 = 4096;

/// How long the kernel holds a connection that has sent nothing before handing it over.
pub const DEFER_ACCEPT_SECS: libc::c_int = 5;

/// Binds `n` listening sockets to `addr` with `SO_REUSEPORT`; returns their fds and the bound
/// address (with the real port when `addr` had port 0).
pub fn bind_reuseport(addr: SocketAddr, n: usize) -> io::Result<(Vec<RawFd>, SocketAddr)> {
    if addr.port() != 0 {
        wait_until_free(addr, FREE_WAIT)?;
    }
    let mut fds = Vec::with_capacity(n);
    let mut bound = addr;
    for _ in 0..n {
        let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
        s.set_reuse_address(true)?;
        s.set_reuse_port(true)?;
        s.bind(&bound.into())?;
        s.set_nodelay(true)?;
        set_defer_accept(&s, DEFER_ACCEPT_SECS)?;
        // The shard accepts until EAGAIN, then waits for readability (`shard::boot`).
        s.set_nonblocking(true)?;
        s.listen(BACKLOG)?;
        // After `listen`: it clears the socket's delayed-ACK state.
        set_tcp_int(s.as_raw_fd(), libc::TCP_QUICKACK, 0)?;
        if bound.port() == 0 {
            bound = s.local_addr()?.as_socket().ok_or_else(|| io::Error::other("not an IP socket"))?;
        }
        fds.push(s.into_raw_fd());
    }
    Ok((fds, bound))
}

/// Sets `TCP_DEFER_ACCEPT` (seconds) on a listening socket.
fn set_defer_accept(s: &Socket, secs: libc::c_int) -> io::Result<()> {
    set_tcp_int(s.as_raw_fd(), libc::TCP_DEFER_ACCEPT, secs)
}

/// Acknowledges what connection `fd` has received at once and leaves delayed-ACK mode until
/// the kernel's next quick reply: for input nothing answers soon (see the module doc).
/// Best effort: a failure only costs the client a delayed ACK.
pub fn ack_now(fd: RawFd) {
    let _ = set_tcp_int(fd, libc::TCP_QUICKACK, 1);
}

/// Sets an integer `IPPROTO_TCP` option on socket `fd`.
fn set_tcp_int(fd: RawFd, opt: libc::c_int, value: libc::c_int) -> io::Result<()> {
    // SAFETY: a setsockopt of an int; the kernel validates `fd`.
    let r = unsafe {
        libc::setsockopt(
            fd,
            libc::IPPROTO_TCP,
            opt,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// How long start-up waits for a port still held by other listeners.
pub const FREE_WAIT: Duration = Duration::from_secs(5);

/// Waits until nothing listens on `addr` (a bind without `SO_REUSEPORT` succeeds), for at most
/// `limit`; `AddrInUse` after that.
fn wait_until_free(addr: SocketAddr, limit: Duration) -> io::Result<()> {
    let deadline = Instant::now() + limit;
    let mut warned = false;
    loop {
        let probe = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
        // SO_REUSEADDR: connections of an earlier process in TIME_WAIT do not count.
        probe.set_reuse_address(true)?;
        match probe.bind(&addr.into()) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::AddrInUse => {
                if Instant::now() >= deadline {
                    return Err(io::Error::new(
                        io::ErrorKind::AddrInUse,
                        "another process listens on this address (is another corecast running?)",
                    ));
                }
                if !warned {
                    tracing::warn!(%addr, "address still in use; waiting for the process holding it to exit");
                    warned = true;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::unix::io::FromRawFd;

    #[test]
    fn accepted_sockets_inherit_nodelay_and_arrive_with_their_request() {
        let (fds, bound) = bind_reuseport("127.0.0.1:0".parse().unwrap(), 1).unwrap();
        // SAFETY: the fd was returned by bind_reuseport and is owned here.
        let listener = unsafe { std::net::TcpListener::from_raw_fd(fds[0]) };
        listener.set_nonblocking(false).unwrap();
        let mut client = std::net::TcpStream::connect(bound).unwrap();
        client.write_all(b"GET /health HTTP/1.1\r\n\r\n").unwrap();
        let (mut accepted, _) = listener.accept().unwrap();
        assert!(accepted.nodelay().unwrap(), "TCP_NODELAY is inherited from the listener");
        // Deferred accept: the request is already there when accept returns.
        accepted.set_nonblocking(true).unwrap();
        let mut buf = [0u8; 64];
        let n = accepted.read(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"GET /health HTTP/1.1\r\n\r\n");
    }

    #[test]
    fn refuses_a_port_another_listener_holds() {
        let (fds, bound) = bind_reuseport("127.0.0.1:0".parse().unwrap(), 2).unwrap();
        let err = wait_until_free(bound, Duration::from_millis(100)).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AddrInUse);
        // SAFETY: the fds were returned by bind_reuseport and are owned here.
        fds.into_iter().for_each(|fd| unsafe {
            libc::close(fd);
        });
        // Once they are closed the port can be bound again.
        let (fds, again) = bind_reuseport(bound, 2).unwrap();
        assert_eq!(again, bound);
        // SAFETY: as above.
        fds.into_iter().for_each(|fd| unsafe {
            libc::close(fd);
        });
    }
}
