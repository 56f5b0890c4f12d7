//! The transport driven through its registers: identification, feature
//! negotiation, hostile queue set-ups and accesses.

use super::*;
use crate::testing::{driver_setup, TestBackend};

#[test]
fn identifies_itself() {
    let (mut dev, _mem) = TestBackend::device();
    let mut r = |off: u64| {
        let mut b = [0u8; 4];
        dev.read(off, &mut b);
        u32::from_le_bytes(b)
    };
    assert_eq!(r(0), MAGIC);
    assert_eq!(r(4), 2);
    assert_eq!(r(8), 42);
    assert_eq!(r(0x34), 16, "queue 0 max size");
}

#[test]
fn negotiation_and_activation() {
    let (mut dev, _mem) = TestBackend::device();
    driver_setup(&mut dev, features::VERSION_1);
    assert!(dev.is_active());
    assert_eq!(dev.status() & status::NEEDS_RESET, 0);
    // Reset returns to square one.
    dev.write(0x70, &0u32.to_le_bytes());
    assert!(!dev.is_active());
    assert_eq!(dev.status(), 0);
}

#[test]
fn features_not_offered_are_refused() {
    let (mut dev, _mem) = TestBackend::device();
    let w = |dev: &mut MmioDevice<TestBackend>, off: u64, v: u32| dev.write(off, &v.to_le_bytes());
    w(&mut dev, 0x70, status::ACKNOWLEDGE | status::DRIVER);
    w(&mut dev, 0x24, 0);
    w(&mut dev, 0x20, 1 << 3); // never offered
    w(&mut dev, 0x24, 1);
    w(&mut dev, 0x20, 1);
    w(
        &mut dev,
        0x70,
        status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
    );
    assert_eq!(dev.status() & status::FEATURES_OK, 0);
    // Without VERSION_1 too.
    w(&mut dev, 0x70, 0);
    w(
        &mut dev,
        0x70,
        status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
    );
    assert_eq!(dev.status() & status::FEATURES_OK, 0);
}

#[test]
fn queue_outside_memory_needs_reset_not_a_crash() {
    let (mut dev, _mem) = TestBackend::device();
    let w = |dev: &mut MmioDevice<TestBackend>, off: u64, v: u32| dev.write(off, &v.to_le_bytes());
    w(&mut dev, 0x70, status::ACKNOWLEDGE | status::DRIVER);
    w(&mut dev, 0x24, 1);
    w(&mut dev, 0x20, 1);
    w(
        &mut dev,
        0x70,
        status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
    );
    w(&mut dev, 0x30, 0);
    w(&mut dev, 0x38, 16);
    w(&mut dev, 0x80, 0xffff_f000);
    w(&mut dev, 0x84, 0xffff);
    w(&mut dev, 0x44, 1);
    w(&mut dev, 0x70, 0xf);
    assert!(!dev.is_active());
    assert_ne!(dev.status() & status::NEEDS_RESET, 0);
    let mut b = [0u8; 4];
    dev.read(0x60, &mut b);
    assert_eq!(u32::from_le_bytes(b) & INT_CONFIG, INT_CONFIG);
}

#[test]
fn odd_accesses_are_harmless() {
    let (mut dev, _mem) = TestBackend::device();
    for off in [0u64, 1, 2, 3, 0x50, 0x51, 0xff, 0x100, 0x1ff, 0xfff] {
        for len in [1usize, 2, 4, 8] {
            let mut b = vec![0u8; len];
            dev.read(off, &mut b);
            dev.write(off, &b);
        }
    }
    // Out-of-range queue selections read as absent and write nowhere.
    dev.write(0x30, &7u32.to_le_bytes());
    dev.write(0x38, &8u32.to_le_bytes());
    let mut b = [0u8; 4];
    dev.read(0x34, &mut b);
    assert_eq!(u32::from_le_bytes(b), 0);
    dev.write(QUEUE_NOTIFY, &u32::MAX.to_le_bytes());
}
