//! A man in the middle for the migration tests: a loopback TCP proxy that
//! forwards a migration between a real sender and a real receiver, follows
//! the sender's framing (a handshake frame, then length-prefixed sealed
//! frames: `crates/vmm/src/migration/frame.rs`) and tampers with one frame.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::thread::JoinHandle;

/// What the proxy does to the sender's stream.
#[derive(Debug, Clone, Copy)]
pub enum Attack {
    /// Flips one bit in the middle of the sender's Nth sealed frame (0 is
    /// its confirmation, 1 the Hello, then pages).
    Flip(usize),
    /// Sends the Nth sealed frame twice.
    Replay(usize),
    /// Writes a path over the middle of the Hello, as a proxy that rewrote
    /// `disks[0].path` in the clear once did.
    RewriteHello,
    /// Nothing: forwards every frame as it came (the control case).
    Nothing,
}

/// A running proxy.
pub struct Proxy {
    /// Where the sender should connect.
    pub addr: String,
    done: JoinHandle<bool>,
}

impl Proxy {
    /// Listens on a free loopback port and forwards one connection to `to`.
    pub fn start(to: String, attack: Attack) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let done = std::thread::spawn(move || {
            let (sender, _) = listener.accept().unwrap();
            let receiver = TcpStream::connect(&to).unwrap();
            let back = {
                let (mut from, mut to) =
                    (receiver.try_clone().unwrap(), sender.try_clone().unwrap());
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut from, &mut to);
                    let _ = to.shutdown(Shutdown::Write);
                })
            };
            let tampered = forward(&sender, &receiver, attack);
            let _ = receiver.shutdown(Shutdown::Both);
            let _ = sender.shutdown(Shutdown::Both);
            let _ = back.join();
            tampered
        });
        Proxy { addr, done }
    }

    /// Waits for the connection to end; whether the attack was made.
    pub fn tampered(self) -> bool {
        self.done.join().unwrap()
    }
}

/// Forwards the sender's side frame by frame, attacking as told, until
/// either side closes; whether the attacked frame came by.
fn forward(mut from: &TcpStream, mut to: &TcpStream, attack: Attack) -> bool {
    let mut head = [0u8; 3];
    if from.read_exact(&mut head).is_err() {
        return false;
    }
    let mut init = vec![0u8; usize::from(u16::from_le_bytes([head[1], head[2]]))];
    if from.read_exact(&mut init).is_err() || to.write_all(&head).is_err() {
        return false;
    }
    if to.write_all(&init).is_err() {
        return false;
    }
    let mut tampered = false;
    for i in 0.. {
        let mut len = [0u8; 2];
        if from.read_exact(&mut len).is_err() {
            break;
        }
        let mut frame = len.to_vec();
        frame.resize(2 + usize::from(u16::from_le_bytes(len)), 0);
        if from.read_exact(&mut frame[2..]).is_err() {
            break;
        }
        let mut copies = 1;
        match attack {
            Attack::Flip(n) if n == i => {
                let mid = frame.len() / 2;
                frame[mid] ^= 0x10;
                tampered = true;
            }
            Attack::Replay(n) if n == i => {
                copies = 2;
                tampered = true;
            }
            Attack::RewriteHello if i == 1 && frame.len() > 40 => {
                let mid = frame.len() / 2;
                frame[mid..mid + 11].copy_from_slice(b"/etc/shadow");
                tampered = true;
            }
            _ => {}
        }
        for _ in 0..copies {
            if to.write_all(&frame).is_err() {
                return tampered;
            }
        }
    }
    tampered
}
