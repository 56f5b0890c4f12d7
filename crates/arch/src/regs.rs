//! The vCPU's state at the 64-bit kernel entry: identity page tables, GDT,
//! segment and control registers, general registers, FPU, MSRs and LAPIC.

use kvm_bindings::{kvm_fpu, kvm_lapic_state, kvm_msr_entry, kvm_regs, kvm_segment, kvm_sregs};
use vm_memory::bitmap::Bitmap;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::layout;

/// How much the boot page tables identity-map (2 MiB pages).
pub const IDENTITY_MAPPED: u64 = 4 << 30;

const X86_CR0_PE: u64 = 1;
const X86_CR0_ET: u64 = 1 << 4;
const X86_CR0_NE: u64 = 1 << 5;
const X86_CR0_PG: u64 = 1 << 31;
const X86_CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// Errors of register set-up.
#[derive(Debug, thiserror::Error)]
pub enum RegsError {
    /// Writing a table into guest memory failed.
    #[error("cannot write the {0} into guest memory")]
    GuestMemory(&'static str, #[source] vm_memory::GuestMemoryError),
}

/// Builds a GDT descriptor from flags, base and limit.
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    let (flags, base, limit) = (flags as u64, base as u64, limit as u64);
    ((base & 0xff00_0000) << (56 - 24))
        | ((flags & 0x0000_f0ff) << 40)
        | ((limit & 0x000f_0000) << (48 - 16))
        | ((base & 0x00ff_ffff) << 16)
        | (limit & 0x0000_ffff)
}

/// The boot GDT: null, 64-bit code, data, TSS.
pub const GDT: [u64; 4] = [
    0,
    gdt_entry(0xa09b, 0, 0xfffff),
    gdt_entry(0xc093, 0, 0xfffff),
    gdt_entry(0x808b, 0, 0xfffff),
];

/// Decodes GDT entry `index` into the segment register KVM wants.
pub fn segment_from_gdt(entry: u64, index: u16) -> kvm_segment {
    let base = ((entry >> 16) & 0x00ff_ffff) | (((entry >> 56) & 0xff) << 24);
    let raw_limit = (entry & 0xffff) | (((entry >> 48) & 0xf) << 16);
    let g = ((entry >> 55) & 1) as u8;
    let limit = if g == 1 {
        (raw_limit << 12) | 0xfff
    } else {
        raw_limit
    };
    let present = ((entry >> 47) & 1) as u8;
    kvm_segment {
        base,
        limit: limit as u32,
        selector: index * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g,
        avl: ((entry >> 52) & 1) as u8,
        unusable: u8::from(present == 0),
        padding: 0,
    }
}

/// Writes the GDT, an empty IDT, and page tables identity-mapping the first
/// [`IDENTITY_MAPPED`] bytes with 2 MiB pages. Returns the CR3 value.
pub fn write_boot_tables<B: Bitmap>(mem: &GuestMemoryMmap<B>) -> Result<u64, RegsError> {
    for (i, e) in GDT.iter().enumerate() {
        mem.write_obj(*e, GuestAddress(layout::GDT_START + 8 * i as u64))
            .map_err(|e| RegsError::GuestMemory("GDT", e))?;
    }
    mem.write_obj(0u64, GuestAddress(layout::IDT_START))
        .map_err(|e| RegsError::GuestMemory("IDT", e))?;
    let pml4 = layout::PML4_START;
    let pdpt = pml4 + 0x1000;
    let pd_count = IDENTITY_MAPPED >> 30;
    mem.write_obj(pdpt | 0x3, GuestAddress(pml4))
        .map_err(|e| RegsError::GuestMemory("PML4", e))?;
    for i in 0..pd_count {
        let pd = pdpt + 0x1000 * (i + 1);
        mem.write_obj(pd | 0x3, GuestAddress(pdpt + 8 * i))
            .map_err(|e| RegsError::GuestMemory("PDPT", e))?;
        for j in 0..512u64 {
            let phys = ((i << 9) + j) << 21;
            mem.write_obj(phys | 0x83, GuestAddress(pd + 8 * j))
                .map_err(|e| RegsError::GuestMemory("page directory", e))?;
        }
    }
    Ok(pml4)
}

