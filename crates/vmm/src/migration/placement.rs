//! Where an arriving VM's disks and network adapters are on this host: the
//! receiver decides, never the sender alone. The sender's definition names
//! the source host's disk paths and TAPs; the receiver's user says, for
//! each, where it is here (`vm receive --disk OLD=NEW`, `--tap OLD=NEW`;
//! `--disk OLD` keeps the path), or accepts the sender's names wholesale
//! (`--same-paths`). Either way, before any memory moves, each disk must
//! be an existing regular file that no other process holds locked — the
//! sender's own VMM excepted, when it migrates on this same host (it lets
//! go of its locks at the handover) — and each TAP must exist.

use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};

use crate::config::VmConfig;

/// What the receiver's user said about the arriving VM's host resources.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Placement {
    /// `(the sender's path, the path here)` for each disk.
    pub disks: Vec<(PathBuf, PathBuf)>,
    /// `(the sender's TAP, the TAP here)` for each adapter.
    pub taps: Vec<(String, String)>,
    /// Disks and TAPs not named keep the sender's names.
    pub same_paths: bool,
}

/// Why the arriving VM cannot be placed here.
#[derive(Debug, thiserror::Error)]
pub enum PlacementError {
    /// A `--disk` names no disk of the VM.
    #[error("--disk {} names no disk of the arriving VM (its disks: {have})", .old.display())]
    UnknownDisk {
        /// The path named.
        old: PathBuf,
        /// The VM's disks.
        have: String,
    },
    /// A `--tap` names no adapter of the VM.
    #[error("--tap {0} names no network adapter of the arriving VM (its TAPs: {1})")]
    UnknownTap(String, String),
    /// A disk of the VM was not placed.
    #[error("the arriving VM has disk {p}: say where it is here with --disk {p}=PATH (or --disk {p} for the same path, or --same-paths)", p = .0.display())]
    UnplacedDisk(PathBuf),
    /// An adapter of the VM was not placed.
    #[error("the arriving VM has a network adapter on TAP {0}: say which TAP it gets here with --tap {0}=TAP (or --tap {0}, or --same-paths)")]
    UnplacedTap(String),
    /// A disk image is not here.
    #[error("disk image {} does not exist here, or is neither a regular file nor a block device", .0.display())]
    MissingDisk(PathBuf),
    /// A disk image is locked by another process.
    #[error("disk image {} is in use by another process here{}: stop it, or give the VM another image with --disk", .path.display(), .pid.map(|p| format!(" (pid {p})")).unwrap_or_default())]
    DiskInUse {
        /// The image.
        path: PathBuf,
        /// A holder, when /proc/locks names one.
        pid: Option<u32>,
    },
    /// A TAP is not here.
    #[error("TAP {0} does not exist here: create it (ip tuntap add {0} mode tap) or give another with --tap")]
    MissingTap(String),
}

/// Who sends a VM, so that a receiver on the same host can tell the
/// sender's own disk locks from another VM's.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Source {
    /// The sending host's boot ID (`/proc/sys/kernel/random/boot_id`).
    pub boot_id: String,
    /// The sending VMM's process ID.
    pub pid: u32,
}

impl Source {
    /// This process, on this host.
    pub fn this_process() -> Source {
        Source {
            boot_id: boot_id(),
            pid: std::process::id(),
        }
    }
}

fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

impl Placement {
    /// Rewrites `config`'s disk paths and TAPs to this host's, as the
    /// user said; refuses names the VM does not have and resources the
    /// user did not place. Nothing is opened.
    pub fn rewrite(&self, config: &mut VmConfig) -> Result<(), PlacementError> {
        let list = |v: Vec<String>| match v.is_empty() {
            true => "none".to_owned(),
            false => v.join(", "),
        };
        for (old, _) in &self.disks {
            if !config.disks.iter().any(|d| &d.path == old) {
                let have = config.disks.iter().map(|d| d.path.display().to_string());
                return Err(PlacementError::UnknownDisk {
                    old: old.clone(),
                    have: list(have.collect()),
                });
            }
        }
        for (old, _) in &self.taps {
            if !config.nets.iter().any(|n| !n.user && &n.tap == old) {
                let have = config
                    .nets
                    .iter()
                    .filter(|n| !n.user)
                    .map(|n| n.tap.clone())
                    .collect();
                return Err(PlacementError::UnknownTap(old.clone(), list(have)));
            }
        }
        for d in &mut config.disks {
            match self.disks.iter().find(|(old, _)| *old == d.path) {
                Some((_, here)) => d.path = here.clone(),
                None if self.same_paths => {}
                None => return Err(PlacementError::UnplacedDisk(d.path.clone())),
            }
        }
        // A user-mode adapter needs nothing placed: the VM's new process
        // starts its own passt.
        for n in config.nets.iter_mut().filter(|n| !n.user) {
            match self.taps.iter().find(|(old, _)| *old == n.tap) {
                Some((_, here)) => n.tap = here.clone(),
                None if self.same_paths => {}
                None => return Err(PlacementError::UnplacedTap(n.tap.clone())),
            }
        }
        // The sender does not say where this host listens: an arriving VM's
        // vsock socket is its directory's own.
        if let Some(v) = &mut config.vsock {
            v.socket = None;
        }
        Ok(())
    }
}

