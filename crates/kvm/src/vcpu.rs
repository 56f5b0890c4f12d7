//! One KVM vCPU: its set-up calls, `KVM_RUN`, and the translation of exits
//! into calls on an [`ExitHandler`].

use std::fmt::Write as _;
use std::sync::Arc;

use kvm_bindings::{
    kvm_cpuid_entry2, kvm_fpu, kvm_lapic_state, kvm_msr_entry, kvm_regs, kvm_sregs, CpuId, Msrs,
};
use kvm_ioctls::{VcpuExit, VcpuFd};

use crate::kick::{ExitFlag, Kicker};
use crate::vm::MappedMemory;

/// Errors of per-vCPU KVM calls.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    /// A set-up ioctl failed.
    #[error("vCPU {id}: {call} failed")]
    Ioctl {
        /// The vCPU index.
        id: u32,
        /// The ioctl, e.g. `KVM_SET_CPUID2`.
        call: &'static str,
        /// The cause.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// KVM accepted fewer MSRs than we gave it.
    #[error(
        "vCPU {id}: KVM_SET_MSRS took {set} of {wanted} MSRs (first refused: {first_refused:#x})"
    )]
    PartialMsrs {
        /// The vCPU index.
        id: u32,
        /// How many KVM took.
        set: usize,
        /// How many we gave.
        wanted: usize,
        /// The index of the first MSR it refused.
        first_refused: u32,
    },
    /// The CPUID list is longer than KVM takes.
    #[error("vCPU {id}: CPUID table of {len} entries is too large")]
    CpuidTooLarge {
        /// The vCPU index.
        id: u32,
        /// The number of entries.
        len: usize,
    },
    /// `KVM_RUN` itself failed.
    #[error("vCPU {id}: KVM_RUN failed")]
    Run {
        /// The vCPU index.
        id: u32,
        /// The cause.
        #[source]
        source: kvm_ioctls::Error,
    },
}

/// Where a vCPU's port and MMIO accesses go: the device bus. Plain integers
/// and byte slices only, so devices stay free of KVM types.
pub trait ExitHandler {
    /// A guest `in` from `port`; fill `data`.
    fn pio_read(&self, port: u16, data: &mut [u8]);
    /// A guest `out` to `port`.
    fn pio_write(&self, port: u16, data: &[u8]);
    /// A guest load from unbacked physical address `addr`; fill `data`.
    fn mmio_read(&self, addr: u64, data: &mut [u8]);
    /// A guest store to unbacked physical address `addr`.
    fn mmio_write(&self, addr: u64, data: &[u8]);
}

/// What one `KVM_RUN` ended with, once port and MMIO exits were handled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunOutcome {
    /// An I/O exit was handled by the bus: run again.
    Handled,
    /// Another thread kicked this vCPU (signal or immediate exit).
    Interrupted,
    /// The guest executed `hlt` and KVM let userspace see it.
    Halted,
    /// The guest triple-faulted (or otherwise shut down the CPU).
    Shutdown,
    /// KVM reported a system event (reset, shutdown, crash) of this type.
    SystemEvent(u32),
    /// KVM could not emulate or enter the guest; the text says why.
    Failed(String),
}

/// A vCPU file plus its index.
pub struct Vcpu {
    fd: VcpuFd,
    id: u32,
    /// `immediate_exit`, shared with this vCPU's [`Kicker`]s.
    exit: Arc<ExitFlag>,
    /// The guest memory KVM maps for this VM: it outlives the vCPU, which
    /// keeps the VM alive in the kernel after the `Vm` itself is dropped.
    _memory: MappedMemory,
}

impl Vcpu {
    pub(crate) fn new(
        fd: VcpuFd,
        id: u32,
        run_size: usize,
        memory: MappedMemory,
    ) -> std::io::Result<Self> {
        let exit = Arc::new(ExitFlag::map(&fd, run_size)?);
        Ok(Self {
            fd,
            id,
            exit,
            _memory: memory,
        })
    }

    /// What another thread holds to pull this vCPU out of `KVM_RUN`.
    pub fn kicker(&self) -> Kicker {
        Kicker::new(self.exit.clone())
    }

