//! The virtio-mmio transport, version 2 (virtio 1.x, "modern").
//!
//! One 4 KiB MMIO window per device: 32-bit registers up to 0xff, the
//! device's configuration space from 0x100. The driver reads the device
//! features, writes the ones it accepts, sets up each queue (size and the
//! three ring addresses, then ready) and sets DRIVER_OK; only then does the
//! backend start. A write of 0 to the status register resets everything.
//! Queue notifications normally reach [`crate::worker`] through an ioeventfd
//! that KVM signals without leaving the kernel; a write that does arrive here
//! (no ioeventfd) signals the same eventfd.
//!
//! A device is snapshotted into an [`MmioSnapshot`] (versioned, with the
//! backend's typed [`DeviceState`]) and built again from one with
//! [`MmioDevice::restore`], which checks it like guest input.

use crate::Memory;
use nestvm_devices::bus::BusDevice;
use nestvm_devices::EventTrigger;
use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueState, QueueT};

use crate::state::DeviceState;
use crate::{features, Backend, BackendError};

/// Size of a device's MMIO window.
pub const WINDOW_LEN: u64 = 0x1000;
/// Offset of the queue-notify register, where the ioeventfds go.
pub const QUEUE_NOTIFY: u64 = 0x50;

const MAGIC: u32 = 0x7472_6976; // "virt"
const VERSION: u32 = 2;
const VENDOR: u32 = 0x4e56_4d00; // "NVM"
const CONFIG_START: u64 = 0x100;

/// Device status bits the driver sets.
pub mod status {
    /// The driver found the device.
    pub const ACKNOWLEDGE: u32 = 1;
    /// The driver knows how to drive it.
    pub const DRIVER: u32 = 2;
    /// The driver is ready; the device may run.
    pub const DRIVER_OK: u32 = 4;
    /// Feature negotiation is complete.
    pub const FEATURES_OK: u32 = 8;
    /// The device hit an error and needs a reset.
    pub const NEEDS_RESET: u32 = 0x40;
    /// The driver gave up on the device.
    pub const FAILED: u32 = 0x80;
}

/// Interrupt status bits.
const INT_USED_RING: u32 = 1;
const INT_CONFIG: u32 = 2;

/// Errors creating a transport or restoring one from a snapshot.
#[derive(Debug, thiserror::Error)]
pub enum MmioError {
    /// An eventfd could not be made.
    #[error("cannot create an eventfd for a virtio queue")]
    EventFd(#[source] std::io::Error),
    /// A backend asked for an impossible queue.
    #[error("invalid virtio queue size {0}")]
    QueueSize(u16),
    /// A snapshot layout this build does not read.
    #[error("the saved {kind} device is in snapshot version {found}; this nestvm reads version {supported}")]
    Version {
        /// The device restored.
        kind: &'static str,
        /// The saved version.
        found: u16,
        /// The one this build reads.
        supported: u16,
    },
    /// The snapshot of another kind of device.
    #[error("a saved virtio device of type {saved} cannot be restored into the {kind} device (type {device})")]
    DeviceType {
        /// The device restored.
        kind: &'static str,
        /// The saved device ID.
        saved: u32,
        /// This device's ID.
        device: u32,
    },
    /// Not as many queues as the device has.
    #[error("{saved} queues in the snapshot, the {kind} device has {device}")]
    QueueCount {
        /// The device restored.
        kind: &'static str,
        /// Queues saved.
        saved: usize,
        /// Queues it has.
        device: usize,
    },
    /// The guest uses features the device no longer offers.
    #[error("the {kind} device no longer offers features the guest uses ({unoffered:#x})")]
    Features {
        /// The device restored.
        kind: &'static str,
        /// The accepted features it does not offer.
        unoffered: u64,
    },
    /// A queue of another size than the device's.
    #[error(
        "queue {index} of the {kind} device is {device} entries at most, {saved} in the snapshot"
    )]
    QueueMaxSize {
        /// The device restored.
        kind: &'static str,
        /// The queue.
        index: usize,
        /// The saved maximum.
        saved: u16,
        /// The device's maximum.
        device: u16,
    },
    /// A queue state virtio-queue refuses (its size, its alignment).
    #[error("queue {index} of the saved {kind} device is invalid")]
    Queue {
        /// The device restored.
        kind: &'static str,
        /// The queue.
        index: usize,
        /// What virtio-queue said.
        #[source]
        source: virtio_queue::Error,
    },
    /// A running queue's rings are not in guest memory.
    #[error("queue {index} of the saved {kind} device lies outside guest memory")]
    QueueOutsideMemory {
        /// The device restored.
        kind: &'static str,
        /// The queue.
        index: usize,
    },
    /// The backend refused its saved state or could not start again.
    #[error("the saved {kind} device cannot be restored")]
    Backend {
        /// The device restored.
        kind: &'static str,
        /// The backend's error.
        #[source]
        source: BackendError,
    },
}