/// Checks that every disk and TAP of the (placed) `config` is here and
/// free: each disk a regular file no process but `source` holds locked
/// against the VM's use, each TAP an existing TAP device.
pub fn check_here(config: &VmConfig, source: &Source) -> Result<(), PlacementError> {
    for d in &config.disks {
        check_disk(&d.path, d.readonly, source)?;
    }
    for n in config.nets.iter().filter(|n| !n.user) {
        if !Path::new("/sys/class/net")
            .join(&n.tap)
            .join("tun_flags")
            .exists()
        {
            return Err(PlacementError::MissingTap(n.tap.clone()));
        }
    }
    Ok(())
}

fn check_disk(path: &Path, readonly: bool, source: &Source) -> Result<(), PlacementError> {
    let missing = || PlacementError::MissingDisk(path.to_owned());
    // Not followed into FIFOs or character devices: only regular files and
    // block devices are disks.
    let meta = std::fs::metadata(path).map_err(|_| missing())?;
    if !meta.is_file() && !std::os::unix::fs::FileTypeExt::is_block_device(&meta.file_type()) {
        return Err(missing());
    }
    // Never blocks: the path may have become a FIFO since it was looked at.
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(|_| missing())?;
    let arg = match readonly {
        true => FlockArg::LockSharedNonblock,
        false => FlockArg::LockExclusiveNonblock,
    };
    // Free: the lock the VM will take is to be had (and let go at once).
    if Flock::lock(file, arg).is_ok() {
        return Ok(());
    }
    let holders = std::fs::read_to_string("/proc/locks")
        .map(|t| flock_holders(&t, meta.dev(), meta.ino()))
        .unwrap_or_default();
    let ours = !source.boot_id.is_empty() && source.boot_id == boot_id();
    let seen = !holders.is_empty();
    let others: Vec<u32> = holders
        .into_iter()
        .filter(|&p| !(ours && p == source.pid))
        .collect();
    // Held only by the sender migrating on this host, as /proc/locks shows:
    // a lock nobody is seen holding (another file system's numbering) is
    // someone else's.
    if seen && others.is_empty() && ours {
        return Ok(());
    }
    Err(PlacementError::DiskInUse {
        path: path.to_owned(),
        pid: others.first().copied(),
    })
}

