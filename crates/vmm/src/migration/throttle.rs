//! The bandwidth cap of a migration (`--max-bandwidth`): the sender asks
//! [`Throttle::pace`] before each batch, which waits until the bytes sent so
//! far fit the cap averaged since the copy began. It never waits less than
//! the cap requires (a sleep does not end early), so a capped copy of N
//! bytes takes at least N / cap seconds: a test can make a copy last on
//! purpose, and a shared link is not flooded.

use std::time::{Duration, Instant};

/// The smallest cap accepted (the API's rule).
pub use crate::api::MIN_BANDWIDTH;

/// Longest single wait, so that a cancelled migration stops promptly.
const SLICE: Duration = Duration::from_millis(50);

/// Paces a byte stream to at most `rate` bytes per second.
#[derive(Debug)]
pub struct Throttle {
    rate: u64,
    start: Instant,
    sent: u64,
}

impl Throttle {
    /// A throttle whose clock starts now.
    pub fn new(rate: u64) -> Self {
        Throttle {
            rate: rate.max(1),
            start: Instant::now(),
            sent: 0,
        }
    }

    /// How long to wait before `bytes` more may go, at `elapsed` since the start.
    fn wait_for(&self, bytes: u64, elapsed: Duration) -> Duration {
        let due = Duration::from_secs_f64((self.sent + bytes) as f64 / self.rate as f64);
        due.saturating_sub(elapsed)
    }

    /// Waits until `bytes` more fit the cap, then counts them. Returns
    /// `false` (without counting) as soon as `cancelled` says so.
    pub fn pace(&mut self, bytes: u64, cancelled: impl Fn() -> bool) -> bool {
        loop {
            if cancelled() {
                return false;
            }
            let wait = self.wait_for(bytes, self.start.elapsed());
            if wait.is_zero() {
                self.sent += bytes;
                return true;
            }
            std::thread::sleep(wait.min(SLICE));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_until_the_average_fits_the_cap() {
        let mut t = Throttle::new(1 << 20);
        // Nothing sent yet: the first MiB is due one second after the start.
        assert_eq!(t.wait_for(1 << 20, Duration::ZERO), Duration::from_secs(1));
        assert_eq!(t.wait_for(1 << 20, Duration::from_secs(2)), Duration::ZERO);
        t.sent = 3 << 20;
        assert_eq!(
            t.wait_for(1 << 20, Duration::from_secs(1)),
            Duration::from_secs(3)
        );
    }

    #[test]
    fn a_capped_stream_takes_at_least_bytes_over_rate() {
        // 10 batches of 8 KiB at 400 KiB/s: at least 200 ms in all.
        let mut t = Throttle::new(400 << 10);
        let start = Instant::now();
        for _ in 0..10 {
            assert!(t.pace(8 << 10, || false));
        }
        assert!(start.elapsed() >= Duration::from_millis(200));
        assert_eq!(t.sent, 80 << 10);
    }

    #[test]
    fn cancelling_stops_the_wait() {
        let mut t = Throttle::new(1);
        let start = Instant::now();
        assert!(!t.pace(1 << 30, || start.elapsed() > Duration::from_millis(60)));
        assert!(start.elapsed() < Duration::from_secs(5));
        assert_eq!(t.sent, 0);
    }
}
