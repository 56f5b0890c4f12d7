//! Checkpoints: a VM's state at a moment, kept while the VM goes on, and
//! restorable any number of times.
//!
//! Checkpoints of a VM form a tree under `checkpoints/` in its directory;
//! each is a directory `NAME/` with:
//! - `state`: the [`crate::snapshot::VmSnapshot`] container, as a save writes;
//! - `memory`: a full-size sparse file holding only the pages whose content
//!   differs from the parent checkpoint's (for a root: the pages that are
//!   not all zeros);
//! - `pages`: a bitmap, one bit per 4 KiB page, of the pages `memory` holds;
//! - `meta.json`: name, parent, creation time, sizes;
//! - `disk-N.img`: a copy of each writable disk (restored with the memory,
//!   so the guest's page cache and its disk agree).
//!
//! So a checkpoint costs the memory that changed since its parent, found by
//! comparing contents (which also catches pages written by devices, that
//! KVM's dirty log would not see). Restoring maps the root's memory
//! privately (lazily) and lays each descendant's pages over it. Removing a
//! checkpoint first folds its pages into each child, so children stay whole.

use std::fs::File;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use nestvm_virtio::Memory;
use serde::{Deserialize, Serialize};
use vm_memory::{Address, Bytes, GuestMemoryBackend, GuestMemoryRegion};

use crate::snapshot::{RegionSnapshot, SnapshotError};

/// Page size of the layers.
pub const PAGE: u64 = 4096;
/// Layer files.
pub const PAGES_FILE: &str = "pages";
/// Metadata file.
pub const META_FILE: &str = "meta.json";

/// A checkpoint's metadata.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Meta {
    /// Its name.
    pub name: String,
    /// The checkpoint it was taken after (whose memory it is a delta of).
    pub parent: Option<String>,
    /// Seconds since the epoch when taken.
    pub created: u64,
    /// Guest RAM size.
    pub memory_bytes: u64,
    /// Bytes of memory this checkpoint stores itself.
    pub written_bytes: u64,
}

fn io(what: &'static str) -> impl Fn(std::io::Error) -> SnapshotError {
    move |e| SnapshotError::Memory(what, e)
}

/// Reads a checkpoint's metadata.
pub fn read_meta(dir: &Path) -> Result<Meta, SnapshotError> {
    let path = dir.join(META_FILE);
    let text = std::fs::read(&path).map_err(io("read the metadata of"))?;
    serde_json::from_slice(&text).map_err(|e| SnapshotError::Decode {
        path,
        message: e.to_string(),
    })
}

/// One layer of memory: the pages a checkpoint holds.
pub struct Layer {
    bits: Vec<u8>,
    file: File,
}

impl Layer {
    /// Opens the layer of checkpoint directory `dir`.
    pub fn open(dir: &Path) -> Result<Self, SnapshotError> {
        let bits = std::fs::read(dir.join(PAGES_FILE)).map_err(io("read the page map of"))?;
        let file = File::open(dir.join(crate::snapshot::MEMORY_FILE)).map_err(io("open"))?;
        Ok(Self { bits, file })
    }

    /// Whether the layer holds page `p`.
    pub fn has(&self, p: u64) -> bool {
        self.bits
            .get((p / 8) as usize)
            .is_some_and(|b| b & (1 << (p % 8)) != 0)
    }

    fn read(&self, p: u64, buf: &mut [u8]) -> Result<(), SnapshotError> {
        self.file
            .read_exact_at(buf, p * PAGE)
            .map_err(io("read a checkpoint's"))
    }
}

/// The layers from checkpoint `name` up to its root, newest first, with the
/// directories they live in.
pub fn chain(root: &Path, name: &str) -> Result<Vec<(PathBuf, Layer)>, SnapshotError> {
    let mut out = Vec::new();
    let mut next = Some(name.to_owned());
    while let Some(n) = next {
        // Names come from the API and from metadata files: never a path.
        if !valid_name(&n) {
            return Err(SnapshotError::Incompatible(format!(
                "invalid checkpoint name '{n}'"
            )));
        }
        if out.len() > 10_000 {
            return Err(SnapshotError::Incompatible(
                "checkpoint parents form a loop".into(),
            ));
        }
        let dir = root.join(&n);
        let meta = read_meta(&dir)?;
        out.push((dir.clone(), Layer::open(&dir)?));
        next = meta.parent;
    }
    Ok(out)
}

