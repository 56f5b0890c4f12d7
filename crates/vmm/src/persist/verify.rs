//! What a saved state or checkpoint must be, beyond a valid definition of
//! its own, before anything is mapped or opened for it: its memory exactly
//! where its definition puts RAM ([`check_layout`]: nothing over the 32-bit
//! device hole, whose top holds the IOAPIC and LAPIC pages), and its VM the
//! one the VM's own definition describes ([`check_agrees`]: the same vCPUs,
//! memory, disks, adapters and balloon, so that a state file cannot bring a
//! disk or TAP device of its own choosing).

use std::path::PathBuf;

use nestvm_arch::layout;

use super::RegionSnapshot;
use crate::config::VmConfig;

/// Why a saved state is refused before it is loaded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StateRefusal {
    /// Its memory regions are not those its definition's memory implies.
    #[error("the saved state's memory regions are not where a VM of {memory_mib} MiB has RAM (region {index}: {detail})")]
    Layout {
        /// The definition's memory.
        memory_mib: u64,
        /// The first region that differs.
        index: usize,
        /// How it differs.
        detail: String,
    },
    /// Another number of vCPUs than the VM's definition.
    #[error("the saved state has {saved} vCPUs but the VM's definition has {defined}: set --cpus back to {saved} to restore it")]
    Cpus {
        /// In the state.
        saved: u32,
        /// In the definition.
        defined: u32,
    },
    /// Another memory size than the VM's definition.
    #[error("the saved state has {saved_mib} MiB of memory but the VM's definition has {defined_mib} MiB: set --memory back to {saved_mib}M to restore it")]
    Memory {
        /// In the state.
        saved_mib: u64,
        /// In the definition.
        defined_mib: u64,
    },
    /// A disk the definition does not have.
    #[error("the saved state has disk {index} ({}) that the VM's definition does not list: it was not opened", path.display())]
    DiskOnlyInState {
        /// Its index.
        index: usize,
        /// Its image.
        path: PathBuf,
    },
    /// A disk of the definition that the state lacks.
    #[error("the VM's definition lists disk {index} ({}) that the saved state lacks: remove it from the definition to restore the state", path.display())]
    DiskOnlyInDefinition {
        /// Its index.
        index: usize,
        /// Its image.
        path: PathBuf,
    },
    /// A disk at another path, or writable in one and not the other.
    #[error("disk {index} is {} in the saved state but {} in the VM's definition: it was not opened", describe(saved, *saved_ro), describe(defined, *defined_ro))]
    Disk {
        /// Its index.
        index: usize,
        /// Its image in the state.
        saved: PathBuf,
        /// Read-only in the state.
        saved_ro: bool,
        /// Its image in the definition.
        defined: PathBuf,
        /// Read-only in the definition.
        defined_ro: bool,
    },
    /// Network adapters on other TAP devices (or user-mode where the other
    /// has a TAP), or another number of them.
    #[error("the saved state's network adapters ({}) are not the VM's definition's ({}): none was opened", taps(saved), taps(defined))]
    Nets {
        /// The state's TAP devices.
        saved: Vec<String>,
        /// The definition's TAP devices.
        defined: Vec<String>,
    },
    /// A balloon in one and not the other.
    #[error("{}", balloon(*saved))]
    Balloon {
        /// Whether the state has one.
        saved: bool,
    },
    /// Another vsock device (or none) than the definition's.
    #[error("the saved state's vsock device ({saved}) is not the definition's ({defined}): restore with the settings it was saved with")]
    Vsock {
        /// The state's.
        saved: String,
        /// The definition's.
        defined: String,
    },
}

fn describe(path: &std::path::Path, readonly: bool) -> String {
    let access = if readonly { "read-only" } else { "writable" };
    format!("{} ({access})", path.display())
}

fn taps(t: &[String]) -> String {
    if t.is_empty() {
        "none".into()
    } else {
        t.join(", ")
    }
}

