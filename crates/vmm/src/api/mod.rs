//! The control API of a running VMM: HTTP/1.1 with JSON bodies on a Unix
//! socket (described in `docs/openapi.yaml`). The server reads and routes
//! requests on a thread of its own — each within a deadline and a size
//! limit, so no client can hold up the event loop, and a slow one holds up
//! other clients for [`REQUEST_DEADLINE`] at most — and hands each valid one
//! to the VM's controller as a typed [`Request`] over a channel (an eventfd
//! wakes the event loop). [`call`] is the client.
//!
//! - `request`: routes a method and path, and parses the query into a
//!   [`Request`]: a malformed request is answered 400 here, never queued;
//! - `server`: the thread, with its deadline and size limit, and the
//!   event-loop side that queues [`Pending`] requests;
//! - `response`: an answer's status line and JSON body ([`Responder`]);
//! - `client`: [`call`];
//! - `guest`: the guest-agent requests (`vm exec`, `vm cp`, whether the
//!   agent answers) and the thread that runs them, apart from the
//!   controller: a command may run for a day.
//!
//! | method | path | does |
//! |---|---|---|
//! | GET | /v1/vm | the VM's state |
//! | PUT | /v1/vm/pause | pause every vCPU |
//! | PUT | /v1/vm/resume | resume every vCPU |
//! | PUT | /v1/vm/power-button | press the ACPI power button (the guest shuts down) |
//! | PUT | /v1/vm/kill | stop the VM at once |
//! | PUT | /v1/vm/save, /v1/vm/checkpoint, /v1/vm/migrate | save, checkpoint, migrate |
//! | GET, PUT | /v1/vm/memory | the balloon; resize |
//! | GET | /v1/vm/agent | whether the guest agent answers |
//! | PUT | /v1/vm/exec | run a command in the guest (JSON body) |
//! | GET, PUT | /v1/vm/file?path=P&offset=N | a piece of a guest's file, read or written |

mod client;
mod guest;
mod request;
mod response;
mod server;

pub use client::{call, call_body, call_with, CallError, MAX_ANSWER};
pub use guest::{
    AgentReply, ExecReply, ExecRequest, FilePiece, FileWritten, GuestAsk, GuestCall, GuestThread,
    BODY_DEADLINE, DEFAULT_EXEC_TIMEOUT_S, FILE_PIECE, MAX_EXEC_BODY, QUEUE,
};
pub use request::{
    parse_query, percent_encode, route, Action, MigrateRequest, Refusal, Request,
    DEFAULT_MAX_DOWNTIME, MIN_BANDWIDTH,
};
pub use response::Responder;
pub use server::{
    parse_head, ApiServer, Head, HeadError, Pending, Queue, REQUEST_DEADLINE, SECRET_HEADER,
};

use serde::{Deserialize, Serialize};

/// What a VM is doing, as its VMM reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RunState {
    /// Built, vCPUs not yet resumed.
    Starting,
    /// Running guest code.
    Running,
    /// Every vCPU paused.
    Paused,
    /// Asked to power off; waiting for the guest.
    Stopping,
}

/// The body of GET /v1/vm and of successful actions.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmInfo {
    /// The state.
    pub state: RunState,
    /// The VMM's process id.
    pub pid: u32,
    /// vCPUs.
    pub vcpus: u32,
    /// Whether VT-x/AMD-V are exposed to the guest.
    pub nested: bool,
    /// Disks and network adapters, with their counters.
    #[serde(default)]
    pub devices: Vec<DeviceInfo>,
}

/// A virtio device in [`VmInfo`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeviceInfo {
    /// "block" or "net".
    pub kind: String,
    /// The image or TAP (and MAC and policy) it is attached to.
    pub attached: String,
    /// Whether the guest's driver started it.
    pub active: bool,
    /// Request and frame counters.
    pub counters: std::collections::BTreeMap<String, u64>,
}

/// An error body.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ApiError {
    /// What went wrong.
    pub error: String,
}

/// The body of a successful `PUT /v1/vm/save`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SaveReply {
    /// The saved-VM directory.
    pub saved: std::path::PathBuf,
    /// What was written.
    #[serde(flatten)]
    pub summary: crate::persist::SaveSummary,
    /// vCPUs.
    pub vcpus: usize,
    /// vCPUs that were running a guest of their own (nested state saved).
    pub vcpus_in_guest_mode: usize,
}

/// The body of a successful `PUT /v1/vm/checkpoint`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CheckpointReply {
    /// The new checkpoint's metadata.
    #[serde(flatten)]
    pub meta: nestvm_snapshot::layer::Meta,
    /// vCPUs that were running a guest of their own (nested state kept).
    pub vcpus_in_guest_mode: usize,
}
