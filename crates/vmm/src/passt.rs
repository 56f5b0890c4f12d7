//! User-mode networking (`--net user`): each such adapter gets a passt
//! process of its own (Debian's `passt`), which needs no root, no TAP and no
//! bridge. passt gives the guest an address by DHCP (the host's, as passt
//! does), answers DNS and ARP, and carries the guest's TCP and UDP through
//! ordinary sockets of the host; `hostfwd` ports listen on the host and
//! reach the guest.
//!
//! The VMM makes a Unix stream socket pair, hands one end to passt as its
//! `--fd` and keeps the other ([`nestvm_virtio::net_stream::StreamIo`]
//! frames it). passt quits when the VMM's end closes, so it lives exactly as
//! long as the VM's process: a restored or arriving VM starts a new one (its
//! guest's TCP connections through passt do not survive that).
//!
//! passt is started while the VM is built, before the VMM gives up root or
//! enters its sandbox; started as root, passt drops to [`RUNAS`] itself.
//! Its error lines (`--quiet`: errors only) go to the VMM's stderr.

use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::process::{Command, Stdio};

use nestvm_virtio::net_stream::StreamIo;
use nix::fcntl::{FcntlArg, FdFlag};

use crate::adapters::parse_hostfwd;
use crate::adapters::NetConfig;

/// The program started for each user-mode adapter.
pub const PROGRAM: &str = "passt";

/// Errors starting passt.
#[derive(Debug, thiserror::Error)]
pub enum PasstError {
    /// passt is not installed.
    #[error("--net user needs passt, which is not installed: install Debian's package (apt install passt)")]
    Missing(#[source] std::io::Error),
    /// passt would not start.
    #[error("cannot start passt for a --net user adapter")]
    Spawn(#[source] std::io::Error),
    /// The socket pair between the VMM and passt.
    #[error("cannot make the socket pair for passt")]
    Socket(#[source] std::io::Error),
    /// A port forward that slipped past validation.
    #[error("invalid hostfwd '{0}': use tcp:HOSTPORT-:GUESTPORT or udp:HOSTPORT-:GUESTPORT")]
    BadForward(String),
}

/// The user passt becomes when started as root: Debian's `nobody`, by
/// number, so that it needs no user database (a lab's or a container's may
/// have none).
pub const RUNAS: &str = "65534:65534";

/// passt's arguments for `net`, its socket being descriptor `fd`; `root`
/// when the VMM starting it is root.
pub fn arguments(net: &NetConfig, fd: i32, root: bool) -> Result<Vec<String>, PasstError> {
    let mut args: Vec<String> = ["--foreground", "--quiet", "--fd"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    args.push(fd.to_string());
    if root {
        args.extend(["--runas".to_owned(), RUNAS.to_owned()]);
    }
    for f in &net.hostfwd {
        let (udp, host, guest) =
            parse_hostfwd(f).ok_or_else(|| PasstError::BadForward(f.clone()))?;
        args.push(if udp { "-u" } else { "-t" }.to_owned());
        args.push(format!("{host}:{guest}"));
    }
    Ok(args)
}

/// Starts passt for `net` and returns the adapter's end of its socket,
/// named `name` in reports.
pub fn start(net: &NetConfig, name: String) -> Result<Passt, PasstError> {
    let (ours, theirs) = UnixStream::pair().map_err(PasstError::Socket)?;
    ours.set_nonblocking(true).map_err(PasstError::Socket)?;
    // The standard library's descriptors close on exec: passt's end is
    // made to stay open across it, and closed here once passt has its copy.
    // (Nothing else in the VMM starts programs, so no other can inherit it.)
    nix::fcntl::fcntl(theirs.as_raw_fd(), FcntlArg::F_SETFD(FdFlag::empty()))
        .map_err(|e| PasstError::Socket(e.into()))?;
    let root = nix::unistd::geteuid().is_root();
    let args = arguments(net, theirs.as_raw_fd(), root)?;
    let spawned = Command::new(PROGRAM)
        .args(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn();
    drop(theirs);
    let pid = match spawned {
        // passt is not waited for: it ends when the VMM's end closes, and
        // is reaped with the VMM.
        Ok(child) => child.id(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(PasstError::Missing(e)),
        Err(e) => return Err(PasstError::Spawn(e)),
    };
    let fd = ours.as_raw_fd();
    Ok(Passt {
        // Reports name the adapter with its passt.
        io: StreamIo::new(ours, fd, format!("{name} (passt {pid})")),
        pid,
    })
}

/// A started passt: the adapter's end of its socket, and its process.
pub struct Passt {
    /// The frames to and from passt.
    pub io: StreamIo<UnixStream>,
    /// passt's process ID.
    pub pid: u32,
}

#[cfg(test)]
#[path = "passt_tests.rs"]
mod tests;
