//! The VMM's jail, around what its seccomp filters allow: resource limits
//! for the process, and a filesystem view (Landlock) cut down to the VM's
//! own directory and disk images, so a guest that found a bug in a device
//! cannot open or write the host's other files with the VMM's rights.
//!
//! [`prepare`] runs once, before the VM is built: it lowers the process's
//! limits on open files and on the size of a file it writes
//! (`RLIMIT_NOFILE`, `RLIMIT_FSIZE`: the largest file a VMM writes is a
//! memory image or a disk's copy; `SIGXFSZ` is blocked, so a write past
//! the limit fails that one request instead of killing the VMM), and
//! creates the Landlock rulesets. Each thread then enters its ruleset
//! itself with [`enter`], just before its seccomp filter, as it starts
//! (Landlock, like seccomp, confines the calling thread and the threads it
//! starts later):
//! - [`Role::Guest`], for the threads a guest drives (vCPUs, the event loop
//!   and the migration thread it starts): read-write in the VM's directory
//!   (logs, saves, checkpoints), its disk images (read-only ones read
//!   only), and read-only what name resolution reads (`/etc/hosts`,
//!   `/etc/resolv.conf`... and the system's libraries, for NSS modules)
//!   and the host's boot ID (a migration's `Hello` carries it).
//! - [`Role::Api`], for the API thread, which serves the state directory's
//!   owner, never a guest: the same, plus reading any file, since
//!   `PUT /v1/vm/migrate` names the secret's file.
//!
//! Where the kernel lacks Landlock, the VMM runs with the limits and the
//! seccomp filters only, and says so once in its log. Entering a ruleset
//! sets `no_new_privs` (the seccomp filters need it too).

use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use landlock::{
    Access, AccessFs, BitFlags, PathBeneath, PathFd, Ruleset, RulesetAttr, RulesetCreated,
    RulesetCreatedAttr, RulesetError, RulesetStatus, ABI,
};
use nix::sys::resource::{getrlimit, setrlimit, Resource};

/// The Landlock ABI whose rights nestvm asks for; a kernel with an older
/// one enforces what it knows (best effort).
const LANDLOCK_ABI: ABI = ABI::V5;
/// Open files a VMM may hold beyond those it has when it is jailed
/// (connections, files of a save or a checkpoint, a rotated log).
const SPARE_FILES: u64 = 256;
/// The open-file limit is never set below this.
const MIN_FILES: u64 = 1024;
/// Headroom over the largest file a VMM writes.
const FILE_SIZE_SLACK: u64 = 64 << 20;
/// Files name resolution reads (where they exist).
const RESOLVER_FILES: &[&str] = &[
    "/etc/hosts",
    "/etc/resolv.conf",
    "/etc/nsswitch.conf",
    "/etc/host.conf",
    "/etc/gai.conf",
    "/etc/services",
    "/etc/protocols",
];
/// What an outgoing migration reads of the host: its boot ID, which tells
/// a destination on the same host that the disks' locks are the sender's.
const HOST_FILES: &[&str] = &["/proc/sys/kernel/random/boot_id"];
/// Where NSS modules are (where they exist).
const LIBRARY_DIRS: &[&str] = &["/lib", "/lib64", "/usr/lib", "/usr/lib64"];

/// What a VMM may reach, known before its VM is built.
#[derive(Debug, Clone, Default)]
pub struct Plan {
    /// The VM's own directory (a managed VM), read-write.
    pub vm_dir: Option<PathBuf>,
    /// The disk images, and whether each is writable.
    pub disks: Vec<(PathBuf, bool)>,
    /// The largest file the VMM writes: its guest memory's size, or a
    /// disk's, whichever is larger.
    pub largest_file: u64,
    /// Whether to confine the filesystem view (`--landlock`).
    pub landlock: bool,
}

/// Which ruleset a thread enters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Threads a guest drives.
    Guest,
    /// The API thread.
    Api,
}

