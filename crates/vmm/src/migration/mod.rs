//! Live migration: moving a running VM — nested state, devices, memory — to
//! another nestvm over TCP while it keeps running.
//!
//! The sender ([`send`]) runs in a thread of the source VMM beside its event
//! loop; the receiver ([`receive`]) is a `vm serve` that waits for the VM
//! instead of building one. In order:
//! 1. a Noise handshake keyed by the shared secret file ([`secret`])
//!    authenticates both sides and opens an encrypted channel in which
//!    every later message is sealed ([`channel`], framed as [`frame`]
//!    says); a receiver drops a peer that fails it and waits on;
//! 2. the sender describes the VM (definition, nesting, each vCPU's CPUID);
//!    the receiver refuses a VM this host's KVM cannot run — before any
//!    memory moves;
//! 3. pre-copy: KVM's dirty-page log is turned on, all non-zero memory is
//!    sent, then round after round the pages written since the last round:
//!    those KVM logged for the vCPUs and those the devices wrote (vm-memory's
//!    dirty bitmap, [`nestvm_virtio::Memory`]), no faster than
//!    `--max-bandwidth` allows ([`throttle`]);
//! 4. once what is left would go within the downtime budget at the measured
//!    rate, the event loop pauses the vCPUs and captures the VM (as a save
//!    does) and blocks: the last dirty pages and the state go over, the
//!    receiver builds the VM, resumes it and says so;
//! 5. only then does the source VMM end. Any failure before that — refusal,
//!    a cut connection, a killed receiver — resumes the source where it was.

pub mod channel;
pub mod frame;
pub mod receive;
pub use crate::secret;
pub mod send;
pub mod throttle;
pub mod wire;

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::builder::BuildError;
use crate::config::VmConfig;

/// Version of the migration stream; both sides must speak the same
/// (2: the Noise channel).
pub const PROTOCOL_VERSION: u32 = 2;
/// The downtime budget when none is given (the API's default).
pub use crate::api::DEFAULT_MAX_DOWNTIME;
/// Pre-copy rounds before the final copy is made whatever is left.
pub const MAX_ROUNDS: u32 = 30;

/// Errors of a migration, on either side.
#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    /// The destination could not be reached.
    #[error("cannot connect to {addr}")]
    Connect {
        /// The destination.
        addr: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Listening for the incoming VM failed.
    #[error("cannot listen on {addr}")]
    Listen {
        /// The address.
        addr: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The connection broke or timed out.
    #[error("the migration connection failed")]
    Stream(#[source] std::io::Error),
    /// The peer sent something this side does not accept.
    #[error("the peer broke the migration protocol: {0}")]
    Protocol(String),
    /// The secure channel failed: the handshake, or a sealed frame.
    #[error("the migration channel failed")]
    Channel(#[from] channel::ChannelError),
    /// The peer said no.
    #[error("the other side refused: {0}")]
    Refused(String),
    /// Guest memory could not be read or written.
    #[error("guest memory: {0}")]
    Memory(String),
    /// KVM's dirty log could not be used.
    #[error("KVM dirty-page logging failed")]
    DirtyLog(#[source] nestvm_kvm::VmError),
    /// The source VM could not be paused and captured for the final copy.
    #[error("cannot capture the VM for the final copy")]
    Capture(#[source] Box<crate::persist::capture::CaptureError>),
    /// The VM ended (or the VMM is stopping) while it was being migrated.
    #[error("the VM stopped during the migration")]
    Cancelled,
    /// The destination could not build the VM from what arrived.
    #[error("cannot build the migrated VM")]
    Build(#[source] Box<BuildError>),
    /// The destination could not restore the VM's state.
    #[error("cannot restore the migrated VM")]
    Restore(#[source] Box<crate::persist::RestoreError>),
    /// `--verify` found the copy differs from the source's memory.
    #[error("guest memory differs after the copy (digest {got:#x}, the source's {want:#x})")]
    Differs {
        /// This side's digest.
        got: u64,
        /// The sender's.
        want: u64,
    },
    /// Nobody connected in time.
    #[error("no migration arrived within {0:?}")]
    Timeout(Duration),
}

impl MigrationError {
    pub(crate) fn protocol(msg: impl Into<String>) -> Self {
        MigrationError::Protocol(msg.into())
    }
}

/// What the sender says first: enough for the receiver to decide whether it
/// can run this VM at all.
#[derive(Debug, Serialize, Deserialize)]
pub struct Hello {
    /// [`PROTOCOL_VERSION`].
    pub version: u32,
    /// The VM's definition.
    pub config: VmConfig,
    /// Whether VT-x/AMD-V are exposed.
    pub nested: bool,
    /// Each vCPU's CPUID.
    pub cpuid: Vec<Vec<nestvm_kvm::kvm_bindings::kvm_cpuid_entry2>>,
}

/// Where a migration is, for `GET /v1/vm/migration` and the progress bar.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    /// Connecting and authenticating.
    #[default]
    Connecting,
    /// Copying memory while the VM runs.
    Precopy,
    /// The VM is paused; the last pages and the state are going over.
    Stopping,
    /// The VM runs on the destination.
    Completed,
    /// The migration failed; the VM runs here as before.
    Failed,
}

/// The downtime of a migration, part by part (ms).
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct DowntimeParts {
    /// Pausing the vCPUs and capturing the VM here.
    pub stop_ms: f64,
    /// Sending the last dirty pages and the state.
    pub copy_ms: f64,
    /// The destination attaching devices, writing the state and resuming.
    pub resume_ms: f64,
}

/// Progress and result of an outgoing migration.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Progress {
    /// The destination.
    pub to: String,
    /// Where it is.
    pub phase: Phase,
    /// Pre-copy rounds done (round 1 sends all memory).
    pub rounds: u32,
    /// Guest RAM.
    pub memory_bytes: u64,
    /// Page data sent so far.
    pub sent_bytes: u64,
    /// Dirty memory found at the end of the last round.
    pub dirty_bytes: u64,
    /// Measured send rate, bytes per second.
    pub rate: u64,
    /// Since the migration started.
    pub elapsed_ms: u64,
    /// The budget.
    pub max_downtime_ms: u64,
    /// The cap on the pre-copy rounds, bytes per second (`None`: no cap).
    #[serde(default)]
    pub max_bandwidth: Option<u64>,
    /// From pausing here to running there (when completed).
    pub downtime_ms: Option<u64>,
    /// Where the downtime went.
    pub downtime_parts: Option<DowntimeParts>,
    /// Whether the dirty memory fitted the budget before the final copy.
    pub converged: Option<bool>,
    /// Why it failed.
    pub error: Option<String>,
}
