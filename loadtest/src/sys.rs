//! Thin wrappers over the few Linux calls the generator needs: CPU pinning, fd limits, clocks,
//! epoll, non-blocking sockets bound to a chosen source address, `/proc` readers.
//!
//! Everything here is `unsafe` FFI made safe by checking return codes; nothing allocates on the
//! hot path.

use std::io;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::fd::RawFd;

/// Monotonic clock in nanoseconds (CLOCK_MONOTONIC, the clock publishers stamp into payloads).
#[inline]
pub fn now_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: valid pointer to a timespec; CLOCK_MONOTONIC always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// CPU time consumed by the calling thread, in nanoseconds.
pub fn thread_cpu_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: as above.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// CPU time (user + system) consumed by this whole process, in nanoseconds.
pub fn process_cpu_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: as above.
    unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Pin the calling thread (and the children it forks later) to one CPU. Returns false when that
/// CPU does not exist here (the caller warns and runs unpinned).
pub fn pin_to_cpu(cpu: usize) -> bool {
    // SAFETY: cpu_set_t is plain data; CPU_SET bounds-checks against CPU_SETSIZE via the macro.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if cpu >= libc::CPU_SETSIZE as usize {
            return false;
        }
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) == 0
    }
}

/// Number of CPUs online.
pub fn online_cpus() -> usize {
    // Not available_parallelism(): that honours this process's affinity mask, which pinning
    // has already narrowed to one CPU.
    // SAFETY: sysconf is always safe.
    let n = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    if n > 0 {
        n as usize
    } else {
        1
    }
}

/// Raise the soft open-files limit to the hard limit. Returns the new soft limit.
pub fn raise_nofile() -> u64 {
    // SAFETY: plain struct in/out.
    unsafe {
        let mut rl = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) != 0 {
            return 1024;
        }
        if rl.rlim_cur < rl.rlim_max {
            let want = libc::rlimit { rlim_cur: rl.rlim_max, rlim_max: rl.rlim_max };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &want) == 0 {
                return rl.rlim_max;
            }
        }
        rl.rlim_cur
    }
}

/// Ask the kernel to SIGKILL this process when its parent dies (used by workers and servers we
/// spawn, so that an interrupted run never leaves load processes behind).
pub fn die_with_parent() {
    // SAFETY: prctl with an integer argument.
    unsafe {
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
    }
}

pub fn last_err() -> io::Error {
    io::Error::last_os_error()
}

pub fn errno() -> i32 {
    io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

/// A non-blocking TCP socket bound to `src` (port chosen at connect time, so several source
/// addresses each get the whole ephemeral port range towards one destination), with a
/// non-blocking connect to `dst` already started. Returns the fd.
pub fn connect_nonblocking(src: Option<Ipv4Addr>, dst: SocketAddrV4) -> io::Result<RawFd> {
    // SAFETY: socket/setsockopt/bind/connect with correctly sized sockaddr_in structures; the fd
    // is closed on every error path.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(last_err());
        }
        let one: libc::c_int = 1;
        libc::setsockopt(fd, libc::IPPROTO_TCP, libc::TCP_NODELAY, &one as *const _ as *const libc::c_void, 4);
        if let Some(src) = src {
            libc::setsockopt(
                fd,
                libc::IPPROTO_IP,
                libc::IP_BIND_ADDRESS_NO_PORT,
                &one as *const _ as *const libc::c_void,
                4,
            );
            let sa = sockaddr_in(SocketAddrV4::new(src, 0));
            if libc::bind(fd, &sa as *const _ as *const libc::sockaddr, std::mem::size_of::<libc::sockaddr_in>() as u32)
                != 0
            {
                let e = last_err();
                libc::close(fd);
                return Err(e);
            }
        }
        let sa = sockaddr_in(dst);
        let r = libc::connect(
            fd,
            &sa as *const _ as *const libc::sockaddr,
            std::mem::size_of::<libc::sockaddr_in>() as u32,
        );
        if r != 0 {
            let e = errno();
            if e != libc::EINPROGRESS {
                libc::close(fd);
                return Err(io::Error::from_raw_os_error(e));
            }
        }
        Ok(fd)
    }
}

fn sockaddr_in(a: SocketAddrV4) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: a.port().to_be(),
        sin_addr: libc::in_addr { s_addr: u32::from_ne_bytes(a.ip().octets()) },
        sin_zero: [0; 8],
    }
}

