//! `vm enable-nested` (the reference document's Enable-NestedVm): sets a
//! VM up to host VMs. It lists the changes (stop it if it runs, drop a
//! saved state taken without nesting, expose VT-x/AMD-V, raise memory to
//! the 4 GiB guidance), asks once, and applies them.

use std::io::{BufRead, IsTerminal, Write};
use std::time::Duration;

use anyhow::anyhow;
use nestvm_manager::{Store, VmName, VmState};
use nestvm_vmm::config::{format_size, NestedMode, Overrides, VmConfig};

use crate::common::{report, runtime, store_err, usage, Failure};
use crate::managed::stop_locked;
use crate::vmdir::VmDir;

/// The memory the reference document asks of a VM that hosts VMs.
const NESTING_MEMORY: u64 = 4 << 30;

/// How `vm enable-nested` may go.
pub struct How {
    /// Apply without asking.
    pub yes: bool,
    /// Leave memory as it is even if below the guidance.
    pub keep_memory: bool,
    /// How long a running guest gets to power off before a hard stop.
    pub stop_timeout: Duration,
}

/// What enable-nested would change.
struct Plan {
    steps: Vec<String>,
    over: Overrides,
    running: bool,
    discard_saved: bool,
}

fn plan(store: &Store, name: &VmName, config: &VmConfig, how: &How) -> Plan {
    let state = store.state(name);
    let running = state == VmState::Live;
    let saved = VmDir::of(store, name).saved;
    let mut steps = vec![];
    let mut over = Overrides::default();
    if running {
        steps.push(format!(
            "stop it: the ACPI power button, then a hard stop after {}s (settings only change while it is off)",
            how.stop_timeout.as_secs()
        ));
    }
    // A saved state resumes with the CPU it was saved with: one taken
    // without VT-x/AMD-V (or unreadable) can never host VMs, so it goes.
    let discard_saved = state == VmState::Saved
        && saved.exists()
        && nestvm_vmm::persist::load(&saved).map_or(true, |s| !s.nested);
    if discard_saved {
        steps.push(
            "discard its saved state: it was taken without nesting and cannot resume with it"
                .to_owned(),
        );
    }
    if config.nested != NestedMode::On {
        steps.push(format!(
            "expose VT-x/AMD-V to it (nested: {} -> on)",
            config.nested.as_str()
        ));
        over.nested = Some(NestedMode::On);
    }
    if config.memory < NESTING_MEMORY && !how.keep_memory {
        steps.push(format!(
            "raise its memory from {} to 4G, the guidance for a VM that hosts VMs (--keep-memory skips this)",
            format_size(config.memory)
        ));
        over.memory = Some("4G".into());
    }
    Plan {
        steps,
        over,
        running,
        discard_saved,
    }
}

/// Asks once on the terminal; whether the answer is yes.
fn confirmed() -> Result<bool, Failure> {
    let stdin = std::io::stdin();
    if !stdin.is_terminal() {
        return Err(usage(anyhow!(
            "not a terminal, so no question can be asked: add --yes to apply"
        )));
    }
    print!("Apply these changes? [y/N] ");
    let _ = std::io::stdout().flush();
    let mut answer = String::new();
    stdin.lock().read_line(&mut answer).map_err(runtime)?;
    Ok(matches!(answer.trim(), "y" | "Y" | "yes" | "YES"))
}

/// `vm enable-nested`.
pub fn enable(store: &Store, name: &VmName, how: How, json: bool) -> Result<u8, Failure> {
    let _held = store.lock(name).map_err(store_err)?;
    let config = store.load(name).map_err(store_err)?;
    let Plan {
        steps,
        over,
        running,
        discard_saved,
    } = plan(store, name, &config, &how);
    let host = nestvm_host::evaluate(&nestvm_host::gather());
    let host_note = host.blocker_line();
    if steps.is_empty() || (running && steps.len() == 1) {
        let mut text = format!("VM '{name}' is already set up to host VMs; nothing changed");
        if let Some(why) = &host_note {
            text.push_str(&format!("\nnote: this host cannot nest now: {why}"));
        }
        let value = serde_json::json!({"vm": name.as_str(), "steps": steps, "applied": false, "host_note": host_note});
        report(json, &text, value);
        return Ok(0);
    }
    if !json {
        println!("nestvm vm enable-nested {name} will:");
        for s in &steps {
            println!("  - {s}");
        }
        if let Some(why) = &host_note {
            println!("note: this host cannot nest now ({why}); the VM will be refused at start until it can");
        }
    }
    if !how.yes && !confirmed()? {
        println!("cancelled: nothing changed");
        return Ok(1);
    }
    if running {
        let stopped = stop_locked(store, name, how.stop_timeout)?;
        if !json {
            println!("stopped VM '{name}' ({stopped:?})");
        }
    }
    if discard_saved {
        let saved = VmDir::of(store, name).saved;
        std::fs::remove_dir_all(&saved)
            .map_err(|e| runtime(anyhow!("cannot remove {}: {e}", saved.display())))?;
    }
    let next = config.with(over).map_err(usage)?;
    store.write_definition(name, &next).map_err(store_err)?;
    report(
        json,
        &format!(
            "done: VM '{name}' has nested = on and {} of memory",
            format_size(next.memory)
        ),
        serde_json::json!({"vm": name.as_str(), "steps": steps, "applied": true, "host_note": host_note}),
    );
    Ok(0)
}
