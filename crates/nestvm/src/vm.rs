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
    List,
    /// Show a VM's settings and state.
    Show {
        /// The VM's name.
        name: String,
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
    /// Start a VM in the background (one nestvm process per VM).
    Start {
        /// The VM's name.
        name: String,
    },
    /// Ask the guest to power off (ACPI power button); stop it hard after --timeout.
    Stop {
        /// The VM's name.
        name: String,
        /// Seconds to wait for the guest before a hard stop.
        #[arg(long, default_value_t = 30)]
        timeout: u64,
    },
    /// Stop a VM at once.
    Kill {
        /// The VM's name.
        name: String,
    },
    /// Pause every vCPU of a running VM.
    Pause {
        /// The VM's name.
        name: String,
    },
    /// Resume a paused VM.
    Resume {
        /// The VM's name.
        name: String,
    },
    /// Save a running or paused VM (state and memory) and stop it; `vm start` resumes it.
    Save {
        /// The VM's name.
        name: String,
    },
    /// Drop a VM's saved state, so it starts fresh next time.
    DiscardSaved {
        /// The VM's name.
        name: String,
    },
    /// Attach to a running VM's serial console (Ctrl-] detaches).
    Console {
        /// The VM's name.
        name: String,
    },
    /// Run a VM's VMM in this process (what `vm start` runs, detached).
    #[command(hide = true)]
    Serve {
        /// The VM's name.
        name: String,
        /// Build it from this checkpoint.
        #[arg(long)]
        checkpoint: Option<String>,
        /// Wait on HOST:PORT for the VM to arrive by migration.
        #[arg(long, value_name = "HOST:PORT")]
        incoming: Option<String>,
        /// The shared migration token (with --incoming).
        #[arg(long, value_name = "FILE")]
        token_file: Option<std::path::PathBuf>,
        /// Seconds to wait for the sender (with --incoming).
        #[arg(long, default_value_t = 600)]
        wait: u64,
    },
    /// Move a running VM to a 'nestvm vm receive' on another host (live: it keeps running during the copy).
    Migrate {
        /// The VM's name.
        name: String,
        /// Where the receiver listens.
        #[arg(long, value_name = "HOST:PORT")]
        to: String,
        /// The shared token; the receiver wrote it.
        #[arg(long, value_name = "FILE")]
        token_file: std::path::PathBuf,
        /// The longest pause allowed for the final copy.
        #[arg(long, default_value = "50ms", value_parser = crate::migrate::parse_duration)]
        max_downtime: std::time::Duration,
        /// The most the memory copy may send per second while the VM runs (e.g. 100M, 512K; no cap when absent or 0).
        #[arg(long, value_name = "RATE", value_parser = crate::migrate::parse_rate)]
        max_bandwidth: Option<u64>,
        /// Have the destination check a digest of all guest memory before it resumes the VM (adds downtime).
        #[arg(long)]
        verify: bool,
    },
    /// Show a running VM's memory: its balloon's range and target, and the guest's figures.
    Memory {
        /// The VM's name.
        name: String,
    },
    /// Change a running VM's memory (it needs a balloon: --balloon): SIZE, or auto to follow its demand.
    Resize {
        /// The VM's name.
        name: String,
        /// e.g. 1G, or auto.
        size: String,
        /// Seconds to wait for the guest to follow.
        #[arg(long, default_value_t = 120)]
        wait: u64,
    },
    /// Wait for a VM migrated from another host, and run it here under NAME.
    Receive {
        /// The name it gets here (no VM here may have it).
        name: String,
        /// Where to listen.
        #[arg(long, value_name = "HOST:PORT")]
        listen: String,
        /// The shared token; a new one is written if the file does not exist.
        #[arg(long, value_name = "FILE")]
        token_file: std::path::PathBuf,
        /// Seconds to wait for the sender.
        #[arg(long, default_value_t = 600)]
        wait: u64,
    },
    /// Take a checkpoint of a running or paused VM ('vm checkpoint rm NAME C' removes one).
    Checkpoint {
        /// NAME, or: rm NAME C.
        #[arg(num_args = 1..=3, value_name = "NAME")]
        args: Vec<String>,
        /// The checkpoint's name [default: checkpoint-N].
        #[arg(long = "name")]
        checkpoint: Option<String>,
    },
    /// Show a VM's checkpoints as a tree.
    Checkpoints {
        /// The VM's name.
        name: String,
    },
    /// Return a VM to a checkpoint and run it from there.
    Restore {
        /// The VM's name.
        name: String,
        /// The checkpoint.
        checkpoint: String,
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
        /// Seconds a running guest gets to power off before a hard stop.
        #[arg(long, default_value_t = 60)]
        timeout: u64,
    },
}

