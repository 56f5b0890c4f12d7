//! Saving a paused VM to a directory and building a VM back from it.
//!
//! A saved VM is a directory of two files:
//! - `state`: a [`nestvm_snapshot::container`] (magic, format version,
//!   CRC-64) around the JSON of [`VmSnapshot`]: the VM definition, every
//!   vCPU's state with its CPUID and nested state, KVM's irqchip, PIT and
//!   clock, the UART, and each virtio transport with its queues;
//! - `memory`: guest RAM, region after region, written sparsely (pages of
//!   zeros become holes).
//!
//! Both are written into `DIR.tmp` and fsynced, then the directory is put in
//! place in one rename ([`nestvm_snapshot::atomic::publish_dir`]), so a
//! crash never leaves a half-written saved state where a whole one was.
//! Restoring maps `memory` privately (MAP_PRIVATE): pages are read from the
//! file when the guest first touches them, so a large VM resumes at once,
//! and the file itself is never changed.

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use nestvm_arch::cpuid;
use nestvm_devices::serial::{SerialPort, SerialSnapshot};
use nestvm_kvm::kvm_bindings::kvm_cpuid_entry2;
use nestvm_kvm::{Hypervisor, VcpuState, VmState};
use nestvm_snapshot::atomic::{self, AtomicError};
use nestvm_snapshot::container::{self, ContainerError};
use nestvm_virtio::mmio::MmioSnapshot;
use nestvm_virtio::Memory;
use serde::{Deserialize, Serialize};
use vm_memory::bitmap::NewBitmap;
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{
    Address, Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryRegion,
    GuestRegionMmap,
};

use crate::builder::{attach_devices, BuildError, BuiltVm};
use crate::config::VmConfig;

/// The state file in a saved-VM directory.
pub const STATE_FILE: &str = "state";
/// The memory file in a saved-VM directory.
pub const MEMORY_FILE: &str = "memory";
const PAGE: usize = 4096;
const CHUNK: usize = 1 << 20;

