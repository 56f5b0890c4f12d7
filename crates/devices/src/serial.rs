//! The console: a 16550 UART from vm-superio whose output goes to a writer
//! (nestvm's stdout) and whose input the VMM feeds from stdin. Its interrupt
//! is an [`EventTrigger`] that the VMM attaches to an irqfd.

use std::io::Write;

use serde::{Deserialize, Serialize};
use vm_superio::serial::{NoEvents, SerialState};
use vm_superio::Serial;

use crate::bus::BusDevice;
use crate::EventTrigger;

/// Number of registers.
pub const SERIAL_PORT_LEN: u64 = 8;

/// Errors restoring a UART.
#[derive(Debug, thiserror::Error)]
pub enum SerialError {
    /// vm-superio refused the saved state (an oversized input buffer) or
    /// could not raise the interrupt it implies.
    #[error("the saved serial port state is invalid")]
    State(#[source] vm_superio::serial::Error<std::io::Error>),
}

/// A 16550 UART on the port bus.
pub struct SerialPort {
    uart: Serial<EventTrigger, NoEvents, Box<dyn Write + Send>>,
}

/// A UART's registers and pending input, for snapshots.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SerialSnapshot {
    /// Divisor latch, low and high bytes.
    pub divisor: [u8; 2],
    /// Interrupt enable.
    pub ier: u8,
    /// Interrupt identification.
    pub iir: u8,
    /// Line control.
    pub lcr: u8,
    /// Line status.
    pub lsr: u8,
    /// Modem control.
    pub mcr: u8,
    /// Modem status.
    pub msr: u8,
    /// Scratch.
    pub scratch: u8,
    /// Bytes received and not yet read by the guest.
    pub input: Vec<u8>,
}

impl SerialPort {
    /// A UART that raises `irq` and writes what the guest sends to `out`.
    pub fn new(irq: EventTrigger, out: Box<dyn Write + Send>) -> Self {
        Self {
            uart: Serial::new(irq, out),
        }
    }

    /// Its registers and pending input.
    pub fn snapshot(&self) -> SerialSnapshot {
        let s = self.uart.state();
        SerialSnapshot {
            divisor: [s.baud_divisor_low, s.baud_divisor_high],
            ier: s.interrupt_enable,
            iir: s.interrupt_identification,
            lcr: s.line_control,
            lsr: s.line_status,
            mcr: s.modem_control,
            msr: s.modem_status,
            scratch: s.scratch,
            input: s.in_buffer,
        }
    }

    /// A UART in the state `snap` describes (a snapshot is untrusted input:
    /// vm-superio refuses an oversized input buffer).
    pub fn from_snapshot(
        snap: &SerialSnapshot,
        irq: EventTrigger,
        out: Box<dyn Write + Send>,
    ) -> Result<Self, SerialError> {
        let state = SerialState {
            baud_divisor_low: snap.divisor[0],
            baud_divisor_high: snap.divisor[1],
            interrupt_enable: snap.ier,
            interrupt_identification: snap.iir,
            line_control: snap.lcr,
            line_status: snap.lsr,
            modem_control: snap.mcr,
            modem_status: snap.msr,
            scratch: snap.scratch,
            in_buffer: snap.input.clone(),
        };
        let uart = Serial::from_state(&state, irq, NoEvents, out).map_err(SerialError::State)?;
        Ok(Self { uart })
    }

    /// How many input bytes the receive FIFO can take now.
    pub fn input_room(&self) -> usize {
        self.uart.fifo_capacity()
    }

    /// Queues input for the guest; returns how many bytes were taken (the
    /// rest must be offered again once the guest has read some).
    pub fn queue_input(&mut self, bytes: &[u8]) -> usize {
        if bytes.is_empty() || self.uart.fifo_capacity() == 0 {
            return 0;
        }
        match self.uart.enqueue_raw_bytes(bytes) {
            Ok(n) => n,
            Err(e) => {
                log::warn!("serial: cannot raise the receive interrupt: {e:?}");
                0
            }
        }
    }
}

