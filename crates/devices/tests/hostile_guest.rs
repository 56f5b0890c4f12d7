//! A hostile guest: every device on a bus like nestvm's gets random accesses
//! of every size at every offset, in and around its range. Nothing may panic,
//! and the devices must keep working afterwards.

use std::io::Write;
use std::sync::{Arc, Mutex};

use nestvm_devices::acpi_pm::AcpiPm;
use nestvm_devices::bus::Bus;
use nestvm_devices::i8042::I8042;
use nestvm_devices::serial::SerialPort;
use nestvm_devices::EventTrigger;

/// xorshift64*: deterministic, so a failure is reproducible.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

#[derive(Clone, Default)]
struct Sink(Arc<Mutex<Vec<u8>>>);

impl Write for Sink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn random_port_accesses_never_panic_and_devices_keep_working() {
    let out = Sink::default();
    let serial = Arc::new(Mutex::new(SerialPort::new(
        EventTrigger::new().unwrap(),
        Box::new(out.clone()),
    )));
    let reset = EventTrigger::new().unwrap();
    let reset_seen = reset.try_clone().unwrap();
    let mut bus = Bus::new();
    bus.insert(serial.clone(), 0x3f8, 8).unwrap();
    bus.insert(Arc::new(Mutex::new(I8042::new(reset))), 0x60, 5)
        .unwrap();
    bus.insert(
        Arc::new(Mutex::new(AcpiPm::new(
            5,
            1,
            EventTrigger::new().unwrap(),
            EventTrigger::new().unwrap(),
        ))),
        0x3c0,
        2,
    )
    .unwrap();

    let mut rng = Rng(0x5eed_1234_abcd_0001);
    let ports = [0x3f8u64, 0x60, 0x3c0];
    for _ in 0..200_000 {
        let base = ports[(rng.next() % 3) as usize];
        // In range, just outside, and far away.
        let addr = match rng.next() % 4 {
            0 => base.wrapping_sub(rng.next() % 4),
            3 => rng.next() % 0x1_0000,
            _ => base + rng.next() % 10,
        };
        let len = [1usize, 2, 4, 8, 3][(rng.next() % 5) as usize];
        let mut data = vec![0u8; len];
        if rng.next() % 2 == 0 {
            bus.read(addr, &mut data);
        } else {
            for b in data.iter_mut() {
                *b = rng.next() as u8;
            }
            bus.write(addr, &data);
        }
    }
    // Random writes may have pulsed the reset line; start from a clean count.
    let _ = reset_seen.0.read();

    // Still a working UART: set the line control back and send a byte.
    bus.write(0x3fb, &[0x03]); // LCR: 8N1, DLAB off
    bus.write(0x3fc, &[0x00]); // MCR: no loopback
    let before = out.0.lock().unwrap().len();
    bus.write(0x3f8, b"Z");
    assert_eq!(out.0.lock().unwrap().len(), before + 1);
    assert_eq!(*out.0.lock().unwrap().last().unwrap(), b'Z');
    // Still a working reset line.
    bus.write(0x64, &[0xfe]);
    assert_eq!(reset_seen.0.read().unwrap(), 1);
}
