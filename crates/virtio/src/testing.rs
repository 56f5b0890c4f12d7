//! Test helpers: a trivial backend and guest memory.

use crate::Memory;
use nestvm_devices::EventTrigger;
use virtio_queue::Queue;
use vm_memory::GuestAddress;

use crate::driver::{self, QueueDriver};
use crate::mmio::MmioDevice;
use crate::{drain_queue, features, Backend, BackendError, Served};

/// Guest memory for tests: 1 MiB at 0.
pub fn memory() -> Memory {
    Memory::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap()
}

/// A backend that completes every chain with length 0.
pub struct TestBackend;

impl Backend for TestBackend {
    fn device_type(&self) -> u32 {
        42
    }
    fn kind(&self) -> &'static str {
        "test"
    }
    fn describe(&self) -> String {
        "test".into()
    }
    fn features(&self) -> u64 {
        features::VERSION_1
    }
    fn queue_sizes(&self) -> &[u16] {
        &[16]
    }
    fn config(&self) -> Vec<u8> {
        vec![1, 2, 3, 4]
    }
    fn activate(&mut self, _features: u64) -> Result<(), BackendError> {
        Ok(())
    }
    fn process_queue(&mut self, _q: usize, queues: &mut [Queue], mem: &Memory) -> Served {
        drain_queue(&mut queues[0], mem, |_| 0)
    }
}

impl TestBackend {
    /// The backend behind a transport, with its memory.
    pub fn device() -> (MmioDevice<TestBackend>, Memory) {
        let mem = memory();
        let dev = MmioDevice::new(TestBackend, mem.clone(), EventTrigger::new().unwrap()).unwrap();
        (dev, mem)
    }
}

/// Starts `dev` with one queue at 0x10000 and `features`.
pub fn driver_setup<B: Backend>(dev: &mut MmioDevice<B>, features: u64) -> QueueDriver {
    let q = QueueDriver::new(0x10000, 16);
    driver::start(dev, features, std::slice::from_ref(&q));
    q
}
