//! ACPI tables: how the guest finds its CPUs (MADT) and powers off (a
//! hardware-reduced FADT whose sleep-control register is an I/O port of ours,
//! and a DSDT declaring the S5 soft-off state), its power button, and its VM
//! generation ID (the `VGEN` device: Microsoft's "Virtual Machine Generation
//! ID" interface, as QEMU, Hyper-V and Firecracker offer it).
//!
//! Layout in the BIOS area at [`layout::ACPI_START`]: RSDP, XSDT, FADT, MADT,
//! DSDT, each 16-byte aligned, below the generation ID's page at
//! [`layout::VMGENID_START`].

use acpi_tables::aml::{
    Arg, Device, EISAName, Equal, If, Interrupt, Memory32Fixed, Method, Name, Notify, Package,
    Path, ResourceTemplate, Return, IO,
};
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::madt::{
    EnabledStatus, IoApic, LocalInterruptController, ProcessorLocalApic, MADT,
};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::Aml;
use vm_memory::bitmap::Bitmap;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::layout;

/// Port of the sleep control register (write `SLP_TYP << 2 | SLP_EN`).
pub const SLEEP_CONTROL_PORT: u16 = 0x3c0;
/// Port of the reset register.
pub const RESET_PORT: u16 = 0x3c1;
/// Value the guest writes to [`RESET_PORT`] to reset.
pub const RESET_VALUE: u8 = 0x1;
/// The SLP_TYP value of S5 (soft off) that the DSDT declares.
pub const S5_SLEEP_TYPE: u8 = 5;

const OEM_ID: [u8; 6] = *b"NESTVM";
/// IA-PC boot architecture flags: no VGA, no CMOS RTC (kvmclock gives time).
const IAPC_NO_VGA: u16 = 1 << 2;
const IAPC_NO_CMOS_RTC: u16 = 1 << 5;

/// Errors of ACPI table placement.
#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    /// The tables do not fit in the BIOS area.
    #[error("ACPI tables for {0} vCPUs do not fit below 1 MiB")]
    TooLarge(u32),
    /// Writing into guest memory failed.
    #[error("cannot write the ACPI tables into guest memory")]
    GuestMemory(#[source] vm_memory::GuestMemoryError),
}

fn bytes_of(table: &dyn Aml) -> Vec<u8> {
    let mut v = Vec::new();
    table.to_aml_bytes(&mut v);
    v
}

fn io_register(port: u16) -> GAS {
    GAS::new(
        AddressSpace::SystemIo,
        8,
        0,
        AccessSize::ByteAccess,
        u64::from(port),
    )
}

/// COM1's I/O base and interrupt, as the DSDT declares them.
pub const COM1_PORT: u16 = 0x3f8;
/// COM1's interrupt line (GSI).
pub const COM1_GSI: u32 = 4;
/// The interrupt of the Generic Event Device that reports the power button.
pub const GED_GSI: u32 = 5;
/// The second interrupt of the Generic Event Device: the VM generation ID
/// changed (a line no other device of ours or of the PC platform uses).
pub const VMGENID_GSI: u32 = 8;
/// ACPI's "button pressed" notification for a power button device, and
/// the generation ID device's "it changed".
const NOTIFY_BUTTON_PRESSED: u8 = 0x80;
const NOTIFY_GENERATION_CHANGED: u8 = 0x80;

/// A virtio-mmio device as the DSDT declares it.
#[derive(Debug, Clone, Copy)]
pub struct VirtioSlot {
    /// Base of its MMIO window.
    pub base: u64,
    /// Length of the window.
    pub len: u64,
    /// Its interrupt line.
    pub gsi: u32,
}

