//! The state directory and the VMs in it.
//!
//! ```text
//! STATE_DIR/                  mode 0700
//!   vms/NAME/                 mode 0700, one per VM
//!     vm.toml                 the definition (the `nestvm run --config` format)
//!     lock                    command lock
//!     run.lock                held by the VM's VMM process while it runs
//!     saved/, checkpoints/    saved state and checkpoints, when there are any
//! ```

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use nestvm_config::{ConfigError, Overrides, VmConfig};
use serde::Serialize;

use crate::lock::{self, Held, LockError};
use crate::name::{BadName, VmName};

/// Errors of the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A bad VM name.
    #[error(transparent)]
    Name(#[from] BadName),
    /// `vm new` of a name that exists.
    #[error("a VM named '{0}' already exists: pick another name or 'nestvm vm rm {0}' first")]
    Exists(VmName),
    /// A VM that does not exist.
    #[error("no VM named '{0}': 'nestvm vm list' shows the VMs")]
    NotFound(VmName),
    /// The definition is invalid.
    #[error("VM '{name}': invalid settings")]
    Config {
        /// The VM.
        name: VmName,
        /// The cause.
        #[source]
        source: ConfigError,
    },
    /// Refused while the VM runs.
    #[error("VM '{name}' is running: {what} cannot change while it runs; stop it first ('nestvm vm stop {name}')")]
    Running {
        /// The VM.
        name: VmName,
        /// What was refused.
        what: String,
    },
    /// `rm` of a VM with saved state or checkpoints, without --force.
    #[error("VM '{0}' has a saved state or checkpoints that would be lost: add --force to remove them too")]
    HasSavedState(VmName),
    /// A lock.
    #[error(transparent)]
    Lock(#[from] LockError),
    /// A VM's directory that its unprivileged VMM left unsafe for root.
    #[error(transparent)]
    Ownership(#[from] crate::ownership::OwnershipError),
    /// A directory nestvm would keep VMs in that other users can write.
    #[error("{} can be written by other users (mode {mode:o}): nestvm keeps VMs only where their owner alone can write; run 'chmod go-w {}' or use another --state-dir", path.display(), path.display())]
    SharedDir {
        /// The directory.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// A directory nestvm would keep VMs in that belongs to someone else.
    #[error("{} belongs to another user (uid {owner}): use a --state-dir of your own", path.display())]
    ForeignDir {
        /// The directory.
        path: PathBuf,
        /// Its owner.
        owner: u32,
    },
    /// Something that is not a directory where one is needed.
    #[error("{} is not a directory: remove it or use another --state-dir", .0.display())]
    NotADir(PathBuf),
    /// A file operation.
    #[error("cannot {what} {path}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> StoreError + 'a {
    move |source| StoreError::Io {
        what,
        path: path.to_owned(),
        source,
    }
}

/// What a VM is doing, as far as can be known without asking its VMM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum VmState {
    /// No VMM process.
    Off,
    /// No VMM process, and a saved state to resume from.
    Saved,
    /// A VMM process holds the VM (it tells Starting/Running/Paused/Stopping).
    Live,
}

/// The state directory.
#[derive(Debug, Clone)]
pub struct Store {
    root: PathBuf,
}

/// Writes `bytes` to `path` through a temporary file, fsync and rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    let tmp = path.with_extension("tmp");
    // A temporary file left by an interrupted write is ours to replace; a
    // fresh one is created private, never through a link planted there.
    let _ = std::fs::remove_file(&tmp);
    {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(nix::libc::O_NOFOLLOW)
            .open(&tmp)
            .map_err(io("create", &tmp))?;
        f.write_all(bytes).map_err(io("write", &tmp))?;
        f.sync_all().map_err(io("sync", &tmp))?;
    }
    std::fs::rename(&tmp, path).map_err(io("rename into", path))?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io("sync", dir))?;
    }
    Ok(())
}

