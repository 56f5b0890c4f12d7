//! What every command shares, and imports nothing else of the CLI: the
//! [`Failure`] a command ends with (its exit code: 2 for usage and
//! configuration errors, 1 for runtime ones), how results are printed
//! ([`report`], [`print_json`]), and the wording of inventory errors
//! ([`store_err`], [`vm_name`]).

use std::path::Path;

use nestvm_manager::{StoreError, VmName};
use serde::Serialize;

/// How this command's VMMs confine their threads: `--seccomp`, else
/// `$NESTVM_SECCOMP`, else on. Set once by `main`.
static SECCOMP: std::sync::OnceLock<nestvm_vmm::seccomp::Mode> = std::sync::OnceLock::new();

/// The line `vm serve` writes on its standard output once its VM runs and
/// its API listens (`vm start` waits for it instead of polling).
pub const SERVE_READY: &str = "nestvm: ready";

/// Records the seccomp mode for this process's VMMs.
pub fn set_seccomp(mode: nestvm_vmm::seccomp::Mode) {
    let _ = SECCOMP.set(mode);
}

/// The seccomp mode for this process's VMMs (and the ones it starts).
pub fn seccomp() -> nestvm_vmm::seccomp::Mode {
    SECCOMP.get().copied().unwrap_or_default()
}

/// Who a VMM started as root becomes: `--vmm-user`, else
/// `$NESTVM_VMM_USER`, else `nobody`; `root` keeps root's rights. Set once
/// by `main`.
static VMM_USER: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// The default of `--vmm-user`.
pub const DEFAULT_VMM_USER: &str = "nobody";

/// Records who this process's VMMs become if they run as root.
pub fn set_vmm_user(spec: String) {
    let _ = VMM_USER.set(spec);
}

/// `--vmm-user` as given (or its default), for the VMMs this process starts.
pub fn vmm_user_spec() -> &'static str {
    VMM_USER.get().map_or(DEFAULT_VMM_USER, String::as_str)
}

/// The user a VMM of this process becomes once its VM is built: `None`
/// when it does not run as root (it has nothing to give up) or was told to
/// stay root.
pub fn vmm_user() -> Result<Option<nestvm_vmm::privileges::VmmUser>, Failure> {
    let spec = vmm_user_spec();
    if !nestvm_vmm::privileges::is_root() || spec == "root" {
        return Ok(None);
    }
    match nestvm_vmm::privileges::VmmUser::resolve(spec) {
        Ok(u) => Ok(Some(u)),
        // A host without a user database (a minimal image): nobody's
        // customary numbers.
        Err(
            nestvm_vmm::privileges::PrivilegeError::NoUser(_)
            | nestvm_vmm::privileges::PrivilegeError::Lookup { .. }
            | nestvm_vmm::privileges::PrivilegeError::NoGroup(_),
        ) if spec == DEFAULT_VMM_USER => Ok(Some(nestvm_vmm::privileges::VmmUser {
            name: DEFAULT_VMM_USER.to_owned(),
            uid: 65534,
            gid: 65534,
        })),
        Err(e) => Err(usage(anyhow::Error::new(e))),
    }
}

/// Becomes `user` (if any): the last step before the VM's threads start.
pub fn drop_privileges(user: Option<&nestvm_vmm::privileges::VmmUser>) -> Result<(), Failure> {
    match user {
        Some(u) => nestvm_vmm::privileges::drop_to(u).map_err(|e| runtime(anyhow::Error::new(e))),
        None => Ok(()),
    }
}

/// Whether this command's VMMs confine their view of the filesystem with
/// Landlock: `--landlock`, else `$NESTVM_LANDLOCK`, else on. Set once by
/// `main`.
static LANDLOCK: std::sync::OnceLock<bool> = std::sync::OnceLock::new();

/// Records whether this process's VMMs use Landlock.
pub fn set_landlock(on: bool) {
    let _ = LANDLOCK.set(on);
}

/// Whether this process's VMMs (and the ones it starts) use Landlock.
pub fn landlock() -> bool {
    LANDLOCK.get().copied().unwrap_or(true)
}

/// Jails the VMM that is about to build `config` (see
/// `nestvm_vmm::jail`): limits, and the rules that let its threads reach
/// `vm_dir` (a managed VM's directory) and the disk images only.
pub fn prepare_jail(config: &nestvm_vmm::VmConfig, vm_dir: Option<&Path>) -> Result<(), Failure> {
    // Where its end is: a block device's metadata says 0 (its checkpoint
    // copy is as large as the device). Opened without blocking.
    let disk_size = |p: &Path| {
        use std::io::{Seek, SeekFrom};
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(nix::libc::O_NONBLOCK)
            .open(p)
            .and_then(|mut f| f.seek(SeekFrom::End(0)))
            .unwrap_or(0)
    };
    let plan = nestvm_vmm::jail::Plan {
        vm_dir: vm_dir.map(Path::to_owned),
        disks: config
            .disks
            .iter()
            .map(|d| (d.path.clone(), !d.readonly))
            .collect(),
        largest_file: config
            .disks
            .iter()
            .map(|d| disk_size(&d.path))
            .fold(config.memory, u64::max),
        landlock: landlock(),
    };
    nestvm_vmm::jail::prepare(&plan).map_err(|e| Failure {
        code: 1,
        error: anyhow::Error::new(e),
    })
}

/// An error with the exit code it maps to.
pub struct Failure {
    /// The exit code.
    pub code: u8,
    /// What went wrong.
    pub error: anyhow::Error,
}

/// A usage or configuration error (exit code 2).
pub fn usage(error: impl Into<anyhow::Error>) -> Failure {
    Failure {
        code: 2,
        error: error.into(),
    }
}

/// A runtime error (exit code 1).
pub fn runtime(error: impl Into<anyhow::Error>) -> Failure {
    Failure {
        code: 1,
        error: error.into(),
    }
}

/// Prints a command's result: `text` for people, `value` with --json.
pub fn report(json: bool, text: &str, value: serde_json::Value) {
    if json {
        println!("{value}");
    } else {
        println!("{text}");
    }
}

/// Prints `v` as pretty JSON.
pub fn print_json(v: &impl Serialize) -> Result<(), Failure> {
    println!("{}", serde_json::to_string_pretty(v).map_err(runtime)?);
    Ok(())
}

/// An inventory error: the user's to fix (exit 2) or the host's (exit 1).
pub fn store_err(e: StoreError) -> Failure {
    match e {
        StoreError::Name(_)
        | StoreError::Exists(_)
        | StoreError::NotFound(_)
        | StoreError::Config { .. }
        | StoreError::HasSavedState(_) => usage(e),
        _ => runtime(e),
    }
}

/// A VM name from the command line.
pub fn vm_name(s: &str) -> Result<VmName, Failure> {
    VmName::new(s).map_err(usage)
}

/// The last `n` lines of a file (none if it cannot be read).
pub fn tail(path: &Path, n: usize) -> Vec<String> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<String> = text.lines().map(str::to_owned).collect();
    lines[lines.len().saturating_sub(n)..].to_vec()
}
