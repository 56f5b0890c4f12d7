//! The migration stream's framing, apart from any cryptography: what a
//! frame looks like on the wire, how a message is cut into chunks that fit
//! one Noise transport message, and how chunks are put back together.
//!
//! Before the handshake ends a frame is `kind: u8, len: u16 LE, payload`
//! and its payload is at most [`MAX_HANDSHAKE_FRAME`] bytes: nothing larger
//! is read, let alone allocated, from a peer that has proved nothing. After
//! it, a frame is `len: u16 LE` and one Noise transport message of `len`
//! bytes (at most 65535), whose plaintext is a chunk: `kind: u8, flags: u8,
//! data`. A message is one or more chunks of the same kind, all but the last
//! flagged [`MORE`]; its total length is capped by its kind ([`Kind::cap`])
//! and checked before each chunk is appended, so memory grows only with
//! data that was authenticated.

/// Guest page size.
pub const PAGE: usize = 4096;
/// Pages per batch at most.
pub const BATCH_PAGES: usize = 256;
/// Noise's largest message, tag included.
pub const MAX_NOISE_MESSAGE: usize = 65535;
/// The AEAD tag of every Noise transport message.
pub const TAG: usize = 16;
/// A chunk's own header: kind and flags.
pub const CHUNK_HEAD: usize = 2;
/// The most message bytes one chunk carries.
pub const MAX_CHUNK_DATA: usize = MAX_NOISE_MESSAGE - TAG - CHUNK_HEAD;
/// The largest frame a peer may send before it is authenticated.
pub const MAX_HANDSHAKE_FRAME: usize = 256;
/// A pre-authentication frame's header: kind and length.
pub const PRE_HEAD: usize = 3;
/// Chunk flag: another chunk of this message follows.
pub const MORE: u8 = 1;

/// Errors of the framing: what a peer sent does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// A handshake frame of a kind that does not exist.
    #[error("unknown handshake frame {0}")]
    UnknownHandshake(u8),
    /// A frame over the limit for where the stream is.
    #[error("a {len}-byte frame where at most {max} are allowed")]
    TooLong {
        /// What the peer announced.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// A transport frame too short to hold a tag and a chunk header.
    #[error("a {0}-byte frame is too short to be a sealed chunk")]
    TooShort(usize),
    /// A chunk of a message kind that does not exist.
    #[error("unknown message kind {0}")]
    UnknownKind(u8),
    /// Flags this side does not know.
    #[error("unknown chunk flags {0:#x}")]
    BadFlags(u8),
    /// A chunk of another kind inside a message.
    #[error("a {got:?} chunk inside a {want:?} message")]
    Interleaved {
        /// The message being put together.
        want: Kind,
        /// The chunk that arrived.
        got: Kind,
    },
    /// A message longer than its kind allows.
    #[error("a {kind:?} message over {max} bytes")]
    MessageTooLong {
        /// Its kind.
        kind: Kind,
        /// Its cap.
        max: usize,
    },
}

/// What a message is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    /// Sender → receiver, first after the handshake: proves the sender is
    /// the live holder of the handshake's ephemeral key (empty).
    Confirm = 1,
    /// Sender → receiver: the VM's definition and CPU (JSON).
    Hello = 2,
    /// Receiver → sender: it can take this VM.
    Accept = 3,
    /// Either way: no (UTF-8 reason); the stream ends.
    Refuse = 4,
    /// Sender → receiver: a batch of pages.
    Pages = 5,
    /// Sender → receiver: the paused VM's state (a snapshot container).
    State = 6,
    /// Receiver → sender: the VM runs here now.
    Resumed = 7,
    /// Receiver → sender: the VM is built here, paused, its disks held;
    /// it runs only on [`Kind::Go`].
    Ready = 8,
    /// Sender → receiver: the commit point. The sender has given the VM
    /// up: it never resumes its copy on its own from here on.
    Go = 9,
    /// Sender → receiver, twice after each pre-copy round: 8 bytes the
    /// receiver echoes at once, once every frame before it is applied.
    Ping = 10,
    /// Receiver → sender: the bytes of the [`Kind::Ping`] it answers.
    Pong = 11,
}

impl Kind {
    /// The kind numbered `b`, if any.
    pub fn from_u8(b: u8) -> Option<Kind> {
        use Kind::*;
        [
            Confirm, Hello, Accept, Refuse, Pages, State, Resumed, Ready, Go, Ping, Pong,
        ]
        .into_iter()
        .find(|k| *k as u8 == b)
    }

