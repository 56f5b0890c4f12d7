//! The migration stream: length-prefixed messages over one TCP connection,
//! the mutual token handshake, and the page batches.
//!
//! A message is one kind byte, a little-endian `u32` length and the payload.
//! The peer is not trusted: lengths are bounded before anything is
//! allocated, and a page batch is checked against guest memory before a
//! byte of it is written.

use std::io::{Read, Write};

use hmac::{Hmac, Mac};
use sha2::Sha256;
use vm_memory::{Bytes, GuestAddress};

use super::MigrationError;
use nestvm_virtio::Memory;

/// Guest page size.
pub const PAGE: usize = 4096;
/// Pages per batch at most.
pub const BATCH_PAGES: usize = 256;
/// The largest message either side accepts (the final state of a VM with
/// many vCPUs is the biggest).
const MAX_MESSAGE: usize = 64 << 20;
/// Marks a batch entry whose page is all zeros (no data follows for it).
const ZERO_PAGE: u64 = 1;
const NONCE: usize = 32;

/// What a message is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    /// Receiver → sender: a nonce to answer.
    Challenge = 1,
    /// Sender → receiver: proof of the token, and a nonce of its own.
    Proof = 2,
    /// Receiver → sender: proof of the token.
    ProofBack = 3,
    /// Sender → receiver: the VM's definition and CPU (JSON).
    Hello = 4,
    /// Receiver → sender: it can take this VM.
    Accept = 5,
    /// Either way: no (UTF-8 reason); the stream ends.
    Refuse = 6,
    /// Sender → receiver: a batch of pages.
    Pages = 7,
    /// Sender → receiver: the paused VM's state (a snapshot container).
    State = 8,
    /// Receiver → sender: the VM runs here now.
    Resumed = 9,
}

impl Kind {
    fn from_u8(b: u8) -> Option<Kind> {
        use Kind::*;
        [
            Challenge, Proof, ProofBack, Hello, Accept, Refuse, Pages, State, Resumed,
        ]
        .into_iter()
        .find(|k| *k as u8 == b)
    }
}

/// Writes one message.
pub fn send(w: &mut impl Write, kind: Kind, payload: &[u8]) -> Result<(), MigrationError> {
    let len =
        u32::try_from(payload.len()).map_err(|_| MigrationError::protocol("message too long"))?;
    let mut head = [0u8; 5];
    head[0] = kind as u8;
    head[1..].copy_from_slice(&len.to_le_bytes());
    w.write_all(&head).map_err(MigrationError::Stream)?;
    w.write_all(payload).map_err(MigrationError::Stream)?;
    Ok(())
}

/// Reads one message. A `Refuse` from the peer becomes
/// [`MigrationError::Refused`].
pub fn recv(r: &mut impl Read) -> Result<(Kind, Vec<u8>), MigrationError> {
    let mut head = [0u8; 5];
    r.read_exact(&mut head).map_err(MigrationError::Stream)?;
    let kind = Kind::from_u8(head[0]).ok_or_else(|| MigrationError::protocol("unknown message"))?;
    let len = u32::from_le_bytes([head[1], head[2], head[3], head[4]]) as usize;
    if len > MAX_MESSAGE {
        return Err(MigrationError::protocol("message too long"));
    }
    let mut payload = vec![0u8; len];
    r.read_exact(&mut payload).map_err(MigrationError::Stream)?;
    if kind == Kind::Refuse {
        return Err(MigrationError::Refused(
            String::from_utf8_lossy(&payload).into_owned(),
        ));
    }
    Ok((kind, payload))
}

/// Reads one message that must be of kind `want`.
pub fn expect(r: &mut impl Read, want: Kind) -> Result<Vec<u8>, MigrationError> {
    let (kind, payload) = recv(r)?;
    if kind != want {
        return Err(MigrationError::protocol(format!(
            "expected {want:?}, got {kind:?}"
        )));
    }
    Ok(payload)
}

fn nonce() -> Result<[u8; NONCE], MigrationError> {
    let mut n = [0u8; NONCE];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut n))
        .map_err(MigrationError::Stream)?;
    Ok(n)
}

fn proof(token: &[u8], role: &[u8], first: &[u8], second: &[u8]) -> Hmac<Sha256> {
    let mut mac = Hmac::<Sha256>::new_from_slice(token).expect("HMAC takes keys of any length");
    mac.update(role);
    mac.update(first);
    mac.update(second);
    mac
}