/// Reads the file at `path`, which must be this user's own and not a link:
/// a definition is trusted, and the directory it is in may belong to the
/// user a VMM became while that VMM runs.
fn read_own(path: &Path) -> Result<String, StoreError> {
    use std::io::Read;
    use std::os::unix::fs::MetadataExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_NONBLOCK)
        .open(path)
        .map_err(io("read", path))?;
    let m = f.metadata().map_err(io("inspect", path))?;
    if !m.is_file() {
        return Err(crate::ownership::OwnershipError::Planted {
            path: path.to_owned(),
            what: "not a plain file",
        }
        .into());
    }
    if m.uid() != nix::unistd::geteuid().as_raw() {
        return Err(crate::ownership::OwnershipError::Replaced {
            path: path.to_owned(),
            owner: m.uid(),
        }
        .into());
    }
    let mut text = String::new();
    f.take(MAX_DEFINITION)
        .read_to_string(&mut text)
        .map_err(io("read", path))?;
    Ok(text)
}

/// A definition is a few hundred bytes; nothing past this is read.
const MAX_DEFINITION: u64 = 1 << 20;

/// Makes `path` (and its missing parents) private to this user, or checks
/// the one already there. An existing directory is never chmodded: one that
/// other users can write to, or that belongs to someone else, is refused.
fn private_dir(path: &Path) -> Result<(), StoreError> {
    match std::fs::metadata(path) {
        Ok(m) => check_private(path, &m),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(path)
            .map_err(io("create", path)),
        Err(e) => Err(io("inspect", path)(e)),
    }
}

fn check_private(path: &Path, m: &std::fs::Metadata) -> Result<(), StoreError> {
    use std::os::unix::fs::MetadataExt;
    if !m.is_dir() {
        return Err(StoreError::NotADir(path.to_owned()));
    }
    if m.mode() & 0o022 != 0 {
        return Err(StoreError::SharedDir {
            path: path.to_owned(),
            mode: m.mode() & 0o7777,
        });
    }
    let me = nix::unistd::geteuid().as_raw();
    if m.uid() != me && me != 0 {
        return Err(StoreError::ForeignDir {
            path: path.to_owned(),
            owner: m.uid(),
        });
    }
    Ok(())
}

impl Store {
    /// The state directory: `explicit` (from `--state-dir`), else
    /// `$NESTVM_STATE_DIR`, else `/var/lib/nestvm` for root, else
    /// `$XDG_DATA_HOME/nestvm` (default `~/.local/share/nestvm`).
    pub fn locate(explicit: Option<PathBuf>) -> Self {
        let root = explicit
            .or_else(|| std::env::var_os("NESTVM_STATE_DIR").map(PathBuf::from))
            .unwrap_or_else(|| {
                if nix::unistd::geteuid().is_root() {
                    PathBuf::from("/var/lib/nestvm")
                } else {
                    std::env::var_os("XDG_DATA_HOME")
                        .map(PathBuf::from)
                        .or_else(|| {
                            std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/share"))
                        })
                        .unwrap_or_else(|| PathBuf::from("."))
                        .join("nestvm")
                }
            });
        Self { root }
    }

    /// The directory itself.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// A VM's directory.
    pub fn vm_dir(&self, name: &VmName) -> PathBuf {
        self.root.join("vms").join(name.as_str())
    }

    /// The checkpoints of a VM (in `checkpoints/` of its directory).
    pub fn checkpoints(&self, name: &VmName) -> crate::Checkpoints {
        crate::Checkpoints::new(self.vm_dir(name).join("checkpoints"))
    }

    fn definition(&self, name: &VmName) -> PathBuf {
        self.vm_dir(name).join("vm.toml")
    }

    /// Whether a VM of that name exists.
    pub fn exists(&self, name: &VmName) -> bool {
        self.definition(name).exists()
    }

    fn must_exist(&self, name: &VmName) -> Result<(), StoreError> {
        if self.exists(name) {
            Ok(())
        } else {
            Err(StoreError::NotFound(name.clone()))
        }
    }

    /// Takes the command lock of `name` (waiting for another command to
    /// finish). As root, a VM whose VMM does not run is taken back from the
    /// user its last VMM became ([`Store::reclaim`]).
    pub fn lock(&self, name: &VmName) -> Result<Held, StoreError> {
        self.must_exist(name)?;
        let held = lock::lock(&self.vm_dir(name).join("lock"), true)?;
        if self.state(name) != VmState::Live {
            self.reclaim(name)?;
        }
        Ok(held)
    }

