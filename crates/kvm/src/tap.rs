//! TAP network devices: the host side of a guest's network adapter.
//!
//! A TAP is a file descriptor on `/dev/net/tun` bound to a named interface;
//! each `read` returns one Ethernet frame the host sent towards the guest,
//! each `write` injects one frame as if it came in on the interface. nestvm
//! opens it with a virtio-net header in front of every frame
//! (`IFF_VNET_HDR`), so checksum and segmentation offloads pass straight
//! through between the guest and the host stack.
//!
//! This lives beside the KVM boundary because it is the other place nestvm
//! needs `ioctl`s; the device model above sees only [`std::io`] calls.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

/// Length of the virtio-net header nestvm asks the TAP to carry (the
/// VIRTIO_F_VERSION_1 layout, `num_buffers` included).
pub const VNET_HDR_LEN: usize = 12;
/// Longest interface name Linux accepts (IFNAMSIZ less the NUL).
pub const MAX_NAME_LEN: usize = 15;

/// Offloads the TAP may hand us in frames bound for the guest.
pub mod offload {
    /// Partial checksums.
    pub const CSUM: u32 = libc::TUN_F_CSUM;
    /// TCP segmentation over IPv4.
    pub const TSO4: u32 = libc::TUN_F_TSO4;
    /// TCP segmentation over IPv6.
    pub const TSO6: u32 = libc::TUN_F_TSO6;
}

