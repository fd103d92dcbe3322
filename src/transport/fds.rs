//! The process's file-descriptor budget, settled once at start-up before any other thread
//! exists: the soft open-files limit raised to the hard one (every connection is a
//! descriptor; systemd and most shells start services at a soft limit of 1,024), and the
//! kernel's descriptor table grown up front to [`TABLE`] slots or the limit.
//!
//! Why grow the table: Linux doubles it on demand (64, 128, … slots), and in a process whose
//! descriptor table is shared by several threads each doubling waits for an RCU grace period
//! inside `accept4` (`expand_files` → `synchronize_rcu`): ~10 ms per doubling on the
//! project's VM, during which the shard serves nobody. Measured with `perf record -e
//! sched:sched_switch -g` during a 5,000-connection storm: seven such waits, a third of the
//! storm. A single-threaded server (nginx) never waits; a thread-per-core one must size the
//! table while it is still single-threaded. The table never shrinks; it costs 8 bytes of
//! kernel memory per slot (1 MiB at [`TABLE`]).
//!
//! It also keeps the connection cap: the soft limit less a reserve ([`reserve`]) for the
//! descriptors everything else needs (rings, log segments, database and cluster sockets) and
//! for answering connections past the cap with a refusal. [`admit`] counts connections across
//! shards.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};

/// Connections open now (admitted and not yet closed), all shards.
static OPEN: AtomicU64 = AtomicU64::new(0);
/// The connection cap; unlimited until [`prepare`] sets it.
static CAP: AtomicU64 = AtomicU64::new(u64::MAX);

/// Descriptors kept out of the connection cap at an open-files limit of `limit`: 32 plus
/// 1/64 of the limit, at most 256.
pub fn reserve(limit: u64) -> u64 {
    (32 + limit / 64).min(256)
}

/// The connection cap now.
pub fn cap() -> u64 {
    CAP.load(Ordering::Relaxed)
}

/// A connection's place under the cap, given back when dropped (after its socket is closed).
#[derive(Debug)]
pub struct Admitted(());

impl Drop for Admitted {
    fn drop(&mut self) {
        OPEN.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A place for one more connection, or `None` at the cap.
pub fn admit() -> Option<Admitted> {
    if OPEN.fetch_add(1, Ordering::Relaxed) >= CAP.load(Ordering::Relaxed) {
        OPEN.fetch_sub(1, Ordering::Relaxed);
        return None;
    }
    Some(Admitted(()))
}

/// Descriptor-table slots reserved at start-up (fewer when the open-files limit is lower).
/// Past it the table still grows on demand, with one grace-period wait per doubling.
pub const TABLE: u64 = 1 << 17;

/// What [`prepare`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budget {
    /// Soft open-files limit before.
    pub soft_before: u64,
    /// Soft open-files limit now (the hard limit, unless raising it failed).
    pub soft: u64,
    /// Hard open-files limit.
    pub hard: u64,
    /// Descriptor-table slots now available without growing it.
    pub table: u64,
    /// Connections admitted at once ([`admit`]).
    pub cap: u64,
}

/// Raises the soft open-files limit to the hard limit and grows the descriptor table. Call
/// it before spawning threads. Failing to raise or grow is not fatal (the process runs with
/// what it has); only reading the limit can fail.
pub fn prepare() -> io::Result<Budget> {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes the struct we pass.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let soft_before = lim.rlim_cur;
    if lim.rlim_cur < lim.rlim_max {
        let raised = libc::rlimit { rlim_cur: lim.rlim_max, rlim_max: lim.rlim_max };
        // SAFETY: setrlimit reads the struct we pass.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            lim.rlim_cur = lim.rlim_max;
        }
    }
    let table = grow_table(lim.rlim_cur.min(TABLE));
    let cap = lim.rlim_cur.saturating_sub(reserve(lim.rlim_cur)).max(1);
    CAP.store(cap, Ordering::Relaxed);
    Ok(Budget { soft_before, soft: lim.rlim_cur, hard: lim.rlim_max, table, cap })
}

/// Makes the descriptor table at least `slots` long: a descriptor is duplicated onto the
/// highest slot and closed again (the kernel keeps the grown table). Returns the slots
/// reached (0 when it could not).
fn grow_table(slots: u64) -> u64 {
    if slots < 2 {
        return 0;
    }
    // SAFETY: plain syscalls on descriptors this function opens and closes.
    unsafe {
        let fd = libc::open(c"/dev/null".as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC);
        if fd < 0 {
            return 0;
        }
        let high = libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, (slots - 1) as libc::c_int);
        libc::close(fd);
        if high < 0 {
            return 0;
        }
        libc::close(high);
        high as u64 + 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Soft limit: at the hard limit afterwards; the table reaches the limit or TABLE, and
    /// the process's descriptors still come from the bottom of the table.
    #[test]
    fn raises_the_soft_limit_and_grows_the_table() {
        let b = prepare().unwrap();
        assert_eq!(b.soft, b.hard, "{b:?}");
        assert!(b.soft >= b.soft_before);
        assert_eq!(b.table, b.soft.min(TABLE), "{b:?}");
        let f = std::fs::File::open("/dev/null").unwrap();
        let fd = std::os::unix::io::AsRawFd::as_raw_fd(&f) as u64;
        assert!(fd < 1000, "a new descriptor is the lowest free one, not {fd}");
        // Growing again is harmless.
        assert_eq!(prepare().unwrap().table, b.table);
        assert_eq!(b.cap, b.soft - reserve(b.soft));
    }

    #[test]
    fn the_reserve_grows_with_the_limit_up_to_256() {
        assert_eq!(reserve(80), 33);
        assert_eq!(reserve(1024), 48);
        assert_eq!(reserve(20_000), 256);
        assert_eq!(reserve(1 << 20), 256);
    }

    /// Admission counts places and gives them back on drop (the cap is process-wide state
    /// that `prepare` sets to the test process's limit less the reserve).
    #[test]
    fn admitted_places_are_given_back() {
        let before = OPEN.load(Ordering::Relaxed);
        let a = admit().expect("a place");
        let b = admit().expect("another");
        assert!(OPEN.load(Ordering::Relaxed) >= before + 2);
        drop((a, b));
        assert!(OPEN.load(Ordering::Relaxed) <= before + 2);
    }
}
