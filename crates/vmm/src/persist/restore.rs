//! Building a VM back from a snapshot, complete and paused: the saved
//! definition is validated as a new VM's would be and must be the VM's own
//! definition's, its memory regions where that definition puts RAM
//! ([`check_state`]), the CPU checked against this host, memory mapped from
//! the file (or a checkpoint's layers), the devices rebuilt from their
//! saved state and every vCPU's state written. A checkpoint's restore puts
//! its disks back (locked, see [`super::checkpoint::restore_disks`]) and
//! gives the guest a new VM generation ID. A migration's receiver builds
//! the KVM side first ([`Skeleton`]) while memory arrives.

use std::io::Write;
use std::path::Path;

use nestvm_arch::acpi;
use nestvm_devices::serial::SerialPort;
use nestvm_kvm::kvm_bindings::kvm_cpuid_entry2;
use nestvm_kvm::Hypervisor;
use nestvm_virtio::Memory;

use super::verify::{check_agrees, check_layout, StateRefusal};
use super::{check_compatible, load, map_memory, PersistError, VmSnapshot};
use crate::builder::{attach_devices, new_generation_id, BuildError, BuiltVm};
use crate::config::VmConfig;

/// Errors building a VM back from a snapshot.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    /// The saved definition is not one a new VM may have.
    #[error("the saved VM's definition is refused")]
    Definition(#[source] crate::config::ConfigError),
    /// The state contradicts its own definition.
    #[error("the saved state does not match its own definition ({0})")]
    Mismatch(&'static str),
    /// The state is not of the VM its definition describes, or its memory
    /// is not where that definition puts RAM.
    #[error(transparent)]
    Refused(#[from] StateRefusal),
    /// Reading the state, its memory or its checkpoint layers.
    #[error(transparent)]
    Persist(#[from] PersistError),
    /// Creating the VM, its devices or its vCPUs.
    #[error(transparent)]
    Build(#[from] BuildError),
    /// The guest's new generation ID could not be written or announced.
    #[error("cannot give the restored VM its new generation ID")]
    Generation(#[source] std::io::Error),
    /// KVM refused the saved VM-wide state.
    #[error("cannot restore the VM's own state (irqchip, PIT, clock)")]
    Vm(#[source] nestvm_kvm::VmError),
    /// KVM refused a vCPU's saved state.
    #[error("cannot restore vCPU {index}'s state")]
    Vcpu {
        /// The vCPU.
        index: usize,
        /// KVM's error.
        #[source]
        source: nestvm_kvm::VcpuError,
    },
}

/// Refuses a snapshot whose definition a new VM could not have, or which
/// contradicts its definition — before anything is opened or mapped.
fn check_definition(snap: &VmSnapshot) -> Result<(), RestoreError> {
    snap.config.validate().map_err(RestoreError::Definition)?;
    let mismatch = if snap.vcpus.len() != snap.config.cpus as usize {
        Some("vCPU states")
    } else if snap.cpuid.len() != snap.vcpus.len() {
        Some("CPUID tables")
    } else if snap.virtio.len() != crate::virtio::device_count(&snap.config) {
        Some("devices")
    } else {
        None
    };
    mismatch.map_or(Ok(()), |m| Err(RestoreError::Mismatch(m)))
}

/// Refuses a snapshot that cannot be restored as the VM `definition` (its
/// vm.toml) describes: every check that needs neither KVM nor the memory
/// file — the saved definition is one a new VM may have, the state matches
/// it, it agrees with `definition`, and its memory regions are where RAM is.
pub fn check_state(snap: &VmSnapshot, definition: &VmConfig) -> Result<(), RestoreError> {
    check_definition(snap)?;
    check_agrees(&snap.config, definition)?;
    check_layout(snap.config.memory, &snap.memory)?;
    Ok(())
}

/// Builds the VM saved in `dir`, complete and paused, exactly as it was:
/// memory mapped from the file, KVM's VM state, devices and every vCPU
/// restored. The console's output goes to `console`. `definition` is the
/// VM's own (vm.toml): the state must agree with it ([`check_state`]).
///
/// Its generation ID is kept: a saved state is consumed by its restore, so
/// the guest goes on once from where it was, as after a long pause.
pub fn restore(
    snap: VmSnapshot,
    dir: &Path,
    definition: &VmConfig,
    hv: &Hypervisor,
    console: Box<dyn Write + Send>,
) -> Result<BuiltVm, RestoreError> {
    check_state(&snap, definition)?;
    check_compatible(&snap, hv)?;
    let memory = map_memory(dir, &snap.memory)?;
    restore_with_memory(snap, memory, hv, console)
}

/// Builds the VM of checkpoint `name` (under `root`), paused, after the
/// checks of [`check_state`] against `definition`. Its writable disks are
/// put back once its memory and the KVM VM are ready, just before the
/// devices open them (and only while no other VM holds them). The guest
/// gets a new generation ID and is told of it: a checkpoint may be
/// restored any number of times, and each copy must not reuse the random
/// state of the others.
pub fn restore_checkpoint(
    root: &Path,
    name: &str,
    definition: &VmConfig,
    hv: &Hypervisor,
    console: Box<dyn Write + Send>,
) -> Result<BuiltVm, RestoreError> {
    let dir = root.join(name);
    let snap = load(&dir)?;
    check_state(&snap, definition)?;
    check_compatible(&snap, hv)?;
    let memory = super::checkpoint::memory(root, name, &snap.memory)?;
    // Memory is mapped privately: the checkpoint's files keep their ID.
    acpi::write_generation_id(&memory, &new_generation_id()?).map_err(BuildError::from)?;
    let skeleton = Skeleton::new(&snap.cpuid, memory, hv)?;
    super::checkpoint::restore_disks(&dir, &snap.config.disks)?;
    let vm = skeleton.restore(snap, hv, console)?;
    // After every vCPU's saved state (its LAPIC included) is in place, so
    // the interrupt is pending when the guest runs.
    vm.generation.0.write(1).map_err(RestoreError::Generation)?;
    Ok(vm)
}

fn restore_with_memory(
    snap: VmSnapshot,
    memory: Memory,
    hv: &Hypervisor,
    console: Box<dyn Write + Send>,
) -> Result<BuiltVm, RestoreError> {
    let skeleton = Skeleton::new(&snap.cpuid, memory, hv)?;
    skeleton.restore(snap, hv, console)
}

/// The KVM side of a VM made before its state is known in full: the VM
/// with its interrupt controllers and timer, its memory slots, and its
/// vCPUs with their CPUID. A migration's receiver makes it while memory
/// is still arriving, so the final copy only attaches devices and writes
/// state.
pub(crate) struct Skeleton {
    vcpus: Vec<nestvm_kvm::Vcpu>,
    cpuid: Vec<Vec<kvm_cpuid_entry2>>,
    vm: nestvm_kvm::Vm,
    memory: Memory,
}

impl Skeleton {
    /// Creates the VM over `memory` with one vCPU per CPUID table.
    pub(crate) fn new(
        cpuid: &[Vec<kvm_cpuid_entry2>],
        memory: Memory,
        hv: &Hypervisor,
    ) -> Result<Skeleton, BuildError> {
        let vm = hv.create_vm()?;
        vm.map_memory(&memory)?;
        vm.setup_irqchip_and_pit()?;
        let mut vcpus = Vec::with_capacity(cpuid.len());
        for (index, table) in cpuid.iter().enumerate() {
            let vcpu = vm.create_vcpu(index as u64)?;
            vcpu.set_cpuid(table)?;
            vcpus.push(vcpu);
        }
        Ok(Skeleton {
            vcpus,
            cpuid: cpuid.to_vec(),
            vm,
            memory,
        })
    }

    /// Its guest memory.
    pub(crate) fn memory(&self) -> &Memory {
        &self.memory
    }

    /// Attaches the devices and restores `snap` into it: the VM, complete
    /// and paused.
    pub(crate) fn restore(
        self,
        snap: VmSnapshot,
        hv: &Hypervisor,
        console: Box<dyn Write + Send>,
    ) -> Result<BuiltVm, RestoreError> {
        check_definition(&snap)?;
        if snap.vcpus.len() != self.vcpus.len() || snap.cpuid != self.cpuid {
            return Err(RestoreError::Mismatch("the CPUID the VM was created with"));
        }
        let Skeleton {
            vcpus, vm, memory, ..
        } = self;
        let serial = &snap.serial;
        let devices = attach_devices(&snap.config, &vm, &memory, Some(&snap.virtio), |irq| {
            SerialPort::from_snapshot(serial, irq, console).map_err(BuildError::from)
        })?;
        vm.restore_state(&snap.vm).map_err(RestoreError::Vm)?;
        for (index, (vcpu, state)) in vcpus.iter().zip(&snap.vcpus).enumerate() {
            state
                .restore(vcpu)
                .map_err(|source| RestoreError::Vcpu { index, source })?;
        }
        Ok(BuiltVm::assemble(
            hv,
            snap.config,
            snap.nested,
            vcpus,
            snap.cpuid,
            devices,
            vm,
            memory,
        )?)
    }
}