/// One queue's state in a snapshot.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct QueueSnapshot {
    /// Size the device offers.
    pub max_size: u16,
    /// Size the driver chose.
    pub size: u16,
    /// Whether the driver enabled it.
    pub ready: bool,
    /// Descriptor table address.
    pub desc_table: u64,
    /// Available ring address.
    pub avail_ring: u64,
    /// Used ring address.
    pub used_ring: u64,
    /// Next available entry the device will take.
    pub next_avail: u16,
    /// Next used entry the device will fill.
    pub next_used: u16,
    /// Event indices negotiated.
    pub event_idx: bool,
}

/// A transport's registers and queues, and its backend's own state, for
/// snapshots. Disks have no state beyond their image, and a network adapter
/// loses at most the one frame it was holding, like a lost packet.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MmioSnapshot {
    /// Its layout's version, [`MmioSnapshot::VERSION`] when saved by this
    /// build (0 when absent: a snapshot from before versions, refused).
    #[serde(default)]
    pub version: u16,
    /// The virtio device ID of the device saved.
    #[serde(default)]
    pub device_type: u32,
    /// Device status register.
    pub status: u32,
    /// Features the driver accepted.
    pub driver_features: u64,
    /// Feature word selectors.
    pub features_sel: [u32; 2],
    /// Selected queue.
    pub queue_sel: u32,
    /// Pending interrupt bits.
    pub interrupt_status: u32,
    /// Configuration generation.
    pub config_generation: u32,
    /// Whether the device was running.
    pub active: bool,
    /// Its queues.
    pub queues: Vec<QueueSnapshot>,
    /// The backend's own state, for devices that have one (the balloon).
    #[serde(default)]
    pub backend: Option<DeviceState>,
}

impl MmioSnapshot {
    /// The version this build writes and reads.
    pub const VERSION: u16 = 1;
}

/// A virtio device on the MMIO bus.
pub struct MmioDevice<B> {
    backend: B,
    mem: Memory,
    queues: Vec<Queue>,
    notify: Vec<EventTrigger>,
    irq: EventTrigger,
    interrupt_status: u32,
    status: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    config_generation: u32,
    active: bool,
    /// Set while a migration holds the VM: no queue is served and the
    /// backend's descriptor is not read, so nothing changes guest memory
    /// or the host's files behind the captured state.
    frozen: bool,
    /// Queues notified while frozen (bit per queue), and whether the
    /// backend's descriptor became ready: served when thawed.
    missed: u64,
    missed_event: bool,
}

impl<B: Backend> MmioDevice<B> {
    /// Wraps `backend`; `irq` is the device's interrupt line.
    pub fn new(backend: B, mem: Memory, irq: EventTrigger) -> Result<Self, MmioError> {
        let mut queues = Vec::new();
        let mut notify = Vec::new();
        for &size in backend.queue_sizes() {
            queues.push(Queue::new(size).map_err(|_| MmioError::QueueSize(size))?);
            notify.push(EventTrigger::new().map_err(MmioError::EventFd)?);
        }
        Ok(Self {
            backend,
            mem,
            queues,
            notify,
            irq,
            interrupt_status: 0,
            status: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            config_generation: 0,
            active: false,
            frozen: false,
            missed: 0,
            missed_event: false,
        })
    }

