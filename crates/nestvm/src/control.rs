//! The CLI's side of a VMM's control API (`nestvm_vmm::api`): each reply
//! is decoded into the type the VMM encodes it from (`VmInfo`, `MemoryInfo`,
//! `Progress`, `SaveReply`, `CheckpointReply`, and `ApiError` for a refusal),
//! so a reply this nestvm cannot read is an error naming that reply, never
//! a field silently missing.

use std::path::Path;
use std::time::Duration;

use nestvm_manager::{Store, VmName, VmState};
use nestvm_vmm::api::{ApiError, CallError, RunState, VmInfo};
use nestvm_vmm::migration::Progress;
use serde::de::DeserializeOwned;

use crate::vmdir::VmDir;

/// How long a quick call may take.
pub const API_TIMEOUT: Duration = Duration::from_secs(10);

/// The VMM's answer to a call.
pub enum Answer<T> {
    /// The status asked for, with its body.
    Done(T),
    /// Another status, with the VMM's reason.
    Refused {
        /// The HTTP status.
        status: u16,
        /// The error body's text.
        error: String,
    },
}

/// Why a call brought no reply this nestvm can use.
#[derive(Debug)]
pub enum ReplyError {
    /// No answer: the VMM is not there, went away, or did not speak HTTP.
    Call(CallError),
    /// An answer in a shape this nestvm does not read (a VMM of another
    /// version): which reply, and what the decoder said.
    Undecodable(String),
}

impl std::fmt::Display for ReplyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReplyError::Call(e) => e.fmt(f),
            ReplyError::Undecodable(why) => f.write_str(why),
        }
    }
}

impl std::error::Error for ReplyError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ReplyError::Call(e) => e.source(),
            ReplyError::Undecodable(_) => None,
        }
    }
}

/// Decodes a reply body, or says which reply did not decode.
fn decode<T: DeserializeOwned>(
    body: serde_json::Value,
    status: u16,
    method: &str,
    path: &str,
) -> Result<T, ReplyError> {
    // The query is no business of the error (it may name the secret's file).
    let route = path.split('?').next().unwrap_or(path);
    let kind = std::any::type_name::<T>()
        .rsplit("::")
        .next()
        .unwrap_or("?");
    serde_json::from_value(body).map_err(|e| {
        ReplyError::Undecodable(format!(
            "the VMM's {status} reply to {method} {route} is not a {kind} this nestvm reads: {e}"
        ))
    })
}

/// Calls `method path` on the API at `socket`: a reply with status
/// `expect` is decoded as `T`, any other as the VMM's error body.
pub fn request<T: DeserializeOwned>(
    socket: &Path,
    method: &str,
    path: &str,
    timeout: Duration,
    expect: u16,
) -> Result<Answer<T>, ReplyError> {
    request_with(socket, (method, path, &[]), timeout, expect)
}

/// [`request`] of `(method, path, headers)`.
pub fn request_with<T: DeserializeOwned>(
    socket: &Path,
    (method, path, headers): (&str, &str, &[(&str, &str)]),
    timeout: Duration,
    expect: u16,
) -> Result<Answer<T>, ReplyError> {
    let (status, body) = nestvm_vmm::api::call_with(socket, method, path, headers, timeout)
        .map_err(ReplyError::Call)?;
    answer(status, body, method, path, expect)
}

/// [`request`] with a request `body`.
pub fn request_body<T: DeserializeOwned>(
    socket: &Path,
    (method, path): (&str, &str),
    body: &[u8],
    timeout: Duration,
    expect: u16,
) -> Result<Answer<T>, ReplyError> {
    let (status, reply) = nestvm_vmm::api::call_body(socket, method, path, &[], body, timeout)
        .map_err(ReplyError::Call)?;
    answer(status, reply, method, path, expect)
}

