//! `vm serve`: the detached VMM process of a managed VM, which `vm start`
//! and `vm receive` spawn (`managed::spawn_serve`). It holds the VM's run
//! lock for its whole life, builds the VM (from its saved state, a
//! checkpoint, an arriving migration, or its definition), serves its control
//! API and console on sockets in the VM's directory, and runs it.

use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::anyhow;
use nestvm_kvm::Hypervisor;
use nestvm_manager::lock;
use nestvm_manager::{Store, VmName};
use nestvm_vmm::console::{ConsoleHub, ConsoleServer};
use nestvm_vmm::logfile::RotatingFile;
use nestvm_vmm::{build, run, BuiltVm, VmConfig, VmOutcome};
use nestvm_vmm::{Console, RunOptions};

use crate::common::{runtime, store_err, Failure};
use crate::run::{build_failure, cannot_run_vms, resolve_nested};
use crate::vmdir::VmDir;

/// What `vm serve` builds the VM from.
pub enum From {
    /// Its saved state if it has one, else its definition.
    Definition,
    /// A checkpoint.
    Checkpoint(String),
    /// A migration arriving on `listen`.
    Incoming {
        /// `HOST:PORT`.
        listen: String,
        /// The migration secret's file.
        token_file: PathBuf,
        /// How long to wait for the sender.
        wait: Duration,
        /// Where its disks and TAPs are here.
        placement: nestvm_vmm::migration::placement::Placement,
    },
}

/// A private socket at `path`.
/// Says [`crate::common::SERVE_READY`], then points standard output at the log (standard
/// error): whoever waited may be gone, and nothing else is for it.
fn say_ready() {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(format!("{}\n", crate::common::SERVE_READY).as_bytes());
    let _ = out.flush();
    let _ = nix::unistd::dup2(2, 1);
}

fn bind(path: &Path) -> Result<UnixListener, Failure> {
    // Stale sockets of a VMM that died: we hold the run lock, so no live one uses them.
    let _ = std::fs::remove_file(path);
    let l = UnixListener::bind(path)
        .map_err(|e| runtime(anyhow!("cannot listen on {}: {e}", path.display())))?;
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o600))
        .map_err(runtime)?;
    Ok(l)
}

/// An arrived VM: whether it ran at the source, and the confirmation to
/// send once it runs here.
type Arrival = (bool, nestvm_vmm::migration::receive::Confirm);

/// Builds the VM as `from` says (`config` is its definition, `None` for an
/// arriving VM), its console going to `hub`; prints the nesting notice.
fn build_vm(
    store: &Store,
    name: &VmName,
    from: &From,
    config: Option<VmConfig>,
    hv: &Hypervisor,
    hub: &std::sync::Arc<ConsoleHub>,
) -> Result<(BuiltVm, Option<Arrival>), Failure> {
    let p = VmDir::of(store, name);
    let console = || Box::new(hub.writer());
    // A saved state or checkpoint must be of the VM its definition describes.
    let definition = config.as_ref();
    let vm = match from {
        From::Incoming {
            listen,
            token_file,
            wait,
            placement,
        } => {
            let terms = crate::migrate::Incoming {
                listen,
                token_file,
                wait: *wait,
                placement,
            };
            let arrived = crate::migrate::incoming(store, name, &terms, hv, console())?;
            return Ok((arrived.vm, Some((arrived.running, arrived.confirm))));
        }
        From::Checkpoint(c) => {
            let root = store.checkpoints(name).root().to_owned();
            let definition = definition.expect("loaded unless incoming");
            nestvm_vmm::persist::restore_checkpoint(&root, c, definition, hv, console()).map_err(
                |e| {
                    runtime(
                        anyhow::Error::new(e).context(format!("cannot restore checkpoint '{c}'")),
                    )
                },
            )?
        }
        From::Definition if p.saved.exists() => {
            let definition = definition.expect("loaded unless incoming");
            crate::saved::restore(&p.saved, definition, hv, console())?
        }
        From::Definition => {
            let config = config.expect("loaded unless incoming");
            let (expose, notice) = resolve_nested(config.nested, hv)?;
            let vm = build(&config, hv, expose, console()).map_err(build_failure)?;
            if let Some(n) = notice {
                eprintln!("{n}");
            }
            vm
        }
    };
    Ok((vm, None))
}

