//! nestvm's virtio devices, which an unmodified Linux guest finds through
//! ACPI (`LNRO0005` devices in the DSDT) and drives with its own virtio
//! drivers.
//!
//! - [`mmio`]: the virtio-mmio (version 2) transport: registers, feature
//!   negotiation, queue set-up, the interrupt status. Generic over a
//!   [`Backend`], the device proper.
//! - [`block`]: virtio-blk on a raw image file.
//! - [`net`]: virtio-net on a TAP (through [`net::FrameIo`]), with the
//!   MAC-spoofing policy; [`net_stream`] carries its frames over passt's
//!   length-prefixed stream instead.
//! - [`balloon`]: virtio-balloon, dynamic memory and runtime resize.
//! - [`vsock`]: virtio-vsock, a host-to-guest channel over Unix sockets
//!   ([`vsock_host`]; its packets: [`vsock_packet`]).
//! - [`state`]: the typed, versioned state a backend carries in snapshots
//!   ([`state::DeviceState`], one variant per device that has one).
//! - [`worker`]: the event-loop side: queue notifications (ioeventfds) and
//!   backend file descriptors, served off the vCPU threads.
//!
//! Each turn on a queue is bounded ([`drain_queue`] serves at most
//! [`DRAIN_BUDGET`] chains): when work is left, the transport signals the
//! queue's own notification eventfd, so the rest is served on the loop's
//! next turn, after whatever else is ready, with no guest notification.
//!
//! Everything read from guest memory or a register is untrusted: a malformed
//! request fails that request (with the device's error status where the
//! protocol has one), never the VMM.

pub mod balloon;
pub mod block;
pub mod driver;
pub mod mmio;
pub mod net;
pub mod net_stream;
pub mod state;
pub mod vsock;
pub mod vsock_host;
pub mod vsock_packet;
pub mod worker;

use state::{DeviceState, StateError};

pub use virtio_queue::Queue;
use virtio_queue::{DescriptorChain, QueueT};
/// Guest memory as devices see it: every write through it (device DMA,
/// used-ring updates) marks its page in a dirty bitmap, which live
/// migration reads because KVM's dirty log only sees the vCPUs' writes.
pub type Memory = vm_memory::GuestMemoryMmap<vm_memory::bitmap::AtomicBitmap>;
/// The part of a guest memory slice that marks dirty pages.
pub type DirtySlice<'a> = vm_memory::bitmap::BS<'a, vm_memory::bitmap::AtomicBitmap>;

/// The device's feature bits common to all devices.
pub mod features {
    /// The device follows virtio 1.x (required by the mmio version 2 transport).
    pub const VERSION_1: u64 = 1 << 32;
    /// Used/available event indices, to cut notifications.
    pub const RING_EVENT_IDX: u64 = 1 << 29;
}

/// A descriptor chain borrowed from guest memory.
pub type Chain<'a> = DescriptorChain<&'a Memory>;

