//! The state a virtio backend carries in snapshots and migrations beyond its
//! transport's registers: one typed, versioned variant per device that has
//! any (today only the balloon; a disk's state is its image, and a network
//! adapter loses at most the frame it held, like a lost packet).
//!
//! A saved state is untrusted input, like the rest of a snapshot: one of
//! another device, of a version this build does not read, or missing where
//! the device needs one, is refused with a [`StateError`].

use serde::{Deserialize, Serialize};

use crate::balloon::BalloonState;

/// A backend's own saved state, tagged with the device it belongs to
/// (`"device": "balloon"` in the JSON). Each variant carries its own
/// `version`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "device", rename_all = "snake_case")]
pub enum DeviceState {
    /// A balloon's target and what the guest handed over.
    Balloon(BalloonState),
}

impl DeviceState {
    /// The kind of device it belongs to, as [`crate::Backend::kind`] says it.
    pub fn kind(&self) -> &'static str {
        match self {
            DeviceState::Balloon(_) => "balloon",
        }
    }
}

/// Errors taking back a saved device state.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// A version this build does not read (a newer nestvm wrote it).
    #[error("the saved {device} state is version {found}; this nestvm reads version {supported}")]
    Version {
        /// The device.
        device: &'static str,
        /// The saved version.
        found: u16,
        /// The one this build reads.
        supported: u16,
    },
    /// The state of another kind of device.
    #[error("a saved {found} state cannot be restored into a {device} device")]
    WrongDevice {
        /// The device restored.
        device: &'static str,
        /// The device the state belongs to.
        found: &'static str,
    },
    /// A device that needs a saved state got none.
    #[error("the saved {device} device has no state of its own")]
    Missing {
        /// The device.
        device: &'static str,
    },
}

/// Refuses a saved `found` version other than `supported`.
pub fn check_version(device: &'static str, found: u16, supported: u16) -> Result<(), StateError> {
    if found == supported {
        Ok(())
    } else {
        Err(StateError::Version {
            device,
            found,
            supported,
        })
    }
}
