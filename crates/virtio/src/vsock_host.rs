//! The host side of virtio-vsock, Firecracker's "hybrid" model: no vhost,
//! no AF_VSOCK on the host, only Unix sockets, so it needs no root and works
//! at every nesting level.
//!
//! - A host program connects to the device's socket and writes
//!   `CONNECT <port>\n`; once the guest accepts, it reads `OK <port>\n` (the
//!   host-side port of the connection) and then the stream is the guest's.
//! - A guest connecting to the host's port P reaches the Unix socket
//!   `<socket>_P`, if something listens there.
//!
//! Every socket is non-blocking and watched by one epoll instance of the
//! device's own (edge-triggered), whose descriptor the event loop watches:
//! so one device descriptor stands for any number of connections. Counts
//! are bounded: connections, clients that have not said `CONNECT` yet, the
//! bytes buffered towards a host socket (the credit the guest was given).

use std::collections::{HashMap, VecDeque};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

/// Connections at once at most, either side opening them.
pub const MAX_CONNECTIONS: usize = 64;
/// Host clients that have not yet named a port, at most.
const MAX_WAITING: usize = 16;
/// The longest `CONNECT <port>\n` line.
const MAX_LINE: usize = 32;
/// Each connection's buffer towards its host socket: the credit the guest
/// gets (it may not have more than this in flight).
pub const BUF_ALLOC: u32 = 256 << 10;
/// The first host-side port given to host-initiated connections.
const FIRST_LOCAL_PORT: u32 = 1 << 30;
const LISTENER: u64 = 0;

/// A connection's ports: (host side, guest side).
pub type Key = (u32, u32);

/// One connection's host end and its byte counts.
pub struct Conn {
    /// The host's end.
    pub stream: UnixStream,
    /// The guest accepted it (or opened it).
    pub established: bool,
    /// Guest bytes not yet taken by the host socket.
    pub to_host: VecDeque<u8>,
    /// Bytes the guest sent, all told (wrapping).
    pub from_guest: u32,
    /// Bytes the host socket took, all told (wrapping), for the guest's
    /// credit.
    pub fwd_cnt: u32,
    /// `fwd_cnt` as last told to the guest.
    pub fwd_cnt_told: u32,
    /// Bytes sent to the guest, all told (wrapping).
    pub rx_cnt: u32,
    /// The guest's receive buffer and what it has taken of it.
    pub peer_buf_alloc: u32,
    /// See `peer_buf_alloc`.
    pub peer_fwd_cnt: u32,
    /// The host socket may have bytes to read (edge-triggered).
    pub readable: bool,
    /// The host socket reached its end (or failed).
    pub host_done: bool,
    /// A backlog towards the host socket drained to nothing since the
    /// guest was last told its credit: the guest hears of all of it.
    pub caught_up: bool,
    token: u64,
}

