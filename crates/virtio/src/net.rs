//! virtio-net on a TAP device (or passt's stream, [`crate::net_stream`]),
//! with the MAC-spoofing policy.
//!
//! Queue 0 receives (host to guest), queue 1 transmits. Every frame carries
//! the 12-byte virtio-net header both ways, and the TAP carries the same
//! header, so checksum and TCP segmentation offloads pass through untouched;
//! a host side without offloads ([`FrameIo::offloads`]) is offered none.
//!
//! MAC spoofing, as the reference document defines it for a VM whose own
//! guests are bridged behind its adapter: with the policy off (the default)
//! a frame the guest sends with a source MAC other than its adapter's is
//! dropped and counted; with it on, such frames pass, so the VM's own guests
//! reach the network with their own addresses.
//!
//! The TAP is read edge-triggered: on each wake-up frames are read until the
//! TAP is empty or the guest has no receive buffer left; a frame that does
//! not fit waits for the guest's next receive-queue notification. With
//! mergeable receive buffers (the driver posts small buffers, as Linux does
//! by default) a frame spans as many buffers as it needs, and the header's
//! `num_buffers` says how many.

use std::io::{self, Read};
use std::os::fd::RawFd;

use crate::Memory;
use virtio_queue::{Queue, QueueOwnedT, QueueT};

use crate::{drain_queue, features, Backend, BackendError, Chain, Served, DRAIN_BUDGET};

/// Entries in each queue.
pub const QUEUE_SIZE: u16 = 256;
/// The virtio-net header (VIRTIO_F_VERSION_1 layout).
pub const HDR_LEN: usize = 12;
/// Largest frame accepted either way: a 64 KiB TSO super-frame plus headers.
pub const MAX_FRAME: usize = HDR_LEN + 65_550;
const ETH_HDR: usize = 14;
const RX: usize = 0;
const TX: usize = 1;

/// Feature bits.
pub mod feature {
    /// The device takes frames with a partial checksum.
    pub const CSUM: u64 = 1 << 0;
    /// The driver takes frames with a partial checksum.
    pub const GUEST_CSUM: u64 = 1 << 1;
    /// `mac` in config is valid.
    pub const MAC: u64 = 1 << 5;
    /// The driver takes TSO4 super-frames.
    pub const GUEST_TSO4: u64 = 1 << 7;
    /// The driver takes TSO6 super-frames.
    pub const GUEST_TSO6: u64 = 1 << 8;
    /// The device takes TSO4 super-frames.
    pub const HOST_TSO4: u64 = 1 << 11;
    /// The device takes TSO6 super-frames.
    pub const HOST_TSO6: u64 = 1 << 12;
    /// The driver posts small receive buffers and a frame may span several.
    pub const MRG_RXBUF: u64 = 1 << 15;
    /// `status` in config is valid.
    pub const STATUS: u64 = 1 << 16;
}

/// Errors of a network adapter.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// The TAP refused the offloads the driver accepted.
    #[error("cannot set the offloads of {tap}")]
    Offload {
        /// The TAP's name.
        tap: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

/// The host side of the adapter: a TAP, or anything that moves whole frames
/// with a [`HDR_LEN`]-byte virtio-net header in front.
pub trait FrameIo: Send {
    /// Reads one frame; `WouldBlock` when none is waiting.
    fn read_frame(&mut self, buf: &mut [u8]) -> io::Result<usize>;
    /// Writes one frame.
    fn write_frame(&mut self, frame: &[u8]) -> io::Result<usize>;
    /// Which offloads the guest accepts in received frames.
    fn set_offload(&mut self, csum: bool, tso4: bool, tso6: bool) -> io::Result<()>;
    /// Whether the host side takes and gives partial checksums and TCP
    /// super-frames (a TAP does; a stream to passt does not, so the adapter
    /// offers the guest no offloads).
    fn offloads(&self) -> bool {
        true
    }
    /// Counters of the host side's own, for reports.
    fn host_counters(&self) -> Vec<(&'static str, u64)> {
        Vec::new()
    }
    /// The descriptor to wait on for incoming frames.
    fn raw_fd(&self) -> RawFd;
    /// A name for reports (the TAP's).
    fn name(&self) -> String;
}

/// A MAC address stable for `seed` (e.g. "VMNAME/0"): locally administered,
/// unicast, from a 64-bit FNV-1a hash.
pub fn derived_mac(seed: &str) -> [u8; 6] {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in seed.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x100_0000_01b3);
    }
    let b = h.to_be_bytes();
    [0x52, 0x56, b[0], b[1], b[2], b[3]]
}

