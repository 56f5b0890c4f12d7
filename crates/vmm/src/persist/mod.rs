//! Persisting a VM: saving a paused VM to a directory, checkpoints, and
//! building a VM back from either.
//!
//! A saved VM is a directory of two files:
//! - `state`: a [`nestvm_snapshot::container`] (magic, format version,
//!   CRC-64) around the JSON of [`VmSnapshot`]: the VM definition, every
//!   vCPU's state with its CPUID and nested state, KVM's irqchip, PIT and
//!   clock, the UART, and each virtio transport with its queues and its
//!   device's own versioned state;
//! - `memory`: guest RAM, region after region, written sparsely (pages of
//!   zeros become holes).
//!
//! Both are written into `DIR.tmp` and fsynced, then the directory is put in
//! place in one rename ([`nestvm_snapshot::atomic::publish_dir`]), so a
//! crash never leaves a half-written saved state where a whole one was.
//! Restoring maps `memory` privately (MAP_PRIVATE): pages are read from the
//! file when the guest first touches them, so a large VM resumes at once,
//! and the file itself is never changed.
//!
//! - `format`: [`VmSnapshot`], the state file, [`save`] and [`load`];
//! - `memory`: the memory file — sparse writes, the private mapping, the
//!   zero-page test;
//! - `cpu`: whether this host's KVM can run a saved VM's CPUID;
//! - `capture`: pausing nothing itself, it reads a paused VM (vCPUs, KVM's
//!   VM state, devices) into a [`VmSnapshot`] for a save, a checkpoint or a
//!   migration;
//! - `verify`: what a state must be before it is loaded: its memory where
//!   its definition puts RAM, its VM the one the VM's own definition
//!   describes ([`StateRefusal`]);
//! - `restore`: a VM built back from a snapshot, complete and paused
//!   ([`check_state`], [`restore`], [`restore_checkpoint`], the migration
//!   receiver's skeleton);
//! - [`checkpoint`]: checkpoints as layers of changed pages
//!   ([`nestvm_snapshot::layer`] is their on-disk format); `disks`: their
//!   disk copies put back under the images' locks.

pub(crate) mod capture;
pub mod checkpoint;
mod cpu;
mod disks;
mod format;
mod memory;
mod restore;
mod verify;

use std::path::PathBuf;

use nestvm_snapshot::atomic::AtomicError;
use nestvm_snapshot::container::ContainerError;

pub use cpu::{check_compatible, check_cpu};
pub use format::{load, save, staging_dir, VmSnapshot, STATE_FILE};
pub(crate) use memory::{is_zero, map_memory};
pub use memory::{RegionSnapshot, SaveSummary, MEMORY_FILE};
pub(crate) use restore::Skeleton;
pub use restore::{check_state, restore, restore_checkpoint, RestoreError};
pub use verify::{check_agrees, check_layout, StateRefusal};

/// Errors saving, checkpointing or loading a VM.
#[derive(Debug, thiserror::Error)]
pub enum PersistError {
    /// Writing or publishing files.
    #[error(transparent)]
    Io(#[from] AtomicError),
    /// The state file was refused (version, truncation, checksum).
    #[error(transparent)]
    Container(#[from] ContainerError),
    /// The state does not decode.
    #[error("the saved state in {} is not readable by this nestvm", path.display())]
    Decode {
        /// The file.
        path: PathBuf,
        /// What the decoder said.
        #[source]
        source: serde_json::Error,
    },
    /// The state does not encode.
    #[error("cannot encode the VM's state")]
    Encode(#[source] serde_json::Error),
    /// Guest memory could not be read or written.
    #[error("cannot {0} guest memory")]
    Memory(&'static str, #[source] std::io::Error),
    /// The state contradicts itself or its memory file.
    #[error("the saved state is inconsistent: {0}")]
    Inconsistent(&'static str),
    /// The memory file is shorter than the state says.
    #[error("{} is shorter than the state says", .0.display())]
    MemoryShort(PathBuf),
    /// This host's KVM could not be asked what it supports.
    #[error("cannot read what this host's KVM supports")]
    Host(#[source] nestvm_kvm::HypervisorError),
    /// The saved CPU uses features this host lacks.
    #[error("this host cannot resume the saved VM: its CPU features are not all available here ({}); resume it on a host with the same CPU", .0.join(", "))]
    CpuFeatures(Vec<String>),
    /// The checkpoint asked for cannot be taken under that name.
    #[error(transparent)]
    Name(#[from] checkpoint::NameRefusal),
    /// A disk image of a checkpoint cannot be copied, locked or put back.
    #[error("cannot {what} disk image {}", path.display())]
    Disk {
        /// What was being done.
        what: &'static str,
        /// The image (or its copy).
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A disk image to put back is open in a running VM.
    #[error("disk image {} is in use by another running VM: stop that VM, then restore again (nothing was changed)", .0.display())]
    DiskInUse(PathBuf),
    /// A checkpoint's layer files.
    #[error(transparent)]
    Layer(#[from] nestvm_snapshot::layer::LayerError),
}
