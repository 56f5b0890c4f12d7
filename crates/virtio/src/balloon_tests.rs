//! The balloon driven through its registers by the test driver: inflate and
//! deflate, runs of pages freed with one call, the bounds on what one
//! request and one turn may cost, hostile page numbers, statistics, free page reporting, targets
//! and the automatic policy, and its typed saved state.

use super::*;
use crate::driver::{self, Buf, QueueDriver};
use crate::mmio::{Inspect, MmioDevice, MmioError, MmioSnapshot};
use crate::state::StateError;
use crate::testing::memory;
use nestvm_devices::bus::BusDevice;
use nestvm_devices::EventTrigger;
use vm_memory::{Bytes, GuestAddress};

const MIB: u64 = 1 << 20;

struct Rig {
    dev: MmioDevice<Balloon>,
    mem: Memory,
    q: Vec<QueueDriver>,
    control: Control,
    discarded: Arc<Mutex<Vec<(u64, u64)>>>,
}

type Discarded = Arc<Mutex<Vec<(u64, u64)>>>;

/// A balloon for a 1 MiB "VM" (the test memory) that may shrink to 256 KiB,
/// and the ranges it freed.
fn balloon() -> (Balloon, Control, Discarded) {
    let discarded = Arc::new(Mutex::new(Vec::new()));
    let log = discarded.clone();
    let size = 1 << 20;
    let discard: Discard = Box::new(move |addr, len| {
        if addr + len > size {
            return Err(std::io::Error::other("outside"));
        }
        log.lock().unwrap().push((addr, len));
        Ok(())
    });
    let range = Range {
        max: size,
        min: 256 << 10,
        start: size,
    };
    let (b, control) = Balloon::new(range, false, discard).unwrap();
    (b, control, discarded)
}

/// That balloon started by the driver with every feature.
fn rig() -> Rig {
    let mem = memory();
    let (b, control, discarded) = balloon();
    let mut dev = MmioDevice::new(b, mem.clone(), EventTrigger::new().unwrap()).unwrap();
    let offered = driver::offered_features(&mut dev);
    assert_eq!(
        offered & (F_STATS_VQ | F_REPORTING),
        F_STATS_VQ | F_REPORTING
    );
    let q: Vec<_> = (0..4)
        .map(|i| QueueDriver::new(0x10000 + i * 0x4000, 32))
        .collect();
    driver::start(&mut dev, offered, &q);
    assert!(dev.is_active());
    Rig {
        dev,
        mem,
        q,
        control,
        discarded,
    }
}

impl Rig {
    fn send(&mut self, queue: usize, bufs: &[Buf]) -> Vec<(u32, u32)> {
        self.q[queue].add_chain(&self.mem, bufs);
        self.dev.queue_notified(queue);
        self.q[queue].take_used(&self.mem)
    }

    fn pfns(&mut self, queue: usize, pfns: &[u32]) -> Vec<(u32, u32)> {
        let bytes: Vec<u8> = pfns.iter().flat_map(|p| p.to_le_bytes()).collect();
        self.mem.write_slice(&bytes, GuestAddress(0x80000)).unwrap();
        self.send(
            queue,
            &[Buf {
                addr: 0x80000,
                len: bytes.len() as u32,
                writable: false,
            }],
        )
    }

    fn config_u32(&mut self, at: u64) -> u32 {
        let mut b = [0u8; 4];
        self.dev.read(0x100 + at, &mut b);
        u32::from_le_bytes(b)
    }
}

#[test]
fn inflate_frees_pages_and_hostile_pfns_fail_alone() {
    let mut r = rig();
    assert_eq!(r.pfns(0, &[3, 4, 0xffff_ffff, 300]).len(), 1);
    assert_eq!(
        *r.discarded.lock().unwrap(),
        vec![(3 * PAGE, 2 * PAGE)],
        "pages outside guest RAM are never freed"
    );
    assert_eq!(r.pfns(1, &[3]).len(), 1);
    let s = r.control.status();
    assert_eq!((s.inflated, s.deflated, s.malformed), (2, 1, 2));
}

#[test]
fn a_run_of_adjacent_pages_is_freed_with_one_call() {
    let mut r = rig();
    // 64 adjacent pages, out of order and one given twice.
    let mut pfns: Vec<u32> = (10..74).rev().collect();
    pfns.push(40);
    assert_eq!(r.pfns(0, &pfns).len(), 1);
    assert_eq!(*r.discarded.lock().unwrap(), vec![(10 * PAGE, 64 * PAGE)]);
    // Two runs, two calls.
    r.discarded.lock().unwrap().clear();
    assert_eq!(r.pfns(0, &[100, 101, 200, 102, 201]).len(), 1);
    assert_eq!(
        *r.discarded.lock().unwrap(),
        vec![(100 * PAGE, 3 * PAGE), (200 * PAGE, 2 * PAGE)]
    );
    let s = r.control.status();
    assert_eq!((s.inflated, s.malformed), (69, 0));
}