/// Writes the layer of a new checkpoint into `dir` (files `memory` and
/// `pages`): the pages of `mem` that differ from what `parent` (newest
/// first) holds. Returns the regions and the bytes written.
pub fn write_layer(
    mem: &Memory,
    parent: &[(PathBuf, Layer)],
    dir: &Path,
) -> Result<(Vec<RegionSnapshot>, u64, u64), SnapshotError> {
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(dir.join(crate::snapshot::MEMORY_FILE))
        .map_err(io("create the file for"))?;
    let total: u64 = mem.iter().map(|r| r.len()).sum();
    let mut bits = vec![0u8; total.div_ceil(PAGE).div_ceil(8) as usize];
    let mut regions = Vec::new();
    let (mut offset, mut written) = (0u64, 0u64);
    // Guest memory is read a chunk at a time; each page of it is compared
    // with the chain's page (or with zeros, where no layer has it).
    const CHUNK: u64 = 1 << 20;
    let mut chunk = vec![0u8; CHUNK as usize];
    let mut old = vec![0u8; PAGE as usize];
    for region in mem.iter() {
        regions.push(RegionSnapshot {
            guest_addr: region.start_addr().raw_value(),
            size: region.len(),
            file_offset: offset,
        });
        let mut at = 0;
        while at < region.len() {
            let len = (region.len() - at).min(CHUNK) as usize;
            mem.read_slice(&mut chunk[..len], region.start_addr().unchecked_add(at))
                .map_err(|e| SnapshotError::Memory("read", std::io::Error::other(e)))?;
            for (i, cur) in chunk[..len].chunks(PAGE as usize).enumerate() {
                let pos = offset + at + i as u64 * PAGE;
                let p = pos / PAGE;
                let differs = match parent.iter().find(|(_, l)| l.has(p)) {
                    Some((_, l)) => {
                        l.read(p, &mut old[..cur.len()])?;
                        cur != &old[..cur.len()]
                    }
                    None => !crate::snapshot::is_zero(cur),
                };
                if differs {
                    file.write_all_at(cur, pos).map_err(io("write"))?;
                    bits[(p / 8) as usize] |= 1 << (p % 8);
                    written += cur.len() as u64;
                }
            }
            at += len as u64;
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
) -> Result<(), SnapshotError> {
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
                        .map_err(|e| SnapshotError::Memory("write", std::io::Error::other(e)))?;
                }
                at += PAGE;
            }
        }
    }
    Ok(())
}

/// Folds the pages of `parent_dir`'s layer that `child` lacks into a copy
/// of the child's directory at `staged` (so the child no longer needs that
/// parent), with `new_parent` as its parent.
pub fn fold_into_child(
    parent_dir: &Path,
    child_dir: &Path,
    staged: &Path,
    new_parent: Option<String>,
) -> Result<(), SnapshotError> {
    let parent = Layer::open(parent_dir)?;
    std::fs::create_dir_all(staged).map_err(io("create the folder for"))?;
    // Every file of the child (state, memory, page map, disk copies);
    // copy_file_range shares blocks on filesystems with reflinks.
    for entry in std::fs::read_dir(child_dir).map_err(io("list"))? {
        let entry = entry.map_err(io("list"))?;
        if entry.file_type().map_err(io("inspect"))?.is_file() {
            std::fs::copy(entry.path(), staged.join(entry.file_name())).map_err(io("copy"))?;
        }
    }
    let mut bits = std::fs::read(staged.join(PAGES_FILE)).map_err(io("read the page map of"))?;
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(staged.join(crate::snapshot::MEMORY_FILE))
        .map_err(io("open"))?;
    let mut meta = read_meta(child_dir)?;
    let mut buf = vec![0u8; PAGE as usize];
    let pages = (bits.len() * 8) as u64;
    for p in 0..pages {
        let has = bits[(p / 8) as usize] & (1 << (p % 8)) != 0;
        if !has && parent.has(p) {
            parent.read(p, &mut buf)?;
            file.write_all_at(&buf, p * PAGE).map_err(io("write"))?;
            bits[(p / 8) as usize] |= 1 << (p % 8);
            meta.written_bytes += PAGE;
        }
    }
    file.sync_all().map_err(io("sync"))?;
    nestvm_snapshot::atomic::write_synced(&staged.join(PAGES_FILE), &bits, 0o600)?;
    meta.parent = new_parent;
    write_meta(staged, &meta)?;
    Ok(())
}

/// Whether `name` can be a checkpoint name (it becomes a directory name).
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name != "CURRENT"
        && !name.ends_with(".tmp")
        && !name.ends_with(".old")
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// Why `name` cannot be a new checkpoint under `root`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NameRefusal {
    /// It is not a checkpoint name at all.
    Invalid(String),
    /// A checkpoint of that name exists.
    Taken(String),
}

