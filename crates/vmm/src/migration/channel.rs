//! The migration channel: a Noise handshake keyed by the migration secret,
//! then every message sealed, chunk by chunk, as Noise transport messages
//! (the framing is [`super::frame`]'s).
//!
//! The pattern is `Noise_NNpsk0_25519_ChaChaPoly_BLAKE2s`:
//! - the shared secret is the only credential the user handles (one file,
//!   no static key pairs to make, copy or pin), which is what the NN
//!   patterns with a PSK are for;
//! - `psk0` mixes the key into the very first message, so a receiver tells
//!   a peer without it (a wrong file, a scanner, garbage) at that message,
//!   for one hash and one AEAD check, before it does any Diffie-Hellman or
//!   answers with anything but a refusal;
//! - the ephemeral-ephemeral DH (`ee`) makes the session keys fresh per
//!   connection, so guest memory recorded today stays unreadable if the
//!   secret leaks later, and nothing from another session can be replayed
//!   into this one;
//! - ChaCha20-Poly1305 is constant-time without AES hardware.
//!
//! The first message alone could be a replay of a recorded one, so the
//! receiver counts the sender as authenticated only once a first transport
//! message ([`Kind::Confirm`], small, sealed with keys from the live `ee`)
//! opens; until then every frame is at most [`MAX_HANDSHAKE_FRAME`] bytes
//! and the whole handshake must end within a deadline. The sender knows the
//! receiver holds the key once the second handshake message opens. After
//! that, Noise's implicit nonces make any altered, replayed, reordered or
//! dropped frame fail to open, which ends the migration.

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use snow::{HandshakeState, TransportState};

use super::frame::{
    self, FrameError, Kind, Pre, Reassembler, Refusal, MAX_HANDSHAKE_FRAME, MAX_NOISE_MESSAGE,
    PRE_HEAD,
};
use super::secret::Psk;
use super::PROTOCOL_VERSION;

/// The Noise protocol of the channel (see the module's header for why).
pub const NOISE_PARAMS: &str = "Noise_NNpsk0_25519_ChaChaPoly_BLAKE2s";
/// Bound into the handshake: both sides agree on what they are doing.
const PROLOGUE: &[u8] = b"nestvm live migration";

/// Errors of the channel.
#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    /// The connection broke or timed out.
    #[error("the migration connection failed")]
    Io(#[source] std::io::Error),
    /// The peer did not finish the handshake in time.
    #[error("the peer did not finish the handshake within {0:?}")]
    HandshakeTimeout(Duration),
    /// The sender's first message does not open with this side's key.
    #[error(
        "the peer does not hold this migration secret (both sides need the same --token-file)"
    )]
    WrongKey,
    /// The receiver said the sender's key is not its own.
    #[error("the receiver refused this migration secret (both sides need the same --token-file)")]
    KeyRefused,
    /// The receiver's answer does not open with this side's key.
    #[error(
        "the receiver does not hold this migration secret (both sides need the same --token-file)"
    )]
    ReceiverKey,
    /// The sender never proved it holds the live handshake's keys.
    #[error("the peer did not confirm the handshake (a replayed first message?)")]
    Unconfirmed,
    /// The two sides speak different versions.
    #[error("migration protocol {theirs} there, {ours} here: use the same nestvm on both hosts")]
    Version {
        /// This side's.
        ours: u32,
        /// The peer's.
        theirs: u32,
    },
    /// A sealed frame did not open.
    #[error(
        "a frame failed authentication: it was altered, replayed, reordered or dropped on the way"
    )]
    Tampered(#[source] snow::Error),
    /// The peer broke the framing.
    #[error("the peer broke the migration framing")]
    Frame(#[from] FrameError),
    /// The handshake went wrong in a way that is not the peer's doing.
    #[error("the Noise handshake failed")]
    Noise(#[source] snow::Error),
}

/// A stream the channel runs over: bytes both ways, and read and write
/// timeouts it can set (for the handshake's deadline).
pub trait Stream: Read + Write {
    /// Sets both timeouts (`None`: block).
    fn set_timeouts(&self, t: Option<Duration>) -> std::io::Result<()>;
}

impl Stream for std::net::TcpStream {
    fn set_timeouts(&self, t: Option<Duration>) -> std::io::Result<()> {
        self.set_read_timeout(t)?;
        self.set_write_timeout(t)
    }
}

impl Stream for std::os::unix::net::UnixStream {
    fn set_timeouts(&self, t: Option<Duration>) -> std::io::Result<()> {
        self.set_read_timeout(t)?;
        self.set_write_timeout(t)
    }
}

/// An authenticated, encrypted channel.
pub struct Channel<S> {
    stream: S,
    noise: TransportState,
    /// A frame as it goes on the wire: length, then the sealed chunk.
    sealed: Vec<u8>,
    /// A chunk's plaintext.
    plain: Vec<u8>,
    inbox: Reassembler,
}

impl<S> std::fmt::Debug for Channel<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Channel").finish_non_exhaustive()
    }
}

