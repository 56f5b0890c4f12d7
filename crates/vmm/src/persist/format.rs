//! The state of a saved VM: [`VmSnapshot`] (everything but memory), its
//! container file, and a saved-VM directory written whole or not at all.

use std::path::{Path, PathBuf};

use nestvm_devices::serial::SerialSnapshot;
use nestvm_kvm::kvm_bindings::kvm_cpuid_entry2;
use nestvm_kvm::{VcpuState, VmState};
use nestvm_snapshot::atomic::{self, AtomicError};
use nestvm_snapshot::container;
use nestvm_virtio::mmio::MmioSnapshot;
use nestvm_virtio::Memory;
use serde::{Deserialize, Serialize};

use super::memory::{write_memory, RegionSnapshot, SaveSummary, MEMORY_FILE};
use super::PersistError;
use crate::config::VmConfig;

/// The state file in a saved-VM directory.
pub const STATE_FILE: &str = "state";
/// Everything a paused VM is, but its memory.
#[derive(Debug, Serialize, Deserialize)]
pub struct VmSnapshot {
    /// The VM's settings.
    pub config: VmConfig,
    /// Whether VT-x/AMD-V were exposed.
    pub nested: bool,
    /// KVM's VM-wide state.
    pub vm: VmState,
    /// Every vCPU, in order.
    pub vcpus: Vec<VcpuState>,
    /// The CPUID each vCPU was given, in order (restored before its state).
    pub cpuid: Vec<Vec<kvm_cpuid_entry2>>,
    /// The UART.
    pub serial: SerialSnapshot,
    /// Each virtio transport, in device order.
    pub virtio: Vec<MmioSnapshot>,
    /// Guest RAM regions in the memory file.
    pub memory: Vec<RegionSnapshot>,
}

/// The directory a save stages into before it is published as `dir`.
pub fn staging_dir(dir: &Path) -> PathBuf {
    let mut name = dir.file_name().unwrap_or_default().to_os_string();
    name.push(".tmp");
    dir.with_file_name(name)
}

/// Writes `snap` (its `memory` field is filled in here) and `mem` as the
/// saved-VM directory `dir`, replacing a previous one only once the new one
/// is complete.
pub fn save(mut snap: VmSnapshot, mem: &Memory, dir: &Path) -> Result<SaveSummary, PersistError> {
    let staged = staging_dir(dir);
    atomic::recover_dir(&staged, dir);
    nestvm_snapshot::atomic::create_private_dir_all(&staged).map_err(|source| AtomicError {
        what: "create",
        path: staged.clone(),
        source,
    })?;
    let (regions, summary) = write_memory(mem, &staged.join(MEMORY_FILE))?;
    snap.memory = regions;
    let json = serde_json::to_vec(&snap).map_err(PersistError::Encode)?;
    atomic::write_synced(&staged.join(STATE_FILE), &container::encode(&json), 0o600)?;
    atomic::sync_dir(&staged)?;
    atomic::publish_dir(&staged, dir)?;
    Ok(summary)
}

/// Reads and checks the state of the saved VM in `dir`.
pub fn load(dir: &Path) -> Result<VmSnapshot, PersistError> {
    let path = dir.join(STATE_FILE);
    let payload = container::read(&path)?;
    serde_json::from_slice(&payload).map_err(|source| PersistError::Decode { path, source })
}
