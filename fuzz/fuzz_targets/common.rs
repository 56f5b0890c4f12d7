//! Shared set-up: guest memory whose first 64 KiB the fuzzer writes (rings,
//! descriptors and buffers all at once), and a device started on queues at
//! fixed places in it.

use nestvm_devices::bus::BusDevice;
use nestvm_virtio::driver::{self, QueueDriver};
use nestvm_virtio::Memory;
use vm_memory::{Bytes, GuestAddress};

/// Guest memory: 128 KiB at 0; descriptors may point anywhere, in or out.
pub fn memory() -> Memory {
    Memory::from_ranges(&[(GuestAddress(0), 128 << 10)]).unwrap()
}

/// Queue `i` lives at `0x4000 * (i + 1)`, size 16.
pub fn queues(n: usize) -> Vec<QueueDriver> {
    (0..n)
        .map(|i| QueueDriver::new(0x4000 * (i as u64 + 1), 16))
        .collect()
}

/// Starts `dev` with every feature it offers, then lets `data` overwrite
/// guest memory from address 0: descriptor tables, available rings and
/// buffers are all the fuzzer's to choose.
pub fn start_and_fill(dev: &mut dyn BusDevice, mem: &Memory, n: usize, data: &[u8]) {
    let offered = driver::offered_features(dev);
    driver::start(dev, offered, &queues(n));
    let len = data.len().min(64 << 10);
    let _ = mem.write_slice(&data[..len], GuestAddress(0));
}
