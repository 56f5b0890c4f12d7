//! The guest's CPUID table, derived from what KVM supports on this host.
//!
//! On top of KVM's supported set, per vCPU: APIC IDs and topology leaves that
//! agree with the vCPU count (Intel leaves 1, 4, 0xB, 0x1F; AMD 0x80000008 and
//! 0x8000001E), the hypervisor bit with KVM's paravirtual signature, and the
//! TSC frequency in leaf 0x40000010. Without the hypervisor bit a Linux guest
//! under emulation cannot calibrate its TSC and a hypervisor inside it hangs
//! before its first VM entry (see ARCHITECTURE.md).

use kvm_bindings::{kvm_cpuid_entry2, KVM_CPUID_FLAG_SIGNIFCANT_INDEX};

/// The CPU vendor, from leaf 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Vendor {
    /// GenuineIntel.
    Intel,
    /// AuthenticAMD (or HygonGenuine).
    Amd,
    /// Anything else.
    Other,
}

/// KVM's paravirtual signature, "KVMKVMKVM\0\0\0".
const KVM_SIGNATURE: [u32; 3] = [0x4b4d_564b, 0x564b_4d56, 0x0000_004d];
/// The hypervisor range base leaf.
pub const HYPERVISOR_LEAF: u32 = 0x4000_0000;
/// The timing leaf: EAX = TSC kHz, EBX = LAPIC bus kHz.
pub const TIMING_LEAF: u32 = 0x4000_0010;
/// KVM's LAPIC timer runs at 1 GHz.
const LAPIC_BUS_KHZ: u32 = 1_000_000;

/// CPUID.1 ECX bits.
const ECX_VMX: u32 = 1 << 5;
const ECX_TSC_DEADLINE: u32 = 1 << 24;
const ECX_HYPERVISOR: u32 = 1 << 31;
/// CPUID.1 EDX bit 28: more than one logical processor per package.
const EDX_HTT: u32 = 1 << 28;
/// CPUID.80000001 ECX bits.
const ECX_CMP_LEGACY: u32 = 1 << 1;
const ECX_SVM: u32 = 1 << 2;
/// SVM features leaf.
pub const SVM_LEAF: u32 = 0x8000_000a;

/// What the guest is told about its place in the machine.
#[derive(Debug, Clone, Copy)]
pub struct VcpuTopology {
    /// This vCPU's index, also its APIC ID.
    pub index: u32,
    /// How many vCPUs the VM has (one package, one thread per core).
    pub count: u32,
}

/// Inputs besides KVM's supported table.
#[derive(Debug, Clone, Copy)]
pub struct CpuidPolicy {
    /// Topology of the vCPU this table is for.
    pub topology: VcpuTopology,
    /// TSC frequency to state in leaf 0x40000010, if known.
    pub tsc_khz: Option<u32>,
    /// Whether KVM offers the TSC deadline timer (KVM_CAP_TSC_DEADLINE_TIMER).
    pub tsc_deadline: bool,
    /// Whether VMX/SVM are shown to the guest.
    pub expose_virtualization: bool,
}

/// The vendor named by leaf 0 of `entries`.
pub fn vendor(entries: &[kvm_cpuid_entry2]) -> Vendor {
    match find(entries, 0, 0) {
        Some(e) if (e.ebx, e.edx, e.ecx) == (0x756e_6547, 0x4965_6e69, 0x6c65_746e) => {
            Vendor::Intel
        }
        Some(e) if (e.ebx, e.edx, e.ecx) == (0x6874_7541, 0x6974_6e65, 0x444d_4163) => Vendor::Amd,
        Some(e) if (e.ebx, e.edx, e.ecx) == (0x6f67_7948, 0x6e65_476e, 0x656e_6975) => Vendor::Amd,
        _ => Vendor::Other,
    }
}

/// The entry for `function`/`index`, if present.
pub fn find(entries: &[kvm_cpuid_entry2], function: u32, index: u32) -> Option<&kvm_cpuid_entry2> {
    entries.iter().find(|e| {
        e.function == function
            && (e.flags & KVM_CPUID_FLAG_SIGNIFCANT_INDEX == 0 || e.index == index)
    })
}

/// Whether the table shows VMX (Intel) or SVM (AMD) to the guest.
pub fn shows_virtualization(entries: &[kvm_cpuid_entry2]) -> bool {
    find(entries, 1, 0).is_some_and(|e| e.ecx & ECX_VMX != 0)
        || find(entries, 0x8000_0001, 0).is_some_and(|e| e.ecx & ECX_SVM != 0)
}

fn bits_for(count: u32) -> u32 {
    // Smallest shift such that 1 << shift >= count.
    32 - count.saturating_sub(1).leading_zeros()
}

