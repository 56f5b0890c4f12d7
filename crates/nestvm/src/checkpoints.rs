//! Checkpoints of managed VMs (the reference document's Checkpoint-VM,
//! Get-VMSnapshot, Restore-VMSnapshot and Remove-VMSnapshot):
//! `vm checkpoint NAME [--name C]`, `vm checkpoints NAME`,
//! `vm restore NAME C`, `vm checkpoint rm NAME C`. The VMM writes a
//! checkpoint (`PUT /v1/vm/checkpoint`); the files' layout is
//! `nestvm_vmm::checkpoint`'s. `CURRENT` in the checkpoints folder names the
//! checkpoint the VM's present state descends from: the parent of the next.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::anyhow;
use nestvm_manager::{Store, VmName, VmState};
use nestvm_vmm::api::call;
use nestvm_snapshot::layer::{self as checkpoint, Meta};

use crate::managed::paths;
use crate::vm::store_err;
use crate::{runtime, usage, Failure};

const CHECKPOINT_TIMEOUT: Duration = Duration::from_secs(1800);

/// The checkpoints folder of a VM.
pub fn root(store: &Store, name: &VmName) -> PathBuf {
    store.vm_dir(name).join("checkpoints")
}

fn current_file(store: &Store, name: &VmName) -> PathBuf {
    root(store, name).join("CURRENT")
}

/// The checkpoint the VM's present state descends from.
pub fn current(store: &Store, name: &VmName) -> Option<String> {
    std::fs::read_to_string(current_file(store, name))
        .ok()
        .map(|s| s.trim().to_owned())
        .filter(|s| root(store, name).join(s).is_dir())
}

/// Records (or clears) the current checkpoint.
pub fn set_current(store: &Store, name: &VmName, c: Option<&str>) -> Result<(), Failure> {
    let f = current_file(store, name);
    match c {
        Some(c) => {
            std::fs::create_dir_all(root(store, name)).map_err(runtime)?;
            nestvm_snapshot::atomic::write_file(&f, c.as_bytes(), 0o600).map_err(runtime)
        }
        None => {
            let _ = std::fs::remove_file(f);
            Ok(())
        }
    }
}

/// Every checkpoint's metadata, oldest first.
fn list(dir: &Path) -> Vec<Meta> {
    let mut v: Vec<Meta> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.path().is_dir())
        .filter_map(|e| checkpoint::read_meta(&e.path()).ok())
        .collect();
    v.sort_by(|a, b| (a.created, &a.name).cmp(&(b.created, &b.name)));
    v
}

/// `vm checkpoint NAME [--name C]`.
pub fn take(store: &Store, name: &VmName, c: Option<String>, json: bool) -> Result<u8, Failure> {
    let _cmd = store.lock(name).map_err(store_err)?;
    if store.state(name) != VmState::Live {
        return Err(usage(anyhow!(
            "VM '{name}' is not running: checkpoints are taken of a running or paused VM"
        )));
    }
    let dir = root(store, name);
    let c = match c {
        Some(c) => c,
        None => (1..)
            .map(|i| format!("checkpoint-{i}"))
            .find(|n| !dir.join(n).exists())
            .expect("some number is free"),
    };
    if !checkpoint::valid_name(&c) {
        return Err(usage(anyhow!(
            "invalid checkpoint name '{c}': use up to 64 letters, digits, '-', '_' or '.'"
        )));
    }
    if dir.join(&c).exists() {
        return Err(usage(anyhow!("VM '{name}' already has a checkpoint '{c}'")));
    }
    let parent = current(store, name).unwrap_or_default();
    let path = format!("/v1/vm/checkpoint?name={c}&parent={parent}");
    let v = match call(
        &paths(store, name).control,
        "PUT",
        &path,
        CHECKPOINT_TIMEOUT,
    ) {
        Ok((200, v)) => v,
        Ok((_, v)) => {
            return Err(runtime(anyhow!(
                "no checkpoint taken: {}",
                v["error"].as_str().unwrap_or("refused")
            )))
        }
        Err(e) => return Err(runtime(anyhow!("no checkpoint taken: {e}"))),
    };
    set_current(store, name, Some(&c))?;
    crate::report(
        json,
        &format!(
            "took checkpoint '{c}' of VM '{name}'{}: {} MiB of memory stored ({} MiB of guest memory)",
            if parent.is_empty() { String::new() } else { format!(" after '{parent}'") },
            v["written_bytes"].as_u64().unwrap_or(0) >> 20,
            v["memory_bytes"].as_u64().unwrap_or(0) >> 20,
        ),
        serde_json::json!({"vm": name.as_str(), "result": "checkpoint", "checkpoint": v}),
    );
    Ok(0)
}

/// `vm checkpoints NAME`: the tree, with times and sizes.
pub fn show(store: &Store, name: &VmName, json: bool) -> Result<u8, Failure> {
    store.load(name).map_err(store_err)?;
    let all = list(&root(store, name));
    let cur = current(store, name);
    if json {
        let v = serde_json::json!({"vm": name.as_str(), "current": cur, "checkpoints": all});
        println!("{}", serde_json::to_string_pretty(&v).map_err(runtime)?);
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
        if !checkpoint::valid_name(c) || !root(store, name).join(c).is_dir() {
            return Err(usage(anyhow!(
                "VM '{name}' has no checkpoint '{c}' (see 'nestvm vm checkpoints {name}')"
            )));
        }
        if store.state(name) == VmState::Live {
            crate::managed::kill_hard(store, name)?;
        }
        let saved = crate::saved::saved_dir(store, name);
        if saved.exists() {
            crate::saved::remove(&saved).map_err(runtime)?;
        }
    }
    let code = crate::managed::start_from(store, name, Some(c), json)?;
    set_current(store, name, Some(c))?;
    Ok(code)
}

/// `vm checkpoint rm NAME C`: its pages are folded into its children first.
pub fn remove(store: &Store, name: &VmName, c: &str, json: bool) -> Result<u8, Failure> {
    let _cmd = store.lock(name).map_err(store_err)?;
    let dir = root(store, name);
    if !checkpoint::valid_name(c) || !dir.join(c).is_dir() {
        return Err(usage(anyhow!("VM '{name}' has no checkpoint '{c}'")));
    }
    let meta = checkpoint::read_meta(&dir.join(c)).map_err(runtime)?;
    for child in list(&dir).iter().filter(|m| m.parent.as_deref() == Some(c)) {
        let staged = dir.join(format!("{}.tmp", child.name));
        let _ = std::fs::remove_dir_all(&staged);
        checkpoint::fold_into_child(
            &dir.join(c),
            &dir.join(&child.name),
            &staged,
            meta.parent.clone(),
        )
        .map_err(runtime)?;
        nestvm_snapshot::atomic::publish_dir(&staged, &dir.join(&child.name)).map_err(runtime)?;
    }
    let was_current =
        std::fs::read_to_string(current_file(store, name)).is_ok_and(|s| s.trim() == c);
    std::fs::remove_dir_all(dir.join(c)).map_err(runtime)?;
    if was_current {
        set_current(store, name, meta.parent.as_deref())?;
    }
    crate::report(
        json,
        &format!("removed checkpoint '{c}' of VM '{name}'"),
        serde_json::json!({"vm": name.as_str(), "result": "removed", "checkpoint": c}),
    );
    Ok(0)
}
