//! The i8042 keyboard controller, reduced to what a VMM needs: its CPU reset
//! command (0xfe to port 0x64), which Linux uses for `reboot=k`.

use vm_superio::I8042Device;

use crate::bus::BusDevice;
use crate::EventTrigger;

/// Base port (data register); the command register is at +4 (0x64).
pub const I8042_PORT: u64 = 0x60;
/// Ports covered: 0x60..=0x64.
pub const I8042_PORT_LEN: u64 = 5;

/// The controller; a reset command signals its trigger.
pub struct I8042 {
    dev: I8042Device<EventTrigger>,
}

impl I8042 {
    /// A controller that signals `reset` on the CPU reset command.
    pub fn new(reset: EventTrigger) -> Self {
        Self {
            dev: I8042Device::new(reset),
        }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let v = u8::try_from(offset).map_or(0xff, |o| self.dev.read(o));
        data.fill(v);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let (Ok(off), [value]) = (u8::try_from(offset), data) else {
            return;
        };
        if let Err(e) = self.dev.write(off, *value) {
            log::error!("i8042: cannot signal the reset: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_command_signals() {
        let t = EventTrigger::new().unwrap();
        let seen = t.try_clone().unwrap();
        let mut k = I8042::new(t);
        k.write(4, &[0xfe]);
        assert_eq!(seen.0.read().unwrap(), 1);
        k.write(4, &[0xff]);
        k.write(4, &[0xfe, 0xfe]); // not a byte access: ignored
        assert!(seen.0.read().is_err(), "nothing more was signalled");
    }
}
