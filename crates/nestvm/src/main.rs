//! The `nestvm` command line.
//!
//! Exit codes: 0 when the guest reset or powered off (or the user quit),
//! 1 for runtime failures (no usable /dev/kvm, a host that cannot nest, a
//! crashed guest), 2 for usage and configuration errors, 128+N when stopped
//! by signal N. `host check` exits 0 when the host can nest, 1 when not.
//! Errors are one line on stderr naming the problem and the fix.

mod attach;
mod checkpoints;
mod host;
mod managed;
mod memory;
mod migrate;
mod run;
mod saved;
mod status;
mod vm;

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
    /// Where VM definitions live [default: /var/lib/nestvm as root,
    /// $XDG_DATA_HOME/nestvm otherwise; or $NESTVM_STATE_DIR].
    #[arg(long, global = true)]
    state_dir: Option<PathBuf>,
    /// Print results as JSON (every command but run and vm console).
    #[arg(long, global = true)]
    json: bool,
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
    /// Manage VM definitions.
    #[command(subcommand)]
    Vm(vm::VmCmd),
    /// Whether the host and each VM can host VMs now, and every reason not.
    Status,
}

#[derive(Subcommand)]
enum HostCmd {
    /// Report whether VMs started here can run their own VMs, and why not.
    Check,
    /// Turn on the KVM module's nested parameter (dry run unless --yes).
    EnableNested {
        /// Apply the changes instead of only listing them.
        #[arg(long)]
        yes: bool,
    },
}

/// A VM's settings, as flags (shared by `run`, `vm new` and `vm set`).
#[derive(Args)]
pub struct SettingsArgs {
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
    /// A virtio disk: path=FILE[,readonly=on] (raw image); repeat for more.
    #[arg(long, value_name = "path=FILE[,readonly=on]")]
    disk: Vec<String>,
    /// A virtio network adapter on a TAP device:
    /// tap=NAME[,mac=MAC][,mac_spoofing=on|off]; repeat for more. The TAP
    /// is created if missing and nestvm may (root); mac_spoofing=on lets
    /// guests bridged inside this VM use their own MACs.
    #[arg(long, value_name = "tap=NAME[,mac=MAC][,mac_spoofing=on|off]")]
    net: Vec<String>,
    /// A memory balloon, so the VM's memory can shrink to min and grow back
    /// while it runs (vm resize); dynamic=on follows the guest's demand:
    /// on | dynamic=on|off[,min=SIZE][,start=SIZE] [default min: 256M;
    /// start: all of --memory].
    #[arg(long, value_name = "on|dynamic=on[,min=SIZE][,start=SIZE]")]
    balloon: Option<String>,
    /// Remove the balloon (with vm set).
    #[arg(long, conflicts_with = "balloon")]
    no_balloon: bool,
    /// Remove every disk (with vm set).
    #[arg(long, conflicts_with = "disk")]
    no_disks: bool,
    /// Remove every network adapter (with vm set).
    #[arg(long, conflicts_with = "net")]
    no_nets: bool,
}

impl SettingsArgs {
    /// The flags as overrides of a VM's settings.
    pub fn overrides(self) -> Result<nestvm_vmm::config::Overrides, Failure> {
        let nested = match self.nested.as_deref() {
            Some(s) => Some(s.parse().map_err(usage)?),
            None => None,
        };
        use nestvm_vmm::adapters::{parse_balloon, parse_disk, parse_net};
        let balloon = match (&self.balloon, self.no_balloon) {
            (Some(b), _) => Some(Some(parse_balloon(b).map_err(usage)?)),
            (None, true) => Some(None),
            (None, false) => None,
        };
        let disks = self
            .disk
            .iter()
            .map(|d| parse_disk(d))
            .collect::<Result<Vec<_>, _>>()
            .map_err(usage)?;
        let nets = self
            .net
            .iter()
            .map(|n| parse_net(n))
            .collect::<Result<Vec<_>, _>>()
            .map_err(usage)?;
        Ok(nestvm_vmm::config::Overrides {
            disks: (self.no_disks || !disks.is_empty()).then_some(disks),
            nets: (self.no_nets || !nets.is_empty()).then_some(nets),
            balloon,
            kernel: self.kernel,
            initrd: self.initrd,
            cmdline: self.cmdline,
            cpus: self.cpus,
            memory: self.memory,
            nested,
        })
    }
}

/// `nestvm run`'s settings.
#[derive(Args)]
pub struct RunArgs {
    #[command(flatten)]
    settings: SettingsArgs,
    /// A TOML file with the same settings; flags override it.
    #[arg(long)]
    config: Option<PathBuf>,
}

/// An error with the exit code it maps to.
pub struct Failure {
    code: u8,
    error: anyhow::Error,
}

/// Prints a command's result: `text` for people, `value` with --json.
pub fn report(json: bool, text: &str, value: serde_json::Value) {
    if json {
        println!("{value}");
    } else {
        println!("{text}");
    }
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
        Cmd::Host(HostCmd::Check) => host::check(cli.json),
        Cmd::Host(HostCmd::EnableNested { yes }) => host::enable_nested(yes, cli.json),
        Cmd::Vm(cmd) => vm::run(nestvm_manager::Store::locate(cli.state_dir), cmd, cli.json),
        Cmd::Status => status::run(&nestvm_manager::Store::locate(cli.state_dir), cli.json),
    };
    match result {
        Ok(code) => ExitCode::from(code),
        Err(Failure { code, error }) => {
            eprintln!("nestvm: error: {error:#}");
            ExitCode::from(code)
        }
    }
}