/// The DSDT: the `\_S5_` package Linux needs to power off, COM1, the power
/// button, the VM generation ID, and one `LNRO0005` device per virtio-mmio window (the ACPI ID
/// Linux's virtio_mmio driver binds to).
///
/// COM1 must be declared: with a hardware-reduced FADT Linux has no legacy
/// PIC and reserves no ISA interrupt numbers, so the 8250 driver's built-in
/// "IRQ 4" cannot be requested and the console tty would not open. Declared
/// as a PNP0501 device, its interrupt is mapped through the IOAPIC like any
/// ACPI device's.
pub fn dsdt(virtio: &[VirtioSlot]) -> Vec<u8> {
    let mut sdt = Sdt::new(*b"DSDT", 36, 6, OEM_ID, *b"NESTVMDS", 1);
    let s5 = Name::new(
        Path::new("_S5_"),
        &Package::new(vec![&S5_SLEEP_TYPE, &S5_SLEEP_TYPE, &0u8, &0u8]),
    );
    s5.to_aml_bytes(&mut sdt);
    let hid = Name::new(Path::new("_HID"), &EISAName::new("PNP0501"));
    let uid = Name::new(Path::new("_UID"), &0u8);
    let irq = Interrupt::new(true, true, false, false, COM1_GSI);
    let io = IO::new(COM1_PORT, COM1_PORT, 1, 8);
    let crs = Name::new(Path::new("_CRS"), &ResourceTemplate::new(vec![&irq, &io]));
    Device::new(Path::new("_SB_.COM1"), vec![&hid, &uid, &crs]).to_aml_bytes(&mut sdt);

    power_button_and_events(&mut sdt);
    generation_id_device(&mut sdt);
    for (i, v) in virtio.iter().enumerate() {
        let hid_str: &'static str = "LNRO0005";
        let hid = Name::new(Path::new("_HID"), &hid_str);
        let uid_value = i as u32;
        let uid = Name::new(Path::new("_UID"), &uid_value);
        let window = Memory32Fixed::new(true, v.base as u32, v.len as u32);
        let irq = Interrupt::new(true, true, false, false, v.gsi);
        let crs = Name::new(
            Path::new("_CRS"),
            &ResourceTemplate::new(vec![&window, &irq]),
        );
        let path = format!("_SB_.VR{i:02X}");
        Device::new(Path::new(&path), vec![&hid, &uid, &crs]).to_aml_bytes(&mut sdt);
    }
    // Sdt::append keeps the length field right; the checksum needs refreshing.
    sdt.update_checksum();
    sdt.as_slice().to_vec()
}

/// The power button: a hardware-reduced platform has no fixed button, so a
/// PNP0C0C device is notified by the `_EVT` method of a Generic Event
/// Device (ACPI0013) whose interrupt nestvm raises to ask for power-off.
/// The same device's second interrupt tells the `VGEN` device that the
/// generation ID changed (`_EVT` is called with the interrupt's number).
fn power_button_and_events(sdt: &mut Sdt) {
    let pwrb_hid = Name::new(Path::new("_HID"), &EISAName::new("PNP0C0C"));
    let pwrb_uid = Name::new(Path::new("_UID"), &0u8);
    Device::new(Path::new("_SB_.PWRB"), vec![&pwrb_hid, &pwrb_uid]).to_aml_bytes(sdt);
    let ged_hid_str: &'static str = "ACPI0013";
    let ged_hid = Name::new(Path::new("_HID"), &ged_hid_str);
    let ged_uid = Name::new(Path::new("_UID"), &0u8);
    let ged_irq = Interrupt::new(true, true, false, false, GED_GSI);
    let gen_irq = Interrupt::new(true, true, false, false, VMGENID_GSI);
    let ged_crs = Name::new(
        Path::new("_CRS"),
        &ResourceTemplate::new(vec![&ged_irq, &gen_irq]),
    );
    let button = Path::new("\\_SB_.PWRB");
    let press = Notify::new(&button, &NOTIFY_BUTTON_PRESSED);
    let gsi = GED_GSI as u8;
    let is_button = Equal::new(&Arg(0), &gsi);
    let when_button = If::new(&is_button, vec![&press]);
    let generation = Path::new("\\_SB_.VGEN");
    let changed = Notify::new(&generation, &NOTIFY_GENERATION_CHANGED);
    let gen_gsi = VMGENID_GSI as u8;
    let is_generation = Equal::new(&Arg(0), &gen_gsi);
    let when_generation = If::new(&is_generation, vec![&changed]);
    let evt = Method::new(
        Path::new("_EVT"),
        1,
        true,
        vec![&when_button, &when_generation],
    );
    Device::new(
        Path::new("_SB_.GED0"),
        vec![&ged_hid, &ged_uid, &ged_crs, &evt],
    )
    .to_aml_bytes(sdt);
}

