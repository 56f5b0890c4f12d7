//! virtio-blk through the real MMIO transport, driven like a guest would.

use super::*;
use crate::driver::{self, Buf, QueueDriver};
use crate::mmio::{MmioDevice, MmioError, MmioSnapshot};
use crate::testing::memory;
use nestvm_devices::bus::BusDevice;
use nestvm_devices::EventTrigger;
use vm_memory::{Bytes, GuestAddress};

struct Rig {
    dev: MmioDevice<Block>,
    mem: Memory,
    q: QueueDriver,
    path: PathBuf,
}

impl Drop for Rig {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

const HDR: u64 = 0x40000;
const DATA: u64 = 0x50000;
const STATUS: u64 = 0x80000;

fn rig(tag: &str, sectors: u64, read_only: bool) -> Rig {
    rig_with_serial(tag, sectors, read_only, "nestvm-disk0")
}

fn rig_with_serial(tag: &str, sectors: u64, read_only: bool, serial: &str) -> Rig {
    let path = std::env::temp_dir().join(format!("nestvm-blk-{}-{tag}.img", std::process::id()));
    let mut content = vec![0u8; (sectors * SECTOR) as usize];
    for (i, b) in content.iter_mut().enumerate() {
        *b = (i / SECTOR as usize) as u8;
    }
    std::fs::write(&path, &content).unwrap();
    let mem = memory();
    let block = Block::open(&path, read_only, serial).unwrap();
    let mut dev = MmioDevice::new(block, mem.clone(), EventTrigger::new().unwrap()).unwrap();
    let offered = driver::offered_features(&mut dev);
    let q = QueueDriver::new(0x10000, 16);
    let st = driver::start(&mut dev, offered, std::slice::from_ref(&q));
    assert!(dev.is_active(), "status {st:#x}");
    Rig { dev, mem, q, path }
}

impl Rig {
    fn header(&self, kind: u32, sector: u64) {
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&kind.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        self.mem.write_slice(&h, GuestAddress(HDR)).unwrap();
    }

    /// Posts `bufs`, notifies, returns (used length, status byte).
    fn submit(&mut self, bufs: &[Buf]) -> (u32, u8) {
        self.mem.write_obj(0xeeu8, GuestAddress(STATUS)).unwrap();
        self.q.add_chain(&self.mem, bufs);
        self.dev.queue_notified(0);
        let used = self.q.take_used(&self.mem);
        assert_eq!(used.len(), 1, "one completion");
        let st: u8 = self.mem.read_obj(GuestAddress(STATUS)).unwrap();
        (used[0].1, st)
    }

    fn request(&mut self, kind: u32, sector: u64, data_len: u32, data_writable: bool) -> (u32, u8) {
        self.header(kind, sector);
        let mut bufs = vec![Buf {
            addr: HDR,
            len: 16,
            writable: false,
        }];
        if data_len > 0 {
            bufs.push(Buf {
                addr: DATA,
                len: data_len,
                writable: data_writable,
            });
        }
        bufs.push(Buf {
            addr: STATUS,
            len: 1,
            writable: true,
        });
        self.submit(&bufs)
    }

    /// The disk's ID as GET_ID returns it into a 20-byte buffer.
    fn get_id(&mut self) -> [u8; ID_BYTES] {
        self.mem
            .write_slice(&[0xee; 20], GuestAddress(DATA))
            .unwrap();
        let (len, st) = self.request(request::GET_ID, 0, 20, true);
        assert_eq!((len, st), (21, status::OK));
        let mut id = [0u8; ID_BYTES];
        self.mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
        id
    }

