//! The ACPI sleep-control and reset registers of a hardware-reduced FADT:
//! the guest's `poweroff` writes `SLP_TYP(S5) << 2 | SLP_EN` to the sleep
//! register, and ACPI reboot writes the reset value to the reset register.

use crate::bus::BusDevice;
use crate::EventTrigger;

const SLP_EN: u8 = 1 << 5;

/// Two byte registers: sleep control at offset 0, reset at offset 1.
pub struct AcpiPm {
    s5_type: u8,
    reset_value: u8,
    power_off: EventTrigger,
    reset: EventTrigger,
}

impl AcpiPm {
    /// The register pair; `s5_type` and `reset_value` must match the tables.
    pub fn new(s5_type: u8, reset_value: u8, power_off: EventTrigger, reset: EventTrigger) -> Self {
        Self {
            s5_type,
            reset_value,
            power_off,
            reset,
        }
    }
}

impl BusDevice for AcpiPm {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        // Sleep status: never waking from anything.
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let [value] = data else { return };
        let event = match offset {
            0 if value & SLP_EN != 0 && (value >> 2) & 0x7 == self.s5_type => &self.power_off,
            1 if *value == self.reset_value => &self.reset,
            _ => return,
        };
        if let Err(e) = event.0.write(1) {
            log::error!("acpi: cannot signal the VMM: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn s5_powers_off_and_reset_value_resets() {
        let (off, rst) = (EventTrigger::new().unwrap(), EventTrigger::new().unwrap());
        let (off_seen, rst_seen) = (off.try_clone().unwrap(), rst.try_clone().unwrap());
        let mut pm = AcpiPm::new(5, 1, off, rst);
        pm.write(0, &[5 << 2]); // SLP_EN missing
        pm.write(0, &[(3 << 2) | SLP_EN]); // S3, not S5
        assert!(off_seen.0.read().is_err());
        pm.write(0, &[(5 << 2) | SLP_EN]);
        assert_eq!(off_seen.0.read().unwrap(), 1);
        pm.write(1, &[2]);
        assert!(rst_seen.0.read().is_err());
        pm.write(1, &[1]);
        assert_eq!(rst_seen.0.read().unwrap(), 1);
    }
}