/// The processes holding a flock on the file `(dev, ino)`, from the text
/// of /proc/locks (`N: FLOCK ADVISORY WRITE PID MAJ:MIN:INODE 0 EOF`, the
/// device numbers in hex; waiters marked `->` are not holders).
fn flock_holders(text: &str, dev: u64, ino: u64) -> Vec<u32> {
    let want = format!(
        "{:02x}:{:02x}:{ino}",
        nix::sys::stat::major(dev),
        nix::sys::stat::minor(dev)
    );
    text.lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            match f.as_slice() {
                [_, "FLOCK", _, _, pid, file, ..] if *file == want => pid.parse().ok(),
                _ => None,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adapters::{DiskConfig, NetConfig};
    use crate::config::NestedMode;

    fn vm(disks: &[&str], taps: &[&str]) -> VmConfig {
        VmConfig {
            kernel: "/k".into(),
            initrd: None,
            cmdline: String::new(),
            cpus: 1,
            memory: 16 << 20,
            nested: NestedMode::Off,
            disks: disks
                .iter()
                .map(|p| DiskConfig {
                    path: p.into(),
                    readonly: false,
                    serial: None,
                })
                .collect(),
            nets: taps
                .iter()
                .map(|t| NetConfig {
                    tap: t.to_string(),
                    mac: None,
                    mac_spoofing: false,
                    ..Default::default()
                })
                .collect(),
            balloon: None,
            logs: Default::default(),
            vsock: None,
        }
    }

    #[test]
    fn each_disk_and_tap_goes_where_the_receiver_says() {
        let p = Placement {
            disks: vec![("/src/a.img".into(), "/here/a.img".into())],
            taps: vec![("tap0".into(), "tap7".into())],
            same_paths: false,
        };
        let mut c = vm(&["/src/a.img"], &["tap0"]);
        p.rewrite(&mut c).unwrap();
        assert_eq!(c.disks[0].path, Path::new("/here/a.img"));
        assert_eq!(c.nets[0].tap, "tap7");
    }

    #[test]
    fn the_senders_names_are_refused_unless_the_receiver_takes_them() {
        let mut c = vm(&["/src/a.img", "/etc/shadow"], &[]);
        let p = Placement {
            disks: vec![("/src/a.img".into(), "/here/a.img".into())],
            ..Default::default()
        };
        let e = p.rewrite(&mut c.clone()).unwrap_err();
        assert!(
            matches!(e, PlacementError::UnplacedDisk(ref d) if d == Path::new("/etc/shadow")),
            "{e}"
        );
        let e = Placement::default()
            .rewrite(&mut vm(&[], &["tap0"]))
            .unwrap_err();
        assert!(matches!(e, PlacementError::UnplacedTap(_)), "{e}");
        let same = Placement {
            same_paths: true,
            ..p
        };
        same.rewrite(&mut c).unwrap();
        assert_eq!(c.disks[1].path, Path::new("/etc/shadow"));
    }

    #[test]
    fn a_mapping_for_something_the_vm_does_not_have_is_refused() {
        let p = Placement {
            disks: vec![("/nope.img".into(), "/x.img".into())],
            ..Default::default()
        };
        let e = p.rewrite(&mut vm(&["/a.img"], &[])).unwrap_err();
        assert!(e.to_string().contains("its disks: /a.img"), "{e}");
        let p = Placement {
            taps: vec![("tap9".into(), "tap1".into())],
            ..Default::default()
        };
        let e = p.rewrite(&mut vm(&[], &[])).unwrap_err();
        assert!(e.to_string().contains("its TAPs: none"), "{e}");
    }

    #[test]
    fn proc_locks_lines_name_the_holders_of_one_file() {
        let text = "1: FLOCK  ADVISORY  WRITE 4242 fd:01:1234 0 EOF\n\
                    1: -> FLOCK  ADVISORY  WRITE 4343 fd:01:1234 0 EOF\n\
                    2: POSIX  ADVISORY  WRITE 99 fd:01:1234 0 EOF\n\
                    3: FLOCK  ADVISORY  READ  77 fd:01:999 0 EOF\n\
                    4: FLOCK  ADVISORY  READ  78 08:10:1234 0 EOF\n";
        let dev = nix::sys::stat::makedev(0xfd, 0x01);
        assert_eq!(flock_holders(text, dev, 1234), [4242]);
        assert!(flock_holders("garbage\n\n1:", dev, 1).is_empty());
    }

    #[test]
    fn a_disk_locked_by_another_process_is_refused_and_a_free_one_taken() {
        let dir = std::env::temp_dir().join(format!("nestvm-place-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let img = dir.join("d.img");
        std::fs::write(&img, [0u8; 512]).unwrap();
        let stranger = Source {
            boot_id: boot_id(),
            pid: 1,
        };
        check_disk(&img, false, &stranger).expect("nobody holds it");
        // Held by this process: refused for anyone else, taken for us.
        let held = Flock::lock(
            std::fs::File::open(&img).unwrap(),
            FlockArg::LockExclusiveNonblock,
        )
        .unwrap();
        let e = check_disk(&img, false, &stranger).unwrap_err();
        let me = std::process::id();
        assert!(
            matches!(e, PlacementError::DiskInUse { pid: Some(p), .. } if p == me),
            "{e}"
        );
        check_disk(&img, false, &Source::this_process()).expect("the sender's own lock");
        // The same pid on another host is someone else.
        let elsewhere = Source {
            boot_id: "another-host".into(),
            pid: me,
        };
        assert!(check_disk(&img, false, &elsewhere).is_err());
        drop(held);
        assert!(matches!(
            check_disk(&dir.join("none.img"), false, &stranger),
            Err(PlacementError::MissingDisk(_))
        ));
        assert!(check_disk(&dir, false, &stranger).is_err(), "a directory");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
