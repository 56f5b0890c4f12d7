//! The migration's messages over its channel ([`super::channel`]), and
//! the page batches.
//!
//! A page batch is a `u32` LE count, that many `u64` LE entries (a page's
//! guest address, its low bit set for an all-zero page that carries no
//! data), then the 4 KiB of each other page in order. The peer is trusted
//! only as far as the channel authenticated it: a batch is checked against
//! guest memory before a byte of it is written.

use vm_memory::{Bytes, GuestAddress};

use super::channel::{Channel, Stream};
pub use super::frame::{Kind, BATCH_PAGES, PAGE};
use super::MigrationError;
use nestvm_virtio::Memory;

/// Marks a batch entry whose page is all zeros (no data follows for it).
const ZERO_PAGE: u64 = 1;

/// Sends one message.
pub fn send(
    ch: &mut Channel<impl Stream>,
    kind: Kind,
    payload: &[u8],
) -> Result<(), MigrationError> {
    Ok(ch.send(kind, payload)?)
}

/// Receives one message. A `Refuse` from the peer becomes
/// [`MigrationError::Refused`].
pub fn recv(ch: &mut Channel<impl Stream>) -> Result<(Kind, Vec<u8>), MigrationError> {
    match ch.recv()? {
        (Kind::Refuse, why) => Err(MigrationError::Refused(
            String::from_utf8_lossy(&why).into_owned(),
        )),
        message => Ok(message),
    }
}

/// Receives one message that must be of kind `want`.
pub fn expect(ch: &mut Channel<impl Stream>, want: Kind) -> Result<Vec<u8>, MigrationError> {
    let (kind, payload) = recv(ch)?;
    if kind != want {
        return Err(MigrationError::protocol(format!(
            "expected {want:?}, got {kind:?}"
        )));
    }
    Ok(payload)
}

/// Encodes a batch of pages read from `mem`: all-zero pages travel as a
/// flag (or not at all with `skip_zero`, when the receiver's page is still
/// untouched), the others with their 4 KiB. Returns the payload, how many
/// bytes of page data it carries and how many pages it names.
pub fn encode_pages(
    mem: &Memory,
    pages: &[u64],
    skip_zero: bool,
) -> Result<(Vec<u8>, u64, usize), MigrationError> {
    let mut head = Vec::with_capacity(4 + pages.len() * 8);
    head.extend_from_slice(&[0; 4]);
    let mut count = 0u32;
    let mut data = Vec::with_capacity(pages.len() * PAGE);
    let mut page = [0u8; PAGE];
    for &addr in pages {
        mem.read_slice(&mut page, GuestAddress(addr))
            .map_err(|e| MigrationError::Memory(e.to_string()))?;
        if crate::persist::is_zero(&page) {
            if !skip_zero {
                head.extend_from_slice(&(addr | ZERO_PAGE).to_le_bytes());
                count += 1;
            }
        } else {
            count += 1;
            head.extend_from_slice(&addr.to_le_bytes());
            data.extend_from_slice(&page);
        }
    }
    let sent = data.len() as u64;
    head[..4].copy_from_slice(&count.to_le_bytes());
    head.extend_from_slice(&data);
    Ok((head, sent, count as usize))
}

/// Writes a received batch into `mem`, after checking every entry: page
/// aligned, inside guest memory, and exactly as much data as announced. A
/// zero page is written only where the page here holds data: reading an
/// untouched page allocates nothing, writing zeros into it would.
pub fn apply_pages(mem: &Memory, payload: &[u8]) -> Result<usize, MigrationError> {
    let bad = |what: &str| MigrationError::protocol(format!("bad page batch: {what}"));
    let count = payload
        .get(..4)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
        .ok_or_else(|| bad("no count"))?;
    if count > BATCH_PAGES {
        return Err(bad("too many pages"));
    }
    let entries = payload
        .get(4..4 + count * 8)
        .ok_or_else(|| bad("truncated"))?;
    let mut data = &payload[4 + count * 8..];
    let zero = [0u8; PAGE];
    let mut here = vec![0u8; PAGE];
    for e in entries.chunks_exact(8) {
        let raw = u64::from_le_bytes(e.try_into().expect("chunks of 8"));
        let addr = raw & !(PAGE as u64 - 1);
        if raw & (PAGE as u64 - 1) & !ZERO_PAGE != 0 {
            return Err(bad("unaligned page"));
        }
        let page = if raw & ZERO_PAGE != 0 {
            mem.read_slice(&mut here, GuestAddress(addr))
                .map_err(|_| bad("page outside guest memory"))?;
            if here.iter().all(|&b| b == 0) {
                continue;
            }
            &zero[..]
        } else {
            let (p, rest) = data
                .split_at_checked(PAGE)
                .ok_or_else(|| bad("short data"))?;
            data = rest;
            p
        };
        mem.write_slice(page, GuestAddress(addr))
            .map_err(|_| bad("page outside guest memory"))?;
    }
    if !data.is_empty() {
        return Err(bad("data left over"));
    }
    Ok(count)
}