    /// Its registers and queues (with the VM paused).
    pub fn snapshot(&self) -> MmioSnapshot {
        MmioSnapshot {
            version: MmioSnapshot::VERSION,
            device_type: self.backend.device_type(),
            status: self.status,
            driver_features: self.driver_features,
            features_sel: [self.device_features_sel, self.driver_features_sel],
            queue_sel: self.queue_sel,
            interrupt_status: self.interrupt_status,
            config_generation: self.config_generation,
            active: self.active,
            queues: self
                .queues
                .iter()
                .map(|q| {
                    let s = q.state();
                    QueueSnapshot {
                        max_size: s.max_size,
                        size: s.size,
                        ready: s.ready,
                        desc_table: s.desc_table,
                        avail_ring: s.avail_ring,
                        used_ring: s.used_ring,
                        next_avail: s.next_avail,
                        next_used: s.next_used,
                        event_idx: s.event_idx_enabled,
                    }
                })
                .collect(),
            backend: self.backend.save_state(),
        }
    }

    /// The device `backend` was when `snap` was taken: its registers and
    /// queues, its own state, and, if it was running, started again with the
    /// same features. The snapshot is checked like guest input: its version
    /// and device type, queue counts and sizes must be what this backend
    /// offers, the features the guest accepted must still be offered, and
    /// running queues must lie in guest memory.
    pub fn restore(
        backend: B,
        mem: Memory,
        irq: EventTrigger,
        snap: &MmioSnapshot,
    ) -> Result<Self, MmioError> {
        let kind = backend.kind();
        check_fits(&backend, snap)?;
        let queues = snap
            .queues
            .iter()
            .zip(backend.queue_sizes())
            .enumerate()
            .map(|(index, (s, &max))| restore_queue(kind, index, s, max, &mem, snap.active))
            .collect::<Result<Vec<_>, _>>()?;
        let notify = queues
            .iter()
            .map(|_| EventTrigger::new().map_err(MmioError::EventFd))
            .collect::<Result<Vec<_>, _>>()?;
        let mut dev = Self {
            backend,
            mem,
            queues,
            notify,
            irq,
            interrupt_status: snap.interrupt_status,
            status: snap.status,
            device_features_sel: snap.features_sel[0],
            driver_features_sel: snap.features_sel[1],
            driver_features: snap.driver_features,
            queue_sel: snap.queue_sel,
            config_generation: snap.config_generation,
            active: false,
            frozen: false,
            missed: 0,
            missed_event: false,
        };
        let backend_failed = |source| MmioError::Backend { kind, source };
        dev.backend
            .restore_state(snap.backend.as_ref())
            .map_err(backend_failed)?;
        if snap.active {
            dev.backend
                .activate(snap.driver_features)
                .map_err(backend_failed)?;
            dev.active = true;
            // Work left on a queue when the snapshot was taken (a budget
            // spent, a kick not yet served) was never saved as a kick:
            // check every queue once on the first turn.
            for i in 0..dev.queues.len() {
                dev.kick(i);
            }
        }
        Ok(dev)
    }

    /// The per-queue notification eventfds, in queue order.
    pub fn notify_events(&self) -> &[EventTrigger] {
        &self.notify
    }

    /// The backend.
    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// Whether the driver has started the device.
    pub fn is_active(&self) -> bool {
        self.active
    }

    /// The device status register.
    pub fn status(&self) -> u32 {
        self.status
    }

    fn raise(&mut self, bits: u32) {
        self.interrupt_status |= bits;
        if let Err(e) = self.irq.0.write(1) {
            log::warn!(
                "virtio {}: cannot raise interrupt: {e}",
                self.backend.kind()
            );
        }
    }

    /// The guest notified queue `index` (called from the event loop).
    pub fn queue_notified(&mut self, index: usize) {
        if !self.active || index >= self.queues.len() {
            return;
        }
        if self.frozen {
            self.missed |= 1u64.checked_shl(index as u32).unwrap_or(0);
            return;
        }
        let served = self
            .backend
            .process_queue(index, &mut self.queues, &self.mem);
        if served.notify {
            self.raise(INT_USED_RING);
        }
        if served.more {
            self.kick(index);
        }
    }

