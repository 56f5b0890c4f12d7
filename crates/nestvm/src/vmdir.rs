//! The files of a managed VM in its directory (`Store::vm_dir`): the
//! sockets and logs of its VMM process, its saved state, its last
//! migration's report. Its checkpoints are `Store::checkpoints`'. Imports
//! nothing else of the CLI.

use std::path::{Path, PathBuf};

use nestvm_manager::{Store, VmName};

/// The files of a managed VM.
pub struct VmDir {
    /// Control API socket.
    pub control: PathBuf,
    /// Console socket.
    pub console: PathBuf,
    /// The VMM's log.
    pub log: PathBuf,
    /// The console's log.
    pub console_log: PathBuf,
    /// The VMM's pid.
    pub pid: PathBuf,
    /// The run lock.
    pub run_lock: PathBuf,
    /// The saved state (`vm save`), when there is one.
    pub saved: PathBuf,
    /// The last outgoing migration's final progress, which the VMM writes
    /// as it ends.
    pub migration_report: PathBuf,
}

impl VmDir {
    /// Where VM `name`'s files are.
    pub fn of(store: &Store, name: &VmName) -> Self {
        Self::at(&store.vm_dir(name))
    }

    /// The files of the VM whose directory is the current one, as paths
    /// relative to it: a VMM that gave up root cannot pass through the
    /// state directory above it, only work inside its own.
    pub fn here() -> Self {
        Self::at(Path::new("."))
    }

    fn at(d: &Path) -> Self {
        Self {
            control: d.join("control.sock"),
            console: d.join("console.sock"),
            log: d.join("vmm.log"),
            console_log: d.join("console.log"),
            pid: d.join("vmm.pid"),
            run_lock: d.join("run.lock"),
            saved: d.join("saved"),
            migration_report: d.join("migration.json"),
        }
    }
}

/// Removes a saved-state directory (and what a crashed save left beside it).
pub fn remove_saved(dir: &Path) -> std::io::Result<()> {
    nestvm_snapshot::atomic::recover_dir(&nestvm_vmm::persist::staging_dir(dir), dir);
    std::fs::remove_dir_all(dir)
}
