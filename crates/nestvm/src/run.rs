//! `nestvm run`: build a VM, run it in the foreground, map its end to an exit code.

use std::io::IsTerminal;
use std::os::fd::AsFd;
use std::path::PathBuf;

use anyhow::{anyhow, Context};
use nestvm_kvm::Hypervisor;
use nestvm_vmm::config::NestedMode;
use nestvm_vmm::terminal::RawModeGuard;
use nestvm_vmm::{build, run, VmConfig, VmOutcome};
use nestvm_vmm::{Console, RunOptions};

use clap::Args;

use crate::common::{runtime, usage, Failure};
use crate::settings::SettingsArgs;

/// `nestvm run`'s settings.
#[derive(Args)]
pub struct RunArgs {
    #[command(flatten)]
    settings: SettingsArgs,
    /// A TOML file with the same settings; flags override it.
    #[arg(long)]
    config: Option<PathBuf>,
}

/// Why this host cannot run VMs, in the words `host check` uses.
pub(crate) fn cannot_run_vms(open_error: nestvm_kvm::HypervisorError) -> Failure {
    match nestvm_host::evaluate(&nestvm_host::gather()).blocker_line() {
        Some(why) => runtime(anyhow!("this host cannot run VMs: {why}")),
        None => runtime(anyhow!("this host cannot run VMs: {open_error}")),
    }
}

/// Whether to show VT-x/AMD-V to the guest, from the VM's setting and the
/// host; with `auto` on a host that cannot nest, also the notice to print
/// once the VM is built. KVM's supported CPUID decides: with VMX/SVM the
/// answer is yes, without them no. Only `on` on a host that cannot nest
/// probes the host in full, to say why in its error; `auto` points to
/// `nestvm host check` for that, so starting a VM costs no probe.
pub(crate) fn resolve_nested(
    mode: NestedMode,
    hv: &Hypervisor,
) -> Result<(bool, Option<String>), Failure> {
    if mode == NestedMode::Off {
        return Ok((false, None));
    }
    let kvm_offers = hv
        .supported_cpuid()
        .is_ok_and(|c| nestvm_arch::cpuid::shows_virtualization(&c));
    if kvm_offers {
        return Ok((true, None));
    }
    if mode == NestedMode::Auto {
        return Ok((
            false,
            Some("nestvm: nesting is off for this VM: this host's KVM does not offer VT-x/AMD-V to guests ('nestvm host check' says why and how to fix it; --nested off silences this)".into()),
        ));
    }
    let report = nestvm_host::evaluate(&nestvm_host::gather_with(Some(hv)));
    match (mode, report.can_nest) {
        // KVM does not offer VMX/SVM, so whatever else holds, the guest cannot get them.
        (NestedMode::On, true) => Err(runtime(anyhow!(
            "--nested on, but this host's KVM does not offer VT-x/AMD-V to guests: see 'nestvm host check'"
        ))),
        (_, true) => Ok((
            false,
            Some("nestvm: nesting is off for this VM: KVM does not offer VT-x/AMD-V to guests (--nested off silences this)".into()),
        )),
        (NestedMode::On, false) => Err(runtime(anyhow!(
            "--nested on, but this host cannot give VMs VT-x/AMD-V: {}",
            report.blocker_line().unwrap_or_default()
        ))),
        (_, false) => Ok((
            false,
            Some(format!(
                "nestvm: nesting is off for this VM: {} (--nested off silences this)",
                report
                    .blocker()
                    .and_then(|c| c.reason.clone())
                    .unwrap_or_else(|| "this host cannot nest".into())
            )),
        )),
    }
}

/// Why a VM could not be built: its settings' fault (exit 2) or the host's.
pub(crate) fn build_failure(e: nestvm_vmm::BuildError) -> Failure {
    if e.is_usage() {
        usage(e)
    } else {
        runtime(anyhow::Error::new(e).context("cannot build the VM"))
    }
}

/// Opens `path` as a kernel: a regular file (opened without blocking) that
/// is a bzImage or an ELF vmlinux; returns the open file.
pub(crate) fn open_kernel(path: &std::path::Path) -> Result<std::fs::File, Failure> {
    let mut f = nestvm_arch::boot::open_regular(path)
        .map_err(|e| usage(anyhow!("cannot read kernel {}: {e}", path.display())))?;
    nestvm_arch::boot::detect_format(&mut f, path).map_err(usage)?;
    Ok(f)
}

pub fn run_vm(args: RunArgs) -> Result<u8, Failure> {
    let config =
        VmConfig::resolve(args.config.as_deref(), args.settings.overrides()?).map_err(usage)?;
    // A bad kernel is a usage error, said before KVM is even opened.
    open_kernel(&config.kernel)?;
    let user = crate::common::vmm_user()?;
    let hv = Hypervisor::open().map_err(cannot_run_vms)?;
    let (expose, notice) = resolve_nested(config.nested, &hv)?;
    crate::common::prepare_jail(&config, None)?;
    let vm = build(&config, &hv, expose, Box::new(nestvm_vmm::console_stdout()))
        .map_err(build_failure)?;
    if let Some(notice) = notice {
        eprintln!("{notice}");
    }

    let stdin = std::io::stdin();
    let interactive = stdin.is_terminal();
    let input = stdin.as_fd().try_clone_to_owned().ok();
    let guard = if interactive {
        eprintln!("nestvm: console attached; type Ctrl-A x to quit");
        RawModeGuard::enable(stdin.as_fd())
    } else {
        None
    };
    // Everything only root may open is open: give up root before the first
    // thread starts and the guest runs.
    crate::common::drop_privileges(user.as_ref())?;
    let outcome = run(
        vm,
        Console {
            input,
            escape: interactive,
        },
        RunOptions {
            handle_signals: true,
            seccomp: crate::common::seccomp(),
            ..Default::default()
        },
    )
    .context("the VM's event loop failed")
    .map_err(runtime);
    drop(guard);
    match outcome? {
        VmOutcome::Reset => {
            log::info!("guest reset; nestvm exits");
            Ok(0)
        }
        VmOutcome::PowerOff => {
            log::info!("guest powered off");
            Ok(0)
        }
        VmOutcome::Quit | VmOutcome::Killed | VmOutcome::Saved | VmOutcome::Migrated => Ok(0),
        VmOutcome::Signal(n) => {
            eprintln!("nestvm: stopped the VM on signal {n}");
            Ok(128u8.saturating_add(n as u8))
        }
        VmOutcome::Crashed { reason, registers } => {
            eprint!("{registers}");
            Err(runtime(anyhow!("guest crashed: {reason}")))
        }
    }
}