impl Conn {
    /// Bytes the guest can take now.
    pub fn peer_credit(&self) -> u32 {
        let in_flight = self.rx_cnt.wrapping_sub(self.peer_fwd_cnt);
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    /// Writes what is buffered for the host socket until it would block.
    pub fn flush(&mut self) -> io::Result<()> {
        while !self.to_host.is_empty() {
            let (front, _) = self.to_host.as_slices();
            match self.stream.write(front) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    self.to_host.drain(..n);
                    self.fwd_cnt = self.fwd_cnt.wrapping_add(n as u32);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

/// A host client that has not named its port yet.
struct Waiting {
    stream: UnixStream,
    line: Vec<u8>,
}

/// What the host side asks of the device after an event.
#[derive(Debug, PartialEq, Eq)]
pub enum HostEvent {
    /// A host client asks for the guest's port: send a REQUEST.
    Connect(Key),
    /// A host end is gone before the guest heard of it, or while it ran:
    /// tell the guest (RST).
    Gone(Key),
}

/// The device's sockets.
pub struct Host {
    listener: UnixListener,
    socket: PathBuf,
    epoll: Epoll,
    waiting: HashMap<u64, Waiting>,
    /// The connections.
    pub conns: HashMap<Key, Conn>,
    tokens: HashMap<u64, Key>,
    next_token: u64,
    next_port: u32,
}

fn watch(epoll: &Epoll, fd: RawFd, token: u64, op: ControlOperation) -> io::Result<()> {
    let set = EventSet::IN | EventSet::OUT | EventSet::READ_HANG_UP | EventSet::EDGE_TRIGGERED;
    epoll.ctl(op, fd, EpollEvent::new(set, token))
}

impl Host {
    /// Listens on `socket` (a stale socket there is replaced; anything
    /// else is not), private to this user.
    pub fn bind(socket: &Path) -> io::Result<Self> {
        use std::os::unix::fs::FileTypeExt;
        if std::fs::symlink_metadata(socket).is_ok_and(|m| m.file_type().is_socket()) {
            std::fs::remove_file(socket)?;
        }
        let listener = UnixListener::bind(socket)?;
        std::fs::set_permissions(socket, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
        listener.set_nonblocking(true)?;
        let epoll = Epoll::new()?;
        let set = EventSet::IN | EventSet::EDGE_TRIGGERED;
        epoll.ctl(
            ControlOperation::Add,
            listener.as_raw_fd(),
            EpollEvent::new(set, LISTENER),
        )?;
        Ok(Self {
            listener,
            socket: socket.to_owned(),
            epoll,
            waiting: HashMap::new(),
            conns: HashMap::new(),
            tokens: HashMap::new(),
            next_token: LISTENER + 1,
            next_port: FIRST_LOCAL_PORT,
        })
    }

    /// The descriptor the event loop watches.
    pub fn fd(&self) -> RawFd {
        self.epoll.as_raw_fd()
    }

    /// Where it listens.
    pub fn path(&self) -> &Path {
        &self.socket
    }

    fn token(&mut self) -> u64 {
        self.next_token += 1;
        self.next_token
    }

    fn add(&mut self, key: Key, stream: UnixStream, established: bool) -> io::Result<()> {
        let token = self.token();
        watch(
            &self.epoll,
            stream.as_raw_fd(),
            token,
            ControlOperation::Add,
        )?;
        self.tokens.insert(token, key);
        let conn = Conn {
            stream,
            established,
            to_host: VecDeque::new(),
            from_guest: 0,
            fwd_cnt: 0,
            fwd_cnt_told: 0,
            rx_cnt: 0,
            peer_buf_alloc: 0,
            peer_fwd_cnt: 0,
            readable: true,
            host_done: false,
            caught_up: false,
            token,
        };
        self.conns.insert(key, conn);
        Ok(())
    }

    /// Opens the guest's connection to host port `local` from its port
    /// `peer`: `<socket>_<local>`, if something listens there.
    pub fn connect_for_guest(&mut self, (local, peer): Key) -> io::Result<()> {
        if self.conns.len() >= MAX_CONNECTIONS {
            return Err(io::Error::other("too many vsock connections"));
        }
        let mut path = self.socket.clone().into_os_string();
        path.push(format!("_{local}"));
        let stream = UnixStream::connect(&path)?;
        stream.set_nonblocking(true)?;
        self.add((local, peer), stream, true)
    }

    /// Ends connection `key` (its host end closes).
    pub fn remove(&mut self, key: Key) {
        if let Some(c) = self.conns.remove(&key) {
            self.tokens.remove(&c.token);
            let _ = self.epoll.ctl(
                ControlOperation::Delete,
                c.stream.as_raw_fd(),
                EpollEvent::default(),
            );
        }
    }

    /// Ends every connection and waiting client.
    pub fn clear(&mut self) {
        let keys: Vec<_> = self.conns.keys().copied().collect();
        keys.into_iter().for_each(|k| self.remove(k));
        self.waiting.clear();
    }

    /// Takes what the sockets have for the device: new clients, their
    /// `CONNECT` lines, readiness of connections (marked on them).
    pub fn poll(&mut self) -> Vec<HostEvent> {
        let mut out = Vec::new();
        let mut events = [EpollEvent::default(); 64];
        loop {
            let n = match self.epoll.wait(0, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    log::warn!("vsock: cannot wait on its sockets: {e}");
                    0
                }
            };
            for ev in &events[..n] {
                self.ready(ev.data(), ev.event_set(), &mut out);
            }
            if n < events.len() {
                return out;
            }
        }
    }

    fn ready(&mut self, token: u64, set: EventSet, out: &mut Vec<HostEvent>) {
        if token == LISTENER {
            return self.accept_all();
        }
        if self.waiting.contains_key(&token) {
            if let Some(key) = self.read_line(token) {
                out.push(HostEvent::Connect(key));
            }
            return;
        }
        let Some(&key) = self.tokens.get(&token) else {
            return;
        };
        let Some(c) = self.conns.get_mut(&key) else {
            return;
        };
        if set.intersects(EventSet::IN | EventSet::READ_HANG_UP | EventSet::HANG_UP) {
            c.readable = true;
        }
        if set.contains(EventSet::OUT) {
            let backlog = !c.to_host.is_empty();
            if c.flush().is_err() {
                c.host_done = true;
                out.push(HostEvent::Gone(key));
            }
            c.caught_up |= backlog && c.to_host.is_empty();
        }
    }

    fn accept_all(&mut self) {
        loop {
            match self.listener.accept() {
                Ok((s, _)) if self.waiting.len() < MAX_WAITING => {
                    let token = self.token();
                    let set = EventSet::IN | EventSet::EDGE_TRIGGERED;
                    let watched = s.set_nonblocking(true).and_then(|()| {
                        let ev = EpollEvent::new(set, token);
                        self.epoll.ctl(ControlOperation::Add, s.as_raw_fd(), ev)
                    });
                    if watched.is_ok() {
                        let w = Waiting {
                            stream: s,
                            line: Vec::new(),
                        };
                        // A line already written makes it ready at once.
                        self.waiting.insert(token, w);
                    }
                }
                Ok(_) => log::warn!("vsock: {MAX_WAITING} host clients wait already; one closed"),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    log::warn!("vsock: cannot accept a host client: {e}");
                    return;
                }
            }
        }
    }

    /// Reads client `token`'s line; once whole and valid, makes it a
    /// connection waiting for the guest and returns its key. A bad line, a
    /// closed client or one over the limit is dropped.
    fn read_line(&mut self, token: u64) -> Option<Key> {
        let w = self.waiting.get_mut(&token)?;
        let mut buf = [0u8; MAX_LINE];
        let port = loop {
            let room = MAX_LINE - w.line.len();
            match w.stream.read(&mut buf[..room.max(1)]) {
                Ok(0) => break None,
                Ok(n) => {
                    w.line.extend_from_slice(&buf[..n]);
                    if let Some(end) = w.line.iter().position(|&b| b == b'\n') {
                        break parse_connect(&w.line[..end]);
                    }
                    if w.line.len() >= MAX_LINE {
                        break None;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return None,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => break None,
            }
        };
        let w = self.waiting.remove(&token)?;
        let _ = self.epoll.ctl(
            ControlOperation::Delete,
            w.stream.as_raw_fd(),
            EpollEvent::default(),
        );
        let peer = port?;
        if self.conns.len() >= MAX_CONNECTIONS {
            log::warn!("vsock: {MAX_CONNECTIONS} connections are open; a host client closed");
            return None;
        }
        let local = self.free_port(peer)?;
        self.add((local, peer), w.stream, false).ok()?;
        Some((local, peer))
    }

    fn free_port(&mut self, peer: u32) -> Option<u32> {
        for _ in 0..=MAX_CONNECTIONS {
            let p = self.next_port;
            self.next_port = self.next_port.checked_add(1).unwrap_or(FIRST_LOCAL_PORT);
            if !self.conns.contains_key(&(p, peer)) {
                return Some(p);
            }
        }
        None
    }
}

/// The port in `CONNECT <port>` (a trailing `\r` allowed).
fn parse_connect(line: &[u8]) -> Option<u32> {
    let text = std::str::from_utf8(line).ok()?.trim_end_matches('\r');
    let port = text.strip_prefix("CONNECT ")?;
    if port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    port.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_well_formed_connect_line_names_a_port() {
        assert_eq!(parse_connect(b"CONNECT 52"), Some(52));
        assert_eq!(parse_connect(b"CONNECT 4294967295\r"), Some(u32::MAX));
        for bad in [
            &b"CONNECT"[..],
            b"CONNECT ",
            b"CONNECT -1",
            b"CONNECT 4294967296",
            b"connect 52",
            b"CONNECT 5 2",
            b"\xffCONNECT 1",
        ] {
            assert_eq!(parse_connect(bad), None, "{bad:?}");
        }
    }
}
