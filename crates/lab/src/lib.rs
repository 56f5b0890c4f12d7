//! The lab: a host with AMD-V on machines that have none.
//!
//! QEMU's TCG emulates an EPYC CPU with SVM. Inside it (L1) runs Debian's
//! kernel with kvm-amd loaded `nested=1`, the freshly built `nestvm`, and the
//! test payloads. nestvm boots L2 there; L2 may in turn run nestvm and L3.
//!
//! - [`host`]: installs QEMU and busybox-static when missing (saying so).
//! - [`debian`]: fetches and caches the Debian kernel package, extracts the
//!   kernel and the KVM modules.
//! - [`cpio`]: writes initramfs archives (newc).
//! - [`image`]: assembles the L1 initramfs with the L2 (and L3) ones inside.
//! - [`scenario`]: boots L1 under QEMU, runs a shell scenario with checks and
//!   a timeout, and reports each check, keeping L1's serial log.

pub mod cpio;
pub mod debian;
pub mod host;
pub mod image;
pub mod scenario;
pub mod watchdog;

use std::path::PathBuf;

/// Errors of the lab.
#[derive(Debug, thiserror::Error)]
pub enum LabError {
    /// A command the lab runs failed.
    #[error("'{command}' failed: {detail}")]
    Command {
        /// The command line.
        command: String,
        /// Its stderr or exit status.
        detail: String,
    },
    /// A file operation failed.
    #[error("{what} {path}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Something the lab needs is missing.
    #[error("{0}")]
    Missing(String),
}

/// A shorthand for I/O errors on a path.
pub(crate) fn io_err(
    what: &'static str,
    path: impl Into<PathBuf>,
) -> impl FnOnce(std::io::Error) -> LabError {
    let path = path.into();
    move |source| LabError::Io { what, path, source }
}

/// The workspace root (where `target/` lives).
pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .and_then(|p| p.parent())
        .expect("crates/lab is two levels below the workspace root")
        .to_path_buf()
}

/// Where downloads are cached across runs: `$NESTVM_LAB_CACHE`, else
/// `$XDG_CACHE_HOME/nestvm-lab`, else `~/.cache/nestvm-lab`.
pub fn cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("NESTVM_LAB_CACHE") {
        return PathBuf::from(d);
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir);
    base.join("nestvm-lab")
}

/// Where built images and logs go: `target/lab`.
pub fn work_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"))
        .join("lab")
}

/// Prints a line of lab narration on stderr.
pub fn say(msg: impl std::fmt::Display) {
    eprintln!("[lab] {msg}");
}
