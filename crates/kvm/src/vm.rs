//! A KVM VM: memory slots, the in-kernel interrupt controllers and timers,
//! irqfds and ioeventfds.

use kvm_bindings::{
    kvm_clock_data, kvm_irqchip, kvm_pit_config, kvm_pit_state2, kvm_userspace_memory_region,
    KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::VmFd;
use serde::{Deserialize, Serialize};
use vm_memory::bitmap::Bitmap;
use vm_memory::{Address, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use crate::vcpu::Vcpu;

/// Address of the three pages KVM needs for the TSS on Intel hosts; it sits in
/// the 32-bit hole, above guest RAM and below the IOAPIC.
pub const TSS_ADDRESS: usize = 0xfffb_d000;
/// Address of the identity-map page KVM needs on Intel hosts (one page below the TSS).
pub const IDENTITY_MAP_ADDRESS: u64 = 0xfffb_c000;

/// Errors of VM-wide KVM calls.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// `KVM_SET_USER_MEMORY_REGION` failed.
    #[error("cannot give guest memory slot {slot} at {guest_addr:#x} ({size} bytes) to KVM")]
    MemorySlot {
        /// The slot number.
        slot: u32,
        /// Guest physical start.
        guest_addr: u64,
        /// Size in bytes.
        size: u64,
        /// The cause.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// `KVM_SET_TSS_ADDR` / identity map failed.
    #[error("cannot set the TSS / identity map address")]
    Tss(#[source] kvm_ioctls::Error),
    /// `KVM_CREATE_IRQCHIP` failed.
    #[error("cannot create the in-kernel interrupt controller (KVM_CREATE_IRQCHIP)")]
    Irqchip(#[source] kvm_ioctls::Error),
    /// `KVM_CREATE_PIT2` failed.
    #[error("cannot create the in-kernel PIT (KVM_CREATE_PIT2)")]
    Pit(#[source] kvm_ioctls::Error),
    /// `KVM_IRQFD` failed.
    #[error("cannot attach an eventfd to guest interrupt {gsi}")]
    Irqfd {
        /// The interrupt line.
        gsi: u32,
        /// The cause.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// `KVM_IOEVENTFD` failed.
    #[error("cannot attach an eventfd to guest writes at {addr:#x}")]
    Ioeventfd {
        /// The guest physical address.
        addr: u64,
        /// The cause.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// Reading or writing VM-wide state (irqchip, PIT, clock) failed.
    #[error("cannot {0} the VM's interrupt controller, timer or clock state")]
    State(&'static str, #[source] kvm_ioctls::Error),
    /// `KVM_GET_DIRTY_LOG` failed.
    #[error("cannot read KVM's dirty-page log of memory slot {slot}")]
    DirtyLog {
        /// The slot.
        slot: u32,
        /// The cause.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// `KVM_CREATE_VCPU` failed.
    #[error("cannot create vCPU {id}")]
    CreateVcpu {
        /// The vCPU index.
        id: u64,
        /// The cause.
        #[source]
        source: kvm_ioctls::Error,
    },
}

/// The VM-wide state KVM keeps: the PICs, the IOAPIC, the PIT and kvmclock.
#[derive(Debug, Serialize, Deserialize)]
pub struct VmState {
    /// The master 8259.
    pub pic_master: kvm_irqchip,
    /// The slave 8259.
    pub pic_slave: kvm_irqchip,
    /// The IOAPIC (redirection table and pin levels).
    pub ioapic: kvm_irqchip,
    /// The PIT's channels.
    pub pit: kvm_pit_state2,
    /// kvmclock.
    pub clock: kvm_clock_data,
}

/// A KVM VM handle.
pub struct Vm {
    fd: VmFd,
}

impl Vm {
    pub(crate) fn new(fd: VmFd) -> Self {
        Self { fd }
    }

    /// Hands every region of `mem` to KVM as a memory slot, in order.
    ///
    /// The caller must keep `mem` alive (and unmoved in the address space) for
    /// as long as this VM exists; nestvm does so by owning both in one `Vmm`
    /// that drops the VM's vCPUs first.
    pub fn map_memory<B: Bitmap>(&self, mem: &GuestMemoryMmap<B>) -> Result<(), VmError> {
        self.set_slots(mem, 0)
    }

    /// Turns KVM's dirty-page log on or off for every slot of `mem` (which
    /// must be the memory given to [`Vm::map_memory`]). While it is on,
    /// [`Vm::dirty_pages`] returns the pages the vCPUs wrote.
    pub fn log_dirty_pages<B: Bitmap>(
        &self,
        mem: &GuestMemoryMmap<B>,
        on: bool,
    ) -> Result<(), VmError> {
        let flags = if on {
            kvm_bindings::KVM_MEM_LOG_DIRTY_PAGES
        } else {
            0
        };
        self.set_slots(mem, flags)
    }

    /// The pages of slot `slot` (`size` bytes) written by vCPUs since the
    /// last call, one bit per page, and clears the log.
    pub fn dirty_pages(&self, slot: u32, size: u64) -> Result<Vec<u64>, VmError> {
        self.fd
            .get_dirty_log(slot, size as usize)
            .map_err(|source| VmError::DirtyLog { slot, source })
    }

    fn set_slots<B: Bitmap>(&self, mem: &GuestMemoryMmap<B>, flags: u32) -> Result<(), VmError> {
        for (slot, region) in mem.iter().enumerate() {
            let slot = slot as u32;
            let host = mem
                .get_host_address(region.start_addr())
                .expect("a region's own start address is inside guest memory");
            let desc = kvm_userspace_memory_region {
                slot,
                flags,
                guest_phys_addr: region.start_addr().raw_value(),
                memory_size: region.len(),
                userspace_addr: host as u64,
            };
            // SAFETY: `host` .. `host + len` is a live mapping owned by `mem`,
            // which the caller keeps alive for the VM's whole life (see the doc
            // comment above); slots do not overlap because vm-memory refuses
            // overlapping regions.
            unsafe { self.fd.set_user_memory_region(desc) }.map_err(|source| {
                VmError::MemorySlot {
                    slot,
                    guest_addr: desc.guest_phys_addr,
                    size: desc.memory_size,
                    source,
                }
            })?;
        }
        Ok(())
    }

    /// Sets up what x86 KVM needs before vCPUs: the TSS and identity-map
    /// pages, the in-kernel PIC + IOAPIC + LAPICs, and the PIT.
    pub fn setup_irqchip_and_pit(&self) -> Result<(), VmError> {
        self.fd
            .set_identity_map_address(IDENTITY_MAP_ADDRESS)
            .map_err(VmError::Tss)?;
        self.fd.set_tss_address(TSS_ADDRESS).map_err(VmError::Tss)?;
        self.fd.create_irq_chip().map_err(VmError::Irqchip)?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        self.fd.create_pit2(pit).map_err(VmError::Pit)?;
        Ok(())
    }

    /// Makes a write to `evt` raise guest interrupt line `gsi`.
    pub fn register_irqfd(&self, evt: &EventFd, gsi: u32) -> Result<(), VmError> {
        self.fd
            .register_irqfd(evt, gsi)
            .map_err(|source| VmError::Irqfd { gsi, source })
    }

    /// Makes a 4-byte guest MMIO write of `value` at `addr` signal `evt`
    /// inside KVM, without a vCPU exit to userspace.
    pub fn register_ioeventfd(&self, evt: &EventFd, addr: u64, value: u32) -> Result<(), VmError> {
        self.fd
            .register_ioevent(evt, &kvm_ioctls::IoEventAddress::Mmio(addr), value)
            .map_err(|source| VmError::Ioeventfd { addr, source })
    }

    /// Reads the VM-wide state. Call with every vCPU paused.
    pub fn save_state(&self) -> Result<VmState, VmError> {
        let chip = |id| -> Result<kvm_irqchip, VmError> {
            let mut c = kvm_irqchip {
                chip_id: id,
                ..Default::default()
            };
            self.fd
                .get_irqchip(&mut c)
                .map_err(|e| VmError::State("read", e))?;
            Ok(c)
        };
        Ok(VmState {
            pic_master: chip(KVM_IRQCHIP_PIC_MASTER)?,
            pic_slave: chip(KVM_IRQCHIP_PIC_SLAVE)?,
            ioapic: chip(KVM_IRQCHIP_IOAPIC)?,
            pit: self.fd.get_pit2().map_err(|e| VmError::State("read", e))?,
            clock: self.fd.get_clock().map_err(|e| VmError::State("read", e))?,
        })
    }

    /// Writes VM-wide state saved by [`Vm::save_state`] into this (new) VM.
    /// kvmclock continues from the saved value: the guest sees no time pass
    /// while it was saved, as if paused.
    pub fn restore_state(&self, state: &VmState) -> Result<(), VmError> {
        let err = |e| VmError::State("restore", e);
        for chip in [&state.pic_master, &state.pic_slave, &state.ioapic] {
            self.fd.set_irqchip(chip).map_err(err)?;
        }
        self.fd.set_pit2(&state.pit).map_err(err)?;
        let clock = kvm_clock_data {
            clock: state.clock.clock,
            ..Default::default()
        };
        self.fd.set_clock(&clock).map_err(err)?;
        Ok(())
    }

    /// Creates vCPU number `id`.
    pub fn create_vcpu(&self, id: u64) -> Result<Vcpu, VmError> {
        let fd = self
            .fd
            .create_vcpu(id)
            .map_err(|source| VmError::CreateVcpu { id, source })?;
        Ok(Vcpu::new(fd, id as u32))
    }
}