    /// Signals queue `index`'s notification eventfd as a guest kick would,
    /// so the worker serves the queue on the loop's next turn.
    fn kick(&self, index: usize) {
        let Some(n) = self.notify.get(index) else {
            return;
        };
        if let Err(e) = n.0.write(1) {
            log::warn!(
                "virtio {}: cannot re-arm queue {index}: {e}",
                self.backend.kind()
            );
        }
    }

    /// The backend's own descriptor is ready (called from the event loop).
    pub fn backend_event(&mut self) {
        if !self.active {
            return;
        }
        if self.frozen {
            self.missed_event = true;
            return;
        }
        let served = self.backend.process_event(&mut self.queues, &self.mem);
        if served.notify {
            self.raise(INT_USED_RING);
        }
        if served.more {
            if let Some(q) = self.backend.event_queue() {
                self.kick(q);
            }
        }
        if self.backend.config_changed() {
            self.config_generation = self.config_generation.wrapping_add(1);
            self.raise(INT_CONFIG);
        }
    }

    fn reset(&mut self) {
        self.backend.reset();
        for q in &mut self.queues {
            q.reset();
        }
        self.interrupt_status = 0;
        self.status = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.driver_features = 0;
        self.queue_sel = 0;
        self.active = false;
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        if self.active {
            return None; // no queue changes while running
        }
        self.queues.get_mut(self.queue_sel as usize)
    }