impl BusDevice for SerialPort {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = match u8::try_from(offset + i as u64) {
                Ok(off) if u64::from(off) < SERIAL_PORT_LEN => self.uart.read(off),
                _ => 0xff,
            };
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        for (i, &b) in data.iter().enumerate() {
            let Ok(off) = u8::try_from(offset + i as u64) else {
                return;
            };
            if u64::from(off) >= SERIAL_PORT_LEN {
                return;
            }
            if let Err(e) = self.uart.write(off, b) {
                // Output that cannot be written (a closed stdout) must not stop the guest.
                log::debug!("serial: write at offset {off}: {e:?}");
            }
        }
    }
}

/// A writer that flushes every write, so an interactive guest's prompt
/// appears at once.
pub struct Unbuffered<W: Write>(pub W);

impl<W: Write> Write for Unbuffered<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.0.write(buf)?;
        self.0.flush()?;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);

    impl Write for Shared {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    const IER: u64 = 1;
    const LSR: u64 = 5;

    #[test]
    fn guest_output_reaches_the_writer() {
        let out = Shared::default();
        let mut s = SerialPort::new(EventTrigger::new().unwrap(), Box::new(out.clone()));
        for b in b"hi\n" {
            s.write(0, &[*b]);
        }
        assert_eq!(out.0.lock().unwrap().as_slice(), b"hi\n");
        // A 2-byte access covers two registers, as on the ISA bus.
        s.write(0, b"ok");
        assert_eq!(out.0.lock().unwrap().as_slice(), b"hi\no");
        s.write(1, &[0]);
        s.write(0, b"k");
        assert_eq!(out.0.lock().unwrap().as_slice(), b"hi\nok");
        // The transmitter is always ready.
        let mut lsr = [0u8];
        s.read(LSR, &mut lsr);
        assert_ne!(lsr[0] & 0x20, 0);
    }

    #[test]
    fn input_raises_the_interrupt_and_fifo_bounds_it() {
        let irq = EventTrigger::new().unwrap();
        let irq_seen = irq.try_clone().unwrap();
        let mut s = SerialPort::new(irq, Box::new(std::io::sink()));
        // Enable the received-data interrupt.
        s.write(IER, &[0x01]);
        let room = s.input_room();
        assert!(room > 0);
        let big = vec![b'x'; room + 10];
        assert_eq!(s.queue_input(&big), room);
        assert_eq!(s.queue_input(b"more"), 0, "full FIFO takes nothing");
        assert!(irq_seen.0.read().unwrap() >= 1);
        let mut b = [0u8];
        s.read(0, &mut b);
        assert_eq!(b[0], b'x');
        assert_eq!(s.input_room(), 1);
    }

    #[test]
    fn a_snapshot_comes_back_and_an_oversized_one_is_refused() {
        let mut s = SerialPort::new(EventTrigger::new().unwrap(), Box::new(std::io::sink()));
        s.write(3, &[0x03]); // 8 data bits
        assert_eq!(s.queue_input(b"ab"), 2);
        let snap = s.snapshot();
        let irq = EventTrigger::new().unwrap();
        let back = SerialPort::from_snapshot(&snap, irq, Box::new(std::io::sink())).unwrap();
        let again = back.snapshot();
        assert_eq!((again.lcr, again.input), (0x03, b"ab".to_vec()));
        let mut bad = snap;
        bad.input = vec![0; 1 << 16];
        let irq = EventTrigger::new().unwrap();
        let e = SerialPort::from_snapshot(&bad, irq, Box::new(std::io::sink()))
            .err()
            .unwrap();
        assert!(matches!(
            e,
            SerialError::State(vm_superio::serial::Error::FullFifo)
        ));
    }

    #[test]
    fn out_of_range_offsets_are_ignored() {
        let mut s = SerialPort::new(EventTrigger::new().unwrap(), Box::new(std::io::sink()));
        let mut d = [0u8; 2];
        s.read(7, &mut d);
        assert_eq!(d[1], 0xff);
        s.write(300, &[1]);
    }
}
