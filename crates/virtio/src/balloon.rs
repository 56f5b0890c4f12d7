//! virtio-balloon: dynamic memory and runtime resize.
//!
//! The VM's definition gives the most memory it can have; the balloon takes
//! pages back from the guest (inflate), which nestvm frees on the host, and
//! returns them (deflate), so the memory the guest can use moves between a
//! minimum and that maximum while it runs. The host sets a target in the
//! configuration space (`num_pages`, pages to hold) and raises a
//! configuration interrupt; the driver answers with `actual`.
//!
//! - Statistics (VIRTIO_BALLOON_F_STATS_VQ): the driver leaves a buffer of
//!   (tag, value) pairs with the device, which hands it back every
//!   [`POLL`] to ask for fresh ones.
//! - Free page reporting (VIRTIO_BALLOON_F_REPORTING): the driver reports
//!   free ranges, which are freed on the host at once, balloon or not.
//! - With `auto`, every poll sets the target from the statistics: what the
//!   guest uses plus a buffer, within [min, max] (Hyper-V's dynamic memory).
//!
//! Everything the driver sends is checked: page numbers and ranges outside
//! guest RAM are counted as malformed and skipped. Freeing is done by the
//! `discard` function the VMM gives (the KVM layer's `madvise`).
//!
//! What one guest request can cost is bounded. An inflate or deflate
//! descriptor chain is read for [`MAX_PFNS`] page numbers at most (Linux
//! sends 256 at most); the rest of a longer one is ignored and the chain
//! counted malformed. The page numbers are sorted and runs of adjacent ones
//! merged, so one `discard` call frees a whole run; a run with a page
//! outside guest RAM is refused whole (an honest driver's runs lie in RAM).
//! A turn on any of its queues serves
//! [`CHAINS_PER_TURN`] chains at most, so at most
//! `CHAINS_PER_TURN * MAX_PFNS` pages (16 MiB) per turn; the rest is served
//! on the event loop's next turn ([`crate::Served::more`]).

use std::collections::BTreeMap;
use std::os::fd::{AsFd, AsRawFd};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::time::TimeSpec;
use nix::sys::timerfd::{ClockId, Expiration, TimerFd, TimerFlags, TimerSetTimeFlags};
use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueT};

use crate::state::{check_version, DeviceState, StateError};
use crate::{features, Backend, BackendError, Chain, Memory, Served};

/// virtio device ID of a balloon.
pub const DEVICE_TYPE: u32 = 5;
/// The driver reports statistics.
pub const F_STATS_VQ: u64 = 1 << 1;
/// The driver reports free pages.
pub const F_REPORTING: u64 = 1 << 5;
/// How often statistics are asked for (and the policy runs).
pub const POLL: Duration = Duration::from_secs(2);
const QUEUE_SIZE: u16 = 128;
/// Page numbers read from one inflate or deflate chain at most (Linux's
/// VIRTIO_BALLOON_ARRAY_PFNS_MAX).
pub const MAX_PFNS: usize = 256;
/// Chains of each queue served per turn.
pub const CHAINS_PER_TURN: usize = 16;
/// Statistics entries read from one buffer at most (the spec has 11 tags).
const MAX_STATS: usize = 64;
const PAGE: u64 = 4096;
/// Headroom the automatic policy leaves above what the guest uses: 20 %,
/// and at least this much.
const MIN_BUFFER: u64 = 64 << 20;
/// The policy does not move the target for less than this.
const HYSTERESIS: u64 = 16 << 20;

/// Statistic tags, in the spec's order.
const STAT_NAMES: [&str; 11] = [
    "swap_in",
    "swap_out",
    "major_faults",
    "minor_faults",
    "free",
    "total",
    "available",
    "caches",
    "hugetlb_allocations",
    "hugetlb_failures",
    "oom_kills",
];

