//! x86-64 machine set-up for nestvm, with no KVM calls: everything here
//! computes tables and register values and writes them into guest memory, so
//! it is unit-tested without `/dev/kvm`.
//!
//! - [`layout`]: where things go in guest physical memory, RAM ranges, e820.
//! - [`boot`]: loading a bzImage or ELF vmlinux, the initrd, the command line
//!   and `boot_params` (the Linux 64-bit boot protocol).
//! - [`regs`]: identity page tables, GDT, and the vCPU's initial registers,
//!   MSRs and LAPIC.
//! - [`cpuid`]: the guest CPUID table built from KVM's supported set.
//! - [`acpi`]: RSDP, XSDT, FADT, MADT and DSDT (CPU enumeration, power-off).

pub mod acpi;
pub mod boot;
pub mod cpuid;
pub mod layout;
pub mod regs;
