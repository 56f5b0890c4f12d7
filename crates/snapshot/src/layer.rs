//! The on-disk format of a checkpoint's memory layer and metadata, which
//! both the VMM (taking and restoring checkpoints) and the VM inventory
//! (listing and removing them) read.
//!
//! A checkpoint is a directory `NAME/` under a VM's checkpoints folder with:
//! - [`MEMORY_FILE`]: a full-size sparse file holding only the pages this
//!   checkpoint stores itself;
//! - [`PAGES_FILE`]: a bitmap, one bit per [`PAGE`]-byte page, of the pages
//!   the memory file holds;
//! - [`META_FILE`]: its [`Meta`] as JSON;
//! - [`disk_file`]`(N)`: copies of its writable disks; and the state file
//!   (written by the VMM, opaque here).
//!
//! [`fold_into_child`] moves a checkpoint's pages into a child, so the
//! checkpoint can be removed and the child stays whole.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::atomic::{self, AtomicError};
use crate::bounded::BoundedError;

/// Page size of the layers.
pub const PAGE: u64 = 4096;
/// The page bitmap of a layer.
pub const PAGES_FILE: &str = "pages";
/// The memory file of a layer (the name a saved VM's memory file has too).
pub const MEMORY_FILE: &str = "memory";
/// The metadata file.
pub const META_FILE: &str = "meta.json";
/// The largest metadata file read (nestvm writes a few hundred bytes).
pub const MAX_META: u64 = 64 << 10;
/// The largest page map read: that of the largest guest memory a VM may
/// have (1 TiB). A layer's map is also never larger than its memory file
/// needs.
pub const MAX_PAGES: u64 = (1 << 40) / PAGE / 8;

/// Errors of the layer format.
#[derive(Debug, thiserror::Error)]
pub enum LayerError {
    /// A file of a checkpoint could not be read or written.
    #[error("cannot {what} {path}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The metadata file does not decode (or encode).
    #[error("the checkpoint metadata {path} is not readable by this nestvm")]
    Meta {
        /// The file.
        path: PathBuf,
        /// What the decoder said.
        #[source]
        source: serde_json::Error,
    },
    /// A file larger than it can be.
    #[error(
        "{path} is larger than {limit} bytes, more than nestvm writes there; it was not loaded"
    )]
    TooLarge {
        /// The file.
        path: PathBuf,
        /// The largest size accepted.
        limit: u64,
    },
    /// A name that cannot be a checkpoint's (from a request or a metadata file).
    #[error("invalid checkpoint name '{0}'")]
    InvalidName(String),
    /// Following parents never reaches a root.
    #[error("checkpoint parents form a loop")]
    Loop,
    /// Writing or publishing files.
    #[error(transparent)]
    Atomic(#[from] AtomicError),
}

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> LayerError {
    let path = path.to_owned();
    move |source| LayerError::Io { what, path, source }
}

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

/// Reads all of `path`, at most `limit` bytes (else it is refused unread).
fn read_bounded(path: &Path, limit: u64) -> Result<Vec<u8>, LayerError> {
    crate::bounded::read(path, limit).map_err(|e| match e {
        BoundedError::Io(source) => io("read", path)(source),
        BoundedError::TooLarge(limit) => LayerError::TooLarge {
            path: path.to_owned(),
            limit,
        },
    })
}

/// The length of the page map of a memory file of `memory_len` bytes.
pub fn pages_len(memory_len: u64) -> u64 {
    memory_len.div_ceil(PAGE).div_ceil(8)
}

/// Reads the page map at `pages`, refused if it is longer than the memory
/// file `memory` of its layer needs.
fn read_pages(pages: &Path, memory: &File, memory_path: &Path) -> Result<Vec<u8>, LayerError> {
    let len = memory.metadata().map_err(io("inspect", memory_path))?.len();
    read_bounded(pages, pages_len(len).min(MAX_PAGES))
}

/// Reads a checkpoint's metadata.
pub fn read_meta(dir: &Path) -> Result<Meta, LayerError> {
    let path = dir.join(META_FILE);
    let text = read_bounded(&path, MAX_META)?;
    serde_json::from_slice(&text).map_err(|source| LayerError::Meta { path, source })
}

