//! Auto-converge: a guest that writes memory faster than the link carries
//! it never lets pre-copy end, and its final copy then blows the downtime
//! budget. So, as QEMU's auto-converge does, the sender slows such a guest:
//! its vCPUs nap a share of every [`PERIOD`] (the event loop has them
//! [`crate::vcpu::Command::Nap`]), and the share grows while the guest
//! still outpaces the copy.
//!
//! The rule ([`Converge::after_round`]): a round is *hot* when the guest
//! dirtied more than half of what the round sent. After two hot rounds in a
//! row the guest is slowed by [`INITIAL`] percent, and by [`STEP`] more
//! after each further hot round, up to [`MAX`]; a cool round keeps the
//! share where it is. Only a running guest naps, and only while pre-copy
//! goes on: from the final pause on, and whatever the outcome, it is not
//! slowed any more.
//!
//! The rule runs in the migration thread; [`Slower`], the event loop's
//! periodic timer, carries it out (the loop alone commands the vCPUs).
//!
//! When pre-copy ends is [`switch`]'s to say: once what is left, sent at
//! the measured rate, *plus the fixed costs of the pause* fits the budget.
//! The fixed costs are what the sender can measure before it pauses: two
//! round trips to the receiver (the state, then `Go`, each wait for an
//! answer) and the state itself at the measured rate. When the fixed costs
//! alone exceed the budget, no round can make it fit: pre-copy then ends as
//! soon as the pages left fit the budget on their own (the least downtime
//! there is to have), and the result says it was not met.

use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::time::Duration;

use nix::sys::time::TimeSpec;
use nix::sys::timerfd::{ClockId, Expiration, TimerFd, TimerFlags, TimerSetTimeFlags};

/// The share of each period the guest loses when slowing starts, percent.
pub const INITIAL: u8 = 20;
/// What each further hot round adds, percent.
pub const STEP: u8 = 10;
/// The most the guest is slowed, percent (it always runs a little).
pub const MAX: u8 = 99;
/// Every period, each vCPU naps its share of it.
pub const PERIOD: Duration = Duration::from_millis(20);

/// The auto-converge rule of one migration.
#[derive(Debug, Clone, Default)]
pub struct Converge {
    /// Whether the migration may slow the guest at all.
    enabled: bool,
    /// Hot rounds in a row.
    hot: u32,
    /// How much the guest is slowed, percent.
    share: u8,
}

impl Converge {
    /// The rule; `enabled: false` never slows the guest.
    pub fn new(enabled: bool) -> Self {
        Converge {
            enabled,
            ..Default::default()
        }
    }

    /// After a pre-copy round (not the first, which sends all memory) that
    /// sent `sent` bytes while the guest dirtied `dirtied`: how much the
    /// guest is to be slowed from now on, percent.
    pub fn after_round(&mut self, sent: u64, dirtied: u64) -> u8 {
        if !self.enabled {
            return 0;
        }
        if dirtied <= sent / 2 {
            self.hot = 0;
            return self.share;
        }
        self.hot += 1;
        if self.hot >= 2 {
            self.share = match self.share {
                0 => INITIAL,
                s => s.saturating_add(STEP).min(MAX),
            };
        }
        self.share
    }

    /// How much the guest is slowed now, percent.
    pub fn share(&self) -> u8 {
        self.share
    }
}

/// What [`switch`] says after a round.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Switch {
    /// Pause now: the expected downtime fits the budget.
    Converged,
    /// Pause now, although it will not fit: the fixed costs alone do not,
    /// and the pages left would go within the budget on their own.
    Hopeless,
    /// Another round.
    Continue,
}

/// The downtime expected if the VM were paused now, with `dirty` bytes
/// left at `rate` bytes per second and `fixed` costs.
pub fn expected_downtime(dirty: u64, rate: u64, fixed: Duration) -> Duration {
    fixed + Duration::from_secs_f64(dirty as f64 / rate.max(1) as f64)
}

/// Whether to end pre-copy: `fixed` holds the measured round trip twice
/// and the state's time at the rate.
pub fn switch(dirty: u64, rate: u64, fixed: Duration, budget: Duration) -> Switch {
    if expected_downtime(dirty, rate, fixed) <= budget {
        Switch::Converged
    } else if fixed >= budget && expected_downtime(dirty, rate, Duration::ZERO) <= budget {
        Switch::Hopeless
    } else {
        Switch::Continue
    }
}

/// The fixed costs of the pause: two round trips of `round_trip`, and
/// `state` bytes at `rate`.
pub fn fixed_costs(round_trip: Duration, state: u64, rate: u64) -> Duration {
    round_trip * 2 + Duration::from_secs_f64(state as f64 / rate.max(1) as f64)
}

/// How long each vCPU naps per [`PERIOD`] for `share` percent.
pub fn nap(share: u8) -> Duration {
    PERIOD * u32::from(share.min(MAX)) / 100
}

/// The event loop's side: a timer firing every [`PERIOD`] while the guest
/// is to be slowed.
#[derive(Debug)]
pub struct Slower {
    timer: TimerFd,
    share: u8,
}

impl Slower {
    /// A slower that slows nothing yet.
    pub fn new() -> std::io::Result<Self> {
        let flags = TimerFlags::TFD_NONBLOCK | TimerFlags::TFD_CLOEXEC;
        let timer = TimerFd::new(ClockId::CLOCK_MONOTONIC, flags)?;
        Ok(Slower { timer, share: 0 })
    }

