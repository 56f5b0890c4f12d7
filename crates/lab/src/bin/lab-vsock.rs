//! `lab-vsock`: the two ends of a vsock stream for the lab, one line each
//! way, so a scenario checks nestvm's virtio-vsock device against Linux's
//! own driver (`vmw_vsock_virtio_transport`) in both directions.
//!
//! In the guest (AF_VSOCK):
//! - `lab-vsock serve PORT`: accepts one connection on PORT, answers the
//!   line it reads with `guest got: LINE`.
//! - `lab-vsock connect CID PORT LINE`: sends LINE, prints the answer.
//!
//! On the host (nestvm's hybrid Unix sockets):
//! - `lab-vsock host-serve SOCKET_PORT`: listens on `<socket>_<port>`
//!   (connectable by the VMM's unprivileged user), answers one line with
//!   `host got: LINE`.
//! - `lab-vsock host-connect SOCKET PORT LINE`: `CONNECT PORT`, then as
//!   `connect`; prints the `OK` line and the answer.

use std::io::{BufRead, BufReader, Write};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};

use anyhow::{bail, Context};
use nix::sys::socket::{self, AddressFamily, MsgFlags, SockFlag, SockType, VsockAddr};

/// VMADDR_CID_ANY: listen whatever the guest's CID.
const CID_ANY: u32 = u32::MAX;

fn vsock() -> anyhow::Result<OwnedFd> {
    Ok(socket::socket(
        AddressFamily::Vsock,
        SockType::Stream,
        SockFlag::empty(),
        None,
    )?)
}

/// Reads one line from socket `fd`.
fn recv_line(fd: RawFd) -> anyhow::Result<String> {
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while line.last() != Some(&b'\n') {
        if socket::recv(fd, &mut b, MsgFlags::empty())? == 0 {
            break;
        }
        line.push(b[0]);
    }
    Ok(String::from_utf8_lossy(&line).trim_end().to_owned())
}

fn send_all(fd: RawFd, mut bytes: &[u8]) -> anyhow::Result<()> {
    while !bytes.is_empty() {
        let n = socket::send(fd, bytes, MsgFlags::empty())?;
        bytes = &bytes[n..];
    }
    Ok(())
}

/// Reads one line from `s`, answers it with `prefix` + the line.
fn answer(s: UnixStream, prefix: &str) -> anyhow::Result<()> {
    let mut r = BufReader::new(s.try_clone()?);
    let mut line = String::new();
    r.read_line(&mut line)?;
    let mut s = s;
    s.write_all(format!("{prefix}{}\n", line.trim_end()).as_bytes())?;
    Ok(())
}

/// Sends `line` on `s`, prints the answer.
fn ask(s: UnixStream, line: &str) -> anyhow::Result<()> {
    let mut w = s.try_clone()?;
    w.write_all(format!("{line}\n").as_bytes())?;
    let mut r = BufReader::new(s);
    let mut reply = String::new();
    r.read_line(&mut reply)?;
    println!("reply: {}", reply.trim_end());
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let a: Vec<String> = std::env::args().skip(1).collect();
    let arg = |i: usize| a.get(i).map(String::as_str).context("missing argument");
    match arg(0)? {
        "serve" => {
            let port: u32 = arg(1)?.parse()?;
            let fd = vsock()?;
            socket::bind(fd.as_raw_fd(), &VsockAddr::new(CID_ANY, port))?;
            socket::listen(&fd, socket::Backlog::new(1)?)?;
            println!("vsock listening on {port}");
            let conn = socket::accept(fd.as_raw_fd())?;
            let line = recv_line(conn)?;
            let sent = send_all(conn, format!("guest got: {line}\n").as_bytes());
            nix::unistd::close(conn)?;
            sent
        }
        "connect" => {
            let (cid, port): (u32, u32) = (arg(1)?.parse()?, arg(2)?.parse()?);
            let fd = vsock()?;
            socket::connect(fd.as_raw_fd(), &VsockAddr::new(cid, port))?;
            send_all(fd.as_raw_fd(), format!("{}\n", arg(3)?).as_bytes())?;
            println!("reply: {}", recv_line(fd.as_raw_fd())?);
            Ok(())
        }
        "host-serve" => {
            let path = arg(1)?;
            let l = UnixListener::bind(path)?;
            // The VMM that connects here has given up root.
            std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o666))?;
            let (s, _) = l.accept()?;
            answer(s, "host got: ")
        }
        "host-connect" => {
            let mut s = UnixStream::connect(arg(1)?)?;
            s.write_all(format!("CONNECT {}\n", arg(2)?).as_bytes())?;
            let mut r = BufReader::new(s.try_clone()?);
            let mut ok = String::new();
            r.read_line(&mut ok)?;
            println!("{}", ok.trim_end());
            if !ok.starts_with("OK ") {
                bail!("no OK from the device: {ok:?}");
            }
            ask(r.into_inner(), arg(3)?)
        }
        other => bail!("unknown mode {other}"),
    }
}