/// Pending error of a socket whose non-blocking connect finished (0 = connected).
pub fn so_error(fd: RawFd) -> i32 {
    let mut err: libc::c_int = 0;
    let mut len = 4u32;
    // SAFETY: out-pointer to an int of the declared length.
    unsafe {
        libc::getsockopt(fd, libc::SOL_SOCKET, libc::SO_ERROR, &mut err as *mut _ as *mut libc::c_void, &mut len)
    };
    err
}

/// Set SO_SNDBUF (bytes; the kernel doubles it).
pub fn set_sndbuf(fd: RawFd, bytes: i32) {
    // SAFETY: int option.
    unsafe {
        libc::setsockopt(fd, libc::SOL_SOCKET, libc::SO_SNDBUF, &bytes as *const _ as *const libc::c_void, 4);
    }
}

/// Close with an RST (SO_LINGER 0) so that thousands of closes leave no TIME_WAIT entries behind
/// to exhaust the ephemeral ports of the next run.
pub fn close_abortive(fd: RawFd) {
    let l = libc::linger { l_onoff: 1, l_linger: 0 };
    // SAFETY: linger struct of the declared size; fd owned by the caller and not used again.
    unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            &l as *const _ as *const libc::c_void,
            std::mem::size_of::<libc::linger>() as u32,
        );
        libc::close(fd);
    }
}

/// `recv` into `buf`; Ok(0) is EOF, Err(WouldBlock) when nothing is there.
#[inline]
pub fn recv(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: buf is a valid writable slice of buf.len() bytes.
    let r = unsafe { libc::recv(fd, buf.as_mut_ptr() as *mut libc::c_void, buf.len(), 0) };
    if r < 0 {
        Err(last_err())
    } else {
        Ok(r as usize)
    }
}

/// `read` (for pipes, where `recv` does not apply).
pub fn read_fd(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: buf is a valid writable slice.
    let r = unsafe { libc::read(fd, buf.as_mut_ptr() as *mut libc::c_void, buf.len()) };
    if r < 0 {
        Err(last_err())
    } else {
        Ok(r as usize)
    }
}

/// Non-blocking `send`; returns bytes written (possibly partial), Err(WouldBlock) when full.
#[inline]
pub fn send(fd: RawFd, buf: &[u8]) -> io::Result<usize> {
    // SAFETY: buf is a valid readable slice.
    let r = unsafe {
        libc::send(fd, buf.as_ptr() as *const libc::c_void, buf.len(), libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL)
    };
    if r < 0 {
        Err(last_err())
    } else {
        Ok(r as usize)
    }
}

/// Blocking vectored send of all `iov` (used by the baseline sender on blocking sockets).
/// Returns bytes written by the one `sendmsg` call.
#[inline]
pub fn sendmsg(fd: RawFd, iov: &[libc::iovec]) -> io::Result<usize> {
    // SAFETY: iov points to iov.len() valid iovecs whose buffers outlive the call.
    unsafe {
        let mut mh: libc::msghdr = std::mem::zeroed();
        mh.msg_iov = iov.as_ptr() as *mut libc::iovec;
        mh.msg_iovlen = iov.len() as _;
        let r = libc::sendmsg(fd, &mh, libc::MSG_NOSIGNAL);
        if r < 0 {
            Err(last_err())
        } else {
            Ok(r as usize)
        }
    }
}

pub fn set_nonblocking(fd: RawFd, on: bool) {
    // SAFETY: fcntl on an fd we own.
    unsafe {
        let fl = libc::fcntl(fd, libc::F_GETFL);
        let fl = if on { fl | libc::O_NONBLOCK } else { fl & !libc::O_NONBLOCK };
        libc::fcntl(fd, libc::F_SETFL, fl);
    }
}

/// A level-triggered epoll instance.
pub struct Epoll {
    fd: RawFd,
}

