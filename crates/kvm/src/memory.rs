//! Giving guest memory back to the host: pages a balloon took from the guest
//! or that the guest reported free are dropped with `madvise(MADV_DONTNEED)`
//! (the guest reads zeros — or, for memory mapped from a saved VM's file,
//! that file's content — if it touches them again).

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

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

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