/// Puts `sregs` into 64-bit mode with the boot GDT and page tables.
pub fn setup_long_mode(sregs: &mut kvm_sregs, cr3: u64) {
    let code = segment_from_gdt(GDT[1], 1);
    let data = segment_from_gdt(GDT[2], 2);
    let tss = segment_from_gdt(GDT[3], 3);
    sregs.gdt.base = layout::GDT_START;
    sregs.gdt.limit = (std::mem::size_of_val(&GDT) - 1) as u16;
    sregs.idt.base = layout::IDT_START;
    sregs.idt.limit = 7;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;
    sregs.cr0 |= X86_CR0_PE | X86_CR0_ET | X86_CR0_NE | X86_CR0_PG;
    sregs.cr3 = cr3;
    sregs.cr4 |= X86_CR4_PAE;
    sregs.efer |= EFER_LME | EFER_LMA;
}

/// General registers at the kernel's 64-bit entry: `rsi` points at boot_params.
pub fn boot_regs(entry: u64) -> kvm_regs {
    kvm_regs {
        rflags: 0x2,
        rip: entry,
        rsp: layout::BOOT_STACK_POINTER,
        rbp: layout::BOOT_STACK_POINTER,
        rsi: layout::ZERO_PAGE_START,
        ..Default::default()
    }
}

/// FPU at reset: x87 control word and MXCSR defaults.
pub fn boot_fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    }
}

/// MSR numbers we set at boot.
pub mod msr {
    /// SYSENTER_CS.
    pub const IA32_SYSENTER_CS: u32 = 0x174;
    /// SYSENTER_ESP.
    pub const IA32_SYSENTER_ESP: u32 = 0x175;
    /// SYSENTER_EIP.
    pub const IA32_SYSENTER_EIP: u32 = 0x176;
    /// STAR.
    pub const STAR: u32 = 0xc000_0081;
    /// LSTAR.
    pub const LSTAR: u32 = 0xc000_0082;
    /// CSTAR.
    pub const CSTAR: u32 = 0xc000_0083;
    /// SYSCALL_MASK.
    pub const SYSCALL_MASK: u32 = 0xc000_0084;
    /// KERNEL_GS_BASE.
    pub const KERNEL_GS_BASE: u32 = 0xc000_0102;
    /// TSC.
    pub const IA32_TSC: u32 = 0x10;
    /// MISC_ENABLE.
    pub const IA32_MISC_ENABLE: u32 = 0x1a0;
    /// MTRR default type.
    pub const MTRR_DEF_TYPE: u32 = 0x2ff;
}

/// The MSRs a Linux guest expects a loader to have set: syscall MSRs
/// cleared, TSC at 0, fast strings on, MTRRs enabled with write-back default.
pub fn boot_msrs() -> Vec<kvm_msr_entry> {
    let e = |index, data| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    };
    vec![
        e(msr::IA32_SYSENTER_CS, 0),
        e(msr::IA32_SYSENTER_ESP, 0),
        e(msr::IA32_SYSENTER_EIP, 0),
        e(msr::STAR, 0),
        e(msr::CSTAR, 0),
        e(msr::KERNEL_GS_BASE, 0),
        e(msr::SYSCALL_MASK, 0),
        e(msr::LSTAR, 0),
        e(msr::IA32_TSC, 0),
        e(msr::IA32_MISC_ENABLE, 1),
        e(msr::MTRR_DEF_TYPE, (1 << 11) | 6),
    ]
}

const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

fn lapic_reg(lapic: &kvm_lapic_state, off: usize) -> u32 {
    let b: [u8; 4] = std::array::from_fn(|i| lapic.regs[off + i] as u8);
    u32::from_le_bytes(b)
}

fn set_lapic_reg(lapic: &mut kvm_lapic_state, off: usize, v: u32) {
    for (i, b) in v.to_le_bytes().iter().enumerate() {
        lapic.regs[off + i] = *b as _;
    }
}