/// Errors of a balloon.
#[derive(Debug, thiserror::Error)]
pub enum BalloonError {
    /// A target outside the VM's range.
    #[error("{} MiB is outside this VM's range of {} to {} MiB", .target >> 20, .min >> 20, .max >> 20)]
    Target {
        /// The target asked for, bytes.
        target: u64,
        /// The least the VM may have, bytes.
        min: u64,
        /// The VM's RAM, bytes.
        max: u64,
    },
    /// A saved target outside the VM's range.
    #[error("the balloon's saved target of {} MiB is outside the VM's range of {} to {} MiB", .target >> 20, .min >> 20, .max >> 20)]
    SavedTarget {
        /// The saved target, bytes.
        target: u64,
        /// The least the VM may have, bytes.
        min: u64,
        /// The VM's RAM, bytes.
        max: u64,
    },
    /// More handed over than the VM has.
    #[error("the balloon's saved state says the guest handed over {} MiB of {} MiB", .ballooned >> 20, .max >> 20)]
    SavedBallooned {
        /// The saved amount, bytes.
        ballooned: u64,
        /// The VM's RAM, bytes.
        max: u64,
    },
}

/// What the VMM sees of a balloon and may change.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Policy {
    /// The VM's RAM (the most it can have), bytes.
    pub max: u64,
    /// The least it may be shrunk to, bytes.
    pub min: u64,
    /// Whether the target follows the guest's demand.
    pub auto: bool,
    /// The memory the guest should have, bytes (max minus the balloon).
    pub target: u64,
}

/// A balloon's shared state: the policy the VMM sets, what the guest did.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Status {
    /// The policy.
    pub policy: Policy,
    /// Bytes the guest says it has handed over (`actual`).
    pub ballooned: u64,
    /// The guest's latest statistics by name.
    pub stats: BTreeMap<String, u64>,
    /// Bytes freed on the host from free-page reports, so far.
    pub reported: u64,
    /// Pages inflated and deflated, malformed requests.
    pub inflated: u64,
    /// Pages the guest took back.
    pub deflated: u64,
    /// Requests that were not valid.
    pub malformed: u64,
    #[serde(skip)]
    stats_at: Option<Instant>,
}

impl Status {
    /// How old the statistics are.
    pub fn stats_age(&self) -> Option<Duration> {
        self.stats_at.map(|t| t.elapsed())
    }
}

/// The VMM's handle on a balloon: read its status, set a target.
#[derive(Clone)]
pub struct Control {
    status: Arc<Mutex<Status>>,
    timer: Arc<TimerFd>,
}

impl Control {
    /// A copy of the status.
    pub fn status(&self) -> Status {
        let s = lock(&self.status);
        Status {
            policy: s.policy.clone(),
            ballooned: s.ballooned,
            stats: s.stats.clone(),
            reported: s.reported,
            inflated: s.inflated,
            deflated: s.deflated,
            malformed: s.malformed,
            stats_at: s.stats_at,
        }
    }

