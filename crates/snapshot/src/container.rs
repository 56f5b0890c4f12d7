//! The state file container:
//!
//! | bytes | field |
//! |---|---|
//! | 8 | magic `NESTVMSS` |
//! | 4 | format version, little-endian |
//! | 4 | reserved, zero |
//! | 8 | payload length |
//! | 8 | CRC-64/XZ of the payload |
//! | n | payload |

use std::path::{Path, PathBuf};

use crate::bounded::BoundedError;
use crate::crc64::crc64;

/// The file's first bytes.
pub const MAGIC: &[u8; 8] = b"NESTVMSS";
/// The format this nestvm writes and reads.
pub const VERSION: u32 = 1;
const HEADER: usize = 32;
/// The largest payload [`read`] accepts: far above what a VM of 255 vCPUs
/// with every device saves, so that a hostile or broken file is refused by
/// its size before it is read.
pub const MAX_PAYLOAD: u64 = 256 << 20;

/// Why a state file was refused.
#[derive(Debug, thiserror::Error)]
pub enum ContainerError {
    /// It cannot be read.
    #[error("cannot read snapshot {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// It is larger than any state file nestvm writes.
    #[error("snapshot {path} is larger than {limit} bytes, more than any state nestvm writes; it was not loaded")]
    TooLarge {
        /// The file.
        path: PathBuf,
        /// The largest file accepted.
        limit: u64,
    },
    /// It is not a nestvm snapshot.
    #[error("{0} is not a nestvm snapshot")]
    NotASnapshot(PathBuf),
    /// Another format version.
    #[error("snapshot {path} has format version {found}; this nestvm reads version {VERSION}: restore it with the nestvm that made it")]
    Version {
        /// The file.
        path: PathBuf,
        /// Its version.
        found: u32,
    },
    /// Shorter or longer than its header says.
    #[error("snapshot {path} is truncated or has trailing bytes ({found} payload bytes, header says {expected})")]
    Length {
        /// The file.
        path: PathBuf,
        /// Payload bytes present.
        found: u64,
        /// Payload bytes announced.
        expected: u64,
    },
    /// The checksum does not match: the file is corrupted.
    #[error("snapshot {0} is corrupted (checksum mismatch); it was not loaded")]
    Checksum(PathBuf),
}

/// The file bytes for `payload`.
pub fn encode(payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER + payload.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(&crc64(payload).to_le_bytes());
    out.extend_from_slice(payload);
    out
}

/// The payload of `bytes` (read from `path`), once every check passes.
pub fn decode<'a>(path: &Path, bytes: &'a [u8]) -> Result<&'a [u8], ContainerError> {
    let path = || path.to_owned();
    if bytes.len() < HEADER || &bytes[..8] != MAGIC {
        return Err(ContainerError::NotASnapshot(path()));
    }
    let u32_at = |o: usize| u32::from_le_bytes(bytes[o..o + 4].try_into().unwrap_or_default());
    let u64_at = |o: usize| u64::from_le_bytes(bytes[o..o + 8].try_into().unwrap_or_default());
    let found = u32_at(8);
    if found != VERSION {
        return Err(ContainerError::Version {
            path: path(),
            found,
        });
    }
    let expected = u64_at(16);
    let payload = &bytes[HEADER..];
    if payload.len() as u64 != expected {
        return Err(ContainerError::Length {
            path: path(),
            found: payload.len() as u64,
            expected,
        });
    }
    if crc64(payload) != u64_at(24) {
        return Err(ContainerError::Checksum(path()));
    }
    Ok(payload)
}

/// Reads and checks the state file at `path`; returns its payload. A file
/// of more than [`MAX_PAYLOAD`] bytes of payload is refused unread.
pub fn read(path: &Path) -> Result<Vec<u8>, ContainerError> {
    let limit = HEADER as u64 + MAX_PAYLOAD;
    let bytes = crate::bounded::read(path, limit).map_err(|e| match e {
        BoundedError::Io(source) => ContainerError::Read {
            path: path.to_owned(),
            source,
        },
        BoundedError::TooLarge(limit) => ContainerError::TooLarge {
            path: path.to_owned(),
            limit,
        },
    })?;
    decode(path, &bytes).map(<[u8]>::to_vec)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_every_refusal() {
        let p = Path::new("s");
        let file = encode(b"hello state");
        assert_eq!(decode(p, &file).unwrap(), b"hello state");
        // Any flipped payload bit is caught.
        for i in HEADER..file.len() {
            let mut bad = file.clone();
            bad[i] ^= 0x10;
            assert!(
                matches!(decode(p, &bad), Err(ContainerError::Checksum(_))),
                "byte {i}"
            );
        }
        let mut v2 = file.clone();
        v2[8] = 2;
        let e = decode(p, &v2).unwrap_err();
        assert!(e.to_string().contains("format version 2"), "{e}");
        assert!(matches!(
            decode(p, &file[..file.len() - 1]),
            Err(ContainerError::Length { .. })
        ));
        assert!(matches!(
            decode(p, b"garbage"),
            Err(ContainerError::NotASnapshot(_))
        ));
        assert!(matches!(
            decode(p, &[]),
            Err(ContainerError::NotASnapshot(_))
        ));
    }

    #[test]
    fn a_state_file_larger_than_any_state_is_refused_unread() {
        let d = std::env::temp_dir().join(format!("nestvm-container-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        let p = d.join("state");
        std::fs::write(&p, encode(b"small")).unwrap();
        assert_eq!(read(&p).unwrap(), b"small");
        std::fs::File::create(&p)
            .unwrap()
            .set_len(HEADER as u64 + MAX_PAYLOAD + 1)
            .unwrap();
        let e = read(&p).unwrap_err();
        assert!(matches!(e, ContainerError::TooLarge { .. }), "{e}");
        assert!(e.to_string().contains("larger than"), "{e}");
    }
}
