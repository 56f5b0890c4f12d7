//! The VM's two buses — port I/O and MMIO — as the vCPU threads see them:
//! the exit handler that routes each guest access KVM hands back to the
//! device claiming its address. Devices stay behind
//! [`nestvm_devices::bus::Bus`] and never see a KVM type.

use nestvm_devices::bus::Bus;
use nestvm_kvm::ExitHandler;

/// Port I/O and MMIO buses; the vCPU exit handler.
#[derive(Default)]
pub struct Buses {
    /// Port I/O.
    pub pio: Bus,
    /// MMIO outside guest RAM and the in-kernel APICs.
    pub mmio: Bus,
}

impl ExitHandler for Buses {
    fn pio_read(&self, port: u16, data: &mut [u8]) {
        if !self.pio.read(u64::from(port), data) {
            log::trace!("unclaimed port read {port:#x}/{}", data.len());
        }
    }
    fn pio_write(&self, port: u16, data: &[u8]) {
        if !self.pio.write(u64::from(port), data) {
            log::trace!("unclaimed port write {port:#x} {data:x?}");
        }
    }
    fn mmio_read(&self, addr: u64, data: &mut [u8]) {
        if !self.mmio.read(addr, data) {
            log::debug!("unclaimed MMIO read {addr:#x}/{}", data.len());
        }
    }
    fn mmio_write(&self, addr: u64, data: &[u8]) {
        if !self.mmio.write(addr, data) {
            log::debug!("unclaimed MMIO write {addr:#x} {data:x?}");
        }
    }
}
