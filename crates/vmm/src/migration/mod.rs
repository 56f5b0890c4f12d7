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
//!    the receiver puts its disks and TAPs where its own user said
//!    ([`placement`]: never where the sender alone says) and refuses a VM
//!    this host's KVM cannot run, or whose disks are missing or held by
//!    another process here — before any memory moves;
//! 3. pre-copy: KVM's dirty-page log is turned on, all non-zero memory is
//!    sent, then round after round the pages written since the last round:
//!    those KVM logged for the vCPUs and those the devices wrote (vm-memory's
//!    dirty bitmap, [`nestvm_virtio::Memory`]), no faster than
//!    `--max-bandwidth` allows ([`throttle`]); a guest that writes faster
//!    than that is slowed, more with each round it still outpaces the copy
//!    ([`converge`]: its vCPUs nap), unless `--no-auto-converge`;
//! 4. once what is left would go within the downtime budget at the measured
//!    rate, with the pause's fixed costs counted (two round trips to the
//!    receiver, timed after each round by a second `Ping` it echoes over
//!    the idle link, and the state; [`converge::switch`]), the event loop
//!    pauses the vCPUs, captures the VM (as a save
//!    does), lets go of its disk locks and goes back to its work; the
//!    thread sends the last dirty pages and the state; the receiver builds
//!    the VM — paused, its disks locked — and says `Ready`;
//! 5. **the commit point**: the sender stops its user-mode adapters' passt
//!    (waiting for each to end, so their forwarded ports are free for a
//!    destination on the same host, whose own passt starts as its VM
//!    runs) and answers `Go`. Only on `Go` does the
//!    receiver run the VM (then says `Resumed`), and from the moment it
//!    writes `Go` the sender never resumes its copy on its own. So:
//!    - any failure before `Go` — a refusal, a cut connection, a killed
//!      receiver, no `Ready` — means the destination provably never ran
//!      the VM: the source takes its disk locks back and resumes where it
//!      was (if a lock cannot be taken back, it stays paused and says so);
//!    - `Resumed` after `Go`: the source VMM ends ([`Phase::Completed`]);
//!    - no `Resumed` after `Go` (cut, timeout): the destination may or may
//!      not run the VM. The source stays paused with its locks released
//!      ([`Phase::Unconfirmed`]) and the user settles it: `vm show` on the
//!      destination, then `vm kill` here, or `vm resume` here (which takes
//!      the disk locks back first, and is refused while another VM holds
//!      them).
//!
//! A receiver that does not get `Go` drops the VM it built, unrun.

pub mod channel;
pub mod converge;
pub mod frame;
pub mod placement;
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
/// (2: the Noise channel; 3: `Ready` and `Go`, the commit point; 4: `Ping`
/// and `Pong`, the round trip the switch rule counts).
pub const PROTOCOL_VERSION: u32 = 4;
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
    /// The sender did not give the VM up (no `Go` after `Ready`): it was
    /// not run here.
    #[error("the source did not commit the migration; the VM was not started here")]
    NotCommitted(#[source] Box<MigrationError>),
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
    /// The sending VMM (its own disk locks are not another VM's).
    #[serde(default)]
    pub source: placement::Source,
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
    /// The migration failed before the commit point; the VM runs here as
    /// before (or stays paused, if it was, or if a disk lock could not be
    /// taken back).
    Failed,
    /// The source committed (sent `Go`) but the destination did not
    /// confirm it runs the VM: it may. The VM stays paused here, its disk
    /// locks released, until the user checks the destination and kills or
    /// resumes this copy.
    Unconfirmed,
}

impl Phase {
    /// Whether the migration is over (it no longer changes).
    pub fn ended(&self) -> bool {
        matches!(self, Phase::Completed | Phase::Failed | Phase::Unconfirmed)
    }
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
    /// How much auto-converge slows the guest, percent: while pre-copy
    /// goes on, now; once it is over, as it was when the VM was paused.
    #[serde(default)]
    pub slowed_pct: u8,
    /// The last measured round trip to the receiver, ms (a `Ping`
    /// answered once the pages before it were applied).
    #[serde(default)]
    pub round_trip_ms: Option<f64>,
    /// What the final pause was expected to cost at the last round's end:
    /// what was left at the measured rate plus the fixed costs, ms.
    #[serde(default)]
    pub expected_downtime_ms: Option<f64>,
    /// Why it failed.
    pub error: Option<String>,
}