fn balloon(saved: bool) -> &'static str {
    if saved {
        "the saved state has a memory balloon that the VM's definition does not have"
    } else {
        "the VM's definition has a memory balloon that the saved state lacks"
    }
}

/// Refuses memory regions other than those of a VM of `memory` bytes:
/// the ranges [`layout::ram_ranges`] gives, in order, stored one after the
/// other in the memory file.
pub fn check_layout(memory: u64, regions: &[RegionSnapshot]) -> Result<(), StateRefusal> {
    let want = layout::ram_ranges(memory);
    let refuse = |index: usize, detail: String| StateRefusal::Layout {
        memory_mib: memory >> 20,
        index,
        detail,
    };
    let mut offset = 0u64;
    for (index, (addr, size)) in want.iter().enumerate() {
        let Some(r) = regions.get(index) else {
            return Err(refuse(index, "missing".into()));
        };
        let size = *size as u64;
        if (r.guest_addr, r.size, r.file_offset) != (addr.0, size, offset) {
            return Err(refuse(
                index,
                format!(
                    "{} bytes at {:#x} from file offset {:#x}, not {size} bytes at {:#x} from {offset:#x}",
                    r.size, r.guest_addr, r.file_offset, addr.0
                ),
            ));
        }
        offset += size;
    }
    if regions.len() > want.len() {
        let r = &regions[want.len()];
        return Err(refuse(
            want.len(),
            format!("{} bytes at {:#x} is not RAM", r.size, r.guest_addr),
        ));
    }
    Ok(())
}

/// Refuses a saved definition that is not the VM's own `definition`
/// (vm.toml) in what a restore opens or sizes: vCPUs, memory, disks (path,
/// access, count), network adapters (TAP devices), the balloon and the
/// vsock device.
pub fn check_agrees(saved: &VmConfig, definition: &VmConfig) -> Result<(), StateRefusal> {
    if saved.cpus != definition.cpus {
        return Err(StateRefusal::Cpus {
            saved: saved.cpus,
            defined: definition.cpus,
        });
    }
    if saved.memory != definition.memory {
        return Err(StateRefusal::Memory {
            saved_mib: saved.memory >> 20,
            defined_mib: definition.memory >> 20,
        });
    }
    let defined = &definition.disks;
    for (index, d) in saved.disks.iter().enumerate() {
        let Some(def) = defined.get(index) else {
            return Err(StateRefusal::DiskOnlyInState {
                index,
                path: d.path.clone(),
            });
        };
        if d.path != def.path || d.readonly != def.readonly {
            return Err(StateRefusal::Disk {
                index,
                saved: d.path.clone(),
                saved_ro: d.readonly,
                defined: def.path.clone(),
                defined_ro: def.readonly,
            });
        }
    }
    if let Some(def) = defined.get(saved.disks.len()) {
        return Err(StateRefusal::DiskOnlyInDefinition {
            index: saved.disks.len(),
            path: def.path.clone(),
        });
    }
    let taps = |c: &VmConfig| c.nets.iter().map(|n| n.backend()).collect::<Vec<_>>();
    if taps(saved) != taps(definition) {
        return Err(StateRefusal::Nets {
            saved: taps(saved),
            defined: taps(definition),
        });
    }
    if saved.balloon.is_some() != definition.balloon.is_some() {
        return Err(StateRefusal::Balloon {
            saved: saved.balloon.is_some(),
        });
    }
    if saved.vsock != definition.vsock {
        let say = |v: &Option<crate::config::vsock::VsockConfig>| match v {
            Some(v) => format!("cid {} on {}", v.cid, v.socket_path().display()),
            None => "none".to_owned(),
        };
        return Err(StateRefusal::Vsock {
            saved: say(&saved.vsock),
            defined: say(&definition.vsock),
        });
    }
    Ok(())
}

#[cfg(test)]
#[path = "verify_tests.rs"]
mod tests;
