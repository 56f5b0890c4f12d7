//! Attaches a VM's disks, network adapters, balloon and vsock device: each becomes a virtio-mmio
//! device in its own window with its own interrupt line (both declared to the
//! guest in the DSDT), its queue-notify register wired to ioeventfds and its
//! interrupt to an irqfd, and an event-loop worker that does its I/O. A
//! restored VM's devices are built from their saved transport and backend
//! state (checked like guest input) instead of fresh.

use std::sync::{Arc, Mutex};

use event_manager::MutEventSubscriber;
use nestvm_arch::acpi::VirtioSlot;
use nestvm_arch::layout;
use nestvm_devices::bus::Bus;
use nestvm_kvm::tap::{offload, Tap};
use nestvm_virtio::balloon;
use nestvm_virtio::block::Block;
use nestvm_virtio::mmio::{Inspect, MmioDevice, MmioSnapshot, QUEUE_NOTIFY};
use nestvm_virtio::net::{derived_mac, FrameIo, Net};
use nestvm_virtio::worker::Worker;
use nestvm_virtio::Backend;
use nestvm_virtio::Memory;

use crate::adapters::parse_mac;
use crate::config::VmConfig;

/// Errors attaching a VM's virtio devices.
#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    /// A disk image.
    #[error(transparent)]
    Block(#[from] nestvm_virtio::block::BlockError),
    /// A TAP device.
    #[error(transparent)]
    Tap(#[from] nestvm_kvm::tap::TapError),
    /// passt, for a user-mode adapter.
    #[error(transparent)]
    Passt(#[from] crate::passt::PasstError),
    /// A virtio transport (or its saved state).
    #[error(transparent)]
    Virtio(#[from] nestvm_virtio::mmio::MmioError),
    /// Wiring an interrupt or a queue notification in KVM.
    #[error(transparent)]
    Kvm(#[from] nestvm_kvm::VmError),
    /// Two devices claim the same addresses.
    #[error("device layout is inconsistent")]
    Bus(#[from] nestvm_devices::bus::BusError),
    /// An eventfd for a device.
    #[error("cannot create an eventfd for {0}")]
    EventFd(&'static str, #[source] std::io::Error),
    /// A setting that slipped past validation.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// The vsock device's host socket.
    #[error(transparent)]
    Vsock(#[from] nestvm_virtio::vsock::VsockError),
    /// A saved VM lists other devices than its definition.
    #[error("the saved state has {saved} devices, its definition {defined}")]
    SavedDevices {
        /// Devices in the saved state.
        saved: usize,
        /// Devices the definition has.
        defined: usize,
    },
}

impl AttachError {
    /// True for errors the user fixes in the definition (a missing image,
    /// a TAP that does not exist).
    pub fn is_usage(&self) -> bool {
        match self {
            Self::Block(_) | Self::Config(_) | Self::Vsock(_) => true,
            Self::Passt(p) => matches!(p, crate::passt::PasstError::Missing(_)),
            Self::Tap(t) => !matches!(t, nestvm_kvm::tap::TapError::Configure { .. }),
            _ => false,
        }
    }
}

/// The VM's virtio devices, for the run loop.
#[derive(Default)]
pub struct VirtioDevices {
    /// Event-loop workers, one per device.
    pub(crate) workers: Vec<Box<dyn MutEventSubscriber + Send>>,
    /// Handles for reports.
    pub(crate) inspect: Vec<Arc<Mutex<dyn Inspect>>>,
    /// The balloon's controls, if the VM has one.
    pub(crate) balloon: Option<balloon::Control>,
    /// The passt process of each user-mode adapter, prepared, started
    /// when the VM begins to run.
    pub(crate) passt: Vec<crate::passt::Process>,
}

/// The windows and interrupt lines of `config`'s devices: disks first, then
/// adapters, in the order given, then the balloon, then the vsock device.
pub fn slots(config: &VmConfig) -> Vec<VirtioSlot> {
    (0..device_count(config))
        .filter_map(layout::virtio_slot)
        .map(|(base, gsi)| VirtioSlot {
            base,
            len: layout::VIRTIO_MMIO_LEN,
            gsi,
        })
        .collect()
}

/// How many virtio devices `config` has.
pub fn device_count(config: &VmConfig) -> usize {
    config.device_count()
}

/// A TAP as the network device's frame mover.
struct TapIo(Tap);

impl FrameIo for TapIo {
    fn read_frame(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.0.read_frame(buf)
    }
    fn write_frame(&mut self, frame: &[u8]) -> std::io::Result<usize> {
        self.0.write_frame(frame)
    }
    fn set_offload(&mut self, csum: bool, tso4: bool, tso6: bool) -> std::io::Result<()> {
        let mut f = 0;
        for (on, bit) in [
            (csum, offload::CSUM),
            (tso4, offload::TSO4),
            (tso6, offload::TSO6),
        ] {
            if on {
                f |= bit;
            }
        }
        self.0.set_offload(f).map_err(std::io::Error::other)
    }
    fn raw_fd(&self) -> std::os::fd::RawFd {
        std::os::fd::AsRawFd::as_raw_fd(&self.0)
    }
    fn name(&self) -> String {
        self.0.name().to_owned()
    }
}

/// Opens every disk image and TAP of `config` (and prepares passt for each
/// user-mode adapter) and puts the devices on `mmio`:
/// new ones, or, with `saved` (one per device, in device order), the devices
/// those snapshots describe.
pub fn attach(
    config: &VmConfig,
    vm: &nestvm_kvm::Vm,
    mem: &Memory,
    mmio: &mut Bus,
    saved: Option<&[MmioSnapshot]>,
) -> Result<VirtioDevices, AttachError> {
    if let Some(s) = saved.filter(|s| s.len() != device_count(config)) {
        return Err(AttachError::SavedDevices {
            saved: s.len(),
            defined: device_count(config),
        });
    }
    let mut out = VirtioDevices::default();
    let slots = slots(config);
    let mut next = slots.iter().enumerate().map(|(i, slot)| Attach {
        slot,
        saved: saved.and_then(|s| s.get(i)),
    });
    for (i, disk) in config.disks.iter().enumerate() {
        // The guest sees the definition's serial, never the image's name.
        let block = Block::open(&disk.path, disk.readonly, &disk.serial_or_default(i))?;
        let place = next.next().expect("validated device count");
        add(block, place, vm, mem, mmio, &mut out)?;
    }
    for (i, net) in config.nets.iter().enumerate() {
        let name = match net.user {
            true => format!("user{i}"),
            false => net.tap.clone(),
        };
        let mac = match &net.mac {
            Some(m) => parse_mac(m).map_err(crate::config::ConfigError::from)?,
            None => derived_mac(&name),
        };
        let io: Box<dyn FrameIo> = match net.user {
            true => {
                let passt = crate::passt::prepare(net, name)?;
                out.passt.push(passt.process);
                Box::new(passt.io)
            }
            false => Box::new(TapIo(Tap::open(&net.tap)?)),
        };
        let dev = Net::new(io, mac, net.mac_spoofing);
        let place = next.next().expect("validated device count");
        add(dev, place, vm, mem, mmio, &mut out)?;
    }
    if let Some(b) = &config.balloon {
        let min = b.min_bytes().map_err(crate::config::ConfigError::from)?;
        let freed = mem.clone();
        // Pages the guest gives back are freed on the host.
        let discard: balloon::Discard = Box::new(move |addr, len| {
            nestvm_kvm::memory::discard(&freed, addr, len).map_err(std::io::Error::other)
        });
        let start = b.start_bytes().map_err(crate::config::ConfigError::from)?;
        let range = balloon::Range {
            max: config.memory,
            min,
            start: start.unwrap_or(config.memory),
        };
        let (dev, control) = balloon::Balloon::new(range, b.dynamic, discard)
            .map_err(|e| AttachError::EventFd("the balloon's timer", e))?;
        let place = next.next().expect("validated device count");
        add(dev, place, vm, mem, mmio, &mut out)?;
        out.balloon = Some(control);
    }
    if let Some(v) = &config.vsock {
        let dev = nestvm_virtio::vsock::Vsock::new(u64::from(v.cid), &v.socket_path())?;
        let place = next.next().expect("validated device count");
        add(dev, place, vm, mem, mmio, &mut out)?;
    }
    Ok(out)
}

/// Where a device goes, and the state it is restored to, if any.
struct Attach<'a> {
    slot: &'a VirtioSlot,
    saved: Option<&'a MmioSnapshot>,
}

fn add<B: Backend + 'static>(
    backend: B,
    Attach { slot, saved }: Attach<'_>,
    vm: &nestvm_kvm::Vm,
    mem: &Memory,
    mmio: &mut Bus,
    out: &mut VirtioDevices,
) -> Result<(), AttachError> {
    let irq = nestvm_devices::EventTrigger::new()
        .map_err(|e| AttachError::EventFd("a virtio interrupt", e))?;
    vm.register_irqfd(&irq.0, slot.gsi)?;
    let dev = match saved {
        Some(snap) => MmioDevice::restore(backend, mem.clone(), irq, snap)?,
        None => MmioDevice::new(backend, mem.clone(), irq)?,
    };
    for (i, n) in dev.notify_events().iter().enumerate() {
        vm.register_ioeventfd(&n.0, slot.base + QUEUE_NOTIFY, i as u32)?;
    }
    let dev = Arc::new(Mutex::new(dev));
    mmio.insert(dev.clone(), slot.base, slot.len)?;
    let worker = Worker::new(dev.clone()).map_err(|e| AttachError::EventFd("a virtio queue", e))?;
    out.workers.push(Box::new(worker));
    out.inspect.push(dev);
    Ok(())
}