    /// Tells KVM the guest was paused (KVM_KVMCLOCK_CTRL), so that its
    /// kvmclock-based watchdogs do not take the pause for a soft lockup.
    /// Returns whether KVM took it: a guest that has not enabled kvmclock
    /// (EINVAL) has no such watchdog to calm.
    pub fn note_paused(&self) -> Result<bool, VcpuError> {
        match self.fd.kvmclock_ctrl() {
            Ok(()) => Ok(true),
            Err(e) if e.errno() == libc::EINVAL => Ok(false),
            Err(source) => Err(VcpuError::Ioctl {
                id: self.id,
                call: "KVM_KVMCLOCK_CTRL",
                source,
            }),
        }
    }

    /// This vCPU's index (also its APIC ID).
    pub fn id(&self) -> u32 {
        self.id
    }

    pub(crate) fn fd(&self) -> &VcpuFd {
        &self.fd
    }

    pub(crate) fn ioctl_err(
        &self,
        call: &'static str,
    ) -> impl FnOnce(kvm_ioctls::Error) -> VcpuError {
        let id = self.id;
        move |source| VcpuError::Ioctl { id, call, source }
    }

    /// Installs the guest-visible CPUID table.
    pub fn set_cpuid(&self, entries: &[kvm_cpuid_entry2]) -> Result<(), VcpuError> {
        let cpuid = CpuId::from_entries(entries).map_err(|_| VcpuError::CpuidTooLarge {
            id: self.id,
            len: entries.len(),
        })?;
        self.fd
            .set_cpuid2(&cpuid)
            .map_err(self.ioctl_err("KVM_SET_CPUID2"))
    }

    /// Writes MSRs; every one must be accepted.
    pub fn set_msrs(&self, entries: &[kvm_msr_entry]) -> Result<(), VcpuError> {
        let msrs = Msrs::from_entries(entries).map_err(|_| VcpuError::PartialMsrs {
            id: self.id,
            set: 0,
            wanted: entries.len(),
            first_refused: entries.first().map_or(0, |e| e.index),
        })?;
        let set = self
            .fd
            .set_msrs(&msrs)
            .map_err(self.ioctl_err("KVM_SET_MSRS"))?;
        if set != entries.len() {
            return Err(VcpuError::PartialMsrs {
                id: self.id,
                set,
                wanted: entries.len(),
                first_refused: entries[set].index,
            });
        }
        Ok(())
    }

    /// Reads the general-purpose registers.
    pub fn regs(&self) -> Result<kvm_regs, VcpuError> {
        self.fd.get_regs().map_err(self.ioctl_err("KVM_GET_REGS"))
    }

    /// Writes the general-purpose registers.
    pub fn set_regs(&self, regs: &kvm_regs) -> Result<(), VcpuError> {
        self.fd
            .set_regs(regs)
            .map_err(self.ioctl_err("KVM_SET_REGS"))
    }

    /// Reads the special registers.
    pub fn sregs(&self) -> Result<kvm_sregs, VcpuError> {
        self.fd.get_sregs().map_err(self.ioctl_err("KVM_GET_SREGS"))
    }

    /// Writes the special registers.
    pub fn set_sregs(&self, sregs: &kvm_sregs) -> Result<(), VcpuError> {
        self.fd
            .set_sregs(sregs)
            .map_err(self.ioctl_err("KVM_SET_SREGS"))
    }

    /// Writes the FPU state.
    pub fn set_fpu(&self, fpu: &kvm_fpu) -> Result<(), VcpuError> {
        self.fd.set_fpu(fpu).map_err(self.ioctl_err("KVM_SET_FPU"))
    }

    /// Reads the local APIC registers.
    pub fn lapic(&self) -> Result<kvm_lapic_state, VcpuError> {
        self.fd.get_lapic().map_err(self.ioctl_err("KVM_GET_LAPIC"))
    }

    /// Writes the local APIC registers.
    pub fn set_lapic(&self, lapic: &kvm_lapic_state) -> Result<(), VcpuError> {
        self.fd
            .set_lapic(lapic)
            .map_err(self.ioctl_err("KVM_SET_LAPIC"))
    }

    /// The TSC frequency KVM gives this vCPU, in kHz.
    pub fn tsc_khz(&self) -> Result<u32, VcpuError> {
        self.fd
            .get_tsc_khz()
            .map_err(self.ioctl_err("KVM_GET_TSC_KHZ"))
    }