    fn set_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        let newly = value & !self.status;
        let mut value = value;
        if newly & status::FEATURES_OK != 0 {
            let offered = self.backend.features();
            let ok = self.driver_features & !offered == 0
                && self.driver_features & features::VERSION_1 != 0;
            if !ok {
                value &= !status::FEATURES_OK;
            }
        }
        self.status = value;
        if newly & status::DRIVER_OK != 0 && !self.active {
            self.activate();
        }
    }

    fn activate(&mut self) {
        if self.status & status::FEATURES_OK == 0 {
            return self.fail("DRIVER_OK before FEATURES_OK");
        }
        let event_idx = self.driver_features & features::RING_EVENT_IDX != 0;
        for (i, q) in self.queues.iter_mut().enumerate() {
            if q.ready() && !q.is_valid(&self.mem) {
                return self.fail(format!("queue {i} lies outside guest memory"));
            }
            q.set_event_idx(event_idx);
        }
        if let Err(e) = self.backend.activate(self.driver_features) {
            return self.fail(ErrorChain(&e));
        }
        self.active = true;
        // Buffers the driver queued before DRIVER_OK (network receive
        // buffers) are picked up on the event loop's next turn: this runs
        // on a vCPU thread, which does no device I/O.
        for i in 0..self.queues.len() {
            self.kick(i);
        }
    }

    /// Stops serving queues and the backend's descriptor until
    /// [`MmioDevice::thaw`]; what comes meanwhile is remembered.
    pub fn freeze(&mut self) {
        self.frozen = true;
    }

    /// Serves again, starting with what came while frozen.
    pub fn thaw(&mut self) {
        if !std::mem::replace(&mut self.frozen, false) {
            return;
        }
        let missed = std::mem::take(&mut self.missed);
        for i in 0..self.queues.len() {
            if missed & 1u64.checked_shl(i as u32).unwrap_or(0) != 0 {
                self.kick(i);
            }
        }
        if std::mem::take(&mut self.missed_event) {
            if let Some(q) = self.backend.event_queue() {
                self.kick(q);
            }
        }
    }

    fn fail(&mut self, why: impl std::fmt::Display) {
        log::warn!(
            "virtio {} ({}): {why}; the device needs a reset",
            self.backend.kind(),
            self.backend.describe()
        );
        self.status |= status::NEEDS_RESET;
        self.raise(INT_CONFIG);
    }

    fn read_register(&self, offset: u64) -> u32 {
        let queue = self.queues.get(self.queue_sel as usize);
        match offset {
            0x00 => MAGIC,
            0x04 => VERSION,
            0x08 => self.backend.device_type(),
            0x0c => VENDOR,
            0x10 => match self.device_features_sel {
                0 => self.backend.features() as u32,
                1 => (self.backend.features() >> 32) as u32,
                _ => 0,
            },
            0x34 => queue.map_or(0, |q| u32::from(q.max_size())),
            0x44 => queue.map_or(0, |q| u32::from(q.ready())),
            0x60 => self.interrupt_status,
            0x70 => self.status,
            0xfc => self.config_generation,
            _ => 0,
        }
    }

    fn write_register(&mut self, offset: u64, v: u32) {
        match offset {
            0x14 => self.device_features_sel = v,
            0x20 => {
                if self.status & status::FEATURES_OK != 0 {
                    return; // features are fixed once accepted
                }
                match self.driver_features_sel {
                    0 => {
                        self.driver_features = (self.driver_features & !0xffff_ffff) | u64::from(v)
                    }
                    1 => {
                        self.driver_features =
                            (self.driver_features & 0xffff_ffff) | (u64::from(v) << 32)
                    }
                    _ => {}
                }
            }
            0x24 => self.driver_features_sel = v,
            0x30 => self.queue_sel = v,
            0x38 => {
                if let Some(q) = self.selected_queue() {
                    // An invalid size leaves the queue unusable, and
                    // activation then fails cleanly.
                    let _ = q.try_set_size(v as u16);
                }
            }
            0x44 => {
                if let Some(q) = self.selected_queue() {
                    q.set_ready(v == 1);
                }
            }
            QUEUE_NOTIFY => {
                if let Some(n) = self.notify.get(v as usize) {
                    let _ = n.0.write(1);
                }
            }
            0x64 => self.interrupt_status &= !v,
            0x70 => self.set_status(v),
            0x80 => self.with_queue(|q| q.set_desc_table_address(Some(v), None)),
            0x84 => self.with_queue(|q| q.set_desc_table_address(None, Some(v))),
            0x90 => self.with_queue(|q| q.set_avail_ring_address(Some(v), None)),
            0x94 => self.with_queue(|q| q.set_avail_ring_address(None, Some(v))),
            0xa0 => self.with_queue(|q| q.set_used_ring_address(Some(v), None)),
            0xa4 => self.with_queue(|q| q.set_used_ring_address(None, Some(v))),
            _ => log::trace!("virtio-mmio: write {v:#x} to read-only or unknown {offset:#x}"),
        }
    }

    fn with_queue(&mut self, f: impl FnOnce(&mut Queue)) {
        if let Some(q) = self.selected_queue() {
            f(q);
        }
    }
}

/// Refuses a snapshot of another version or device, or whose queues or
/// features this backend does not have.
fn check_fits<B: Backend>(backend: &B, snap: &MmioSnapshot) -> Result<(), MmioError> {
    let kind = backend.kind();
    if snap.version != MmioSnapshot::VERSION {
        return Err(MmioError::Version {
            kind,
            found: snap.version,
            supported: MmioSnapshot::VERSION,
        });
    }
    if snap.device_type != backend.device_type() {
        return Err(MmioError::DeviceType {
            kind,
            saved: snap.device_type,
            device: backend.device_type(),
        });
    }
    if snap.queues.len() != backend.queue_sizes().len() {
        return Err(MmioError::QueueCount {
            kind,
            saved: snap.queues.len(),
            device: backend.queue_sizes().len(),
        });
    }
    let unoffered = snap.driver_features & !backend.features();
    if unoffered != 0 {
        return Err(MmioError::Features { kind, unoffered });
    }
    Ok(())
}