    /// As root, takes VM `name`'s directory back from the unprivileged user
    /// its VMM ran as, refusing one where that user planted what nestvm
    /// never makes (see [`crate::ownership`]); as anyone else, nothing (no
    /// VMM of theirs ran as another user). Only while no VMM runs it.
    pub fn reclaim(&self, name: &VmName) -> Result<(), StoreError> {
        if !nix::unistd::Uid::effective().is_root() {
            return Ok(());
        }
        Ok(crate::ownership::reclaim(&self.vm_dir(name))?)
    }

    /// Gives VM `name`'s directory to `uid`:`gid`, the user its VMM is about
    /// to become, all but its definition and locks.
    pub fn hand_over(&self, name: &VmName, uid: u32, gid: u32) -> Result<(), StoreError> {
        Ok(crate::ownership::hand_over(&self.vm_dir(name), uid, gid)?)
    }

    /// Stores a new VM.
    pub fn create(&self, name: &VmName, config: &VmConfig) -> Result<(), StoreError> {
        let definition = self.toml(name, config)?;
        private_dir(&self.root)?;
        private_dir(&self.root.join("vms"))?;
        let dir = self.vm_dir(name);
        match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && self.exists(name) => {
                return Err(StoreError::Exists(name.clone()))
            }
            // A directory left by an interrupted `vm new`: reuse it, if it
            // is still private.
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => private_dir(&dir)?,
            Err(e) => return Err(io("create", &dir)(e)),
        }
        let _held = lock::lock(&dir.join("lock"), true)?;
        write_atomic(&self.definition(name), definition.as_bytes())
    }

    /// `config` as its definition file holds it.
    fn toml(&self, name: &VmName, config: &VmConfig) -> Result<String, StoreError> {
        config.to_toml().map_err(|source| StoreError::Config {
            name: name.clone(),
            source,
        })
    }

    /// Makes the private directory of a VM that is not defined yet (one
    /// arriving by migration: its definition is written once it runs).
    pub fn reserve(&self, name: &VmName) -> Result<PathBuf, StoreError> {
        if self.exists(name) {
            return Err(StoreError::Exists(name.clone()));
        }
        private_dir(&self.root)?;
        private_dir(&self.root.join("vms"))?;
        let dir = self.vm_dir(name);
        private_dir(&dir)?;
        Ok(dir)
    }

    /// Reads a VM's definition.
    pub fn load(&self, name: &VmName) -> Result<VmConfig, StoreError> {
        self.must_exist(name)?;
        let path = self.definition(name);
        let text = read_own(&path)?;
        VmConfig::resolve_text(Some((&path, &text)), Overrides::default()).map_err(|source| {
            StoreError::Config {
                name: name.clone(),
                source,
            }
        })
    }

    /// The VM's state as the files show it.
    pub fn state(&self, name: &VmName) -> VmState {
        let dir = self.vm_dir(name);
        if lock::is_held(&dir.join("run.lock")) {
            VmState::Live
        } else if nonempty(self.vm_dir(name).join("saved")) {
            VmState::Saved
        } else {
            VmState::Off
        }
    }

    fn has_saved_state(&self, name: &VmName) -> bool {
        let dir = self.vm_dir(name);
        nonempty(dir.join("saved")) || nonempty(self.checkpoints(name).root().to_owned())
    }

    /// Writes a VM's definition; the caller holds its command lock.
    pub fn write_definition(&self, name: &VmName, config: &VmConfig) -> Result<(), StoreError> {
        self.must_exist(name)?;
        write_atomic(&self.definition(name), self.toml(name, config)?.as_bytes())
    }

    /// Changes settings; refused while the VM runs (none of them can change live).
    pub fn set(&self, name: &VmName, over: Overrides) -> Result<VmConfig, StoreError> {
        let _held = self.lock(name)?;
        let current = self.load(name)?;
        if self.state(name) == VmState::Live {
            return Err(StoreError::Running {
                name: name.clone(),
                what: "kernel, initrd, cmdline, cpus, memory and nested".into(),
            });
        }
        let next = current.with(over).map_err(|source| StoreError::Config {
            name: name.clone(),
            source,
        })?;
        write_atomic(&self.definition(name), self.toml(name, &next)?.as_bytes())?;
        Ok(next)
    }

    /// Removes a VM; refused while it runs, and (without `force`) when it
    /// has a saved state or checkpoints.
    pub fn remove(&self, name: &VmName, force: bool) -> Result<(), StoreError> {
        let held = self.lock(name)?;
        if self.state(name) == VmState::Live {
            return Err(StoreError::Running {
                name: name.clone(),
                what: "a running VM".into(),
            });
        }
        if self.has_saved_state(name) && !force {
            return Err(StoreError::HasSavedState(name.clone()));
        }
        let dir = self.vm_dir(name);
        // Remove the definition first: an interrupted rm leaves no half VM.
        let def = self.definition(name);
        std::fs::remove_file(&def).map_err(io("remove", &def))?;
        drop(held);
        std::fs::remove_dir_all(&dir).map_err(io("remove", &dir))
    }

    /// Every VM, by name.
    pub fn list(&self) -> Result<Vec<VmName>, StoreError> {
        let dir = self.root.join("vms");
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(vec![]),
            Err(e) => return Err(io("read", &dir)(e)),
        };
        let mut names: Vec<VmName> = entries
            .flatten()
            .filter_map(|e| VmName::new(&e.file_name().to_string_lossy()).ok())
            .filter(|n| self.exists(n))
            .collect();
        names.sort();
        Ok(names)
    }
}

