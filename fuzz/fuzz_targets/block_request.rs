//! virtio-blk requests from arbitrary guest memory: headers, sector numbers,
//! lengths and descriptor chains are the fuzzer's. Every request must end
//! with a status or be handed back; nothing may panic, and nothing may
//! touch the image outside its 64 sectors.

#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use nestvm_devices::EventTrigger;
use nestvm_virtio::block::Block;
use nestvm_virtio::mmio::MmioDevice;

mod common;

fn image() -> &'static PathBuf {
    static IMAGE: OnceLock<PathBuf> = OnceLock::new();
    IMAGE.get_or_init(|| {
        let p = std::env::temp_dir().join(format!("nestvm-fuzz-blk-{}.img", std::process::id()));
        std::fs::write(&p, vec![0u8; 64 * 512]).unwrap();
        p
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&ro, data)) = data.split_first() else {
        return;
    };
    let mem = common::memory();
    let block = Block::open(image(), ro & 1 == 1, "fuzz").unwrap();
    let mut dev = MmioDevice::new(block, mem.clone(), EventTrigger::new().unwrap()).unwrap();
    common::start_and_fill(&mut dev, &mem, 1, data);
    dev.queue_notified(0);
    assert_eq!(std::fs::metadata(image()).unwrap().len(), 64 * 512, "image grew");
});
