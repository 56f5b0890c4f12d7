//! Dynamic memory from the command line: `vm memory NAME` shows a running
//! VM's balloon (its range, target, current size and the guest's own
//! figures); `vm resize NAME SIZE|auto` changes its memory while it runs
//! and waits until the guest has followed.

use std::time::{Duration, Instant};

use anyhow::anyhow;
use nestvm_manager::{Store, VmName, VmState};
use nestvm_vmm::balloon::MemoryInfo;

use crate::common::{report, runtime, store_err, usage, Failure};
use crate::control::{self, Answer, ReplyError, API_TIMEOUT};
use crate::vmdir::VmDir;

fn mib(bytes: u64) -> u64 {
    bytes >> 20
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

/// Asks the VM's balloon (a refusal for want of one, or of room, is the
/// user's to fix: exit 2).
fn get(store: &Store, name: &VmName, method: &str, path: &str) -> Result<MemoryInfo, Failure> {
    let socket = VmDir::of(store, name).control;
    match control::request(&socket, method, path, API_TIMEOUT, 200) {
        Ok(Answer::Done(v)) => Ok(v),
        Ok(Answer::Refused { status: 409, error }) => Err(usage(anyhow!(error))),
        Ok(Answer::Refused { error, .. }) => Err(runtime(anyhow!(error))),
        Err(e @ ReplyError::Undecodable(_)) => Err(runtime(anyhow!("VM '{name}': {e}"))),
        Err(ReplyError::Call(e)) => Err(runtime(anyhow!("VM '{name}' did not answer: {e}"))),
    }
}

fn describe(name: &VmName, v: &MemoryInfo) -> String {
    let guest = match (v.stats.get("total"), v.stats.get("available")) {
        (Some(t), Some(a)) => format!(
            "; the guest sees {} MiB, {} MiB available",
            t >> 20,
            a >> 20
        ),
        _ => "; no figures from the guest yet (is its virtio_balloon driver loaded?)".into(),
    };
    format!(
        "VM '{name}': {} MiB now, target {} MiB ({}), range {}-{} MiB, {} MiB freed from free-page reports{guest}",
        mib(v.current),
        mib(v.target),
        if v.auto { "follows demand" } else { "fixed" },
        mib(v.min),
        mib(v.max),
        mib(v.reported),
    )
}

/// Prints the balloon's state: the sentence, or with --json the reply.
fn print(json: bool, name: &VmName, v: &MemoryInfo) -> Result<(), Failure> {
    let value = serde_json::to_value(v).map_err(runtime)?;
    report(json, &describe(name, v), value);
    Ok(())
}

/// `vm memory`.
pub fn show(store: &Store, name: &VmName, json: bool) -> Result<u8, Failure> {
    running(store, name)?;
    let v = get(store, name, "GET", "/v1/vm/memory")?;
    print(json, name, &v)?;
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
        while v.current != v.target && start.elapsed() < wait {
            std::thread::sleep(Duration::from_millis(200));
            v = get(store, name, "GET", "/v1/vm/memory")?;
        }
        if v.current != v.target {
            return Err(runtime(anyhow!(
                "VM '{name}' is at {} MiB after {wait:?}, not the {} MiB asked (its guest may not load virtio_balloon, or cannot give that much back)",
                mib(v.current),
                mib(v.target)
            )));
        }
    }
    print(json, name, &v)?;
    Ok(0)
}