/// Whether `p` is a directory with something in it.
fn nonempty(p: PathBuf) -> bool {
    std::fs::read_dir(p).is_ok_and(|mut d| d.next().is_some())
}

#[cfg(test)]
mod tests {
    use super::*;
    use nestvm_config::NestedMode;
    use std::os::unix::fs::PermissionsExt;

    fn store(tag: &str) -> Store {
        let root = std::env::temp_dir().join(format!("nestvm-store-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        Store::locate(Some(root))
    }

    /// A state directory nestvm makes is 0700; an existing one is never
    /// chmodded, and one that others can write is refused and left as it
    /// was.
    #[test]
    fn state_directories_are_private_and_never_chmodded() {
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o7777;
        let s = store("private");
        let name = VmName::new("a").unwrap();
        s.create(&name, &config()).unwrap();
        assert_eq!(mode(&s.root), 0o700);
        assert_eq!(mode(&s.vm_dir(&name)), 0o700);
        let def = s.vm_dir(&name).join("vm.toml");
        assert_eq!(mode(&def), 0o600);

        let shared = store("shared");
        std::fs::create_dir_all(&shared.root).unwrap();
        std::fs::set_permissions(&shared.root, std::fs::Permissions::from_mode(0o777)).unwrap();
        let e = shared.create(&name, &config()).unwrap_err();
        assert!(
            matches!(e, StoreError::SharedDir { mode: 0o777, .. }),
            "{e}"
        );
        assert!(e.to_string().contains("chmod go-w"), "{e}");
        assert_eq!(mode(&shared.root), 0o777, "left as it was");
        assert!(!shared.root.join("vms").exists());

        // Readable by others but writable only by its owner: used as is.
        let open = store("readable");
        std::fs::create_dir_all(&open.root).unwrap();
        std::fs::set_permissions(&open.root, std::fs::Permissions::from_mode(0o755)).unwrap();
        open.create(&name, &config()).unwrap();
        assert_eq!(mode(&open.root), 0o755);

        let file = store("file");
        std::fs::write(&file.root, b"").unwrap();
        assert!(matches!(
            file.create(&name, &config()),
            Err(StoreError::NotADir(_))
        ));
        for s in [s, shared, open] {
            let _ = std::fs::remove_dir_all(&s.root);
        }
        let _ = std::fs::remove_file(&file.root);
    }

    fn config() -> VmConfig {
        VmConfig {
            kernel: "/boot/vmlinuz".into(),
            initrd: None,
            cmdline: "console=ttyS0".into(),
            cpus: 2,
            memory: 1 << 30,
            nested: NestedMode::Auto,
            disks: vec![],
            nets: vec![],
            balloon: None,
            logs: Default::default(),
            vsock: None,
        }
    }

    fn name(s: &str) -> VmName {
        VmName::new(s).unwrap()
    }

    #[test]
    fn new_list_show_set_rm() {
        let s = store("crud");
        assert!(s.list().unwrap().is_empty());
        s.create(&name("b"), &config()).unwrap();
        s.create(&name("a"), &config()).unwrap();
        assert_eq!(s.list().unwrap(), vec![name("a"), name("b")]);
        assert!(matches!(
            s.create(&name("a"), &config()),
            Err(StoreError::Exists(_))
        ));
        assert_eq!(s.load(&name("a")).unwrap(), config());
        assert_eq!(s.state(&name("a")), VmState::Off);
        let changed = s
            .set(
                &name("a"),
                Overrides {
                    cpus: Some(4),
                    nested: Some(NestedMode::On),
                    ..Default::default()
                },
            )
            .unwrap();
        assert_eq!((changed.cpus, changed.nested), (4, NestedMode::On));
        assert_eq!(s.load(&name("a")).unwrap(), changed);
        let bad = s.set(
            &name("a"),
            Overrides {
                memory: Some("1M".into()),
                ..Default::default()
            },
        );
        assert!(matches!(bad, Err(StoreError::Config { .. })));
        assert_eq!(
            s.load(&name("a")).unwrap(),
            changed,
            "a refused change leaves the file as it was"
        );
        s.remove(&name("a"), false).unwrap();
        assert_eq!(s.list().unwrap(), vec![name("b")]);
        assert!(matches!(s.load(&name("a")), Err(StoreError::NotFound(_))));
        assert!(matches!(
            s.remove(&name("a"), false),
            Err(StoreError::NotFound(_))
        ));
    }

    #[test]
    fn directories_are_private() {
        let s = store("perm");
        s.create(&name("p"), &config()).unwrap();
        for p in [
            s.root().to_owned(),
            s.root().join("vms"),
            s.vm_dir(&name("p")),
        ] {
            let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o700, "{}", p.display());
        }
        let def = std::fs::metadata(s.vm_dir(&name("p")).join("vm.toml")).unwrap();
        assert_eq!(def.permissions().mode() & 0o777, 0o600);
    }

    #[test]
    fn a_running_vm_refuses_set_and_rm() {
        let s = store("run");
        s.create(&name("r"), &config()).unwrap();
        let run = lock::lock(&s.vm_dir(&name("r")).join("run.lock"), false).unwrap();
        assert_eq!(s.state(&name("r")), VmState::Live);
        let e = s
            .set(
                &name("r"),
                Overrides {
                    cpus: Some(1),
                    ..Default::default()
                },
            )
            .unwrap_err();
        assert!(e.to_string().contains("is running"), "{e}");
        assert!(matches!(
            s.remove(&name("r"), true),
            Err(StoreError::Running { .. })
        ));
        drop(run);
        assert_eq!(s.state(&name("r")), VmState::Off);
    }

    #[test]
    fn saved_state_needs_force() {
        let s = store("saved");
        s.create(&name("s"), &config()).unwrap();
        let saved = s.vm_dir(&name("s")).join("saved");
        std::fs::create_dir_all(&saved).unwrap();
        std::fs::write(saved.join("state"), b"x").unwrap();
        assert_eq!(s.state(&name("s")), VmState::Saved);
        assert!(matches!(
            s.remove(&name("s"), false),
            Err(StoreError::HasSavedState(_))
        ));
        assert!(s.exists(&name("s")));
        s.remove(&name("s"), true).unwrap();
        assert!(!s.exists(&name("s")));
    }

    #[test]
    fn locate_prefers_flag_then_environment() {
        assert_eq!(Store::locate(Some("/x".into())).root(), Path::new("/x"));
    }
}