impl std::fmt::Display for NameRefusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NameRefusal::Invalid(n) => write!(
                f,
                "invalid checkpoint name '{n}': use up to 64 letters, digits, '-', '_' or '.'"
            ),
            NameRefusal::Taken(n) => {
                write!(f, "a checkpoint named '{n}' exists: pick another name")
            }
        }
    }
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
/// fsynced, then published in one rename.
pub fn take(
    mut snap: crate::snapshot::VmSnapshot,
    mem: &Memory,
    root: &Path,
    name: &str,
    parent: Option<&str>,
) -> Result<Meta, SnapshotError> {
    check_new_name(root, name).map_err(|r| SnapshotError::Incompatible(r.to_string()))?;
    let dir = root.join(name);
    let chain = match parent {
        Some(p) => chain(root, p)?,
        None => Vec::new(),
    };
    let staged = root.join(format!("{name}.tmp"));
    nestvm_snapshot::atomic::recover_dir(&staged, &dir);
    std::fs::create_dir_all(&staged).map_err(io("create the folder for"))?;
    let (regions, total, written) = write_layer(mem, &chain, &staged)?;
    snap.memory = regions;
    // Writable disks belong to the moment too: the guest's memory (its page
    // cache, its filesystem's view) must meet the disk as it was. The VM is
    // paused and disk requests are served on this thread, so nothing writes
    // them meanwhile. std::fs::copy shares blocks where the filesystem can.
    for (i, d) in snap
        .config
        .disks
        .iter()
        .enumerate()
        .filter(|(_, d)| !d.readonly)
    {
        let copy = staged.join(disk_file(i));
        std::fs::copy(&d.path, &copy).map_err(io("copy a disk image into"))?;
        File::open(&copy)
            .and_then(|f| f.sync_all())
            .map_err(io("sync a disk image copy in"))?;
    }
    let json = serde_json::to_vec(&snap).map_err(|e| SnapshotError::Decode {
        path: staged.join(crate::snapshot::STATE_FILE),
        message: e.to_string(),
    })?;
    nestvm_snapshot::atomic::write_synced(
        &staged.join(crate::snapshot::STATE_FILE),
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

/// The copy of writable disk `index` in a checkpoint.
pub fn disk_file(index: usize) -> String {
    format!("disk-{index}.img")
}

/// Puts the writable disks of checkpoint `dir` back in place (each through
/// a temporary file and a rename, so a crash leaves the old or the new
/// image, never a mix).
pub fn restore_disks(
    dir: &Path,
    disks: &[crate::adapters::DiskConfig],
) -> Result<(), SnapshotError> {
    for (i, d) in disks.iter().enumerate().filter(|(_, d)| !d.readonly) {
        let copy = dir.join(disk_file(i));
        if !copy.exists() {
            continue;
        }
        let tmp = d.path.with_extension("nestvm-restore.tmp");
        std::fs::copy(&copy, &tmp).map_err(io("copy back a disk image from"))?;
        File::open(&tmp)
            .and_then(|f| f.sync_all())
            .map_err(io("sync a restored disk image of"))?;
        std::fs::rename(&tmp, &d.path).map_err(io("put back a disk image of"))?;
    }
    Ok(())
}

/// Guest memory for restoring checkpoint `name`: the root's memory file
/// mapped privately, with each later layer's pages laid over it.
pub fn memory(
    root: &Path,
    name: &str,
    regions: &[RegionSnapshot],
) -> Result<Memory, SnapshotError> {
    let chain = chain(root, name)?;
    let (base_dir, _) = chain
        .last()
        .expect("a chain has at least its own checkpoint");
    let mem = crate::snapshot::map_memory(base_dir, regions)?;
    apply_layers(&mem, regions, &chain)?;
    Ok(mem)
}

/// Writes a checkpoint's metadata (inside a directory not yet published).
pub fn write_meta(dir: &Path, meta: &Meta) -> Result<(), SnapshotError> {
    let json = serde_json::to_vec_pretty(meta).map_err(|e| SnapshotError::Decode {
        path: dir.join(META_FILE),
        message: e.to_string(),
    })?;
    nestvm_snapshot::atomic::write_synced(&dir.join(META_FILE), &json, 0o600)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
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
        std::fs::write(dir.join(crate::snapshot::STATE_FILE), name).unwrap();
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

    #[test]
    fn names_are_never_paths() {
        for bad in [
            "", "..", "../x", "a/b", ".hidden", "CURRENT", "x.tmp", "x.old", "sp ace",
        ] {
            assert!(!valid_name(bad), "{bad}");
            assert!(chain(Path::new("/tmp"), bad).is_err(), "{bad}");
        }
        assert!(valid_name("before-upgrade_2.1"));
    }
}
