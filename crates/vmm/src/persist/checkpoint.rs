//! Checkpoints: a VM's state at a moment, kept while the VM goes on, and
//! restorable any number of times.
//!
//! Checkpoints of a VM form a tree under `checkpoints/` in its directory;
//! each is a directory `NAME/` with:
//! - `state`: the [`crate::persist::VmSnapshot`] container, as a save writes;
//! - `memory`: a full-size sparse file holding only the pages whose content
//!   differs from the parent checkpoint's (for a root: the pages that are
//!   not all zeros);
//! - `pages`: a bitmap, one bit per 4 KiB page, of the pages `memory` holds;
//! - `meta.json`: name, parent, creation time, sizes;
//! - `disk-N.img`: a copy of each writable disk (restored with the memory,
//!   so the guest's page cache and its disk agree; put back only under the
//!   image's lock, never under a VM that runs on it: [`restore_disks`]).
//!
//! So a checkpoint costs the memory that changed since its parent, found by
//! comparing contents (which also catches pages written by devices, that
//! KVM's dirty log would not see). Restoring maps the root's memory
//! privately (lazily) and lays each descendant's pages over it. Removing a
//! checkpoint first folds its pages into each child, so children stay whole.
//!
//! The files' format (layers, metadata, names, folding) is
//! [`nestvm_snapshot::layer`]'s; this module writes and reads checkpoints of
//! a live VM with it.

use std::fs::File;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use nestvm_virtio::Memory;
use vm_memory::{Address, Bytes, GuestMemoryBackend, GuestMemoryRegion};

pub(crate) use nestvm_snapshot::layer::valid_name;
use nestvm_snapshot::layer::{chain, disk_file, write_meta, Layer, Meta, PAGE, PAGES_FILE};

pub use crate::persist::disks::{check_disks_free, restore_disks};
use crate::persist::{PersistError, RegionSnapshot};

fn io(what: &'static str) -> impl Fn(std::io::Error) -> PersistError {
    move |e| PersistError::Memory(what, e)
}

/// Writes the layer of a new checkpoint into `dir` (files `memory` and
/// `pages`): the pages of `mem` that differ from what `parent` (newest
/// first) holds. Returns the regions and the bytes written.
pub fn write_layer(
    mem: &Memory,
    parent: &[(PathBuf, Layer)],
    dir: &Path,
) -> Result<(Vec<RegionSnapshot>, u64, u64), PersistError> {
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(dir.join(crate::persist::MEMORY_FILE))
        .map_err(io("create the file for"))?;
    let total: u64 = mem.iter().map(|r| r.len()).sum();
    let mut bits = vec![0u8; total.div_ceil(PAGE).div_ceil(8) as usize];
    let mut regions = Vec::new();
    let (mut offset, mut written) = (0u64, 0u64);
    // Guest memory is read a run of pages at a time — only pages that may
    // hold data (`Residency`); the others are zeros without being read —
    // and each page is compared with the chain's page (or with zeros,
    // where no layer has it).
    const CHUNK: usize = 1 << 20;
    let mut chunk = vec![0u8; CHUNK];
    let zero = vec![0u8; PAGE as usize];
    let mut old = vec![0u8; PAGE as usize];
    for region in mem.iter() {
        regions.push(RegionSnapshot {
            guest_addr: region.start_addr().raw_value(),
            size: region.len(),
            file_offset: offset,
        });
        let data = nestvm_kvm::memory::Residency::of(mem, region);
        let mut p = 0;
        while p < data.len() {
            let (first, held) = (p, data[p]);
            while p < data.len() && data[p] == held && p - first < CHUNK / PAGE as usize {
                p += 1;
            }
            let at = first as u64 * PAGE;
            let len = ((p - first) as u64 * PAGE).min(region.len() - at) as usize;
            if held {
                mem.read_slice(&mut chunk[..len], region.start_addr().unchecked_add(at))
                    .map_err(|e| PersistError::Memory("read", std::io::Error::other(e)))?;
            }
            for i in 0..len.div_ceil(PAGE as usize) {
                let from = i * PAGE as usize;
                let n = (len - from).min(PAGE as usize);
                let cur = if held {
                    &chunk[from..from + n]
                } else {
                    &zero[..n]
                };
                let pos = offset + at + from as u64;
                let page = pos / PAGE;
                let differs = match parent.iter().find(|(_, l)| l.has(page)) {
                    Some((_, l)) => {
                        l.read(page, &mut old[..n])?;
                        cur != &old[..n]
                    }
                    None => held && !crate::persist::is_zero(cur),
                };
                if differs {
                    file.write_all_at(cur, pos).map_err(io("write"))?;
                    bits[(page / 8) as usize] |= 1 << (page % 8);
                    written += n as u64;
                }
            }
        }
        offset += region.len();
    }
    file.set_len(offset).map_err(io("size the file of"))?;
    file.sync_all().map_err(io("sync the file of"))?;
    nestvm_snapshot::atomic::write_synced(&dir.join(PAGES_FILE), &bits, 0o600)?;
    Ok((regions, offset, written))
}