/// Errors saving or loading a VM.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// Writing or publishing files.
    #[error(transparent)]
    Io(#[from] AtomicError),
    /// The state file was refused (version, truncation, checksum).
    #[error(transparent)]
    Container(#[from] ContainerError),
    /// The state does not encode or decode.
    #[error("the saved state in {path} is not readable by this nestvm: {message}")]
    Decode {
        /// The file.
        path: PathBuf,
        /// What the decoder said.
        message: String,
    },
    /// Guest memory could not be read or written.
    #[error("cannot {0} guest memory")]
    Memory(&'static str, #[source] std::io::Error),
    /// This host cannot run the saved VM.
    #[error("this host cannot resume the saved VM: {0}")]
    Incompatible(String),
    /// A checkpoint's layer files.
    #[error(transparent)]
    Layer(#[from] nestvm_snapshot::layer::LayerError),
}

/// One guest RAM region in the memory file.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RegionSnapshot {
    /// Guest physical start.
    pub guest_addr: u64,
    /// Length in bytes.
    pub size: u64,
    /// Where it starts in the memory file.
    pub file_offset: u64,
}

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

/// What a save wrote.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct SaveSummary {
    /// Guest RAM in bytes.
    pub memory_bytes: u64,
    /// Bytes of RAM actually written (pages that were not all zeros).
    pub written_bytes: u64,
}

/// Whether `bytes` are all zero. Saves, checkpoints and migrations ask it of
/// every page, so it ORs 16 bytes at a time without stopping early, which
/// the compiler turns into vector code (a byte loop that stops at the first
/// non-zero byte does not vectorize, and most pages are all zeros).
pub(crate) fn is_zero(bytes: &[u8]) -> bool {
    let chunks = bytes.chunks_exact(16);
    let tail = chunks.remainder().iter().fold(0u8, |a, &b| a | b);
    let body = chunks.fold(0u128, |a, c| {
        a | u128::from_ne_bytes(c.try_into().expect("16-byte chunks"))
    });
    body == 0 && tail == 0
}

/// The directory a save stages into before it is published as `dir`.
pub fn staging_dir(dir: &Path) -> PathBuf {
    let mut name = dir.file_name().unwrap_or_default().to_os_string();
    name.push(".tmp");
    dir.with_file_name(name)
}

fn write_memory(
    mem: &Memory,
    path: &Path,
) -> Result<(Vec<RegionSnapshot>, SaveSummary), SnapshotError> {
    let err = |what| move |e| SnapshotError::Memory(what, e);
    // Guest memory may hold the guest's secrets: private like the state.
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(err("create the file for"))?;
    let mut regions = Vec::new();
    let mut offset = 0u64;
    let mut written = 0u64;
    let mut buf = vec![0u8; CHUNK];
    for region in mem.iter() {
        let start = region.start_addr();
        let size = region.len();
        regions.push(RegionSnapshot {
            guest_addr: start.raw_value(),
            size,
            file_offset: offset,
        });
        let mut at = 0u64;
        while at < size {
            let n = (size - at).min(CHUNK as u64) as usize;
            mem.read_slice(&mut buf[..n], start.unchecked_add(at))
                .map_err(|e| SnapshotError::Memory("read", std::io::Error::other(e)))?;
            for (i, page) in buf[..n].chunks(PAGE).enumerate() {
                if !is_zero(page) {
                    let pos = offset + at + (i * PAGE) as u64;
                    file.write_all_at(page, pos).map_err(err("write"))?;
                    written += page.len() as u64;
                }
            }
            at += n as u64;
        }
        offset += size;
    }
    file.set_len(offset).map_err(err("size the file of"))?;
    file.sync_all().map_err(err("sync the file of"))?;
    Ok((
        regions,
        SaveSummary {
            memory_bytes: offset,
            written_bytes: written,
        },
    ))
}

/// Writes `snap` (its `memory` field is filled in here) and `mem` as the
/// saved-VM directory `dir`, replacing a previous one only once the new one
/// is complete.
pub fn save(mut snap: VmSnapshot, mem: &Memory, dir: &Path) -> Result<SaveSummary, SnapshotError> {
    let staged = staging_dir(dir);
    atomic::recover_dir(&staged, dir);
    std::fs::create_dir_all(&staged).map_err(|source| AtomicError {
        what: "create",
        path: staged.clone(),
        source,
    })?;
    let (regions, summary) = write_memory(mem, &staged.join(MEMORY_FILE))?;
    snap.memory = regions;
    let json = serde_json::to_vec(&snap).map_err(|e| SnapshotError::Decode {
        path: staged.join(STATE_FILE),
        message: e.to_string(),
    })?;
    atomic::write_synced(&staged.join(STATE_FILE), &container::encode(&json), 0o600)?;
    atomic::sync_dir(&staged)?;
    atomic::publish_dir(&staged, dir)?;
    Ok(summary)
}

/// Reads and checks the state of the saved VM in `dir`.
pub fn load(dir: &Path) -> Result<VmSnapshot, SnapshotError> {
    let path = dir.join(STATE_FILE);
    let payload = container::read(&path)?;
    serde_json::from_slice(&payload).map_err(|e| SnapshotError::Decode {
        path,
        message: e.to_string(),
    })
}

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
pub fn check_compatible(snap: &VmSnapshot, hv: &Hypervisor) -> Result<(), SnapshotError> {
    if snap.cpuid.len() != snap.vcpus.len() {
        return Err(SnapshotError::Incompatible(
            "the state does not match its own definition".into(),
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
) -> Result<(), SnapshotError> {
    let supported = hv
        .supported_cpuid()
        .map_err(|e| SnapshotError::Incompatible(e.to_string()))?;
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
        Err(SnapshotError::Incompatible(format!(
            "its CPU features are not all available here ({}); resume it on a host with the same CPU",
            missing.join(", ")
        )))
    }
}

/// Maps the memory file privately, region by region, as guest memory.
pub(crate) fn map_memory(dir: &Path, regions: &[RegionSnapshot]) -> Result<Memory, SnapshotError> {
    let path = dir.join(MEMORY_FILE);
    let file = File::open(&path).map_err(|e| SnapshotError::Memory("open the file of", e))?;
    let len = file
        .metadata()
        .map_err(|e| SnapshotError::Memory("inspect the file of", e))?
        .len();
    let file = Arc::new(file);
    let mut mapped = Vec::new();
    for r in regions {
        let end = r.file_offset.checked_add(r.size);
        if end.is_none_or(|e| e > len) || r.size == 0 {
            return Err(SnapshotError::Incompatible(format!(
                "{} is shorter than the state says",
                path.display()
            )));
        }
        let region = MmapRegionBuilder::new_with_bitmap(
            r.size as usize,
            vm_memory::bitmap::AtomicBitmap::with_len(r.size as usize),
        )
        .with_file_offset(FileOffset::from_arc(file.clone(), r.file_offset))
        .with_mmap_prot(libc_prot())
        .with_mmap_flags(libc_private())
        .build()
        .map_err(|e| SnapshotError::Memory("map", std::io::Error::other(e.to_string())))?;
        let region = GuestRegionMmap::new(region, GuestAddress(r.guest_addr)).ok_or_else(|| {
            SnapshotError::Incompatible("a memory region wraps the address space".into())
        })?;
        mapped.push(region);
    }
    Memory::from_regions(mapped)
        .map_err(|e| SnapshotError::Incompatible(format!("memory regions overlap: {e}")))
}

fn libc_prot() -> i32 {
    libc::PROT_READ | libc::PROT_WRITE
}

/// Private: the guest's writes never reach the file; pages are read from it
/// on first touch.
fn libc_private() -> i32 {
    libc::MAP_PRIVATE | libc::MAP_NORESERVE
}

/// Builds the VM saved in `dir`, complete and paused, exactly as it was:
/// memory mapped from the file, KVM's VM state, devices and every vCPU
/// restored. The console's output goes to `console`.
pub fn restore(
    snap: VmSnapshot,
    dir: &Path,
    hv: &Hypervisor,
    console: Box<dyn Write + Send>,
) -> Result<BuiltVm, BuildError> {
    check_compatible(&snap, hv)?;
    let memory = map_memory(dir, &snap.memory)?;
    restore_with_memory(snap, memory, hv, console)
}

/// Builds the VM of checkpoint `name` (under `root`), paused.
pub fn restore_checkpoint(
    root: &Path,
    name: &str,
    hv: &Hypervisor,
    console: Box<dyn Write + Send>,
) -> Result<BuiltVm, BuildError> {
    let snap = load(&root.join(name))?;
    check_compatible(&snap, hv)?;
    let memory = crate::checkpoint::memory(root, name, &snap.memory)?;
    crate::checkpoint::restore_disks(&root.join(name), &snap.config.disks)?;
    restore_with_memory(snap, memory, hv, console)
}

pub(crate) fn restore_with_memory(
    snap: VmSnapshot,
    memory: Memory,
    hv: &Hypervisor,
    console: Box<dyn Write + Send>,
) -> Result<BuiltVm, BuildError> {
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
        vm.setup_irqchip_and_pit()?;
        vm.map_memory(&memory)?;
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
    ) -> Result<BuiltVm, BuildError> {
        if snap.vcpus.len() != snap.config.cpus as usize
            || snap.vcpus.len() != self.vcpus.len()
            || snap.cpuid != self.cpuid
            || snap.virtio.len() != crate::virtio::device_count(&snap.config)
        {
            return Err(SnapshotError::Incompatible(
                "the state does not match its own definition".into(),
            )
            .into());
        }
        let Skeleton {
            vcpus, vm, memory, ..
        } = self;
        let serial = &snap.serial;
        let devices = attach_devices(&snap.config, &vm, &memory, Some(&snap.virtio), |irq| {
            SerialPort::from_snapshot(serial, irq, console).map_err(|e| {
                BuildError::from(SnapshotError::Incompatible(crate::capture::chain_text(&e)))
            })
        })?;
        vm.restore_state(&snap.vm)?;
        for (vcpu, state) in vcpus.iter().zip(&snap.vcpus) {
            state.restore(vcpu)?;
        }
        BuiltVm::assemble(
            hv,
            snap.config,
            snap.nested,
            vcpus,
            snap.cpuid,
            devices,
            vm,
            memory,
        )
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn zero_pages_and_a_byte_anywhere() {
        let mut page = vec![0u8; 4096 + 5];
        assert!(super::is_zero(&page));
        for at in [0, 17, 4095, 4100] {
            page[at] = 1;
            assert!(!super::is_zero(&page), "{at}");
            page[at] = 0;
        }
    }
}
