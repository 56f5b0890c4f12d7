//! A VM's vsock device in its settings: `--vsock cid=N[,socket=PATH]`, its
//! TOML form (`[vsock]`), and its checks.
//!
//! The guest's CID is what its programs see as their own address; the host
//! side is a Unix socket (`socket`, by default `vsock.sock` in the VMM's
//! directory: a managed VM's own). A host program connects to it and
//! writes `CONNECT <port>`; a guest connecting to host port P reaches
//! `<socket>_P`.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// The host socket's name when none is given.
pub const DEFAULT_SOCKET: &str = "vsock.sock";

/// Errors in a vsock setting.
#[derive(Debug, thiserror::Error)]
pub enum VsockConfigError {
    /// A `--vsock` value that does not parse.
    #[error("invalid --vsock '{0}': use cid=N[,socket=PATH] (N from 3, below 4294967295)")]
    Bad(String),
    /// A CID the guest cannot have.
    #[error("vsock cid {0} is reserved: give the guest a CID of 3 or more, below 4294967295")]
    Cid(u32),
}

/// A virtio-vsock device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VsockConfig {
    /// The guest's CID.
    pub cid: u32,
    /// The host side's socket (default [`DEFAULT_SOCKET`], relative to the
    /// VMM's directory).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub socket: Option<PathBuf>,
}

impl VsockConfig {
    /// The host socket's path.
    pub fn socket_path(&self) -> PathBuf {
        self.socket
            .clone()
            .unwrap_or_else(|| PathBuf::from(DEFAULT_SOCKET))
    }

    /// Checks the CID.
    pub fn validate(&self) -> Result<(), VsockConfigError> {
        if self.cid < 3 || self.cid == u32::MAX {
            return Err(VsockConfigError::Cid(self.cid));
        }
        Ok(())
    }
}

/// Parses `cid=N[,socket=PATH]`.
pub fn parse_vsock(s: &str) -> Result<VsockConfig, VsockConfigError> {
    let bad = || VsockConfigError::Bad(s.to_owned());
    let mut cid = None;
    let mut socket = None;
    for part in s.split(',') {
        match part.split_once('=') {
            Some(("cid", v)) => cid = Some(v.parse::<u32>().map_err(|_| bad())?),
            Some(("socket", v)) if !v.is_empty() => socket = Some(PathBuf::from(v)),
            _ => return Err(bad()),
        }
    }
    let v = VsockConfig {
        cid: cid.ok_or_else(bad)?,
        socket,
    };
    v.validate()?;
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vsock_flags_parse_or_say_how() {
        let v = parse_vsock("cid=3").unwrap();
        assert_eq!((v.cid, v.socket_path()), (3, PathBuf::from("vsock.sock")));
        let v = parse_vsock("cid=42,socket=/run/v.sock").unwrap();
        assert_eq!(v.socket_path(), PathBuf::from("/run/v.sock"));
        for bad in [
            "",
            "cid=",
            "cid=x",
            "3",
            "cid=3,port=1",
            "socket=/x",
            "cid=3,socket=",
        ] {
            let e = parse_vsock(bad).unwrap_err().to_string();
            assert!(e.contains("use cid=N"), "{bad}: {e}");
        }
        for reserved in ["cid=0", "cid=2", "cid=4294967295"] {
            let e = parse_vsock(reserved).unwrap_err().to_string();
            assert!(e.contains("reserved"), "{reserved}: {e}");
        }
    }
}