pub(crate) fn store_err(e: StoreError) -> Failure {
    match e {
        StoreError::Name(_)
        | StoreError::Exists(_)
        | StoreError::NotFound(_)
        | StoreError::Config { .. }
        | StoreError::HasSavedState(_) => usage(e),
        _ => runtime(e),
    }
}

fn vm_name(s: &str) -> Result<VmName, Failure> {
    VmName::new(s).map_err(usage)
}

/// Makes file settings absolute and checks they can be read (the kernel
/// must be a kernel), so a definition never points at nothing; gives each
/// network adapter without a MAC one derived from the VM's name, stored so
/// it never changes.
fn checked(mut over: Overrides, name: &VmName) -> Result<Overrides, Failure> {
    // A regular file that can be read (opened without blocking: a FIFO
    // would wait for a writer forever).
    let check = |p: &Path, what: &str| -> Result<PathBuf, Failure> {
        let cannot = |e: std::io::Error| usage(anyhow!("cannot read {what} {}: {e}", p.display()));
        let abs = std::fs::canonicalize(p).map_err(cannot)?;
        nestvm_arch::boot::open_regular(&abs).map_err(cannot)?;
        Ok(abs)
    };
    if let Some(k) = over.kernel.take() {
        let abs = check(&k, "kernel")?;
        crate::run::open_kernel(&abs)?;
        over.kernel = Some(abs);
    }
    if let Some(i) = over.initrd.take() {
        over.initrd = Some(check(&i, "initrd")?);
    }
    for d in over.disks.iter_mut().flatten() {
        d.path = check(&d.path, "disk image")?;
    }
    for (i, n) in over.nets.iter_mut().flatten().enumerate() {
        if n.mac.is_none() {
            let mac = nestvm_virtio::net::derived_mac(&format!("{name}/{i}"));
            n.mac = Some(nestvm_virtio::net::format_mac(&mac));
        }
    }
    Ok(over)
}

#[derive(Serialize)]
struct VmView {
    name: String,
    state: &'static str,
    /// The end of the VMM's log, when the VM is Off (why it ended).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    last_log: Vec<String>,
    kernel: PathBuf,
    initrd: Option<PathBuf>,
    cmdline: String,
    cpus: u32,
    memory: String,
    nested: &'static str,
    disks: Vec<nestvm_vmm::adapters::DiskConfig>,
    nets: Vec<nestvm_vmm::adapters::NetConfig>,
    balloon: Option<nestvm_vmm::adapters::BalloonConfig>,
    /// The VM's outgoing migration, while one runs or after one failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    migration: Option<nestvm_vmm::migration::Progress>,
}

fn view(store: &Store, name: &VmName, c: &VmConfig) -> VmView {
    let state = crate::managed::live_state(store, name);
    let last_log = if state == "Off" {
        crate::managed::tail(&crate::managed::paths(store, name).log, 5)
    } else {
        vec![]
    };
    VmView {
        name: name.to_string(),
        state,
        last_log,
        kernel: c.kernel.clone(),
        initrd: c.initrd.clone(),
        cmdline: c.cmdline.clone(),
        cpus: c.cpus,
        memory: format_size(c.memory),
        nested: c.nested.as_str(),
        disks: c.disks.clone(),
        nets: c.nets.clone(),
        balloon: c.balloon.clone(),
        migration: match state {
            "Off" | "Saved" => None,
            _ => crate::migrate::progress(store, name),
        },
    }
}

fn print_json(v: &impl Serialize) -> Result<(), Failure> {
    println!("{}", serde_json::to_string_pretty(v).map_err(runtime)?);
    Ok(())
}

