//! Pulling a vCPU thread out of `KVM_RUN` from another thread.
//!
//! A [`Kicker`] owns a mapping of its own of the vCPU's `kvm_run` page.
//! [`Kicker::kick`] sets `immediate_exit` through it — so a `KVM_RUN` about
//! to start returns at once — and then sends the vCPU thread a real-time
//! signal, whose empty handler makes a `KVM_RUN` already under way return
//! with EINTR. So no kick is lost, whatever the timing, and no pointer is
//! handed between threads: every mapping is owned by whoever writes through
//! it, and lives as long as they do (a panic on any thread leaves nothing
//! dangling). The vCPU clears the flag through the same shared mapping once
//! it has seen the kick.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Once};
use std::thread::JoinHandle;

use kvm_ioctls::VcpuFd;
use vm_memory::mmap::MmapRegion;
use vm_memory::{Bytes, FileOffset, VolatileMemory};
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

/// The signal used to kick vCPU threads.
pub fn kick_signal() -> i32 {
    SIGRTMIN()
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // Nothing to do: being delivered is what interrupts KVM_RUN.
}

/// Installs the kick signal handler once per process.
pub fn install() -> io::Result<()> {
    static ONCE: Once = Once::new();
    let mut result = Ok(());
    ONCE.call_once(|| {
        result = register_signal_handler(kick_signal(), on_kick)
            .map_err(|e| io::Error::from_raw_os_error(e.errno()));
    });
    result
}

/// A vCPU's `kvm_run.immediate_exit` byte, through a mapping owned here.
#[derive(Debug)]
pub(crate) struct ExitFlag {
    run: MmapRegion<()>,
}

const IMMEDIATE_EXIT: usize = std::mem::offset_of!(kvm_bindings::kvm_run, immediate_exit);

impl ExitFlag {
    /// Maps the `kvm_run` area (`size` bytes) of `vcpu` once more.
    pub(crate) fn map(vcpu: &VcpuFd, size: usize) -> io::Result<Self> {
        // SAFETY: `vcpu` is borrowed for the whole call, so its descriptor
        // stays open while it is duplicated (the duplicate is owned).
        let fd = unsafe { BorrowedFd::borrow_raw(vcpu.as_raw_fd()) }.try_clone_to_owned()?;
        let size = size.max(IMMEDIATE_EXIT + 1);
        let run = MmapRegion::from_file(FileOffset::new(std::fs::File::from(fd), 0), size)
            .map_err(|e| io::Error::other(format!("cannot map kvm_run: {e}")))?;
        Ok(ExitFlag { run })
    }

    /// Sets (1) or clears (0) the flag.
    pub(crate) fn set(&self, value: u8) {
        // In bounds by construction (`map` maps past the byte), so this
        // cannot fail; an atomic store, as another thread may write it too.
        let stored = self
            .run
            .as_volatile_slice()
            .store(value, IMMEDIATE_EXIT, Ordering::SeqCst);
        debug_assert!(stored.is_ok());
    }

    /// The flag's value.
    #[cfg(test)]
    pub(crate) fn get(&self) -> u8 {
        self.run
            .as_volatile_slice()
            .load(IMMEDIATE_EXIT, Ordering::SeqCst)
            .unwrap_or(0)
    }
}

/// What another thread holds to kick one vCPU out of `KVM_RUN`.
#[derive(Debug, Clone)]
pub struct Kicker {
    flag: Arc<ExitFlag>,
}

impl Kicker {
    pub(crate) fn new(flag: Arc<ExitFlag>) -> Self {
        Kicker { flag }
    }

    /// Kicks the vCPU that `thread` runs: it leaves `KVM_RUN` now, or
    /// enters it only to leave at once.
    pub fn kick<T>(&self, thread: &JoinHandle<T>) -> io::Result<()> {
        self.flag.set(1);
        thread
            .kill(kick_signal())
            .map_err(|e| io::Error::from_raw_os_error(e.errno()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{ExitHandler, Hypervisor, RunOutcome};

    struct NoDevices;

    impl ExitHandler for NoDevices {
        fn pio_read(&self, _: u16, _: &mut [u8]) {}
        fn pio_write(&self, _: u16, _: &[u8]) {}
        fn mmio_read(&self, _: u64, _: &mut [u8]) {}
        fn mmio_write(&self, _: u64, _: &[u8]) {}
    }

    /// A kick that lands before KVM_RUN (here: on a thread that is not in
    /// it) makes the next KVM_RUN return at once, before any guest code,
    /// and the vCPU clears the flag through the shared mapping.
    #[test]
    fn a_kick_before_kvm_run_returns_it_at_once_and_is_cleared() {
        if !std::path::Path::new(crate::hypervisor::KVM_PATH).exists() {
            eprintln!(
                "SKIPPED a_kick_before_kvm_run_returns_it_at_once_and_is_cleared: no /dev/kvm"
            );
            return;
        }
        install().unwrap();
        let hv = Hypervisor::open().unwrap();
        let vm = hv.create_vm().unwrap();
        let mut vcpu = vm.create_vcpu(0).unwrap();
        let kicker = vcpu.kicker();
        let idle = std::thread::spawn(std::thread::park);
        kicker.kick(&idle).unwrap();
        assert_eq!(kicker.flag.get(), 1);
        // The VM is dropped first: the vCPU keeps what it needs.
        drop(vm);
        assert_eq!(vcpu.run(&NoDevices).unwrap(), RunOutcome::Interrupted);
        assert_eq!(kicker.flag.get(), 0, "cleared once seen");
        // A pause notice to KVM is taken, or refused only because this
        // guest never enabled kvmclock.
        assert!(vcpu.note_paused().is_ok());
        idle.thread().unpark();
        idle.join().unwrap();
    }
}