/// Lays every layer above the root (oldest first) over `mem`, which was
/// mapped from the root's memory file.
pub fn apply_layers(
    mem: &Memory,
    regions: &[RegionSnapshot],
    chain: &[(PathBuf, Layer)],
) -> Result<(), PersistError> {
    let mut buf = vec![0u8; PAGE as usize];
    for (_, layer) in chain.iter().rev().skip(1) {
        for r in regions {
            let mut at = 0;
            while at < r.size {
                let p = (r.file_offset + at) / PAGE;
                if layer.has(p) {
                    let n = (r.size - at).min(PAGE) as usize;
                    layer.read(p, &mut buf[..n])?;
                    mem.write_slice(&buf[..n], vm_memory::GuestAddress(r.guest_addr + at))
                        .map_err(|e| PersistError::Memory("write", std::io::Error::other(e)))?;
                }
                at += PAGE;
            }
        }
    }
    Ok(())
}

/// Why `name` cannot be a new checkpoint under `root`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameRefusal {
    /// It is not a checkpoint name at all.
    #[error("invalid checkpoint name '{0}': use up to 64 letters, digits, '-', '_' or '.'")]
    Invalid(String),
    /// A checkpoint of that name exists.
    #[error("a checkpoint named '{0}' exists: pick another name")]
    Taken(String),
}

/// Checks that `name` can be a new checkpoint under `root`.
pub fn check_new_name(root: &Path, name: &str) -> Result<(), NameRefusal> {
    if !valid_name(name) {
        return Err(NameRefusal::Invalid(name.to_owned()));
    }
    if root.join(name).exists() {
        return Err(NameRefusal::Taken(name.to_owned()));
    }
    Ok(())
}

/// Takes checkpoint `name` of the paused VM described by `snap` with memory
/// `mem`, as a child of `parent`, under `root`: written into `NAME.tmp`,
/// fsynced, then published in one rename. `images` are the VMM's open
/// descriptors of its disk images, by disk (one missing is opened by name).
pub fn take(
    mut snap: crate::persist::VmSnapshot,
    mem: &Memory,
    images: &[Option<File>],
    root: &Path,
    (name, parent): (&str, Option<&str>),
) -> Result<Meta, PersistError> {
    check_new_name(root, name)?;
    let dir = root.join(name);
    let chain = match parent {
        Some(p) => chain(root, p)?,
        None => Vec::new(),
    };
    let staged = root.join(format!("{name}.tmp"));
    nestvm_snapshot::atomic::recover_dir(&staged, &dir);
    nestvm_snapshot::atomic::create_private_dir_all(&staged)
        .map_err(io("create the folder for"))?;
    let (regions, total, written) = write_layer(mem, &chain, &staged)?;
    snap.memory = regions;
    // Writable disks belong to the moment too: the guest's memory (its page
    // cache, its filesystem's view) must meet the disk as it was. The VM is
    // paused and disk requests are served on this thread, so nothing writes
    // them meanwhile (copy_out: blocks shared where the filesystem can).
    for (i, d) in snap
        .config
        .disks
        .iter()
        .enumerate()
        .filter(|(_, d)| !d.readonly)
    {
        let copy = staged.join(disk_file(i));
        let disk_err = |what| {
            let path = d.path.clone();
            move |source| PersistError::Disk { what, path, source }
        };
        let opened = match images.get(i) {
            Some(Some(f)) => f.try_clone(),
            _ => File::open(&d.path),
        };
        opened
            .and_then(|src| crate::persist::disks::copy_out(&src, &copy))
            .map_err(disk_err("copy"))?;
        File::open(&copy)
            .and_then(|f| f.sync_all())
            .map_err(disk_err("sync the copy of"))?;
    }
    let json = serde_json::to_vec(&snap).map_err(PersistError::Encode)?;
    nestvm_snapshot::atomic::write_synced(
        &staged.join(crate::persist::STATE_FILE),
        &nestvm_snapshot::container::encode(&json),
        0o600,
    )?;
    let meta = Meta {
        name: name.to_owned(),
        parent: parent.map(str::to_owned),
        created: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        memory_bytes: total,
        written_bytes: written,
    };
    write_meta(&staged, &meta)?;
    nestvm_snapshot::atomic::sync_dir(&staged)?;
    nestvm_snapshot::atomic::publish_dir(&staged, &dir)?;
    Ok(meta)
}

