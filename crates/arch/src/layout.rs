//! The guest physical memory map.
//!
//! ```text
//! 0x0000_0500  GDT                      0x0000_7000  boot_params (zero page)
//! 0x0000_8ff0  boot stack top           0x0000_9000  PML4, PDPT, 4 PDs (identity map of 4 GiB)
//! 0x0002_0000  kernel command line      0x0009_fc00  EBDA (reserved)
//! 0x000e_0000  ACPI tables (reserved)   0x000f_f000  VM generation ID (reserved)
//! 0x0010_0000  kernel
//! ...          initrd (top of low RAM)  0xc000_0000  32-bit device hole (IOAPIC, LAPIC, TSS)
//! 0x1_0000_0000  RAM above 4 GiB when the guest has more than 3 GiB
//! ```

use vm_memory::GuestAddress;

/// GDT location.
pub const GDT_START: u64 = 0x500;
/// IDT location (a single empty entry: any early exception is a triple fault).
pub const IDT_START: u64 = 0x520;
/// `boot_params` location.
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack pointer.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// PML4 of the identity map; PDPT and PDs follow page by page.
pub const PML4_START: u64 = 0x9000;
/// Kernel command line location.
pub const CMDLINE_START: u64 = 0x20000;
/// Longest command line we place (the page-aligned room below the EBDA is far larger).
pub const CMDLINE_MAX: usize = 4096;
/// Start of the Extended BIOS Data Area, reserved in e820.
pub const EBDA_START: u64 = 0x9fc00;
/// Start of the BIOS area where the ACPI tables live (scanned by Linux for the RSDP).
pub const ACPI_START: u64 = 0xe0000;
/// End of the BIOS area.
pub const BIOS_END: u64 = 0x10_0000;
/// The page holding the VM generation ID (a 16-byte GUID the guest reads
/// through the ACPI `VGEN` device): the last of the BIOS area, so reserved
/// in e820, above the ACPI tables.
pub const VMGENID_START: u64 = BIOS_END - 0x1000;
/// Length of the VM generation ID.
pub const VMGENID_LEN: usize = 16;
/// Where kernels are loaded (1 MiB).
pub const HIMEM_START: u64 = 0x10_0000;
/// Start of the 32-bit device hole: RAM stops here and resumes at 4 GiB.
pub const MMIO_HOLE_START: u64 = 0xc000_0000;
/// End of the 32-bit hole.
pub const FOUR_GIB: u64 = 0x1_0000_0000;
/// IOAPIC MMIO base.
pub const IOAPIC_START: u64 = 0xfec0_0000;
/// First virtio-mmio window, in the 32-bit hole; device `i` is at
/// `VIRTIO_MMIO_START + i * VIRTIO_MMIO_LEN`.
pub const VIRTIO_MMIO_START: u64 = 0xd000_0000;
/// Size of one virtio-mmio window.
pub const VIRTIO_MMIO_LEN: u64 = 0x1000;
/// Interrupt lines (IOAPIC pins) of virtio devices, in device order: the
/// pins no legacy device of ours or of the PC platform uses.
pub const VIRTIO_GSIS: [u32; 16] = [16, 17, 18, 19, 20, 21, 22, 23, 6, 7, 9, 10, 11, 13, 14, 15];

/// Where virtio device `index` lives: (MMIO base, GSI), if it may exist.
pub fn virtio_slot(index: usize) -> Option<(u64, u32)> {
    let gsi = *VIRTIO_GSIS.get(index)?;
    Some((VIRTIO_MMIO_START + index as u64 * VIRTIO_MMIO_LEN, gsi))
}
/// LAPIC MMIO base.
pub const LAPIC_START: u64 = 0xfee0_0000;

/// The guest RAM ranges for `size` bytes: everything below the hole, the rest above 4 GiB.
pub fn ram_ranges(size: u64) -> Vec<(GuestAddress, usize)> {
    let low = size.min(MMIO_HOLE_START);
    let mut ranges = vec![(GuestAddress(0), low as usize)];
    if size > MMIO_HOLE_START {
        ranges.push((GuestAddress(FOUR_GIB), (size - MMIO_HOLE_START) as usize));
    }
    ranges
}

/// Where RAM below 4 GiB ends for a guest of `size` bytes.
pub fn low_ram_end(size: u64) -> u64 {
    size.min(MMIO_HOLE_START)
}

/// An e820 entry type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum E820Type {
    /// Usable RAM.
    Ram = 1,
    /// Reserved.
    Reserved = 2,
}