pub fn run(store: Store, cmd: VmCmd, json: bool) -> Result<u8, Failure> {
    match cmd {
        VmCmd::New { name, settings } => {
            let name = vm_name(&name)?;
            let over = checked(settings.overrides()?, &name)?;
            let config = VmConfig::resolve(None, over).map_err(usage)?;
            store.create(&name, &config).map_err(store_err)?;
            crate::report(
                json,
                &format!("created VM '{name}' in {}", store.vm_dir(&name).display()),
                serde_json::json!({"vm": name.as_str(), "result": "created", "dir": store.vm_dir(&name)}),
            );
        }
        VmCmd::List => {
            let mut rows = vec![];
            for name in store.list().map_err(store_err)? {
                let config = store.load(&name).map_err(store_err)?;
                rows.push(view(&store, &name, &config));
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
        VmCmd::Show { name } => {
            let name = vm_name(&name)?;
            let config = store.load(&name).map_err(store_err)?;
            let v = view(&store, &name, &config);
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
                for d in &v.disks {
                    let ro = if d.readonly { " (read-only)" } else { "" };
                    println!("disk:    {}{ro}", d.path.display());
                }
                for n in &v.nets {
                    println!(
                        "net:     tap {} mac {} mac_spoofing {}",
                        n.tap,
                        n.mac.as_deref().unwrap_or("(derived)"),
                        if n.mac_spoofing { "on" } else { "off" }
                    );
                }
                if let Some(b) = &v.balloon {
                    println!(
                        "balloon: down to {}{}",
                        b.min,
                        if b.dynamic { ", follows demand" } else { "" }
                    );
                }
                if let Some(m) = &v.migration {
                    println!(
                        "migration: {:?} to {}: {}",
                        m.phase,
                        m.to,
                        crate::migrate::progress_line(m)
                    );
                }
                if !v.last_log.is_empty() {
                    println!("last VMM log lines:");
                    for l in &v.last_log {
                        println!("  {l}");
                    }
                }
            }
        }
        VmCmd::Set { name, settings } => {
            let name = vm_name(&name)?;
            if store.state(&name) == nestvm_manager::VmState::Saved {
                return Err(usage(anyhow!(
                    "VM '{name}' has a saved state, which keeps the settings it was saved with: 'nestvm vm start {name}' and stop it, or 'nestvm vm discard-saved {name}', then change it"
                )));
            }
            let over = checked(settings.overrides()?, &name)?;
            store.set(&name, over).map_err(store_err)?;
            crate::report(
                json,
                &format!("updated VM '{name}'"),
                serde_json::json!({"vm": name.as_str(), "result": "updated"}),
            );
        }
        VmCmd::Rm { name, force } => {
            let name = vm_name(&name)?;
            store.remove(&name, force).map_err(store_err)?;
            crate::report(
                json,
                &format!("removed VM '{name}'"),
                serde_json::json!({"vm": name.as_str(), "result": "removed"}),
            );
        }
        VmCmd::EnableNested {
            name,
            yes,
            keep_memory,
            timeout,
        } => {
            let timeout = std::time::Duration::from_secs(timeout);
            return enable_nested(&store, &vm_name(&name)?, yes, keep_memory, timeout, json);
        }
        VmCmd::Start { name } => return crate::managed::start(&store, &vm_name(&name)?, json),
        VmCmd::Stop { name, timeout } => {
            return crate::managed::stop(
                &store,
                &vm_name(&name)?,
                std::time::Duration::from_secs(timeout),
                json,
            )
        }
        VmCmd::Kill { name } => return crate::managed::kill(&store, &vm_name(&name)?, json),
        VmCmd::Pause { name } => {
            return crate::managed::pause_resume(&store, &vm_name(&name)?, true, json)
        }
        VmCmd::Resume { name } => {
            return crate::managed::pause_resume(&store, &vm_name(&name)?, false, json)
        }
        VmCmd::Console { name } => return crate::attach::attach(&store, &vm_name(&name)?),
        VmCmd::Save { name } => return crate::saved::save(&store, &vm_name(&name)?, json),
        VmCmd::DiscardSaved { name } => {
            return crate::saved::discard(&store, &vm_name(&name)?, json)
        }
        VmCmd::Serve {
            name,
            checkpoint,
            incoming,
            token_file,
            wait,
        } => {
            let from = match (checkpoint, incoming, token_file) {
                (Some(c), None, _) => crate::managed::From::Checkpoint(c),
                (None, Some(listen), Some(token_file)) => crate::managed::From::Incoming {
                    listen,
                    token_file,
                    wait: std::time::Duration::from_secs(wait),
                },
                (None, None, _) => crate::managed::From::Definition,
                _ => {
                    return Err(usage(anyhow!(
                        "--incoming needs --token-file, and excludes --checkpoint"
                    )))
                }
            };
            return crate::managed::serve(&store, &vm_name(&name)?, from);
        }
        VmCmd::Migrate {
            name,
            to,
            token_file,
            max_downtime,
            max_bandwidth,
            verify,
        } => {
            let limits = crate::migrate::Limits {
                max_downtime,
                max_bandwidth: max_bandwidth.filter(|&b| b > 0),
                verify,
            };
            return crate::migrate::migrate(
                &store,
                &vm_name(&name)?,
                &to,
                &token_file,
                limits,
                json,
            );
        }
        VmCmd::Memory { name } => return crate::memory::show(&store, &vm_name(&name)?, json),
        VmCmd::Resize { name, size, wait } => {
            let size = match size.as_str() {
                "auto" => None,
                s => Some(nestvm_vmm::config::parse_size(s).map_err(usage)?),
            };
            return crate::memory::resize(
                &store,
                &vm_name(&name)?,
                size,
                std::time::Duration::from_secs(wait),
                json,
            );
        }
        VmCmd::Receive {
            name,
            listen,
            token_file,
            wait,
        } => {
            return crate::migrate::receive(
                &store,
                &vm_name(&name)?,
                &listen,
                &token_file,
                std::time::Duration::from_secs(wait),
                json,
            )
        }
        VmCmd::Checkpoint { args, checkpoint } => {
            return match args
                .iter()
                .map(String::as_str)
                .collect::<Vec<_>>()
                .as_slice()
            {
                [vm] => crate::checkpoints::take(&store, &vm_name(vm)?, checkpoint, json),
                ["rm", vm, c] => crate::checkpoints::remove(&store, &vm_name(vm)?, c, json),
                _ => Err(usage(anyhow!(
                    "use 'nestvm vm checkpoint NAME [--name C]' or 'nestvm vm checkpoint rm NAME C'"
                ))),
            }
        }
        VmCmd::Checkpoints { name } => {
            return crate::checkpoints::show(&store, &vm_name(&name)?, json)
        }
        VmCmd::Restore { name, checkpoint } => {
            return crate::checkpoints::restore(&store, &vm_name(&name)?, &checkpoint, json)
        }
    }
    Ok(0)
}

fn enable_nested(
    store: &Store,
    name: &VmName,
    yes: bool,
    keep_memory: bool,
    stop_timeout: std::time::Duration,
    json: bool,
) -> Result<u8, Failure> {
    let _held = store.lock(name).map_err(store_err)?;
    let config = store.load(name).map_err(store_err)?;
    let state = store.state(name);
    let running = state == VmState::Live;
    let saved = store.vm_dir(name).join("saved");
    let mut steps = vec![];
    let mut over = Overrides::default();
    if running {
        steps.push(format!(
            "stop it: the ACPI power button, then a hard stop after {}s (settings only change while it is off)",
            stop_timeout.as_secs()
        ));
    }
    // A saved state resumes with the CPU it was saved with: one taken
    // without VT-x/AMD-V (or unreadable) can never host VMs, so it goes.
    let discard_saved = state == VmState::Saved
        && saved.exists()
        && nestvm_vmm::snapshot::load(&saved).map_or(true, |s| !s.nested);
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
    if config.memory < NESTING_MEMORY && !keep_memory {
        steps.push(format!(
            "raise its memory from {} to 4G, the guidance for a VM that hosts VMs (--keep-memory skips this)",
            format_size(config.memory)
        ));
        over.memory = Some("4G".into());
    }
    let host = nestvm_host::evaluate(&nestvm_host::gather());
    let host_note = host.blocker_line();
    if steps.is_empty() || (running && steps.len() == 1) {
        let mut text = format!("VM '{name}' is already set up to host VMs; nothing changed");
        if let Some(why) = &host_note {
            text.push_str(&format!("\nnote: this host cannot nest now: {why}"));
        }
        let value = serde_json::json!({"vm": name.as_str(), "steps": steps, "applied": false, "host_note": host_note});
        crate::report(json, &text, value);
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
    if running {
        let how = crate::managed::stop_locked(store, name, stop_timeout)?;
        if !json {
            println!("stopped VM '{name}' ({how:?})");
        }
    }
    if discard_saved {
        std::fs::remove_dir_all(&saved)
            .map_err(|e| runtime(anyhow!("cannot remove {}: {e}", saved.display())))?;
    }
    let next = config.with(over).map_err(usage)?;
    store.write_definition(name, &next).map_err(store_err)?;
    crate::report(
        json,
        &format!(
            "done: VM '{name}' has nested = on and {} of memory",
            format_size(next.memory)
        ),
        serde_json::json!({"vm": name.as_str(), "steps": steps, "applied": true, "host_note": host_note}),
    );
    Ok(0)
}
