//! Saved VMs (the reference document's Save-VM and Start-VM of a saved
//! VM): `vm save` asks the VMM to pause and write the VM's state and memory
//! into `saved/` in the VM's directory, and the VMM ends; `vm start` of a
//! Saved VM builds it back from there (`vm serve` calls [`restore`]);
//! `vm discard-saved` drops a saved state.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::anyhow;
use nestvm_manager::{Store, VmName, VmState};
use nestvm_vmm::api::SaveReply;
use nestvm_vmm::persist;
use nestvm_vmm::BuiltVm;

use crate::common::{report, runtime, store_err, usage, Failure};
use crate::control;
use crate::vmdir::{remove_saved, VmDir};

/// How long a save may take (guest memory is written out).
const SAVE_TIMEOUT: Duration = Duration::from_secs(1800);

/// `vm save`.
pub fn save(store: &Store, name: &VmName, json: bool) -> Result<u8, Failure> {
    let _cmd = store.lock(name).map_err(store_err)?;
    if store.state(name) != VmState::Live {
        return Err(usage(anyhow!(
            "VM '{name}' is not running: only a running or paused VM can be saved"
        )));
    }
    let started = Instant::now();
    let p = VmDir::of(store, name);
    let v: SaveReply = control::done(&p.control, "PUT", "/v1/vm/save", SAVE_TIMEOUT, 200)
        .map_err(|e| runtime(anyhow!("VM '{name}' was not saved: {e}")))?;
    // The VMM ends once it has saved; wait for it to let go of the VM.
    let deadline = Instant::now() + Duration::from_secs(60);
    while store.state(name) == VmState::Live && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let mib = v.summary.memory_bytes >> 20;
    let written = v.summary.written_bytes >> 20;
    report(
        json,
        &format!(
            "saved VM '{name}' in {:.1} s: {mib} MiB of memory ({written} MiB not zero) in {}; {} of {} vCPUs were running their own guest (nested state saved); 'nestvm vm start {name}' resumes it",
            started.elapsed().as_secs_f64(),
            p.saved.display(),
            v.vcpus_in_guest_mode,
            v.vcpus,
        ),
        serde_json::json!({"vm": name.as_str(), "result": "saved", "dir": p.saved,
            "memory_bytes": v.summary.memory_bytes, "written_bytes": v.summary.written_bytes,
            "vcpus": v.vcpus, "vcpus_in_guest_mode": v.vcpus_in_guest_mode,
            "seconds": started.elapsed().as_secs_f64()}),
    );
    Ok(0)
}

/// `vm discard-saved`.
pub fn discard(store: &Store, name: &VmName, json: bool) -> Result<u8, Failure> {
    let _cmd = store.lock(name).map_err(store_err)?;
    let dir = VmDir::of(store, name).saved;
    if store.state(name) == VmState::Live {
        return Err(usage(anyhow!(
            "VM '{name}' is running: it has no saved state to discard"
        )));
    }
    if !dir.exists() {
        return Err(usage(anyhow!("VM '{name}' has no saved state")));
    }
    remove_saved(&dir).map_err(runtime)?;
    report(
        json,
        &format!("discarded the saved state of VM '{name}'; it starts fresh next time"),
        serde_json::json!({"vm": name.as_str(), "result": "discarded"}),
    );
    Ok(0)
}

/// Builds the VM saved in `dir`, paused, if its state agrees with the VM's
/// `definition`; the saved state is consumed (its memory file stays mapped
/// until the VM ends). Refused, it is kept.
pub fn restore(
    dir: &Path,
    definition: &nestvm_vmm::VmConfig,
    hv: &nestvm_kvm::Hypervisor,
    console: Box<dyn std::io::Write + Send>,
) -> Result<BuiltVm, Failure> {
    let snap = persist::load(dir).map_err(|e| {
        runtime(anyhow::Error::new(e).context(format!(
            "cannot resume the saved state in {} (discard it with 'nestvm vm discard-saved')",
            dir.display()
        )))
    })?;
    let vm = persist::restore(snap, dir, definition, hv, console)
        .map_err(|e| runtime(anyhow::Error::new(e).context("cannot resume the saved VM")))?;
    remove_saved(dir)
        .map_err(|e| runtime(anyhow!("cannot remove the resumed saved state: {e}")))?;
    Ok(vm)
}