#[test]
fn a_run_reaching_past_guest_ram_or_the_top_is_refused_whole() {
    let mut r = rig();
    // The test RAM is 256 pages: 255 is in it, 256 is not.
    assert_eq!(r.pfns(0, &[255, 256, 0xffff_fffe, 0xffff_ffff]).len(), 1);
    assert!(r.discarded.lock().unwrap().is_empty());
    let s = r.control.status();
    assert_eq!((s.inflated, s.malformed), (0, 4), "counted per page");
}

#[test]
fn a_chain_is_read_for_max_pfns_at_most() {
    let mut r = rig();
    // 16384 page numbers, none adjacent: only the first MAX_PFNS are read
    // (0, 2 .. 510: half in the 256 pages of RAM, half past them).
    let pfns: Vec<u32> = (0..16384u32).map(|i| i * 2).collect();
    assert_eq!(r.pfns(0, &pfns).len(), 1, "the chain still goes back");
    assert_eq!(r.discarded.lock().unwrap().len(), MAX_PFNS / 2);
    let s = r.control.status();
    let refused = MAX_PFNS as u64 / 2;
    assert_eq!(
        (s.inflated, s.malformed),
        (refused, refused + 1),
        "the pages read, and the truncated chain once"
    );
    // Exactly MAX_PFNS is not truncated.
    let pfns: Vec<u32> = (0..MAX_PFNS as u32).collect();
    r.pfns(1, &pfns);
    let s = r.control.status();
    assert_eq!((s.deflated, s.malformed), (MAX_PFNS as u64, refused + 1));
}

#[test]
fn a_turn_serves_chains_per_turn_and_comes_back_for_the_rest() {
    let mut r = rig();
    let bytes: Vec<u8> = [7u32, 9].iter().flat_map(|p| p.to_le_bytes()).collect();
    r.mem.write_slice(&bytes, GuestAddress(0x80000)).unwrap();
    let buf = Buf {
        addr: 0x80000,
        len: 8,
        writable: false,
    };
    let chains = CHAINS_PER_TURN + 4;
    for _ in 0..chains {
        r.q[0].add_chain(&r.mem, &[buf]);
    }
    let kicked = |r: &Rig| r.dev.notify_events()[0].0.read().is_ok();
    r.dev.queue_notified(0);
    assert_eq!(r.q[0].take_used(&r.mem).len(), CHAINS_PER_TURN);
    assert_eq!(r.discarded.lock().unwrap().len(), 2 * CHAINS_PER_TURN);
    assert!(kicked(&r), "the rest is served on the next turn");
    r.dev.queue_notified(0);
    assert_eq!(r.q[0].take_used(&r.mem).len(), 4);
    assert!(!kicked(&r));
    assert_eq!(r.control.status().inflated, 2 * chains as u64);
}

#[test]
fn a_target_is_announced_with_a_config_interrupt_and_actual_comes_back() {
    let mut r = rig();
    assert_eq!(r.config_u32(0), 0, "starts deflated");
    r.control.set_target(Some(512 << 10)).unwrap();
    r.dev.backend_event();
    assert_eq!(r.config_u32(0), 128, "pages to hold for 512 KiB less");
    let mut isr = [0u8; 4];
    r.dev.read(0x60, &mut isr);
    assert_eq!(isr[0] & 2, 2, "configuration interrupt");
    r.dev.write(0x104, &128u32.to_le_bytes());
    assert_eq!(r.control.status().ballooned, 512 << 10);
    assert!(r.control.set_target(Some(128 << 10)).is_err(), "below min");
    assert!(r.control.set_target(Some(2 * MIB)).is_err(), "above max");
    // Writes elsewhere in the configuration are ignored.
    r.dev.write(0x100, &7u32.to_le_bytes());
    assert_eq!(r.config_u32(0), 128);
}

fn stats_buffer(r: &mut Rig, total: u64, available: u64) -> Vec<(u32, u32)> {
    let mut b = Vec::new();
    for (tag, v) in [(5u16, total), (6, available), (99, 1)] {
        b.extend_from_slice(&tag.to_le_bytes());
        b.extend_from_slice(&v.to_le_bytes());
    }
    r.mem.write_slice(&b, GuestAddress(0x90000)).unwrap();
    r.send(
        2,
        &[Buf {
            addr: 0x90000,
            len: b.len() as u32,
            writable: false,
        }],
    )
}

