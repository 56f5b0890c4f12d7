//! nestvm's emulated devices and the bus that routes guest accesses to them.
//!
//! Devices see byte offsets and byte slices, never a KVM type; they raise
//! interrupts and tell the VMM about resets through [`EventTrigger`]s (an
//! eventfd that the VMM wires to an irqfd or to its event loop).
//!
//! - [`bus`]: address ranges to devices, for port I/O and for MMIO.
//! - [`serial`]: a 16550 UART (vm-superio) for the console.
//! - [`i8042`]: the keyboard controller's CPU reset line (vm-superio).
//! - [`acpi_pm`]: the ACPI sleep-control and reset registers.

pub mod acpi_pm;
pub mod bus;
pub mod i8042;
pub mod serial;

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// An eventfd that devices signal: an interrupt line or a VMM event.
#[derive(Debug)]
pub struct EventTrigger(pub EventFd);

impl EventTrigger {
    /// A new non-blocking trigger.
    pub fn new() -> std::io::Result<Self> {
        Ok(Self(EventFd::new(EFD_NONBLOCK)?))
    }

    /// A second handle on the same eventfd.
    pub fn try_clone(&self) -> std::io::Result<Self> {
        Ok(Self(self.0.try_clone()?))
    }
}

impl vm_superio::Trigger for EventTrigger {
    type E = std::io::Error;

    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}