/// One e820 entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct E820Entry {
    /// Start address.
    pub addr: u64,
    /// Length in bytes.
    pub size: u64,
    /// What it is.
    pub kind: E820Type,
}

/// The e820 map for a guest of `size` bytes of RAM.
pub fn e820_map(size: u64) -> Vec<E820Entry> {
    let low_end = low_ram_end(size);
    let mut map = vec![
        E820Entry {
            addr: 0,
            size: EBDA_START,
            kind: E820Type::Ram,
        },
        E820Entry {
            addr: EBDA_START,
            size: 0xa0000 - EBDA_START,
            kind: E820Type::Reserved,
        },
        E820Entry {
            addr: ACPI_START,
            size: BIOS_END - ACPI_START,
            kind: E820Type::Reserved,
        },
    ];
    if low_end > HIMEM_START {
        map.push(E820Entry {
            addr: HIMEM_START,
            size: low_end - HIMEM_START,
            kind: E820Type::Ram,
        });
    }
    if size > MMIO_HOLE_START {
        map.push(E820Entry {
            addr: FOUR_GIB,
            size: size - MMIO_HOLE_START,
            kind: E820Type::Ram,
        });
    }
    map
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;
    const GIB: u64 = 1 << 30;

    fn ram_total(map: &[E820Entry]) -> u64 {
        map.iter()
            .filter(|e| e.kind == E820Type::Ram)
            .map(|e| e.size)
            .sum()
    }

    #[test]
    fn small_guest_is_one_range_below_the_hole() {
        assert_eq!(
            ram_ranges(128 * MIB),
            vec![(GuestAddress(0), 128 * MIB as usize)]
        );
        let map = e820_map(128 * MIB);
        assert_eq!(
            map.last().unwrap().addr + map.last().unwrap().size,
            128 * MIB
        );
        // All RAM but the EBDA and BIOS area is usable.
        assert_eq!(
            ram_total(&map),
            128 * MIB - (0xa0000 - EBDA_START) - (HIMEM_START - 0xa0000)
        );
    }

    #[test]
    fn large_guest_skips_the_32bit_hole() {
        let size = 6 * GIB;
        let ranges = ram_ranges(size);
        assert_eq!(ranges.len(), 2);
        assert_eq!(ranges[0], (GuestAddress(0), 3 * GIB as usize));
        assert_eq!(ranges[1], (GuestAddress(4 * GIB), 3 * GIB as usize));
        let map = e820_map(size);
        let high = map
            .iter()
            .find(|e| e.addr == FOUR_GIB)
            .expect("RAM above 4 GiB");
        assert_eq!(high.size, 3 * GIB);
        // Nothing usable inside the hole, where the IOAPIC and LAPIC live.
        for e in map.iter().filter(|e| e.kind == E820Type::Ram) {
            assert!(
                e.addr + e.size <= MMIO_HOLE_START || e.addr >= FOUR_GIB,
                "{e:?}"
            );
        }
        const { assert!(IOAPIC_START >= MMIO_HOLE_START && LAPIC_START < FOUR_GIB) };
        // Usable RAM = requested RAM minus the reserved low areas.
        assert_eq!(ram_total(&map), size - (HIMEM_START - EBDA_START));
    }

    #[test]
    fn exactly_three_gib_needs_no_high_range() {
        assert_eq!(ram_ranges(3 * GIB).len(), 1);
        assert!(e820_map(3 * GIB).iter().all(|e| e.addr < FOUR_GIB));
    }

    #[test]
    fn e820_entries_do_not_overlap() {
        for size in [16 * MIB, 512 * MIB, 3 * GIB + MIB, 8 * GIB] {
            let mut map = e820_map(size);
            map.sort_by_key(|e| e.addr);
            for pair in map.windows(2) {
                assert!(pair[0].addr + pair[0].size <= pair[1].addr, "{pair:?}");
            }
        }
    }

    #[test]
    fn the_generation_id_page_is_reserved_never_ram() {
        for size in [16 * MIB, 3 * GIB, 8 * GIB] {
            let map = e820_map(size);
            let page = VMGENID_START..VMGENID_START + 0x1000;
            let covers = |e: &&E820Entry| e.addr <= page.start && page.end <= e.addr + e.size;
            let holder = map.iter().find(covers).expect("the page is in the map");
            assert_eq!(holder.kind, E820Type::Reserved, "{holder:?}");
            for e in map.iter().filter(|e| e.kind == E820Type::Ram) {
                assert!(e.addr + e.size <= page.start || e.addr >= page.end, "{e:?}");
            }
        }
        const { assert!(VMGENID_START >= ACPI_START && VMGENID_START % 0x1000 == 0) };
    }
}