fn builder(key: &Psk) -> Result<snow::Builder<'_>, ChannelError> {
    let params = NOISE_PARAMS.parse().map_err(ChannelError::Noise)?;
    snow::Builder::new(params)
        .psk(0, key.bytes())
        .and_then(|b| b.prologue(PROLOGUE))
        .map_err(ChannelError::Noise)
}

/// Writes one handshake frame.
fn send_pre(s: &mut impl Write, kind: Pre, payload: &[u8]) -> Result<(), ChannelError> {
    s.write_all(&frame::encode_pre(kind, payload)?)
        .and_then(|()| s.flush())
        .map_err(ChannelError::Io)
}

/// Reads one handshake frame into `buf`; returns its kind and length.
fn recv_pre(
    s: &mut impl Stream,
    buf: &mut [u8; MAX_HANDSHAKE_FRAME],
    by: Deadline,
) -> Result<(Pre, usize), ChannelError> {
    let mut head = [0u8; PRE_HEAD];
    by.read_exact(s, &mut head)?;
    let (kind, len) = frame::decode_pre_head(head)?;
    by.read_exact(s, &mut buf[..len])?;
    Ok((kind, len))
}

/// When a read must be done by, if ever.
#[derive(Clone, Copy)]
enum Deadline {
    Never,
    At(Instant, Duration),
}

impl Deadline {
    /// Fills `buf`, failing once the deadline passes however slowly the
    /// peer trickles bytes in.
    fn read_exact(self, s: &mut impl Stream, buf: &mut [u8]) -> Result<(), ChannelError> {
        let Deadline::At(at, total) = self else {
            return s.read_exact(buf).map_err(ChannelError::Io);
        };
        let mut filled = 0;
        while filled < buf.len() {
            let left = at.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(ChannelError::HandshakeTimeout(total));
            }
            s.set_timeouts(Some(left)).map_err(ChannelError::Io)?;
            match s.read(&mut buf[filled..]) {
                Ok(0) => {
                    return Err(ChannelError::Io(std::io::ErrorKind::UnexpectedEof.into()));
                }
                Ok(n) => filled += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    return Err(ChannelError::HandshakeTimeout(total));
                }
                Err(e) => return Err(ChannelError::Io(e)),
            }
        }
        Ok(())
    }
}

/// The sender's side: runs the handshake over `stream` with `key` and
/// returns the channel once the receiver proved it holds the key. The
/// stream's timeouts are the caller's.
pub fn initiate<S: Stream>(mut stream: S, key: &Psk) -> Result<Channel<S>, ChannelError> {
    let mut hs = builder(key)?
        .build_initiator()
        .map_err(ChannelError::Noise)?;
    let mut init = PROTOCOL_VERSION.to_le_bytes().to_vec();
    let mut msg = [0u8; MAX_HANDSHAKE_FRAME];
    let n = hs
        .write_message(&[], &mut msg)
        .map_err(ChannelError::Noise)?;
    init.extend_from_slice(&msg[..n]);
    send_pre(&mut stream, Pre::Init, &init)?;
    let mut buf = [0u8; MAX_HANDSHAKE_FRAME];
    let (kind, len) = recv_pre(&mut stream, &mut buf, Deadline::Never)?;
    match kind {
        Pre::Reply => {}
        Pre::Refused => return Err(refused(&buf[..len])),
        // Only a receiver of protocol 1 speaks first, with its kind-1
        // challenge.
        Pre::Init => {
            return Err(ChannelError::Version {
                ours: PROTOCOL_VERSION,
                theirs: 1,
            })
        }
    }
    hs.read_message(&buf[..len], &mut msg)
        .map_err(|_| ChannelError::ReceiverKey)?;
    let mut ch = Channel::new(stream, hs)?;
    ch.send(Kind::Confirm, &[])?;
    Ok(ch)
}

/// What a receiver's refusal says.
fn refused(payload: &[u8]) -> ChannelError {
    match payload {
        [r, v @ ..] if *r == Refusal::Version as u8 && v.len() == 4 => ChannelError::Version {
            ours: PROTOCOL_VERSION,
            theirs: u32::from_le_bytes([v[0], v[1], v[2], v[3]]),
        },
        _ => ChannelError::KeyRefused,
    }
}

