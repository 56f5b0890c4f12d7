//! Locks on a VM's directory, with flock(2): released by the kernel when the
//! holder exits, however it exits.
//!
//! - The *command lock* (`lock`) serialises nestvm commands on one VM.
//! - The *run lock* (`run.lock`) is held by the VMM process for as long as
//!   the VM exists; whether it is held is the truth about whether the VM runs.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use nix::fcntl::{Flock, FlockArg};

/// A held lock; dropping it releases it.
pub struct Held(#[allow(dead_code)] Flock<File>);

/// Errors of locking.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// The lock file cannot be opened.
    #[error("cannot open lock file {0}")]
    Open(String, #[source] std::io::Error),
    /// Someone else holds it.
    #[error("another nestvm process holds {0}")]
    Busy(String),
    /// flock failed otherwise.
    #[error("cannot lock {0}")]
    Flock(String, #[source] std::io::Error),
}

fn open(path: &Path) -> Result<File, LockError> {
    OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| LockError::Open(path.display().to_string(), e))
}

/// Takes the lock at `path`, waiting for it if `wait`.
pub fn lock(path: &Path, wait: bool) -> Result<Held, LockError> {
    let file = open(path)?;
    let arg = if wait {
        FlockArg::LockExclusive
    } else {
        FlockArg::LockExclusiveNonblock
    };
    match Flock::lock(file, arg) {
        Ok(f) => Ok(Held(f)),
        Err((_, nix::errno::Errno::EWOULDBLOCK)) => {
            Err(LockError::Busy(path.display().to_string()))
        }
        Err((_, e)) => Err(LockError::Flock(path.display().to_string(), e.into())),
    }
}

/// Whether someone holds the lock at `path` (without taking it for long).
pub fn is_held(path: &Path) -> bool {
    if !path.exists() {
        return false;
    }
    match lock(path, false) {
        Ok(_held) => false,
        Err(LockError::Busy(_)) => true,
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_held_lock_is_busy_until_dropped() {
        let dir = std::env::temp_dir().join(format!("nestvm-lock-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("run.lock");
        assert!(!is_held(&p));
        let held = lock(&p, false).unwrap();
        assert!(is_held(&p));
        assert!(matches!(lock(&p, false), Err(LockError::Busy(_))));
        drop(held);
        assert!(!is_held(&p));
    }

    #[test]
    fn a_dead_holder_releases_the_lock() {
        let dir = std::env::temp_dir().join(format!("nestvm-lock2-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("run.lock");
        // A shell takes the lock with flock(1) and becomes `sleep`, which
        // keeps it; then we kill that process.
        let Ok(mut child) = std::process::Command::new("sh")
            .args([
                "-c",
                "command -v flock >/dev/null || exit 3; exec 9>\"$0\"; flock 9; exec sleep infinity",
            ])
            .arg(&p)
            .spawn()
        else {
            panic!("cannot run sh");
        };
        let start = std::time::Instant::now();
        while !is_held(&p) {
            if let Ok(Some(status)) = child.try_wait() {
                assert_eq!(status.code(), Some(3), "helper failed: {status}");
                eprintln!("flock(1) not installed: cross-process check skipped");
                return;
            }
            assert!(start.elapsed().as_secs() < 10, "child never took the lock");
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(!is_held(&p), "the kernel releases a dead holder's lock");
    }
}
