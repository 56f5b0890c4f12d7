//! A man in the middle for the migration tests: a loopback TCP proxy that
//! forwards a migration between a real sender and a real receiver, follows
//! both sides' framing (a handshake frame, then length-prefixed sealed
//! frames: `crates/vmm/src/migration/frame.rs`) and tampers with one frame,
//! or drops one around the commit point and cuts the connection there, or
//! holds each of the receiver's frames back (a slow link).

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

/// The receiver's empty sealed frames, in order: it accepts the VM, says
/// it is built and waits (`Ready`), then says it runs it (`Resumed`). Its
/// answers to the sender's pings carry 8 bytes and are not counted.
const READY: usize = 1;
const RESUMED: usize = 2;

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
    /// Drops the receiver's `Ready` and cuts: the sender never commits.
    DropReady,
    /// Drops the sender's `Go` (its first frame after `Ready`) and cuts:
    /// the sender committed, the receiver never heard it.
    DropGo,
    /// Drops the receiver's `Resumed` and cuts: the VM runs at the
    /// receiver, and the sender never hears it.
    DropResumed,
    /// Holds each of the receiver's frames back this long: a link with
    /// that much more latency one way.
    Delay(Duration),
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
            let ready_passed = Arc::new(AtomicBool::new(false));
            let back = {
                let (from, to) = (receiver.try_clone().unwrap(), sender.try_clone().unwrap());
                let ready_passed = ready_passed.clone();
                std::thread::spawn(move || {
                    let dropped = backward(&from, &to, attack, &ready_passed);
                    // A drop cuts both ways at once; else the sender hears
                    // the end of the receiver's stream.
                    let how = if dropped {
                        Shutdown::Both
                    } else {
                        Shutdown::Write
                    };
                    let _ = to.shutdown(how);
                    let _ = from.shutdown(how);
                    dropped
                })
            };
            let tampered = forward(&sender, &receiver, attack, &ready_passed);
            let _ = receiver.shutdown(Shutdown::Both);
            let _ = sender.shutdown(Shutdown::Both);
            back.join().unwrap() || tampered
        });
        Proxy { addr, done }
    }

    /// Waits for the connection to end; whether the attack was made.
    pub fn tampered(self) -> bool {
        self.done.join().unwrap()
    }
}

/// Forwards one handshake frame (kind, u16 LE length, payload); false if
/// either side closed.
fn handshake_frame(mut from: &TcpStream, mut to: &TcpStream) -> bool {
    let mut head = [0u8; 3];
    if from.read_exact(&mut head).is_err() {
        return false;
    }
    let mut body = vec![0u8; usize::from(u16::from_le_bytes([head[1], head[2]]))];
    if from.read_exact(&mut body).is_err() || to.write_all(&head).is_err() {
        return false;
    }
    to.write_all(&body).is_ok()
}

/// Reads one sealed frame (u16 LE length, then that many bytes), length
/// included.
fn sealed_frame(mut from: &TcpStream) -> Option<Vec<u8>> {
    let mut len = [0u8; 2];
    from.read_exact(&mut len).ok()?;
    let mut frame = len.to_vec();
    frame.resize(2 + usize::from(u16::from_le_bytes(len)), 0);
    from.read_exact(&mut frame[2..]).ok()?;
    Some(frame)
}

/// Forwards the receiver's side frame by frame until either side closes,
/// or drops the frame the attack names; whether it dropped one. Notes in
/// `ready_passed` that `Ready` went by.
fn backward(
    from: &TcpStream,
    mut to: &TcpStream,
    attack: Attack,
    ready_passed: &AtomicBool,
) -> bool {
    if !handshake_frame(from, to) {
        return false;
    }
    let mut empty = None;
    let mut i = 0;
    loop {
        let Some(frame) = sealed_frame(from) else {
            return false;
        };
        if let Attack::Delay(d) = attack {
            std::thread::sleep(d);
        }
        // The first frame (`Accept`) is empty: frames of its length are
        // the ones counted.
        if *empty.get_or_insert(frame.len()) != frame.len() {
            if to.write_all(&frame).is_err() {
                return false;
            }
            continue;
        }
        match attack {
            Attack::DropReady if i == READY => return true,
            Attack::DropResumed if i == RESUMED => return true,
            _ => {}
        }
        if i == READY {
            ready_passed.store(true, Ordering::SeqCst);
        }
        if to.write_all(&frame).is_err() {
            return false;
        }
        i += 1;
    }
}

/// Forwards the sender's side frame by frame, attacking as told, until
/// either side closes; whether the attacked frame came by.
fn forward(
    from: &TcpStream,
    mut to: &TcpStream,
    attack: Attack,
    ready_passed: &AtomicBool,
) -> bool {
    if !handshake_frame(from, to) {
        return false;
    }
    let mut tampered = false;
    for i in 0.. {
        let Some(mut frame) = sealed_frame(from) else {
            break;
        };
        // The sender's only frame after `Ready` is `Go`.
        if matches!(attack, Attack::DropGo) && ready_passed.load(Ordering::SeqCst) {
            return true;
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