/// The receiver's side: runs the handshake over `stream` with `key`; the
/// whole of it must take at most `deadline`, and every frame until the
/// sender is authenticated is small. Returns the channel once the sender
/// proved it holds the key, with the stream's timeouts set to `io_timeout`.
pub fn respond<S: Stream>(
    mut stream: S,
    key: &Psk,
    deadline: Duration,
    io_timeout: Duration,
) -> Result<Channel<S>, ChannelError> {
    let by = Deadline::At(Instant::now() + deadline, deadline);
    let mut buf = [0u8; MAX_HANDSHAKE_FRAME];
    let (kind, len) = recv_pre(&mut stream, &mut buf, by)?;
    let Some((version, msg)) = buf[..len]
        .split_first_chunk::<4>()
        .filter(|_| kind == Pre::Init)
    else {
        return Err(FrameError::UnknownHandshake(kind as u8).into());
    };
    let theirs = u32::from_le_bytes(*version);
    if theirs != PROTOCOL_VERSION {
        let mut why = vec![Refusal::Version as u8];
        why.extend_from_slice(&PROTOCOL_VERSION.to_le_bytes());
        let _ = send_pre(&mut stream, Pre::Refused, &why);
        return Err(ChannelError::Version {
            ours: PROTOCOL_VERSION,
            theirs,
        });
    }
    let mut hs = builder(key)?
        .build_responder()
        .map_err(ChannelError::Noise)?;
    let mut out = [0u8; MAX_HANDSHAKE_FRAME];
    if hs.read_message(msg, &mut out).is_err() {
        let _ = send_pre(&mut stream, Pre::Refused, &[Refusal::Key as u8]);
        return Err(ChannelError::WrongKey);
    }
    let n = hs
        .write_message(&[], &mut out)
        .map_err(ChannelError::Noise)?;
    send_pre(&mut stream, Pre::Reply, &out[..n])?;
    let mut ch = Channel::new(stream, hs)?;
    match ch.recv_message(MAX_HANDSHAKE_FRAME, by) {
        Ok((Kind::Confirm, _)) => {}
        Ok(_) | Err(ChannelError::Tampered(_)) => return Err(ChannelError::Unconfirmed),
        Err(e) => return Err(e),
    }
    ch.stream
        .set_timeouts(Some(io_timeout))
        .map_err(ChannelError::Io)?;
    Ok(ch)
}

impl<S: Stream> Channel<S> {
    fn new(stream: S, hs: HandshakeState) -> Result<Self, ChannelError> {
        Ok(Channel {
            stream,
            noise: hs.into_transport_mode().map_err(ChannelError::Noise)?,
            sealed: vec![0u8; 2 + MAX_NOISE_MESSAGE],
            plain: vec![0u8; MAX_NOISE_MESSAGE],
            inbox: Reassembler::default(),
        })
    }

    /// The stream underneath.
    pub fn stream(&self) -> &S {
        &self.stream
    }

    /// Seals and sends one message, in as many chunks as it takes.
    pub fn send(&mut self, kind: Kind, payload: &[u8]) -> Result<(), ChannelError> {
        for (head, data) in frame::chunks(kind, payload) {
            let plain = &mut self.plain[..head.len() + data.len()];
            plain[..head.len()].copy_from_slice(&head);
            plain[head.len()..].copy_from_slice(data);
            let n = self
                .noise
                .write_message(plain, &mut self.sealed[2..])
                .map_err(ChannelError::Noise)?;
            // A Noise message is at most 65535 bytes: its length fits.
            self.sealed[..2].copy_from_slice(&(n as u16).to_le_bytes());
            self.stream
                .write_all(&self.sealed[..2 + n])
                .map_err(ChannelError::Io)?;
        }
        self.stream.flush().map_err(ChannelError::Io)
    }

    /// Receives one whole message (a `Refuse` too: the caller reads it).
    pub fn recv(&mut self) -> Result<(Kind, Vec<u8>), ChannelError> {
        self.recv_message(MAX_NOISE_MESSAGE, Deadline::Never)
    }

    /// Reads, opens and puts together chunks until a message is whole;
    /// no frame may be over `max` bytes.
    fn recv_message(&mut self, max: usize, by: Deadline) -> Result<(Kind, Vec<u8>), ChannelError> {
        loop {
            let mut len = [0u8; 2];
            by.read_exact(&mut self.stream, &mut len)?;
            let len = frame::check_sealed_len(usize::from(u16::from_le_bytes(len)), max)?;
            let sealed = &mut self.sealed[..len];
            by.read_exact(&mut self.stream, sealed)?;
            let n = self
                .noise
                .read_message(sealed, &mut self.plain)
                .map_err(ChannelError::Tampered)?;
            if let Some(message) = self.inbox.push(&self.plain[..n])? {
                return Ok(message);
            }
        }
    }
}

#[cfg(test)]
mod tests;