/// Errors of a backend: starting it, giving back or taking back what it
/// holds on the host, taking back its saved state.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// A disk.
    #[error(transparent)]
    Block(#[from] block::BlockError),
    /// A network adapter.
    #[error(transparent)]
    Net(#[from] net::NetError),
    /// A balloon.
    #[error(transparent)]
    Balloon(#[from] balloon::BalloonError),
    /// A saved state that does not fit the device.
    #[error(transparent)]
    State(#[from] StateError),
}

/// A virtio device behind a transport.
pub trait Backend: Send {
    /// The virtio device ID (2 = block, 1 = network).
    fn device_type(&self) -> u32;
    /// A short label for reports ("block", "net").
    fn kind(&self) -> &'static str;
    /// What it is attached to (image path, TAP name), for reports.
    fn describe(&self) -> String;
    /// The feature bits offered, [`features::VERSION_1`] included.
    fn features(&self) -> u64;
    /// The maximum size of each of its queues.
    fn queue_sizes(&self) -> &[u16];
    /// Its configuration space.
    fn config(&self) -> Vec<u8>;
    /// The driver wrote `data` at `offset` of the configuration space
    /// (ignored by devices whose configuration is read-only).
    fn write_config(&mut self, _offset: usize, _data: &[u8]) {}
    /// Whether its configuration changed since last asked (the transport
    /// then tells the driver with a configuration interrupt).
    fn config_changed(&mut self) -> bool {
        false
    }
    /// State of its own that snapshots and migration must carry.
    fn save_state(&self) -> Option<DeviceState> {
        None
    }
    /// Takes back what [`Backend::save_state`] gave (`None`: nothing was
    /// saved). A device without state of its own refuses any state.
    fn restore_state(&mut self, state: Option<&DeviceState>) -> Result<(), BackendError> {
        match state {
            None => Ok(()),
            Some(s) => Err(StateError::WrongDevice {
                device: self.kind(),
                found: s.kind(),
            }
            .into()),
        }
    }
    /// The driver finished set-up with `features` acknowledged.
    fn activate(&mut self, features: u64) -> Result<(), BackendError>;
    /// The driver reset the device.
    fn reset(&mut self) {}
    /// Lets another process take what it holds exclusively on the host (a
    /// disk image's lock), for a migration to a VMM on this same host.
    fn release(&mut self) -> Result<(), BackendError> {
        Ok(())
    }
    /// Takes back what [`Backend::release`] let go (a failed migration).
    fn reclaim(&mut self) -> Result<(), BackendError> {
        Ok(())
    }
    /// The host file behind the device (a disk's image), for a checkpoint
    /// to copy: the VMM may no longer be able to open it by name.
    fn image(&self) -> Option<&std::fs::File> {
        None
    }
    /// The guest notified `queue` (or the device's last turn on it left
    /// work, [`Served::more`]): serves a bounded amount of it.
    fn process_queue(&mut self, queue: usize, queues: &mut [Queue], mem: &Memory) -> Served;
    /// A descriptor the event loop should watch for this device (a TAP), if any.
    fn event_fd(&self) -> Option<std::os::fd::RawFd> {
        None
    }
    /// That descriptor became ready. `more` in the answer means the work
    /// was cut at its budget: the transport kicks [`Backend::event_queue`]
    /// so the rest is done on the loop's next turn.
    fn process_event(&mut self, _queues: &mut [Queue], _mem: &Memory) -> Served {
        Served::NOTHING
    }
    /// The queue whose serving carries on the work of
    /// [`Backend::process_event`] (a network adapter's receive queue).
    fn event_queue(&self) -> Option<usize> {
        None
    }
    /// Counters for reports: (name, value).
    fn counters(&self) -> Vec<(&'static str, u64)> {
        Vec::new()
    }
}

/// Chains one [`drain_queue`] serves at most: a guest that keeps refilling a
/// queue gets this many served per event-loop turn, then the other devices
/// and the VMM's own work get their turn before its queue does again.
pub const DRAIN_BUDGET: usize = 64;

/// What serving a queue did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[must_use]
pub struct Served {
    /// The guest asked to be told about the used buffers (interrupt it).
    pub notify: bool,
    /// The budget ran out with chains still available: serve the queue
    /// again soon, without waiting for the guest to notify it (which, its
    /// notifications being off meanwhile, it may never do).
    pub more: bool,
}

impl Served {
    /// Nothing to tell and nothing left.
    pub const NOTHING: Served = Served {
        notify: false,
        more: false,
    };
}

/// Serves the available chains of `queue` with `handle`, which returns the
/// number of bytes it wrote into the chain: [`DRAIN_BUDGET`] of them at
/// most (see [`drain_queue_budget`]).
pub fn drain_queue<F>(queue: &mut Queue, mem: &Memory, handle: F) -> Served
where
    F: FnMut(Chain<'_>) -> u32,
{
    drain_queue_budget(queue, mem, DRAIN_BUDGET, handle)
}

/// Serves at most `budget` available chains of `queue` with `handle`. With
/// the ring emptied, re-enables notifications and re-checks the ring (so no
/// request is left behind); with the budget spent and chains left, leaves
/// notifications off and says so in [`Served::more`], for the caller to
/// come back to the queue on its next turn.
pub fn drain_queue_budget<F>(
    queue: &mut Queue,
    mem: &Memory,
    budget: usize,
    mut handle: F,
) -> Served
where
    F: FnMut(Chain<'_>) -> u32,
{
    let mut used = false;
    let mut served = 0;
    let mut more = false;
    loop {
        if queue.disable_notification(mem).is_err() {
            break;
        }
        let before = served;
        while served < budget {
            let Some(chain) = queue.pop_descriptor_chain(mem) else {
                break;
            };
            let head = chain.head_index();
            let len = handle(chain);
            if queue.add_used(mem, head, len).is_err() {
                log::debug!("virtio: cannot add used descriptor {head}");
                return Served {
                    notify: used,
                    more: false,
                };
            }
            used = true;
            served += 1;
        }
        if served >= budget && has_available(queue, mem) {
            more = true;
            break;
        }
        // More available but nothing could be popped means a broken ring
        // (an available index the queue refuses): stop rather than spin.
        match queue.enable_notification(mem) {
            Ok(true) if served > before && served < budget => continue,
            Ok(true) if served > before => {
                // Refilled while notifications were being turned back on.
                more = true;
                break;
            }
            _ => break,
        }
    }
    Served {
        notify: used && queue.needs_notification(mem).unwrap_or(true),
        more,
    }
}

/// Whether the driver made chains available that were not popped yet.
pub(crate) fn has_available(queue: &Queue, mem: &Memory) -> bool {
    queue
        .avail_idx(mem, std::sync::atomic::Ordering::Acquire)
        .is_ok_and(|idx| idx.0 != queue.next_avail())
}

#[cfg(test)]
pub(crate) mod testing;

#[cfg(test)]
#[path = "drain_tests.rs"]
mod drain_tests;

#[cfg(test)]
#[path = "fairness_tests.rs"]
mod fairness_tests;