/// Formats a MAC as `52:56:00:12:34:56`.
pub fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Counters.
#[derive(Debug, Default, Clone, Copy)]
struct Counters {
    rx_frames: u64,
    rx_bytes: u64,
    rx_dropped: u64,
    tx_frames: u64,
    tx_bytes: u64,
    tx_dropped: u64,
    tx_spoofed_dropped: u64,
    tx_malformed: u64,
}

/// A virtio-net device.
pub struct Net {
    io: Box<dyn FrameIo>,
    mac: [u8; 6],
    mac_spoofing: bool,
    counters: Counters,
    rx_buf: Vec<u8>,
    rx_pending: usize,
    tx_buf: Vec<u8>,
    /// Mergeable receive buffers negotiated.
    mergeable: bool,
}

impl Net {
    /// An adapter with address `mac` on `io`; `mac_spoofing` lets frames
    /// with other source addresses out.
    pub fn new(io: Box<dyn FrameIo>, mac: [u8; 6], mac_spoofing: bool) -> Self {
        Self {
            io,
            mac,
            mac_spoofing,
            counters: Counters::default(),
            rx_buf: vec![0; MAX_FRAME],
            rx_pending: 0,
            tx_buf: vec![0; MAX_FRAME],
            mergeable: false,
        }
    }

    /// Sends one chain from the transmit queue to the TAP (or drops it).
    pub fn transmit(&mut self, chain: Chain<'_>, mem: &Memory) {
        let Ok(mut reader) = chain.reader(mem) else {
            self.counters.tx_malformed += 1;
            return;
        };
        let len = reader.available_bytes();
        if !(HDR_LEN + ETH_HDR..=MAX_FRAME).contains(&len) {
            self.counters.tx_malformed += 1;
            return;
        }
        if reader.read_exact(&mut self.tx_buf[..len]).is_err() {
            self.counters.tx_malformed += 1;
            return;
        }
        let source = &self.tx_buf[HDR_LEN + 6..HDR_LEN + 12];
        if !self.mac_spoofing && source != self.mac {
            self.counters.tx_spoofed_dropped += 1;
            return;
        }
        match self.io.write_frame(&self.tx_buf[..len]) {
            Ok(_) => {
                self.counters.tx_frames += 1;
                self.counters.tx_bytes += (len - HDR_LEN) as u64;
            }
            Err(e) => {
                log::debug!("net {}: frame dropped on write: {e}", self.io.name());
                self.counters.tx_dropped += 1;
            }
        }
    }

    /// Moves frames from the TAP into receive buffers until one side runs
    /// dry, or [`DRAIN_BUDGET`] frames were delivered: a flood of frames
    /// (from another guest on the bridge, say) then waits for the loop's
    /// next turn instead of holding it, `more` saying so.
    fn receive(&mut self, queues: &mut [Queue], mem: &Memory) -> Served {
        let Some(queue) = queues.get_mut(RX) else {
            return Served::NOTHING;
        };
        let mut used = false;
        let mut delivered = 0;
        let mut more = false;
        // Whether the ring was re-checked since the last chain popped: a
        // second "more available" with nothing to pop is a broken ring.
        let mut rechecked = false;
        loop {
            if delivered == DRAIN_BUDGET {
                more = true;
                break;
            }
            if self.rx_pending == 0 {
                match self.io.read_frame(&mut self.rx_buf) {
                    Ok(n) if n >= HDR_LEN => self.rx_pending = n,
                    Ok(_) => continue,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        log::debug!("net {}: read failed: {e}", self.io.name());
                        break;
                    }
                }
            }
            // One buffer per frame, or with mergeable buffers as many as
            // the frame needs.
            let mut chains = Vec::new();
            let mut room = 0usize;
            let mut short = false;
            while chains.is_empty() || (self.mergeable && room < self.rx_pending) {
                if chains.len() >= usize::from(QUEUE_SIZE) {
                    break; // cannot fit: deliver() drops the frame
                }
                match queue.pop_descriptor_chain(mem) {
                    Some(c) => {
                        room += c.clone().writer(mem).map_or(0, |w| w.available_bytes());
                        chains.push(c);
                    }
                    None => {
                        short = true;
                        break;
                    }
                }
            }
            if short {
                // Not enough buffers yet: give back what was taken, ask to
                // be told when there are more, and check again in case some
                // arrived meanwhile.
                for _ in &chains {
                    queue.go_to_previous_position();
                }
                match queue.enable_notification(mem) {
                    Ok(true) if !rechecked => {
                        rechecked = true;
                        continue;
                    }
                    _ => break,
                }
            }
            rechecked = false;
            let lens = self.deliver(&chains, room, mem);
            if chains
                .iter()
                .zip(lens)
                .any(|(c, len)| queue.add_used(mem, c.head_index(), len).is_err())
            {
                break;
            }
            used = true;
            delivered += 1;
        }
        Served {
            notify: used && queue.needs_notification(mem).unwrap_or(true),
            more,
        }
    }

    /// Copies the pending frame into `chains` (which hold `room` bytes),
    /// telling the guest in the header how many it spans; returns the bytes
    /// written into each. A frame that does not fit is dropped.
    fn deliver(&mut self, chains: &[Chain<'_>], room: usize, mem: &Memory) -> Vec<u32> {
        let len = std::mem::take(&mut self.rx_pending);
        let mut lens = vec![0u32; chains.len()];
        if room < len {
            self.counters.rx_dropped += 1;
            return lens;
        }
        let buffers = chains.len() as u16;
        self.rx_buf[10..12].copy_from_slice(&buffers.to_le_bytes());
        let mut done = 0;
        for (chain, out) in chains.iter().zip(lens.iter_mut()) {
            let Ok(mut writer) = chain.clone().writer(mem) else {
                continue;
            };
            let n = writer.available_bytes().min(len - done);
            if io::Write::write_all(&mut writer, &self.rx_buf[done..done + n]).is_err() {
                self.counters.rx_dropped += 1;
                return vec![0; chains.len()];
            }
            *out = n as u32;
            done += n;
        }
        self.counters.rx_frames += 1;
        self.counters.rx_bytes += (len - HDR_LEN) as u64;
        lens
    }
}

