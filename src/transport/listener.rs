//! Listening sockets: one per shard on the same address with `SO_REUSEPORT`, so the kernel
//! spreads incoming connections across shards. With port 0 the first socket picks the port
//! and the others bind to the same one.

use std::io;
use std::net::SocketAddr;
use std::os::unix::io::{IntoRawFd, RawFd};

use socket2::{Domain, Protocol, Socket, Type};

/// Listen backlog requested (the kernel caps it at `net.core.somaxconn`).
pub const BACKLOG: i32 = 4096;

/// Binds `n` listening sockets to `addr` with `SO_REUSEPORT`; returns their fds and the bound
/// address (with the real port when `addr` had port 0).
pub fn bind_reuseport(addr: SocketAddr, n: usize) -> io::Result<(Vec<RawFd>, SocketAddr)> {
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