/// The VM generation ID device: `ADDR` returns the guest-physical address
/// of the 16-byte ID (low and high 32 bits), which nestvm writes at boot
/// and changes on every restore of a checkpoint. Linux's vmgenid driver
/// binds to its `_CID` and feeds the ID to its random number generator.
fn generation_id_device(sdt: &mut Sdt) {
    let hid_str: &'static str = "QEMUVGID";
    let hid = Name::new(Path::new("_HID"), &hid_str);
    let cid_str: &'static str = "VM_Gen_Counter";
    let cid = Name::new(Path::new("_CID"), &cid_str);
    let ddn = Name::new(Path::new("_DDN"), &cid_str);
    let low = layout::VMGENID_START as u32;
    let high = (layout::VMGENID_START >> 32) as u32;
    let addr = Package::new(vec![&low, &high]);
    let ret = Return::new(&addr);
    let method = Method::new(Path::new("ADDR"), 0, false, vec![&ret]);
    Device::new(Path::new("_SB_.VGEN"), vec![&hid, &cid, &ddn, &method]).to_aml_bytes(sdt);
}

/// Writes the VM generation ID `id` where the `VGEN` device says it is.
pub fn write_generation_id<B: Bitmap>(
    mem: &GuestMemoryMmap<B>,
    id: &[u8; layout::VMGENID_LEN],
) -> Result<(), AcpiError> {
    mem.write_slice(id, GuestAddress(layout::VMGENID_START))
        .map_err(AcpiError::GuestMemory)
}

/// The FADT: hardware-reduced, sleep and reset through our ports.
pub fn fadt(dsdt_addr: u64) -> Vec<u8> {
    let mut b = FADTBuilder::new(OEM_ID, *b"NESTVMFA", 1)
        .dsdt_64(dsdt_addr)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::ResetRegSup)
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton);
    b.sleep_control_reg = io_register(SLEEP_CONTROL_PORT);
    b.sleep_status_reg = io_register(SLEEP_CONTROL_PORT);
    b.reset_reg = io_register(RESET_PORT);
    b.reset_value = RESET_VALUE;
    b.iapc_boot_arch = (IAPC_NO_VGA | IAPC_NO_CMOS_RTC).into();
    b.hypervisor_vendor_identity = u64::from_le_bytes(*b"NESTVM\0\0").into();
    bytes_of(&b.finalize())
}

/// The MADT: one enabled local APIC per vCPU and the IOAPIC.
pub fn madt(vcpus: u32) -> Vec<u8> {
    let mut madt = MADT::new(
        OEM_ID,
        *b"NESTVMAP",
        1,
        LocalInterruptController::Address(layout::LAPIC_START as u32),
    );
    for id in 0..vcpus {
        madt.add_structure(ProcessorLocalApic::new(
            id as u8,
            id as u8,
            EnabledStatus::Enabled,
        ));
    }
    madt.add_structure(IoApic::new(0, layout::IOAPIC_START as u32, 0));
    bytes_of(&madt)
}

