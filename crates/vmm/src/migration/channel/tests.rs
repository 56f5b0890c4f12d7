//! The channel against a wrong key, a wrong version, garbage, silence, a
//! replayed handshake, and every way of tampering with sealed frames.

use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use super::*;

const LONG: Duration = Duration::from_secs(30);

fn key(b: u8) -> Psk {
    Psk::from_bytes(std::array::from_fn(|i| b.wrapping_add(i as u8 * 37)))
}

/// A socket whose writes go, once `capture` is on, into a buffer instead.
#[derive(Clone)]
struct Tap {
    s: Arc<UnixStream>,
    log: Arc<Mutex<Vec<u8>>>,
    capture: Arc<Mutex<bool>>,
}

impl Tap {
    fn new(s: UnixStream) -> Self {
        Tap {
            s: Arc::new(s),
            log: Arc::default(),
            capture: Arc::default(),
        }
    }
}

impl Read for Tap {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        (&*self.s).read(buf)
    }
}

impl Write for Tap {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if !*self.capture.lock().unwrap() {
            self.log.lock().unwrap().extend_from_slice(buf);
            return (&*self.s).write(buf);
        }
        self.log.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Stream for Tap {
    fn set_timeouts(&self, t: Option<Duration>) -> std::io::Result<()> {
        self.s.set_timeouts(t)
    }
}

fn responder(
    s: UnixStream,
    k: Psk,
    deadline: Duration,
) -> JoinHandle<Result<Channel<UnixStream>, ChannelError>> {
    std::thread::spawn(move || respond(s, &k, deadline, LONG))
}

/// A finished handshake: the sender's channel over a tap, the receiver's.
fn session() -> (Channel<Tap>, Tap, Channel<UnixStream>, UnixStream) {
    let (a, b) = UnixStream::pair().unwrap();
    let b2 = b.try_clone().unwrap();
    let r = responder(b, key(1), LONG);
    let tap = Tap::new(a);
    let sender = initiate(tap.clone(), &key(1)).unwrap();
    (sender, tap, r.join().unwrap().unwrap(), b2)
}

/// The sealed frames of `messages`, as the sender would have sent them.
fn sealed_frames(messages: &[(Kind, Vec<u8>)]) -> (Vec<Vec<u8>>, Channel<UnixStream>, UnixStream) {
    let (mut sender, tap, receiver, _b) = session();
    *tap.capture.lock().unwrap() = true;
    tap.log.lock().unwrap().clear();
    for (k, m) in messages {
        sender.send(*k, m).unwrap();
    }
    let bytes = tap.log.lock().unwrap().clone();
    let mut frames = Vec::new();
    let mut rest = &bytes[..];
    while let Some((len, tail)) = rest.split_first_chunk::<2>() {
        let n = usize::from(u16::from_le_bytes(*len));
        frames.push(rest[..2 + n].to_vec());
        rest = &tail[n..];
    }
    // The sender's end of the socket, for the test to write what it likes.
    (frames, receiver, tap.s.try_clone().unwrap())
}

#[test]
fn messages_of_any_size_go_through_sealed() {
    let (mut sender, tap, mut receiver, _b) = session();
    let big: Vec<u8> = (0..3 * frame::MAX_CHUNK_DATA + 5)
        .map(|i| i as u8)
        .collect();
    // More than a socket buffer holds: the receiver reads meanwhile.
    let want = big.clone();
    let r = std::thread::spawn(move || {
        assert_eq!(receiver.recv().unwrap(), (Kind::Hello, want));
        assert_eq!(receiver.recv().unwrap(), (Kind::Accept, vec![]));
        receiver.send(Kind::Refuse, b"no room").unwrap();
    });
    sender.send(Kind::Hello, &big).unwrap();
    sender.send(Kind::Accept, &[]).unwrap();
    assert_eq!(sender.recv().unwrap(), (Kind::Refuse, b"no room".to_vec()));
    r.join().unwrap();
    // Nothing of the message is on the wire in the clear.
    let wire = tap.log.lock().unwrap().clone();
    for at in [0, 70_000, 150_000] {
        let probe = &big[at..at + 32];
        assert!(!wire.windows(32).any(|w| w == probe), "clear text at {at}");
    }
}

#[test]
fn a_wrong_key_is_refused_at_the_first_message() {
    let (a, b) = UnixStream::pair().unwrap();
    let r = responder(b, key(1), LONG);
    let e = initiate(a, &key(2)).unwrap_err();
    assert!(matches!(e, ChannelError::KeyRefused), "{e}");
    assert!(matches!(r.join().unwrap(), Err(ChannelError::WrongKey)));
}

#[test]
fn another_version_is_refused_with_ours() {
    let (mut a, b) = UnixStream::pair().unwrap();
    let r = responder(b, key(1), LONG);
    let mut init = 99u32.to_le_bytes().to_vec();
    init.extend_from_slice(&[0; 48]);
    send_pre(&mut a, Pre::Init, &init).unwrap();
    let mut buf = [0u8; MAX_HANDSHAKE_FRAME];
    let (kind, len) = recv_pre(&mut a, &mut buf, Deadline::Never).unwrap();
    assert_eq!(kind, Pre::Refused);
    let e = refused(&buf[..len]).to_string();
    assert!(
        e.contains(&format!("protocol {PROTOCOL_VERSION} there")),
        "{e}"
    );
    let e = r.join().unwrap().unwrap_err().to_string();
    assert!(e.contains("99 there"), "{e}");
}

#[test]
fn garbage_oversize_and_silence_fail_the_handshake_quickly() {
    for (bytes, says) in [
        (&b"GET / HTTP/1.0\r\n\r\n"[..], "framing"),
        (&[1, 0xff, 0xff][..], "framing"),
        (&[1, 60, 0, 2, 0, 0, 0][..], "within"),
        (&[][..], "within"),
    ] {
        let (mut a, b) = UnixStream::pair().unwrap();
        let r = responder(b, key(1), Duration::from_millis(200));
        a.write_all(bytes).unwrap();
        let e = r.join().unwrap().unwrap_err();
        assert!(e.to_string().contains(says), "{bytes:?}: {e}");
        drop(a);
    }
    // A peer that hangs up is not waited for.
    let (a, b) = UnixStream::pair().unwrap();
    drop(a);
    let e = responder(b, key(1), LONG).join().unwrap().unwrap_err();
    assert!(matches!(e, ChannelError::Io(_)), "{e}");
}

#[test]
fn a_replayed_handshake_is_not_authenticated() {
    let (_sender, tap, _receiver, _b) = session();
    let recorded = tap.log.lock().unwrap().clone();
    // The same first message and confirmation, to a fresh receiver: it
    // answers with new keys the replayer does not have.
    let (mut a, b) = UnixStream::pair().unwrap();
    let r = responder(b, key(1), LONG);
    a.write_all(&recorded).unwrap();
    let e = r.join().unwrap().unwrap_err();
    assert!(matches!(e, ChannelError::Unconfirmed), "{e}");
}

#[test]
fn a_tampered_stream_fails_to_open() {
    let messages = [
        (Kind::Pages, vec![1u8; 100]),
        (Kind::Pages, vec![2u8; 100]),
        (Kind::State, vec![3u8; 100]),
    ];
    type Tamper = fn(Vec<Vec<u8>>) -> Vec<Vec<u8>>;
    // What reaches the receiver, and how many messages open before it stops.
    let cases: [(&str, Tamper, usize); 4] = [
        (
            "flipped",
            |mut f| {
                let mid = f[1].len() / 2;
                f[1][mid] ^= 1;
                f
            },
            1,
        ),
        (
            "replayed",
            |f| vec![f[0].clone(), f[0].clone(), f[1].clone()],
            1,
        ),
        ("reordered", |f| vec![f[1].clone(), f[0].clone()], 0),
        ("dropped", |f| vec![f[0].clone(), f[2].clone()], 1),
    ];
    for (what, tamper, opened) in cases {
        let (frames, mut receiver, mut w) = sealed_frames(&messages);
        assert_eq!(frames.len(), 3);
        for f in tamper(frames) {
            w.write_all(&f).unwrap();
        }
        drop(w);
        let mut got = Vec::new();
        let err = loop {
            match receiver.recv() {
                Ok(m) => got.push(m),
                Err(e) => break e,
            }
        };
        assert!(matches!(err, ChannelError::Tampered(_)), "{what}: {err}");
        assert_eq!(got, messages[..opened], "{what}");
    }
}
