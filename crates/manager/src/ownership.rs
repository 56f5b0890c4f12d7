//! Who owns a VM's directory, for a VMM that gives up root.
//!
//! A VMM started as root becomes an unprivileged user before its guest
//! runs (`nestvm_vmm::privileges`), and must still write its logs, saves
//! and checkpoints: [`hand_over`] gives it the VM's directory and all in
//! it but the files root keeps ([`ROOT_KEPT`]: the definition and the
//! locks), which it can then neither read nor change in place.
//!
//! What that user left there is not trusted. Before root reads any of it
//! again (a command taking the VM's lock, `vm serve` starting it),
//! [`reclaim`] takes it all back, and refuses — changing nothing it has not
//! checked — a directory where anything was planted that nestvm never
//! makes: a symbolic link (root would follow it out of the directory), a
//! FIFO or device, a file with other names elsewhere, a tree deeper than
//! nestvm's, or a kept file that is no longer root's (the definition
//! swapped for another).

use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use nix::unistd::{Gid, Uid};

/// The files a VM's directory keeps as its owner's, whoever its VMM runs
/// as: its definition, the command lock and the run lock.
pub const ROOT_KEPT: &[&str] = &["vm.toml", "lock", "run.lock"];
/// How deep nestvm's own layout goes (`checkpoints/NAME/FILE`), with room.
const MAX_DEPTH: usize = 6;
/// Entries walked at most (a VM's checkpoints included).
const MAX_ENTRIES: usize = 100_000;

/// Errors of handing a directory over or taking it back.
#[derive(Debug, thiserror::Error)]
pub enum OwnershipError {
    /// Something nestvm never makes in a VM's directory.
    #[error("{} is {what}, which nestvm never makes there: its VMM may have been compromised; inspect the VM's directory and remove it", path.display())]
    Planted {
        /// Where.
        path: PathBuf,
        /// What it is.
        what: &'static str,
    },
    /// A file root keeps that someone else now owns.
    #[error("{} belongs to uid {owner}, not to the VM's owner: it was replaced (its VMM may have been compromised); inspect it and restore it", path.display())]
    Replaced {
        /// The file.
        path: PathBuf,
        /// Its owner now.
        owner: u32,
    },
    /// A file operation.
    #[error("cannot {what} {}", path.display())]
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

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> OwnershipError {
    let path = path.to_owned();
    move |source| OwnershipError::Io { what, path, source }
}

/// Changes the owner of `path` itself, never of what a link names.
fn lchown(path: &Path, uid: u32, gid: u32) -> Result<(), OwnershipError> {
    nix::unistd::fchownat(
        None,
        path,
        Some(Uid::from_raw(uid)),
        Some(Gid::from_raw(gid)),
        nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
    )
    .map_err(|e| io("change the owner of", path)(e.into()))
}

/// Every entry under `dir` (not `dir` itself), parents before children,
/// with its metadata (never following links), except the kept files at its
/// top.
fn entries(dir: &Path) -> Result<Vec<(PathBuf, std::fs::Metadata)>, OwnershipError> {
    let mut out = Vec::new();
    let mut todo = vec![(dir.to_owned(), 0usize)];
    while let Some((d, depth)) = todo.pop() {
        for e in std::fs::read_dir(&d).map_err(io("list", &d))? {
            let e = e.map_err(io("list", &d))?;
            let path = e.path();
            if depth == 0 && ROOT_KEPT.iter().any(|k| e.file_name() == *k) {
                continue;
            }
            let m = std::fs::symlink_metadata(&path).map_err(io("inspect", &path))?;
            if m.is_dir() {
                if depth + 1 >= MAX_DEPTH {
                    return Err(OwnershipError::Planted {
                        path,
                        what: "a folder deeper than nestvm's own",
                    });
                }
                todo.push((path.clone(), depth + 1));
            }
            out.push((path, m));
            if out.len() > MAX_ENTRIES {
                return Err(OwnershipError::Planted {
                    path: dir.to_owned(),
                    what: "a folder with more entries than nestvm makes",
                });
            }
        }
    }
    Ok(out)
}

/// Gives VM directory `dir` and what is in it, but [`ROOT_KEPT`], to
/// `uid`:`gid`.
pub fn hand_over(dir: &Path, uid: u32, gid: u32) -> Result<(), OwnershipError> {
    for (path, _) in entries(dir)? {
        lchown(&path, uid, gid)?;
    }
    lchown(dir, uid, gid)
}

/// What an entry is, if it is something nestvm never makes.
fn planted(m: &std::fs::Metadata) -> Option<&'static str> {
    let t = m.file_type();
    if t.is_symlink() {
        Some("a symbolic link")
    } else if t.is_fifo() {
        Some("a FIFO")
    } else if t.is_block_device() || t.is_char_device() {
        Some("a device node")
    } else if t.is_file() && m.nlink() > 1 {
        Some("a file with other names (a hard link)")
    } else {
        None
    }
}

