//! Saved VMs (the reference document's Save-VM and Start-VM of a saved
//! VM): `vm save` asks the VMM to pause and write the VM's state and memory
//! into `saved/` in the VM's directory, and the VMM ends; `vm start` of a
//! Saved VM builds it back from there (`vm serve` calls [`restore`]);
//! `vm discard-saved` drops a saved state.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::anyhow;
use nestvm_manager::{Store, VmName, VmState};
use nestvm_vmm::api::call;
use nestvm_vmm::snapshot;
use nestvm_vmm::BuiltVm;

use crate::managed::paths;
use crate::vm::store_err;
use crate::{runtime, usage, Failure};

/// How long a save may take (guest memory is written out).
const SAVE_TIMEOUT: Duration = Duration::from_secs(1800);

/// The saved-state directory of a VM.
pub fn saved_dir(store: &Store, name: &VmName) -> PathBuf {
    store.vm_dir(name).join("saved")
}

/// `vm save`.
pub fn save(store: &Store, name: &VmName, json: bool) -> Result<u8, Failure> {
    let _cmd = store.lock(name).map_err(store_err)?;
    if store.state(name) != VmState::Live {
        return Err(usage(anyhow!(
            "VM '{name}' is not running: only a running or paused VM can be saved"
        )));
    }
    let started = Instant::now();
    let p = paths(store, name);
    let v = match call(&p.control, "PUT", "/v1/vm/save", SAVE_TIMEOUT) {
        Ok((200, v)) => v,
        Ok((_, v)) => {
            return Err(runtime(anyhow!(
                "VM '{name}' was not saved: {}",
                v["error"].as_str().unwrap_or("refused")
            )))
        }
        Err(e) => return Err(runtime(anyhow!("VM '{name}' was not saved: {e}"))),
    };
    // The VMM ends once it has saved; wait for it to let go of the VM.
    let deadline = Instant::now() + Duration::from_secs(60);
    while store.state(name) == VmState::Live && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let mib = v["memory_bytes"].as_u64().unwrap_or(0) >> 20;
    let written = v["written_bytes"].as_u64().unwrap_or(0) >> 20;
    crate::report(
        json,
        &format!(
            "saved VM '{name}' in {:.1} s: {mib} MiB of memory ({written} MiB not zero) in {}; {} of {} vCPUs were running their own guest (nested state saved); 'nestvm vm start {name}' resumes it",
            started.elapsed().as_secs_f64(),
            saved_dir(store, name).display(),
            v["vcpus_in_guest_mode"],
            v["vcpus"],
        ),
        serde_json::json!({"vm": name.as_str(), "result": "saved", "dir": saved_dir(store, name),
            "memory_bytes": v["memory_bytes"], "written_bytes": v["written_bytes"],
            "vcpus": v["vcpus"], "vcpus_in_guest_mode": v["vcpus_in_guest_mode"],
            "seconds": started.elapsed().as_secs_f64()}),
    );
    Ok(0)
}

/// `vm discard-saved`.
pub fn discard(store: &Store, name: &VmName, json: bool) -> Result<u8, Failure> {
    let _cmd = store.lock(name).map_err(store_err)?;
    let dir = saved_dir(store, name);
    if store.state(name) == VmState::Live {
        return Err(usage(anyhow!(
            "VM '{name}' is running: it has no saved state to discard"
        )));
    }
    if !dir.exists() {
        return Err(usage(anyhow!("VM '{name}' has no saved state")));
    }
    remove(&dir).map_err(runtime)?;
    crate::report(
        json,
        &format!("discarded the saved state of VM '{name}'; it starts fresh next time"),
        serde_json::json!({"vm": name.as_str(), "result": "discarded"}),
    );
    Ok(0)
}

/// Removes a saved-state directory (and what a crashed save left beside it).
pub fn remove(dir: &Path) -> std::io::Result<()> {
    nestvm_snapshot::atomic::recover_dir(&snapshot::staging_dir(dir), dir);
    std::fs::remove_dir_all(dir)
}

/// Builds the VM saved in `dir`, paused; the saved state is consumed (its
/// memory file stays mapped until the VM ends).
pub fn restore(
    dir: &Path,
    hv: &nestvm_kvm::Hypervisor,
    console: Box<dyn std::io::Write + Send>,
) -> Result<BuiltVm, Failure> {
    let snap = snapshot::load(dir).map_err(|e| {
        runtime(anyhow::Error::new(e).context(format!(
            "cannot resume the saved state in {} (discard it with 'nestvm vm discard-saved')",
            dir.display()
        )))
    })?;
    let vm = snapshot::restore(snap, dir, hv, console)
        .map_err(|e| runtime(anyhow::Error::new(e).context("cannot resume the saved VM")))?;
    remove(dir).map_err(|e| runtime(anyhow!("cannot remove the resumed saved state: {e}")))?;
    Ok(vm)
}
