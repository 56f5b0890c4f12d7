//! A vCPU's complete architectural state, nested virtualization included —
//! the unit that snapshots, save/restore and migration carry.
//!
//! [`VcpuState::save`] reads it from a vCPU that is not running;
//! [`VcpuState::restore`] writes it back in the order KVM needs: special
//! registers first (EFER.SVME/VMXE must be set before nested state, and they
//! carry the APIC base), then nested state, then the rest — the LAPIC before
//! the MSRs so the TSC deadline is not dropped — with events and MP state
//! late so nothing written afterwards clears them.

use kvm_bindings::nested::KvmNestedStateBuffer;
use kvm_bindings::{
    kvm_debugregs, kvm_fpu, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs, kvm_sregs,
    kvm_vcpu_events, kvm_xcrs, kvm_xsave, Msrs, KVM_STATE_NESTED_GUEST_MODE,
};
use serde::{Deserialize, Serialize};

use crate::vcpu::{Vcpu, VcpuError};

/// Nested virtualization state of one vCPU (`KVM_GET_NESTED_STATE`).
#[derive(Serialize, Deserialize)]
pub struct NestedState {
    buffer: Box<KvmNestedStateBuffer>,
}

impl std::fmt::Debug for NestedState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NestedState")
            .field("format", &self.buffer.format)
            .field("flags", &self.buffer.flags)
            .field("size", &self.buffer.size)
            .finish()
    }
}

impl NestedState {
    /// Bytes of state KVM reported (header + data).
    pub fn len(&self) -> usize {
        self.buffer.size as usize
    }

    /// Whether there is no state beyond the header.
    pub fn is_empty(&self) -> bool {
        self.len() <= std::mem::size_of::<kvm_bindings::kvm_nested_state>()
    }

    /// Whether the vCPU was running its own guest (L2 in guest mode) when saved.
    pub fn guest_mode(&self) -> bool {
        u32::from(self.buffer.flags) & KVM_STATE_NESTED_GUEST_MODE != 0
    }

    /// 0 for VMX, 1 for SVM.
    pub fn format(&self) -> u16 {
        self.buffer.format
    }
}

/// kvm-bindings gives kvm_fpu no serde support; this mirrors its fields.
#[derive(Serialize, Deserialize)]
#[serde(remote = "kvm_fpu")]
struct FpuDef {
    fpr: [[u8; 16]; 8],
    fcw: u16,
    fsw: u16,
    ftwx: u8,
    pad1: u8,
    last_opcode: u16,
    last_ip: u64,
    last_dp: u64,
    xmm: [[u8; 16]; 16],
    mxcsr: u32,
    pad2: u32,
}

/// Everything a vCPU is.
#[derive(Debug, Serialize, Deserialize)]
pub struct VcpuState {
    /// General-purpose registers.
    pub regs: kvm_regs,
    /// Segment, control and descriptor-table registers.
    pub sregs: kvm_sregs,
    /// x87/SSE state (kept beside XSAVE for hosts without it).
    #[serde(with = "FpuDef")]
    pub fpu: kvm_fpu,
    /// XSAVE area.
    pub xsave: kvm_xsave,
    /// Extended control registers (XCR0).
    pub xcrs: kvm_xcrs,
    /// Every MSR KVM lists and lets us read.
    pub msrs: Vec<kvm_msr_entry>,
    /// Local APIC.
    pub lapic: kvm_lapic_state,
    /// Pending exceptions, interrupts, NMIs, SMM.
    pub events: kvm_vcpu_events,
    /// Runnable / halted / waiting for SIPI.
    pub mp_state: kvm_mp_state,
    /// Debug registers.
    pub debugregs: kvm_debugregs,
    /// Nested virtualization state, when KVM offers it.
    pub nested: Option<NestedState>,
}

