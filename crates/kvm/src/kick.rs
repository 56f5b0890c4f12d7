//! Pulling a vCPU thread out of `KVM_RUN` from another thread.
//!
//! Each vCPU thread records where its `kvm_run.immediate_exit` byte lives.
//! [`kick`] sends that thread a real-time signal whose handler sets the byte:
//! if the thread is inside `KVM_RUN`, the signal makes it return with EINTR;
//! if it is just about to enter, the byte makes `KVM_RUN` return at once. So no
//! kick is ever lost, whatever the timing.

use std::cell::Cell;
use std::sync::Once;
use std::thread::JoinHandle;

use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

thread_local! {
    static IMMEDIATE_EXIT: Cell<*mut u8> = const { Cell::new(std::ptr::null_mut()) };
}

/// The signal used to kick vCPU threads.
pub fn kick_signal() -> i32 {
    SIGRTMIN()
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    IMMEDIATE_EXIT.with(|p| {
        let ptr = p.get();
        if !ptr.is_null() {
            // SAFETY: `ptr` was set by `bind` on this very thread to the
            // `immediate_exit` byte of the kvm_run mapping of the vCPU this
            // thread owns; that mapping lives as long as the vCPU, which the
            // thread owns until it exits (and `unbind` runs before the drop).
            unsafe { std::ptr::write_volatile(ptr, 1) };
        }
    });
}

/// Installs the kick signal handler once per process.
pub fn install() -> std::io::Result<()> {
    static ONCE: Once = Once::new();
    let mut result = Ok(());
    ONCE.call_once(|| {
        result = register_signal_handler(kick_signal(), on_kick)
            .map_err(|e| std::io::Error::from_raw_os_error(e.errno()));
    });
    result
}

pub(crate) fn bind(flag: *mut u8) {
    IMMEDIATE_EXIT.with(|p| p.set(flag));
}

/// Forgets this thread's vCPU; call before dropping the vCPU on its thread.
pub fn unbind() {
    IMMEDIATE_EXIT.with(|p| p.set(std::ptr::null_mut()));
}

/// Kicks the vCPU that `thread` runs.
pub fn kick<T>(thread: &JoinHandle<T>) -> std::io::Result<()> {
    thread
        .kill(kick_signal())
        .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
}