    /// Sets the memory the guest should have (`None`: follow its demand),
    /// and tells the device at once. Refuses sizes outside [min, max].
    pub fn set_target(&self, target: Option<u64>) -> Result<(), BalloonError> {
        let mut s = lock(&self.status);
        match target {
            Some(t) if t < s.policy.min || t > s.policy.max => {
                return Err(BalloonError::Target {
                    target: t,
                    min: s.policy.min,
                    max: s.policy.max,
                })
            }
            Some(t) => {
                s.policy.target = t & !(PAGE - 1);
                s.policy.auto = false;
            }
            None => s.policy.auto = true,
        }
        drop(s);
        arm(&self.timer, Duration::from_millis(1));
        Ok(())
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Fires first after `first`, then every [`POLL`].
fn arm(timer: &TimerFd, first: Duration) {
    let r = timer.set(
        Expiration::IntervalDelayed(
            TimeSpec::from_duration(first),
            TimeSpec::from_duration(POLL),
        ),
        TimerSetTimeFlags::empty(),
    );
    if let Err(e) = r {
        log::warn!("balloon: cannot arm its timer: {e}");
    }
}

/// A balloon's saved state ([`DeviceState::Balloon`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BalloonState {
    /// Its layout's version, [`BalloonState::VERSION`] when saved by this
    /// build.
    pub version: u16,
    /// The policy when saved (only the target and `auto` come back: the
    /// range is the definition's).
    pub policy: Policy,
    /// Bytes the guest had handed over.
    pub ballooned: u64,
    /// The statistics buffer the driver had left with the device.
    pub stats_head: Option<u16>,
}

impl BalloonState {
    /// The version this build writes and reads.
    pub const VERSION: u16 = 1;
}

/// A balloon's range, bytes: the VM's memory (`max`), the least it may be
/// shrunk to, and what it starts with.
#[derive(Debug, Clone, Copy)]
pub struct Range {
    /// The VM's RAM.
    pub max: u64,
    /// The least it may have.
    pub min: u64,
    /// What it starts with (the balloon inflates to the rest at once).
    pub start: u64,
}

/// Frees guest memory on the host: (guest address, length).
pub type Discard = Box<dyn Fn(u64, u64) -> std::io::Result<()> + Send>;

/// The page numbers of an inflate or deflate chain, [`MAX_PFNS`] at most,
/// and whether there were more (`None`: the chain cannot be read).
fn read_pfns(chain: Chain<'_>, mem: &Memory) -> Option<(Vec<u32>, bool)> {
    let mut r = chain.reader(mem).ok()?;
    let count = r.available_bytes() / 4;
    let mut pfns = Vec::with_capacity(count.min(MAX_PFNS));
    let mut pfn = [0u8; 4];
    while pfns.len() < count.min(MAX_PFNS) && std::io::Read::read_exact(&mut r, &mut pfn).is_ok() {
        pfns.push(u32::from_le_bytes(pfn));
    }
    Some((pfns, count > MAX_PFNS))
}

/// `pfns` as runs of adjacent pages, (first page, pages), in order, each
/// page once.
fn runs(mut pfns: Vec<u32>) -> Vec<(u64, u64)> {
    pfns.sort_unstable();
    pfns.dedup();
    let mut out: Vec<(u64, u64)> = Vec::new();
    for pfn in pfns.into_iter().map(u64::from) {
        match out.last_mut() {
            Some((first, count)) if *first + *count == pfn => *count += 1,
            _ => out.push((pfn, 1)),
        }
    }
    out
}

/// A virtio-balloon device.
pub struct Balloon {
    status: Arc<Mutex<Status>>,
    timer: Arc<TimerFd>,
    discard: Discard,
    /// Queue index of the statistics and reporting queues, once negotiated.
    stats_queue: Option<usize>,
    reporting_queue: Option<usize>,
    /// The statistics buffer the driver left with us.
    stats_head: Option<u16>,
    /// The target last shown to the driver, in pages to hold.
    announced: u32,
    /// The driver's `actual`, as written.
    actual: u32,
}

impl Balloon {
    /// A balloon for a VM of `range.max` bytes that may shrink to
    /// `range.min` and starts with `range.start`; `auto` follows the guest's
    /// demand.
    pub fn new(range: Range, auto: bool, discard: Discard) -> std::io::Result<(Self, Control)> {
        let Range { max, min, start } = range;
        let timer = TimerFd::new(
            ClockId::CLOCK_MONOTONIC,
            TimerFlags::TFD_NONBLOCK | TimerFlags::TFD_CLOEXEC,
        )
        .map_err(std::io::Error::from)?;
        let timer = Arc::new(timer);
        arm(&timer, POLL);
        let status = Arc::new(Mutex::new(Status {
            policy: Policy {
                max,
                min: min.min(max),
                auto,
                target: start.clamp(min.min(max), max) & !(PAGE - 1),
            },
            ..Default::default()
        }));
        let control = Control {
            status: status.clone(),
            timer: timer.clone(),
        };
        let b = Balloon {
            status,
            timer,
            discard,
            stats_queue: None,
            reporting_queue: None,
            stats_head: None,
            announced: 0,
            actual: 0,
        };
        Ok((b, control))
    }

    /// Pages the balloon should hold for the current target.
    fn num_pages(&self) -> u32 {
        let s = lock(&self.status);
        (s.policy.max.saturating_sub(s.policy.target) / PAGE).min(u32::MAX as u64) as u32
    }

    /// Inflate (`free`) or deflate: a list of 32-bit page frame numbers,
    /// [`MAX_PFNS`] of them at most; each run of adjacent pages is freed
    /// with one `discard` call.
    fn pages(&mut self, chain: Chain<'_>, mem: &Memory, free: bool) {
        let mut malformed = 0;
        let mut done = 0;
        match read_pfns(chain, mem) {
            Some((pfns, truncated)) => {
                malformed += u64::from(truncated);
                for (first, count) in runs(pfns) {
                    if !free {
                        done += count;
                        continue;
                    }
                    match (self.discard)(first * PAGE, count * PAGE) {
                        Ok(()) => done += count,
                        Err(e) => {
                            log::debug!("balloon: {e}");
                            malformed += count;
                        }
                    }
                }
            }
            None => malformed += 1,
        }
        let mut s = lock(&self.status);
        if free {
            s.inflated += done;
        } else {
            s.deflated += done;
        }
        s.malformed += malformed;
    }

