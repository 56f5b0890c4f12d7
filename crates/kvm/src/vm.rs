//! A KVM VM: memory slots, the in-kernel interrupt controllers and timers,
//! irqfds and ioeventfds.

use kvm_bindings::{
    kvm_clock_data, kvm_irqchip, kvm_pit_config, kvm_pit_state2, kvm_userspace_memory_region,
    KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_PIT_SPEAKER_DUMMY,
};
use std::any::Any;
use std::sync::{Arc, Mutex, MutexGuard};

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
    /// The vCPU's `kvm_run` area could not be mapped for its kicker.
    #[error("cannot map the kvm_run area of vCPU {id}")]
    MapRun {
        /// The vCPU index.
        id: u64,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Guest memory was given twice, after the irqchip, or dirty logging
    /// asked before any.
    #[error("guest memory {0}")]
    Memory(&'static str),
}

/// The memory slots KVM was given, and the guest memory behind them, kept
/// alive by the `Vm` and every `Vcpu` (either keeps the VM alive in the
/// kernel, so either may be the last to go).
#[derive(Clone, Default)]
pub(crate) struct MappedMemory(Arc<Mutex<Option<Mapped>>>);

struct Mapped {
    slots: Vec<kvm_userspace_memory_region>,
    _keep: Box<dyn Any + Send + Sync>,
}

impl MappedMemory {
    fn lock(&self) -> MutexGuard<'_, Option<Mapped>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
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
    memory: MappedMemory,
}

impl Vm {
    pub(crate) fn new(fd: VmFd) -> Self {
        Self {
            fd,
            memory: MappedMemory::default(),
        }
    }

    /// Hands every region of `mem` to KVM as a memory slot, in order, once.
    /// The VM keeps (a handle to) `mem`, and so does every vCPU: the memory
    /// KVM writes stays mapped for as long as the VM exists in the kernel.
    pub fn map_memory<B>(&self, mem: &GuestMemoryMmap<B>) -> Result<(), VmError>
    where
        B: Bitmap + Send + Sync + 'static,
    {
        let mut slots = Vec::new();
        for (slot, region) in mem.iter().enumerate() {
            let host = mem
                .get_host_address(region.start_addr())
                .map_err(|_| VmError::Memory("has a region outside itself"))?;
            slots.push(kvm_userspace_memory_region {
                slot: slot as u32,
                flags: 0,
                guest_phys_addr: region.start_addr().raw_value(),
                memory_size: region.len(),
                userspace_addr: host as u64,
            });
        }
        let mut mapped = self.memory.lock();
        if mapped.is_some() {
            return Err(VmError::Memory("was already given to this VM"));
        }
        // Kept before KVM sees any slot, so a failure half-way leaves no
        // slot pointing at memory that could go.
        let m = mapped.insert(Mapped {
            slots,
            _keep: Box::new(mem.clone()),
        });
        self.set_slots(&m.slots, 0)
    }

    /// Turns KVM's dirty-page log on or off for every slot of the memory
    /// given to [`Vm::map_memory`]. While it is on, [`Vm::dirty_pages`]
    /// returns the pages the vCPUs wrote.
    pub fn log_dirty_pages(&self, on: bool) -> Result<(), VmError> {
        let flags = if on {
            kvm_bindings::KVM_MEM_LOG_DIRTY_PAGES
        } else {
            0
        };
        match self.memory.lock().as_ref() {
            Some(m) => self.set_slots(&m.slots, flags),
            None => Err(VmError::Memory("was never given to this VM")),
        }
    }

    /// The pages of slot `slot` (`size` bytes) written by vCPUs since the
    /// last call, one bit per page, and clears the log.
    pub fn dirty_pages(&self, slot: u32, size: u64) -> Result<Vec<u64>, VmError> {
        self.fd
            .get_dirty_log(slot, size as usize)
            .map_err(|source| VmError::DirtyLog { slot, source })
    }

    /// Gives KVM `slots` (those of the memory `self.memory` keeps) with `flags`.
    fn set_slots(&self, slots: &[kvm_userspace_memory_region], flags: u32) -> Result<(), VmError> {
        for s in slots {
            let desc = kvm_userspace_memory_region { flags, ..*s };
            // SAFETY: each slot describes a region of the guest memory that
            // `self.memory` holds a handle to, and which this VM and each of
            // its vCPUs keep mapped until the last of them is dropped, i.e.
            // for as long as KVM can use the slot; slots do not overlap, as
            // vm-memory refuses overlapping regions.
            unsafe { self.fd.set_user_memory_region(desc) }.map_err(|source| {
                VmError::MemorySlot {
                    slot: desc.slot,
                    guest_addr: desc.guest_phys_addr,
                    size: desc.memory_size,
                    source,
                }
            })?;
        }
        Ok(())
    }

    /// Sets up what x86 KVM needs before vCPUs: the TSS and identity-map
    /// pages, the in-kernel PIC + IOAPIC + LAPICs, and the PIT. Guest
    /// memory must be mapped first ([`Vm::map_memory`]): KVM makes a slot
    /// added once the in-kernel irqchip exists wait for a full SRCU grace
    /// period (about 5 ms, measured on every start and restore), one added
    /// before it costs well under a millisecond.
    pub fn setup_irqchip_and_pit(&self) -> Result<(), VmError> {
        if self.memory.lock().is_none() {
            return Err(VmError::Memory(
                "must be given to the VM before its interrupt controller is created",
            ));
        }
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
        Vcpu::new(fd, id as u32, self.fd.run_size(), self.memory.clone())
            .map_err(|source| VmError::MapRun { id, source })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestAddress;

    #[test]
    fn memory_is_given_once_before_the_irqchip_and_dirty_logging_needs_it() {
        if !std::path::Path::new(crate::hypervisor::KVM_PATH).exists() {
            eprintln!("SKIPPED memory_is_given_once_before_the_irqchip_and_dirty_logging_needs_it: no /dev/kvm");
            return;
        }
        let hv = crate::Hypervisor::open().unwrap();
        let vm = hv.create_vm().unwrap();
        assert!(matches!(vm.log_dirty_pages(true), Err(VmError::Memory(_))));
        let early = vm.setup_irqchip_and_pit().unwrap_err();
        assert!(
            early.to_string().contains("before its interrupt"),
            "{early}"
        );
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        vm.map_memory(&mem).unwrap();
        let again = vm.map_memory(&mem).unwrap_err();
        assert!(again.to_string().contains("already given"), "{again}");
        vm.setup_irqchip_and_pit().unwrap();
        vm.log_dirty_pages(true).unwrap();
        vm.log_dirty_pages(false).unwrap();
        // The VM holds the memory itself: dropping the caller's handle
        // leaves the slot's pages mapped.
        let host = mem.get_host_address(GuestAddress(0)).unwrap() as usize;
        drop(mem);
        let held = vm.memory.lock();
        assert_eq!(
            held.as_ref().unwrap().slots[0].userspace_addr as usize,
            host
        );
    }
}
