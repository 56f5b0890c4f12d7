//! Whether this host can run a saved VM's CPU: each vCPU's saved CPUID is
//! compared, feature register by feature register, with what this host's
//! KVM would give a new VM of the same shape.

use nestvm_arch::cpuid;
use nestvm_kvm::kvm_bindings::kvm_cpuid_entry2;
use nestvm_kvm::Hypervisor;

use super::{PersistError, VmSnapshot};

/// Feature registers compared between a saved CPUID and this host:
/// (leaf, subleaf, register index 0..4 = eax..edx, mask of dynamic bits).
const FEATURE_REGS: [(u32, u32, usize, u32); 7] = [
    (1, 0, 2, 1 << 27), // ECX, without OSXSAVE (set by the guest's CR4)
    (1, 0, 3, 0),       // EDX
    (7, 0, 1, 0),       // EBX
    (7, 0, 2, 1 << 22), // ECX, without OSPKE (set by the guest's CR4)
    (7, 0, 3, 0),       // EDX
    (0x8000_0001, 0, 2, 0),
    (0x8000_0001, 0, 3, 0),
];

fn reg(entries: &[kvm_cpuid_entry2], leaf: u32, sub: u32, r: usize) -> u32 {
    entries
        .iter()
        .find(|e| e.function == leaf && (e.index == sub || leaf != 7))
        .map_or(0, |e| [e.eax, e.ebx, e.ecx, e.edx][r])
}

/// Refuses a snapshot whose guest uses CPU features this host's KVM would
/// not give a new VM of the same shape.
pub fn check_compatible(snap: &VmSnapshot, hv: &Hypervisor) -> Result<(), PersistError> {
    if snap.cpuid.len() != snap.vcpus.len() {
        return Err(PersistError::Inconsistent(
            "one CPUID table per vCPU is wanted",
        ));
    }
    check_cpu(&snap.cpuid, snap.nested, hv)
}

/// Refuses CPUID tables (one per vCPU) with features this host's KVM would
/// not give a new VM of the same shape (`nested`: VT-x/AMD-V exposed).
pub fn check_cpu(
    cpuid: &[Vec<kvm_cpuid_entry2>],
    nested: bool,
    hv: &Hypervisor,
) -> Result<(), PersistError> {
    let supported = hv.supported_cpuid().map_err(PersistError::Host)?;
    let mut missing = Vec::new();
    for (index, saved) in cpuid.iter().enumerate() {
        let here = cpuid::build(
            &supported,
            &cpuid::CpuidPolicy {
                topology: cpuid::VcpuTopology {
                    index: index as u32,
                    count: cpuid.len() as u32,
                },
                tsc_khz: None,
                tsc_deadline: hv.has_tsc_deadline(),
                expose_virtualization: nested,
            },
        );
        for (leaf, sub, r, dynamic) in FEATURE_REGS {
            let lacking = reg(saved, leaf, sub, r) & !reg(&here, leaf, sub, r) & !dynamic;
            if lacking != 0 {
                missing.push(format!(
                    "CPUID {leaf:#x}.{sub} {} bits {lacking:#x}",
                    ["eax", "ebx", "ecx", "edx"][r]
                ));
            }
        }
        if index == 0 && !missing.is_empty() {
            break;
        }
    }
    if missing.is_empty() {
        Ok(())
    } else {
        Err(PersistError::CpuFeatures(missing))
    }
}