/// The receiver's half of the handshake: both sides prove they hold the
/// token without sending it (HMAC-SHA256 over fresh nonces).
pub fn authenticate_sender(
    s: &mut (impl Read + Write),
    token: &[u8],
) -> Result<(), MigrationError> {
    let ours = nonce()?;
    send(s, Kind::Challenge, &ours)?;
    let p = expect(s, Kind::Proof)?;
    if p.len() != 32 + NONCE {
        return Err(MigrationError::protocol("bad proof"));
    }
    let (mac, theirs) = p.split_at(32);
    if proof(token, b"nestvm sender", &ours, theirs)
        .verify_slice(mac)
        .is_err()
    {
        let _ = send(s, Kind::Refuse, b"wrong migration token");
        return Err(MigrationError::Auth("the sender does not hold this token"));
    }
    let back = proof(token, b"nestvm receiver", theirs, &ours).finalize();
    send(s, Kind::ProofBack, &back.into_bytes())
}

/// The sender's half of the handshake.
pub fn authenticate_receiver(
    s: &mut (impl Read + Write),
    token: &[u8],
) -> Result<(), MigrationError> {
    let challenge = expect(s, Kind::Challenge)?;
    if challenge.len() != NONCE {
        return Err(MigrationError::protocol("bad challenge"));
    }
    let ours = nonce()?;
    let mac = proof(token, b"nestvm sender", &challenge, &ours).finalize();
    let mut p = mac.into_bytes().to_vec();
    p.extend_from_slice(&ours);
    send(s, Kind::Proof, &p)?;
    let back = match expect(s, Kind::ProofBack) {
        Err(MigrationError::Refused(_)) => {
            return Err(MigrationError::Auth("the receiver refused our token"))
        }
        other => other?,
    };
    proof(token, b"nestvm receiver", &ours, &challenge)
        .verify_slice(&back)
        .map_err(|_| MigrationError::Auth("the receiver does not hold this token"))
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
/// aligned, inside guest memory, and exactly as much data as announced.
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
    for e in entries.chunks_exact(8) {
        let raw = u64::from_le_bytes(e.try_into().expect("chunks of 8"));
        let addr = raw & !(PAGE as u64 - 1);
        if raw & (PAGE as u64 - 1) & !ZERO_PAGE != 0 {
            return Err(bad("unaligned page"));
        }
        let page = if raw & ZERO_PAGE != 0 {
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
    use std::os::unix::net::UnixStream;

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

    #[test]
    fn messages_are_bounded_and_typed() {
        let mut buf = Vec::new();
        send(&mut buf, Kind::Hello, b"hi").unwrap();
        assert_eq!(recv(&mut &buf[..]).unwrap(), (Kind::Hello, b"hi".to_vec()));
        let huge = [Kind::State as u8, 0xff, 0xff, 0xff, 0xff];
        assert!(recv(&mut &huge[..])
            .unwrap_err()
            .to_string()
            .contains("too long"));
        assert!(recv(&mut &[42u8, 0, 0, 0, 0][..]).is_err());
        let mut refuse = Vec::new();
        send(&mut refuse, Kind::Refuse, b"no room").unwrap();
        assert!(
            matches!(recv(&mut &refuse[..]), Err(MigrationError::Refused(r)) if r == "no room")
        );
    }

    fn handshake(sender_token: &'static [u8], receiver_token: &'static [u8]) -> (String, String) {
        let (mut a, mut b) = UnixStream::pair().unwrap();
        let t = std::thread::spawn(move || {
            authenticate_sender(&mut b, receiver_token).map_err(|e| e.to_string())
        });
        let s = authenticate_receiver(&mut a, sender_token).map_err(|e| e.to_string());
        drop(a);
        let r = t.join().unwrap();
        (format!("{s:?}"), format!("{r:?}"))
    }

    #[test]
    fn the_token_is_proven_both_ways() {
        assert_eq!(
            handshake(b"secret", b"secret"),
            ("Ok(())".into(), "Ok(())".into())
        );
        let (s, r) = handshake(b"secret", b"other");
        assert!(s.contains("refused our token"), "{s}");
        assert!(r.contains("does not hold"), "{r}");
    }
}
