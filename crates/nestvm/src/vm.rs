//! `nestvm vm ...`: VM definitions in the state directory, and
//! `vm enable-nested` (the reference document's Enable-NestedVm).

use std::io::{BufRead, IsTerminal, Write};
use std::path::{Path, PathBuf};

use anyhow::anyhow;
use clap::Subcommand;
use nestvm_manager::{Store, StoreError, VmName, VmState};
use nestvm_vmm::config::{format_size, NestedMode, Overrides, VmConfig};
use serde::Serialize;

use crate::{runtime, usage, Failure, SettingsArgs};

/// The memory the reference document asks of a VM that hosts VMs.
const NESTING_MEMORY: u64 = 4 << 30;

#[derive(Subcommand)]
pub enum VmCmd {
    /// Define a new VM, with the same settings as `nestvm run`.
    New {
        /// The VM's name.
        name: String,
        #[command(flatten)]
        settings: SettingsArgs,
    },
    /// List the VMs.
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show a VM's settings and state.
    Show {
        /// The VM's name.
        name: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Change a VM's settings (refused while it runs).
    Set {
        /// The VM's name.
        name: String,
        #[command(flatten)]
        settings: SettingsArgs,
    },
    /// Remove a VM (refused while it runs; --force also drops its saved state and checkpoints).
    Rm {
        /// The VM's name.
        name: String,
        /// Also remove a saved state and checkpoints.
        #[arg(long)]
        force: bool,
    },
    /// Set a VM up to host VMs: list the changes, ask once, apply.
    EnableNested {
        /// The VM's name.
        name: String,
        /// Apply without asking.
        #[arg(long)]
        yes: bool,
        /// Leave memory as it is even if below 4 GiB.
        #[arg(long)]
        keep_memory: bool,
    },
}

fn store_err(e: StoreError) -> Failure {
    match e {
        StoreError::Name(_)
        | StoreError::Exists(_)
        | StoreError::NotFound(_)
        | StoreError::Config { .. } => usage(e),
        _ => runtime(e),
    }
}

fn vm_name(s: &str) -> Result<VmName, Failure> {
    VmName::new(s).map_err(usage)
}

/// Makes file settings absolute and checks they can be read (the kernel
/// must be a kernel), so a definition never points at nothing.
fn checked(mut over: Overrides) -> Result<Overrides, Failure> {
    let check = |p: &Path, what: &str| -> Result<PathBuf, Failure> {
        let abs = std::fs::canonicalize(p)
            .map_err(|e| usage(anyhow!("cannot read {what} {}: {e}", p.display())))?;
        std::fs::File::open(&abs)
            .map_err(|e| usage(anyhow!("cannot read {what} {}: {e}", p.display())))?;
        Ok(abs)
    };
    if let Some(k) = over.kernel.take() {
        let abs = check(&k, "kernel")?;
        let mut f = std::fs::File::open(&abs).map_err(runtime)?;
        nestvm_arch::boot::detect_format(&mut f, &abs).map_err(usage)?;
        over.kernel = Some(abs);
    }
    if let Some(i) = over.initrd.take() {
        over.initrd = Some(check(&i, "initrd")?);
    }
    Ok(over)
}

/// The state word shown to users.
pub fn state_word(s: VmState) -> &'static str {
    match s {
        VmState::Off => "Off",
        VmState::Saved => "Saved",
        VmState::Live => "Running",
    }
}

fn nested_word(n: NestedMode) -> &'static str {
    match n {
        NestedMode::Auto => "auto",
        NestedMode::On => "on",
        NestedMode::Off => "off",
    }
}

#[derive(Serialize)]
struct VmView {
    name: String,
    state: &'static str,
    kernel: PathBuf,
    initrd: Option<PathBuf>,
    cmdline: String,
    cpus: u32,
    memory: String,
    nested: &'static str,
}

fn view(name: &VmName, state: VmState, c: &VmConfig) -> VmView {
    VmView {
        name: name.to_string(),
        state: state_word(state),
        kernel: c.kernel.clone(),
        initrd: c.initrd.clone(),
        cmdline: c.cmdline.clone(),
        cpus: c.cpus,
        memory: format_size(c.memory),
        nested: nested_word(c.nested),
    }
}

fn print_json(v: &impl Serialize) -> Result<(), Failure> {
    println!("{}", serde_json::to_string_pretty(v).map_err(runtime)?);
    Ok(())
}