/// `vm serve`: the detached VMM process of a managed VM.
pub fn serve(store: &Store, name: &VmName, from: From) -> Result<u8, Failure> {
    let vm_dir = store.vm_dir(name);
    let p = VmDir::of(store, name);
    let _running = lock::lock(&p.run_lock, false)
        .map_err(|_| runtime(anyhow!("VM '{name}' is already running")))?;
    // What the last VMM left, checked and taken back before root reads it.
    store.reclaim(name).map_err(store_err)?;
    let user = crate::common::vmm_user()?;
    // An arriving VM brings its definition with it.
    let config = match from {
        From::Incoming { .. } => None,
        _ => Some(store.load(name).map_err(store_err)?),
    };
    std::fs::write(&p.pid, format!("{}\n", std::process::id())).map_err(runtime)?;
    // The jail's rules name the VM's directory and disks: an arriving VM's
    // are known only once its sender has said them (its jail comes then).
    if let Some(c) = &config {
        crate::common::prepare_jail(c, Some(&vm_dir))?;
    }
    let hv = Hypervisor::open().map_err(cannot_run_vms)?;
    // From here on the VMM names its own files relative to its directory,
    // which is all it can reach once it is no longer root.
    std::env::set_current_dir(&vm_dir)
        .map_err(|e| runtime(anyhow!("cannot enter {}: {e}", vm_dir.display())))?;
    let here = VmDir::here();
    let resuming = match from {
        From::Checkpoint(_) => true,
        From::Definition => here.saved.exists(),
        From::Incoming { .. } => false,
    };
    // A guest decides how much it prints and makes its VMM log: both files
    // are rotated at the definition's caps (an arriving VM's defaults until
    // its definition is here).
    let limits = config.as_ref().map(|c| c.logs).unwrap_or_default();
    nestvm_vmm::logfile::cap_stderr(&here.log, limits.vmm);
    // A resumed VM's console log goes on where it stopped.
    let console_log = RotatingFile::open(&here.console_log, limits.console, resuming)
        .map_err(|e| runtime(anyhow!("cannot open {}: {e}", p.console_log.display())))?;
    let hub = ConsoleHub::new(Some(console_log));
    let incoming = matches!(from, From::Incoming { .. });
    let (vm, arrival) = build_vm(store, name, &from, config, &hv, &hub)?;
    if incoming {
        crate::common::prepare_jail(&vm.config, Some(&vm_dir))?;
    }
    let api = bind(&here.control)?;
    let console = bind(&here.console)?;
    // Everything only root may open is open: give up root before the first
    // thread starts and the guest runs.
    if let Some(u) = &user {
        store.hand_over(name, u.uid, u.gid).map_err(store_err)?;
        crate::common::drop_privileges(Some(u))?;
    }
    eprintln!(
        "nestvm: VM '{name}' running (pid {}{})",
        std::process::id(),
        user.as_ref()
            .map(|u| format!(", as user {}", u.name))
            .unwrap_or_default()
    );
    let outcome = run(
        vm,
        Console {
            input: None,
            escape: false,
        },
        RunOptions {
            handle_signals: true,
            api: Some(api),
            console_server: Some(ConsoleServer::new(console, hub)),
            save_dir: Some(here.saved.clone()),
            checkpoint_root: Some(Path::new(".").join("checkpoints")),
            migration_report: Some(here.migration_report.clone()),
            start_paused: arrival.as_ref().is_some_and(|(running, _)| !running),
            on_started: Some(Box::new(move || {
                if let Some((_, confirm)) = arrival {
                    confirm.resumed();
                }
                say_ready();
            })),
            seccomp: crate::common::seccomp(),
        },
    )
    .map_err(runtime);
    for f in [&here.control, &here.console, &here.pid] {
        let _ = std::fs::remove_file(f);
    }
    let outcome = outcome?;
    eprintln!("nestvm: VM '{name}' ended: {outcome:?}");
    Ok(match outcome {
        VmOutcome::Crashed { .. } => 1,
        VmOutcome::Signal(n) => 128u8.saturating_add(n as u8),
        _ => 0,
    })
}