    /// The longest message of this kind either side accepts.
    pub fn cap(self) -> usize {
        match self {
            Kind::Confirm | Kind::Accept | Kind::Resumed | Kind::Ready | Kind::Go => 0,
            Kind::Ping | Kind::Pong => 8,
            Kind::Refuse => 4096,
            // Definition and CPUID tables: tens of KiB per vCPU at most.
            Kind::Hello => 16 << 20,
            Kind::Pages => 4 + BATCH_PAGES * (8 + PAGE),
            // The final state of a VM with many vCPUs is the biggest.
            Kind::State => 64 << 20,
        }
    }
}

/// What a handshake frame is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Pre {
    /// Sender → receiver: the protocol version (`u32` LE), then Noise's
    /// first handshake message.
    Init = 1,
    /// Receiver → sender: Noise's second handshake message.
    Reply = 2,
    /// Receiver → sender: no ([`Refusal`] and this side's version); the
    /// connection ends.
    Refused = 3,
}

/// Why a receiver refused a handshake (said in the clear: it is no secret,
/// and anyone on the path can end the connection anyway).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Refusal {
    /// The sender speaks another protocol version.
    Version = 1,
    /// The first message did not open with the receiver's key.
    Key = 2,
}

/// A handshake frame: header and payload.
pub fn encode_pre(kind: Pre, payload: &[u8]) -> Result<Vec<u8>, FrameError> {
    if payload.len() > MAX_HANDSHAKE_FRAME {
        return Err(FrameError::TooLong {
            len: payload.len(),
            max: MAX_HANDSHAKE_FRAME,
        });
    }
    let mut f = Vec::with_capacity(PRE_HEAD + payload.len());
    f.push(kind as u8);
    f.extend_from_slice(&(payload.len() as u16).to_le_bytes());
    f.extend_from_slice(payload);
    Ok(f)
}

/// A handshake frame's kind and payload length, from its header.
pub fn decode_pre_head(head: [u8; PRE_HEAD]) -> Result<(Pre, usize), FrameError> {
    let kind = match head[0] {
        1 => Pre::Init,
        2 => Pre::Reply,
        3 => Pre::Refused,
        k => return Err(FrameError::UnknownHandshake(k)),
    };
    let len = usize::from(u16::from_le_bytes([head[1], head[2]]));
    if len > MAX_HANDSHAKE_FRAME {
        return Err(FrameError::TooLong {
            len,
            max: MAX_HANDSHAKE_FRAME,
        });
    }
    Ok((kind, len))
}

/// Checks a transport frame's announced length against `max` (the whole
/// Noise message, or less before the sender is authenticated).
pub fn check_sealed_len(len: usize, max: usize) -> Result<usize, FrameError> {
    if len > max {
        return Err(FrameError::TooLong { len, max });
    }
    if len < TAG + CHUNK_HEAD {
        return Err(FrameError::TooShort(len));
    }
    Ok(len)
}

/// The chunks of a message: each chunk's header and its slice of
/// `payload` (one chunk with no data for an empty message).
pub fn chunks(kind: Kind, payload: &[u8]) -> impl Iterator<Item = ([u8; CHUNK_HEAD], &[u8])> {
    let n = payload.len().div_ceil(MAX_CHUNK_DATA).max(1);
    (0..n).map(move |i| {
        let start = i * MAX_CHUNK_DATA;
        let end = (start + MAX_CHUNK_DATA).min(payload.len());
        let flags = if i + 1 < n { MORE } else { 0 };
        ([kind as u8, flags], &payload[start..end])
    })
}

/// Puts messages back together from their chunks.
#[derive(Debug, Default)]
pub struct Reassembler {
    partial: Option<(Kind, Vec<u8>)>,
}

impl Reassembler {
    /// Takes one chunk's plaintext; returns the message it completes.
    pub fn push(&mut self, chunk: &[u8]) -> Result<Option<(Kind, Vec<u8>)>, FrameError> {
        let (&[k, flags], data) = chunk
            .split_first_chunk::<CHUNK_HEAD>()
            .ok_or(FrameError::TooShort(chunk.len()))?;
        let kind = Kind::from_u8(k).ok_or(FrameError::UnknownKind(k))?;
        if flags & !MORE != 0 {
            return Err(FrameError::BadFlags(flags));
        }
        let (want, mut buf) = self.partial.take().unwrap_or((kind, Vec::new()));
        if want != kind {
            return Err(FrameError::Interleaved { want, got: kind });
        }
        if data.len() > kind.cap().saturating_sub(buf.len()) {
            return Err(FrameError::MessageTooLong {
                kind,
                max: kind.cap(),
            });
        }
        buf.extend_from_slice(data);
        if flags & MORE != 0 {
            self.partial = Some((kind, buf));
            return Ok(None);
        }
        Ok(Some((kind, buf)))
    }

