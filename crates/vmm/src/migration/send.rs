//! The sending side of a live migration: a thread beside the source VMM's
//! event loop copies memory while the VM runs, then asks the loop to stop
//! the VM for the final copy (see the module above for the order).
//!
//! The loop's side is [`Outgoing`]: it starts the thread, answers its one
//! request ([`Outgoing::hand_over`]: pause, capture, let go of the disk
//! locks, hand the state to the thread — without waiting for the outcome)
//! and cancels it if the VM ends first. The thread's outcome is its last
//! [`Phase`]: the controller reads it once the thread ends.

use std::net::{TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nestvm_kvm::Vm;
use nestvm_snapshot::container;
use nestvm_virtio::Memory;
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::mmap::MmapRegion;
use vm_memory::{Address, GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use super::channel::{self, Channel};
use super::converge::{self, Converge, Switch};
use super::throttle::Throttle;
use super::wire::{self, Kind, BATCH_PAGES, PAGE};
use super::{DowntimeParts, Hello, MigrationError, Phase, Progress, MAX_ROUNDS, PROTOCOL_VERSION};
use crate::api::MigrateRequest as Request;
use crate::persist::capture::{CaptureError, SaveParts};
use crate::persist::VmSnapshot;
use crate::vcpus::VcpuSet;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the peer may stay silent (it may be building the VM).
const IO_TIMEOUT: Duration = Duration::from_secs(120);
/// How long the loop may take to pause and capture the VM.
const CAPTURE_TIMEOUT: Duration = Duration::from_secs(60);

/// What the loop hands the thread once the VM is paused.
pub(crate) struct Captured {
    /// The paused VM (memory excepted).
    pub snapshot: VmSnapshot,
    /// Whether it was running (the destination resumes it only then).
    pub running: bool,
}

/// The thread's request: stop the VM and capture it.
pub(crate) struct Stop(Sender<Result<Captured, CaptureError>>);

/// The final message: the state and whether to resume it.
#[derive(serde::Serialize, serde::Deserialize)]
pub(crate) struct Final {
    pub snapshot: VmSnapshot,
    pub running: bool,
    /// [`wire::memory_digest`] of the paused VM's memory, when verifying.
    #[serde(default)]
    pub memory_digest: Option<u64>,
}

/// Everything the thread uses.
struct Job {
    req: Request,
    hello: Hello,
    vm: Arc<Vm>,
    mem: Memory,
    progress: Arc<Mutex<Progress>>,
    cancel: Arc<AtomicBool>,
    stream: Arc<Mutex<Option<TcpStream>>>,
    stop: Sender<Stop>,
    wake: EventFd,
    /// Turned on as `Go` is about to be written.
    committed: Arc<AtomicBool>,
    /// How much the event loop is to slow the guest, percent
    /// ([`super::converge`]); written before `wake`.
    slowed: Arc<AtomicU8>,
    /// The VM's passt processes, stopped at the commit point.
    passt: Mutex<Vec<crate::passt::Stopper>>,
}

/// An outgoing migration, as the event loop holds it.
pub struct Outgoing {
    progress: Arc<Mutex<Progress>>,
    committed: Arc<AtomicBool>,
    slowed: Arc<AtomicU8>,
    requests: Receiver<Stop>,
    cancel: Arc<AtomicBool>,
    stream: Arc<Mutex<Option<TcpStream>>>,
    thread: Option<JoinHandle<()>>,
}

impl Outgoing {
    /// Starts migrating; `wake` is written when the thread needs the loop.
    pub(crate) fn start(
        req: Request,
        hello: Hello,
        (vm, passt): (Arc<Vm>, Vec<crate::passt::Stopper>),
        mem: Memory,
        wake: EventFd,
        seccomp: crate::seccomp::Mode,
    ) -> std::io::Result<Outgoing> {
        let progress = Arc::new(Mutex::new(Progress {
            to: req.to.clone(),
            max_downtime_ms: req.max_downtime.as_millis() as u64,
            max_bandwidth: req.max_bandwidth,
            memory_bytes: mem.iter().map(|r| r.len()).sum(),
            ..Default::default()
        }));
        let (stop, requests) = channel();
        let cancel = Arc::new(AtomicBool::new(false));
        let stream = Arc::new(Mutex::new(None));
        let committed = Arc::new(AtomicBool::new(false));
        let slowed = Arc::new(AtomicU8::new(0));
        let job = Job {
            committed: committed.clone(),
            slowed: slowed.clone(),
            req,
            hello,
            vm,
            mem,
            progress: progress.clone(),
            cancel: cancel.clone(),
            stream: stream.clone(),
            stop,
            wake,
            passt: Mutex::new(passt),
        };
        let thread = std::thread::Builder::new()
            .name("migrate".into())
            .spawn(move || {
                // Before it connects or reads a byte from the peer.
                crate::seccomp::confine(crate::seccomp::Role::Migration, seccomp);
                let start = Instant::now();
                let result = migrate(&job, start);
                // Whatever the outcome, the guest is not slowed any more.
                job.slowed.store(0, Ordering::SeqCst);
                let committed = job.committed.load(Ordering::SeqCst);
                // Dirty logging costs the guest a fault per first write: off again.
                if let Err(e) = job.vm.log_dirty_pages(false) {
                    log::warn!("migration: cannot turn dirty logging off: {e}");
                }
                let mut p = lock(&job.progress);
                p.elapsed_ms = start.elapsed().as_millis() as u64;
                match result {
                    Ok(()) => p.phase = Phase::Completed,
                    Err(e) => {
                        let msg = crate::persist::capture::chain_text(&e);
                        p.phase = match committed {
                            true => {
                                log::error!(
                                    "migration to {}: committed, but the destination did not confirm it runs the VM ({msg}); the VM stays paused here",
                                    job.req.to
                                );
                                Phase::Unconfirmed
                            }
                            false => {
                                log::warn!("migration to {} failed: {msg}", job.req.to);
                                Phase::Failed
                            }
                        };
                        p.error = Some(msg);
                    }
                }
                drop(p);
                let _ = job.wake.write(1);
            })?;
        Ok(Outgoing {
            progress,
            committed,
            slowed,
            requests,
            cancel,
            stream,
            thread: Some(thread),
        })
    }

    /// Where it is.
    pub fn progress(&self) -> Progress {
        lock(&self.progress).clone()
    }

    /// How much the guest is to be slowed now, percent (auto-converge;
    /// 0 once pre-copy is over).
    pub fn slowed(&self) -> u8 {
        self.slowed.load(Ordering::SeqCst)
    }

    /// Whether it has ended (completed, failed or unconfirmed), or its
    /// thread has (a panic).
    pub fn finished(&self) -> bool {
        lock(&self.progress).phase.ended() || self.thread.as_ref().is_some_and(|t| t.is_finished())
    }

    /// The thread's pending stop request, if any.
    pub(crate) fn stop_request(&self) -> Option<Sender<Result<Captured, CaptureError>>> {
        self.requests.try_recv().ok().map(|Stop(reply)| reply)
    }

    /// Stops the thread (the VM is ending) and waits for it.
    pub fn cancel(mut self) -> Self {
        self.cancel.store(true, Ordering::SeqCst);
        if let Some(s) = lock(&self.stream).as_ref() {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
        // Pending requests die with the channel: the thread sees no answer.
        drop(std::mem::replace(&mut self.requests, channel().1));
        self.join()
    }

    /// Waits for the thread to end. One that ended without an outcome (it
    /// panicked) failed — or, past the commit point, is unconfirmed.
    pub fn join(mut self) -> Self {
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let mut p = lock(&self.progress);
        if !p.phase.ended() {
            p.phase = match self.committed.load(Ordering::SeqCst) {
                true => Phase::Unconfirmed,
                false => Phase::Failed,
            };
            p.error = Some("the migration thread stopped unexpectedly".into());
        }
        drop(p);
        self
    }
}

fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn connect(to: &str) -> Result<TcpStream, MigrationError> {
    let err = |source| MigrationError::Connect {
        addr: to.to_owned(),
        source,
    };
    let mut last = std::io::Error::other("the address resolves to nothing");
    for addr in to.to_socket_addrs().map_err(err)? {
        match TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT) {
            Ok(s) => return Ok(s),
            Err(e) => last = e,
        }
    }
    Err(err(last))
}

/// The whole migration, in the thread. `job.committed` turns true as `Go`
/// is about to be written: from then on a failure leaves the VM paused here.
fn migrate(job: &Job, start: Instant) -> Result<(), MigrationError> {
    let s = connect(&job.req.to)?;
    let _ = s.set_nodelay(true);
    s.set_read_timeout(Some(IO_TIMEOUT))
        .and_then(|_| s.set_write_timeout(Some(IO_TIMEOUT)))
        .map_err(MigrationError::Stream)?;
    *lock(&job.stream) = Some(s.try_clone().map_err(MigrationError::Stream)?);
    let mut s = channel::initiate(s, &job.req.key)?;
    let hello =
        serde_json::to_vec(&job.hello).map_err(|e| MigrationError::protocol(e.to_string()))?;
    // The final state holds the definition and CPUID tables again, and
    // more: the Hello's size is a floor for it.
    let state_floor = hello.len() as u64;
    wire::send(&mut s, Kind::Hello, &hello)?;
    wire::expect(&mut s, Kind::Accept)?;

    // From here on every write is logged: by KVM for the vCPUs, by the
    // memory's bitmap for the devices. Round 1 then sends everything.
    job.vm
        .log_dirty_pages(true)
        .map_err(MigrationError::DirtyLog)?;
    let _ = collect_dirty(job)?;
    // Round 1: every page that may hold data. A page never touched is zero
    // here and at the destination, which is not sent it; one written from
    // now on is in the dirty log.
    let all: Vec<u64> = job
        .mem
        .iter()
        .flat_map(|r| {
            let base = r.start_addr().raw_value();
            let data = nestvm_kvm::memory::Residency::of(&job.mem, r);
            (0..data.len() as u64)
                .filter(move |&i| data[i as usize])
                .map(move |i| base + i * PAGE as u64)
        })
        .collect();
    set_phase(job, Phase::Precopy, start);
    let mut throttle = job.req.max_bandwidth.map(Throttle::new);
    let mut pages = all;
    let mut skip_zero = true;
    let mut converge = Converge::new(job.req.auto_converge);
    let converged = loop {
        let t = Instant::now();
        let sent = send_pages(job, &mut s, &pages, skip_zero, throttle.as_mut())?;
        skip_zero = false;
        let seq = 2 * u64::from(lock(&job.progress).rounds);
        // The first answer comes once the pages still on their way are
        // applied: that wait is part of the round. Over the idle link, the
        // second one times the round trip alone.
        ping(&mut s, seq)?;
        let secs = t.elapsed().as_secs_f64().max(1e-6);
        pages = collect_dirty(job)?;
        let round_trip = ping(&mut s, seq + 1)?;
        let dirty = (pages.len() * PAGE) as u64;
        let round = Round {
            sent,
            secs,
            dirty,
            round_trip,
        };
        if let Some(converged) = judge(job, &mut converge, &round, state_floor, start) {
            break converged;
        }
    };

    // Stop-and-copy: the loop pauses and captures the VM, then waits.
    job.slowed.store(0, Ordering::SeqCst);
    set_phase(job, Phase::Stopping, start);
    let paused_at = Instant::now();
    let (tx, rx) = channel();
    job.stop
        .send(Stop(tx))
        .map_err(|_| MigrationError::Cancelled)?;
    let _ = job.wake.write(1);
    let captured = match rx.recv_timeout(CAPTURE_TIMEOUT) {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => return Err(MigrationError::Capture(Box::new(e))),
        Err(_) => return Err(MigrationError::Cancelled),
    };
    let captured_at = Instant::now();
    // What the last round left, and what was written since: all of it now.
    let mut last = pages;
    last.extend(collect_dirty(job)?);
    last.sort_unstable();
    last.dedup();
    send_pages(job, &mut s, &last, false, None)?;
    let memory_digest = match job.req.verify {
        true => Some(wire::memory_digest(&job.mem)?),
        false => None,
    };
    let state = serde_json::to_vec(&Final {
        snapshot: captured.snapshot,
        running: captured.running,
        memory_digest,
    })
    .map_err(|e| MigrationError::protocol(e.to_string()))?;
    wire::send(&mut s, Kind::State, &container::encode(&state))?;
    let sent_at = Instant::now();
    // Until `Go` is written, the destination has not run the VM: any
    // failure up to here resumes it on this side.
    wire::expect(&mut s, Kind::Ready)?;
    if job.cancel.load(Ordering::SeqCst) {
        return Err(MigrationError::Cancelled);
    }
    // The commit point (see the module above): the VM is the destination's.
    job.committed.store(true, Ordering::SeqCst);
    // Its user-mode network too: this side's passt ends before `Go`, so a
    // destination on this host binds the same forwarded ports after it.
    for p in std::mem::take(&mut *lock(&job.passt)) {
        p.stop();
    }
    wire::send(&mut s, Kind::Go, &[])?;
    wire::expect(&mut s, Kind::Resumed)?;
    let downtime = paused_at.elapsed();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let mut p = lock(&job.progress);
    p.downtime_ms = Some(downtime.as_millis() as u64);
    p.downtime_parts = Some(DowntimeParts {
        stop_ms: ms(captured_at - paused_at),
        copy_ms: ms(sent_at - captured_at),
        resume_ms: ms(sent_at.elapsed()),
    });
    p.converged = Some(converged);
    p.dirty_bytes = (last.len() * PAGE) as u64;
    Ok(())
}

/// What one pre-copy round measured.
struct Round {
    /// Page data sent.
    sent: u64,
    /// How long it took, the queued pages applied, seconds.
    secs: f64,
    /// Memory dirtied meanwhile.
    dirty: u64,
    /// A round trip to the receiver over the idle link.
    round_trip: Duration,
}

/// After a round: its figures into the progress, then whether pre-copy
/// ends (`Some(converged)`) or goes on, the guest slowed as auto-converge
/// says (the share reported is the one the loop applies).
fn judge(
    job: &Job,
    converge: &mut Converge,
    r: &Round,
    state_floor: u64,
    start: Instant,
) -> Option<bool> {
    let budget = job.req.max_downtime;
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let mut p = lock(&job.progress);
    p.rounds += 1;
    // The rate of a round that moved little says little: keep the best seen.
    let rate = ((r.sent as f64 / r.secs) as u64).max(p.rate).max(1);
    p.rate = rate;
    p.dirty_bytes = r.dirty;
    p.elapsed_ms = start.elapsed().as_millis() as u64;
    let fixed = converge::fixed_costs(r.round_trip, state_floor, rate);
    p.round_trip_ms = Some(ms(r.round_trip));
    p.expected_downtime_ms = Some(ms(converge::expected_downtime(r.dirty, rate, fixed)));
    let rounds = p.rounds;
    drop(p);
    match converge::switch(r.dirty, rate, fixed, budget) {
        Switch::Converged => return Some(true),
        Switch::Hopeless => {
            log::warn!(
                "migration: the pause's fixed costs alone ({:.0} ms: two round trips of {:.1} ms and the state) exceed the {} ms budget; pausing now that the pages left would fit it",
                ms(fixed),
                ms(r.round_trip),
                budget.as_millis()
            );
            return Some(false);
        }
        Switch::Continue => {}
    }
    // Round 1 sent all memory: it says nothing of the guest's pace.
    let share = match rounds > 1 {
        true => converge.after_round(r.sent, r.dirty),
        false => converge.share(),
    };
    slow(job, share);
    lock(&job.progress).slowed_pct = share;
    (rounds >= MAX_ROUNDS).then_some(false)
}

/// Times a round trip to the receiver: a `Ping` carrying `seq`, which it
/// echoes once every frame before it is applied.
fn ping(s: &mut Channel<TcpStream>, seq: u64) -> Result<Duration, MigrationError> {
    let t = Instant::now();
    wire::send(s, Kind::Ping, &seq.to_le_bytes())?;
    if wire::expect(s, Kind::Pong)? != seq.to_le_bytes() {
        return Err(MigrationError::protocol("the receiver echoed another ping"));
    }
    Ok(t.elapsed())
}

/// Has the loop slow the guest by `share` percent, if that is news.
fn slow(job: &Job, share: u8) {
    if job.slowed.swap(share, Ordering::SeqCst) != share {
        let _ = job.wake.write(1);
    }
}

fn set_phase(job: &Job, phase: Phase, start: Instant) {
    let mut p = lock(&job.progress);
    p.phase = phase;
    p.elapsed_ms = start.elapsed().as_millis() as u64;
}

/// Sends `pages` in batches, each once `throttle` lets it go; returns the
/// page data sent.
fn send_pages(
    job: &Job,
    s: &mut Channel<TcpStream>,
    pages: &[u64],
    skip_zero: bool,
    mut throttle: Option<&mut Throttle>,
) -> Result<u64, MigrationError> {
    let cancelled = || job.cancel.load(Ordering::SeqCst);
    let mut total = 0;
    for batch in pages.chunks(BATCH_PAGES) {
        if cancelled() {
            return Err(MigrationError::Cancelled);
        }
        let (payload, data, count) = wire::encode_pages(&job.mem, batch, skip_zero)?;
        if count > 0 {
            if let Some(t) = throttle.as_deref_mut() {
                if !t.pace(payload.len() as u64, cancelled) {
                    return Err(MigrationError::Cancelled);
                }
            }
            wire::send(s, Kind::Pages, &payload)?;
        }
        total += data;
        lock(&job.progress).sent_bytes += data;
    }
    Ok(total)
}

/// The pages written since the last call, by vCPUs (KVM's log) or devices
/// (the memory's bitmap), as guest addresses; clears both.
fn collect_dirty(job: &Job) -> Result<Vec<u64>, MigrationError> {
    let mut pages = Vec::new();
    for (slot, region) in job.mem.iter().enumerate() {
        let kvm = job
            .vm
            .dirty_pages(slot as u32, region.len())
            .map_err(MigrationError::DirtyLog)?;
        let mapping: &MmapRegion<AtomicBitmap> = region;
        let devices = mapping.bitmap().get_and_reset();
        let base = region.start_addr().raw_value();
        let words = (region.len() as usize / PAGE).div_ceil(64);
        for w in 0..words {
            let mut bits = kvm.get(w).copied().unwrap_or(0) | devices.get(w).copied().unwrap_or(0);
            while bits != 0 {
                let b = bits.trailing_zeros() as u64;
                bits &= bits - 1;
                pages.push(base + (w as u64 * 64 + b) * PAGE as u64);
            }
        }
    }
    Ok(pages)
}

/// Builds what the sender says first.
pub(crate) fn hello(
    config: &crate::config::VmConfig,
    nested: bool,
    cpuid: &[Vec<nestvm_kvm::kvm_bindings::kvm_cpuid_entry2>],
) -> Hello {
    Hello {
        version: PROTOCOL_VERSION,
        config: config.clone(),
        nested,
        cpuid: cpuid.to_vec(),
        source: super::placement::Source::this_process(),
    }
}

impl Outgoing {
    /// Starts the migration `req` of the VM `parts` describe.
    pub(crate) fn begin(
        req: Request,
        parts: &SaveParts<'_>,
        vm: (Arc<Vm>, Vec<crate::passt::Stopper>),
        wake: EventFd,
        seccomp: crate::seccomp::Mode,
    ) -> std::io::Result<Outgoing> {
        let hello = hello(parts.config, parts.nested, parts.cpuid);
        Outgoing::start(req, hello, vm, parts.memory.clone(), wake, seccomp)
    }

    /// Serves the thread's stop request: freezes the devices (no queue is
    /// served, no TAP read: nothing changes memory or disks behind the
    /// state), pauses the vCPUs (if `running`), captures the VM, lets go
    /// of host resources the destination needs on this same host (disk
    /// locks) and hands the state to the thread; it does not wait for the
    /// outcome. See [`HandOver`] for what the VM is left as.
    pub(crate) fn hand_over(
        reply: Sender<Result<Captured, CaptureError>>,
        vcpus: &VcpuSet,
        parts: &SaveParts<'_>,
        running: bool,
    ) -> HandOver {
        for d in parts.virtio {
            lock(d).freeze();
        }
        let paused = match running {
            true => vcpus.pause().map_err(CaptureError::from),
            false => Ok(()),
        };
        let captured = paused.and_then(|()| crate::persist::capture::build_snapshot(vcpus, parts));
        let handed = match captured {
            Ok((snapshot, _)) => {
                release_disks(parts);
                let sent = reply.send(Ok(Captured { snapshot, running })).is_ok();
                // A thread that is gone took nothing: the locks come back.
                if !sent {
                    if let Err(e) = reclaim_disks(parts) {
                        let e = crate::persist::capture::chain_text(&e);
                        log::error!("migration: {e}; the VM stays paused");
                        return HandOver::Stuck;
                    }
                }
                sent
            }
            Err(e) => {
                let _ = reply.send(Err(e));
                false
            }
        };
        if handed {
            return HandOver::Handed;
        }
        thaw_devices(parts);
        if running {
            if let Err(e) = vcpus.resume() {
                log::error!("migration failed, and the VM cannot resume: {e}");
            }
        }
        HandOver::Back
    }
}

/// What [`Outgoing::hand_over`] left the VM as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum HandOver {
    /// The thread has the state: the VM is paused, its devices frozen and
    /// its disk locks released until the thread's last phase says what
    /// became of it.
    Handed,
    /// Nothing went over: the VM runs (or stays paused) as before.
    Back,
    /// Nothing went over, but a disk lock could not be taken back: the VM
    /// stays paused, frozen, its locks released, as after an unconfirmed
    /// migration.
    Stuck,
}

/// Lets every device serve again (after [`reclaim_disks`]).
pub(crate) fn thaw_devices(parts: &SaveParts<'_>) {
    for d in parts.virtio {
        lock(d).thaw();
    }
}

/// Lets go of every device's host locks (disk images), for a destination
/// on this same host.
fn release_disks(parts: &SaveParts<'_>) {
    for d in parts.virtio {
        if let Err(e) = lock(d).release() {
            log::warn!("migration: {}", crate::persist::capture::chain_text(&e));
        }
    }
}

/// A device's host lock that could not be taken back.
#[derive(Debug, thiserror::Error)]
#[error("cannot take back {device}")]
pub(crate) struct ReclaimError {
    /// What the device is attached to (a disk image).
    device: String,
    /// Why.
    #[source]
    source: nestvm_virtio::BackendError,
}

/// Takes every device's host locks back, after a migration that did not
/// happen; fails on the first one that cannot be had.
pub(crate) fn reclaim_disks(parts: &SaveParts<'_>) -> Result<(), ReclaimError> {
    for d in parts.virtio {
        let mut dev = lock(d);
        if let Err(source) = dev.reclaim() {
            let device = dev.report().attached;
            return Err(ReclaimError { device, source });
        }
    }
    Ok(())
}
