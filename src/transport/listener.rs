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

use std::io;
use std::net::SocketAddr;
use std::os::unix::io::{IntoRawFd, RawFd};
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, Socket, Type};

/// Listen backlog requested (the kernel caps it at `net.core.somaxconn`).
pub const BACKLOG: i32 = 4096;

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
        s.listen(BACKLOG)?;
        if bound.port() == 0 {
            bound = s.local_addr()?.as_socket().ok_or_else(|| io::Error::other("not an IP socket"))?;
        }
        fds.push(s.into_raw_fd());
    }
    Ok((fds, bound))
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
