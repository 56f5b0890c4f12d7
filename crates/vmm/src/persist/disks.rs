//! A checkpoint's writable disks put back, under the images' locks.
//!
//! Every image is locked as virtio-blk locks a writable one (an exclusive
//! `flock`, never waited for) before any is replaced: a restore never
//! replaces an image that a running VM writes to (that VM would go on
//! writing to a deleted file and lose every later write), and a refusal
//! changes nothing. Each image is replaced by a temporary copy, synced and
//! locked, renamed over it. The locks are let go when the restore is done,
//! and the restored VM's disks take them again as they open the images: a
//! VM that opens an image in that instant makes the restore fail as "in
//! use", and has the restored image.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use nestvm_snapshot::layer::disk_file;
use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};

use super::PersistError;
use crate::adapters::DiskConfig;

fn disk_err(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> PersistError {
    let path = path.to_owned();
    move |source| PersistError::Disk { what, path, source }
}

/// The writable disks of `disks` that checkpoint `dir` holds copies of, as
/// (copy, image); an image reached through a symlink is the file it names.
fn copies(dir: &Path, disks: &[DiskConfig]) -> Vec<(PathBuf, PathBuf)> {
    disks
        .iter()
        .enumerate()
        .filter(|(_, d)| !d.readonly)
        .map(|(i, d)| {
            let image = std::fs::canonicalize(&d.path).unwrap_or_else(|_| d.path.clone());
            (dir.join(disk_file(i)), image)
        })
        .filter(|(copy, _)| copy.exists())
        .collect()
}

/// Takes the exclusive lock of the image at `path` without waiting; `None`
/// where there is no file (nothing can hold it).
fn lock(path: &Path) -> Result<Option<Flock<File>>, PersistError> {
    let file = match OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(disk_err("open", path)(e)),
    };
    match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(held) => Ok(Some(held)),
        Err((_, e)) if e == Errno::EWOULDBLOCK => Err(PersistError::DiskInUse(path.to_owned())),
        Err((_, e)) => Err(disk_err("lock", path)(e.into())),
    }
}

/// Refuses ([`PersistError::DiskInUse`]) if a running VM holds a writable
/// disk image that checkpoint `dir` would put back; holds no lock once it
/// returns. For a check before anything is stopped or removed.
pub fn check_disks_free(dir: &Path, disks: &[DiskConfig]) -> Result<(), PersistError> {
    for (_, image) in copies(dir, disks) {
        lock(&image)?;
    }
    Ok(())
}

/// Puts the writable disks of checkpoint `dir` back in place: all of them
/// locked first (refused, with nothing changed, if a running VM holds one),
/// then each replaced through a temporary file and a rename, so a crash
/// leaves the old or the new image, never a mix.
pub fn restore_disks(dir: &Path, disks: &[DiskConfig]) -> Result<(), PersistError> {
    let copies = copies(dir, disks);
    let mut held = Vec::with_capacity(2 * copies.len());
    for (_, image) in &copies {
        held.extend(lock(image)?);
    }
    for (copy, image) in &copies {
        held.extend(replace(copy, image)?);
    }
    drop(held);
    Ok(())
}

/// Copies disk image `src` (the VMM's own descriptor of it: a VMM that gave
/// up root may not be able to open it again by name) to `copy`, a new file
/// (0600), for a checkpoint. The kernel copies it (sharing blocks where the
/// filesystem can) at explicit offsets, so the device's reads and writes,
/// which name theirs, are not disturbed; where it cannot, it is read through.
pub(crate) fn copy_out(src: &File, copy: &Path) -> std::io::Result<()> {
    use std::io::{Seek, SeekFrom};
    use std::os::unix::fs::FileExt;
    // A block device's size is where its end is (its metadata says 0).
    let len = (&*src).seek(SeekFrom::End(0))?;
    let out = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(copy)?;
    let mut at: i64 = 0;
    while (at as u64) < len {
        let (mut from, mut to) = (at, at);
        let want = (len - at as u64).min(1 << 30) as usize;
        match nix::fcntl::copy_file_range(src, Some(&mut from), &out, Some(&mut to), want) {
            Ok(0) => break,
            Ok(n) => at += n as i64,
            Err(Errno::EXDEV | Errno::ENOSYS | Errno::EINVAL | Errno::EOPNOTSUPP) => {
                let mut buf = vec![0u8; 1 << 20];
                while (at as u64) < len {
                    let n = src.read_at(&mut buf, at as u64)?;
                    if n == 0 {
                        break;
                    }
                    out.write_all_at(&buf[..n], at as u64)?;
                    at += n as i64;
                }
            }
            Err(e) => return Err(e.into()),
        }
    }
    out.set_len(at as u64)
}

fn is_block_device(path: &Path) -> bool {
    use std::os::unix::fs::FileTypeExt;
    std::fs::metadata(path).is_ok_and(|m| m.file_type().is_block_device())
}

