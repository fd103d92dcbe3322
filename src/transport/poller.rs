//! Socket readiness for a shard: one edge-triggered epoll instance per shard, itself waited
//! on with a single io_uring poll.
//!
//! Why not one io_uring poll per connection (what glommio's streams do): each such wait costs
//! a submission, a completion run as task work (with an inter-processor interrupt when the
//! wake-up comes from another CPU) and a ~500-byte glommio `Source` held by every idle
//! connection for as long as it is idle. Here a connection is registered once, at accept,
//! for input and output edges; the kernel keeps the registration (no user memory, nothing to
//! re-arm) and drops it when the socket is closed. One io_uring poll on the epoll instance
//! then covers every connection that became ready since the last look, so a burst of
//! connections or messages costs one wake-up, not one per socket.
//!
//! Edge-triggered rules the connection driver keeps: a socket is read until a read comes back
//! short or with `EAGAIN` before its `readable` flag is cleared, and written until `EAGAIN`
//! before its `writable` flag is cleared; an event sets the flag again. Stale events are
//! harmless (one extra `EAGAIN`), and a missed edge is impossible because the flags are only
//! cleared by the shard thread that also processes the events.

use std::io;
use std::os::unix::io::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// What an event says about a socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ready {
    /// Input, end of input or an error is waiting: a read will not block.
    pub read: bool,
    /// Buffer space was freed, or the socket failed: a write will not block.
    pub write: bool,
    /// The peer closed its side (or the socket failed): input ends, reads never block again.
    pub hup: bool,
}

/// Events taken from the kernel per `epoll_wait`.
pub const BATCH: usize = 512;

/// A shard's epoll instance.
#[derive(Debug)]
pub struct Poller {
    epfd: OwnedFd,
}

impl Poller {
    /// A new epoll instance (close-on-exec).
    pub fn new() -> io::Result<Self> {
        // SAFETY: epoll_create1 has no memory arguments.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just created and is owned by nobody else.
        Ok(Self { epfd: unsafe { OwnedFd::from_raw_fd(fd) } })
    }

    /// The epoll instance's fd, to wait on.
    pub fn fd(&self) -> RawFd {
        self.epfd.as_raw_fd()
    }

    /// Registers `fd` for input and output edges, reported with `token`. The registration
    /// lasts until the socket is closed.
    pub fn add(&self, fd: RawFd, token: u64) -> io::Result<()> {
        let mut ev = libc::epoll_event {
            events: (libc::EPOLLIN | libc::EPOLLOUT | libc::EPOLLRDHUP | libc::EPOLLET) as u32,
            u64: token,
        };
        // SAFETY: `ev` is a valid event for the call; the kernel copies it.
        let r = unsafe { libc::epoll_ctl(self.epfd.as_raw_fd(), libc::EPOLL_CTL_ADD, fd, &mut ev) };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Takes the events that are ready now, without waiting; calls `f` with each one's token
    /// and readiness. Returns how many there were (`BATCH`: there may be more).
    pub fn take(&self, buf: &mut [libc::epoll_event], mut f: impl FnMut(u64, Ready)) -> io::Result<usize> {
        let n = loop {
            // SAFETY: the kernel writes at most `buf.len()` events into `buf`.
            let n = unsafe { libc::epoll_wait(self.epfd.as_raw_fd(), buf.as_mut_ptr(), buf.len() as i32, 0) };
            if n >= 0 {
                break n as usize;
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        };
        for ev in &buf[..n] {
            let bits = ev.events as i32;
            let failed = bits & (libc::EPOLLERR | libc::EPOLLHUP) != 0;
            let hup = failed || bits & libc::EPOLLRDHUP != 0;
            let ready =
                Ready { read: hup || bits & libc::EPOLLIN != 0, write: failed || bits & libc::EPOLLOUT != 0, hup };
            // Copy out of the packed struct before use.
            let token = ev.u64;
            f(token, ready);
        }
        Ok(n)
    }
}

/// An empty event buffer for [`Poller::take`].
pub fn event_buffer() -> Vec<libc::epoll_event> {
    vec![libc::epoll_event { events: 0, u64: 0 }; BATCH]
}

/// Reads into `buf` without blocking: `Ok(None)` when nothing is there (`EAGAIN`).
pub fn recv(fd: RawFd, buf: &mut [u8]) -> io::Result<Option<usize>> {
    loop {
        // SAFETY: the kernel writes at most `buf.len()` bytes into `buf`.
        let r = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) };
        if r >= 0 {
            return Ok(Some(r as usize));
        }
        let e = io::Error::last_os_error();
        match e.kind() {
            io::ErrorKind::Interrupted => continue,
            io::ErrorKind::WouldBlock => return Ok(None),
            _ => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::unix::net::UnixStream;

    #[test]
    fn reports_input_output_and_hangup_edges_with_their_tokens() {
        let p = Poller::new().unwrap();
        let mut buf = event_buffer();
        let (a, mut b) = UnixStream::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        p.add(a.as_raw_fd(), 7).unwrap();
        // Registration reports the socket writable at once.
        let mut seen = Vec::new();
        p.take(&mut buf, |t, r| seen.push((t, r))).unwrap();
        assert_eq!(seen, vec![(7, Ready { read: false, write: true, hup: false })]);
        // Edge-triggered: nothing new, nothing reported.
        seen.clear();
        assert_eq!(p.take(&mut buf, |t, r| seen.push((t, r))).unwrap(), 0);
        // Input sets the read edge; reading drains it.
        b.write_all(b"hello").unwrap();
        p.take(&mut buf, |t, r| seen.push((t, r))).unwrap();
        assert_eq!(seen.len(), 1);
        assert!(seen[0].1.read);
        let mut got = [0u8; 16];
        assert_eq!(recv(a.as_raw_fd(), &mut got).unwrap(), Some(5));
        assert_eq!(recv(a.as_raw_fd(), &mut got).unwrap(), None);
        // The peer going away is a read edge too (then end of input).
        seen.clear();
        drop(b);
        p.take(&mut buf, |t, r| seen.push((t, r))).unwrap();
        assert!(seen.iter().any(|(t, r)| *t == 7 && r.read && r.hup));
        assert_eq!(recv(a.as_raw_fd(), &mut got).unwrap(), Some(0));
    }
}
