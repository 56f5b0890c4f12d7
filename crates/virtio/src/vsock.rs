//! virtio-vsock: a host-to-guest channel that needs no network (virtio 1.2,
//! 5.10), its host side Unix sockets ([`crate::vsock_host`]).
//!
//! Queue 0 carries packets to the guest, queue 1 from it, queue 2 events
//! (the transport reset a restored guest is told of: its connections did
//! not survive). Only stream sockets are carried, with the protocol's
//! credit flow control both ways: the guest may not send a connection more
//! than [`BUF_ALLOC`] bytes ahead of what its host socket took (more resets
//! the connection), and nothing is sent to the guest past the credit it
//! gave. Every packet from the guest is checked: its CIDs (its own CID as
//! the source, the host's as the destination), its type, its length; a bad
//! one is counted and answered with a reset, never the VMM's failure.

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::path::Path;

use virtio_queue::{Queue, QueueOwnedT, QueueT};

use crate::vsock_host::{Host, HostEvent, Key, BUF_ALLOC};
use crate::vsock_packet::{op, shutdown, Header, HEADER_LEN, HOST_CID, TYPE_STREAM};
use crate::{drain_queue, features, Backend, BackendError, Chain, Memory, Served, DRAIN_BUDGET};

/// Entries in each queue.
pub const QUEUE_SIZE: u16 = 256;
/// Largest payload taken in one packet either way.
const MAX_PAYLOAD: usize = 64 << 10;
/// Packets without payload waiting for the guest, at most (a guest that
/// never gives receive buffers cannot make the VMM queue without end).
const MAX_CONTROL: usize = 1024;
/// The transport-reset event's ID.
const EVENT_TRANSPORT_RESET: u32 = 0;
const RX: usize = 0;
const TX: usize = 1;
const EVENT: usize = 2;

