//! The control API's side of dynamic memory: `GET /v1/vm/memory` reports the
//! balloon (policy, what the guest handed over, its statistics) and
//! `PUT /v1/vm/memory?size=BYTES|auto` resizes the running VM within the
//! range its definition allows, or hands the size to the automatic policy.

use nestvm_virtio::balloon::Control;
use serde::{Deserialize, Serialize};

use crate::api::{ApiError, Pending};

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

/// Serves a memory request for a VM whose balloon is `balloon`.
pub(crate) fn serve(req: Pending, balloon: Option<&Control>, memory: u64) {
    let Some(c) = balloon else {
        req.reply(
            409,
            &ApiError {
                error: format!(
                    "this VM has no balloon, so its {} MiB cannot change while it runs: 'nestvm vm set NAME --balloon on' adds one at its next start",
                    memory >> 20
                ),
            },
        );
        return;
    };
    if req.action == crate::api::Action::Memory {
        req.reply(200, &info(c));
        return;
    }
    let size = req
        .query
        .iter()
        .find(|(k, _)| k == "size")
        .map(|(_, v)| v.clone());
    let target = match size.as_deref() {
        Some("auto") => None,
        Some(v) => match v.parse::<u64>() {
            Ok(n) => Some(n),
            Err(_) => {
                req.reply(
                    400,
                    &ApiError {
                        error: format!("size={v} is not a number of bytes or auto"),
                    },
                );
                return;
            }
        },
        None => {
            req.reply(
                400,
                &ApiError {
                    error: "no size given (size=BYTES or size=auto)".into(),
                },
            );
            return;
        }
    };
    match c.set_target(target) {
        Ok(()) => req.reply(200, &info(c)),
        Err(e) => req.reply(409, &ApiError { error: e }),
    }
}