fn answer<T: DeserializeOwned>(
    status: u16,
    body: serde_json::Value,
    method: &str,
    path: &str,
    expect: u16,
) -> Result<Answer<T>, ReplyError> {
    if status == expect {
        return decode(body, status, method, path).map(Answer::Done);
    }
    let refusal: ApiError = decode(body, status, method, path)?;
    Ok(Answer::Refused {
        status,
        error: refusal.error,
    })
}

/// Like [`request`], with a refusal as an error too: its reason, or why
/// the VMM gave no answer this nestvm reads (for callers to word).
pub fn done<T: DeserializeOwned>(
    socket: &Path,
    method: &str,
    path: &str,
    timeout: Duration,
    expect: u16,
) -> anyhow::Result<T> {
    match request(socket, method, path, timeout, expect)? {
        Answer::Done(v) => Ok(v),
        Answer::Refused { error, .. } => Err(anyhow::anyhow!(error)),
    }
}

/// A VMM's run state, as `vm list` and the messages word it.
pub fn state_name(s: RunState) -> &'static str {
    match s {
        RunState::Starting => "Starting",
        RunState::Running => "Running",
        RunState::Paused => "Paused",
        RunState::Stopping => "Stopping",
    }
}

/// The live state of a VM: the VMM's answer when it runs. For views of
/// many VMs, so a VMM that does not answer (yet), or answers in a way
/// this nestvm cannot read, shows as Starting.
pub fn live_state(store: &Store, name: &VmName) -> &'static str {
    match store.state(name) {
        VmState::Off => "Off",
        VmState::Saved => "Saved",
        VmState::Live => {
            let socket = VmDir::of(store, name).control;
            match request::<VmInfo>(&socket, "GET", "/v1/vm", API_TIMEOUT, 200) {
                Ok(Answer::Done(info)) => state_name(info.state),
                // The lock is held but the API is not up yet.
                _ => "Starting",
            }
        }
    }
}

/// The running VM's current or last outgoing migration, as its VMM
/// reports it: `Ok(None)` when it has none or does not answer (a VMM ends
/// once its VM runs elsewhere), an error when its answer does not decode.
pub fn migration(store: &Store, name: &VmName) -> Result<Option<Progress>, ReplyError> {
    let socket = VmDir::of(store, name).control;
    match request::<Progress>(&socket, "GET", "/v1/vm/migration", API_TIMEOUT, 200) {
        Ok(Answer::Done(p)) => Ok(Some(p)),
        Ok(Answer::Refused { .. }) | Err(ReplyError::Call(_)) => Ok(None),
        Err(e) => Err(e),
    }
}

/// The VM's VMM as it answers once its API is up: `None` until it
/// answers, an error when its answer does not decode.
pub fn up(p: &VmDir) -> Result<Option<VmInfo>, ReplyError> {
    match request::<VmInfo>(&p.control, "GET", "/v1/vm", API_TIMEOUT, 200) {
        Ok(Answer::Done(v)) => Ok(Some(v)),
        Err(e @ ReplyError::Undecodable(_)) => Err(e),
        _ => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reply_that_does_not_decode_names_the_reply_and_hides_the_query() {
        let body = serde_json::json!({"state": "Running"});
        let e = decode::<VmInfo>(body, 200, "PUT", "/v1/vm/migrate?token=secret")
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("200 reply to PUT /v1/vm/migrate is not a VmInfo"),
            "{e}"
        );
        assert!(!e.contains("secret"), "{e}");
    }

    #[test]
    fn replies_decode_into_the_vmm_types() {
        let body = serde_json::json!({"name": "c", "parent": null, "created": 1,
            "memory_bytes": 4096, "written_bytes": 0, "vcpus_in_guest_mode": 1});
        let r: nestvm_vmm::api::CheckpointReply = decode(body.clone(), 200, "PUT", "/").unwrap();
        assert_eq!((r.meta.name.as_str(), r.vcpus_in_guest_mode), ("c", 1));
        assert_eq!(
            serde_json::to_value(&r).unwrap(),
            body,
            "the same shape back"
        );
    }
}
