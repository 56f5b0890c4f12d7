//! passt itself (Debian's package, which the set-up installs): a DHCP
//! discover through the adapter's stream is answered with an offer, a port
//! forward reaches the guest's side, and passt ends when the VMM's end of the
//! socket closes.

use std::io::{self, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use nestvm_virtio::net::{FrameIo, HDR_LEN, MAX_FRAME};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

use super::*;

const MAC: [u8; 6] = [0x52, 0x56, 0, 0, 0, 9];
/// A bound on waiting for passt, which answers in milliseconds: reaching
/// it fails the test, it is never slept.
const PATIENCE: Duration = Duration::from_secs(20);

fn user(hostfwd: &[String]) -> NetConfig {
    NetConfig {
        user: true,
        hostfwd: hostfwd.to_vec(),
        ..Default::default()
    }
}

fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = data
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// A DHCP discover from `MAC`, as a frame with its virtio-net header.
fn discover() -> Vec<u8> {
    let mut bootp = vec![1u8, 1, 6, 0, 0x12, 0x34, 0x56, 0x78, 0, 0, 0x80, 0];
    bootp.extend_from_slice(&[0; 16]); // ciaddr yiaddr siaddr giaddr
    bootp.extend_from_slice(&MAC);
    bootp.extend_from_slice(&[0; 10 + 64 + 128]);
    bootp.extend_from_slice(&[99, 130, 83, 99, 53, 1, 1, 255]);
    let udp_len = 8 + bootp.len() as u16;
    let mut ip = vec![0x45, 0];
    ip.extend_from_slice(&(20 + udp_len).to_be_bytes());
    ip.extend_from_slice(&[0, 0, 0, 0, 64, 17, 0, 0, 0, 0, 0, 0, 255, 255, 255, 255]);
    let sum = checksum(&ip);
    ip[10..12].copy_from_slice(&sum.to_be_bytes());
    let mut frame = vec![0u8; HDR_LEN];
    frame.extend_from_slice(&[0xff; 6]);
    frame.extend_from_slice(&MAC);
    frame.extend_from_slice(&[0x08, 0x00]);
    frame.extend_from_slice(&ip);
    frame.extend_from_slice(&68u16.to_be_bytes());
    frame.extend_from_slice(&67u16.to_be_bytes());
    frame.extend_from_slice(&udp_len.to_be_bytes());
    frame.extend_from_slice(&[0, 0]);
    frame.extend_from_slice(&bootp);
    frame
}

/// The next frame passt sends that `wanted` accepts (its Ethernet bytes).
fn next_frame(p: &mut Passt, wanted: impl Fn(&[u8]) -> bool) -> Vec<u8> {
    let deadline = Instant::now() + PATIENCE;
    let mut buf = vec![0; MAX_FRAME];
    loop {
        match p.io.read_frame(&mut buf) {
            Ok(n) if wanted(&buf[HDR_LEN..n]) => return buf[HDR_LEN..n].to_vec(),
            Ok(_) => continue,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => panic!("reading passt's stream: {e}"),
        }
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(
            !left.is_zero(),
            "passt sent nothing of the kind in {PATIENCE:?}"
        );
        let mut fds = [PollFd::new(p.io.as_fd(), PollFlags::POLLIN)];
        let ms = PollTimeout::from(left.as_millis().min(10_000) as u16);
        poll(&mut fds, ms).unwrap();
    }
}

/// Is this a DHCP offer (UDP from port 67, message type 2) for `MAC`?
fn is_offer(eth: &[u8]) -> bool {
    let udp = 14 + 20;
    eth.len() > udp + 8 + 240
        && eth[12..14] == [0x08, 0x00]
        && eth[14 + 9] == 17
        && eth[udp..udp + 2] == 67u16.to_be_bytes()
        && eth[udp + 8 + 28..udp + 8 + 34] == MAC
        && eth[udp + 8 + 240..].windows(3).any(|w| w == [53, 1, 2])
}

fn state_of(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit(')').next()?.trim().chars().next()
}

#[test]
fn passt_offers_an_address_by_dhcp_and_ends_with_the_vmm_end() {
    let mut p = prepare(&user(&[]), "user0".into()).expect("passt is installed by the set-up");
    let pid = p.process.start().unwrap();
    p.io.write_frame(&discover()).unwrap();
    let offer = next_frame(&mut p, is_offer);
    let yiaddr = &offer[14 + 20 + 8 + 16..14 + 20 + 8 + 20];
    assert_ne!(yiaddr, [0; 4], "the offer gives an address");
    drop(p);
    let deadline = Instant::now() + PATIENCE;
    while !matches!(state_of(pid), None | Some('Z')) {
        assert!(
            Instant::now() < deadline,
            "passt still runs after its socket closed"
        );
        std::thread::yield_now();
    }
}

#[test]
fn a_host_port_forward_reaches_the_guest_side() {
    // A port free now, given to passt (a race with other programs binding
    // it is possible but not with this test's own steps).
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut p = prepare(&user(&[format!("tcp:{port}-:8080")]), "user0".into()).unwrap();
    p.process.start().unwrap();
    p.io.write_frame(&discover()).unwrap();
    next_frame(&mut p, is_offer);
    // passt listens once it has read its options; the connection is
    // retried until it is accepted, within the bound.
    let deadline = Instant::now() + PATIENCE;
    let mut conn = loop {
        match TcpStream::connect(("127.0.0.1", port)) {
            Ok(c) => break c,
            Err(e) => {
                assert!(
                    Instant::now() < deadline,
                    "passt never listened on {port}: {e}"
                );
                std::thread::yield_now();
            }
        }
    };
    conn.write_all(b"x").ok();
    let syn = next_frame(&mut p, |eth| {
        eth.len() >= 14 + 20 + 20
            && eth[12..14] == [0x08, 0x00]
            && eth[14 + 9] == 6
            && eth[14 + 20 + 2..14 + 20 + 4] == 8080u16.to_be_bytes()
    });
    assert_eq!(
        &syn[..6],
        &MAC,
        "the forwarded connection is addressed to the guest"
    );
}

#[test]
fn every_forward_becomes_a_passt_option() {
    let net = user(&["tcp:2222-:22".into(), "udp:5353-:53".into()]);
    assert_eq!(
        arguments(&net, 7, false).unwrap(),
        [
            "--foreground",
            "--quiet",
            "--fd",
            "7",
            "-t",
            "2222:22",
            "-u",
            "5353:53"
        ]
    );
    let as_root = arguments(&net, 7, true).unwrap();
    assert_eq!(&as_root[4..6], ["--runas", RUNAS]);
    let bad = user(&["tcp:0-:22".into()]);
    assert!(matches!(
        arguments(&bad, 7, false),
        Err(PasstError::BadForward(_))
    ));
}
