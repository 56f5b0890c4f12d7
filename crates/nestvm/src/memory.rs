//! Dynamic memory from the command line: `vm memory NAME` shows a running
//! VM's balloon (its range, target, current size and the guest's own
//! figures); `vm resize NAME SIZE|auto` changes its memory while it runs
//! and waits until the guest has followed.

use std::time::{Duration, Instant};

use anyhow::anyhow;
use nestvm_manager::{Store, VmName, VmState};
use nestvm_vmm::api::call;

use crate::managed::paths;
use crate::vm::store_err;
use crate::{runtime, usage, Failure};

const API_TIMEOUT: Duration = Duration::from_secs(10);

fn mib(v: &serde_json::Value) -> u64 {
    v.as_u64().unwrap_or(0) >> 20
}

fn running(store: &Store, name: &VmName) -> Result<(), Failure> {
    store.load(name).map_err(store_err)?;
    if store.state(name) != VmState::Live {
        return Err(usage(anyhow!(
            "VM '{name}' is not running: its memory is its definition's ('nestvm vm show {name}')"
        )));
    }
    Ok(())
}

fn get(
    store: &Store,
    name: &VmName,
    method: &str,
    path: &str,
) -> Result<serde_json::Value, Failure> {
    match call(&paths(store, name).control, method, path, API_TIMEOUT) {
        Ok((200, v)) => Ok(v),
        Ok((409, v)) => Err(usage(anyhow!(
            "{}",
            v["error"].as_str().unwrap_or("refused")
        ))),
        Ok((_, v)) => Err(runtime(anyhow!(
            "{}",
            v["error"].as_str().unwrap_or("refused")
        ))),
        Err(e) => Err(runtime(anyhow!("VM '{name}' did not answer: {e}"))),
    }
}

fn describe(name: &VmName, v: &serde_json::Value) -> String {
    let s = &v["stats"];
    let guest = match (s["total"].as_u64(), s["available"].as_u64()) {
        (Some(t), Some(a)) => format!(
            "; the guest sees {} MiB, {} MiB available",
            t >> 20,
            a >> 20
        ),
        _ => "; no figures from the guest yet (is its virtio_balloon driver loaded?)".into(),
    };
    format!(
        "VM '{name}': {} MiB now, target {} MiB ({}), range {}-{} MiB, {} MiB freed from free-page reports{guest}",
        mib(&v["current"]),
        mib(&v["target"]),
        if v["auto"] == true { "follows demand" } else { "fixed" },
        mib(&v["min"]),
        mib(&v["max"]),
        mib(&v["reported"]),
    )
}

/// `vm memory`.
pub fn show(store: &Store, name: &VmName, json: bool) -> Result<u8, Failure> {
    running(store, name)?;
    let v = get(store, name, "GET", "/v1/vm/memory")?;
    crate::report(json, &describe(name, &v), v.clone());
    Ok(0)
}

/// `vm resize`: `size` is bytes, or `None` for the automatic policy.
pub fn resize(
    store: &Store,
    name: &VmName,
    size: Option<u64>,
    wait: Duration,
    json: bool,
) -> Result<u8, Failure> {
    let _cmd = store.lock(name).map_err(store_err)?;
    running(store, name)?;
    let arg = size.map_or("auto".to_owned(), |s| s.to_string());
    let mut v = get(store, name, "PUT", &format!("/v1/vm/memory?size={arg}"))?;
    let start = Instant::now();
    if size.is_some() {
        // The guest's driver hands pages over (or takes them back) at its pace.
        while v["current"] != v["target"] && start.elapsed() < wait {
            std::thread::sleep(Duration::from_millis(200));
            v = get(store, name, "GET", "/v1/vm/memory")?;
        }
        if v["current"] != v["target"] {
            return Err(runtime(anyhow!(
                "VM '{name}' is at {} MiB after {wait:?}, not the {} MiB asked (its guest may not load virtio_balloon, or cannot give that much back)",
                mib(&v["current"]),
                mib(&v["target"])
            )));
        }
    }
    crate::report(json, &describe(name, &v), v.clone());
    Ok(0)
}
