//! The control API's side of dynamic memory: `GET /v1/vm/memory` reports the
//! balloon (policy, what the guest handed over, its statistics) and
//! `PUT /v1/vm/memory?size=BYTES|auto` resizes the running VM within the
//! range its definition allows, or hands the size to the automatic policy.

use nestvm_virtio::balloon::Control;
use serde::{Deserialize, Serialize};

use crate::api::Refusal;

/// What `GET /v1/vm/memory` answers.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MemoryInfo {
    /// The VM's RAM: the most it can have, bytes.
    pub max: u64,
    /// The least it may be shrunk to.
    pub min: u64,
    /// Whether the size follows the guest's demand.
    pub auto: bool,
    /// The size asked for.
    pub target: u64,
    /// The size the guest has now: max minus what it handed over.
    pub current: u64,
    /// Bytes freed on the host from the guest's free-page reports.
    pub reported: u64,
    /// The guest's latest statistics (bytes, or counts).
    pub stats: std::collections::BTreeMap<String, u64>,
    /// Their age in milliseconds.
    pub stats_age_ms: Option<u64>,
}

fn info(c: &Control) -> MemoryInfo {
    let s = c.status();
    MemoryInfo {
        max: s.policy.max,
        min: s.policy.min,
        auto: s.policy.auto,
        target: s.policy.target,
        current: s.policy.max.saturating_sub(s.ballooned),
        reported: s.reported,
        stats_age_ms: s.stats_age().map(|a| a.as_millis() as u64),
        stats: s.stats,
    }
}

/// The balloon's controls, or why this VM of `memory` bytes has none (409).
fn control(balloon: Option<&Control>, memory: u64) -> Result<&Control, Refusal> {
    balloon.ok_or_else(|| Refusal {
        status: 409,
        error: format!(
            "this VM has no balloon, so its {} MiB cannot change while it runs: 'nestvm vm set NAME --balloon on' adds one at its next start",
            memory >> 20
        ),
        allow: None,
    })
}

/// `GET /v1/vm/memory`.
pub(crate) fn memory(balloon: Option<&Control>, memory: u64) -> Result<MemoryInfo, Refusal> {
    control(balloon, memory).map(info)
}

/// `PUT /v1/vm/memory?size=`: `target` bytes, or `None` for the automatic
/// policy; a size outside the definition's range is refused (409).
pub(crate) fn resize(
    balloon: Option<&Control>,
    memory: u64,
    target: Option<u64>,
) -> Result<MemoryInfo, Refusal> {
    let c = control(balloon, memory)?;
    c.set_target(target).map_err(|e| Refusal {
        status: 409,
        error: e.to_string(),
        allow: None,
    })?;
    Ok(info(c))
}