    /// Whether a message is half put together.
    pub fn pending(&self) -> bool {
        self.partial.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plain(head: [u8; CHUNK_HEAD], data: &[u8]) -> Vec<u8> {
        let mut c = head.to_vec();
        c.extend_from_slice(data);
        c
    }

    fn round_trip(kind: Kind, payload: &[u8]) -> (usize, Vec<u8>) {
        let mut r = Reassembler::default();
        let mut n = 0;
        let mut done = None;
        for (head, data) in chunks(kind, payload) {
            assert!(data.len() <= MAX_CHUNK_DATA);
            assert!(done.is_none(), "a chunk after the last");
            n += 1;
            done = r.push(&plain(head, data)).unwrap();
        }
        let (k, got) = done.expect("the last chunk completes the message");
        assert_eq!(k, kind);
        assert!(!r.pending());
        (n, got)
    }

    #[test]
    fn messages_are_cut_to_fit_noise_and_put_back() {
        assert_eq!(round_trip(Kind::Accept, &[]), (1, vec![]));
        let exact = vec![7u8; MAX_CHUNK_DATA];
        assert_eq!(round_trip(Kind::Hello, &exact), (1, exact.clone()));
        let batch: Vec<u8> = (0..Kind::Pages.cap()).map(|i| i as u8).collect();
        let (n, got) = round_trip(Kind::Pages, &batch);
        assert_eq!(n, Kind::Pages.cap().div_ceil(MAX_CHUNK_DATA));
        assert_eq!(got, batch);
        assert_eq!(CHUNK_HEAD + MAX_CHUNK_DATA + TAG, MAX_NOISE_MESSAGE);
    }

    #[test]
    fn hostile_chunks_are_refused() {
        let mut r = Reassembler::default();
        assert_eq!(r.push(&[5]), Err(FrameError::TooShort(1)));
        assert_eq!(r.push(&[99, 0]), Err(FrameError::UnknownKind(99)));
        assert_eq!(r.push(&[5, 2]), Err(FrameError::BadFlags(2)));
        assert_eq!(
            r.push(&[Kind::Accept as u8, 0, 1]),
            Err(FrameError::MessageTooLong {
                kind: Kind::Accept,
                max: 0
            })
        );
        assert_eq!(r.push(&[Kind::Hello as u8, MORE, 1]), Ok(None));
        assert_eq!(
            r.push(&[Kind::State as u8, 0]),
            Err(FrameError::Interleaved {
                want: Kind::Hello,
                got: Kind::State
            })
        );
        // A batch that would grow past its cap is cut off before it grows.
        let mut r = Reassembler::default();
        let big = vec![0u8; MAX_CHUNK_DATA];
        let mut result = Ok(None);
        for _ in 0..=Kind::Pages.cap() / MAX_CHUNK_DATA {
            result = r.push(&plain([Kind::Pages as u8, MORE], &big));
            if result.is_err() {
                break;
            }
        }
        assert!(matches!(result, Err(FrameError::MessageTooLong { .. })));
    }

    #[test]
    fn handshake_frames_are_small_and_typed() {
        let f = encode_pre(Pre::Init, &[1, 2, 3]).unwrap();
        assert_eq!(f, [1, 3, 0, 1, 2, 3]);
        assert_eq!(decode_pre_head([1, 3, 0]), Ok((Pre::Init, 3)));
        assert_eq!(
            decode_pre_head([1, 0xff, 0xff]),
            Err(FrameError::TooLong {
                len: 65535,
                max: MAX_HANDSHAKE_FRAME
            })
        );
        assert_eq!(
            decode_pre_head([9, 0, 0]),
            Err(FrameError::UnknownHandshake(9))
        );
        assert!(encode_pre(Pre::Reply, &[0; MAX_HANDSHAKE_FRAME + 1]).is_err());
        assert_eq!(check_sealed_len(17, 100), Err(FrameError::TooShort(17)));
        assert_eq!(check_sealed_len(18, 100), Ok(18));
        assert!(check_sealed_len(101, 100).is_err());
    }
}
