//! A checkpoint's layer files from arbitrary bytes: the metadata (its
//! parent's name included), the page map and the memory file of checkpoint
//! `b` over a fixed, valid root `a`. Following the chain, reading every
//! page the maps claim, and folding `a` into `b` refuse or succeed, never
//! panic, and never touch a file outside the checkpoints folder.
//!
//! Input: a 2-byte length and the metadata, a 2-byte length and the page
//! map, then the memory file.

#![no_main]

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use nestvm_snapshot::layer::{self, Meta, MEMORY_FILE, META_FILE, PAGE, PAGES_FILE};

const ROOT_PAGES: u64 = 16;

/// The checkpoints folder, with its valid root `a`: pages 0 and 3 stored.
fn root() -> &'static PathBuf {
    static ROOT: OnceLock<PathBuf> = OnceLock::new();
    ROOT.get_or_init(|| {
        // In memory where there is a tmpfs: every input is written, folded
        // and fsynced.
        let shm = Path::new("/dev/shm");
        let base = if shm.is_dir() {
            shm.to_owned()
        } else {
            std::env::temp_dir()
        };
        let root = base.join(format!("nestvm-fuzz-ckpt-{}", std::process::id()));
        let a = root.join("a");
        std::fs::create_dir_all(&a).unwrap();
        let mut memory = vec![0u8; (ROOT_PAGES * PAGE) as usize];
        memory[..PAGE as usize].fill(1);
        memory[3 * PAGE as usize..4 * PAGE as usize].fill(3);
        std::fs::write(a.join(MEMORY_FILE), memory).unwrap();
        std::fs::write(a.join(PAGES_FILE), [0b1001u8, 0]).unwrap();
        let meta = Meta {
            name: "a".into(),
            parent: None,
            created: 0,
            memory_bytes: ROOT_PAGES * PAGE,
            written_bytes: 2 * PAGE,
        };
        layer::write_meta(&a, &meta).unwrap();
        root
    })
}

/// Splits a 2-byte length and that many bytes off `data`.
fn split(data: &[u8]) -> (&[u8], &[u8]) {
    let Some((len, rest)) = data.split_first_chunk::<2>() else {
        return (&[], &[]);
    };
    rest.split_at(usize::from(u16::from_le_bytes(*len)).min(rest.len()))
}

fn write_child(dir: &Path, meta: &[u8], pages: &[u8], memory: &[u8]) {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join(META_FILE), meta).unwrap();
    std::fs::write(dir.join(PAGES_FILE), pages).unwrap();
    std::fs::write(dir.join(MEMORY_FILE), memory).unwrap();
    std::fs::write(dir.join("state"), b"opaque").unwrap();
}

fuzz_target!(|data: &[u8]| {
    let root = root();
    let (meta, rest) = split(data);
    let (pages, memory) = split(rest);
    let b = root.join("b");
    write_child(&b, meta, pages, memory);
    let mut buf = vec![0u8; PAGE as usize];
    if let Ok(chain) = layer::chain(root, "b") {
        assert!(chain.len() <= 2, "only a and b exist");
        for (dir, l) in &chain {
            assert!(dir.starts_with(root));
            for p in 0..(pages.len() as u64 * 8).max(ROOT_PAGES) {
                if l.has(p) {
                    let _ = l.read(p, &mut buf);
                }
            }
        }
    }
    let staged = root.join("b.tmp");
    let _ = std::fs::remove_dir_all(&staged);
    if layer::fold_into_child(&root.join("a"), &b, &staged, None).is_ok() {
        let folded = layer::read_meta(&staged).expect("a fold writes readable metadata");
        assert_eq!(folded.parent, None);
    }
    let _ = std::fs::remove_dir_all(&staged);
});
