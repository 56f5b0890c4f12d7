//! A virtio-mmio transport (in front of a balloon) under arbitrary
//! sequences of register reads and writes and queue notifications, as a
//! guest driver — or a hostile guest — gives them: feature negotiation out
//! of order, queue set-up with any addresses and sizes, status resets,
//! configuration writes. Nothing panics.

#![no_main]

use libfuzzer_sys::fuzz_target;
use nestvm_devices::bus::BusDevice;
use nestvm_devices::EventTrigger;
use nestvm_virtio::balloon::{Balloon, Discard, Range};
use nestvm_virtio::mmio::MmioDevice;

fuzz_target!(|data: &[u8]| {
    let mem =
        nestvm_virtio::Memory::from_ranges(&[(vm_memory::GuestAddress(0), 128 << 10)]).unwrap();
    let discard: Discard = Box::new(|_, _| Ok(()));
    let range = Range {
        max: 128 << 10,
        min: 0,
        start: 128 << 10,
    };
    let Ok((balloon, control)) = Balloon::new(range, false, discard) else {
        return;
    };
    let mut dev = MmioDevice::new(balloon, mem.clone(), EventTrigger::new().unwrap()).unwrap();
    let (steps, memory) = data.split_at(data.len().min(6 * 512));
    let _ = vm_memory::Bytes::write_slice(
        &mem,
        &memory[..memory.len().min(64 << 10)],
        vm_memory::GuestAddress(0),
    );
    // Each step: [op, offset/4, value (4 bytes)]; offsets cover the
    // registers and the configuration space.
    for step in steps.chunks_exact(6) {
        let offset = u64::from(step[1]) * 4;
        let value = [step[2], step[3], step[4], step[5]];
        match step[0] % 4 {
            0 => {
                let mut buf = [0u8; 4];
                dev.read(offset, &mut buf);
            }
            1 => dev.write(offset, &value),
            2 => dev.queue_notified(usize::from(step[2] % 4)),
            _ => {
                let _ = control.set_target(Some(u64::from(u32::from_le_bytes(value)) << 12));
            }
        }
    }
});
