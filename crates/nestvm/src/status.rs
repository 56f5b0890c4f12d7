//! `nestvm status`: the reference document's Get-NestedVirtStatus as a
//! whole — the host verdict, then for each VM whether it can host VMs now
//! and every reason it cannot.

use nestvm_manager::{Store, VmName};
use nestvm_vmm::config::NestedMode;
use serde::Serialize;

use crate::common::{print_json, runtime, Failure};
use crate::control::live_state;

#[derive(Serialize)]
struct VmStatus {
    name: String,
    state: &'static str,
    nested: NestedMode,
    can_host_vms: bool,
    /// Whether its guest agent answers (running VMs with a vsock device):
    /// what `vm exec` needs to install a hypervisor in it.
    #[serde(skip_serializing_if = "Option::is_none")]
    agent: Option<bool>,
    reasons: Vec<String>,
    notes: Vec<String>,
}

#[derive(Serialize)]
struct Status {
    host: nestvm_host::HostReport,
    vms: Vec<VmStatus>,
}

pub fn run(store: &Store, json: bool) -> Result<u8, Failure> {
    let host = nestvm_host::evaluate(&nestvm_host::gather());
    let mut vms = vec![];
    for name in store.list().map_err(runtime)? {
        vms.push(vm_status(store, &name, &host));
    }
    let status = Status { host, vms };
    if json {
        print_json(&status)?;
    } else {
        print_table(&status);
    }
    Ok(0)
}

/// Whether VM `name` can host VMs on this `host`, and why not.
fn vm_status(store: &Store, name: &VmName, host: &nestvm_host::HostReport) -> VmStatus {
    let (mut reasons, mut notes) = (vec![], vec![]);
    let state = live_state(store, name);
    let mut agent = None;
    let nested = match store.load(name) {
        Ok(config) => {
            agent = agent_note(store, name, &config, state, &mut notes);
            if config.nested == NestedMode::Off {
                reasons.push(format!(
                    "VT-x/AMD-V are not exposed to it (nested = off): run 'nestvm vm enable-nested {name}'"
                ));
            } else if !host.can_nest {
                reasons.push(format!(
                    "the host cannot nest: {}",
                    host.blocker_line().unwrap_or_default()
                ));
            }
            if config.memory < 4 << 30 {
                notes.push("less than the 4 GiB guidance for a VM that hosts VMs".into());
            }
            // The reference document's networking rule: guests bridged
            // inside this VM send from their own MACs, which the adapter
            // drops unless MAC spoofing is on.
            if config.nested != NestedMode::Off {
                if config.nets.is_empty() {
                    notes.push("no network adapter: its own guests will have no network".into());
                }
                // A user-mode adapter is passt's: its own guests get their
                // network from their own user-mode adapters, not through it.
                for n in config.nets.iter().filter(|n| !n.user && !n.mac_spoofing) {
                    notes.push(format!(
                        "adapter on TAP {} has mac_spoofing off: its own guests get no network through it ('nestvm vm set {name} --net tap={},mac_spoofing=on')",
                        n.tap, n.tap
                    ));
                }
            }
            config.nested
        }
        Err(e) => {
            reasons.push(format!("its definition is unreadable: {e}"));
            NestedMode::Off
        }
    };
    VmStatus {
        name: name.to_string(),
        state,
        nested,
        can_host_vms: reasons.is_empty(),
        agent,
        reasons,
        notes,
    }
}

/// Whether a running VM's guest agent answers (`vm exec`, the reference's
/// Invoke-Command), with a note saying so or how to get one.
fn agent_note(
    store: &Store,
    name: &VmName,
    config: &nestvm_vmm::VmConfig,
    state: &str,
    notes: &mut Vec<String>,
) -> Option<bool> {
    if state != "Running" {
        return None;
    }
    let Some(vsock) = &config.vsock else {
        notes.push(format!(
            "no vsock device, so no 'vm exec' into it ('nestvm vm set {name} --vsock cid=3', then restart it)"
        ));
        return None;
    };
    let answers = crate::guest::agent_answers(store, name, state);
    notes.push(match answers {
        Some(true) => "guest agent answers: 'nestvm vm exec' and 'vm cp' work".into(),
        _ => format!(
            "no guest agent answers: install Debian's qemu-guest-agent in the guest and run 'qemu-ga -m vsock-listen -p {}:{}' there",
            vsock.cid,
            nestvm_vmm::agent::DEFAULT_PORT
        ),
    });
    answers
}

/// The status as a table, for people.
fn print_table(status: &Status) {
    match status.host.blocker_line() {
        None => println!(
            "Host: YES, this host can nest (nestvm's guests run at level {})",
            status.host.guest_level
        ),
        Some(why) => println!("Host: NO: {why}"),
    }
    if status.vms.is_empty() {
        println!("No VMs ('nestvm vm new NAME --kernel FILE' makes one).");
        return;
    }
    println!(
        "\n{:<20} {:<8} {:<6} {:<13} WHY NOT",
        "VM", "STATE", "NESTED", "CAN HOST VMS"
    );
    for v in &status.vms {
        let first = v.reasons.first().map_or("-", String::as_str);
        println!(
            "{:<20} {:<8} {:<6} {:<13} {first}",
            v.name,
            v.state,
            v.nested.as_str(),
            if v.can_host_vms { "yes" } else { "no" }
        );
        for r in v.reasons.iter().skip(1) {
            println!("{:<50} {r}", "");
        }
        for n in &v.notes {
            println!("{:<50} note: {n}", "");
        }
    }
}
