//! A minimal virtio driver working on guest memory directly: it lays out a
//! split queue, sets a device up through its MMIO registers exactly as a
//! guest would, posts descriptor chains and reads the used ring. The unit
//! tests and the fuzz targets drive the real devices through it, without KVM.

use crate::Memory;
use nestvm_devices::bus::BusDevice;
use vm_memory::{Bytes, GuestAddress};

use crate::mmio::status;

/// Descriptor flag: the chain continues at `next`.
pub const DESC_NEXT: u16 = 1;
/// Descriptor flag: the device writes this buffer.
pub const DESC_WRITE: u16 = 2;

/// One buffer of a chain: guest address, length, device-writable.
#[derive(Debug, Clone, Copy)]
pub struct Buf {
    /// Guest physical address.
    pub addr: u64,
    /// Length in bytes.
    pub len: u32,
    /// Whether the device writes it.
    pub writable: bool,
}

/// The driver side of one split queue.
#[derive(Debug)]
pub struct QueueDriver {
    /// Queue size (a power of two).
    pub size: u16,
    /// Descriptor table address.
    pub desc: u64,
    /// Available ring address.
    pub avail: u64,
    /// Used ring address.
    pub used: u64,
    next_desc: u16,
    avail_idx: u16,
    used_seen: u16,
}

impl QueueDriver {
    /// A queue of `size` entries whose rings start at `base` (needs
    /// `size * 16 + 8 + size * 2 + 8 + size * 8` bytes, page-aligned parts).
    pub fn new(base: u64, size: u16) -> Self {
        let desc = base;
        let avail = desc + 16 * u64::from(size);
        let used = (avail + 6 + 2 * u64::from(size) + 0xfff) & !0xfff;
        Self {
            size,
            desc,
            avail,
            used,
            next_desc: 0,
            avail_idx: 0,
            used_seen: 0,
        }
    }

    /// Writes the queue's registers for queue `index` of `dev`.
    pub fn program(&self, dev: &mut dyn BusDevice, index: u32) {
        let mut w = |off: u64, v: u32| dev.write(off, &v.to_le_bytes());
        w(0x30, index);
        w(0x38, u32::from(self.size));
        for (off, addr) in [(0x80, self.desc), (0x90, self.avail), (0xa0, self.used)] {
            w(off, addr as u32);
            w(off + 4, (addr >> 32) as u32);
        }
        w(0x44, 1);
    }

    /// Posts a chain of `bufs`; returns its head index.
    pub fn add_chain(&mut self, mem: &Memory, bufs: &[Buf]) -> u16 {
        let head = self.next_desc;
        for (i, b) in bufs.iter().enumerate() {
            let index = (self.next_desc + i as u16) % self.size;
            let last = i + 1 == bufs.len();
            let mut flags = if b.writable { DESC_WRITE } else { 0 };
            if !last {
                flags |= DESC_NEXT;
            }
            let next = (index + 1) % self.size;
            let mut raw = [0u8; 16];
            raw[0..8].copy_from_slice(&b.addr.to_le_bytes());
            raw[8..12].copy_from_slice(&b.len.to_le_bytes());
            raw[12..14].copy_from_slice(&flags.to_le_bytes());
            raw[14..16].copy_from_slice(&next.to_le_bytes());
            let _ = mem.write_slice(&raw, GuestAddress(self.desc + 16 * u64::from(index)));
        }
        self.next_desc = (self.next_desc + bufs.len() as u16) % self.size;
        let slot = self.avail + 4 + 2 * u64::from(self.avail_idx % self.size);
        let _ = mem.write_obj(head, GuestAddress(slot));
        self.avail_idx = self.avail_idx.wrapping_add(1);
        let _ = mem.write_obj(self.avail_idx, GuestAddress(self.avail + 2));
        head
    }

    /// Used entries added since the last call: (head index, bytes written).
    pub fn take_used(&mut self, mem: &Memory) -> Vec<(u32, u32)> {
        let idx: u16 = mem.read_obj(GuestAddress(self.used + 2)).unwrap_or(0);
        let mut out = Vec::new();
        while self.used_seen != idx {
            let at = self.used + 4 + 8 * u64::from(self.used_seen % self.size);
            let id: u32 = mem.read_obj(GuestAddress(at)).unwrap_or(u32::MAX);
            let len: u32 = mem.read_obj(GuestAddress(at + 4)).unwrap_or(u32::MAX);
            out.push((id, len));
            self.used_seen = self.used_seen.wrapping_add(1);
        }
        out
    }
}

/// Brings `dev` up as a guest driver would: acknowledge, accept `features`,
/// program `queues` in order, DRIVER_OK. Returns the final status register.
pub fn start(dev: &mut dyn BusDevice, features: u64, queues: &[QueueDriver]) -> u32 {
    let w = |dev: &mut dyn BusDevice, off: u64, v: u32| dev.write(off, &v.to_le_bytes());
    w(dev, 0x70, 0);
    w(dev, 0x70, status::ACKNOWLEDGE | status::DRIVER);
    w(dev, 0x24, 0);
    w(dev, 0x20, features as u32);
    w(dev, 0x24, 1);
    w(dev, 0x20, (features >> 32) as u32);
    w(
        dev,
        0x70,
        status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
    );
    for (i, q) in queues.iter().enumerate() {
        q.program(dev, i as u32);
    }
    w(
        dev,
        0x70,
        status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK,
    );
    let mut b = [0u8; 4];
    dev.read(0x70, &mut b);
    u32::from_le_bytes(b)
}

/// Reads a device's offered feature bits through its registers.
pub fn offered_features(dev: &mut dyn BusDevice) -> u64 {
    let mut f = 0u64;
    for sel in 0..2u32 {
        dev.write(0x14, &sel.to_le_bytes());
        let mut b = [0u8; 4];
        dev.read(0x10, &mut b);
        f |= u64::from(u32::from_le_bytes(b)) << (32 * sel);
    }
    f
}