/// A digest of all guest memory: CRC-64 of each MiB, then of those CRCs.
/// Both sides compute it after the final copy when asked to verify.
pub fn memory_digest(mem: &Memory) -> Result<u64, MigrationError> {
    use vm_memory::{Address, GuestMemoryBackend, GuestMemoryRegion};
    let mut crcs = Vec::new();
    let mut buf = vec![0u8; 1 << 20];
    for region in mem.iter() {
        let mut at = 0u64;
        while at < region.len() {
            let n = (region.len() - at).min(buf.len() as u64) as usize;
            mem.read_slice(&mut buf[..n], region.start_addr().unchecked_add(at))
                .map_err(|e| MigrationError::Memory(e.to_string()))?;
            crcs.extend_from_slice(&nestvm_snapshot::crc64::crc64(&buf[..n]).to_le_bytes());
            at += n as u64;
        }
    }
    Ok(nestvm_snapshot::crc64::crc64(&crcs))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn memory() -> Memory {
        Memory::from_ranges(&[(GuestAddress(0), 64 * PAGE)]).unwrap()
    }

    #[test]
    fn pages_round_trip_with_zero_pages_as_flags() {
        let src = memory();
        src.write_slice(&[7u8; PAGE], GuestAddress(3 * PAGE as u64))
            .unwrap();
        let dst = memory();
        dst.write_slice(&[9u8; PAGE], GuestAddress(5 * PAGE as u64))
            .unwrap();
        let pages = [3 * PAGE as u64, 5 * PAGE as u64];
        let (_, _, n) = encode_pages(&src, &pages, true).unwrap();
        assert_eq!(n, 1, "a first copy leaves zero pages out");
        let (payload, data, n) = encode_pages(&src, &pages, false).unwrap();
        assert_eq!((data, n), (PAGE as u64, 2), "the zero page carries no data");
        assert_eq!(apply_pages(&dst, &payload).unwrap(), 2);
        let mut b = [0u8; PAGE];
        dst.read_slice(&mut b, GuestAddress(3 * PAGE as u64))
            .unwrap();
        assert_eq!(b, [7u8; PAGE]);
        dst.read_slice(&mut b, GuestAddress(5 * PAGE as u64))
            .unwrap();
        assert_eq!(b, [0u8; PAGE], "a page that became zero is cleared");
    }

    /// A zero page sent for a page that is zero here too is not written
    /// (the memory's write log says so), and one outside memory is refused
    /// all the same.
    #[test]
    fn a_zero_page_is_not_written_where_the_page_is_zero_already() {
        use vm_memory::bitmap::AtomicBitmap;
        use vm_memory::mmap::MmapRegion;
        use vm_memory::GuestMemoryBackend;
        let src = memory();
        let dst = memory();
        dst.write_slice(&[9u8; PAGE], GuestAddress(5 * PAGE as u64))
            .unwrap();
        let written = |m: &Memory| {
            let region: &MmapRegion<AtomicBitmap> = m.iter().next().unwrap();
            region.bitmap().get_and_reset()
        };
        written(&dst);
        let (payload, _, n) =
            encode_pages(&src, &[2 * PAGE as u64, 5 * PAGE as u64], false).unwrap();
        assert_eq!(n, 2);
        assert_eq!(apply_pages(&dst, &payload).unwrap(), 2);
        let log = written(&dst);
        assert_eq!(
            log[0],
            1 << 5,
            "only the page that held data was written: {log:?}"
        );
        let far = (64 * PAGE as u64) | ZERO_PAGE;
        let mut bad = 1u32.to_le_bytes().to_vec();
        bad.extend_from_slice(&far.to_le_bytes());
        assert!(apply_pages(&dst, &bad).is_err());
    }

    #[test]
    fn hostile_batches_are_refused() {
        let mem = memory();
        let batch = |entries: &[u64], data: usize| {
            let mut p = (entries.len() as u32).to_le_bytes().to_vec();
            for e in entries {
                p.extend_from_slice(&e.to_le_bytes());
            }
            p.extend(std::iter::repeat_n(1u8, data));
            p
        };
        for (payload, why) in [
            (batch(&[64 * PAGE as u64], PAGE), "outside"),
            (batch(&[!0xfff], PAGE), "outside"),
            (batch(&[8], PAGE), "unaligned"),
            (batch(&[0], PAGE - 1), "short"),
            (batch(&[0], PAGE + 1), "left over"),
            (batch(&[0, 4096], PAGE), "short"),
            (vec![1, 0, 0], "no count"),
            (batch(&vec![0; BATCH_PAGES + 1], 0), "too many"),
        ] {
            let e = apply_pages(&mem, &payload).unwrap_err().to_string();
            assert!(e.contains(why), "{why}: {e}");
        }
    }
}