impl Backend for Net {
    fn device_type(&self) -> u32 {
        1
    }
    fn kind(&self) -> &'static str {
        "net"
    }
    fn describe(&self) -> String {
        format!(
            "{} mac {} mac_spoofing {}",
            self.io.name(),
            format_mac(&self.mac),
            if self.mac_spoofing { "on" } else { "off" }
        )
    }
    fn features(&self) -> u64 {
        use feature::*;
        let base = features::VERSION_1 | features::RING_EVENT_IDX | MAC | STATUS | MRG_RXBUF;
        let offloads = CSUM | GUEST_CSUM | GUEST_TSO4 | GUEST_TSO6 | HOST_TSO4 | HOST_TSO6;
        if self.io.offloads() {
            base | offloads
        } else {
            base
        }
    }
    fn queue_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE]
    }
    fn config(&self) -> Vec<u8> {
        let mut c = self.mac.to_vec();
        c.extend_from_slice(&1u16.to_le_bytes()); // status: link up
        c
    }
    fn activate(&mut self, f: u64) -> Result<(), BackendError> {
        use feature::*;
        self.mergeable = f & MRG_RXBUF != 0;
        let csum = f & GUEST_CSUM != 0;
        self.io
            .set_offload(
                csum,
                csum && f & GUEST_TSO4 != 0,
                csum && f & GUEST_TSO6 != 0,
            )
            .map_err(|source| {
                NetError::Offload {
                    tap: self.io.name(),
                    source,
                }
                .into()
            })
    }
    fn reset(&mut self) {
        self.rx_pending = 0;
        self.mergeable = false;
    }
    fn process_queue(&mut self, q: usize, queues: &mut [Queue], mem: &Memory) -> Served {
        match q {
            RX => self.receive(queues, mem),
            TX => {
                let Some(queue) = queues.get_mut(TX) else {
                    return Served::NOTHING;
                };
                drain_queue(queue, mem, |chain| {
                    self.transmit(chain, mem);
                    0
                })
            }
            _ => Served::NOTHING,
        }
    }
    fn event_fd(&self) -> Option<RawFd> {
        Some(self.io.raw_fd())
    }
    fn process_event(&mut self, queues: &mut [Queue], mem: &Memory) -> Served {
        self.receive(queues, mem)
    }
    fn event_queue(&self) -> Option<usize> {
        Some(RX)
    }
    fn counters(&self) -> Vec<(&'static str, u64)> {
        let c = self.counters;
        let mut v = vec![
            ("rx_frames", c.rx_frames),
            ("rx_bytes", c.rx_bytes),
            ("rx_dropped", c.rx_dropped),
            ("tx_frames", c.tx_frames),
            ("tx_bytes", c.tx_bytes),
            ("tx_dropped", c.tx_dropped),
            ("tx_spoofed_dropped", c.tx_spoofed_dropped),
            ("tx_malformed", c.tx_malformed),
        ];
        v.extend(self.io.host_counters());
        v
    }
}

#[cfg(test)]
#[path = "net_tests.rs"]
mod tests;