/// Writes `copy` back over block device `image`, in place (a device cannot
/// be renamed over: a crash midway leaves it part old, part new, and the
/// checkpoint's copy there to restore again). The lock on it stays the one
/// [`restore_disks`] took before.
fn write_back(copy: &Path, image: &Path) -> Result<(), PersistError> {
    let mut src = File::open(copy).map_err(disk_err("open the checkpoint's copy", copy))?;
    let mut out = OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(image)
        .map_err(disk_err("open", image))?;
    std::io::copy(&mut src, &mut out).map_err(disk_err("copy back", image))?;
    out.sync_all().map_err(disk_err("sync", image))
}

/// Replaces `image` by a copy of `copy` (with the image's permissions);
/// returns the lock on the new file, taken before it is renamed in place.
/// A block device is written back in place instead (no new lock: the one
/// taken on it before holds).
fn replace(copy: &Path, image: &Path) -> Result<Option<Flock<File>>, PersistError> {
    if is_block_device(image) {
        return write_back(copy, image).map(|()| None);
    }
    let tmp = image.with_extension("nestvm-restore.tmp");
    // What a restore that crashed left; never followed if it is a link.
    let _ = std::fs::remove_file(&tmp);
    let mode = std::fs::metadata(image)
        .or_else(|_| std::fs::metadata(copy))
        .map_or(0o600, |m| m.permissions().mode() & 0o7777);
    let mut src = File::open(copy).map_err(disk_err("open the checkpoint's copy", copy))?;
    let mut out = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(disk_err("create", &tmp))?;
    std::io::copy(&mut src, &mut out).map_err(disk_err("copy back", image))?;
    out.set_permissions(std::fs::Permissions::from_mode(mode))
        .map_err(disk_err("set the permissions of", &tmp))?;
    out.sync_all().map_err(disk_err("sync", &tmp))?;
    let held = Flock::lock(out, FlockArg::LockExclusiveNonblock)
        .map_err(|(_, e)| disk_err("lock", &tmp)(e.into()))?;
    std::fs::rename(&tmp, image).map_err(disk_err("put back", image))?;
    nestvm_snapshot::atomic::sync_dir(image.parent().unwrap_or(Path::new(".")))?;
    Ok(Some(held))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    fn scratch(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("nestvm-disks-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn disk(path: &Path, readonly: bool) -> DiskConfig {
        DiskConfig {
            path: path.to_owned(),
            readonly,
            serial: None,
        }
    }

    #[test]
    fn an_image_held_by_a_vm_is_never_replaced() {
        let d = scratch("held");
        let (a, b) = (d.join("a.img"), d.join("b.img"));
        std::fs::write(&a, b"a now").unwrap();
        std::fs::write(&b, b"b now").unwrap();
        std::fs::write(d.join(disk_file(0)), b"a then").unwrap();
        std::fs::write(d.join(disk_file(1)), b"b then").unwrap();
        let disks = [disk(&a, false), disk(&b, false)];
        // A running VM holds b as virtio-blk does: nothing is replaced,
        // not even a, which comes first.
        let vm = Flock::lock(File::open(&b).unwrap(), FlockArg::LockExclusiveNonblock).unwrap();
        let inode = std::fs::metadata(&b).unwrap().ino();
        for e in [
            check_disks_free(&d, &disks).unwrap_err(),
            restore_disks(&d, &disks).unwrap_err(),
        ] {
            assert!(
                matches!(&e, PersistError::DiskInUse(p) if p.ends_with("b.img")),
                "{e}"
            );
            assert!(e.to_string().contains("nothing was changed"), "{e}");
        }
        assert_eq!(std::fs::read(&a).unwrap(), b"a now");
        assert_eq!(std::fs::read(&b).unwrap(), b"b now");
        assert_eq!(std::fs::metadata(&b).unwrap().ino(), inode);
        drop(vm);
        check_disks_free(&d, &disks).unwrap();
        restore_disks(&d, &disks).unwrap();
        assert_eq!(std::fs::read(&a).unwrap(), b"a then");
        assert_eq!(std::fs::read(&b).unwrap(), b"b then");
        // No lock outlives the restore, and no temporary file is left.
        check_disks_free(&d, &disks).unwrap();
        assert!(!d.join("a.nestvm-restore.tmp").exists());
    }

    #[test]
    fn read_only_disks_and_links() {
        let d = scratch("links");
        let real = d.join("real.img");
        let link = d.join("link.img");
        std::fs::write(&real, b"now").unwrap();
        std::os::unix::fs::symlink(&real, &link).unwrap();
        std::fs::write(d.join(disk_file(0)), b"then").unwrap();
        std::fs::write(d.join(disk_file(1)), b"never").unwrap();
        let ro = d.join("ro.img");
        std::fs::write(&ro, b"ro").unwrap();
        restore_disks(&d, &[disk(&link, false), disk(&ro, true)]).unwrap();
        // The file the link names is replaced; the link stays a link.
        assert!(std::fs::symlink_metadata(&link)
            .unwrap()
            .file_type()
            .is_symlink());
        assert_eq!(std::fs::read(&real).unwrap(), b"then");
        assert_eq!(std::fs::read(&ro).unwrap(), b"ro", "read-only: untouched");
    }
}
