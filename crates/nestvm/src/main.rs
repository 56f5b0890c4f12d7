//! The `nestvm` command line.
//!
//! Exit codes: 0 when the guest reset or powered off (or the user quit),
//! 1 for runtime failures (no usable /dev/kvm, a host that cannot nest, a
//! crashed guest), 2 for usage and configuration errors, 128+N when stopped
//! by signal N. `host check` exits 0 when the host can nest, 1 when not.
//! Errors are one line on stderr naming the problem and the fix.
//!
//! Imports run one way, from the commands down to what they share, and no
//! module imports this one: `vm` only dispatches `nestvm vm ...` to the
//! modules that do the work (`definition`, `nesting`, `managed`, `serve`,
//! `saved`, `checkpoints`, `migrate`, `memory`, `attach`, `guest`: `vm
//! exec` and `vm cp` through `agent`, the QEMU guest agent's protocol on
//! the VM's vsock device, which `definition` also asks); `serve` uses
//! `migrate`'s receiving half and `saved`'s restore, and those that restart
//! or stop a VM use `managed`; beneath them `control` (the VMM's API, its
//! replies decoded into the VMM's types), `run` (foreground runs, and the
//! host checks any VM start makes), `settings` (a VM's flags), `vmdir` (a
//! VM's files) and, importing nothing, `common` (exit codes, output).

mod attach;
mod checkpoints;
mod common;
mod control;
mod definition;
mod guest;
mod host;
mod image;
mod image_files;
mod managed;
mod memory;
mod migrate;
mod nesting;
mod run;
mod saved;
mod serve;
mod settings;
mod status;
mod vm;
mod vmdir;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::common::Failure;

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
    /// The VMM's seccomp filters: on (a call outside them stops the VMM), log (the kernel logs it), off [default: on, or $NESTVM_SECCOMP].
    #[arg(long, global = true, value_name = "on|log|off")]
    seccomp: Option<nestvm_vmm::seccomp::Mode>,
    /// The VMM's Landlock rules (its threads reach only the VM's directory and disks): on, off [default: on, or $NESTVM_LANDLOCK].
    #[arg(long, global = true, value_name = "on|off", value_parser = ["on", "off"])]
    landlock: Option<String>,
    /// Run as root, the VMM becomes this user once its VM is built (USER[:GROUP] or UID:GID; root keeps root's rights) [default: nobody, or $NESTVM_VMM_USER].
    #[arg(long, global = true, value_name = "USER[:GROUP]")]
    vmm_user: Option<String>,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Boot a VM in the foreground, its serial console on stdin/stdout.
    Run(run::RunArgs),
    /// What this host can do for nested virtualization.
    #[command(subcommand)]
    Host(HostCmd),
    /// Manage VM definitions.
    #[command(subcommand)]
    Vm(vm::VmCmd),
    /// Whether the host and each VM can host VMs now, and every reason not.
    Status,
    /// Build a disk to boot: `image debian OUT`.
    #[command(subcommand)]
    Image(ImageCmd),
}

#[derive(Subcommand)]
enum ImageCmd {
    /// A bootable Debian system on a raw disk OUT, with OUT.vmlinuz and
    /// OUT.initrd beside it, built with mmdebstrap from Debian's packages
    /// (systemd, the stock kernel, qemu-guest-agent on vsock, DHCP,
    /// root on the serial console without password): 'vm new NAME --image OUT'.
    Debian {
        /// The disk image to write (must not exist).
        out: PathBuf,
        /// Debian release.
        #[arg(long, default_value = "bookworm")]
        release: String,
        /// More packages, comma-separated (e.g. qemu-system-x86).
        #[arg(long, value_delimiter = ',')]
        packages: Vec<String>,
        /// The disk's size (sparse) [default: 4G].
        #[arg(long, default_value = "4G")]
        size: String,
        /// A Debian mirror [default: mmdebstrap's].
        #[arg(long)]
        mirror: Option<String>,
    },
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

fn main() -> ExitCode {
    // Guests can make the VMM log (a malformed request, say): each place
    // that logs gets a budget, so no guest floods vmm.log.
    let logger =
        env_logger::Builder::from_env(env_logger::Env::new().filter_or("NESTVM_LOG", "warn"))
            .format_timestamp_millis()
            .build();
    let level = logger.filter();
    if log::set_boxed_logger(Box::new(nestvm_vmm::logfile::RateLimited::new(logger))).is_ok() {
        log::set_max_level(level);
    }
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
    let seccomp = match cli.seccomp.map(Ok).or_else(|| {
        std::env::var("NESTVM_SECCOMP")
            .ok()
            .map(|v| v.parse::<nestvm_vmm::seccomp::Mode>())
    }) {
        None => nestvm_vmm::seccomp::Mode::On,
        Some(Ok(m)) => m,
        Some(Err(e)) => {
            eprintln!("nestvm: error: NESTVM_SECCOMP: {e}; set it to on, log or off");
            return ExitCode::from(2);
        }
    };
    common::set_seccomp(seccomp);
    match cli
        .landlock
        .or_else(|| std::env::var("NESTVM_LANDLOCK").ok())
        .as_deref()
    {
        None | Some("on") => common::set_landlock(true),
        Some("off") => common::set_landlock(false),
        Some(other) => {
            eprintln!(
                "nestvm: error: NESTVM_LANDLOCK: '{other}' is not on or off; set it to on or off"
            );
            return ExitCode::from(2);
        }
    }
    // One given is checked now (a usage error); the default when a VMM starts.
    if let Some(spec) = cli
        .vmm_user
        .or_else(|| std::env::var("NESTVM_VMM_USER").ok())
    {
        common::set_vmm_user(spec);
        if let Err(Failure { code, error }) = common::vmm_user() {
            eprintln!("nestvm: error: {error}");
            return ExitCode::from(code);
        }
    }
    let result = match cli.command {
        Cmd::Run(args) => run::run_vm(args),
        Cmd::Image(ImageCmd::Debian {
            out,
            release,
            packages,
            size,
            mirror,
        }) => nestvm_vmm::config::parse_size(&size)
            .map_err(common::usage)
            .and_then(|size| {
                image::build(&image::DebianImage {
                    out: out.clone(),
                    release,
                    packages,
                    size,
                    mirror,
                })
            })
            .map(|()| {
                common::report(
                    cli.json,
                    &format!(
                        "built {} (kernel {}, initrd {}): 'nestvm vm new NAME --image {}'",
                        out.display(),
                        image::kernel_of(&out).display(),
                        image::initrd_of(&out).display(),
                        out.display()
                    ),
                    serde_json::json!({ "image": out, "kernel": image::kernel_of(&out), "initrd": image::initrd_of(&out) }),
                );
                0
            }),
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