/// Wires LINT0 to ExtINT (the PIC) and LINT1 to NMI, as a BIOS would.
pub fn setup_lint(lapic: &mut kvm_lapic_state) {
    let set_mode = |v: u32, mode: u32| (v & !0x700) | (mode << 8);
    let lvt0 = lapic_reg(lapic, APIC_LVT0);
    set_lapic_reg(lapic, APIC_LVT0, set_mode(lvt0, APIC_MODE_EXTINT));
    let lvt1 = lapic_reg(lapic, APIC_LVT1);
    set_lapic_reg(lapic, APIC_LVT1, set_mode(lvt1, APIC_MODE_NMI));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdt_entries_decode_to_flat_long_mode_segments() {
        let cs = segment_from_gdt(GDT[1], 1);
        assert_eq!(
            (cs.selector, cs.l, cs.db, cs.present, cs.s, cs.type_),
            (8, 1, 0, 1, 1, 0xb)
        );
        assert_eq!((cs.base, cs.limit, cs.g), (0, 0xffff_ffff, 1));
        let ds = segment_from_gdt(GDT[2], 2);
        assert_eq!((ds.selector, ds.l, ds.db, ds.type_), (16, 0, 1, 3));
        let tr = segment_from_gdt(GDT[3], 3);
        assert_eq!((tr.selector, tr.s, tr.type_, tr.unusable), (24, 0, 0xb, 0));
        let null = segment_from_gdt(GDT[0], 0);
        assert_eq!(null.unusable, 1);
        assert_eq!(gdt_entry(0xa09b, 0, 0xfffff), 0x00af_9b00_0000_ffff);
    }

    #[test]
    fn page_tables_identity_map_four_gib() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let cr3 = write_boot_tables(&mem).unwrap();
        let pml4e: u64 = mem.read_obj(GuestAddress(cr3)).unwrap();
        assert_eq!(pml4e & 0x3, 0x3);
        let pdpt = pml4e & !0xfff;
        // Walk a few addresses through the tables.
        for addr in [0u64, 0x10_0000, 0x3fff_ffff, 0xfee0_0000, 0xffff_ffff] {
            let pdpte: u64 = mem.read_obj(GuestAddress(pdpt + 8 * (addr >> 30))).unwrap();
            let pd = pdpte & !0xfff;
            let pde: u64 = mem
                .read_obj(GuestAddress(pd + 8 * ((addr >> 21) & 511)))
                .unwrap();
            assert_eq!(pde & 0x83, 0x83, "2 MiB present writable page");
            assert_eq!((pde & !0x1f_ffff) | (addr & 0x1f_ffff), addr);
        }
        // Tables stay below the command line and the kernel.
        assert!(pdpt + 0x1000 * 5 <= layout::CMDLINE_START);
        let gdt1: u64 = mem.read_obj(GuestAddress(layout::GDT_START + 8)).unwrap();
        assert_eq!(gdt1, GDT[1]);
    }

    #[test]
    fn long_mode_sregs() {
        let mut s = kvm_sregs::default();
        setup_long_mode(&mut s, 0x9000);
        assert_eq!(s.cr3, 0x9000);
        assert_ne!(s.cr0 & X86_CR0_PG, 0);
        assert_ne!(s.cr0 & X86_CR0_PE, 0);
        assert_ne!(s.cr4 & X86_CR4_PAE, 0);
        assert_eq!(s.efer & (EFER_LME | EFER_LMA), EFER_LME | EFER_LMA);
        assert_eq!(s.cs.l, 1);
        assert_eq!(s.gdt.limit, 31);
        let r = boot_regs(0x100200);
        assert_eq!(
            (r.rip, r.rsi, r.rflags),
            (0x100200, layout::ZERO_PAGE_START, 2)
        );
    }

    #[test]
    fn lint_wiring() {
        let mut l = kvm_lapic_state::default();
        set_lapic_reg(&mut l, APIC_LVT0, 0x0001_0000);
        setup_lint(&mut l);
        assert_eq!(lapic_reg(&l, APIC_LVT0), 0x0001_0700);
        assert_eq!(lapic_reg(&l, APIC_LVT1), 0x400);
    }

    #[test]
    fn msrs_include_mtrr_and_misc_enable() {
        let m = boot_msrs();
        assert!(m
            .iter()
            .any(|e| e.index == msr::MTRR_DEF_TYPE && e.data == 0x806));
        assert!(m
            .iter()
            .any(|e| e.index == msr::IA32_MISC_ENABLE && e.data == 1));
    }
}