    /// The timer, for the event loop to watch.
    pub fn fd(&self) -> RawFd {
        self.timer.as_fd().as_raw_fd()
    }

    /// Slows the guest by `share` percent from now on (0: not at all);
    /// true if that changed anything.
    pub fn set(&mut self, share: u8) -> std::io::Result<bool> {
        if share == self.share {
            return Ok(false);
        }
        match share {
            0 => self.timer.unset()?,
            _ => self.timer.set(
                Expiration::Interval(TimeSpec::from_duration(PERIOD)),
                TimerSetTimeFlags::empty(),
            )?,
        }
        self.share = share;
        Ok(true)
    }

    /// How much the guest is slowed, percent.
    pub fn share(&self) -> u8 {
        self.share
    }

    /// After the timer fired: how long each vCPU is to nap now, if at all.
    pub fn due(&mut self) -> Option<Duration> {
        // Non-blocking: a timer stopped since it fired has nothing to read.
        let _ = self.timer.wait();
        (self.share > 0).then(|| nap(self.share))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two hot rounds start the slowing, each further one adds a step up
    /// to the most, and a cool round holds the share and restarts the count.
    #[test]
    fn hot_rounds_slow_the_guest_step_by_step_and_cool_ones_hold_it() {
        let mut c = Converge::new(true);
        assert_eq!(c.after_round(100, 51), 0, "one hot round is not enough");
        assert_eq!(c.after_round(100, 100), INITIAL);
        assert_eq!(c.after_round(100, 80), INITIAL + STEP);
        assert_eq!(c.after_round(100, 50), INITIAL + STEP, "cool: held");
        assert_eq!(c.after_round(100, 90), INITIAL + STEP, "the count restarts");
        assert_eq!(c.after_round(100, 90), INITIAL + 2 * STEP);
        for _ in 0..20 {
            c.after_round(100, 100);
        }
        assert_eq!(c.share(), MAX);
        assert_eq!(nap(MAX), PERIOD * 99 / 100);
        assert_eq!(nap(0), Duration::ZERO);
        assert_eq!(nap(200), nap(MAX), "never more than the most");
    }

    /// Turned off, nothing ever slows the guest; a round that sent nothing
    /// while the guest wrote is hot (not a division by zero).
    #[test]
    fn off_never_slows_and_an_empty_round_counts_as_hot() {
        let mut off = Converge::new(false);
        for _ in 0..5 {
            assert_eq!(off.after_round(0, 1 << 30), 0);
        }
        let mut on = Converge::new(true);
        on.after_round(0, 4096);
        assert_eq!(on.after_round(0, 4096), INITIAL);
        assert_eq!(on.after_round(0, 0), INITIAL, "nothing dirtied: cool");
    }

    /// The fixed costs count against the budget: what would fit on its own
    /// does not once two round trips are added; when a round trip alone
    /// fills the budget, pre-copy ends once the pages alone would fit.
    #[test]
    fn the_switch_counts_the_round_trips_and_the_state() {
        let ms = Duration::from_millis;
        let mib = 1u64 << 20;
        let rate = 100 * mib;
        // 4 MiB at 100 MiB/s is 40 ms: alone it fits a 50 ms budget.
        assert_eq!(switch(4 * mib, rate, ms(0), ms(50)), Switch::Converged);
        let fixed = fixed_costs(ms(10), mib, rate);
        assert_eq!(fixed, ms(30), "two round trips and 10 ms of state");
        assert_eq!(expected_downtime(4 * mib, rate, fixed), ms(70));
        assert_eq!(switch(4 * mib, rate, fixed, ms(50)), Switch::Continue);
        assert_eq!(switch(mib, rate, fixed, ms(50)), Switch::Converged);
        let far = fixed_costs(ms(30), 0, rate);
        assert_eq!(switch(0, rate, far, ms(50)), Switch::Hopeless);
        // Hopeless, but 10 MiB would still add 100 ms: one more round.
        assert_eq!(switch(10 * mib, rate, far, ms(50)), Switch::Continue);
        assert_eq!(switch(4 * mib, rate, far, ms(50)), Switch::Hopeless);
        assert_eq!(
            switch(0, 0, ms(0), ms(0)),
            Switch::Converged,
            "no rate yet: no panic"
        );
    }

    /// The timer fires while slowing and stops when told; reading it
    /// never blocks, fired or not.
    #[test]
    fn the_slower_ticks_only_while_the_guest_is_slowed() {
        let mut s = Slower::new().unwrap();
        assert_eq!(s.due(), None, "nothing to read, and no wait");
        assert!(s.set(40).unwrap());
        assert!(!s.set(40).unwrap(), "no news");
        let mut fds = [nix::poll::PollFd::new(
            s.timer.as_fd(),
            nix::poll::PollFlags::POLLIN,
        )];
        assert_eq!(nix::poll::poll(&mut fds, 10_000u16).unwrap(), 1, "it fires");
        assert_eq!(s.due(), Some(nap(40)));
        assert!(s.set(0).unwrap());
        assert_eq!(s.share(), 0);
        let mut fds = [nix::poll::PollFd::new(
            s.timer.as_fd(),
            nix::poll::PollFlags::POLLIN,
        )];
        let quiet = nix::poll::poll(&mut fds, 100u16).unwrap();
        assert_eq!(quiet, 0, "stopped: it fires no more");
        assert_eq!(s.due(), None);
    }
}
