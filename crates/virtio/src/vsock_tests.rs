//! virtio-vsock through the real MMIO transport, a test driver in the
//! guest's place and real Unix sockets on the host's.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::time::Duration;

use super::*;
use crate::driver::{self, Buf, QueueDriver};
use crate::mmio::MmioDevice;
use crate::testing::memory;
use crate::vsock_host::MAX_CONNECTIONS;
use nestvm_devices::EventTrigger;
use vm_memory::{Bytes, GuestAddress};

const CID: u64 = 3;
const RXBUF: u64 = 0x40000;
const TXBUF: u64 = 0x60000;
const EVBUF: u64 = 0x7f000;
const RX_LEN: u32 = 4096;

struct Rig {
    dev: MmioDevice<Vsock>,
    mem: Memory,
    rx: QueueDriver,
    tx: QueueDriver,
    ev: QueueDriver,
    socket: PathBuf,
    tx_at: u64,
}

fn scratch(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("nestvm-vsock-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn queues() -> [QueueDriver; 3] {
    [
        QueueDriver::new(0x10000, 16),
        QueueDriver::new(0x20000, 16),
        QueueDriver::new(0x30000, 16),
    ]
}

fn rig(tag: &str) -> Rig {
    let socket = scratch(tag).join("vsock.sock");
    let mem = memory();
    let vsock = Vsock::new(CID, &socket).unwrap();
    let mut dev = MmioDevice::new(vsock, mem.clone(), EventTrigger::new().unwrap()).unwrap();
    let offered = driver::offered_features(&mut dev);
    driver::start(&mut dev, offered, &queues());
    assert!(dev.is_active());
    let [rx, tx, ev] = queues();
    let mut r = Rig {
        dev,
        mem,
        rx,
        tx,
        ev,
        socket,
        tx_at: TXBUF,
    };
    r.give_rx(8);
    r
}

fn header(op: u16, src_port: u32, dst_port: u32, len: u32) -> Header {
    Header {
        src_cid: CID,
        dst_cid: HOST_CID,
        src_port,
        dst_port,
        len,
        kind: TYPE_STREAM,
        op,
        flags: 0,
        buf_alloc: 1 << 16,
        fwd_cnt: 0,
    }
}

impl Rig {
    /// Posts `n` receive buffers.
    fn give_rx(&mut self, n: u64) {
        for i in 0..n {
            let addr = RXBUF + (i % 4) * u64::from(RX_LEN);
            let buf = Buf {
                addr,
                len: RX_LEN,
                writable: true,
            };
            self.rx.add_chain(&self.mem, &[buf]);
        }
        self.dev.queue_notified(RX);
    }

    /// The guest sends `h` and `payload`.
    fn send(&mut self, h: Header, payload: &[u8]) {
        let at = self.tx_at;
        self.tx_at = TXBUF + (self.tx_at - TXBUF + 0x1000) % 0x10000;
        self.mem.write_slice(&h.bytes(), GuestAddress(at)).unwrap();
        let mut bufs = vec![Buf {
            addr: at,
            len: HEADER_LEN as u32,
            writable: false,
        }];
        if !payload.is_empty() {
            let p = at + 0x100;
            self.mem.write_slice(payload, GuestAddress(p)).unwrap();
            bufs.push(Buf {
                addr: p,
                len: payload.len() as u32,
                writable: false,
            });
        }
        self.tx.add_chain(&self.mem, &bufs);
        self.dev.queue_notified(TX);
    }

    /// The packets the device gave the guest since the last call.
    fn received(&mut self) -> Vec<(Header, Vec<u8>)> {
        let used = self.rx.take_used(&self.mem);
        let got = used
            .iter()
            .map(|&(id, len)| {
                // Buffers were posted one per descriptor, in order.
                let addr = RXBUF + (u64::from(id) % 4) * u64::from(RX_LEN);
                let mut raw = [0u8; HEADER_LEN];
                self.mem.read_slice(&mut raw, GuestAddress(addr)).unwrap();
                let h = Header::parse(&raw);
                let mut payload = vec![0u8; len as usize - HEADER_LEN];
                let p = GuestAddress(addr + HEADER_LEN as u64);
                self.mem.read_slice(&mut payload, p).unwrap();
                (h, payload)
            })
            .collect();
        self.give_rx(used.len() as u64);
        got
    }

    /// Lets the device see its host sockets until `done` holds of what the
    /// guest received (the sockets are real: their data takes a moment).
    fn until(&mut self, done: impl Fn(&[(Header, Vec<u8>)]) -> bool) -> Vec<(Header, Vec<u8>)> {
        let mut all = Vec::new();
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while std::time::Instant::now() < deadline {
            self.dev.backend_event();
            all.extend(self.received());
            if done(&all) {
                return all;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        panic!("the guest never got what was awaited: {all:?}");
    }

    fn counter(&self, name: &str) -> u64 {
        let c = self.dev.backend().counters();
        c.iter().find(|(n, _)| *n == name).map_or(0, |(_, v)| *v)
    }
}

fn ops(got: &[(Header, Vec<u8>)]) -> Vec<u16> {
    got.iter().map(|(h, _)| h.op).collect()
}

#[test]
fn the_device_says_its_cid_and_refuses_reserved_ones() {
    let r = rig("cid");
    assert_eq!(r.dev.backend().device_type(), 19);
    assert_eq!(r.dev.backend().config(), CID.to_le_bytes().to_vec());
    for bad in [0, 1, 2, u64::from(u32::MAX), u64::MAX] {
        let e = Vsock::new(bad, &scratch("badcid").join("s")).err().unwrap();
        assert!(e.to_string().contains("reserved"), "{bad}: {e}");
    }
}

#[test]
fn a_host_client_connects_to_a_guest_port_and_bytes_flow_both_ways() {
    let mut r = rig("host-initiated");
    let mut client = UnixStream::connect(&r.socket).unwrap();
    client.write_all(b"CONNECT 52\n").unwrap();
    let got = r.until(|g| !g.is_empty());
    let (req, _) = got[0];
    assert_eq!(
        (
            req.op,
            req.src_cid,
            req.dst_cid,
            req.dst_port,
            req.buf_alloc
        ),
        (op::REQUEST, HOST_CID, CID, 52, BUF_ALLOC)
    );
    let local = req.src_port;
    r.send(header(op::RESPONSE, 52, local, 0), &[]);
    let mut reader = BufReader::new(client.try_clone().unwrap());
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    assert_eq!(line, format!("OK {local}\n"));
    // Host to guest.
    client.write_all(b"hello guest").unwrap();
    let got = r.until(|g| g.iter().any(|(h, _)| h.op == op::RW));
    let data = got.iter().find(|(h, _)| h.op == op::RW).unwrap();
    assert_eq!(
        (data.0.dst_port, data.1.as_slice()),
        (52, &b"hello guest"[..])
    );
    // Guest to host.
    r.send(header(op::RW, 52, local, 11), b"hello host!");
    let mut back = [0u8; 11];
    reader.read_exact(&mut back).unwrap();
    assert_eq!(&back, b"hello host!");
    assert_eq!(r.counter("to_host_bytes"), 11);
    // The host closes: the guest hears it sends no more.
    drop((client, reader));
    let got = r.until(|g| ops(g).contains(&op::SHUTDOWN));
    let shut = got.iter().find(|(h, _)| h.op == op::SHUTDOWN).unwrap().0;
    assert_eq!(shut.flags, shutdown::SEND | shutdown::RCV);
    r.send(header(op::RST, 52, local, 0), &[]);
    assert_eq!(r.counter("open"), 0);
}

#[test]
fn a_guest_reaches_a_host_listener_at_socket_underscore_port() {
    let mut r = rig("guest-initiated");
    let mut name = r.socket.clone().into_os_string();
    name.push("_1234");
    let listener = UnixListener::bind(&name).unwrap();
    r.send(header(op::REQUEST, 5000, 1234, 0), &[]);
    let got = r.received();
    assert_eq!(ops(&got), [op::RESPONSE]);
    assert_eq!((got[0].0.src_port, got[0].0.dst_port), (1234, 5000));
    let (mut conn, _) = listener.accept().unwrap();
    r.send(header(op::RW, 5000, 1234, 4), b"ping");
    let mut b = [0u8; 4];
    conn.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"ping");
    conn.write_all(b"pong").unwrap();
    let got = r.until(|g| g.iter().any(|(h, _)| h.op == op::RW));
    assert_eq!(got.iter().find(|(h, _)| h.op == op::RW).unwrap().1, b"pong");
    // The guest shuts both ways: the host end closes, the guest gets RST.
    let mut shut = header(op::SHUTDOWN, 5000, 1234, 0);
    shut.flags = shutdown::SEND | shutdown::RCV;
    r.send(shut, &[]);
    assert!(ops(&r.received()).contains(&op::RST));
    assert_eq!(conn.read(&mut b).unwrap(), 0, "the host end saw the close");
    // Nobody listens on another port: refused.
    r.send(header(op::REQUEST, 5001, 999, 0), &[]);
    assert_eq!(ops(&r.received()), [op::RST]);
    assert_eq!(r.counter("refused"), 1);
}

#[test]
fn a_hostile_guest_gets_resets_and_the_device_stays_up() {
    let mut r = rig("hostile");
    let mut name = r.socket.clone().into_os_string();
    name.push("_7");
    let listener = UnixListener::bind(&name).unwrap();
    // Not its own CID, not to the host, not a stream, a payload longer
    // than the chain: each counted, each answered with a reset.
    let mut wrong_src = header(op::REQUEST, 1, 7, 0);
    wrong_src.src_cid = 99;
    let mut wrong_dst = header(op::REQUEST, 1, 7, 0);
    wrong_dst.dst_cid = 5;
    let mut seqpacket = header(op::REQUEST, 1, 7, 0);
    seqpacket.kind = 2;
    let long = header(op::RW, 1, 7, 60_000);
    for h in [wrong_src, wrong_dst, seqpacket, long] {
        r.send(h, b"x");
    }
    assert_eq!(ops(&r.received()), [op::RST; 4]);
    assert_eq!(r.counter("malformed"), 4);
    // A guest that sends on past its credit while the host end does not
    // read (so the credit stops growing) has that connection reset.
    r.send(header(op::REQUEST, 2, 7, 0), &[]);
    assert_eq!(ops(&r.received()), [op::RESPONSE]);
    let (_held, _) = listener.accept().unwrap();
    let chunk = vec![7u8; 60_000];
    let mut sent = 0;
    let reset = (0..40).any(|_| {
        r.send(header(op::RW, 2, 7, chunk.len() as u32), &chunk);
        sent += chunk.len() as u64;
        ops(&r.received()).contains(&op::RST)
    });
    assert!(reset, "never reset after {sent} bytes");
    assert!(r.counter("to_host_bytes") < sent);
    assert_eq!(r.counter("open"), 0);
    // Connections are bounded.
    for port in 100..100 + MAX_CONNECTIONS as u32 + 3 {
        r.send(header(op::REQUEST, port, 7, 0), &[]);
        let _ = r.received();
    }
    assert_eq!(r.counter("open") as usize, MAX_CONNECTIONS);
    // A host client with a bad line is closed, nothing is sent the guest.
    let mut bad = UnixStream::connect(&r.socket).unwrap();
    bad.write_all(b"HELLO\n").unwrap();
    bad.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    for _ in 0..50 {
        r.dev.backend_event();
    }
    assert_eq!(bad.read(&mut [0u8; 8]).unwrap(), 0, "closed");
    assert!(r.received().iter().all(|(h, _)| h.op != op::REQUEST));
}

#[test]
fn a_restored_device_tells_the_guest_its_connections_are_gone() {
    let mut r = rig("restore");
    let snap = r.dev.snapshot();
    drop(r.dev);
    let vsock = Vsock::new(CID, &r.socket).unwrap();
    let mut dev =
        MmioDevice::restore(vsock, r.mem.clone(), EventTrigger::new().unwrap(), &snap).unwrap();
    let buf = Buf {
        addr: EVBUF,
        len: 4,
        writable: true,
    };
    r.mem
        .write_obj(0xffff_ffffu32, GuestAddress(EVBUF))
        .unwrap();
    r.ev.add_chain(&r.mem, &[buf]);
    dev.queue_notified(EVENT);
    assert_eq!(r.ev.take_used(&r.mem), [(0, 4)]);
    let id: u32 = r.mem.read_obj(GuestAddress(EVBUF)).unwrap();
    assert_eq!(id, EVENT_TRANSPORT_RESET);
    // Once only.
    r.ev.add_chain(&r.mem, &[buf]);
    dev.queue_notified(EVENT);
    assert!(r.ev.take_used(&r.mem).is_empty());
}

/// A host end that stops reading: the guest, keeping to its credit, sends
/// until it has none left; once the host has read it all, the guest must
/// hear of the credit that freed, or it would wait for it for ever.
#[test]
fn credit_freed_by_a_slow_host_reader_reaches_the_guest() {
    let mut r = rig("slow-reader");
    let mut name = r.socket.clone().into_os_string();
    name.push("_9");
    let listener = UnixListener::bind(&name).unwrap();
    r.send(header(op::REQUEST, 3, 9, 0), &[]);
    assert_eq!(ops(&r.received()), [op::RESPONSE]);
    let (mut host, _) = listener.accept().unwrap();
    let (mut sent, mut told) = (0u32, 0u32);
    for _ in 0..100 {
        let credit = BUF_ALLOC - (sent - told);
        if credit == 0 {
            break;
        }
        let n = credit.min(60_000);
        r.send(header(op::RW, 3, 9, n), &vec![5u8; n as usize]);
        sent += n;
        for (h, _) in r.received() {
            told = h.fwd_cnt;
        }
    }
    assert_eq!(BUF_ALLOC - (sent - told), 0, "the guest ran out of credit");
    // The host reads a little at a time, the device seeing its socket in
    // between: credit updates go out part way, and what frees after the
    // last of them is less than half the credit.
    host.set_nonblocking(true).unwrap();
    let (mut got, mut chunk, mut told) = (0u32, vec![0u8; 16 << 10], Vec::new());
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while got < sent {
        assert!(
            std::time::Instant::now() < deadline,
            "the host read only {got} of {sent}"
        );
        match host.read(&mut chunk) {
            Ok(n) => {
                assert!(chunk[..n].iter().all(|&b| b == 5));
                got += n as u32;
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => panic!("the host's read failed: {e}"),
        }
        r.dev.backend_event();
        told.extend(r.received().into_iter().map(|(h, _)| (h.op, h.fwd_cnt)));
    }
    // Every byte the guest sent was taken: it hears of all of it.
    let all_told = |t: &[(u16, u32)]| t.contains(&(op::CREDIT_UPDATE, sent));
    if !all_told(&told) {
        let more = r.until(|g| {
            g.iter()
                .any(|(h, _)| h.op == op::CREDIT_UPDATE && h.fwd_cnt == sent)
        });
        told.extend(more.into_iter().map(|(h, _)| (h.op, h.fwd_cnt)));
    }
    assert!(all_told(&told), "told: {told:?}");
}