    fn counter(&self, name: &str) -> u64 {
        self.dev
            .backend()
            .counters()
            .into_iter()
            .find(|c| c.0 == name)
            .unwrap()
            .1
    }
}

#[test]
fn reads_writes_flushes_and_ids() {
    let mut r = rig("rw", 64, false);
    let mut cfg = [0u8; 8];
    r.dev.read(0x100, &mut cfg);
    assert_eq!(u64::from_le_bytes(cfg), 64, "capacity in config space");

    let (len, st) = r.request(request::IN, 3, 1024, true);
    assert_eq!((len, st), (1025, status::OK));
    let mut got = [0u8; 1024];
    r.mem.read_slice(&mut got, GuestAddress(DATA)).unwrap();
    assert!(got[..512].iter().all(|&b| b == 3) && got[512..].iter().all(|&b| b == 4));

    r.mem.write_slice(&[0xab; 512], GuestAddress(DATA)).unwrap();
    assert_eq!(r.request(request::OUT, 10, 512, false), (1, status::OK));
    assert_eq!(r.request(request::FLUSH, 0, 0, false), (1, status::OK));
    let file = std::fs::read(&r.path).unwrap();
    assert!(file[10 * 512..11 * 512].iter().all(|&b| b == 0xab));
    assert_eq!(file[11 * 512], 11);

    assert_eq!(r.get_id(), *b"nestvm-disk0\0\0\0\0\0\0\0\0");
    assert_eq!(r.counter("writes"), 1);
    assert_eq!(r.counter("flushes"), 1);
}

#[test]
fn get_id_shows_the_serial_and_nothing_of_the_host_path() {
    let mut r = rig_with_serial("secret-host-name", 8, false, "DATA 01");
    let id = r.get_id();
    assert_eq!(&id[..8], b"DATA 01\0");
    assert!(id[8..].iter().all(|&b| b == 0), "padded with NULs: {id:?}");
    let shown = String::from_utf8_lossy(&id);
    for piece in ["secret", "host", "nestvm-blk", "img", "/"] {
        assert!(!shown.contains(piece), "GET_ID shows {piece:?}: {shown:?}");
    }
    // The default the VMM gives, likewise.
    let mut r = rig("secret-default", 8, false);
    let shown = String::from_utf8_lossy(&r.get_id()).into_owned();
    assert!(
        !shown.contains("secret") && !shown.contains("img"),
        "{shown:?}"
    );
    // A 20-byte serial fills the ID exactly; a short buffer gets its start.
    let mut r = rig_with_serial("full", 8, false, "12345678901234567890");
    assert_eq!(&r.get_id(), b"12345678901234567890");
    let (len, st) = r.request(request::GET_ID, 0, 8, true);
    assert_eq!((len, st), (9, status::OK));
}

#[test]
fn a_serial_that_cannot_be_an_id_is_refused() {
    let r = rig("serial", 8, true);
    for bad in ["", "123456789012345678901", "tab\there", "caf\u{e9}"] {
        let e = Block::open(&r.path, true, bad).err().unwrap();
        assert!(matches!(e, BlockError::BadSerial(_)), "{bad:?}: {e}");
    }
}

#[test]
fn read_only_disk_refuses_writes() {
    let mut r = rig("ro", 8, true);
    assert_ne!(driver::offered_features(&mut r.dev) & F_RO, 0);
    assert_eq!(r.request(request::OUT, 0, 512, false).1, status::IOERR);
    assert_eq!(std::fs::read(&r.path).unwrap()[0], 0, "image untouched");
    assert_eq!(r.request(request::IN, 1, 512, true).1, status::OK);
}

#[test]
fn malformed_requests_fail_alone() {
    let mut r = rig("bad", 8, false);
    // Past the end, straddling the end, absurd sector, unaligned length.
    assert_eq!(r.request(request::IN, 8, 512, true).1, status::IOERR);
    assert_eq!(r.request(request::OUT, 7, 1024, false).1, status::IOERR);
    assert_eq!(r.request(request::IN, u64::MAX, 512, true).1, status::IOERR);
    assert_eq!(r.request(request::IN, 0, 100, true).1, status::IOERR);
    // Unknown type.
    assert_eq!(r.request(99, 0, 0, false).1, status::UNSUPP);
    // Header too short.
    let (_, st) = r.submit(&[
        Buf {
            addr: HDR,
            len: 8,
            writable: false,
        },
        Buf {
            addr: STATUS,
            len: 1,
            writable: true,
        },
    ]);
    assert_eq!(st, status::IOERR);
    // No status byte at all: handed back with nothing written.
    r.header(request::IN, 0);
    r.q.add_chain(
        &r.mem,
        &[Buf {
            addr: HDR,
            len: 16,
            writable: false,
        }],
    );
    r.dev.queue_notified(0);
    let used = r.q.take_used(&r.mem);
    assert_eq!(used.len(), 1);
    assert_eq!(used[0].1, 0);
    // A buffer outside guest memory.
    r.header(request::IN, 0);
    r.q.add_chain(
        &r.mem,
        &[
            Buf {
                addr: HDR,
                len: 16,
                writable: false,
            },
            Buf {
                addr: 0xffff_0000_0000,
                len: 512,
                writable: true,
            },
            Buf {
                addr: STATUS,
                len: 1,
                writable: true,
            },
        ],
    );
    r.dev.queue_notified(0);
    assert_eq!(r.q.take_used(&r.mem).len(), 1);
    // And the device still works.
    assert_eq!(r.request(request::IN, 2, 512, true), (513, status::OK));
    assert!(r.counter("malformed") >= 2);
    assert!(r.counter("errors") >= 5);
}

#[test]
fn an_image_is_not_opened_twice_for_writing() {
    let r = rig("lock", 8, false);
    let e = Block::open(&r.path, false, "x").err().unwrap();
    assert!(e.to_string().contains("in use"), "{e}");
    let e = Block::open(Path::new("/nonexistent/x.img"), false, "x")
        .err()
        .unwrap();
    assert!(e.to_string().contains("cannot open disk image"), "{e}");
}

#[test]
fn only_a_regular_file_or_a_block_device_is_a_disk() {
    let dir = std::env::temp_dir().join(format!("nestvm-blk-{}-notafile", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    // A directory read-only (opening it for writing fails anyway).
    let e = Block::open(&dir, true, "x").err().unwrap();
    assert!(matches!(e, BlockError::NotAFile(_)), "{e}");
    assert!(Block::open(&dir, false, "x").is_err());
    // A FIFO is refused at once, not waited on for a writer.
    let fifo = dir.join("disk.fifo");
    let _ = std::fs::remove_file(&fifo);
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
    let e = Block::open(&fifo, true, "x").err().unwrap();
    assert!(
        e.to_string()
            .contains("neither a regular file nor a block device"),
        "{e}"
    );
    // A character device neither.
    let e = Block::open(Path::new("/dev/null"), true, "x")
        .err()
        .unwrap();
    assert!(matches!(e, BlockError::NotAFile(_)), "{e}");
}

#[test]
fn device_writes_mark_their_pages_dirty_for_migration() {
    use vm_memory::bitmap::AtomicBitmap;
    use vm_memory::mmap::MmapRegion;
    use vm_memory::GuestMemoryBackend;
    let mut r = rig("dirty", 64, false);
    let mem = r.mem.clone();
    let region: &MmapRegion<AtomicBitmap> = mem.iter().next().unwrap();
    region.bitmap().reset();
    assert_eq!(r.request(request::IN, 3, 512, true), (513, status::OK));
    let bits = region.bitmap().get_and_reset();
    let dirty = |addr: u64| bits[(addr / 4096 / 64) as usize] & (1 << (addr / 4096 % 64)) != 0;
    assert!(dirty(DATA), "the data buffer the disk filled");
    assert!(dirty(STATUS), "the status byte");
    assert!(!dirty(0xa0000), "an untouched page");
    assert!(
        region.bitmap().get_and_reset().iter().all(|&w| w == 0),
        "cleared"
    );
}

#[test]
fn a_released_image_can_be_opened_elsewhere_and_reclaimed_after() {
    use crate::mmio::Inspect;
    let mut r = rig("release", 8, false);
    r.dev.release().unwrap();
    let other = Block::open(&r.path, false, "x").expect("the lock was released");
    assert!(r.dev.reclaim().is_err(), "another process holds it now");
    drop(other);
    r.dev.reclaim().unwrap();
    assert!(Block::open(&r.path, false, "x").is_err(), "locked again");
}

#[test]
fn a_broken_ring_does_not_hang_the_loop() {
    let mut r = rig("ring", 8, false);
    r.header(request::IN, 0);
    r.q.add_chain(
        &r.mem,
        &[
            Buf {
                addr: HDR,
                len: 16,
                writable: false,
            },
            Buf {
                addr: STATUS,
                len: 1,
                writable: true,
            },
        ],
    );
    r.mem
        .write_obj(0x8000u16, GuestAddress(r.q.avail + 2))
        .unwrap();
    r.dev.queue_notified(0);
    assert!(r.q.take_used(&r.mem).is_empty());
}

#[test]
fn a_snapshot_carries_the_queue_to_a_new_device() {
    let mut r = rig("snap", 8, false);
    assert_eq!(r.request(request::IN, 1, 512, true).1, status::OK);
    let snap = r.dev.snapshot();
    assert!(snap.active && snap.queues[0].next_avail == 1);
    // A new device on a copy of the image and the same memory, restored
    // from the snapshot, serves the next request from where the old one
    // stopped.
    let copy = r.path.with_extension("copy");
    std::fs::copy(&r.path, &copy).unwrap();
    let mem = r.mem.clone();
    let restore = |path: &Path, snap: &MmioSnapshot| {
        let block = Block::open(path, false, "x").unwrap();
        MmioDevice::restore(block, mem.clone(), EventTrigger::new().unwrap(), snap)
    };
    let dev = restore(&copy, &snap).unwrap();
    assert!(dev.is_active());
    assert!(
        dev.snapshot().backend.is_none(),
        "a disk has no state of its own"
    );
    drop(std::mem::replace(&mut r.dev, dev));
    assert_eq!(r.request(request::IN, 2, 512, true), (513, status::OK));
    // A snapshot that does not fit this device is refused (the original
    // image is free again: its device is gone).
    let mut bad = snap.clone();
    bad.queues.push(bad.queues[0].clone());
    let e = restore(&r.path, &bad).err().unwrap();
    assert!(matches!(e, MmioError::QueueCount { saved: 2, .. }), "{e}");
    let mut bad = snap.clone();
    bad.queues[0].desc_table = 0xffff_ffff_0000;
    let e = restore(&r.path, &bad).err().unwrap();
    assert!(matches!(e, MmioError::QueueOutsideMemory { index: 0, .. }));
    let mut bad = snap.clone();
    bad.device_type = 1;
    let e = restore(&r.path, &bad).err().unwrap();
    assert!(matches!(e, MmioError::DeviceType { saved: 1, .. }));
    let _ = std::fs::remove_file(copy);
}

/// A loop device over a scratch image, detached on drop.
struct LoopDevice {
    dev: PathBuf,
    image: PathBuf,
}

impl LoopDevice {
    /// `None` where loop devices cannot be had (not root, no losetup).
    fn attach(tag: &str, sectors: u64) -> Option<Self> {
        let image =
            std::env::temp_dir().join(format!("nestvm-loop-{}-{tag}.img", std::process::id()));
        let mut content = vec![0u8; (sectors * SECTOR) as usize];
        for (i, b) in content.iter_mut().enumerate() {
            *b = (i / SECTOR as usize) as u8;
        }
        std::fs::write(&image, &content).unwrap();
        let out = std::process::Command::new("losetup")
            .args(["-f", "--show"])
            .arg(&image)
            .output()
            .ok()?;
        if !out.status.success() {
            let _ = std::fs::remove_file(&image);
            return None;
        }
        let dev = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        Some(Self { dev, image })
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = std::process::Command::new("losetup")
            .arg("-d")
            .arg(&self.dev)
            .status();
        let _ = std::fs::remove_file(&self.image);
    }
}

/// A block device is a disk as a file is: its size is the device's (its
/// metadata says 0), its sectors read and write, a second writer is
/// refused, and so is a device something holds exclusively (as a mounted
/// filesystem does). On a loop device; skipped where none can be had.
#[test]
fn a_block_device_is_a_disk() {
    let Some(lo) = LoopDevice::attach("disk", 64) else {
        eprintln!("SKIPPED a_block_device_is_a_disk: no loop device (needs root and losetup)");
        return;
    };
    let block = Block::open(&lo.dev, false, "loop").unwrap();
    assert_eq!(block.sectors, 64);
    let mem = memory();
    let mut dev = MmioDevice::new(block, mem.clone(), EventTrigger::new().unwrap()).unwrap();
    let offered = driver::offered_features(&mut dev);
    let q = QueueDriver::new(0x10000, 16);
    driver::start(&mut dev, offered, std::slice::from_ref(&q));
    // The rig's helpers, on this device (its path is the device: nothing
    // to remove when it goes).
    let mut r = Rig {
        dev,
        mem,
        q,
        path: std::env::temp_dir().join("nestvm-not-created"),
    };
    assert_eq!(r.request(request::IN, 63, 512, true), (513, status::OK));
    let mut data = [0u8; 512];
    r.mem.read_slice(&mut data, GuestAddress(DATA)).unwrap();
    assert!(data.iter().all(|&b| b == 63), "sector 63 read back");
    r.mem.write_slice(&[0xab; 512], GuestAddress(DATA)).unwrap();
    assert_eq!(r.request(request::OUT, 2, 512, false), (1, status::OK));
    assert_eq!(r.request(request::FLUSH, 0, 0, false), (1, status::OK));
    let on_disk = std::fs::read(&lo.image).unwrap();
    assert!(
        on_disk[1024..1536].iter().all(|&b| b == 0xab),
        "written through"
    );
    let e = Block::open(&lo.dev, false, "again").err().unwrap();
    assert!(matches!(e, BlockError::InUse(_)), "{e}");
    drop(r);
    // Held exclusively, as a mounted filesystem holds its device.
    let held = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::fcntl::OFlag::O_EXCL.bits())
        .open(&lo.dev)
        .unwrap();
    let e = Block::open(&lo.dev, false, "held").err().unwrap();
    assert!(matches!(e, BlockError::InUse(_)), "{e}");
    assert!(
        Block::open(&lo.dev, true, "reader").is_ok(),
        "read-only is let in"
    );
    drop(held);
}
