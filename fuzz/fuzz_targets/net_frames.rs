//! virtio-net with arbitrary transmit chains (headers, frames, source MACs)
//! and arbitrary frames arriving from the host side into arbitrary receive
//! buffers. With the spoofing policy off, no frame whose source MAC differs
//! from the adapter's may leave; nothing may panic.

#![no_main]

use std::collections::VecDeque;
use std::io;
use std::sync::{Arc, Mutex};

use libfuzzer_sys::fuzz_target;
use nestvm_devices::EventTrigger;
use nestvm_virtio::mmio::MmioDevice;
use nestvm_virtio::net::{FrameIo, Net, HDR_LEN};

mod common;

const MAC: [u8; 6] = [0x52, 0x56, 0, 0, 0, 1];

/// The host side: hands out the fuzzer's frames, records what is sent.
struct Host {
    incoming: VecDeque<Vec<u8>>,
    sent: Arc<Mutex<Vec<Vec<u8>>>>,
}

impl FrameIo for Host {
    fn read_frame(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let f = self.incoming.pop_front().ok_or(io::ErrorKind::WouldBlock)?;
        let n = f.len().min(buf.len());
        buf[..n].copy_from_slice(&f[..n]);
        Ok(n)
    }
    fn write_frame(&mut self, frame: &[u8]) -> io::Result<usize> {
        self.sent.lock().unwrap().push(frame.to_vec());
        Ok(frame.len())
    }
    fn set_offload(&mut self, _: bool, _: bool, _: bool) -> io::Result<()> {
        Ok(())
    }
    fn raw_fd(&self) -> std::os::fd::RawFd {
        -1
    }
    fn name(&self) -> String {
        "fuzz".into()
    }
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    // The first byte says how many frames arrive and how long each is.
    let (head, data) = data.split_at(1);
    let incoming = (0..head[0] % 4)
        .map(|i| {
            let len = (usize::from(head[0]) * 37 * (usize::from(i) + 1)) % 70_000;
            data.iter().cycle().take(len).copied().collect()
        })
        .collect();
    let sent = Arc::new(Mutex::new(Vec::new()));
    let host = Host {
        incoming,
        sent: sent.clone(),
    };
    let mem = common::memory();
    let net = Net::new(Box::new(host), MAC, false);
    let mut dev = MmioDevice::new(net, mem.clone(), EventTrigger::new().unwrap()).unwrap();
    common::start_and_fill(&mut dev, &mem, 2, data);
    dev.queue_notified(1);
    dev.backend_event();
    dev.queue_notified(0);
    for frame in sent.lock().unwrap().iter() {
        assert!(frame.len() >= HDR_LEN + 14);
        assert_eq!(frame[HDR_LEN + 6..HDR_LEN + 12], MAC, "a spoofed frame left");
    }
});
