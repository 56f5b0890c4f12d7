//! User-mode networking (`--net user`): each such adapter gets a passt
//! process of its own (Debian's `passt`), which needs no root, no TAP and no
//! bridge. passt gives the guest an address by DHCP (the host's, as passt
//! does), answers DNS and ARP, and carries the guest's TCP and UDP through
//! ordinary sockets of the host; `hostfwd` ports listen on the host and
//! reach the guest.
//!
//! The VMM makes a Unix stream socket pair, hands one end to passt as its
//! `--fd` and keeps the other ([`nestvm_virtio::net_stream::StreamIo`]
//! frames it). passt quits when the VMM's end closes, so it lives at most as
//! long as the VM's process: a restored or arriving VM starts a new one (its
//! guest's TCP connections through passt do not survive that).
//!
//! passt is found and its socket made while the VM is built
//! ([`prepare`]), and started as the VMM begins to run it, before the VMM
//! enters its sandbox ([`Process::start`]); started as root, passt drops
//! to [`RUNAS`] itself. A migrating VM's source stops its passt at the
//! commit point and waits for it to end ([`Stopper::stop`]); the
//! destination starts its own only after that point, so a destination on
//! the same host can bind the same forwarded ports. Its error lines
//! (`--quiet`: errors only) go to the VMM's stderr.

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

/// Prepares passt for `net`: the socket pair, the adapter's end of it
/// (named `name` in reports), and passt itself, found but not yet started
/// ([`Process::start`]: the VMM starts it as it begins to run the VM, so
/// that an arriving VM's passt binds its forwarded ports only once the
/// source's has let go of them).
pub fn prepare(net: &NetConfig, name: String) -> Result<Passt, PasstError> {
    let program = find(PROGRAM)
        .ok_or_else(|| PasstError::Missing(std::io::Error::from(std::io::ErrorKind::NotFound)))?;
    // Checked now, while the VM is built, not when it is about to run.
    arguments(net, 0, false)?;
    let (ours, theirs) = UnixStream::pair().map_err(PasstError::Socket)?;
    ours.set_nonblocking(true).map_err(PasstError::Socket)?;
    let cut = ours.try_clone().map_err(PasstError::Socket)?;
    let fd = ours.as_raw_fd();
    Ok(Passt {
        io: StreamIo::new(ours, fd, format!("{name} (passt)")),
        process: Process {
            name,
            program,
            net: net.clone(),
            theirs: Some(theirs),
            cut,
            pid: None,
        },
    })
}

/// `program` on `PATH`, if it is an executable file there.
fn find(program: &str) -> Option<std::path::PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/bin:/bin".into());
    std::env::split_paths(&path)
        .map(|d| d.join(program))
        .find(|p| {
            p.metadata()
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

/// A prepared passt: the adapter's end of its socket, and its process.
pub struct Passt {
    /// The frames to and from passt.
    pub io: StreamIo<UnixStream>,
    /// passt's process, to start and, at a migration's commit point, stop.
    pub process: Process,
}

/// One adapter's passt process.
pub struct Process {
    name: String,
    program: std::path::PathBuf,
    net: NetConfig,
    /// passt's end of the socket, until passt has its copy.
    theirs: Option<UnixStream>,
    /// The VMM's end, to cut the connection (passt then quits).
    cut: UnixStream,
    pid: Option<u32>,
}

impl Process {
    /// Starts passt (once; later calls do nothing) and returns its pid.
    pub fn start(&mut self) -> Result<u32, PasstError> {
        if let Some(pid) = self.pid {
            return Ok(pid);
        }
        let theirs = self
            .theirs
            .take()
            .ok_or_else(|| PasstError::Spawn(std::io::Error::other("its socket is gone")))?;
        // The standard library's descriptors close on exec: passt's end is
        // made to stay open across it, and closed here once passt has its
        // copy. (Nothing else in the VMM starts programs, so no other can
        // inherit it.)
        nix::fcntl::fcntl(theirs.as_raw_fd(), FcntlArg::F_SETFD(FdFlag::empty()))
            .map_err(|e| PasstError::Socket(e.into()))?;
        let root = nix::unistd::geteuid().is_root();
        let args = arguments(&self.net, theirs.as_raw_fd(), root)?;
        let spawned = Command::new(&self.program)
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn();
        drop(theirs);
        // passt is not waited for while the VM runs: it ends when the
        // VMM's end closes, and is reaped with the VMM.
        let pid = spawned.map_err(PasstError::Spawn)?.id();
        eprintln!("nestvm: {}: passt {pid} serves it", self.name);
        self.pid = Some(pid);
        Ok(pid)
    }

    /// What stops this passt from another thread (a migration's), once
    /// it was started.
    pub fn stopper(&self) -> Option<Stopper> {
        let pid = self.pid?;
        match self.cut.try_clone() {
            Ok(cut) => Some(Stopper {
                name: self.name.clone(),
                cut,
                pid,
            }),
            Err(e) => {
                log::warn!("{}: cannot keep a way to stop passt {pid}: {e}", self.name);
                None
            }
        }
    }
}

/// Stops one started passt.
pub struct Stopper {
    name: String,
    cut: UnixStream,
    pid: u32,
}

impl Stopper {
    /// Stops passt: cuts its socket, which it reads as the VM's end, and
    /// waits for it to exit, so that the ports it forwarded are free when
    /// this returns (a migration's destination on this host binds them).
    /// The adapter's frames go nowhere from then on.
    pub fn stop(self) {
        let _ = self.cut.shutdown(std::net::Shutdown::Both);
        let pid = nix::unistd::Pid::from_raw(self.pid as i32);
        if let Err(e) = nix::sys::wait::waitpid(pid, None) {
            log::warn!("{}: cannot wait for passt {pid} to end: {e}", self.name);
        }
    }
}

#[cfg(test)]
#[path = "passt_tests.rs"]
mod tests;
