//! nestvm's VMM: from a [`config::VmConfig`] to a running VM and back to an
//! outcome.
//!
//! - [`config`]: the VM's settings (TOML file and flags), validated;
//!   [`adapters`] for its disks and network adapters.
//! - `builder`: builds the whole VM — memory, kernel, ACPI, devices, vCPUs —
//!   paused, so nothing runs until everything exists.
//! - `virtio`: attaches disks and adapters as virtio-mmio devices;
//!   [`passt`]: the process behind each `--net user` adapter.
//! - `bus`: the port I/O and MMIO buses, the vCPUs' exit handler.
//! - `vcpu`: one thread per vCPU, an explicit Paused/Running/Exited state
//!   machine driven by commands, reporting exits as events; `vcpus`: the
//!   set of them, paused, resumed, read and written together, failing
//!   loudly with the vCPU that did not follow.
//! - `controller`: the one owner of a running VM, one method per action.
//! - `event_loop`: wires the event sources (console, signals,
//!   reset/power-off, vCPU exits, virtio workers, the API) to the
//!   controller until the VM stops; `outcome`: how it ended.
//! - [`persist`]: saves, checkpoints and restores — the state file's
//!   format, the memory file, CPU compatibility, capturing a paused VM,
//!   building one back (validated like a new VM's definition), and
//!   checkpoint layers — with one error type.
//! - [`migration`]: live migration, the sending thread and the receiver;
//!   [`secret`]: its pre-shared key and the private file it lives in.
//! - [`balloon`]: the control API's side of virtio-balloon (memory target,
//!   the guest's statistics, the automatic policy).
//! - [`terminal`]: raw mode for an interactive console, always restored.
//! - [`api`]: the control API of a detached VM (HTTP/JSON on a Unix
//!   socket): server thread, typed requests, client, and the thread that
//!   runs its guest-agent requests; [`agent`]: the client of the guest's
//!   own agent (the stock QEMU guest agent on the vsock device).
//! - [`console`]: the serial console of a detached VM, for attaching clients.
//! - [`logfile`]: log files rotated at their cap, and a logger that no
//!   guest can flood (a budget per call site).
//! - [`seccomp`], [`jail`], [`privileges`]: the sandbox — each thread's
//!   seccomp filter and Landlock ruleset, the process's limits, and giving
//!   up root once the VM is built.

pub mod agent;
pub mod api;
pub mod balloon;
mod builder;
mod bus;
pub mod console;
mod controller;
mod event_loop;
pub mod jail;
pub mod logfile;
pub mod migration;
mod outcome;
pub mod passt;
pub mod persist;
pub mod privileges;
pub mod seccomp;
pub mod secret;
pub mod terminal;
mod vcpu;
mod vcpus;
mod virtio;

/// The VM's definition, from its own crate (the VM store reads it too).
pub use nestvm_config as config;
pub use nestvm_config::adapters;

// The machine has one interrupt line for each device a definition may hold.
const _: () = assert!(adapters::MAX_DEVICES == nestvm_arch::layout::VIRTIO_GSIS.len());

pub use builder::{build, BuildError, BuiltVm};
pub use config::{ConfigError, VmConfig};
pub use event_loop::{run, Console, RunError, RunOptions};
pub use outcome::VmOutcome;

/// The guest console's default writer: nestvm's stdout, flushed after every
/// write so interactive prompts show at once.
pub fn console_stdout() -> impl std::io::Write + Send {
    nestvm_devices::serial::Unbuffered(std::io::stdout())
}