/// Errors of a vsock device.
#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    /// A CID the guest cannot have.
    #[error("vsock CID {0} is reserved: give the guest a CID of 3 or more (below 4294967295)")]
    BadCid(u64),
    /// The host socket could not be made.
    #[error("cannot listen on vsock socket {}", path.display())]
    Bind {
        /// The socket's path.
        path: std::path::PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

#[derive(Debug, Default, Clone, Copy)]
struct Counters {
    connections: u64,
    to_guest_bytes: u64,
    to_host_bytes: u64,
    refused: u64,
    malformed: u64,
}

/// A virtio-vsock device.
pub struct Vsock {
    cid: u64,
    host: Host,
    /// Packets without payload owed to the guest, oldest first.
    control: VecDeque<Header>,
    /// The guest's driver is owed a transport reset (a restored VM).
    reset_owed: bool,
    /// The connection whose bytes went to the guest last.
    last_served: Option<Key>,
    buf: Vec<u8>,
    counters: Counters,
}

impl Vsock {
    /// A device giving the guest CID `cid`, its host side listening on
    /// `socket`.
    pub fn new(cid: u64, socket: &Path) -> Result<Self, VsockError> {
        if !(3..u64::from(u32::MAX)).contains(&cid) {
            return Err(VsockError::BadCid(cid));
        }
        let host = Host::bind(socket).map_err(|source| VsockError::Bind {
            path: socket.to_owned(),
            source,
        })?;
        Ok(Self {
            cid,
            host,
            control: VecDeque::new(),
            reset_owed: false,
            last_served: None,
            buf: vec![0; MAX_PAYLOAD],
            counters: Counters::default(),
        })
    }

    fn header(&self, (local, peer): Key, op: u16) -> Header {
        Header {
            src_cid: HOST_CID,
            dst_cid: self.cid,
            src_port: local,
            dst_port: peer,
            kind: TYPE_STREAM,
            op,
            ..Header::default()
        }
    }

    fn owe(&mut self, h: Header) {
        // One credit update owed per connection is enough: it is filled in
        // as it is sent.
        let same =
            |o: &Header| o.op == h.op && (o.src_port, o.dst_port) == (h.src_port, h.dst_port);
        if h.op == op::CREDIT_UPDATE && self.control.iter().any(same) {
            return;
        }
        if self.control.len() < MAX_CONTROL {
            self.control.push_back(h);
        } else {
            self.counters.refused += 1;
        }
    }

    /// Resets connection `key` on both sides.
    fn reset_conn(&mut self, key: Key) {
        self.host.remove(key);
        self.owe(self.header(key, op::RST));
    }

    /// Serves one packet from the guest.
    fn transmit(&mut self, chain: Chain<'_>, mem: &Memory) {
        let Ok(mut r) = chain.reader(mem) else {
            self.counters.malformed += 1;
            return;
        };
        let mut raw = [0u8; HEADER_LEN];
        if r.read_exact(&mut raw).is_err() {
            self.counters.malformed += 1;
            return;
        }
        let h = Header::parse(&raw);
        let len = h.len as usize;
        let addressed = h.src_cid == self.cid && h.dst_cid == HOST_CID && h.kind == TYPE_STREAM;
        if !addressed || len > MAX_PAYLOAD || len > r.available_bytes() {
            self.counters.malformed += 1;
            if h.op != op::RST {
                self.owe(h.reply(op::RST));
            }
            return;
        }
        let key = (h.dst_port, h.src_port);
        if let Some(c) = self.host.conns.get_mut(&key) {
            c.peer_buf_alloc = h.buf_alloc;
            c.peer_fwd_cnt = h.fwd_cnt;
        }
        match h.op {
            op::REQUEST => self.guest_connects(key),
            op::RESPONSE => self.guest_accepts(key),
            op::RW => {
                let Some(payload) = self.buf.get_mut(..len) else {
                    return;
                };
                if r.read_exact(payload).is_err() {
                    self.counters.malformed += 1;
                    return self.reset_conn(key);
                }
                self.forward_to_host(key, len);
            }
            op::CREDIT_UPDATE => {}
            op::CREDIT_REQUEST if self.host.conns.contains_key(&key) => {
                self.owe(self.header(key, op::CREDIT_UPDATE));
            }
            op::SHUTDOWN => self.guest_shuts(key, h.flags),
            op::RST => self.host.remove(key),
            _ => self.reset_conn(key),
        }
    }

    fn guest_connects(&mut self, key: Key) {
        if self.host.conns.contains_key(&key) {
            return self.reset_conn(key);
        }
        match self.host.connect_for_guest(key) {
            Ok(()) => {
                self.counters.connections += 1;
                self.owe(self.header(key, op::RESPONSE));
            }
            Err(e) => {
                log::debug!("vsock: guest connection to host port {}: {e}", key.0);
                self.counters.refused += 1;
                self.owe(self.header(key, op::RST));
            }
        }
    }

    fn guest_accepts(&mut self, key: Key) {
        let Some(c) = self.host.conns.get_mut(&key).filter(|c| !c.established) else {
            return self.reset_conn(key);
        };
        c.established = true;
        // The host client learns its connection's port, as Firecracker's does.
        if c.stream
            .write_all(format!("OK {}\n", key.0).as_bytes())
            .is_err()
        {
            return self.reset_conn(key);
        }
        self.counters.connections += 1;
    }

    /// Moves `len` bytes of `self.buf` towards connection `key`'s host end.
    fn forward_to_host(&mut self, key: Key, len: usize) {
        let Some(c) = self.host.conns.get_mut(&key).filter(|c| c.established) else {
            return self.reset_conn(key);
        };
        // More in flight than the credit it was last told: a broken or
        // hostile driver (this also bounds what waits for the host socket).
        let sent = c.from_guest.wrapping_add(len as u32);
        if sent.wrapping_sub(c.fwd_cnt_told) > BUF_ALLOC {
            self.counters.malformed += 1;
            return self.reset_conn(key);
        }
        c.from_guest = sent;
        c.to_host.extend(&self.buf[..len]);
        let before = c.fwd_cnt;
        if c.flush().is_err() {
            return self.reset_conn(key);
        }
        self.counters.to_host_bytes += u64::from(c.fwd_cnt.wrapping_sub(before));
        if c.fwd_cnt.wrapping_sub(c.fwd_cnt_told) >= BUF_ALLOC / 2 {
            self.owe(self.header(key, op::CREDIT_UPDATE));
        }
    }

    fn guest_shuts(&mut self, key: Key, flags: u32) {
        let Some(c) = self.host.conns.get_mut(&key) else {
            return self.owe(self.header(key, op::RST));
        };
        let _ = c.flush();
        if flags & shutdown::SEND != 0 {
            let _ = c.stream.shutdown(std::net::Shutdown::Write);
        }
        if flags & (shutdown::SEND | shutdown::RCV) == shutdown::SEND | shutdown::RCV {
            self.reset_conn(key);
        }
    }

    /// What the host sockets had: new host clients' requests, ends, and
    /// room that let buffered guest bytes go on (the guest hears of the
    /// credit that freed, or it would wait for it for ever): once half its
    /// credit freed, and once a backlog drained to nothing, so that a guest
    /// that stopped for credit learns of every byte the host took.
    fn host_events(&mut self) {
        for ev in self.host.poll() {
            match ev {
                HostEvent::Connect(key) => self.owe(self.header(key, op::REQUEST)),
                HostEvent::Gone(key) => self.reset_conn(key),
            }
        }
        let freed: Vec<Key> = self
            .host
            .conns
            .iter_mut()
            .filter_map(|(k, c)| {
                let untold = c.fwd_cnt.wrapping_sub(c.fwd_cnt_told);
                let owed = untold >= BUF_ALLOC / 2 || (c.caught_up && untold > 0);
                c.caught_up = false;
                owed.then_some(*k)
            })
            .collect();
        for key in freed {
            self.owe(self.header(key, op::CREDIT_UPDATE));
        }
    }

    /// The next connection, after the last one served (round robin, so a
    /// busy one does not starve the others), with bytes for the guest and
    /// credit for them.
    fn sendable(&self) -> Option<Key> {
        let mut keys: Vec<_> = self
            .host
            .conns
            .iter()
            .filter(|(_, c)| c.established && c.readable && !c.host_done && c.peer_credit() > 0)
            .map(|(k, _)| *k)
            .collect();
        keys.sort_unstable();
        let after = keys.iter().find(|k| Some(**k) > self.last_served);
        after.or(keys.first()).copied()
    }

    /// Fills `chain` with the next packet for the guest; `None` if there
    /// was none after all (the chain goes back).
    fn next_packet(&mut self, chain: Chain<'_>, mem: &Memory) -> Option<u32> {
        let Ok(mut w) = chain.writer(mem) else {
            self.counters.malformed += 1;
            return Some(0);
        };
        let room = w.available_bytes();
        if room < HEADER_LEN {
            self.counters.malformed += 1;
            return Some(0);
        }
        while let Some(mut h) = self.control.pop_front() {
            let key = (h.src_port, h.dst_port);
            if let Some(c) = self.host.conns.get_mut(&key) {
                (h.buf_alloc, h.fwd_cnt) = (BUF_ALLOC, c.fwd_cnt);
                c.fwd_cnt_told = c.fwd_cnt;
            } else if matches!(h.op, op::CREDIT_UPDATE | op::RESPONSE | op::REQUEST) {
                continue; // the connection is gone since
            }
            return Some(w.write_all(&h.bytes()).map_or(0, |()| HEADER_LEN as u32));
        }
        let key = self.sendable()?;
        let c = self.host.conns.get_mut(&key)?;
        let want = (room - HEADER_LEN)
            .min(MAX_PAYLOAD)
            .min(c.peer_credit() as usize);
        self.last_served = Some(key);
        match c.stream.read(&mut self.buf[..want]) {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                c.readable = false;
                None
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => None,
            // The host sends no more (its end closed or failed): so the
            // guest hears.
            Ok(0) | Err(_) => {
                c.readable = false;
                c.host_done = true;
                let mut h = self.header(key, op::SHUTDOWN);
                h.flags = shutdown::SEND | shutdown::RCV;
                self.owe(h);
                None
            }
            Ok(n) => {
                c.rx_cnt = c.rx_cnt.wrapping_add(n as u32);
                c.fwd_cnt_told = c.fwd_cnt;
                let fwd_cnt = c.fwd_cnt;
                let mut h = self.header(key, op::RW);
                (h.len, h.buf_alloc, h.fwd_cnt) = (n as u32, BUF_ALLOC, fwd_cnt);
                self.counters.to_guest_bytes += n as u64;
                let written = w
                    .write_all(&h.bytes())
                    .and_then(|()| w.write_all(&self.buf[..n]));
                Some(written.map_or(0, |()| (HEADER_LEN + n) as u32))
            }
        }
    }

    /// Sends the guest what is owed and what the host sockets have, while
    /// it has receive buffers: [`DRAIN_BUDGET`] packets a turn at most.
    fn receive(&mut self, queues: &mut [Queue], mem: &Memory) -> Served {
        let Some(queue) = queues.get_mut(RX) else {
            return Served::NOTHING;
        };
        let (mut used, mut sent, mut rechecked) = (false, 0, false);
        while sent < DRAIN_BUDGET && (!self.control.is_empty() || self.sendable().is_some()) {
            let Some(chain) = queue.pop_descriptor_chain(mem) else {
                // No buffer: be told when there are some, and look again
                // once in case they came meanwhile.
                match queue.enable_notification(mem) {
                    Ok(true) if !rechecked => {
                        rechecked = true;
                        continue;
                    }
                    _ => break,
                }
            };
            let head = chain.head_index();
            let Some(len) = self.next_packet(chain, mem) else {
                queue.go_to_previous_position();
                continue;
            };
            if queue.add_used(mem, head, len).is_err() {
                break;
            }
            (used, sent, rechecked) = (true, sent + 1, false);
        }
        let more = sent >= DRAIN_BUDGET;
        Served {
            notify: used && queue.needs_notification(mem).unwrap_or(true),
            more,
        }
    }

    /// Tells the driver of a transport reset, if one is owed.
    fn events(&mut self, queues: &mut [Queue], mem: &Memory) -> Served {
        let Some(queue) = queues.get_mut(EVENT) else {
            return Served::NOTHING;
        };
        if !self.reset_owed {
            return Served::NOTHING;
        }
        let Some(chain) = queue.pop_descriptor_chain(mem) else {
            return Served::NOTHING;
        };
        let head = chain.head_index();
        let written = chain
            .writer(mem)
            .ok()
            .and_then(|mut w| w.write_all(&EVENT_TRANSPORT_RESET.to_le_bytes()).ok());
        self.reset_owed = false;
        let len = if written.is_some() { 4 } else { 0 };
        if queue.add_used(mem, head, len).is_err() {
            return Served::NOTHING;
        }
        Served {
            notify: queue.needs_notification(mem).unwrap_or(true),
            more: false,
        }
    }
}

fn both(a: Served, b: Served) -> Served {
    Served {
        notify: a.notify || b.notify,
        more: a.more || b.more,
    }
}

impl Backend for Vsock {
    fn device_type(&self) -> u32 {
        19
    }
    fn kind(&self) -> &'static str {
        "vsock"
    }
    fn describe(&self) -> String {
        format!("cid {} socket {}", self.cid, self.host.path().display())
    }
    fn features(&self) -> u64 {
        features::VERSION_1 | features::RING_EVENT_IDX
    }
    fn queue_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE, QUEUE_SIZE]
    }
    fn config(&self) -> Vec<u8> {
        self.cid.to_le_bytes().to_vec()
    }
    /// A vsock device carries no state of its own: its connections do not
    /// survive a save or a migration, and the restored guest is told so.
    fn restore_state(
        &mut self,
        state: Option<&crate::state::DeviceState>,
    ) -> Result<(), BackendError> {
        if let Some(s) = state {
            return Err(crate::state::StateError::WrongDevice {
                device: self.kind(),
                found: s.kind(),
            }
            .into());
        }
        self.reset_owed = true;
        Ok(())
    }
    fn activate(&mut self, _features: u64) -> Result<(), BackendError> {
        Ok(())
    }
    fn reset(&mut self) {
        self.host.clear();
        self.control.clear();
        self.reset_owed = false;
    }
    fn process_queue(&mut self, q: usize, queues: &mut [Queue], mem: &Memory) -> Served {
        match q {
            RX => self.receive(queues, mem),
            TX => {
                let Some(queue) = queues.get_mut(TX) else {
                    return Served::NOTHING;
                };
                let tx = drain_queue(queue, mem, |chain| {
                    self.transmit(chain, mem);
                    0
                });
                both(tx, self.receive(queues, mem))
            }
            EVENT => self.events(queues, mem),
            _ => Served::NOTHING,
        }
    }
    fn event_fd(&self) -> Option<std::os::fd::RawFd> {
        Some(self.host.fd())
    }
    fn process_event(&mut self, queues: &mut [Queue], mem: &Memory) -> Served {
        self.host_events();
        self.receive(queues, mem)
    }
    fn event_queue(&self) -> Option<usize> {
        Some(RX)
    }
    fn counters(&self) -> Vec<(&'static str, u64)> {
        let c = self.counters;
        vec![
            ("connections", c.connections),
            ("open", self.host.conns.len() as u64),
            ("to_guest_bytes", c.to_guest_bytes),
            ("to_host_bytes", c.to_host_bytes),
            ("refused", c.refused),
            ("malformed", c.malformed),
        ]
    }
}

#[cfg(test)]
#[path = "vsock_tests.rs"]
mod tests;
