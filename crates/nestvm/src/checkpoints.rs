//! Checkpoints of managed VMs (the reference document's Checkpoint-VM,
//! Get-VMSnapshot, Restore-VMSnapshot and Remove-VMSnapshot):
//! `vm checkpoint NAME [--name C]`, `vm checkpoints NAME`,
//! `vm restore NAME C`, `vm checkpoint rm NAME C`. The VMM writes a
//! checkpoint (`PUT /v1/vm/checkpoint`); the files' layout is
//! `nestvm_snapshot::layer`'s, and their bookkeeping (the tree, the current
//! checkpoint: the parent of the next) `nestvm_manager::checkpoints`'.
//! A restore is refused before the VM is stopped when the checkpoint is not
//! of the VM its definition describes, or when another running VM holds a
//! disk image it would put back.

use std::path::Path;
use std::time::Duration;

use anyhow::anyhow;
use nestvm_manager::checkpoints::Meta;
use nestvm_manager::{CheckpointError, Store, VmName, VmState};
use nestvm_vmm::api::CheckpointReply;
use nestvm_vmm::persist::{self, PersistError};

use crate::common::{print_json, report, runtime, store_err, usage, Failure};
use crate::control;
use crate::managed::{kill_hard, start_from};
use crate::vmdir::{remove_saved, VmDir};

const CHECKPOINT_TIMEOUT: Duration = Duration::from_secs(1800);

/// A refused checkpoint name of VM `name` as the user reads it.
fn name_err(name: &VmName, e: CheckpointError) -> Failure {
    match e {
        CheckpointError::InvalidName(_) => usage(e),
        CheckpointError::Exists(c) => usage(anyhow!("VM '{name}' already has a checkpoint '{c}'")),
        CheckpointError::NotFound(c) => usage(anyhow!("VM '{name}' has no checkpoint '{c}'")),
        _ => runtime(e),
    }
}

/// `vm checkpoint NAME [--name C]`.
pub fn take(store: &Store, name: &VmName, c: Option<String>, json: bool) -> Result<u8, Failure> {
    let _cmd = store.lock(name).map_err(store_err)?;
    if store.state(name) != VmState::Live {
        return Err(usage(anyhow!(
            "VM '{name}' is not running: checkpoints are taken of a running or paused VM"
        )));
    }
    let cps = store.checkpoints(name);
    let c = c.unwrap_or_else(|| cps.next_name());
    cps.check_new(&c).map_err(|e| name_err(name, e))?;
    let parent = cps.current().unwrap_or_default();
    let path = format!("/v1/vm/checkpoint?name={c}&parent={parent}");
    let socket = VmDir::of(store, name).control;
    let v: CheckpointReply = control::done(&socket, "PUT", &path, CHECKPOINT_TIMEOUT, 200)
        .map_err(|e| runtime(anyhow!("no checkpoint taken: {e}")))?;
    cps.set_current(Some(&c)).map_err(runtime)?;
    report(
        json,
        &format!(
            "took checkpoint '{c}' of VM '{name}'{}: {} MiB of memory stored ({} MiB of guest memory)",
            if parent.is_empty() { String::new() } else { format!(" after '{parent}'") },
            v.meta.written_bytes >> 20,
            v.meta.memory_bytes >> 20,
        ),
        serde_json::json!({"vm": name.as_str(), "result": "checkpoint", "checkpoint": v}),
    );
    Ok(0)
}

/// `vm checkpoints NAME`: the tree, with times and sizes.
pub fn show(store: &Store, name: &VmName, json: bool) -> Result<u8, Failure> {
    store.load(name).map_err(store_err)?;
    let cps = store.checkpoints(name);
    let all = cps.list();
    let cur = cps.current();
    if json {
        let v = serde_json::json!({"vm": name.as_str(), "current": cur, "checkpoints": all});
        print_json(&v)?;
        return Ok(0);
    }
    if all.is_empty() {
        println!("VM '{name}' has no checkpoints ('nestvm vm checkpoint {name}' takes one).");
        return Ok(0);
    }
    fn walk(all: &[Meta], parent: Option<&str>, depth: usize, cur: Option<&str>) {
        for m in all.iter().filter(|m| m.parent.as_deref() == parent) {
            println!(
                "{}{}{}  (taken {} s after the epoch; {} MiB stored)",
                "  ".repeat(depth),
                m.name,
                if Some(m.name.as_str()) == cur {
                    "  <- current"
                } else {
                    ""
                },
                m.created,
                m.written_bytes >> 20
            );
            walk(all, Some(&m.name), depth + 1, cur);
        }
    }
    walk(&all, None, 0, cur.as_deref());
    Ok(0)
}

