//! What happens when a VMM thread makes a system call its seccomp filter
//! does not allow: the filter traps (`SIGSYS`), and this handler writes
//! one line naming the call to the VMM's log (stderr) and ends the process
//! at once with [`EXIT_CODE`]. Nothing else runs: the thread that tripped
//! the filter may be acting for a hostile guest.
//!
//! The handler only calls `write` and `exit_group`, which every filter
//! allows, and formats the number itself (no allocation, no locks).

use std::io;
use std::sync::Once;

use vmm_sys_util::signal::register_signal_handler;

/// The VMM's exit status after a system call its filter refused.
pub const EXIT_CODE: i32 = 159;

/// Where the system call number is in a `SIGSYS` siginfo on x86-64
/// (`si_signo`, `si_errno`, `si_code`, padding, `_call_addr`, then
/// `_syscall`), in 32-bit words.
const SYSCALL_WORD: usize = 6;

/// Formats `n` in decimal into the end of `buf`; returns where it starts.
fn decimal(mut n: u64, buf: &mut [u8; 20]) -> usize {
    let mut at = buf.len();
    loop {
        at -= 1;
        buf[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            return at;
        }
    }
}

/// The line the handler writes for system call `nr`.
fn message(nr: u64, out: &mut [u8; 160]) -> usize {
    const HEAD: &[u8] = b"nestvm: seccomp: a VMM thread made system call ";
    const TAIL: &[u8] =
        b", which its filter does not allow; the VMM stops (--seccomp log shows them all)\n";
    let mut digits = [0u8; 20];
    let start = decimal(nr, &mut digits);
    let mut len = 0;
    for part in [HEAD, &digits[start..], TAIL] {
        out[len..len + part.len()].copy_from_slice(part);
        len += part.len();
    }
    len
}

extern "C" fn on_sigsys(_: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let nr = if info.is_null() {
        u64::MAX
    } else {
        // SAFETY: the kernel passes a valid siginfo for this SIGSYS, at
        // least `SYSCALL_WORD + 1` 32-bit words long (a siginfo is 128
        // bytes), and it is only read.
        let word = unsafe { info.cast::<i32>().add(SYSCALL_WORD).read() };
        word as u64
    };
    let mut line = [0u8; 160];
    let len = message(nr, &mut line);
    // SAFETY: `line` holds `len` initialised bytes and outlives the call;
    // write(2) and _exit(2) are async-signal-safe.
    unsafe {
        libc::write(2, line.as_ptr().cast(), len);
        libc::_exit(EXIT_CODE);
    }
}

/// Installs the handler once per process (before any filter that traps).
pub fn install() -> io::Result<()> {
    static ONCE: Once = Once::new();
    let mut result = Ok(());
    ONCE.call_once(|| {
        result = register_signal_handler(libc::SIGSYS, on_sigsys)
            .map_err(|e| io::Error::from_raw_os_error(e.errno()));
    });
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_line_names_the_call() {
        let mut out = [0u8; 160];
        let len = message(16, &mut out);
        let text = std::str::from_utf8(&out[..len]).unwrap();
        assert!(text.starts_with("nestvm: seccomp: a VMM thread made system call 16, which"));
        assert!(text.ends_with("shows them all)\n"));
        let len = message(u64::MAX, &mut out);
        assert!(std::str::from_utf8(&out[..len])
            .unwrap()
            .contains("18446744073709551615"));
        let mut d = [0u8; 20];
        let at = decimal(0, &mut d);
        assert_eq!(&d[at..], b"0");
    }
}