/// Errors opening or configuring a TAP.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    /// The name cannot be an interface name.
    #[error("invalid TAP name '{0}': use 1 to {MAX_NAME_LEN} letters, digits, '-', '_' or '.'")]
    BadName(String),
    /// `/dev/net/tun` cannot be opened.
    #[error("cannot open /dev/net/tun: load the tun module (modprobe tun)")]
    OpenTun(#[source] io::Error),
    /// The kernel refused to bind or create the interface.
    #[error("cannot open TAP device '{name}': {hint}")]
    Attach {
        /// The interface.
        name: String,
        /// What the user can do about it.
        hint: &'static str,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A configuration ioctl failed.
    #[error("cannot configure TAP device '{name}' ({what})")]
    Configure {
        /// The interface.
        name: String,
        /// The setting.
        what: &'static str,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

/// An open TAP device, non-blocking.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
}

/// Whether the kernel takes `name` as an interface name (its
/// `dev_valid_name`): it fits `ifreq` with its NUL, is not `.` or `..`, and
/// has no '/', ':' or white space. (A VM's definition is stricter:
/// nestvm-config's `valid_tap_name`.)
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name != "."
        && name != ".."
        && !name
            .bytes()
            .any(|b| b == b'/' || b == b':' || b == 0 || b.is_ascii_whitespace())
}

impl Tap {
    /// Opens the TAP interface `name`, creating it if it does not exist and
    /// this process may create interfaces (CAP_NET_ADMIN). A TAP created here
    /// disappears when nestvm closes it.
    pub fn open(name: &str) -> Result<Self, TapError> {
        if !valid_name(name) {
            return Err(TapError::BadName(name.to_owned()));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(TapError::OpenTun)?;
        // SAFETY: ifreq is plain old data; all-zero is a valid value.
        let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
        for (dst, src) in ifr.ifr_name.iter_mut().zip(name.bytes()) {
            *dst = src as libc::c_char;
        }
        ifr.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as i16;
        // SAFETY: TUNSETIFF reads and writes one ifreq, which `ifr` is and
        // which outlives the call; the fd is ours and open.
        let rc = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut ifr) };
        if rc < 0 {
            let source = io::Error::last_os_error();
            let hint = match source.raw_os_error() {
                Some(libc::EPERM) => {
                    "permission denied: create it first (ip tuntap add NAME mode tap user USER) or run nestvm as root"
                }
                Some(libc::EBUSY) => "another process has it open: give each VM its own TAP",
                Some(libc::EINVAL) => "an interface of that name exists and is not a TAP: pick another name",
                _ => "the kernel refused it",
            };
            return Err(TapError::Attach {
                name: name.to_owned(),
                hint,
                source,
            });
        }
        let tap = Self {
            file,
            name: name.to_owned(),
        };
        let hdr_len = VNET_HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads one int through the pointer, which
        // points at `hdr_len` for the duration of the call.
        let rc = unsafe { libc::ioctl(tap.file.as_raw_fd(), libc::TUNSETVNETHDRSZ, &hdr_len) };
        if rc < 0 {
            return Err(tap.configure_error("virtio-net header size"));
        }
        tap.set_offload(0)?;
        Ok(tap)
    }

    fn configure_error(&self, what: &'static str) -> TapError {
        TapError::Configure {
            name: self.name.clone(),
            what,
            source: io::Error::last_os_error(),
        }
    }

    /// The interface name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Tells the TAP which [`offload`]s the guest accepts in received frames.
    pub fn set_offload(&self, flags: u32) -> Result<(), TapError> {
        // SAFETY: TUNSETOFFLOAD takes its argument by value; no memory is
        // passed. The fd is ours and open.
        let rc = unsafe {
            libc::ioctl(
                self.file.as_raw_fd(),
                libc::TUNSETOFFLOAD,
                libc::c_ulong::from(flags),
            )
        };
        if rc < 0 {
            return Err(self.configure_error("offloads"));
        }
        Ok(())
    }

    /// Reads one frame (virtio-net header first); `WouldBlock` when none waits.
    pub fn read_frame(&self, buf: &mut [u8]) -> io::Result<usize> {
        io::Read::read(&mut &self.file, buf)
    }

    /// Writes one frame (virtio-net header first).
    pub fn write_frame(&self, frame: &[u8]) -> io::Result<usize> {
        io::Write::write(&mut &self.file, frame)
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(valid_name("tap0"));
        assert!(valid_name("nv-web.1_x"));
        for bad in [
            "",
            ".",
            "..",
            "a/b",
            "a:b",
            "a\0b",
            "sixteen-chars-xx",
            "tap 0",
        ] {
            assert!(!valid_name(bad), "{bad:?}");
        }
        let e = Tap::open("bad name").unwrap_err();
        assert!(e.to_string().contains("invalid TAP name"), "{e}");
    }

    #[test]
    fn create_and_exchange_frames_when_root() {
        // Creating a TAP needs CAP_NET_ADMIN and /dev/net/tun; CI runs as root.
        let name = format!("nvt{}", std::process::id() % 100_000);
        let tap = match Tap::open(&name) {
            Ok(t) => t,
            Err(e) => {
                eprintln!("skipping: {e}");
                return;
            }
        };
        assert_eq!(tap.name(), name);
        tap.set_offload(offload::CSUM | offload::TSO4 | offload::TSO6)
            .unwrap();
        // Interface down: nothing to read, and a write is accepted or refused
        // with an I/O error, never a hang.
        let mut buf = [0u8; 2048];
        let e = tap.read_frame(&mut buf).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
        let mut frame = vec![0u8; VNET_HDR_LEN + 60];
        frame[VNET_HDR_LEN..VNET_HDR_LEN + 6].fill(0xff);
        let _ = tap.write_frame(&frame);
        // A second open of the same TAP while we hold it is refused.
        assert!(Tap::open(&name).is_err());
    }

    #[test]
    fn an_existing_persistent_tap_is_opened_not_created() {
        // Made beforehand with iproute2, as an administrator would (root).
        let name = format!("nvp{}", std::process::id() % 100_000);
        let made = std::process::Command::new("ip")
            .args(["tuntap", "add", "dev", &name, "mode", "tap"])
            .status()
            .is_ok_and(|s| s.success());
        if !made {
            eprintln!("skipping: cannot create a persistent TAP here (not root, or no iproute2)");
            return;
        }
        let opened = Tap::open(&name).map(|t| t.name().to_owned());
        // The Tap is closed here; a persistent interface stays.
        let still_there = std::path::Path::new("/sys/class/net").join(&name).exists();
        let _ = std::process::Command::new("ip")
            .args(["tuntap", "del", "dev", &name, "mode", "tap"])
            .status();
        assert_eq!(opened.unwrap(), name);
        assert!(still_there, "a persistent TAP outlives nestvm");
    }
}
