//! The `nestvm` command line.
//!
//! Exit codes: 0 when the guest reset or powered off (or the user quit),
//! 1 for runtime failures (no usable /dev/kvm, a crashed guest), 2 for usage
//! and configuration errors, 128+N when stopped by signal N. Errors are one
//! line on stderr naming the problem and the fix.

use std::io::IsTerminal;
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use nestvm_kvm::Hypervisor;
use nestvm_vmm::config::Overrides;
use nestvm_vmm::runner::{Console, RunOptions};
use nestvm_vmm::terminal::RawModeGuard;
use nestvm_vmm::{build, run, VmConfig, VmOutcome};

#[derive(Parser)]
#[command(
    name = "nestvm",
    version,
    about = "A VMM on Linux KVM built for nested virtualization"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Boot a VM in the foreground, its serial console on stdin/stdout.
    Run(RunArgs),
}

#[derive(Args)]
struct RunArgs {
    /// Kernel image: an x86-64 bzImage or ELF vmlinux.
    #[arg(long)]
    kernel: Option<PathBuf>,
    /// Initial ramdisk.
    #[arg(long)]
    initrd: Option<PathBuf>,
    /// Kernel command line [default: "console=ttyS0 reboot=k panic=-1"].
    #[arg(long)]
    cmdline: Option<String>,
    /// Number of vCPUs [default: 1].
    #[arg(long)]
    cpus: Option<u32>,
    /// Guest memory, e.g. 512M or 4G (a bare number is MiB) [default: 512M].
    #[arg(long)]
    memory: Option<String>,
    /// A TOML file with the same settings; flags override it.
    #[arg(long)]
    config: Option<PathBuf>,
}

/// An error with the exit code it maps to.
struct Failure {
    code: u8,
    error: anyhow::Error,
}

fn usage(error: impl Into<anyhow::Error>) -> Failure {
    Failure {
        code: 2,
        error: error.into(),
    }
}

fn runtime(error: impl Into<anyhow::Error>) -> Failure {
    Failure {
        code: 1,
        error: error.into(),
    }
}

fn run_vm(args: RunArgs) -> Result<u8, Failure> {
    let config = VmConfig::resolve(
        args.config.as_deref(),
        Overrides {
            kernel: args.kernel,
            initrd: args.initrd,
            cmdline: args.cmdline,
            cpus: args.cpus,
            memory: args.memory,
        },
    )
    .map_err(usage)?;
    let hv = Hypervisor::open().map_err(runtime)?;
    let console_out = Box::new(nestvm_devices_stdout());
    let vm = build(&config, &hv, console_out).map_err(|e| {
        if e.is_usage() {
            usage(e)
        } else {
            runtime(anyhow::Error::new(e).context("cannot build the VM"))
        }
    })?;

    let stdin = std::io::stdin();
    let interactive = stdin.is_terminal();
    let input = stdin.as_fd().try_clone_to_owned().ok();
    let guard = if interactive {
        eprintln!("nestvm: console attached; type Ctrl-A x to quit");
        RawModeGuard::enable(stdin.as_fd())
    } else {
        None
    };
    let outcome = run(
        vm,
        Console {
            input,
            escape: interactive,
        },
        RunOptions {
            handle_signals: true,
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
        VmOutcome::Quit => Ok(0),
        VmOutcome::Signal(n) => {
            eprintln!("nestvm: stopped the VM on signal {n}");
            Ok(128u8.saturating_add(n as u8))
        }
        VmOutcome::Crashed { reason, registers } => {
            eprint!("{registers}");
            Err(runtime(anyhow::anyhow!("guest crashed: {reason}")))
        }
    }
}

/// The guest console's writer: our stdout, flushed after every write.
fn nestvm_devices_stdout() -> impl std::io::Write + Send {
    nestvm_vmm::console_stdout()
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::new().filter_or("NESTVM_LOG", "warn"))
        .format_timestamp_millis()
        .init();
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) if !e.use_stderr() => {
            // --help and --version.
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            // clap's own report spans several lines; keep the contract of one.
            let text = e.to_string();
            let first = text
                .lines()
                .find(|l| !l.trim().is_empty())
                .unwrap_or("invalid arguments");
            let first = first.trim_start_matches("error: ");
            eprintln!("nestvm: error: {first}; see 'nestvm --help'");
            return ExitCode::from(2);
        }
    };
    let result = match cli.command {
        Cmd::Run(args) => run_vm(args),
    };
    match result {
        Ok(code) => ExitCode::from(code),
        Err(Failure { code, error }) => {
            eprintln!("nestvm: error: {error:#}");
            ExitCode::from(code)
        }
    }
}
