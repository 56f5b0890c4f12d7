//! virtio-vsock with arbitrary chains on all three queues (packet headers,
//! payloads, receive and event buffers), a host listener on port 1 for the
//! guest to reach, and a host client asking for a port: whatever the guest
//! sends, nothing panics, and the connections stay within their bound.

#![no_main]

use std::io::Write;
use std::os::unix::net::{UnixListener, UnixStream};

use libfuzzer_sys::fuzz_target;
use nestvm_devices::EventTrigger;
use nestvm_virtio::mmio::MmioDevice;
use nestvm_virtio::vsock::Vsock;
use nestvm_virtio::vsock_host::MAX_CONNECTIONS;
use nestvm_virtio::Backend;

mod common;

fuzz_target!(|data: &[u8]| {
    let dir = std::env::temp_dir().join(format!("nestvm-fuzz-vsock-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&dir);
    let socket = dir.join("v.sock");
    let Ok(vsock) = Vsock::new(3, &socket) else {
        return;
    };
    let mut port1 = socket.clone().into_os_string();
    port1.push("_1");
    let _ = std::fs::remove_file(&port1);
    let _listener = UnixListener::bind(&port1);
    let mem = common::memory();
    let mut dev = MmioDevice::new(vsock, mem.clone(), EventTrigger::new().unwrap()).unwrap();
    common::start_and_fill(&mut dev, &mem, 3, data);
    if let Ok(mut c) = UnixStream::connect(&socket) {
        let _ = c.write_all(b"CONNECT 1\n");
    }
    for q in [1, 0, 2, 1] {
        dev.queue_notified(q);
    }
    dev.backend_event();
    dev.queue_notified(0);
    let open = dev.backend().counters().iter().find(|(n, _)| *n == "open").map_or(0, |c| c.1);
    assert!(open as usize <= MAX_CONNECTIONS);
});
