//! Raw mode for an interactive console. The guard restores the terminal's
//! original settings when dropped, which every exit path of `nestvm run`
//! does (normal stop, signals via signalfd, errors, panics that unwind).

use std::os::fd::{AsFd, BorrowedFd};

use nix::sys::termios::{self, SetArg, Termios};

/// Restores a terminal's settings on drop.
pub struct RawModeGuard<'a> {
    fd: BorrowedFd<'a>,
    saved: Termios,
}

impl<'a> RawModeGuard<'a> {
    /// Puts `fd` in raw mode if it is a terminal; `None` if it is not.
    pub fn enable(fd: BorrowedFd<'a>) -> Option<Self> {
        let saved = termios::tcgetattr(fd).ok()?;
        let mut raw = saved.clone();
        termios::cfmakeraw(&mut raw);
        // Keep output post-processing so our own messages still start at column 0.
        raw.output_flags = saved.output_flags;
        if let Err(e) = termios::tcsetattr(fd, SetArg::TCSANOW, &raw) {
            log::warn!("cannot put the terminal in raw mode: {e}");
            return None;
        }
        Some(Self { fd, saved })
    }
}

impl Drop for RawModeGuard<'_> {
    fn drop(&mut self) {
        if let Err(e) = termios::tcsetattr(self.fd.as_fd(), SetArg::TCSANOW, &self.saved) {
            eprintln!("nestvm: cannot restore the terminal ({e}); run 'stty sane'");
        }
    }
}

/// Whether `fd` is a terminal.
pub fn is_terminal(fd: BorrowedFd<'_>) -> bool {
    termios::tcgetattr(fd).is_ok()
}