/// Guest memory for restoring checkpoint `name`: the root's memory file
/// mapped privately, with each later layer's pages laid over it.
pub fn memory(root: &Path, name: &str, regions: &[RegionSnapshot]) -> Result<Memory, PersistError> {
    let chain = chain(root, name)?;
    let (base_dir, _) = chain
        .last()
        .expect("a chain has at least its own checkpoint");
    let mem = crate::persist::map_memory(base_dir, regions)?;
    apply_layers(&mem, regions, &chain)?;
    Ok(mem)
}

#[cfg(test)]
mod tests {
    use super::*;
    use nestvm_snapshot::layer::{fold_into_child, read_meta};
    use vm_memory::GuestAddress;

    fn scratch(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("nestvm-ckpt-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn take(root: &Path, name: &str, parent: Option<&str>, mem: &Memory) -> u64 {
        let chain = match parent {
            Some(p) => chain(root, p).unwrap(),
            None => vec![],
        };
        let dir = root.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        let (_, total, written) = write_layer(mem, &chain, &dir).unwrap();
        std::fs::write(dir.join(crate::persist::STATE_FILE), name).unwrap();
        write_meta(
            &dir,
            &Meta {
                name: name.into(),
                parent: parent.map(Into::into),
                created: 0,
                memory_bytes: total,
                written_bytes: written,
            },
        )
        .unwrap();
        written
    }

    fn rebuild(root: &Path, name: &str, size: usize) -> Vec<u8> {
        let c = chain(root, name).unwrap();
        let mem = Memory::from_ranges(&[(GuestAddress(0), size)]).unwrap();
        let regions = [RegionSnapshot {
            guest_addr: 0,
            size: size as u64,
            file_offset: 0,
        }];
        // The root's pages, then the layers above it.
        let (_, base) = c.last().unwrap();
        let mut buf = vec![0u8; PAGE as usize];
        for p in 0..(size as u64 / PAGE) {
            if base.has(p) {
                base.read(p, &mut buf).unwrap();
                mem.write_slice(&buf, GuestAddress(p * PAGE)).unwrap();
            }
        }
        apply_layers(&mem, &regions, &c).unwrap();
        let mut out = vec![0u8; size];
        mem.read_slice(&mut out, GuestAddress(0)).unwrap();
        out
    }

    #[test]
    fn layers_hold_only_what_changed_and_rebuild_exactly() {
        let root = scratch("layers");
        let size = 64 * PAGE as usize;
        let mem = Memory::from_ranges(&[(GuestAddress(0), size)]).unwrap();
        mem.write_slice(&[1u8; 3 * 4096], GuestAddress(0)).unwrap();
        assert_eq!(
            take(&root, "a", None, &mem),
            3 * PAGE,
            "root: non-zero pages only"
        );
        let a = {
            let mut v = vec![0u8; size];
            mem.read_slice(&mut v, GuestAddress(0)).unwrap();
            v
        };
        // Change one page, zero another: two pages in the delta.
        mem.write_slice(&[2u8; 4096], GuestAddress(10 * PAGE))
            .unwrap();
        mem.write_slice(&[0u8; 4096], GuestAddress(PAGE)).unwrap();
        assert_eq!(take(&root, "b", Some("a"), &mem), 2 * PAGE);
        let b = {
            let mut v = vec![0u8; size];
            mem.read_slice(&mut v, GuestAddress(0)).unwrap();
            v
        };
        assert_eq!(take(&root, "c", Some("b"), &mem), 0, "nothing changed");
        assert_eq!(rebuild(&root, "a", size), a);
        assert_eq!(rebuild(&root, "b", size), b);
        assert_eq!(rebuild(&root, "c", size), b);
        // Remove b: fold it into c, which then stands on a alone.
        fold_into_child(
            &root.join("b"),
            &root.join("c"),
            &root.join("c.tmp"),
            Some("a".into()),
        )
        .unwrap();
        nestvm_snapshot::atomic::publish_dir(&root.join("c.tmp"), &root.join("c")).unwrap();
        std::fs::remove_dir_all(root.join("b")).unwrap();
        assert_eq!(
            read_meta(&root.join("c")).unwrap().parent.as_deref(),
            Some("a")
        );
        assert_eq!(rebuild(&root, "c", size), b);
    }
}
