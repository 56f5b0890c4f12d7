use super::*;
use crate::adapters::{DiskConfig, NetConfig};
use crate::config::Overrides;

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

fn regions(ranges: &[(u64, u64)]) -> Vec<RegionSnapshot> {
    let mut offset = 0;
    ranges
        .iter()
        .map(|&(guest_addr, size)| {
            let r = RegionSnapshot {
                guest_addr,
                size,
                file_offset: offset,
            };
            offset += size;
            r
        })
        .collect()
}

#[test]
fn memory_must_be_exactly_where_the_definition_puts_ram() {
    assert_eq!(check_layout(16 * MIB, &regions(&[(0, 16 * MIB)])), Ok(()));
    let big = [(0, 3 * GIB), (layout::FOUR_GIB, GIB)];
    assert_eq!(check_layout(4 * GIB, &regions(&big)), Ok(()));
    let refused = |memory: u64, r: &[RegionSnapshot]| match check_layout(memory, r) {
        Err(StateRefusal::Layout { index, .. }) => index,
        other => panic!("{other:?}"),
    };
    // RAM over the device hole, up to the IOAPIC and LAPIC pages.
    assert_eq!(refused(4 * GIB, &regions(&[(0, 4 * GIB)])), 0);
    // An extra region on the LAPIC page, or on the IOAPIC's.
    for page in [layout::LAPIC_START, layout::IOAPIC_START] {
        let r = regions(&[(0, 16 * MIB), (page, 4096)]);
        assert_eq!(refused(16 * MIB, &r), 1);
    }
    // Larger or smaller than the definition, or missing.
    assert_eq!(refused(16 * MIB, &regions(&[(0, 32 * MIB)])), 0);
    assert_eq!(refused(16 * MIB, &[]), 0);
    assert_eq!(refused(4 * GIB, &regions(&[(0, 3 * GIB)])), 1);
    // The high region moved into the hole.
    let moved = regions(&[(0, 3 * GIB), (layout::MMIO_HOLE_START, GIB)]);
    assert_eq!(refused(4 * GIB, &moved), 1);
    // Regions sharing file pages (checkpoint layers index pages by offset).
    let mut shared = regions(&big);
    shared[1].file_offset = 0;
    assert_eq!(refused(4 * GIB, &shared), 1);
    let e = check_layout(16 * MIB, &[]).unwrap_err().to_string();
    assert!(e.contains("16 MiB") && e.contains("region 0"), "{e}");
}

fn config() -> VmConfig {
    VmConfig::resolve(
        None,
        Overrides {
            kernel: Some("/k".into()),
            memory: Some("64M".into()),
            disks: Some(vec![
                DiskConfig {
                    path: "/images/a.img".into(),
                    readonly: false,
                    serial: None,
                },
                DiskConfig {
                    path: "/images/b.img".into(),
                    readonly: true,
                    serial: None,
                },
            ]),
            nets: Some(vec![NetConfig {
                tap: "tap0".into(),
                mac: None,
                mac_spoofing: false,
                ..Default::default()
            }]),
            ..Default::default()
        },
    )
    .unwrap()
}

#[test]
fn a_state_must_be_of_the_vm_its_definition_describes() {
    let def = config();
    assert_eq!(check_agrees(&def.clone(), &def), Ok(()));
    // Kernel and command line are in guest memory already: they may differ.
    let mut s = def.clone();
    s.cmdline = "other".into();
    s.kernel = "/other".into();
    assert_eq!(check_agrees(&s, &def), Ok(()));
    type Tamper = fn(&mut VmConfig);
    let cases: [(Tamper, &str); 8] = [
        (|s| s.cpus = 2, "2 vCPUs but the VM's definition has 1"),
        (|s| s.memory = 128 * MIB, "128 MiB of memory"),
        (
            |s| {
                let mut extra = s.disks[0].clone();
                extra.path = "/etc/shadow".into();
                s.disks.push(extra)
            },
            "disk 2 (/etc/shadow) that the VM's definition does not list",
        ),
        (
            |s| s.disks[0].path = "/etc/shadow".into(),
            "disk 0 is /etc/shadow (writable) in the saved state but /images/a.img",
        ),
        (
            |s| s.disks[1].readonly = false,
            "disk 1 is /images/b.img (writable) in the saved state but /images/b.img (read-only)",
        ),
        (
            |s| {
                s.disks.pop();
            },
            "lists disk 1 (/images/b.img) that the saved state lacks",
        ),
        (
            |s| s.nets[0].tap = "tap9".into(),
            "(tap9) are not the VM's definition's (tap0)",
        ),
        (
            |s| {
                s.balloon = Some(crate::adapters::BalloonConfig {
                    dynamic: false,
                    min: "32M".into(),
                    start: None,
                })
            },
            "saved state has a memory balloon",
        ),
    ];
    for (tamper, says) in cases {
        let mut s = def.clone();
        tamper(&mut s);
        let e = check_agrees(&s, &def).unwrap_err().to_string();
        assert!(e.contains(says), "{e}");
        assert!(!e.contains('\n'), "one line: {e}");
    }
}
