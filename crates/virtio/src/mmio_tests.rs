//! The transport driven through its registers: identification, feature
//! negotiation, hostile queue set-ups and accesses, and restoring from
//! snapshots that do not fit.

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

/// A running test device's snapshot, and its memory.
fn running_snapshot() -> (MmioSnapshot, Memory) {
    let (mut dev, mem) = TestBackend::device();
    driver_setup(&mut dev, features::VERSION_1);
    (dev.snapshot(), mem)
}

fn restore(snap: &MmioSnapshot, mem: &Memory) -> Result<MmioDevice<TestBackend>, MmioError> {
    MmioDevice::restore(TestBackend, mem.clone(), EventTrigger::new().unwrap(), snap)
}

#[test]
fn a_device_is_built_again_from_its_snapshot() {
    let (snap, mem) = running_snapshot();
    assert_eq!(snap.version, MmioSnapshot::VERSION);
    assert_eq!(snap.device_type, 42);
    let dev = restore(&snap, &mem).unwrap();
    assert!(dev.is_active());
    assert_eq!(dev.status(), snap.status);
    assert_eq!(dev.notify_events().len(), 1);
    let again = dev.snapshot();
    assert_eq!(again.queues[0].desc_table, snap.queues[0].desc_table);
    assert_eq!(again.driver_features, snap.driver_features);
    // Through JSON, as snapshots and migrations carry it.
    let json = serde_json::to_string(&snap).unwrap();
    let back: MmioSnapshot = serde_json::from_str(&json).unwrap();
    assert!(restore(&back, &mem).unwrap().is_active());
}

#[test]
fn a_snapshot_of_another_version_is_refused() {
    let (mut snap, mem) = running_snapshot();
    snap.version = MmioSnapshot::VERSION + 1;
    let e = restore(&snap, &mem).err().unwrap();
    assert!(
        matches!(
            e,
            MmioError::Version {
                found: 2,
                supported: 1,
                ..
            }
        ),
        "{e}"
    );
    // A snapshot from before versions reads as version 0.
    let mut json = serde_json::to_value(running_snapshot().0).unwrap();
    json.as_object_mut().unwrap().remove("version");
    let old: MmioSnapshot = serde_json::from_value(json).unwrap();
    let e = restore(&old, &mem).err().unwrap();
    assert!(matches!(e, MmioError::Version { found: 0, .. }), "{e}");
}

#[test]
fn a_snapshot_of_another_device_is_refused() {
    let (mut snap, mem) = running_snapshot();
    snap.device_type = 2;
    let e = restore(&snap, &mem).err().unwrap();
    assert!(
        matches!(
            e,
            MmioError::DeviceType {
                saved: 2,
                device: 42,
                ..
            }
        ),
        "{e}"
    );
    // Another device's backend state, on a device that has none.
    let (mut snap, _) = running_snapshot();
    snap.backend = Some(DeviceState::Balloon(crate::balloon::BalloonState {
        version: crate::balloon::BalloonState::VERSION,
        policy: Default::default(),
        ballooned: 0,
        stats_head: None,
    }));
    let e = restore(&snap, &mem).err().unwrap();
    let MmioError::Backend {
        kind: "test",
        source,
    } = &e
    else {
        panic!("{e}");
    };
    assert!(matches!(
        source,
        BackendError::State(crate::state::StateError::WrongDevice {
            device: "test",
            found: "balloon"
        })
    ));
    assert!(
        std::error::Error::source(&e).is_some(),
        "the cause is chained"
    );
}

#[test]
fn a_snapshot_that_does_not_fit_the_device_is_refused() {
    let (snap, mem) = running_snapshot();
    let mut bad = snap.clone();
    bad.queues.clear();
    let e = restore(&bad, &mem).err().unwrap();
    assert!(matches!(
        e,
        MmioError::QueueCount {
            saved: 0,
            device: 1,
            ..
        }
    ));
    let mut bad = snap.clone();
    bad.driver_features |= 1 << 3;
    let e = restore(&bad, &mem).err().unwrap();
    assert!(matches!(e, MmioError::Features { unoffered: 8, .. }));
    let mut bad = snap.clone();
    bad.queues[0].max_size = 32;
    let e = restore(&bad, &mem).err().unwrap();
    assert!(matches!(
        e,
        MmioError::QueueMaxSize {
            saved: 32,
            device: 16,
            ..
        }
    ));
    let mut bad = snap.clone();
    bad.queues[0].size = 3; // not a power of two
    let e = restore(&bad, &mem).err().unwrap();
    assert!(matches!(e, MmioError::Queue { index: 0, .. }));
    let mut bad = snap.clone();
    bad.queues[0].used_ring = 0xffff_ffff_f000;
    let e = restore(&bad, &mem).err().unwrap();
    assert!(matches!(e, MmioError::QueueOutsideMemory { index: 0, .. }));
    // Stopped, the same queue is only checked when the driver starts it.
    bad.active = false;
    assert!(!restore(&bad, &mem).unwrap().is_active());
}