fn topology_entry(function: u32, index: u32, apic_id: u32, count: u32) -> kvm_cpuid_entry2 {
    let (eax, ebx, ecx) = match index {
        // SMT level: one thread per core.
        0 => (0, 1, (1 << 8) | index),
        // Core level: `count` cores in the package.
        1 => (bits_for(count), count, (2 << 8) | index),
        _ => (0, 0, index),
    };
    kvm_cpuid_entry2 {
        function,
        index,
        flags: KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
        eax,
        ebx,
        ecx,
        edx: apic_id,
        ..Default::default()
    }
}

/// Builds the table for one vCPU from KVM's supported entries.
pub fn build(supported: &[kvm_cpuid_entry2], policy: &CpuidPolicy) -> Vec<kvm_cpuid_entry2> {
    let VcpuTopology {
        index: apic_id,
        count,
    } = policy.topology;
    let vendor = vendor(supported);
    let max_basic = find(supported, 0, 0).map_or(0, |e| e.eax);
    let mut out: Vec<kvm_cpuid_entry2> = supported
        .iter()
        .filter(|e| !matches!(e.function, 0xb | 0x1f | TIMING_LEAF))
        .copied()
        .collect();

    for e in out.iter_mut() {
        match e.function {
            1 => {
                e.ecx |= ECX_HYPERVISOR;
                if policy.tsc_deadline {
                    e.ecx |= ECX_TSC_DEADLINE;
                }
                e.ebx = (e.ebx & 0x0000_ffff) | (apic_id << 24);
                if count > 1 {
                    e.ebx |= (1 << bits_for(count)).min(255) << 16;
                    e.edx |= EDX_HTT;
                } else {
                    e.ebx |= 1 << 16;
                    e.edx &= !EDX_HTT;
                }
                if !policy.expose_virtualization {
                    e.ecx &= !ECX_VMX;
                }
            }
            4 if vendor == Vendor::Intel => {
                let level = (e.eax >> 5) & 0x7;
                let sharing = if level >= 3 { count - 1 } else { 0 };
                e.eax = (e.eax & 0x3fff) | (sharing << 14) | ((count - 1) << 26);
            }
            0x8000_0001 => {
                if vendor == Vendor::Amd && count > 1 {
                    e.ecx |= ECX_CMP_LEGACY;
                } else {
                    e.ecx &= !ECX_CMP_LEGACY;
                }
                if !policy.expose_virtualization {
                    e.ecx &= !ECX_SVM;
                }
            }
            0x8000_0008 if vendor == Vendor::Amd => {
                e.ecx = (e.ecx & !0xf0ff) | (bits_for(count) << 12) | (count - 1);
            }
            0x8000_001e if vendor == Vendor::Amd => {
                e.eax = apic_id;
                e.ebx = apic_id & 0xff; // core id; threads per core - 1 = 0
                e.ecx = 0; // node 0
            }
            HYPERVISOR_LEAF => {
                e.eax = e.eax.max(TIMING_LEAF);
            }
            _ => {}
        }
    }
    if !policy.expose_virtualization {
        out.retain(|e| e.function != SVM_LEAF);
    }
    if max_basic >= 0xb {
        for index in 0..3 {
            out.push(topology_entry(0xb, index, apic_id, count));
        }
    }
    if max_basic >= 0x1f && find(supported, 0x1f, 0).is_some() {
        for index in 0..3 {
            out.push(topology_entry(0x1f, index, apic_id, count));
        }
    }
    if find(&out, HYPERVISOR_LEAF, 0).is_none() {
        out.push(kvm_cpuid_entry2 {
            function: HYPERVISOR_LEAF,
            eax: TIMING_LEAF,
            ebx: KVM_SIGNATURE[0],
            ecx: KVM_SIGNATURE[1],
            edx: KVM_SIGNATURE[2],
            ..Default::default()
        });
    }
    if let Some(khz) = policy.tsc_khz {
        out.push(kvm_cpuid_entry2 {
            function: TIMING_LEAF,
            eax: khz,
            ebx: LAPIC_BUS_KHZ,
            ..Default::default()
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaf(function: u32, index: u32, eax: u32, ebx: u32, ecx: u32, edx: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            eax,
            ebx,
            ecx,
            edx,
            ..Default::default()
        }
    }

    fn amd_host() -> Vec<kvm_cpuid_entry2> {
        vec![
            leaf(0, 0, 0x10, 0x6874_7541, 0x444d_4163, 0x6974_6e65),
            leaf(1, 0, 0x00a0_0f11, 0x0000_0800, 0, 0),
            leaf(0xb, 0, 1, 2, 0x100, 7),
            leaf(
                0x4000_0000,
                0,
                0x4000_0001,
                KVM_SIGNATURE[0],
                KVM_SIGNATURE[1],
                KVM_SIGNATURE[2],
            ),
            leaf(0x4000_0001, 0, 0x1, 0, 0, 0),
            leaf(0x8000_0000, 0, 0x8000_0021, 0, 0, 0),
            leaf(0x8000_0001, 0, 0, 0, ECX_SVM, 0),
            leaf(0x8000_0008, 0, 0x3030, 0, 0x7007, 0),
            leaf(SVM_LEAF, 0, 1, 0x8000, 0, 0x1ff),
            leaf(0x8000_001e, 0, 5, 0x105, 3, 0),
        ]
    }

    fn intel_host() -> Vec<kvm_cpuid_entry2> {
        vec![
            leaf(0, 0, 0x1f, 0x756e_6547, 0x6c65_746e, 0x4965_6e69),
            leaf(1, 0, 0x806f8, 0x0000_0800, ECX_VMX, 0),
            leaf(4, 0, 0x0000_0121, 0, 0, 0),
            leaf(4, 1, 0x0000_0163, 0, 0, 0),
            leaf(0x1f, 0, 1, 2, 0x100, 0),
        ]
    }

    fn policy(index: u32, count: u32, expose: bool) -> CpuidPolicy {
        CpuidPolicy {
            topology: VcpuTopology { index, count },
            tsc_khz: Some(2_000_000),
            tsc_deadline: true,
            expose_virtualization: expose,
        }
    }

    #[test]
    fn hypervisor_bit_signature_and_tsc_frequency() {
        let t = build(&amd_host(), &policy(0, 1, true));
        let l1 = find(&t, 1, 0).unwrap();
        assert_ne!(l1.ecx & ECX_HYPERVISOR, 0);
        assert_ne!(l1.ecx & ECX_TSC_DEADLINE, 0);
        let h = find(&t, HYPERVISOR_LEAF, 0).unwrap();
        assert_eq!([h.ebx, h.ecx, h.edx], KVM_SIGNATURE);
        assert!(h.eax >= TIMING_LEAF);
        let timing = find(&t, TIMING_LEAF, 0).unwrap();
        assert_eq!((timing.eax, timing.ebx), (2_000_000, LAPIC_BUS_KHZ));
    }

    #[test]
    fn hypervisor_leaf_is_added_when_kvm_lacks_it() {
        let mut host = intel_host();
        host.retain(|e| e.function != HYPERVISOR_LEAF);
        let t = build(&host, &policy(0, 1, true));
        let h = find(&t, HYPERVISOR_LEAF, 0).unwrap();
        assert_eq!([h.ebx, h.ecx, h.edx], KVM_SIGNATURE);
    }

    #[test]
    fn apic_ids_and_topology_agree_with_the_vcpu_count() {
        for count in [1u32, 2, 3, 4, 8] {
            for index in 0..count {
                let t = build(&intel_host(), &policy(index, count, true));
                let l1 = find(&t, 1, 0).unwrap();
                assert_eq!(l1.ebx >> 24, index);
                assert!((l1.ebx >> 16) & 0xff >= count);
                assert_eq!(l1.edx & EDX_HTT != 0, count > 1);
                let smt = t
                    .iter()
                    .find(|e| e.function == 0xb && e.index == 0)
                    .unwrap();
                let core = t
                    .iter()
                    .find(|e| e.function == 0xb && e.index == 1)
                    .unwrap();
                assert_eq!((smt.ebx, smt.edx, (smt.ecx >> 8) & 0xff), (1, index, 1));
                assert_eq!(
                    (core.ebx, core.edx, (core.ecx >> 8) & 0xff),
                    (count, index, 2)
                );
                assert!(1 << core.eax >= count);
                assert_eq!(t.iter().filter(|e| e.function == 0x1f).count(), 3);
                let l4 = t.iter().find(|e| e.function == 4 && e.index == 0).unwrap();
                assert_eq!((l4.eax >> 26) + 1, count);
            }
        }
        let t = build(&amd_host(), &policy(1, 2, true));
        let l8 = find(&t, 0x8000_0008, 0).unwrap();
        assert_eq!(l8.ecx & 0xff, 1);
        let l1e = find(&t, 0x8000_001e, 0).unwrap();
        assert_eq!(l1e.eax, 1);
        assert_ne!(find(&t, 0x8000_0001, 0).unwrap().ecx & ECX_CMP_LEGACY, 0);
        // Old topology entries from the host are replaced, not duplicated.
        assert_eq!(t.iter().filter(|e| e.function == 0xb).count(), 3);
    }

    #[test]
    fn virtualization_extensions_follow_the_policy() {
        let on = build(&amd_host(), &policy(0, 1, true));
        assert!(shows_virtualization(&on));
        assert!(find(&on, SVM_LEAF, 0).is_some());
        let off = build(&amd_host(), &policy(0, 1, false));
        assert!(!shows_virtualization(&off));
        assert!(find(&off, SVM_LEAF, 0).is_none());
        let off = build(&intel_host(), &policy(0, 1, false));
        assert!(!shows_virtualization(&off));
        assert_eq!(vendor(&intel_host()), Vendor::Intel);
        assert_eq!(vendor(&amd_host()), Vendor::Amd);
    }

    #[test]
    fn shift_widths() {
        assert_eq!(
            (
                bits_for(1),
                bits_for(2),
                bits_for(3),
                bits_for(4),
                bits_for(5)
            ),
            (0, 1, 2, 2, 3)
        );
    }
}