impl Epoll {
    pub fn new() -> io::Result<Epoll> {
        // SAFETY: plain syscall.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(last_err());
        }
        Ok(Epoll { fd })
    }

    fn ctl(&self, op: i32, fd: RawFd, events: u32, token: u64) -> io::Result<()> {
        let mut ev = libc::epoll_event { events, u64: token };
        // SAFETY: ev is a valid epoll_event.
        let r = unsafe { libc::epoll_ctl(self.fd, op, fd, &mut ev) };
        if r < 0 {
            Err(last_err())
        } else {
            Ok(())
        }
    }

    pub fn add(&self, fd: RawFd, events: u32, token: u64) -> io::Result<()> {
        self.ctl(libc::EPOLL_CTL_ADD, fd, events, token)
    }

    pub fn modify(&self, fd: RawFd, events: u32, token: u64) -> io::Result<()> {
        self.ctl(libc::EPOLL_CTL_MOD, fd, events, token)
    }

    /// Wait up to `timeout_ns` nanoseconds (None = forever), with nanosecond precision
    /// (epoll_pwait2), so that publishers fire on time. Returns the number of events filled in.
    pub fn wait_ns(&self, events: &mut [libc::epoll_event], timeout_ns: Option<u64>) -> usize {
        let ts = timeout_ns.map(|ns| libc::timespec {
            tv_sec: (ns / 1_000_000_000) as libc::time_t,
            tv_nsec: (ns % 1_000_000_000) as libc::c_long,
        });
        let tp = ts.as_ref().map_or(std::ptr::null(), |t| t as *const libc::timespec);
        // SAFETY: events is a valid writable slice; tp is null or points to a live timespec.
        let r = unsafe { libc::epoll_pwait2(self.fd, events.as_mut_ptr(), events.len() as i32, tp, std::ptr::null()) };
        if r < 0 {
            0
        } else {
            r as usize
        }
    }

    pub fn delete(&self, fd: RawFd) {
        let _ = self.ctl(libc::EPOLL_CTL_DEL, fd, 0, 0);
    }
}

impl Drop for Epoll {
    fn drop(&mut self) {
        // SAFETY: we own the fd.
        unsafe { libc::close(self.fd) };
    }
}

/// `VmRSS` of a process in KiB, from `/proc/<pid>/status`.
/// Anonymous resident memory of a process (`RssAnon`: heap, stacks), KiB. Unlike `VmRSS` it
/// leaves out the executable's and libraries' pages, whose residency depends on the page
/// cache and on which code paths ran, not on how many connections the process holds.
pub fn anon_kib(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines().find(|l| l.starts_with("RssAnon:")).and_then(|l| l.split_whitespace().nth(1)).and_then(|v| v.parse().ok())
}

pub fn rss_kib(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| l.split_whitespace().nth(1)).and_then(|v| v.parse().ok())
}

/// Total CPU time (utime + stime) of a process in clock ticks (`/proc/<pid>/stat`).
pub fn proc_cpu_ticks(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = &s[s.rfind(')')? + 2..];
    let f: Vec<&str> = after.split_whitespace().collect();
    // fields after "(comm) ": state=0, ..., utime=11, stime=12
    let ut: u64 = f.get(11)?.parse().ok()?;
    let st: u64 = f.get(12)?.parse().ok()?;
    Some(ut + st)
}

/// Nanoseconds the threads of a process spent runnable but waiting for a CPU (the second field
/// of `/proc/<pid>/task/*/schedstat`): on a shared machine, how much CPU others took from it.
pub fn proc_run_wait_ns(pid: u32) -> Option<u64> {
    let mut total = 0u64;
    for t in std::fs::read_dir(format!("/proc/{pid}/task")).ok()?.flatten() {
        if let Ok(s) = std::fs::read_to_string(t.path().join("schedstat")) {
            total += s.split_whitespace().nth(1).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        }
    }
    Some(total)
}

pub fn clock_ticks_per_sec() -> u64 {
    // SAFETY: sysconf is always safe.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as u64
    } else {
        100
    }
}

pub fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: buffer of the declared length.
    let r = unsafe { libc::gethostname(buf.as_mut_ptr() as *mut libc::c_char, buf.len()) };
    if r != 0 {
        return "host".into();
    }
    let n = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

/// UTC date and time from the system clock: ("YYYY-MM-DD", "HHMMSS").
pub fn utc_date_time() -> (String, String) {
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs()) as i64;
    let days = secs.div_euclid(86_400);
    let sod = secs.rem_euclid(86_400);
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    (format!("{y:04}-{m:02}-{d:02}"), format!("{:02}{:02}{:02}", sod / 3600, (sod / 60) % 60, sod % 60))
}

#[cfg(test)]
mod tests {
    #[test]
    fn date_is_sane() {
        let (d, t) = super::utc_date_time();
        assert_eq!(d.len(), 10);
        assert!(d.starts_with("20"));
        assert_eq!(t.len(), 6);
    }
}