    /// Free page reporting: each device-writable descriptor is a free range.
    fn report(&mut self, chain: Chain<'_>) -> u32 {
        let mut freed = 0;
        let mut malformed = 0;
        for d in chain {
            if !d.is_write_only() {
                malformed += 1;
                continue;
            }
            match (self.discard)(d.addr().0, d.len() as u64) {
                Ok(()) => freed += d.len() as u64,
                Err(e) => {
                    log::debug!("balloon: reported range refused: {e}");
                    malformed += 1;
                }
            }
        }
        let mut s = lock(&self.status);
        s.reported += freed;
        s.malformed += malformed;
        0
    }

    /// Statistics buffers arrived ([`CHAINS_PER_TURN`] served at most):
    /// read the latest and keep it.
    fn stats(&mut self, queue: &mut Queue, mem: &Memory) -> Served {
        let mut used = false;
        for _ in 0..CHAINS_PER_TURN {
            let Some(chain) = queue.pop_descriptor_chain(mem) else {
                break;
            };
            let head = chain.head_index();
            let mut got = BTreeMap::new();
            if let Ok(mut r) = chain.reader(mem) {
                let mut entry = [0u8; 10];
                let mut left = MAX_STATS;
                while left > 0
                    && r.available_bytes() >= 10
                    && std::io::Read::read_exact(&mut r, &mut entry).is_ok()
                {
                    left -= 1;
                    let tag = u16::from_le_bytes([entry[0], entry[1]]) as usize;
                    let value = u64::from_le_bytes(entry[2..].try_into().expect("8 bytes"));
                    if let Some(name) = STAT_NAMES.get(tag) {
                        got.insert((*name).to_owned(), value);
                    }
                }
            }
            {
                let mut s = lock(&self.status);
                s.stats = got;
                s.stats_at = Some(Instant::now());
            }
            // One buffer at a time: an older one goes back.
            if let Some(old) = self.stats_head.replace(head) {
                used |= queue.add_used(mem, old, 0).is_ok();
            }
        }
        Served {
            notify: used,
            more: crate::has_available(queue, mem),
        }
    }

