//! The per-connection send queue: shared `Bytes` frames, flushed many at a time with one
//! vectored `sendmsg(MSG_DONTWAIT)`.
//!
//! Why: on this kind of machine a TCP segment costs ~3.5 µs of CPU whatever its size up to a
//! few KiB (`reference/runtime-notes.md` §6), so fan-out throughput is set by sends, not bytes.
//! Queuing refcounted frames per connection and writing them together turns K messages into
//! one send. glommio's accepted sockets are blocking fds, so the flag `MSG_DONTWAIT` is what
//! keeps a full socket buffer from blocking the shard.

use std::collections::VecDeque;
use std::io;
use std::os::unix::io::RawFd;

use bytes::Bytes;

/// Bytes counted per queued frame on top of its length: the queue entry itself. This makes a
/// flood of tiny frames hit the slow-consumer limit before it costs unbounded memory.
pub const ENTRY_OVERHEAD: usize = 32;

/// Most iovecs per `sendmsg` (Linux `UIO_MAXIOV` is 1024).
const MAX_IOV: usize = 256;

/// Outcome of [`Outbox::flush`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flush {
    /// Everything was written.
    Drained,
    /// The socket buffer is full; wait for writability and flush again.
    Blocked,
}

/// A connection's queue of frames waiting to be written.
#[derive(Debug, Default)]
pub struct Outbox {
    q: VecDeque<Bytes>,
    /// Bytes of the front frame already written.
    head_off: usize,
    /// Queued bytes not yet written, plus [`ENTRY_OVERHEAD`] per frame.
    queued: usize,
    /// Counters: frames written and `sendmsg` calls made.
    frames_sent: u64,
    sends: u64,
}

impl Outbox {
    /// An empty outbox (no allocation until the first push).
    pub fn new() -> Self {
        Self::default()
    }

    /// Queues a frame; returns the queued size afterwards.
    pub fn push(&mut self, frame: Bytes) -> usize {
        self.queued += frame.len() + ENTRY_OVERHEAD;
        self.q.push_back(frame);
        self.queued
    }

