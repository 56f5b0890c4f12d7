//! The memory file of a saved VM or checkpoint: guest RAM written sparsely
//! (pages of zeros become holes), and mapped back privately so the guest
//! reads pages from the file on first touch and never changes it.

use std::fs::File;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::sync::Arc;

use nestvm_kvm::memory::Residency;
use nestvm_virtio::Memory;
use vm_memory::bitmap::{AtomicBitmap, NewBitmap};
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{
    Address, Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryRegion,
    GuestRegionMmap,
};

use serde::{Deserialize, Serialize};

use super::PersistError;

/// The memory file in a saved-VM directory.
pub const MEMORY_FILE: &str = "memory";

/// One guest RAM region in the memory file.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RegionSnapshot {
    /// Guest physical start.
    pub guest_addr: u64,
    /// Length in bytes.
    pub size: u64,
    /// Where it starts in the memory file.
    pub file_offset: u64,
}

/// What a save wrote.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct SaveSummary {
    /// Guest RAM in bytes.
    pub memory_bytes: u64,
    /// Bytes of RAM actually written (pages that were not all zeros).
    pub written_bytes: u64,
}

const PAGE: usize = 4096;
const CHUNK: usize = 1 << 20;

/// Whether `bytes` are all zero. Saves, checkpoints and migrations ask it of
/// every page, so it ORs 16 bytes at a time without stopping early, which
/// the compiler turns into vector code (a byte loop that stops at the first
/// non-zero byte does not vectorize, and most pages are all zeros).
pub(crate) fn is_zero(bytes: &[u8]) -> bool {
    let chunks = bytes.chunks_exact(16);
    let tail = chunks.remainder().iter().fold(0u8, |a, &b| a | b);
    let body = chunks.fold(0u128, |a, c| {
        a | u128::from_ne_bytes(c.try_into().expect("16-byte chunks"))
    });
    body == 0 && tail == 0
}

/// Runs of pages of `region` that may hold data ([`Residency`]), each as
/// (first page, pages), at most [`CHUNK`] bytes long: only these are read.
pub(crate) fn data_runs(mem: &Memory, region: &GuestRegionMmap<AtomicBitmap>) -> Vec<(u64, usize)> {
    let data = Residency::of(mem, region);
    let max = CHUNK / PAGE;
    let mut runs = Vec::new();
    let mut p = 0;
    while p < data.len() {
        if !data[p] {
            p += 1;
            continue;
        }
        let first = p;
        while p < data.len() && data[p] && p - first < max {
            p += 1;
        }
        runs.push((first as u64, p - first));
    }
    runs
}

/// Writes guest RAM into a new file at `path`: only pages that may hold
/// data are read, and of those only the ones not all zeros are written,
/// in runs (the rest of the file is holes).
pub(crate) fn write_memory(
    mem: &Memory,
    path: &Path,
) -> Result<(Vec<RegionSnapshot>, SaveSummary), PersistError> {
    let err = |what| move |e| PersistError::Memory(what, e);
    // Guest memory may hold the guest's secrets: private like the state.
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(err("create the file for"))?;
    let mut regions = Vec::new();
    let mut offset = 0u64;
    let mut written = 0u64;
    let mut buf = vec![0u8; CHUNK];
    for region in mem.iter() {
        let start = region.start_addr();
        regions.push(RegionSnapshot {
            guest_addr: start.raw_value(),
            size: region.len(),
            file_offset: offset,
        });
        for (first, pages) in data_runs(mem, region) {
            let at = first * PAGE as u64;
            let n = (pages * PAGE).min((region.len() - at) as usize);
            mem.read_slice(&mut buf[..n], start.unchecked_add(at))
                .map_err(|e| PersistError::Memory("read", std::io::Error::other(e)))?;
            for (from, to) in nonzero_runs(&buf[..n]) {
                file.write_all_at(&buf[from..to], offset + at + from as u64)
                    .map_err(err("write"))?;
                written += (to - from) as u64;
            }
        }
        offset += region.len();
    }
    file.set_len(offset).map_err(err("size the file of"))?;
    file.sync_all().map_err(err("sync the file of"))?;
    Ok((
        regions,
        SaveSummary {
            memory_bytes: offset,
            written_bytes: written,
        },
    ))
}

/// The byte ranges of `buf` made of whole pages not all zeros, each as long
/// as it goes.
fn nonzero_runs(buf: &[u8]) -> Vec<(usize, usize)> {
    let mut runs: Vec<(usize, usize)> = Vec::new();
    for (i, page) in buf.chunks(PAGE).enumerate() {
        if is_zero(page) {
            continue;
        }
        let (from, to) = (i * PAGE, i * PAGE + page.len());
        match runs.last_mut() {
            Some(last) if last.1 == from => last.1 = to,
            _ => runs.push((from, to)),
        }
    }
    runs
}

/// Maps the memory file privately, region by region, as guest memory.
pub(crate) fn map_memory(dir: &Path, regions: &[RegionSnapshot]) -> Result<Memory, PersistError> {
    let path = dir.join(MEMORY_FILE);
    let file = File::open(&path).map_err(|e| PersistError::Memory("open the file of", e))?;
    let len = file
        .metadata()
        .map_err(|e| PersistError::Memory("inspect the file of", e))?
        .len();
    let file = Arc::new(file);
    let mut mapped = Vec::new();
    for r in regions {
        let end = r.file_offset.checked_add(r.size);
        if end.is_none_or(|e| e > len) || r.size == 0 {
            return Err(PersistError::MemoryShort(path));
        }
        let region = MmapRegionBuilder::new_with_bitmap(
            r.size as usize,
            vm_memory::bitmap::AtomicBitmap::with_len(r.size as usize),
        )
        .with_file_offset(FileOffset::from_arc(file.clone(), r.file_offset))
        .with_mmap_prot(libc_prot())
        .with_mmap_flags(libc_private())
        .build()
        .map_err(|e| PersistError::Memory("map", std::io::Error::other(e.to_string())))?;
        let region = GuestRegionMmap::new(region, GuestAddress(r.guest_addr)).ok_or(
            PersistError::Inconsistent("a memory region wraps the address space"),
        )?;
        mapped.push(region);
    }
    Memory::from_regions(mapped).map_err(|_| PersistError::Inconsistent("memory regions overlap"))
}

fn libc_prot() -> i32 {
    libc::PROT_READ | libc::PROT_WRITE
}

/// Private: the guest's writes never reach the file; pages are read from it
/// on first touch.
fn libc_private() -> i32 {
    libc::MAP_PRIVATE | libc::MAP_NORESERVE
}

#[cfg(test)]
mod tests {
    #[test]
    fn zero_pages_and_a_byte_anywhere() {
        let mut page = vec![0u8; 4096 + 5];
        assert!(super::is_zero(&page));
        for at in [0, 17, 4095, 4100] {
            page[at] = 1;
            assert!(!super::is_zero(&page), "{at}");
            page[at] = 0;
        }
    }

    #[test]
    fn nonzero_pages_are_written_in_runs() {
        let mut buf = vec![0u8; 8 * 4096 + 100];
        for p in [1, 2, 3, 6] {
            buf[p * 4096 + 9] = 1;
        }
        buf[8 * 4096 + 99] = 1;
        assert_eq!(
            super::nonzero_runs(&buf),
            vec![
                (4096, 4 * 4096),
                (6 * 4096, 7 * 4096),
                (8 * 4096, 8 * 4096 + 100)
            ]
        );
    }
}