/// Writes all tables and returns the RSDP address.
pub fn write_tables<B: Bitmap>(
    mem: &GuestMemoryMmap<B>,
    vcpus: u32,
    virtio: &[VirtioSlot],
) -> Result<u64, AcpiError> {
    let align = |a: u64| (a + 15) & !15;
    let rsdp_addr = layout::ACPI_START;
    let xsdt_addr = align(rsdp_addr + Rsdp::len() as u64);
    // XSDT: header + two 8-byte entries.
    let fadt_addr = align(xsdt_addr + 36 + 16);
    let madt_addr = align(fadt_addr + acpi_tables::fadt::FADT::len() as u64);
    let madt = madt(vcpus);
    let dsdt_addr = align(madt_addr + madt.len() as u64);
    let dsdt = dsdt(virtio);
    if dsdt_addr + dsdt.len() as u64 > layout::VMGENID_START {
        return Err(AcpiError::TooLarge(vcpus));
    }
    let mut xsdt = XSDT::new(OEM_ID, *b"NESTVMXS", 1);
    xsdt.add_entry(fadt_addr);
    xsdt.add_entry(madt_addr);
    let xsdt = bytes_of(&xsdt);
    debug_assert_eq!(xsdt.len(), 36 + 16);
    let rsdp = bytes_of(&Rsdp::new(OEM_ID, xsdt_addr));
    for (addr, bytes) in [
        (rsdp_addr, rsdp),
        (xsdt_addr, xsdt),
        (fadt_addr, fadt(dsdt_addr)),
        (madt_addr, madt),
        (dsdt_addr, dsdt),
    ] {
        mem.write_slice(&bytes, GuestAddress(addr))
            .map_err(AcpiError::GuestMemory)?;
    }
    Ok(rsdp_addr)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn checksum_ok(t: &[u8]) -> bool {
        t.iter().fold(0u8, |a, b| a.wrapping_add(*b)) == 0
    }

    fn u32_at(t: &[u8], off: usize) -> u32 {
        u32::from_le_bytes(t[off..off + 4].try_into().unwrap())
    }

    fn u64_at(t: &[u8], off: usize) -> u64 {
        u64::from_le_bytes(t[off..off + 8].try_into().unwrap())
    }

    #[test]
    fn tables_chain_from_rsdp_with_valid_checksums() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let slots: Vec<_> = (0..3)
            .map(|i| VirtioSlot {
                base: 0xd000_0000 + i * 0x1000,
                len: 0x1000,
                gsi: 16 + i as u32,
            })
            .collect();
        let rsdp_addr = write_tables(&mem, 4, &slots).unwrap();
        let mut rsdp = [0u8; 36];
        mem.read_slice(&mut rsdp, GuestAddress(rsdp_addr)).unwrap();
        assert_eq!(&rsdp[..8], b"RSD PTR ");
        assert!(checksum_ok(&rsdp[..20]) && checksum_ok(&rsdp));
        let read_table = |addr: u64| {
            let mut hdr = [0u8; 8];
            mem.read_slice(&mut hdr, GuestAddress(addr)).unwrap();
            let mut t = vec![0u8; u32_at(&hdr, 4) as usize];
            mem.read_slice(&mut t, GuestAddress(addr)).unwrap();
            assert!(
                checksum_ok(&t),
                "checksum of {:?}",
                std::str::from_utf8(&t[..4])
            );
            t
        };
        let xsdt = read_table(u64_at(&rsdp, 24));
        assert_eq!(&xsdt[..4], b"XSDT");
        let fadt = read_table(u64_at(&xsdt, 36));
        let madt = read_table(u64_at(&xsdt, 44));
        assert_eq!(&fadt[..4], b"FACP");
        assert_eq!(&madt[..4], b"APIC");
        // Hardware-reduced flag, and the sleep control register is our port.
        assert_ne!(u32_at(&fadt, 112) & (1 << 20), 0);
        assert_eq!(fadt[244], 1, "sleep control in system I/O space");
        assert_eq!(u64_at(&fadt, 248), u64::from(SLEEP_CONTROL_PORT));
        let dsdt = read_table(u64_at(&fadt, 140));
        assert_eq!(&dsdt[..4], b"DSDT");
        assert!(dsdt.windows(4).any(|w| w == b"_S5_"));
        assert!(dsdt.windows(4).any(|w| w == b"COM1"));
        assert!(dsdt.windows(8).any(|w| w == b"ACPI0013"), "GED present");
        assert!(dsdt.windows(4).any(|w| w == b"_EVT") && dsdt.windows(4).any(|w| w == b"PWRB"));
        assert!(dsdt.windows(4).any(|w| w == b"_CRS"));
        assert_eq!(dsdt.windows(8).filter(|w| w == b"LNRO0005").count(), 3);
        assert!(dsdt.windows(4).any(|w| w == b"VR02"));
        // Four local APICs (type 0, length 8) with ids 0..3, then one IOAPIC.
        let mut off = 44;
        let mut apic_ids = vec![];
        let mut ioapics = 0;
        while off < madt.len() {
            match madt[off] {
                0 => apic_ids.push(madt[off + 3]),
                1 => {
                    ioapics += 1;
                    assert_eq!(u32_at(&madt, off + 4), layout::IOAPIC_START as u32);
                }
                t => panic!("unexpected MADT entry {t}"),
            }
            off += madt[off + 1] as usize;
        }
        assert_eq!(apic_ids, vec![0, 1, 2, 3]);
        assert_eq!(ioapics, 1);
    }

    #[test]
    fn many_vcpus_still_fit() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let slots: Vec<_> = (0..16)
            .map(|i| VirtioSlot {
                base: 0xd000_0000 + i * 0x1000,
                len: 0x1000,
                gsi: 16,
            })
            .collect();
        write_tables(&mem, 255, &slots).unwrap();
    }

    #[test]
    fn the_dsdt_declares_the_generation_id_and_its_event() {
        let dsdt = dsdt(&[]);
        let find = |needle: &[u8]| dsdt.windows(needle.len()).position(|w| w == needle);
        for name in [&b"QEMUVGID"[..], b"VM_Gen_Counter\0", b"_SB_VGEN", b"ADDR"] {
            assert!(find(name).is_some(), "{:?}", String::from_utf8_lossy(name));
        }
        // ADDR: Return (Package (2) { VMGENID_START, 0 }).
        let mut package = vec![0x02, 0x0c];
        package.extend((layout::VMGENID_START as u32).to_le_bytes());
        package.push(0x00);
        let at = find(&package).expect("ADDR's package");
        assert_eq!(dsdt[at - 3..at - 1], [0xa4, 0x12], "Return (Package ...)");
        // _EVT: Notify (\_SB_.VGEN, 0x80) and Notify (\_SB_.PWRB, 0x80).
        for device in [b"VGEN", b"PWRB"] {
            let mut notify = vec![0x86, b'\\', 0x2e];
            notify.extend(b"_SB_");
            notify.extend(device);
            notify.extend([0x0a, 0x80]);
            assert!(
                find(&notify).is_some(),
                "{:?}",
                String::from_utf8_lossy(device)
            );
        }
        // The GED's _CRS: an edge, active-high extended interrupt for each.
        for gsi in [GED_GSI, VMGENID_GSI] {
            let mut irq = vec![0x89, 0x06, 0x00, 0x03, 0x01];
            irq.extend(gsi.to_le_bytes());
            assert!(find(&irq).is_some(), "GSI {gsi}");
        }
    }

    #[test]
    fn the_generation_id_lands_below_1_mib_after_the_tables() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        write_tables(&mem, 255, &[]).unwrap();
        let id = [0x5au8; layout::VMGENID_LEN];
        write_generation_id(&mem, &id).unwrap();
        let mut back = [0u8; layout::VMGENID_LEN];
        mem.read_slice(&mut back, GuestAddress(layout::VMGENID_START))
            .unwrap();
        assert_eq!(back, id);
    }
}
