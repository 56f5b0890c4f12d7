//! virtio-blk on a raw image file.
//!
//! Requests are a 16-byte header (type, reserved, sector), data buffers, and
//! a one-byte status the device writes last. Reads and writes go to the
//! image with positioned I/O; a flush is `fdatasync`, so data is in the file
//! once the guest's fsync returns. A read-only disk offers VIRTIO_BLK_F_RO
//! and fails writes with IOERR. Every request is checked against the image
//! size and the chain's real lengths; a bad one gets an error status (or, if
//! it has no room for one, is returned unused) and the next one is served.
//! GET_ID answers the serial the VM's definition gives the disk, never the
//! image's name: the host's paths are none of the guest's business.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::Memory;
use nix::fcntl::{Flock, FlockArg};
use virtio_queue::Queue;

use crate::{drain_queue, features, Backend, BackendError, Chain, Served};

/// Sector size of the virtio-blk protocol.
pub const SECTOR: u64 = 512;
/// Entries in the request queue.
pub const QUEUE_SIZE: u16 = 256;
const CHUNK: usize = 128 << 10;
/// Length of the ID string GET_ID returns (VIRTIO_BLK_ID_BYTES); a shorter
/// serial is padded with NULs.
pub const ID_BYTES: usize = 20;

/// Request types.
pub mod request {
    /// Read sectors.
    pub const IN: u32 = 0;
    /// Write sectors.
    pub const OUT: u32 = 1;
    /// Flush the write cache.
    pub const FLUSH: u32 = 4;
    /// Read the device ID string.
    pub const GET_ID: u32 = 8;
}

/// Request status values.
pub mod status {
    /// Success.
    pub const OK: u8 = 0;
    /// The request failed.
    pub const IOERR: u8 = 1;
    /// The request type is not supported.
    pub const UNSUPP: u8 = 2;
}

/// Feature: the device is read-only.
pub const F_RO: u64 = 1 << 5;
/// Feature: `seg_max` in config is valid.
pub const F_SEG_MAX: u64 = 1 << 2;
/// Feature: the device has a write cache and honours FLUSH.
pub const F_FLUSH: u64 = 1 << 9;