/// Queue `index` as `s` saved it, if it fits a queue of `max` entries (and,
/// on a running device, lies in `mem`).
fn restore_queue(
    kind: &'static str,
    index: usize,
    s: &QueueSnapshot,
    max: u16,
    mem: &Memory,
    active: bool,
) -> Result<Queue, MmioError> {
    if s.max_size != max {
        return Err(MmioError::QueueMaxSize {
            kind,
            index,
            saved: s.max_size,
            device: max,
        });
    }
    let state = QueueState {
        max_size: s.max_size,
        next_avail: s.next_avail,
        next_used: s.next_used,
        event_idx_enabled: s.event_idx,
        size: s.size,
        ready: s.ready,
        desc_table: s.desc_table,
        avail_ring: s.avail_ring,
        used_ring: s.used_ring,
    };
    let q = Queue::try_from(state).map_err(|source| MmioError::Queue {
        kind,
        index,
        source,
    })?;
    if active && q.ready() && !q.is_valid(mem) {
        return Err(MmioError::QueueOutsideMemory { kind, index });
    }
    Ok(q)
}

/// An error and its causes, `: `-separated, for a log line.
struct ErrorChain<'a>(&'a dyn std::error::Error);

impl std::fmt::Display for ErrorChain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)?;
        let mut cause = self.0.source();
        while let Some(c) = cause {
            write!(f, ": {c}")?;
            cause = c.source();
        }
        Ok(())
    }
}

/// What a device reports about itself (for `GET /v1/vm` and `status`).
#[derive(Debug, Clone)]
pub struct DeviceReport {
    /// "block" or "net".
    pub kind: &'static str,
    /// What it is attached to.
    pub attached: String,
    /// Whether the guest driver started it.
    pub active: bool,
    /// Its counters.
    pub counters: Vec<(&'static str, u64)>,
}

/// What the VMM does with a device, whatever its backend: report on it,
/// snapshot it, let go of its host resources and take them back. (A device
/// is restored by building it from its snapshot: [`MmioDevice::restore`].)
pub trait Inspect: Send {
    /// Its report.
    fn report(&self) -> DeviceReport;
    /// Its transport and backend state.
    fn snapshot(&self) -> MmioSnapshot;
    /// See [`Backend::release`].
    fn release(&mut self) -> Result<(), BackendError>;
    /// See [`Backend::reclaim`].
    fn reclaim(&mut self) -> Result<(), BackendError>;
    /// A new descriptor of [`Backend::image`], if the device has one.
    fn image(&self) -> Option<std::io::Result<std::fs::File>>;
    /// See [`MmioDevice::freeze`].
    fn freeze(&mut self);
    /// See [`MmioDevice::thaw`].
    fn thaw(&mut self);
}

impl<B: Backend> Inspect for MmioDevice<B> {
    fn snapshot(&self) -> MmioSnapshot {
        MmioDevice::snapshot(self)
    }
    fn release(&mut self) -> Result<(), BackendError> {
        self.backend.release()
    }
    fn reclaim(&mut self) -> Result<(), BackendError> {
        self.backend.reclaim()
    }
    fn image(&self) -> Option<std::io::Result<std::fs::File>> {
        self.backend.image().map(std::fs::File::try_clone)
    }
    fn freeze(&mut self) {
        MmioDevice::freeze(self)
    }
    fn thaw(&mut self) {
        MmioDevice::thaw(self)
    }
    fn report(&self) -> DeviceReport {
        DeviceReport {
            kind: self.backend.kind(),
            attached: self.backend.describe(),
            active: self.active,
            counters: self.backend.counters(),
        }
    }
}

impl<B: Backend> BusDevice for MmioDevice<B> {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_START {
            let config = self.backend.config();
            let start = (offset - CONFIG_START) as usize;
            for (i, b) in data.iter_mut().enumerate() {
                *b = start
                    .checked_add(i)
                    .and_then(|at| config.get(at))
                    .copied()
                    .unwrap_or(0);
            }
            return;
        }
        if data.len() != 4 || offset % 4 != 0 {
            data.fill(0);
            return;
        }
        data.copy_from_slice(&self.read_register(offset).to_le_bytes());
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG_START {
            if let Ok(at) = usize::try_from(offset - CONFIG_START) {
                self.backend.write_config(at, data);
            }
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            return;
        };
        if offset % 4 != 0 {
            return;
        }
        self.write_register(offset, u32::from_le_bytes(bytes));
    }
}

#[cfg(test)]
#[path = "mmio_tests.rs"]
mod tests;