    /// Runs the guest until an exit that is not a port or MMIO access the
    /// bus can serve, or until one such access has been served.
    pub fn run(&mut self, bus: &dyn ExitHandler) -> Result<RunOutcome, VcpuError> {
        let id = self.id;
        let run_ptr: *const kvm_bindings::kvm_run = self.fd.get_kvm_run();
        // String I/O (`rep outsb`) arrives as one exit of `count` elements;
        // the bus sees each element as its own access of `size` bytes.
        let io_size = || {
            // SAFETY: called only for KVM_EXIT_IO, where the kernel filled the
            // `io` member of the union; `run_ptr` points into the kvm_run
            // mapping, which outlives this call, and only the `io` header is
            // read while the data slice (elsewhere in the page) is borrowed.
            let size = unsafe { (*run_ptr).__bindgen_anon_1.io.size };
            usize::from(size).max(1)
        };
        let outcome = match self.fd.run() {
            Ok(VcpuExit::IoOut(port, data)) => {
                for element in data.chunks(io_size()) {
                    bus.pio_write(port, element);
                }
                RunOutcome::Handled
            }
            Ok(VcpuExit::IoIn(port, data)) => {
                let size = io_size();
                for element in data.chunks_mut(size) {
                    bus.pio_read(port, element);
                }
                RunOutcome::Handled
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                bus.mmio_read(addr, data);
                RunOutcome::Handled
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                bus.mmio_write(addr, data);
                RunOutcome::Handled
            }
            Ok(VcpuExit::Intr) => RunOutcome::Interrupted,
            Ok(VcpuExit::Hlt) => RunOutcome::Halted,
            Ok(VcpuExit::Shutdown) => RunOutcome::Shutdown,
            Ok(VcpuExit::SystemEvent(kind, _)) => RunOutcome::SystemEvent(kind),
            Ok(VcpuExit::InternalError) => {
                // SAFETY: the exit reason says the `internal` member of the
                // union is the one KVM filled in.
                let suberror = unsafe { self.fd.get_kvm_run().__bindgen_anon_1.internal.suberror };
                RunOutcome::Failed(format!("KVM internal error (suberror {suberror})"))
            }
            Ok(VcpuExit::FailEntry(reason, cpu)) => RunOutcome::Failed(format!(
                "VM entry failed (hardware reason {reason:#x}, cpu {cpu})"
            )),
            Ok(other) => RunOutcome::Failed(format!("unexpected exit {other:?}")),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                RunOutcome::Interrupted
            }
            Err(source) => return Err(VcpuError::Run { id, source }),
        };
        if outcome == RunOutcome::Interrupted {
            self.exit.set(0);
        }
        Ok(outcome)
    }

    /// Lets KVM finish a port or MMIO access whose data userspace already
    /// handled (KVM completes it — advancing RIP, loading the value read —
    /// only on the next KVM_RUN), without running the guest: a KVM_RUN with
    /// `immediate_exit` set. Call before saving a paused vCPU's state, or the
    /// saved registers would still point at the access, and a restored guest
    /// would do it twice.
    pub fn complete_pending_io(&mut self) -> Result<(), VcpuError> {
        self.exit.set(1);
        let result = self.fd.run().map(|_| ());
        self.exit.set(0);
        match result {
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => Ok(()),
            Ok(()) => Ok(()),
            Err(source) => Err(VcpuError::Run {
                id: self.id,
                source,
            }),
        }
    }

    /// A human-readable dump of the registers, for fatal errors.
    pub fn dump(&self) -> String {
        let mut out = String::new();
        match self.regs() {
            Ok(r) => {
                let _ = writeln!(
                    out,
                    "vCPU {}: rip={:#018x} rsp={:#018x} rflags={:#010x}\n  rax={:#018x} rbx={:#018x} rcx={:#018x} rdx={:#018x}\n  rsi={:#018x} rdi={:#018x} rbp={:#018x}",
                    self.id, r.rip, r.rsp, r.rflags, r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi, r.rbp
                );
            }
            Err(e) => {
                let _ = writeln!(out, "vCPU {}: registers unavailable: {e}", self.id);
            }
        }
        if let Ok(s) = self.sregs() {
            let _ = writeln!(
                out,
                "  cr0={:#x} cr2={:#x} cr3={:#x} cr4={:#x} efer={:#x} cs={:#x} (l={}) idt={:#x}/{:#x}",
                s.cr0, s.cr2, s.cr3, s.cr4, s.efer, s.cs.selector, s.cs.l, s.idt.base, s.idt.limit
            );
        }
        out
    }
}
