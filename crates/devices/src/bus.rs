//! A bus maps address ranges to devices. There is one for port I/O and one
//! for MMIO; the vCPU's exit handler looks the address up and calls the device
//! with the offset into its range. Accesses nobody claims read as all ones and
//! are otherwise ignored, like an empty ISA slot.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// A device on a bus.
pub trait BusDevice: Send {
    /// A read of `data.len()` bytes at `offset` into the device's range.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// A write of `data` at `offset` into the device's range.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// A shared device handle.
pub type SharedDevice = Arc<Mutex<dyn BusDevice>>;

/// Errors of bus set-up.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    /// A range of zero length.
    #[error("device range at {0:#x} has zero length")]
    Empty(u64),
    /// A range that overlaps one already on the bus.
    #[error("device range {base:#x}+{len:#x} overlaps the device at {other:#x}")]
    Overlap {
        /// The new range's base.
        base: u64,
        /// Its length.
        len: u64,
        /// The base of the range it overlaps.
        other: u64,
    },
}

/// Address ranges to devices.
#[derive(Default, Clone)]
pub struct Bus {
    ranges: BTreeMap<u64, (u64, SharedDevice)>,
}

impl Bus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Puts `device` at `base .. base + len`.
    pub fn insert(&mut self, device: SharedDevice, base: u64, len: u64) -> Result<(), BusError> {
        if len == 0 {
            return Err(BusError::Empty(base));
        }
        let end = base.checked_add(len).ok_or(BusError::Overlap {
            base,
            len,
            other: u64::MAX,
        })?;
        if let Some((&other, &(olen, _))) = self.ranges.range(..end).next_back() {
            if other + olen > base {
                return Err(BusError::Overlap { base, len, other });
            }
        }
        self.ranges.insert(base, (len, device));
        Ok(())
    }

    /// The device covering `addr .. addr + size` and the offset of `addr` in it.
    fn resolve(&self, addr: u64, size: usize) -> Option<(&SharedDevice, u64)> {
        let (&base, (len, dev)) = self.ranges.range(..=addr).next_back()?;
        let offset = addr - base;
        (offset.checked_add(size as u64)? <= *len).then_some((dev, offset))
    }

    /// Serves a read; returns false (and all-ones data) when nothing is there.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.resolve(addr, data.len()) {
            Some((dev, offset)) => {
                lock(dev).read(offset, data);
                true
            }
            None => {
                data.fill(0xff);
                false
            }
        }
    }

    /// Serves a write; returns false when nothing is there.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.resolve(addr, data.len()) {
            Some((dev, offset)) => {
                lock(dev).write(offset, data);
                true
            }
            None => false,
        }
    }
}

/// Locks a device, carrying on if another thread panicked while holding it:
/// device state is plain registers, valid after any completed access.
pub fn lock(dev: &SharedDevice) -> std::sync::MutexGuard<'_, dyn BusDevice + 'static> {
    dev.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Recorder {
        writes: Vec<(u64, Vec<u8>)>,
    }

    impl BusDevice for Recorder {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.writes.push((offset, data.to_vec()));
        }
    }

    #[test]
    fn routes_by_range_and_offset() {
        let a = Arc::new(Mutex::new(Recorder::default()));
        let mut bus = Bus::new();
        bus.insert(a.clone(), 0x3f8, 8).unwrap();
        let mut b = [0u8; 1];
        assert!(bus.read(0x3fd, &mut b));
        assert_eq!(b, [5]);
        assert!(bus.write(0x3f8, &[0x41]));
        assert_eq!(a.lock().unwrap().writes, vec![(0, vec![0x41])]);
    }

    #[test]
    fn unclaimed_reads_are_all_ones_and_straddling_is_refused() {
        let mut bus = Bus::new();
        bus.insert(Arc::new(Mutex::new(Recorder::default())), 0x60, 5)
            .unwrap();
        let mut b = [0u8; 4];
        assert!(!bus.read(0x70, &mut b));
        assert_eq!(b, [0xff; 4]);
        // A 4-byte access at 0x63 runs past the end of the range.
        assert!(!bus.read(0x63, &mut b));
        assert!(!bus.write(0x5f, &[1, 2]));
        assert!(!bus.write(u64::MAX, &[1, 2]));
    }

    #[test]
    fn overlaps_are_refused() {
        let dev = || -> SharedDevice { Arc::new(Mutex::new(Recorder::default())) };
        let mut bus = Bus::new();
        bus.insert(dev(), 0x100, 0x10).unwrap();
        assert!(matches!(
            bus.insert(dev(), 0x108, 4),
            Err(BusError::Overlap { other: 0x100, .. })
        ));
        assert!(matches!(
            bus.insert(dev(), 0xf8, 0x10),
            Err(BusError::Overlap { .. })
        ));
        assert_eq!(bus.insert(dev(), 0x200, 0), Err(BusError::Empty(0x200)));
        bus.insert(dev(), 0x110, 4).unwrap();
        bus.insert(dev(), 0xf0, 0x10).unwrap();
    }
}