/// Writes a checkpoint's metadata (inside a directory not yet published).
pub fn write_meta(dir: &Path, meta: &Meta) -> Result<(), LayerError> {
    let path = dir.join(META_FILE);
    let json = serde_json::to_vec_pretty(meta).map_err(|source| LayerError::Meta {
        path: path.clone(),
        source,
    })?;
    atomic::write_synced(&path, &json, 0o600)?;
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

/// The copy of writable disk `index` in a checkpoint.
pub fn disk_file(index: usize) -> String {
    format!("disk-{index}.img")
}

/// One layer of memory: the pages a checkpoint holds.
pub struct Layer {
    bits: Vec<u8>,
    file: File,
    path: PathBuf,
}

impl Layer {
    /// Opens the layer of checkpoint directory `dir`; its page map is
    /// refused if it is longer than its memory file needs.
    pub fn open(dir: &Path) -> Result<Self, LayerError> {
        let path = dir.join(MEMORY_FILE);
        let file = File::open(&path).map_err(io("open", &path))?;
        let bits = read_pages(&dir.join(PAGES_FILE), &file, &path)?;
        Ok(Self { bits, file, path })
    }

    /// Whether the layer holds page `p`.
    pub fn has(&self, p: u64) -> bool {
        self.bits
            .get((p / 8) as usize)
            .is_some_and(|b| b & (1 << (p % 8)) != 0)
    }

    /// Reads page `p` (or its first `buf.len()` bytes) into `buf`.
    pub fn read(&self, p: u64, buf: &mut [u8]) -> Result<(), LayerError> {
        self.file
            .read_exact_at(buf, p * PAGE)
            .map_err(io("read a page of", &self.path))
    }
}

/// The layers from checkpoint `name` up to its root, newest first, with the
/// directories they live in.
pub fn chain(root: &Path, name: &str) -> Result<Vec<(PathBuf, Layer)>, LayerError> {
    let mut out = Vec::new();
    let mut next = Some(name.to_owned());
    while let Some(n) = next {
        // Names come from requests and from metadata files: never a path.
        if !valid_name(&n) {
            return Err(LayerError::InvalidName(n));
        }
        // A name met before (each directory is `root/NAME`).
        if out.iter().any(|(d, _): &(PathBuf, Layer)| d.ends_with(&n)) {
            return Err(LayerError::Loop);
        }
        let dir = root.join(&n);
        let meta = read_meta(&dir)?;
        out.push((dir.clone(), Layer::open(&dir)?));
        next = meta.parent;
    }
    Ok(out)
}

/// Copies every plain file of `from` (state, memory, page map, disk copies)
/// into `to`, created if missing; `std::fs::copy` shares blocks on
/// filesystems with reflinks.
fn copy_files(from: &Path, to: &Path) -> Result<(), LayerError> {
    std::fs::create_dir_all(to).map_err(io("create", to))?;
    for entry in std::fs::read_dir(from).map_err(io("list", from))? {
        let entry = entry.map_err(io("list", from))?;
        if entry
            .file_type()
            .map_err(io("inspect", &entry.path()))?
            .is_file()
        {
            std::fs::copy(entry.path(), to.join(entry.file_name()))
                .map_err(io("copy", &entry.path()))?;
        }
    }
    Ok(())
}

/// Folds the pages of `parent_dir`'s layer that `child` lacks into a copy
/// of the child's directory at `staged` (so the child no longer needs that
/// parent), with `new_parent` as its parent. The caller publishes `staged`
/// over the child.
pub fn fold_into_child(
    parent_dir: &Path,
    child_dir: &Path,
    staged: &Path,
    new_parent: Option<String>,
) -> Result<(), LayerError> {
    let parent = Layer::open(parent_dir)?;
    copy_files(child_dir, staged)?;
    let pages = staged.join(PAGES_FILE);
    let memory = staged.join(MEMORY_FILE);
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(&memory)
        .map_err(io("open", &memory))?;
    let mut bits = read_pages(&pages, &file, &memory)?;
    let mut meta = read_meta(child_dir)?;
    let mut buf = vec![0u8; PAGE as usize];
    for p in 0..(bits.len() * 8) as u64 {
        let has = bits[(p / 8) as usize] & (1 << (p % 8)) != 0;
        if !has && parent.has(p) {
            parent.read(p, &mut buf)?;
            file.write_all_at(&buf, p * PAGE)
                .map_err(io("write", &memory))?;
            bits[(p / 8) as usize] |= 1 << (p % 8);
            meta.written_bytes = meta.written_bytes.saturating_add(PAGE);
        }
    }
    file.sync_all().map_err(io("sync", &memory))?;
    atomic::write_synced(&pages, &bits, 0o600)?;
    meta.parent = new_parent;
    write_meta(staged, &meta)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("nestvm-layer-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    /// Writes checkpoint `name` holding `pages` (page number, fill byte) of
    /// a memory of `total` pages.
    fn layer(root: &Path, name: &str, parent: Option<&str>, total: u64, pages: &[(u64, u8)]) {
        let dir = root.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        let file = File::create(dir.join(MEMORY_FILE)).unwrap();
        file.set_len(total * PAGE).unwrap();
        let mut bits = vec![0u8; total.div_ceil(8) as usize];
        for &(p, fill) in pages {
            file.write_all_at(&[fill; PAGE as usize], p * PAGE).unwrap();
            bits[(p / 8) as usize] |= 1 << (p % 8);
        }
        std::fs::write(dir.join(PAGES_FILE), bits).unwrap();
        std::fs::write(dir.join("state"), name).unwrap();
        let meta = Meta {
            name: name.into(),
            parent: parent.map(Into::into),
            created: 0,
            memory_bytes: total * PAGE,
            written_bytes: pages.len() as u64 * PAGE,
        };
        write_meta(&dir, &meta).unwrap();
    }

    /// Page `p` as the chain from `name` sees it (its fill byte; 0 if none has it).
    fn page(root: &Path, name: &str, p: u64) -> u8 {
        let c = chain(root, name).unwrap();
        match c.iter().find(|(_, l)| l.has(p)) {
            Some((_, l)) => {
                let mut buf = [0u8; PAGE as usize];
                l.read(p, &mut buf).unwrap();
                buf[0]
            }
            None => 0,
        }
    }

    #[test]
    fn chains_go_newest_first_to_the_root() {
        let root = scratch("chain");
        layer(&root, "a", None, 16, &[(0, 1), (1, 1)]);
        layer(&root, "b", Some("a"), 16, &[(1, 2)]);
        let c = chain(&root, "b").unwrap();
        let dirs: Vec<_> = c.iter().map(|(d, _)| d.clone()).collect();
        assert_eq!(dirs, vec![root.join("b"), root.join("a")]);
        assert_eq!((page(&root, "b", 0), page(&root, "b", 1)), (1, 2));
        assert_eq!(page(&root, "b", 5), 0);
        assert!(matches!(chain(&root, "x"), Err(LayerError::Io { .. })));
    }

    #[test]
    fn folding_keeps_the_child_whole() {
        let root = scratch("fold");
        layer(&root, "a", None, 16, &[(0, 1)]);
        layer(&root, "b", Some("a"), 16, &[(1, 2), (2, 2)]);
        layer(&root, "c", Some("b"), 16, &[(2, 3)]);
        let before: Vec<u8> = (0..16).map(|p| page(&root, "c", p)).collect();
        fold_into_child(
            &root.join("b"),
            &root.join("c"),
            &root.join("c.tmp"),
            Some("a".into()),
        )
        .unwrap();
        atomic::publish_dir(&root.join("c.tmp"), &root.join("c")).unwrap();
        std::fs::remove_dir_all(root.join("b")).unwrap();
        let meta = read_meta(&root.join("c")).unwrap();
        assert_eq!(meta.parent.as_deref(), Some("a"));
        assert_eq!(
            meta.written_bytes,
            2 * PAGE,
            "page 1 came from b; page 2 was c's own"
        );
        assert_eq!(std::fs::read(root.join("c/state")).unwrap(), b"c");
        let after: Vec<u8> = (0..16).map(|p| page(&root, "c", p)).collect();
        assert_eq!(after, before);
    }

    #[test]
    fn parents_that_loop_are_refused() {
        let root = scratch("loop");
        layer(&root, "a", Some("b"), 8, &[]);
        layer(&root, "b", Some("a"), 8, &[]);
        assert!(matches!(chain(&root, "a"), Err(LayerError::Loop)));
    }

    #[test]
    fn names_are_never_paths() {
        for bad in [
            "", "..", "../x", "a/b", ".hidden", "CURRENT", "x.tmp", "x.old", "sp ace",
        ] {
            assert!(!valid_name(bad), "{bad}");
            assert!(
                matches!(
                    chain(Path::new("/tmp"), bad),
                    Err(LayerError::InvalidName(_))
                ),
                "{bad}"
            );
        }
        assert!(valid_name("before-upgrade_2.1"));
        assert!(!valid_name(&"x".repeat(65)));
    }

    #[test]
    fn oversized_metadata_and_page_maps_are_refused_unread() {
        let root = scratch("caps");
        layer(&root, "a", None, 16, &[(0, 1)]);
        assert!(chain(&root, "a").is_ok());
        // A page map longer than 16 pages need (2 bytes).
        std::fs::write(root.join("a").join(PAGES_FILE), [0xffu8; 3]).unwrap();
        let e = chain(&root, "a").err().unwrap();
        assert!(matches!(e, LayerError::TooLarge { limit: 2, .. }), "{e}");
        // A huge sparse memory file does not make room for a huge map.
        let memory = File::options()
            .write(true)
            .open(root.join("a").join(MEMORY_FILE))
            .unwrap();
        memory.set_len(1 << 42).unwrap();
        File::create(root.join("a").join(PAGES_FILE))
            .unwrap()
            .set_len(MAX_PAGES + 1)
            .unwrap();
        let e = chain(&root, "a").err().unwrap();
        assert!(
            matches!(
                e,
                LayerError::TooLarge {
                    limit: MAX_PAGES,
                    ..
                }
            ),
            "{e}"
        );
        // Metadata of more than MAX_META bytes.
        layer(&root, "b", None, 16, &[]);
        File::create(root.join("b").join(META_FILE))
            .unwrap()
            .set_len(MAX_META + 1)
            .unwrap();
        let e = read_meta(&root.join("b")).unwrap_err();
        assert!(e.to_string().contains("larger than"), "{e}");
    }
}
