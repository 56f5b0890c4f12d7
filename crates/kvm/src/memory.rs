//! Guest memory as the host holds it.
//!
//! - Giving it back: pages a balloon took from the guest or that the guest
//!   reported free are dropped with `madvise(MADV_DONTNEED)` (the guest
//!   reads zeros — or, for memory mapped from a saved VM's file, that
//!   file's content — if it touches them again).
//! - Knowing which pages can hold anything ([`Residency`]): a page the
//!   process never touched (not present nor swapped in `/proc/self/pagemap`)
//!   reads as zeros, unless its region is mapped from a file that has data
//!   there (`SEEK_DATA`). Saves, checkpoints and migrations skip the others
//!   without reading them, so untouched memory is never faulted in.

use vm_memory::bitmap::Bitmap;
use vm_memory::{Address, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

/// Guest page size.
const PAGE: u64 = 4096;

/// Errors giving memory back.
#[derive(Debug, thiserror::Error)]
pub enum DiscardError {
    /// The range is not whole pages inside one memory region.
    #[error("{len:#x} bytes at guest address {addr:#x} are not whole pages of guest RAM")]
    Range {
        /// Guest physical start.
        addr: u64,
        /// Length.
        len: u64,
    },
    /// The kernel refused.
    #[error("madvise(MADV_DONTNEED) failed")]
    Madvise(#[source] std::io::Error),
}

/// Frees the host memory behind `len` bytes of guest RAM at `addr`; the range
/// must be page-aligned and inside one region (it comes from the guest, so it
/// is checked here, not trusted).
pub fn discard<B: Bitmap>(
    mem: &GuestMemoryMmap<B>,
    addr: u64,
    len: u64,
) -> Result<(), DiscardError> {
    let bad = DiscardError::Range { addr, len };
    if addr % PAGE != 0 || len % PAGE != 0 || len == 0 {
        return Err(bad);
    }
    let Some(region) = mem.find_region(GuestAddress(addr)) else {
        return Err(bad);
    };
    let offset = addr - region.start_addr().raw_value();
    if offset.checked_add(len).is_none_or(|end| end > region.len()) {
        return Err(bad);
    }
    let host = mem
        .get_host_address(GuestAddress(addr))
        .map_err(|_| DiscardError::Range { addr, len })?;
    // SAFETY: `host .. host + len` lies inside one live mapping owned by
    // `mem` (checked above against the region's bounds). MADV_DONTNEED on a
    // private or anonymous mapping only drops page contents — the mapping
    // stays valid and later accesses fault in zero (or file) pages — so no
    // Rust reference into guest memory is invalidated in a way Rust relies on:
    // guest memory is only ever accessed through volatile copies.
    let rc = unsafe { libc::madvise(host.cast(), len as usize, libc::MADV_DONTNEED) };
    if rc != 0 {
        return Err(DiscardError::Madvise(std::io::Error::last_os_error()));
    }
    Ok(())
}

/// The process's page map, opened once before the VMM's sandbox (which no
/// longer reaches `/proc`).
static PAGEMAP: std::sync::OnceLock<Option<std::fs::File>> = std::sync::OnceLock::new();

/// Opens `/proc/self/pagemap` for [`Residency`]; call it before the VMM
/// gives up root and enters its Landlock ruleset. Without it, every page
/// counts as holding data (as slow as reading them all, never wrong).
///
/// A page map opened with `CAP_SYS_ADMIN` shows physical page frame
/// numbers for as long as it is open; only the present and swapped bits
/// are needed, so it is opened by a short-lived thread that first drops
/// that capability (capabilities are per thread), and shows none.
pub fn open_pagemap() {
    PAGEMAP.get_or_init(|| {
        std::thread::spawn(|| {
            drop_sys_admin().ok()?;
            std::fs::File::open("/proc/self/pagemap").ok()
        })
        .join()
        .ok()
        .flatten()
    });
}

/// Drops `CAP_SYS_ADMIN` from the calling thread's effective set.
fn drop_sys_admin() -> std::io::Result<()> {
    const CAP_V3: u32 = 0x2008_0522;
    const CAP_SYS_ADMIN: u32 = 21;
    #[repr(C)]
    struct Header {
        version: u32,
        pid: i32,
    }
    #[repr(C)]
    #[derive(Clone, Copy, Default)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    let mut head = Header {
        version: CAP_V3,
        pid: 0,
    };
    let mut data = [Data::default(); 2];
    // SAFETY: capget with a version-3 header writes two `Data` entries,
    // which `data` holds; both pointers are to live locals.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_capget,
            &mut head as *mut Header,
            data.as_mut_ptr(),
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    data[0].effective &= !(1 << CAP_SYS_ADMIN);
    // SAFETY: capset reads the header and two `Data` entries from live
    // locals; it changes only this thread's capabilities (pid 0).
    let rc = unsafe { libc::syscall(libc::SYS_capset, &mut head as *mut Header, data.as_ptr()) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Which pages of a guest memory region may hold something other than
/// zeros.
pub struct Residency;

/// A pagemap entry's bits for a page in memory (63) or in swap (62).
const PRESENT_OR_SWAPPED: u64 = 3 << 62;

impl Residency {
    /// For each page of `region` (guest memory of `mem`), whether it may
    /// hold data: touched by this process, or backed by data in the file
    /// the region is mapped from. Errors only leave pages counted as data.
    pub fn of<B: Bitmap>(
        mem: &GuestMemoryMmap<B>,
        region: &vm_memory::GuestRegionMmap<B>,
    ) -> Vec<bool> {
        let pages = region.len().div_ceil(PAGE) as usize;
        let host = mem
            .get_host_address(region.start_addr())
            .map(|p| p as u64)
            .ok();
        let pagemap = PAGEMAP.get().and_then(Option::as_ref);
        let (Some(host), Some(pagemap)) = (host, pagemap) else {
            return vec![true; pages];
        };
        let mut data = touched(pagemap, host, pages).unwrap_or_else(|_| vec![true; pages]);
        if let Some(f) = region.file_offset() {
            if file_data(f.file(), f.start(), region.len(), &mut data).is_err() {
                data.iter_mut().for_each(|d| *d = true);
            }
        }
        data
    }
}

/// Present-or-swapped bits of `pages` pages from host address `host`.
fn touched(pagemap: &std::fs::File, host: u64, pages: usize) -> std::io::Result<Vec<bool>> {
    use std::os::unix::fs::FileExt;
    let mut out = Vec::with_capacity(pages);
    let mut buf = vec![0u8; 8 * 8192];
    let first = host / PAGE;
    while out.len() < pages {
        let n = (pages - out.len()).min(buf.len() / 8);
        let at = (first + out.len() as u64) * 8;
        pagemap.read_exact_at(&mut buf[..n * 8], at)?;
        out.extend(buf[..n * 8].chunks_exact(8).map(|e| {
            u64::from_le_bytes(e.try_into().expect("8-byte entries")) & PRESENT_OR_SWAPPED != 0
        }));
    }
    Ok(out)
}

/// Marks in `data` the pages of `len` bytes of `file` from `start` that
/// the file has data for (`SEEK_DATA`/`SEEK_HOLE`).
fn file_data(file: &std::fs::File, start: u64, len: u64, data: &mut [bool]) -> nix::Result<()> {
    use nix::unistd::{lseek, Whence};
    use std::os::fd::AsRawFd;
    let fd = file.as_raw_fd();
    let end = start + len;
    let mut at = start;
    while at < end {
        let from = match lseek(fd, at as i64, Whence::SeekData) {
            Ok(o) => o as u64,
            Err(nix::errno::Errno::ENXIO) => return Ok(()), // no data past `at`
            Err(e) => return Err(e),
        };
        if from >= end {
            return Ok(());
        }
        let to = (lseek(fd, from as i64, Whence::SeekHole)? as u64).min(end);
        let (first, last) = ((from - start) / PAGE, (to - start).div_ceil(PAGE));
        let last = (last as usize).min(data.len());
        for d in &mut data[first as usize..last] {
            *d = true;
        }
        at = to.max(from + 1);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    #[test]
    fn only_touched_pages_and_a_files_data_may_hold_anything() {
        open_pagemap();
        let mem =
            GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 64 * PAGE as usize)]).unwrap();
        mem.write_slice(&[1u8], GuestAddress(3 * PAGE + 5)).unwrap();
        let mut b = [0u8; 1];
        mem.read_slice(&mut b, GuestAddress(9 * PAGE)).unwrap();
        let region = mem.iter().next().unwrap();
        let data = Residency::of(&mem, region);
        assert_eq!(data.len(), 64);
        // Written, or read (the zero page is mapped there: counted, then
        // read and found zero); never touched: skipped.
        let held: Vec<usize> = (0..64).filter(|&i| data[i]).collect();
        assert_eq!(held, vec![3, 9], "{held:?}");
        // Even opened by root, the map shows no physical frame numbers.
        let host = mem.get_host_address(GuestAddress(3 * PAGE)).unwrap() as u64;
        let mut entry = [0u8; 8];
        let map = PAGEMAP
            .get()
            .and_then(Option::as_ref)
            .expect("the page map opened");
        std::os::unix::fs::FileExt::read_exact_at(map, &mut entry, host / PAGE * 8).unwrap();
        let entry = u64::from_le_bytes(entry);
        assert_eq!((entry >> 63, entry & ((1 << 55) - 1)), (1, 0), "{entry:#x}");
        // A region mapped from a sparse file: its data pages count, untouched.
        let path = std::env::temp_dir().join(format!("nestvm-residency-{}", std::process::id()));
        let f = std::fs::File::create(&path).unwrap();
        f.set_len(64 * PAGE).unwrap();
        std::os::unix::fs::FileExt::write_all_at(&f, &[7u8; 10], 40 * PAGE).unwrap();
        drop(f);
        let f = std::sync::Arc::new(std::fs::File::open(&path).unwrap());
        let r = vm_memory::mmap::MmapRegionBuilder::<()>::new(64 * PAGE as usize)
            .with_file_offset(vm_memory::FileOffset::from_arc(f, 0))
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_NORESERVE)
            .build()
            .unwrap();
        let mapped = GuestMemoryMmap::from_regions(vec![vm_memory::GuestRegionMmap::new(
            r,
            GuestAddress(0),
        )
        .unwrap()])
        .unwrap();
        let data = Residency::of(&mapped, mapped.iter().next().unwrap());
        let held: Vec<usize> = (0..64).filter(|&i| data[i]).collect();
        let _ = std::fs::remove_file(&path);
        // The filesystem may give data in larger blocks; never less.
        assert!(held.contains(&40), "{held:?}");
        assert!(!held.contains(&0) && !held.contains(&63), "{held:?}");
    }

    #[test]
    fn discarded_pages_read_as_zero_and_bad_ranges_are_refused() {
        let mem =
            GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 16 * PAGE as usize)]).unwrap();
        mem.write_slice(&[7u8; 2 * PAGE as usize], GuestAddress(4 * PAGE))
            .unwrap();
        discard(&mem, 4 * PAGE, PAGE).unwrap();
        let mut b = [1u8; PAGE as usize];
        mem.read_slice(&mut b, GuestAddress(4 * PAGE)).unwrap();
        assert!(b.iter().all(|&x| x == 0));
        mem.read_slice(&mut b, GuestAddress(5 * PAGE)).unwrap();
        assert!(b.iter().all(|&x| x == 7), "the next page is kept");
        for (addr, len) in [
            (1, PAGE),
            (0, 1),
            (0, 0),
            (15 * PAGE, 2 * PAGE),
            (16 * PAGE, PAGE),
            (!(PAGE - 1), PAGE),
        ] {
            assert!(discard(&mem, addr, len).is_err(), "{addr:#x}+{len:#x}");
        }
    }
}
