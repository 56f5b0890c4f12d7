//! Snapshot files: how nestvm keeps a VM's state on disk.
//!
//! - [`container`]: a state file is a header (magic, format version, payload
//!   length, CRC-64 of the payload) and the payload. A file of another
//!   format version, a truncated one or one whose checksum does not match is
//!   refused before anything is loaded from it, and one larger than any
//!   state nestvm writes is refused before it is read.
//! - [`atomic`]: files and whole directories are written so that a crash
//!   (kill -9, power loss) leaves either the old version or the new one,
//!   never a mix: temporary name, fsync, rename, fsync of the directory.
//! - [`layer`]: a checkpoint's memory layer (sparse memory file and page
//!   bitmap) and metadata, the chain from a checkpoint to its root, and
//!   folding a checkpoint's pages into a child before it is removed; its
//!   metadata and page maps are size-checked before they are read.
//! - `bounded`: reading a whole file of at most a limit of bytes.

pub mod atomic;
mod bounded;
pub mod container;
pub mod crc64;
pub mod layer;