impl VcpuState {
    /// Reads the state of `vcpu`, which must not be running. `msr_indices`
    /// is the host's `KVM_GET_MSR_INDEX_LIST`; MSRs KVM refuses to read are
    /// skipped. Nested state is read when `with_nested`.
    pub fn save(vcpu: &Vcpu, msr_indices: &[u32], with_nested: bool) -> Result<Self, VcpuError> {
        let fd = vcpu.fd();
        let err = |call| vcpu.ioctl_err(call);
        let nested = if with_nested {
            let mut buffer = Box::new(KvmNestedStateBuffer::empty());
            fd.nested_state(&mut buffer)
                .map_err(err("KVM_GET_NESTED_STATE"))?;
            Some(NestedState { buffer })
        } else {
            None
        };
        Ok(Self {
            regs: fd.get_regs().map_err(err("KVM_GET_REGS"))?,
            sregs: fd.get_sregs().map_err(err("KVM_GET_SREGS"))?,
            fpu: fd.get_fpu().map_err(err("KVM_GET_FPU"))?,
            xsave: fd.get_xsave().map_err(err("KVM_GET_XSAVE"))?,
            xcrs: fd.get_xcrs().map_err(err("KVM_GET_XCRS"))?,
            msrs: read_msrs(vcpu, msr_indices)?,
            lapic: fd.get_lapic().map_err(err("KVM_GET_LAPIC"))?,
            events: fd.get_vcpu_events().map_err(err("KVM_GET_VCPU_EVENTS"))?,
            mp_state: fd.get_mp_state().map_err(err("KVM_GET_MP_STATE"))?,
            debugregs: fd.get_debug_regs().map_err(err("KVM_GET_DEBUGREGS"))?,
            nested,
        })
    }

    /// Writes this state into `vcpu`, which must not be running. Its CPUID
    /// must already be set (for a fresh vCPU, with [`Vcpu::set_cpuid`] and
    /// the table the saved vCPU had).
    pub fn restore(&self, vcpu: &Vcpu) -> Result<(), VcpuError> {
        let fd = vcpu.fd();
        let err = |call| vcpu.ioctl_err(call);
        fd.set_sregs(&self.sregs).map_err(err("KVM_SET_SREGS"))?;
        if let Some(n) = &self.nested {
            fd.set_nested_state(&n.buffer)
                .map_err(err("KVM_SET_NESTED_STATE"))?;
        }
        fd.set_regs(&self.regs).map_err(err("KVM_SET_REGS"))?;
        fd.set_fpu(&self.fpu).map_err(err("KVM_SET_FPU"))?;
        // SAFETY: `self.xsave` came from KVM_GET_XSAVE on this host, so its
        // size matches what KVM_SET_XSAVE reads (the legacy 4 KiB area).
        unsafe { fd.set_xsave(&self.xsave) }.map_err(err("KVM_SET_XSAVE"))?;
        fd.set_xcrs(&self.xcrs).map_err(err("KVM_SET_XCRS"))?;
        // The LAPIC before the MSRs: KVM ignores a write to
        // IA32_TSC_DEADLINE unless the LAPIC timer is already in
        // TSC-deadline mode, and a lost deadline leaves the guest with no
        // timer interrupt ever again. (The APIC base, which the LAPIC's
        // register layout depends on, came with the special registers.)
        fd.set_lapic(&self.lapic).map_err(err("KVM_SET_LAPIC"))?;
        vcpu.set_msrs(&self.msrs)?;
        fd.set_vcpu_events(&self.events)
            .map_err(err("KVM_SET_VCPU_EVENTS"))?;
        fd.set_mp_state(self.mp_state)
            .map_err(err("KVM_SET_MP_STATE"))?;
        fd.set_debug_regs(&self.debugregs)
            .map_err(err("KVM_SET_DEBUGREGS"))?;
        Ok(())
    }
}

/// Reads every listed MSR KVM will read, skipping the ones it refuses.
fn read_msrs(vcpu: &Vcpu, indices: &[u32]) -> Result<Vec<kvm_msr_entry>, VcpuError> {
    let mut out = Vec::with_capacity(indices.len());
    let mut rest = indices;
    while !rest.is_empty() {
        let entries: Vec<kvm_msr_entry> = rest
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries).map_err(|_| VcpuError::PartialMsrs {
            id: vcpu.id(),
            set: 0,
            wanted: entries.len(),
            first_refused: rest[0],
        })?;
        let n = vcpu
            .fd()
            .get_msrs(&mut msrs)
            .map_err(vcpu.ioctl_err("KVM_GET_MSRS"))?;
        out.extend_from_slice(&msrs.as_slice()[..n]);
        // KVM stops at the first MSR it cannot read: skip it and go on.
        rest = &rest[(n + 1).min(rest.len())..];
    }
    Ok(out)
}