    /// Whether nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.q.is_empty()
    }

    /// Queued bytes (including per-frame overhead).
    pub fn queued_bytes(&self) -> usize {
        self.queued
    }

    /// Number of queued frames.
    pub fn len(&self) -> usize {
        self.q.len()
    }

    /// Frames written and `sendmsg` calls made so far.
    pub fn counters(&self) -> (u64, u64) {
        (self.frames_sent, self.sends)
    }

    /// Drops every queued frame except a partly written front one (which must be completed to
    /// keep the stream framed). Used before queuing a final close frame.
    pub fn truncate_to_partial(&mut self) {
        let keep = usize::from(self.head_off > 0 && !self.q.is_empty());
        while self.q.len() > keep {
            let b = self.q.pop_back().expect("len checked");
            self.queued -= b.len() + ENTRY_OVERHEAD;
        }
        if self.q.is_empty() {
            self.queued = 0;
            self.head_off = 0;
        }
    }

    /// The unwritten part of the front frame (for a writability wait that writes it).
    pub fn front(&self) -> Option<&[u8]> {
        self.q.front().map(|b| &b[self.head_off..])
    }

    /// The unwritten bytes of the first `max` frames, in order (for encryption, which takes
    /// them instead of a socket).
    pub fn pending(&self, max: usize) -> impl Iterator<Item = &[u8]> {
        self.q.iter().take(max).enumerate().map(|(i, b)| if i == 0 { &b[self.head_off..] } else { &b[..] })
    }

    /// Counts `k` writes made for this connection by someone else (the TLS session).
    pub fn count_sends(&mut self, k: u64) {
        self.sends += k;
    }

    /// Records one write of `n` bytes made outside [`Outbox::flush`] (a writability wait).
    pub fn wrote(&mut self, n: usize) {
        self.sends += 1;
        self.advance(n);
    }

    /// Marks `n` bytes as written from the front.
    pub fn advance(&mut self, mut n: usize) {
        while n > 0 {
            let Some(front) = self.q.front() else { return };
            let rem = front.len() - self.head_off;
            if n >= rem {
                n -= rem;
                self.queued -= rem + ENTRY_OVERHEAD;
                self.q.pop_front();
                self.head_off = 0;
                self.frames_sent += 1;
            } else {
                self.head_off += n;
                self.queued -= n;
                n = 0;
            }
        }
        if self.q.is_empty() && self.q.capacity() > 0 {
            // Give the queue's memory back once drained: idle connections then hold no buffer.
            // Under load a drain happens once per flush (many frames), so this costs one small
            // allocation per `sendmsg`, not per frame.
            self.q = VecDeque::new();
        }
    }

    /// Writes as much as the socket takes, many frames per `sendmsg`.
    pub fn flush(&mut self, fd: RawFd) -> io::Result<Flush> {
        // Left uninitialized: with one frame per send (the common case at moderate rates)
        // zeroing all 256 entries would cost more than filling the one that is used.
        let mut iov = [std::mem::MaybeUninit::<libc::iovec>::uninit(); MAX_IOV];
        loop {
            if self.q.is_empty() {
                return Ok(Flush::Drained);
            }
            let mut n = 0;
            let mut total = 0usize;
            for (i, b) in self.q.iter().take(MAX_IOV).enumerate() {
                let s = if i == 0 { &b[self.head_off..] } else { &b[..] };
                iov[n].write(libc::iovec { iov_base: s.as_ptr() as *mut libc::c_void, iov_len: s.len() });
                total += s.len();
                n += 1;
            }
            // SAFETY: `msghdr` is plain data; zeroed is a valid empty header.
            let mut mh: libc::msghdr = unsafe { std::mem::zeroed() };
            // The first `n` entries were written just above.
            mh.msg_iov = iov.as_mut_ptr().cast::<libc::iovec>();
            mh.msg_iovlen = n as _;
            // SAFETY: the iovecs point into `Bytes` owned by `self.q`, alive for the call.
            let r = unsafe { libc::sendmsg(fd, &mh, libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL) };
            if r < 0 {
                let e = io::Error::last_os_error();
                return match e.kind() {
                    io::ErrorKind::WouldBlock => Ok(Flush::Blocked),
                    io::ErrorKind::Interrupted => continue,
                    _ => Err(e),
                };
            }
            self.sends += 1;
            let r = r as usize;
            self.advance(r);
            if r < total {
                // Short write: the socket buffer is full now.
                return Ok(Flush::Blocked);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::unix::io::AsRawFd;
    use std::os::unix::net::UnixStream;

    #[test]
    fn flushes_many_frames_in_order() {
        let (a, mut b) = UnixStream::pair().unwrap();
        let mut ob = Outbox::new();
        let shared = Bytes::from_static(b"abc");
        for _ in 0..1000 {
            ob.push(shared.clone());
        }
        ob.push(Bytes::from_static(b"END"));
        assert_eq!(ob.flush(a.as_raw_fd()).unwrap(), Flush::Drained);
        assert!(ob.is_empty());
        assert_eq!(ob.queued_bytes(), 0);
        let (frames, sends) = ob.counters();
        assert_eq!(frames, 1001);
        assert!(sends <= 5, "coalesced into few sends, got {sends}");
        drop(a);
        let mut got = Vec::new();
        b.read_to_end(&mut got).unwrap();
        assert_eq!(got.len(), 3003);
        assert!(got.ends_with(b"abcEND"));
    }

    #[test]
    fn blocks_and_resumes_mid_frame() {
        let (a, mut b) = UnixStream::pair().unwrap();
        let big = Bytes::from(vec![7u8; 1 << 20]);
        let mut ob = Outbox::new();
        ob.push(big.clone());
        ob.push(Bytes::from_static(b"tail"));
        assert_eq!(ob.flush(a.as_raw_fd()).unwrap(), Flush::Blocked);
        assert!(ob.front().unwrap().len() < big.len(), "partly written");
        // Drain the reader, then flush the rest.
        let mut total = 0;
        let mut buf = vec![0u8; 1 << 16];
        loop {
            total += b.read(&mut buf).unwrap();
            if ob.flush(a.as_raw_fd()).unwrap() == Flush::Drained {
                break;
            }
        }
        drop(a);
        let mut rest = Vec::new();
        b.read_to_end(&mut rest).unwrap();
        assert_eq!(total + rest.len(), (1 << 20) + 4);
        assert!(rest.ends_with(b"tail") || total > 0);
    }

    #[test]
    fn truncate_keeps_partial_head() {
        let mut ob = Outbox::new();
        ob.push(Bytes::from_static(b"hello"));
        ob.push(Bytes::from_static(b"world"));
        ob.advance(2);
        ob.truncate_to_partial();
        assert_eq!(ob.len(), 1);
        assert_eq!(ob.front(), Some(&b"llo"[..]));
        assert_eq!(ob.queued_bytes(), 3 + ENTRY_OVERHEAD);
        let mut ob = Outbox::new();
        ob.push(Bytes::from_static(b"x"));
        ob.truncate_to_partial();
        assert!(ob.is_empty() && ob.queued_bytes() == 0);
    }
}