#[test]
fn statistics_are_kept_and_asked_for_again_and_drive_the_policy() {
    let mut r = rig();
    assert!(stats_buffer(&mut r, MIB, 900 << 10).is_empty(), "kept");
    let s = r.control.status();
    assert_eq!(s.stats["total"], MIB);
    assert_eq!(s.stats["available"], 900 << 10);
    assert!(!s.stats.contains_key("99"), "unknown tags are skipped");
    // The poll hands the buffer back; with the policy on, the target drops
    // to what the guest uses plus the buffer, within the range.
    r.control.set_target(None).unwrap();
    r.dev.backend_event();
    assert_eq!(
        r.q[2].take_used(&r.mem).len(),
        1,
        "returned for new figures"
    );
    let s = r.control.status();
    assert!(s.policy.auto);
    assert_eq!(
        s.policy.target, MIB,
        "64 MiB of buffer is more than this VM"
    );
    let Some(DeviceState::Balloon(saved)) = r.dev.backend().save_state() else {
        panic!("a balloon has state");
    };
    assert!(saved.policy.auto);
}

#[test]
fn reported_free_ranges_are_freed_and_checked() {
    let mut r = rig();
    let used = r.send(
        3,
        &[
            Buf {
                addr: 0x40000,
                len: 0x8000,
                writable: true,
            },
            Buf {
                addr: 0xff000,
                len: 0x4000,
                writable: true,
            },
        ],
    );
    assert_eq!(used.len(), 1);
    assert_eq!(*r.discarded.lock().unwrap(), vec![(0x40000, 0x8000)]);
    let s = r.control.status();
    assert_eq!((s.reported, s.malformed), (0x8000, 1));
}

/// A fresh balloon built from `snap`, and its controls.
fn restored(snap: &MmioSnapshot) -> Result<(MmioDevice<Balloon>, Control), MmioError> {
    let (b, control, _) = balloon();
    let dev = MmioDevice::restore(b, memory(), EventTrigger::new().unwrap(), snap)?;
    Ok((dev, control))
}

/// A snapshot of a balloon whose guest holds 64 pages, target 768 KiB.
fn ballooned_snapshot() -> MmioSnapshot {
    let mut r = rig();
    r.control.set_target(Some(768 << 10)).unwrap();
    r.dev.backend_event();
    r.dev.write(0x104, &64u32.to_le_bytes());
    Inspect::snapshot(&r.dev)
}

/// The balloon's state in `snap`.
fn state_of(snap: &mut MmioSnapshot) -> &mut BalloonState {
    match snap.backend.as_mut() {
        Some(DeviceState::Balloon(s)) => s,
        None => panic!("a balloon has state"),
    }
}

#[test]
fn saved_state_brings_back_the_target_and_what_was_handed_over() {
    let mut snap = ballooned_snapshot();
    let state = state_of(&mut snap).clone();
    assert_eq!(state.version, BalloonState::VERSION);
    assert_eq!(
        (state.policy.target, state.ballooned),
        (768 << 10, 64 * PAGE)
    );
    // Through JSON, tagged with its device, as snapshots carry it.
    let json = serde_json::to_value(&snap).unwrap();
    assert_eq!(json["backend"]["device"], "balloon");
    assert_eq!(json["backend"]["version"], 1);
    let snap: MmioSnapshot = serde_json::from_value(json).unwrap();
    assert_eq!(snap.backend, Some(DeviceState::Balloon(state.clone())));
    let (mut dev, control) = restored(&snap).unwrap();
    let mut cfg = |at: u64| {
        let mut b = [0u8; 4];
        dev.read(0x100 + at, &mut b);
        u32::from_le_bytes(b)
    };
    assert_eq!(cfg(0), 64);
    assert_eq!(cfg(4), 64);
    assert_eq!(control.status().policy.target, 768 << 10);
    assert_eq!(
        dev.backend().save_state(),
        Some(DeviceState::Balloon(state)),
        "saved again, the same"
    );
}

#[test]
fn a_saved_state_of_another_version_or_none_is_refused() {
    let mut snap = ballooned_snapshot();
    state_of(&mut snap).version = BalloonState::VERSION + 1;
    let e = restored(&snap).err().unwrap();
    assert!(
        matches!(
            &e,
            MmioError::Backend {
                kind: "balloon",
                source: BackendError::State(StateError::Version {
                    found: 2,
                    supported: 1,
                    ..
                })
            }
        ),
        "{e}"
    );
    snap.backend = None;
    let e = restored(&snap).err().unwrap();
    assert!(matches!(
        &e,
        MmioError::Backend {
            source: BackendError::State(StateError::Missing { device: "balloon" }),
            ..
        }
    ));
}

#[test]
fn a_saved_state_outside_the_range_is_refused() {
    let mut snap = ballooned_snapshot();
    state_of(&mut snap).policy.target = 2 * MIB;
    let e = restored(&snap).err().unwrap();
    assert!(matches!(
        &e,
        MmioError::Backend {
            source: BackendError::Balloon(BalloonError::SavedTarget { .. }),
            ..
        }
    ));
    let mut snap = ballooned_snapshot();
    state_of(&mut snap).ballooned = u64::MAX;
    let e = restored(&snap).err().unwrap();
    assert!(matches!(
        &e,
        MmioError::Backend {
            source: BackendError::Balloon(BalloonError::SavedBallooned { .. }),
            ..
        }
    ));
}
