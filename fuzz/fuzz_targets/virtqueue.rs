//! Arbitrary descriptor tables and available rings: every chain the queue
//! yields is read and written through in full; nothing may panic.

#![no_main]

use libfuzzer_sys::fuzz_target;
use nestvm_devices::EventTrigger;
use nestvm_virtio::mmio::MmioDevice;
use nestvm_virtio::{drain_queue, features, Backend, BackendError, Chain};

mod common;

/// A device that consumes every chain completely.
struct Sink;

impl Backend for Sink {
    fn device_type(&self) -> u32 {
        42
    }
    fn kind(&self) -> &'static str {
        "sink"
    }
    fn describe(&self) -> String {
        String::new()
    }
    fn features(&self) -> u64 {
        features::VERSION_1 | features::RING_EVENT_IDX
    }
    fn queue_sizes(&self) -> &[u16] {
        &[16]
    }
    fn config(&self) -> Vec<u8> {
        Vec::new()
    }
    fn activate(&mut self, _: u64) -> Result<(), BackendError> {
        Ok(())
    }
    fn process_queue(
        &mut self,
        _: usize,
        queues: &mut [nestvm_virtio::Queue],
        mem: &nestvm_virtio::Memory,
    ) -> nestvm_virtio::Served {
        drain_queue(&mut queues[0], mem, |chain: Chain<'_>| {
            use std::io::{Read, Write};
            let mut n = 0;
            if let Ok(mut r) = chain.clone().reader(mem) {
                let mut buf = [0u8; 512];
                while let Ok(k) = r.read(&mut buf) {
                    if k == 0 {
                        break;
                    }
                }
            }
            if let Ok(mut w) = chain.writer(mem) {
                let buf = [0xa5u8; 512];
                while let Ok(k) = w.write(&buf) {
                    if k == 0 {
                        break;
                    }
                    n += k;
                }
            }
            n as u32
        })
    }
}

fuzz_target!(|data: &[u8]| {
    let mem = common::memory();
    let mut dev = MmioDevice::new(Sink, mem.clone(), EventTrigger::new().unwrap()).unwrap();
    common::start_and_fill(&mut dev, &mem, 1, data);
    dev.queue_notified(0);
    dev.queue_notified(0);
});