/// Errors opening a disk image, and giving back or taking back its lock.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    /// The file cannot be opened.
    #[error("cannot open disk image {path}: check the path and its permissions (add readonly=on for a read-only file)")]
    Open {
        /// The image.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Another process holds the image.
    #[error(
        "disk image {0} is in use by another VM: stop it, or attach the image readonly=on in both"
    )]
    InUse(PathBuf),
    /// A directory, FIFO, socket or character device.
    #[error("disk image {0} is neither a regular file nor a block device: give a raw image file or a block device")]
    NotAFile(PathBuf),
    /// A serial that does not fit the ID string.
    #[error("disk serial {0:?} is not 1 to 20 bytes of printable ASCII: give another serial for the disk")]
    BadSerial(String),
    /// Smaller than one sector.
    #[error("disk image {0} is smaller than one 512-byte sector: give a raw image of at least 512 bytes")]
    TooSmall(PathBuf),
    /// Its lock cannot be given up (for a migration on this host).
    #[error("cannot unlock disk image {path}")]
    Unlock {
        /// The image.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Its lock cannot be taken back (after a failed migration).
    #[error("cannot lock disk image {path} again")]
    Relock {
        /// The image.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

/// Request counters.
#[derive(Debug, Default, Clone, Copy)]
struct Counters {
    reads: u64,
    writes: u64,
    flushes: u64,
    read_bytes: u64,
    write_bytes: u64,
    errors: u64,
    malformed: u64,
}

/// Locks an image: shared if read-only, else exclusive; never waits.
/// Opens block device `path` exclusively and lets it go: fails (EBUSY)
/// where a filesystem is mounted from it or something holds it so.
fn exclusive_probe(path: &Path) -> io::Result<()> {
    OpenOptions::new()
        .read(true)
        .custom_flags((nix::fcntl::OFlag::O_EXCL | nix::fcntl::OFlag::O_NONBLOCK).bits())
        .open(path)
        .map(drop)
}

fn lock_image(file: &File, read_only: bool) -> Result<Flock<File>, std::io::Error> {
    let arg = if read_only {
        FlockArg::LockSharedNonblock
    } else {
        FlockArg::LockExclusiveNonblock
    };
    Flock::lock(file.try_clone()?, arg).map_err(|(_, e)| e.into())
}

/// `serial` as the NUL-padded ID string, if it is 1 to [`ID_BYTES`] bytes
/// of printable ASCII.
fn id_string(serial: &str) -> Result<[u8; ID_BYTES], BlockError> {
    let printable = serial.bytes().all(|b| b.is_ascii_graphic() || b == b' ');
    if serial.is_empty() || serial.len() > ID_BYTES || !printable {
        return Err(BlockError::BadSerial(serial.to_owned()));
    }
    let mut id = [0u8; ID_BYTES];
    id[..serial.len()].copy_from_slice(serial.as_bytes());
    Ok(id)
}

/// A virtio-blk device.
pub struct Block {
    file: File,
    /// The image's lock, on a duplicate of `file` (flock locks belong to the
    /// open file, which both share). `None` while released for a migration
    /// to this same host.
    lock: Option<Flock<File>>,
    path: PathBuf,
    read_only: bool,
    sectors: u64,
    id: [u8; ID_BYTES],
    counters: Counters,
    buf: Vec<u8>,
}

impl Block {
    /// Opens `path` (read-only if asked), locking it against other writers;
    /// the guest reads `serial` (1 to [`ID_BYTES`] bytes of printable ASCII)
    /// as the disk's ID.
    pub fn open(path: &Path, read_only: bool, serial: &str) -> Result<Self, BlockError> {
        let id = id_string(serial)?;
        let open_err = |source| BlockError::Open {
            path: path.to_owned(),
            source,
        };
        // Never blocks (a FIFO would wait for a peer); only regular files
        // and block devices are disks.
        let file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .custom_flags(nix::fcntl::OFlag::O_NONBLOCK.bits())
            .open(path)
            .map_err(open_err)?;
        let meta = file.metadata().map_err(open_err)?;
        let device = meta.file_type().is_block_device();
        if !meta.is_file() && !device {
            return Err(BlockError::NotAFile(path.to_owned()));
        }
        // A device mounted or held exclusively elsewhere (a filesystem, LVM)
        // is refused for writing: an exclusive open of it fails.
        if device && !read_only && exclusive_probe(path).is_err() {
            return Err(BlockError::InUse(path.to_owned()));
        }
        let lock = lock_image(&file, read_only).map_err(|_| BlockError::InUse(path.to_owned()))?;
        // A block device's size is where its end is (its metadata says 0).
        let len = if device {
            (&file).seek(SeekFrom::End(0)).map_err(open_err)?
        } else {
            meta.len()
        };
        if len < SECTOR {
            return Err(BlockError::TooSmall(path.to_owned()));
        }
        if len % SECTOR != 0 {
            log::warn!(
                "disk image {} is not a whole number of sectors; the last {} bytes are not visible",
                path.display(),
                len % SECTOR
            );
        }
        Ok(Self {
            file,
            lock: Some(lock),
            path: path.to_owned(),
            read_only,
            sectors: len / SECTOR,
            id,
            counters: Counters::default(),
            buf: vec![0; CHUNK],
        })
    }

    /// Capacity in sectors.
    pub fn sectors(&self) -> u64 {
        self.sectors
    }

    /// Serves one request; returns the bytes written into the chain.
    pub fn handle(&mut self, chain: Chain<'_>, mem: &Memory) -> u32 {
        let (Ok(mut reader), Ok(mut writer)) = (chain.clone().reader(mem), chain.writer(mem))
        else {
            self.counters.malformed += 1;
            return 0;
        };
        let writable = writer.available_bytes();
        if writable == 0 {
            // Nowhere to put a status: hand the chain back untouched.
            self.counters.malformed += 1;
            return 0;
        }
        let Ok(mut status_at) = writer.split_at(writable - 1) else {
            self.counters.malformed += 1;
            return 0;
        };
        let mut header = [0u8; 16];
        let status = if reader.read_exact(&mut header).is_err() {
            self.counters.malformed += 1;
            status::IOERR
        } else {
            let kind = u32::from_le_bytes(header[0..4].try_into().unwrap_or_default());
            let sector = u64::from_le_bytes(header[8..16].try_into().unwrap_or_default());
            match self.execute(kind, sector, &mut reader, &mut writer) {
                Ok(()) => status::OK,
                Err(s) => {
                    self.counters.errors += 1;
                    s
                }
            }
        };
        let _ = status_at.write_all(&[status]);
        (writer.bytes_written() + 1) as u32
    }

    /// Byte offset of `len` bytes at `sector`, if they lie inside the image.
    fn range(&self, sector: u64, len: usize) -> Result<u64, u8> {
        let len = len as u64;
        if len % SECTOR != 0 {
            return Err(status::IOERR);
        }
        let end = sector.checked_add(len / SECTOR).ok_or(status::IOERR)?;
        if end > self.sectors {
            return Err(status::IOERR);
        }
        Ok(sector * SECTOR)
    }

    fn execute(
        &mut self,
        kind: u32,
        sector: u64,
        reader: &mut virtio_queue::Reader<'_, crate::DirtySlice<'_>>,
        writer: &mut virtio_queue::Writer<'_, crate::DirtySlice<'_>>,
    ) -> Result<(), u8> {
        match kind {
            request::IN => {
                let total = writer.available_bytes();
                let mut at = self.range(sector, total)?;
                let mut left = total;
                while left > 0 {
                    let n = left.min(CHUNK);
                    self.file
                        .read_exact_at(&mut self.buf[..n], at)
                        .map_err(|_| status::IOERR)?;
                    writer
                        .write_all(&self.buf[..n])
                        .map_err(|_| status::IOERR)?;
                    at += n as u64;
                    left -= n;
                }
                self.counters.reads += 1;
                self.counters.read_bytes += total as u64;
                Ok(())
            }
            request::OUT => {
                if self.read_only {
                    return Err(status::IOERR);
                }
                let total = reader.available_bytes();
                let mut at = self.range(sector, total)?;
                let mut left = total;
                while left > 0 {
                    let n = left.min(CHUNK);
                    reader
                        .read_exact(&mut self.buf[..n])
                        .map_err(|_| status::IOERR)?;
                    self.file
                        .write_all_at(&self.buf[..n], at)
                        .map_err(|_| status::IOERR)?;
                    at += n as u64;
                    left -= n;
                }
                self.counters.writes += 1;
                self.counters.write_bytes += total as u64;
                Ok(())
            }
            request::FLUSH => {
                self.counters.flushes += 1;
                if self.read_only {
                    return Ok(());
                }
                self.file.sync_data().map_err(|_| status::IOERR)
            }
            request::GET_ID => {
                let n = writer.available_bytes().min(self.id.len());
                writer.write_all(&self.id[..n]).map_err(|_| status::IOERR)
            }
            _ => Err(status::UNSUPP),
        }
    }
}

impl Backend for Block {
    fn device_type(&self) -> u32 {
        2
    }
    fn release(&mut self) -> Result<(), BackendError> {
        if let Some(lock) = self.lock.take() {
            lock.unlock().map_err(|(_, e)| BlockError::Unlock {
                path: self.path.clone(),
                source: e.into(),
            })?;
        }
        Ok(())
    }

    fn reclaim(&mut self) -> Result<(), BackendError> {
        if self.lock.is_none() {
            let lock =
                lock_image(&self.file, self.read_only).map_err(|source| BlockError::Relock {
                    path: self.path.clone(),
                    source,
                })?;
            self.lock = Some(lock);
        }
        Ok(())
    }

    fn image(&self) -> Option<&File> {
        Some(&self.file)
    }

    fn kind(&self) -> &'static str {
        "block"
    }
    fn describe(&self) -> String {
        format!(
            "{}{}",
            self.path.display(),
            if self.read_only { " (read-only)" } else { "" }
        )
    }
    fn features(&self) -> u64 {
        let ro = if self.read_only { F_RO } else { 0 };
        features::VERSION_1 | features::RING_EVENT_IDX | F_FLUSH | F_SEG_MAX | ro
    }
    fn queue_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }
    fn config(&self) -> Vec<u8> {
        // capacity (u64), size_max (u32, unused), seg_max (u32).
        let mut c = Vec::with_capacity(16);
        c.extend_from_slice(&self.sectors.to_le_bytes());
        c.extend_from_slice(&0u32.to_le_bytes());
        c.extend_from_slice(&u32::from(QUEUE_SIZE - 2).to_le_bytes());
        c
    }
    fn activate(&mut self, _features: u64) -> Result<(), BackendError> {
        Ok(())
    }
    fn process_queue(&mut self, _q: usize, queues: &mut [Queue], mem: &Memory) -> Served {
        let Some(queue) = queues.first_mut() else {
            return Served::NOTHING;
        };
        drain_queue(queue, mem, |chain| self.handle(chain, mem))
    }
    fn counters(&self) -> Vec<(&'static str, u64)> {
        let c = self.counters;
        vec![
            ("reads", c.reads),
            ("writes", c.writes),
            ("flushes", c.flushes),
            ("read_bytes", c.read_bytes),
            ("write_bytes", c.write_bytes),
            ("errors", c.errors),
            ("malformed", c.malformed),
        ]
    }
}

#[cfg(test)]
#[path = "block_tests.rs"]
mod tests;