    /// The automatic policy: what the guest uses plus a buffer.
    fn adjust(&self) {
        let mut s = lock(&self.status);
        if !s.policy.auto || s.stats_age().is_none_or(|a| a > 3 * POLL) {
            return;
        }
        let (Some(&total), Some(&available)) = (s.stats.get("total"), s.stats.get("available"))
        else {
            return;
        };
        let used = total.saturating_sub(available);
        let want = (used + (used / 5).max(MIN_BUFFER)).clamp(s.policy.min, s.policy.max);
        if want.abs_diff(s.policy.target) >= HYSTERESIS {
            s.policy.target = want & !(PAGE - 1);
        }
    }
}

impl Backend for Balloon {
    fn device_type(&self) -> u32 {
        DEVICE_TYPE
    }
    fn kind(&self) -> &'static str {
        "balloon"
    }
    fn describe(&self) -> String {
        let p = &lock(&self.status).policy;
        format!(
            "{}-{} MiB{}",
            p.min >> 20,
            p.max >> 20,
            if p.auto { ", dynamic" } else { "" }
        )
    }
    fn features(&self) -> u64 {
        features::VERSION_1 | F_STATS_VQ | F_REPORTING
    }
    fn queue_sizes(&self) -> &[u16] {
        // inflate, deflate, then statistics and reporting when negotiated.
        &[QUEUE_SIZE; 4]
    }
    fn config(&self) -> Vec<u8> {
        // num_pages, actual, free_page_hint_cmd_id, poison_val.
        let mut c = Vec::with_capacity(16);
        c.extend_from_slice(&self.num_pages().to_le_bytes());
        c.extend_from_slice(&self.actual.to_le_bytes());
        c.extend_from_slice(&[0; 8]);
        c
    }
    fn write_config(&mut self, offset: usize, data: &[u8]) {
        // Only `actual` (bytes 4..8) is the driver's to write.
        if offset == 4 && data.len() == 4 {
            self.actual = u32::from_le_bytes(data.try_into().expect("4 bytes"));
            lock(&self.status).ballooned = self.actual as u64 * PAGE;
        }
    }
    fn config_changed(&mut self) -> bool {
        let now = self.num_pages();
        let changed = now != self.announced;
        self.announced = now;
        changed
    }
    fn activate(&mut self, features: u64) -> Result<(), BackendError> {
        // Linux numbers only the queues that exist, in this order.
        let mut next = 2;
        self.stats_queue = (features & F_STATS_VQ != 0).then(|| {
            next += 1;
            next - 1
        });
        self.reporting_queue = (features & F_REPORTING != 0).then_some(next);
        Ok(())
    }
    fn reset(&mut self) {
        self.stats_head = None;
        self.actual = 0;
        lock(&self.status).ballooned = 0;
    }
    fn process_queue(&mut self, q: usize, queues: &mut [Queue], mem: &Memory) -> Served {
        let Some(queue) = queues.get_mut(q) else {
            return Served::NOTHING;
        };
        match q {
            0 | 1 => crate::drain_queue_budget(queue, mem, CHAINS_PER_TURN, |chain| {
                self.pages(chain, mem, q == 0);
                0
            }),
            _ if Some(q) == self.stats_queue => self.stats(queue, mem),
            _ if Some(q) == self.reporting_queue => {
                crate::drain_queue_budget(queue, mem, CHAINS_PER_TURN, |chain| self.report(chain))
            }
            _ => Served::NOTHING,
        }
    }
    fn event_fd(&self) -> Option<std::os::fd::RawFd> {
        Some(self.timer.as_fd().as_raw_fd())
    }
    fn process_event(&mut self, queues: &mut [Queue], mem: &Memory) -> Served {
        let _ = self.timer.wait();
        self.adjust();
        // Hand the statistics buffer back: the driver refills and returns it.
        let notify = match (self.stats_head.take(), self.stats_queue) {
            (Some(head), Some(q)) => queues
                .get_mut(q)
                .is_some_and(|queue| queue.add_used(mem, head, 0).is_ok()),
            _ => false,
        };
        Served {
            notify,
            more: false,
        }
    }
    fn counters(&self) -> Vec<(&'static str, u64)> {
        let s = lock(&self.status);
        vec![
            ("target_mib", s.policy.target >> 20),
            ("ballooned_mib", s.ballooned >> 20),
            ("inflated", s.inflated),
            ("deflated", s.deflated),
            ("reported_mib", s.reported >> 20),
            ("malformed", s.malformed),
        ]
    }
    fn save_state(&self) -> Option<DeviceState> {
        let s = lock(&self.status);
        Some(DeviceState::Balloon(BalloonState {
            version: BalloonState::VERSION,
            policy: s.policy.clone(),
            ballooned: s.ballooned,
            stats_head: self.stats_head,
        }))
    }
    fn restore_state(&mut self, state: Option<&DeviceState>) -> Result<(), BackendError> {
        let saved = match state {
            Some(DeviceState::Balloon(saved)) => saved,
            None => {
                return Err(StateError::Missing {
                    device: self.kind(),
                }
                .into())
            }
        };
        check_version(self.kind(), saved.version, BalloonState::VERSION)?;
        let mut s = lock(&self.status);
        // The definition's range stays; the target and what was handed over
        // come back, so the guest keeps its balloon.
        let (min, max) = (s.policy.min, s.policy.max);
        if !(min..=max).contains(&saved.policy.target) {
            let target = saved.policy.target;
            return Err(BalloonError::SavedTarget { target, min, max }.into());
        }
        if saved.ballooned > max {
            let ballooned = saved.ballooned;
            return Err(BalloonError::SavedBallooned { ballooned, max }.into());
        }
        s.policy.target = saved.policy.target;
        s.policy.auto = saved.policy.auto;
        s.ballooned = saved.ballooned;
        drop(s);
        self.actual = (saved.ballooned / PAGE) as u32;
        self.announced = self.num_pages();
        self.stats_head = saved.stats_head;
        Ok(())
    }
}

#[cfg(test)]
#[path = "balloon_tests.rs"]
mod tests;