/// `vm restore NAME C`: the VM goes back to checkpoint C and runs from there.
pub fn restore(store: &Store, name: &VmName, c: &str, json: bool) -> Result<u8, Failure> {
    {
        let _cmd = store.lock(name).map_err(store_err)?;
        if !store.checkpoints(name).exists(c) {
            return Err(usage(anyhow!(
                "VM '{name}' has no checkpoint '{c}' (see 'nestvm vm checkpoints {name}')"
            )));
        }
        // What can refuse the checkpoint is asked before the VM is stopped
        // or its saved state removed, so a refusal changes nothing. The VMM
        // checks again, and puts the disks back only under their locks.
        check_restorable(store, name, c)?;
        if store.state(name) == VmState::Live {
            kill_hard(store, name)?;
        }
        let saved = VmDir::of(store, name).saved;
        if saved.exists() {
            remove_saved(&saved).map_err(runtime)?;
        }
    }
    let code = start_from(store, name, Some(c), json)?;
    store
        .checkpoints(name)
        .set_current(Some(c))
        .map_err(runtime)?;
    Ok(code)
}

/// Refuses checkpoint `c` of VM `name` if its state is not the VM its
/// definition describes, or if a running VM holds a disk image it would
/// put back.
fn check_restorable(store: &Store, name: &VmName, c: &str) -> Result<(), Failure> {
    let dir = store
        .checkpoints(name)
        .dir(c)
        .map_err(|e| name_err(name, e))?;
    let refused = |e: anyhow::Error| {
        runtime(e.context(format!(
            "cannot restore checkpoint '{c}' of VM '{name}' (nothing was changed)"
        )))
    };
    let snap = persist::load(&dir).map_err(|e| refused(e.into()))?;
    let definition = store.load(name).map_err(store_err)?;
    persist::check_state(&snap, &definition).map_err(|e| refused(e.into()))?;
    // A running VM holds its own disks: they are put back once it is stopped.
    if store.state(name) == VmState::Live {
        return Ok(());
    }
    persist::checkpoint::check_disks_free(&dir, &snap.config.disks).map_err(|e| match e {
        PersistError::DiskInUse(image) => in_use(store, name, c, &image),
        e => refused(e.into()),
    })
}

/// The refusal of a restore whose disk `image` a running VM holds, naming
/// that VM where it is one of this store's.
fn in_use(store: &Store, name: &VmName, c: &str, image: &Path) -> Failure {
    let uses_image = |other: &VmName| {
        store.load(other).is_ok_and(|d| {
            d.disks
                .iter()
                .any(|d| std::fs::canonicalize(&d.path).is_ok_and(|p| p == image))
        })
    };
    let holder = store
        .list()
        .unwrap_or_default()
        .into_iter()
        .filter(|other| other != name && store.state(other) == VmState::Live)
        .find(uses_image);
    let who = match holder {
        Some(h) => format!("VM '{h}': stop it ('nestvm vm stop {h}')"),
        None => "another VM or program: stop it".to_owned(),
    };
    runtime(anyhow!(
        "cannot restore checkpoint '{c}' of VM '{name}': its disk image {} is in use by {who}, then restore again (nothing was changed)",
        image.display()
    ))
}

/// `vm checkpoint rm NAME C`: its pages are folded into its children first.
pub fn remove(store: &Store, name: &VmName, c: &str, json: bool) -> Result<u8, Failure> {
    let _cmd = store.lock(name).map_err(store_err)?;
    store
        .checkpoints(name)
        .remove(c)
        .map_err(|e| name_err(name, e))?;
    report(
        json,
        &format!("removed checkpoint '{c}' of VM '{name}'"),
        serde_json::json!({"vm": name.as_str(), "result": "removed", "checkpoint": c}),
    );
    Ok(0)
}