/// What [`prepare`] could not do.
#[derive(Debug, thiserror::Error)]
pub enum JailError {
    /// A resource limit could not be read or set.
    #[error("cannot set the VMM's limit on {what}")]
    Limit {
        /// Which limit.
        what: &'static str,
        /// The cause.
        #[source]
        source: nix::Error,
    },
    /// A Landlock ruleset could not be built.
    #[error("cannot build the VMM's Landlock rules")]
    Ruleset(#[source] RulesetError),
    /// A path the VMM must reach could not be opened for its rule.
    #[error("cannot open {path} for the VMM's Landlock rules")]
    Path {
        /// The path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: landlock::PathFdError,
    },
    /// [`prepare`] ran twice in one process.
    #[error("the VMM's jail was already prepared")]
    Twice,
}

/// What a thread could not enter.
#[derive(Debug, thiserror::Error)]
pub enum EnterError {
    /// The ruleset's descriptor could not be duplicated for this thread.
    #[error("cannot share the Landlock ruleset with this thread")]
    Clone(#[source] std::io::Error),
    /// The kernel refused the restriction.
    #[error("cannot enter the Landlock ruleset")]
    Restrict(#[source] RulesetError),
}

/// The rulesets threads enter, once prepared.
struct Rulesets {
    guest: RulesetCreated,
    api: RulesetCreated,
}

static RULESETS: OnceLock<Option<Mutex<Rulesets>>> = OnceLock::new();

/// Sets the process's limits and builds the rulesets of `plan`. Until it
/// has run (a VM built in a test), [`enter`] does nothing.
pub fn prepare(plan: &Plan) -> Result<(), JailError> {
    limit_files()?;
    limit_file_size(plan.largest_file.saturating_add(FILE_SIZE_SLACK))?;
    let rulesets = if plan.landlock {
        Some(Mutex::new(Rulesets {
            guest: ruleset(plan, false)?,
            api: ruleset(plan, true)?,
        }))
    } else {
        None
    };
    RULESETS.set(rulesets).map_err(|_| JailError::Twice)
}

/// Confines the calling thread to `role`'s ruleset (if [`prepare`] built
/// one). Says once in the log if the kernel has no Landlock.
pub fn enter(role: Role) -> Result<(), EnterError> {
    let Some(Some(sets)) = RULESETS.get() else {
        return Ok(());
    };
    let copy = {
        let sets = sets.lock().unwrap_or_else(|p| p.into_inner());
        match role {
            Role::Guest => sets.guest.try_clone(),
            Role::Api => sets.api.try_clone(),
        }
    }
    .map_err(EnterError::Clone)?;
    let status = copy.restrict_self().map_err(EnterError::Restrict)?;
    if status.ruleset == RulesetStatus::NotEnforced {
        static SAID: std::sync::Once = std::sync::Once::new();
        SAID.call_once(|| {
            log::warn!(
                "this kernel has no Landlock: the VMM's view of the filesystem is not confined \
                 (its seccomp filters and limits still are)"
            )
        });
    }
    Ok(())
}

/// Confines the calling thread so that it can open no file at all (a
/// migration handshake with a stranger needs only its socket), where the
/// kernel has Landlock and the VMM uses it; builds its own ruleset, so it
/// works before [`prepare`]. Says whether the kernel enforces it.
pub fn enter_no_files(landlock: bool) -> Result<bool, EnterError> {
    if !landlock {
        return Ok(false);
    }
    Ruleset::default()
        .handle_access(AccessFs::from_all(LANDLOCK_ABI))
        .and_then(|r| r.create())
        .and_then(|r| r.restrict_self())
        .map(|s| s.ruleset != RulesetStatus::NotEnforced)
        .map_err(EnterError::Restrict)
}

/// [`enter`], or the VMM stops: a thread must never run unconfined.
pub fn confine(role: Role) {
    if let Err(e) = enter(role) {
        let cause = std::error::Error::source(&e)
            .map(|c| format!(": {c}"))
            .unwrap_or_default();
        eprintln!("nestvm: error: {e}{cause}; the VMM stops (--landlock off runs it without)");
        std::process::exit(1);
    }
}

fn open_files_now() -> u64 {
    std::fs::read_dir("/proc/self/fd")
        .map(|d| d.count() as u64)
        .unwrap_or(0)
}

fn limit_files() -> Result<(), JailError> {
    let err = |source| JailError::Limit {
        what: "open files",
        source,
    };
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).map_err(err)?;
    let want = (open_files_now() + SPARE_FILES).max(MIN_FILES).min(hard);
    setrlimit(Resource::RLIMIT_NOFILE, want, want).map_err(err)
}

fn limit_file_size(max: u64) -> Result<(), JailError> {
    let err = |source| JailError::Limit {
        what: "file size",
        source,
    };
    // A write past the limit then fails with EFBIG instead of raising
    // SIGXFSZ, whose default is to end the process. Threads started later
    // inherit the mask.
    let mut xfsz = nix::sys::signal::SigSet::empty();
    xfsz.add(nix::sys::signal::Signal::SIGXFSZ);
    xfsz.thread_block().map_err(err)?;
    let (_, hard) = getrlimit(Resource::RLIMIT_FSIZE).map_err(err)?;
    let want = max.min(hard);
    setrlimit(Resource::RLIMIT_FSIZE, want, want).map_err(err)
}

/// What the VMM may do in its own directory: everything but running,
/// linking and making devices, FIFOs or sockets there.
fn own_dir_rights() -> BitFlags<AccessFs> {
    AccessFs::from_all(LANDLOCK_ABI)
        & !(AccessFs::Execute
            | AccessFs::MakeChar
            | AccessFs::MakeBlock
            | AccessFs::MakeFifo
            | AccessFs::MakeSock
            | AccessFs::MakeSym
            | AccessFs::IoctlDev)
}

fn rule(path: &Path, rights: BitFlags<AccessFs>) -> Result<PathBeneath<PathFd>, JailError> {
    let fd = PathFd::new(path).map_err(|source| JailError::Path {
        path: path.to_owned(),
        source,
    })?;
    Ok(PathBeneath::new(fd, rights))
}

/// A rule for a system path that may not exist on this host.
fn optional_rule(path: &str, rights: BitFlags<AccessFs>) -> Option<PathBeneath<PathFd>> {
    Path::new(path)
        .exists()
        .then(|| {
            PathFd::new(path)
                .ok()
                .map(|fd| PathBeneath::new(fd, rights))
        })
        .flatten()
}

fn ruleset(plan: &Plan, api: bool) -> Result<RulesetCreated, JailError> {
    let read = AccessFs::ReadFile | AccessFs::ReadDir;
    let file_read: BitFlags<AccessFs> = AccessFs::ReadFile.into();
    let file_write = AccessFs::ReadFile | AccessFs::WriteFile | AccessFs::Truncate;
    let mut rules = Vec::new();
    if let Some(dir) = &plan.vm_dir {
        rules.push(rule(dir, own_dir_rights())?);
    }
    // A disk that cannot be opened gets no rule: building the VM, which
    // opens it next, says what is wrong with it.
    for (disk, writable) in &plan.disks {
        let rights = if *writable { file_write } else { file_read };
        rules.extend(rule(disk, rights).ok());
    }
    let files = RESOLVER_FILES.iter().chain(HOST_FILES);
    rules.extend(files.filter_map(|f| optional_rule(f, file_read)));
    rules.extend(LIBRARY_DIRS.iter().filter_map(|d| optional_rule(d, read)));
    if api {
        rules.extend(optional_rule("/", file_read | AccessFs::ReadDir));
    }
    Ruleset::default()
        .handle_access(AccessFs::from_all(LANDLOCK_ABI))
        .and_then(|r| r.create())
        .and_then(|r| r.add_rules(rules.into_iter().map(Ok::<_, RulesetError>)))
        .map_err(JailError::Ruleset)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A rule per path it names, and the rights it gives them, checked in
    /// a thread of its own (a ruleset confines the thread that enters it).
    #[test]
    fn a_guest_thread_reaches_its_directory_and_disks_and_nothing_else() {
        let root = std::env::temp_dir().join(format!("nestvm-jail-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let vm_dir = root.join("vm");
        std::fs::create_dir_all(&vm_dir).unwrap();
        let rw = root.join("rw.img");
        let ro = root.join("ro.img");
        let other = root.join("other");
        for f in [&rw, &ro, &other] {
            std::fs::write(f, b"x").unwrap();
        }
        let plan = Plan {
            vm_dir: Some(vm_dir.clone()),
            disks: vec![(rw.clone(), true), (ro.clone(), false)],
            largest_file: 1 << 30,
            landlock: true,
        };
        let guest = ruleset(&plan, false).unwrap();
        let api = ruleset(&plan, true).unwrap();
        let other2 = other.clone();
        let seen = std::thread::spawn(move || {
            let enforced = guest.restrict_self().unwrap().ruleset != RulesetStatus::NotEnforced;
            let writes = |p: &Path| std::fs::OpenOptions::new().write(true).open(p).is_ok();
            (
                enforced,
                std::fs::write(vm_dir.join("saved"), b"y").is_ok(),
                std::fs::create_dir(vm_dir.join("checkpoints")).is_ok(),
                writes(&rw),
                std::fs::read(&ro).is_ok(),
                writes(&ro),
                std::fs::read(&other).is_ok(),
                std::fs::read("/etc/hosts").is_ok() || !Path::new("/etc/hosts").exists(),
            )
        })
        .join()
        .unwrap();
        let api_reads = std::thread::spawn(move || {
            api.restrict_self().unwrap();
            (
                std::fs::read(&other2).is_ok(),
                std::fs::write(&other2, b"z").is_ok(),
            )
        })
        .join()
        .unwrap();
        if !seen.0 {
            eprintln!("SKIPPED: this kernel has no Landlock");
            return;
        }
        assert_eq!(
            seen,
            (true, true, true, true, true, false, false, true),
            "(enforced, write in the VM's directory, make a directory there, \
             write a writable disk, read a read-only disk, write it, \
             read another file, read /etc/hosts)"
        );
        assert_eq!(api_reads, (true, false), "(API: read any file, write one)");
        let _ = std::fs::remove_dir_all(&root);
    }

    #[test]
    fn a_thread_with_no_files_opens_none() {
        let (enforced, opened) = std::thread::spawn(|| {
            let enforced = enter_no_files(true).unwrap();
            let opened = (
                std::fs::read("/etc/hostname").is_ok(),
                std::fs::read_dir("/").is_ok(),
            );
            (enforced, opened)
        })
        .join()
        .unwrap();
        if !enforced {
            eprintln!("SKIPPED: this kernel has no Landlock");
            return;
        }
        assert_eq!(opened, (false, false));
        assert!(
            std::fs::read_dir("/").is_ok(),
            "other threads are not confined"
        );
    }

    #[test]
    fn the_vmm_keeps_its_own_directory_but_makes_no_devices_or_links_there() {
        let r = own_dir_rights();
        assert!(r.contains(AccessFs::MakeReg | AccessFs::RemoveFile | AccessFs::Refer));
        assert!(!r.intersects(AccessFs::Execute | AccessFs::MakeChar | AccessFs::MakeSym));
    }
}
