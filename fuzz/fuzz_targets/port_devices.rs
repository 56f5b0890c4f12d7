//! The devices on the port bus — the 16550 UART, the i8042 reset line and
//! the ACPI PM registers — under arbitrary sequences of reads and writes of
//! any width at any port, as a guest's `in`/`out` instructions give them.
//! Nothing panics, and reads of ports no device claims return all ones.

#![no_main]

use std::sync::{Arc, Mutex};

use libfuzzer_sys::fuzz_target;
use nestvm_devices::acpi_pm::AcpiPm;
use nestvm_devices::bus::Bus;
use nestvm_devices::i8042::{I8042, I8042_PORT, I8042_PORT_LEN};
use nestvm_devices::serial::{SerialPort, SERIAL_PORT_LEN};
use nestvm_devices::EventTrigger;

const COM1: u64 = 0x3f8;
const PM: u64 = 0x3c0;

fuzz_target!(|data: &[u8]| {
    let mut bus = Bus::default();
    let serial = SerialPort::new(EventTrigger::new().unwrap(), Box::new(std::io::sink()));
    let serial = Arc::new(Mutex::new(serial));
    bus.insert(serial.clone(), COM1, SERIAL_PORT_LEN).unwrap();
    let reset = EventTrigger::new().unwrap();
    bus.insert(
        Arc::new(Mutex::new(I8042::new(reset.try_clone().unwrap()))),
        I8042_PORT,
        I8042_PORT_LEN,
    )
    .unwrap();
    let pm = AcpiPm::new(
        5,
        0x0f,
        EventTrigger::new().unwrap(),
        reset.try_clone().unwrap(),
    );
    bus.insert(Arc::new(Mutex::new(pm)), PM, 2).unwrap();
    // Each step: [op, port-low, width, value]; ports are drawn near the
    // devices so most accesses hit one.
    for step in data.chunks_exact(4).take(4096) {
        let base = [COM1, I8042_PORT, PM, 0x80][usize::from(step[0] & 3)];
        let port = base + u64::from(step[1] & 0x0f);
        let width = [1usize, 2, 4, 8][usize::from(step[2] & 3)];
        if step[0] & 0x80 != 0 {
            let mut buf = vec![0u8; width];
            if !bus.read(port, &mut buf) {
                assert!(buf.iter().all(|&b| b == 0xff) || buf.iter().all(|&b| b == 0));
            }
        } else {
            let _ = bus.write(port, &vec![step[3]; width]);
        }
        if step[0] & 0x40 != 0 {
            // Input from the host side, as a console client types.
            let _ = serial.lock().unwrap().queue_input(&step[1..]);
        }
    }
});
