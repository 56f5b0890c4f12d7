//! The migration wire from a hostile peer, without KVM: the receiver's and
//! the sender's half of the handshake fed arbitrary bytes, messages put
//! back together from arbitrary chunk plaintexts, and page batches decoded
//! into a small guest memory. Nothing may panic, no forged handshake may
//! authenticate, no message may outgrow its kind's cap, and no batch may
//! name more pages than a batch holds.

#![no_main]

use std::io::{Read, Write};
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use nestvm_virtio::Memory;
use nestvm_vmm::migration::channel::{self, Stream};
use nestvm_vmm::migration::frame::{Reassembler, BATCH_PAGES, CHUNK_HEAD};
use nestvm_vmm::migration::secret::Psk;
use nestvm_vmm::migration::wire;
use vm_memory::GuestAddress;

/// A peer whose every byte is the fuzzer's; what is sent to it is dropped.
struct Peer<'a>(&'a [u8]);

impl Read for Peer<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.0.read(buf)
    }
}

impl Write for Peer<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Stream for Peer<'_> {
    fn set_timeouts(&self, _: Option<Duration>) -> std::io::Result<()> {
        Ok(())
    }
}

fn key() -> Psk {
    Psk::from_bytes(std::array::from_fn(|i| i as u8 * 7 + 1))
}

/// Chunks from `data`: a header, a `u16` length, then that many bytes
/// cycled from what follows (so that a short input can grow a long message).
fn reassemble(mut data: &[u8]) {
    let mut r = Reassembler::default();
    while let Some((head, rest)) = data.split_first_chunk::<{ CHUNK_HEAD + 2 }>() {
        let len = usize::from(u16::from_le_bytes([head[2], head[3]]));
        let take = rest.len().min(64);
        let mut chunk = head[..CHUNK_HEAD].to_vec();
        chunk.extend(rest[..take].iter().cycle().take(len));
        data = &rest[take..];
        match r.push(&chunk) {
            Ok(Some((kind, message))) => assert!(message.len() <= kind.cap(), "{kind:?}"),
            Ok(None) => {}
            Err(_) => return,
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, data)) = data.split_first() else {
        return;
    };
    let t = Duration::from_secs(1);
    match mode % 4 {
        0 => assert!(channel::respond(Peer(data), &key(), t, t).is_err()),
        1 => assert!(channel::initiate(Peer(data), &key()).is_err()),
        2 => reassemble(data),
        _ => {
            let mem = Memory::from_ranges(&[(GuestAddress(0), 64 << 10)]).unwrap();
            if let Ok(n) = wire::apply_pages(&mem, data) {
                assert!(n <= BATCH_PAGES);
            }
        }
    }
});