pub fn run(store: Store, cmd: VmCmd) -> Result<u8, Failure> {
    match cmd {
        VmCmd::New { name, settings } => {
            let name = vm_name(&name)?;
            let over = checked(settings.overrides()?)?;
            let config = VmConfig::resolve(None, over).map_err(usage)?;
            store.create(&name, &config).map_err(store_err)?;
            println!("created VM '{name}' in {}", store.vm_dir(&name).display());
        }
        VmCmd::List { json } => {
            let mut rows = vec![];
            for name in store.list().map_err(store_err)? {
                let config = store.load(&name).map_err(store_err)?;
                rows.push(view(&name, store.state(&name), &config));
            }
            if json {
                print_json(&rows)?;
            } else if rows.is_empty() {
                println!(
                    "no VMs in {} ('nestvm vm new NAME --kernel FILE' makes one)",
                    store.root().display()
                );
            } else {
                println!(
                    "{:<20} {:<8} {:>4} {:>7} {:<6} KERNEL",
                    "NAME", "STATE", "CPUS", "MEMORY", "NESTED"
                );
                for r in rows {
                    println!(
                        "{:<20} {:<8} {:>4} {:>7} {:<6} {}",
                        r.name,
                        r.state,
                        r.cpus,
                        r.memory,
                        r.nested,
                        r.kernel.display()
                    );
                }
            }
        }
        VmCmd::Show { name, json } => {
            let name = vm_name(&name)?;
            let config = store.load(&name).map_err(store_err)?;
            let v = view(&name, store.state(&name), &config);
            if json {
                print_json(&v)?;
            } else {
                println!(
                    "name:    {}\nstate:   {}\nkernel:  {}",
                    v.name,
                    v.state,
                    v.kernel.display()
                );
                if let Some(i) = &v.initrd {
                    println!("initrd:  {}", i.display());
                }
                println!(
                    "cmdline: {}\ncpus:    {}\nmemory:  {}\nnested:  {}\ndir:     {}",
                    v.cmdline,
                    v.cpus,
                    v.memory,
                    v.nested,
                    store.vm_dir(&name).display()
                );
            }
        }
        VmCmd::Set { name, settings } => {
            let name = vm_name(&name)?;
            let over = checked(settings.overrides()?)?;
            store.set(&name, over).map_err(store_err)?;
            println!("updated VM '{name}'");
        }
        VmCmd::Rm { name, force } => {
            let name = vm_name(&name)?;
            store.remove(&name, force).map_err(store_err)?;
            println!("removed VM '{name}'");
        }
        VmCmd::EnableNested {
            name,
            yes,
            keep_memory,
        } => return enable_nested(&store, &vm_name(&name)?, yes, keep_memory),
    }
    Ok(0)
}

fn enable_nested(
    store: &Store,
    name: &VmName,
    yes: bool,
    keep_memory: bool,
) -> Result<u8, Failure> {
    let _held = store.lock(name).map_err(store_err)?;
    let config = store.load(name).map_err(store_err)?;
    let state = store.state(name);
    if state == VmState::Live {
        return Err(runtime(anyhow!(
            "VM '{name}' is running: stop it first, then run 'nestvm vm enable-nested {name}' again"
        )));
    }
    let saved = store.vm_dir(name).join("saved");
    let mut steps = vec![];
    let mut over = Overrides::default();
    let discard_saved =
        state == VmState::Saved && saved.exists() && config.nested != NestedMode::On;
    if discard_saved {
        steps.push(
            "discard its saved state: it was taken without nesting and cannot resume with it"
                .to_owned(),
        );
    }
    if config.nested != NestedMode::On {
        steps.push(format!(
            "expose VT-x/AMD-V to it (nested: {} -> on)",
            nested_word(config.nested)
        ));
        over.nested = Some(NestedMode::On);
    }
    if config.memory < NESTING_MEMORY && !keep_memory {
        steps.push(format!(
            "raise its memory from {} to 4G, the guidance for a VM that hosts VMs (--keep-memory skips this)",
            format_size(config.memory)
        ));
        over.memory = Some("4G".into());
    }
    let host = nestvm_host::evaluate(&nestvm_host::gather());
    if steps.is_empty() {
        println!("VM '{name}' is already set up to host VMs; nothing changed");
        if let Some(why) = host.blocker_line() {
            println!("note: this host cannot nest now: {why}");
        }
        return Ok(0);
    }
    println!("nestvm vm enable-nested {name} will:");
    for s in &steps {
        println!("  - {s}");
    }
    if let Some(why) = host.blocker_line() {
        println!(
            "note: this host cannot nest now ({why}); the VM will be refused at start until it can"
        );
    }
    if !yes {
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
        if !matches!(answer.trim(), "y" | "Y" | "yes" | "YES") {
            println!("cancelled: nothing changed");
            return Ok(1);
        }
    }
    if discard_saved {
        std::fs::remove_dir_all(&saved)
            .map_err(|e| runtime(anyhow!("cannot remove {}: {e}", saved.display())))?;
    }
    let next = config.with(over).map_err(usage)?;
    store.write_definition(name, &next).map_err(store_err)?;
    println!(
        "done: VM '{name}' has nested = on and {} of memory",
        format_size(next.memory)
    );
    Ok(0)
}