/// Takes VM directory `dir` back for this process's user (see the module's
/// header); checks everything before it changes anything.
pub fn reclaim(dir: &Path) -> Result<(), OwnershipError> {
    let (me, group) = (Uid::effective().as_raw(), Gid::effective().as_raw());
    for kept in ROOT_KEPT {
        let path = dir.join(kept);
        match std::fs::symlink_metadata(&path) {
            Ok(m) if !m.is_file() => {
                let what = planted(&m).unwrap_or("not a plain file");
                return Err(OwnershipError::Planted { path, what });
            }
            Ok(m) if m.uid() != me => {
                return Err(OwnershipError::Replaced {
                    path,
                    owner: m.uid(),
                })
            }
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io("inspect", &path)(e)),
        }
    }
    let all = entries(dir)?;
    if let Some((path, what)) = all
        .iter()
        .find_map(|(p, m)| planted(m).map(|w| (p.clone(), w)))
    {
        return Err(OwnershipError::Planted { path, what });
    }
    lchown(dir, me, group)?;
    for (path, m) in &all {
        if m.uid() != me || m.gid() != group {
            lchown(path, me, group)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("nestvm-own-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(d.join("checkpoints/c1")).unwrap();
        for f in ["vm.toml", "lock", "vmm.log", "checkpoints/c1/memory"] {
            std::fs::write(d.join(f), b"x").unwrap();
        }
        d
    }

    fn owner(p: &Path) -> u32 {
        std::fs::symlink_metadata(p).unwrap().uid()
    }

    #[test]
    fn a_directory_is_handed_over_but_its_definition_and_locks_and_back() {
        if !Uid::effective().is_root() {
            eprintln!("SKIPPED: needs root to give files away");
            return;
        }
        let d = scratch("round");
        hand_over(&d, 64003, 64003).unwrap();
        for f in ["", "vmm.log", "checkpoints", "checkpoints/c1/memory"] {
            assert_eq!(owner(&d.join(f)), 64003, "{f}");
        }
        assert_eq!((owner(&d.join("vm.toml")), owner(&d.join("lock"))), (0, 0));
        reclaim(&d).unwrap();
        for f in ["", "vmm.log", "checkpoints/c1/memory"] {
            assert_eq!(owner(&d.join(f)), 0, "{f}");
        }
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn what_nestvm_never_makes_is_refused_and_nothing_changes() {
        let d = scratch("planted");
        std::os::unix::fs::symlink("/etc/shadow", d.join("checkpoints/c1/disk0")).unwrap();
        let e = reclaim(&d).unwrap_err().to_string();
        assert!(e.contains("disk0 is a symbolic link"), "{e}");
        std::fs::remove_file(d.join("checkpoints/c1/disk0")).unwrap();
        std::fs::hard_link(d.join("vmm.log"), d.join("checkpoints/c1/state")).unwrap();
        let e = reclaim(&d).unwrap_err().to_string();
        assert!(e.contains("hard link"), "{e}");
        std::fs::remove_file(d.join("checkpoints/c1/state")).unwrap();
        nix::unistd::mkfifo(&d.join("saved"), nix::sys::stat::Mode::S_IRWXU).unwrap();
        assert!(reclaim(&d).unwrap_err().to_string().contains("FIFO"));
        std::fs::remove_file(d.join("saved")).unwrap();
        std::fs::remove_file(d.join("vm.toml")).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", d.join("vm.toml")).unwrap();
        assert!(reclaim(&d)
            .unwrap_err()
            .to_string()
            .contains("vm.toml is a symbolic link"));
        std::fs::remove_file(d.join("vm.toml")).unwrap();
        let mut deep = d.join("checkpoints");
        for i in 0..8 {
            deep = deep.join(format!("d{i}"));
        }
        std::fs::create_dir_all(&deep).unwrap();
        assert!(reclaim(&d).unwrap_err().to_string().contains("deeper"));
        std::fs::remove_dir_all(d.join("checkpoints/d0")).unwrap();
        reclaim(&d).unwrap();
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn a_definition_someone_else_owns_is_refused() {
        if !Uid::effective().is_root() {
            eprintln!("SKIPPED: needs root to give files away");
            return;
        }
        let d = scratch("replaced");
        lchown(&d.join("vm.toml"), 64003, 64003).unwrap();
        let e = reclaim(&d).unwrap_err().to_string();
        assert!(e.contains("vm.toml belongs to uid 64003"), "{e}");
        let _ = std::fs::remove_dir_all(&d);
    }
}
