//! Capturing a paused VM: every vCPU's state (nested state included), KVM's
//! VM-wide state, the devices and the CPUID tables, as a
//! [`crate::snapshot::VmSnapshot`] that a save ([`crate::snapshot`]) or a
//! checkpoint ([`crate::checkpoint`]) then writes with the VM's memory.

use std::sync::mpsc::channel;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nestvm_devices::serial::SerialPort;

use crate::vcpu::{Command, VcpuHandle};
use nestvm_virtio::Memory;

/// How long a paused vCPU may take to hand over its state.
pub(crate) const STATE_TIMEOUT: Duration = Duration::from_secs(30);

/// What a save needs besides the vCPUs.
pub(crate) struct SaveParts<'a> {
    pub config: &'a crate::config::VmConfig,
    pub cpuid: &'a [Vec<nestvm_kvm::kvm_bindings::kvm_cpuid_entry2>],
    pub nested: bool,
    pub vm: &'a nestvm_kvm::Vm,
    pub memory: &'a Memory,
    pub serial: &'a Arc<Mutex<SerialPort>>,
    pub virtio: &'a [Arc<Mutex<dyn nestvm_virtio::mmio::Inspect>>],
}

/// Asks every paused vCPU for its complete state.
pub(crate) fn collect_states(handles: &[VcpuHandle]) -> Result<Vec<nestvm_kvm::VcpuState>, String> {
    let mut states = Vec::with_capacity(handles.len());
    for h in handles {
        let (tx, rx) = channel();
        h.send(Command::Save(tx));
        let state = rx
            .recv_timeout(STATE_TIMEOUT)
            .map_err(|_| format!("vCPU {} did not answer", h.id()))??;
        states.push(state);
    }
    Ok(states)
}

/// The paused VM as a snapshot (memory excepted), and how many vCPUs were
/// running a guest of their own (their nested state is in it).
pub(crate) fn build_snapshot(
    handles: &[VcpuHandle],
    p: &SaveParts<'_>,
) -> Result<(crate::snapshot::VmSnapshot, usize), String> {
    let vcpus = collect_states(handles)?;
    let in_guest_mode = vcpus
        .iter()
        .filter(|v| v.nested.as_ref().is_some_and(|n| n.guest_mode()))
        .count();
    let snap = crate::snapshot::VmSnapshot {
        config: p.config.clone(),
        nested: p.nested,
        vm: p.vm.save_state().map_err(|e| e.to_string())?,
        vcpus,
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
    handles: &[VcpuHandle],
    p: &SaveParts<'_>,
    dir: &std::path::Path,
) -> Result<(crate::snapshot::SaveSummary, usize), String> {
    let (snap, in_guest_mode) = build_snapshot(handles, p)?;
    crate::snapshot::save(snap, p.memory, dir)
        .map(|s| (s, in_guest_mode))
        .map_err(|e| chain_text(&e))
}

/// The checkpoint `PUT /v1/vm/checkpoint?name=N[&parent=P]` asks for under
/// `root`, checked before the VM is paused: `Err((status, why))` refuses
/// the request (400 for a missing or bad name, 404 for an unknown parent,
/// 409 for a name taken).
pub(crate) fn checkpoint_request(
    query: &[(String, String)],
    root: &std::path::Path,
) -> Result<(String, Option<String>), (u16, String)> {
    let get = |k: &str| query.iter().find(|(q, _)| q == k).map(|(_, v)| v.as_str());
    let name = get("name").ok_or((400, "no checkpoint name given (name=NAME)".to_owned()))?;
    use crate::checkpoint::NameRefusal;
    crate::checkpoint::check_new_name(root, name).map_err(|r| match r {
        NameRefusal::Invalid(_) => (400, r.to_string()),
        NameRefusal::Taken(_) => (409, r.to_string()),
    })?;
    let parent = get("parent").filter(|p| !p.is_empty());
    if let Some(p) = parent {
        if !crate::checkpoint::valid_name(p) {
            return Err((400, format!("invalid parent checkpoint name '{p}'")));
        }
        if !root.join(p).is_dir() {
            return Err((
                404,
                format!("no checkpoint named '{p}' to descend from: give one 'nestvm vm checkpoints' lists"),
            ));
        }
    }
    Ok((name.to_owned(), parent.map(str::to_owned)))
}

/// Takes a checkpoint of the paused VM (see [`crate::checkpoint`]).
pub(crate) fn checkpoint_vm(
    handles: &[VcpuHandle],
    p: &SaveParts<'_>,
    root: &std::path::Path,
    (name, parent): (&str, Option<&str>),
) -> Result<crate::api::CheckpointReply, String> {
    let (snap, in_guest_mode) = build_snapshot(handles, p)?;
    std::fs::create_dir_all(root).map_err(|e| format!("cannot create {}: {e}", root.display()))?;
    let meta =
        crate::checkpoint::take(snap, p.memory, root, name, parent).map_err(|e| chain_text(&e))?;
    Ok(crate::api::CheckpointReply {
        meta,
        vcpus_in_guest_mode: in_guest_mode,
    })
}
