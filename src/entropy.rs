//! OS randomness for identifiers that must never repeat across processes: stream epochs,
//! message ids, presence refs and generated presence keys.
//!
//! Nothing here may be derived from the clock or the PID: every container's server is PID 1
//! and starts within microseconds of the same boot, so such seeds repeat, and a resume token
//! from before a crash would then be accepted against a new stream (a silent gap). Values come
//! from the kernel's CSPRNG (`getrandom(2)`), which is seeded before any user process runs.

/// Fills `buf` from the OS.
///
/// # Panics
/// If the kernel refuses (no `getrandom(2)` and no `/dev/urandom`): corecast cannot run safely
/// without unique identifiers, so it stops rather than fall back to a guessable seed.
fn fill(buf: &mut [u8]) {
    getrandom::getrandom(buf).expect("OS randomness (getrandom) is unavailable");
}

/// 64 random bits from the OS.
pub fn u64() -> u64 {
    let mut b = [0u8; 8];
    fill(&mut b);
    u64::from_ne_bytes(b)
}

thread_local! {
    static FAST: std::cell::RefCell<fastrand::Rng> = std::cell::RefCell::new(fastrand::Rng::with_seed(u64()));
}

/// 128 random bits from a fast generator seeded from the OS once per thread, for ids drawn
/// at message or join rate (message ids, generated presence keys): no syscall per id.
pub fn fast_u128() -> u128 {
    FAST.with(|r| r.borrow_mut().u128(..))
}

#[cfg(test)]
mod tests {
    #[test]
    fn draws_differ() {
        let a: Vec<u64> = (0..64).map(|_| super::u64()).collect();
        let mut b = a.clone();
        b.sort_unstable();
        b.dedup();
        assert_eq!(a.len(), b.len());
        assert_ne!(super::fast_u128(), super::fast_u128());
    }
}
