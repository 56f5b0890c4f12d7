//! The `nestvm` command line.
//!
//! Exit codes: 0 when the guest reset or powered off (or the user quit),
//! 1 for runtime failures (no usable /dev/kvm, a host that cannot nest, a
//! crashed guest), 2 for usage and configuration errors, 128+N when stopped
//! by signal N. `host check` exits 0 when the host can nest, 1 when not.
//! Errors are one line on stderr naming the problem and the fix.

mod host;
mod run;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

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
    /// What this host can do for nested virtualization.
    #[command(subcommand)]
    Host(HostCmd),
}

#[derive(Subcommand)]
enum HostCmd {
    /// Report whether VMs started here can run their own VMs, and why not.
    Check {
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Turn on the KVM module's nested parameter (dry run unless --yes).
    EnableNested {
        /// Apply the changes instead of only listing them.
        #[arg(long)]
        yes: bool,
    },
}

/// `nestvm run`'s settings.
#[derive(Args)]
pub struct RunArgs {
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
    /// Show the host's VT-x/AMD-V to the guest: auto (when the host can),
    /// on (refuse if it cannot), off [default: auto].
    #[arg(long, value_parser = ["auto", "on", "off"])]
    nested: Option<String>,
    /// A TOML file with the same settings; flags override it.
    #[arg(long)]
    config: Option<PathBuf>,
}

/// An error with the exit code it maps to.
pub struct Failure {
    code: u8,
    error: anyhow::Error,
}

/// A usage or configuration error (exit code 2).
pub fn usage(error: impl Into<anyhow::Error>) -> Failure {
    Failure {
        code: 2,
        error: error.into(),
    }
}

/// A runtime error (exit code 1).
pub fn runtime(error: impl Into<anyhow::Error>) -> Failure {
    Failure {
        code: 1,
        error: error.into(),
    }
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
        Cmd::Run(args) => run::run_vm(args),
        Cmd::Host(HostCmd::Check { json }) => host::check(json),
        Cmd::Host(HostCmd::EnableNested { yes }) => host::enable_nested(yes),
    };
    match result {
        Ok(code) => ExitCode::from(code),
        Err(Failure { code, error }) => {
            eprintln!("nestvm: error: {error:#}");
            ExitCode::from(code)
        }
    }
}
