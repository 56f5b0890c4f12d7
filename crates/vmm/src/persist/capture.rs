//! Capturing a paused VM: every vCPU's state (nested state included), KVM's
//! VM-wide state, the devices and the CPUID tables, as a
//! [`crate::persist::VmSnapshot`] that a save ([`crate::snapshot`]), a
//! checkpoint ([`crate::checkpoint`]) or a migration then writes with the
//! VM's memory.

use std::path::Path;
use std::sync::{Arc, Mutex};

use nestvm_devices::serial::SerialPort;
use nestvm_virtio::Memory;

use crate::persist::{PersistError, SaveSummary, VmSnapshot};
use crate::vcpus::{VcpuSet, VcpuSetError};
use nestvm_snapshot::layer::Meta;

/// Errors while capturing, saving or checkpointing a paused VM.
#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    /// A vCPU did not hand over its state.
    #[error(transparent)]
    Vcpus(#[from] VcpuSetError),
    /// KVM did not hand over the VM-wide state (clock, irqchip, PIT).
    #[error("cannot read the VM's own state")]
    Vm(#[source] nestvm_kvm::VmError),
    /// Writing the saved VM or the checkpoint.
    #[error(transparent)]
    Write(#[from] PersistError),
    /// The checkpoints folder could not be made.
    #[error("cannot create {}", path.display())]
    Folder {
        /// The folder.
        path: std::path::PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// What a capture needs besides the vCPUs.
pub(crate) struct SaveParts<'a> {
    pub config: &'a crate::config::VmConfig,
    pub cpuid: &'a [Vec<nestvm_kvm::kvm_bindings::kvm_cpuid_entry2>],
    pub nested: bool,
    pub vm: &'a nestvm_kvm::Vm,
    pub memory: &'a Memory,
    pub serial: &'a Arc<Mutex<SerialPort>>,
    pub virtio: &'a [Arc<Mutex<dyn nestvm_virtio::mmio::Inspect>>],
}

/// The paused VM as a snapshot (memory excepted), and how many vCPUs were
/// running a guest of their own (their nested state is in it).
pub(crate) fn build_snapshot(
    vcpus: &VcpuSet,
    p: &SaveParts<'_>,
) -> Result<(VmSnapshot, usize), CaptureError> {
    let states = vcpus.save()?;
    let in_guest_mode = states
        .iter()
        .filter(|v| v.nested.as_ref().is_some_and(|n| n.guest_mode()))
        .count();
    let snap = VmSnapshot {
        config: p.config.clone(),
        nested: p.nested,
        vm: p.vm.save_state().map_err(CaptureError::Vm)?,
        vcpus: states,
        cpuid: p.cpuid.to_vec(),
        serial: p
            .serial
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .snapshot(),
        virtio: p
            .virtio
            .iter()
            .map(|d| d.lock().unwrap_or_else(|e| e.into_inner()).snapshot())
            .collect(),
        memory: Vec::new(),
    };
    Ok((snap, in_guest_mode))
}

/// An error with its causes, on one line.
pub(crate) fn chain_text(e: &dyn std::error::Error) -> String {
    let mut msg = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        msg.push_str(&format!(": {s}"));
        src = s.source();
    }
    msg
}

/// Saves the paused VM into `dir` (see [`crate::snapshot`]).
pub(crate) fn save_vm(
    vcpus: &VcpuSet,
    p: &SaveParts<'_>,
    dir: &Path,
) -> Result<(SaveSummary, usize), CaptureError> {
    let (snap, in_guest_mode) = build_snapshot(vcpus, p)?;
    Ok((crate::persist::save(snap, p.memory, dir)?, in_guest_mode))
}

/// Takes checkpoint `name` (after `parent`) of the paused VM under `root`
/// (see [`super::checkpoint`]); returns its metadata and how many vCPUs
/// were running a guest of their own.
pub(crate) fn checkpoint_vm(
    vcpus: &VcpuSet,
    p: &SaveParts<'_>,
    root: &Path,
    (name, parent): (&str, Option<&str>),
) -> Result<(Meta, usize), CaptureError> {
    let (snap, vcpus_in_guest_mode) = build_snapshot(vcpus, p)?;
    nestvm_snapshot::atomic::create_private_dir_all(root).map_err(|source| {
        CaptureError::Folder {
            path: root.to_owned(),
            source,
        }
    })?;
    // Disks come first among the devices, in the definition's order.
    let images: Vec<_> = p
        .virtio
        .iter()
        .take(p.config.disks.len())
        .map(|d| {
            let d = d.lock().unwrap_or_else(|e| e.into_inner());
            d.image().and_then(Result::ok)
        })
        .collect();
    let meta = crate::persist::checkpoint::take(snap, p.memory, &images, root, (name, parent))?;
    Ok((meta, vcpus_in_guest_mode))
}

/// Whether checkpoint `name` may be taken after `parent` under `root`,
/// checked before the VM is paused: `Err((status, why))` refuses it (400
/// for a bad name, 404 for an unknown parent, 409 for a name taken).
pub(crate) fn check_checkpoint(
    root: &Path,
    name: &str,
    parent: Option<&str>,
) -> Result<(), (u16, String)> {
    use crate::persist::checkpoint::NameRefusal;
    crate::persist::checkpoint::check_new_name(root, name).map_err(|r| match r {
        NameRefusal::Invalid(_) => (400, r.to_string()),
        NameRefusal::Taken(_) => (409, r.to_string()),
    })?;
    if let Some(p) = parent {
        if !crate::persist::checkpoint::valid_name(p) {
            return Err((400, format!("invalid parent checkpoint name '{p}'")));
        }
        if !root.join(p).is_dir() {
            return Err((
                404,
                format!("no checkpoint named '{p}' to descend from: give one 'nestvm vm checkpoints' lists"),
            ));
        }
    }
    Ok(())
}
