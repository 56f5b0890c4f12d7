//! `nestvm vm ...`: the subcommands and their arguments, each handed to the
//! module that does the work (definitions: `definition`, enable-nested:
//! `nesting`, the VMM process: `managed` and `serve`, and `saved`,
//! `checkpoints`, `migrate`, `memory`, `attach`). Nothing here but argument
//! plumbing; no module below imports this one.

use std::time::Duration;

use anyhow::anyhow;
use clap::Subcommand;
use nestvm_manager::Store;

use crate::common::{usage, vm_name, Failure};
use crate::settings::SettingsArgs;
use crate::{attach, checkpoints, definition, managed, memory, migrate, nesting, saved, serve};

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
        /// The migration secret's file (with --incoming).
        #[arg(long, value_name = "FILE")]
        token_file: Option<std::path::PathBuf>,
        /// Seconds to wait for the sender (with --incoming).
        #[arg(long, default_value_t = 600)]
        wait: u64,
        /// Where the arriving VM's disks and TAPs are (with --incoming).
        #[command(flatten)]
        place: crate::migrate::PlaceArgs,
    },
    /// Move a running VM to a 'nestvm vm receive' on another host (live: it keeps running during the copy).
    Migrate {
        /// The VM's name.
        name: String,
        /// Where the receiver listens.
        #[arg(long, value_name = "HOST:PORT")]
        to: String,
        /// The migration secret's file, which 'vm receive' wrote (a secret: copy it securely).
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
        /// Never slow a guest that writes memory faster than the copy goes (by default its vCPUs nap a growing share of the time until the copy catches up).
        #[arg(long)]
        no_auto_converge: bool,
    },
    /// Run a command in a running guest, through its QEMU guest agent on the VM's vsock device; its output and exit code are this command's.
    Exec {
        /// The VM's name.
        name: String,
        /// The vsock port the guest agent listens on.
        #[arg(long, default_value_t = nestvm_vmm::agent::DEFAULT_PORT)]
        port: u32,
        /// How long the command may run: seconds, or with a unit (500ms, 90s).
        #[arg(long, default_value = "60", value_parser = crate::guest::parse_timeout)]
        timeout: std::time::Duration,
        /// The command and its arguments (after --).
        #[arg(last = true, required = true, value_name = "CMD")]
        command: Vec<String>,
    },
    /// Copy a file into or out of a running guest (NAME:/path on the guest's side), through its guest agent.
    Cp {
        /// From: a path here, or NAME:/path in the guest.
        from: String,
        /// To: NAME:/path in the guest, or a path here.
        to: String,
        /// The vsock port the guest agent listens on.
        #[arg(long, default_value_t = nestvm_vmm::agent::DEFAULT_PORT)]
        port: u32,
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
        /// The migration secret's file; a new random one is written (mode 0600) if there is none.
        #[arg(long, value_name = "FILE")]
        token_file: std::path::PathBuf,
        /// Seconds to wait for the sender.
        #[arg(long, default_value_t = 600)]
        wait: u64,
        /// Where the arriving VM's disks and TAPs are here.
        #[command(flatten)]
        place: crate::migrate::PlaceArgs,
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

/// Runs `nestvm vm CMD`: each subcommand's arguments handed to the
/// module that carries it out.
pub fn run(store: Store, cmd: VmCmd, json: bool) -> Result<u8, Failure> {
    let store = &store;
    match cmd {
        VmCmd::New { name, settings } => definition::new(store, &vm_name(&name)?, settings, json),
        VmCmd::List => definition::list(store, json),
        VmCmd::Show { name } => definition::show(store, &vm_name(&name)?, json),
        VmCmd::Set { name, settings } => definition::set(store, &vm_name(&name)?, settings, json),
        VmCmd::Rm { name, force } => definition::remove(store, &vm_name(&name)?, force, json),
        VmCmd::EnableNested {
            name,
            yes,
            keep_memory,
            timeout,
        } => {
            let how = nesting::How {
                yes,
                keep_memory,
                stop_timeout: secs(timeout),
            };
            nesting::enable(store, &vm_name(&name)?, how, json)
        }
        VmCmd::Start { name } => managed::start(store, &vm_name(&name)?, json),
        VmCmd::Stop { name, timeout } => {
            managed::stop(store, &vm_name(&name)?, secs(timeout), json)
        }
        VmCmd::Kill { name } => managed::kill(store, &vm_name(&name)?, json),
        VmCmd::Pause { name } => managed::pause_resume(store, &vm_name(&name)?, true, json),
        VmCmd::Resume { name } => managed::pause_resume(store, &vm_name(&name)?, false, json),
        VmCmd::Console { name } => attach::attach(store, &vm_name(&name)?),
        VmCmd::Save { name } => saved::save(store, &vm_name(&name)?, json),
        VmCmd::DiscardSaved { name } => saved::discard(store, &vm_name(&name)?, json),
        VmCmd::Serve {
            name,
            checkpoint,
            incoming,
            token_file,
            wait,
            place,
        } => {
            let from = serve_from(checkpoint, incoming, token_file, wait, &place)?;
            serve::serve(store, &vm_name(&name)?, from)
        }
        VmCmd::Migrate {
            name,
            to,
            token_file,
            max_downtime,
            max_bandwidth,
            verify,
            no_auto_converge,
        } => {
            let limits = migrate::Limits {
                max_downtime,
                max_bandwidth: max_bandwidth.filter(|&b| b > 0),
                verify,
                auto_converge: !no_auto_converge,
            };
            migrate::migrate(store, &vm_name(&name)?, &to, &token_file, limits, json)
        }
        VmCmd::Exec {
            name,
            port,
            timeout,
            command,
        } => crate::guest::exec(store, &vm_name(&name)?, port, timeout, &command),
        VmCmd::Cp { from, to, port } => crate::guest::copy(store, &from, &to, port, json),
        VmCmd::Memory { name } => memory::show(store, &vm_name(&name)?, json),
        VmCmd::Resize { name, size, wait } => {
            let size = match size.as_str() {
                "auto" => None,
                s => Some(nestvm_vmm::config::parse_size(s).map_err(usage)?),
            };
            memory::resize(store, &vm_name(&name)?, size, secs(wait), json)
        }
        VmCmd::Receive {
            name,
            listen,
            token_file,
            wait,
            place,
        } => migrate::receive(
            store,
            &vm_name(&name)?,
            migrate::Receiving {
                listen: &listen,
                token_file: &token_file,
                wait: secs(wait),
                place: &place,
            },
            json,
        ),
        VmCmd::Checkpoint { args, checkpoint } => checkpoint_cmd(store, &args, checkpoint, json),
        VmCmd::Checkpoints { name } => checkpoints::show(store, &vm_name(&name)?, json),
        VmCmd::Restore { name, checkpoint } => {
            checkpoints::restore(store, &vm_name(&name)?, &checkpoint, json)
        }
    }
}

/// Where `vm serve` takes its VM from.
fn serve_from(
    checkpoint: Option<String>,
    incoming: Option<String>,
    token_file: Option<std::path::PathBuf>,
    wait: u64,
    place: &crate::migrate::PlaceArgs,
) -> Result<serve::From, Failure> {
    match (checkpoint, incoming, token_file) {
        (Some(c), None, _) => Ok(serve::From::Checkpoint(c)),
        (None, Some(listen), Some(token_file)) => Ok(serve::From::Incoming {
            listen,
            token_file,
            wait: secs(wait),
            placement: place.placement()?,
        }),
        (None, None, _) => Ok(serve::From::Definition),
        _ => Err(usage(anyhow!(
            "--incoming needs --token-file, and excludes --checkpoint"
        ))),
    }
}

/// `vm checkpoint NAME [--name C]` and `vm checkpoint rm NAME C`.
fn checkpoint_cmd(
    store: &Store,
    args: &[String],
    checkpoint: Option<String>,
    json: bool,
) -> Result<u8, Failure> {
    match args
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .as_slice()
    {
        [vm] => checkpoints::take(store, &vm_name(vm)?, checkpoint, json),
        ["rm", vm, c] => checkpoints::remove(store, &vm_name(vm)?, c, json),
        _ => Err(usage(anyhow!(
            "use 'nestvm vm checkpoint NAME [--name C]' or 'nestvm vm checkpoint rm NAME C'"
        ))),
    }
}

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}
