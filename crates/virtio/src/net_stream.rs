//! A network adapter's frames over a byte stream, each frame prefixed by its
//! length as a 32-bit big-endian number: the protocol of passt's Unix socket
//! (and of QEMU's stream netdevs), which carries no virtio-net header.
//!
//! [`StreamIo`] turns that stream into a [`FrameIo`]: frames read from it get
//! an all-zero header in front (no offloads: passt hands over complete
//! frames with their checksums), frames the guest sends lose theirs. Because
//! the peer does no offloads, [`FrameIo::offloads`] says so and the adapter
//! offers the guest none.
//!
//! The stream is the peer's to fill and is checked like guest input: a
//! length outside what a frame can be is skipped byte by byte (counted),
//! never trusted to size a buffer. Both directions are non-blocking: reads
//! stop at `WouldBlock` with any partial frame kept for the next wake-up;
//! a write the socket takes only in part keeps its tail, which goes out
//! before the next frame (frames that arrive meanwhile are dropped, as a
//! full TAP drops them), so the event loop never waits on the peer.

use std::io::{self, Read, Write};
use std::os::fd::{AsFd, BorrowedFd, RawFd};

use crate::net::{FrameIo, HDR_LEN, MAX_FRAME};

/// Bytes of the length in front of each frame.
pub const LEN_PREFIX: usize = 4;
/// The longest frame (without virtio-net header) the stream may carry.
pub const MAX_STREAM_FRAME: usize = MAX_FRAME - HDR_LEN;
/// The shortest: an Ethernet header.
pub const MIN_STREAM_FRAME: usize = 14;
const RX_CAPACITY: usize = 2 * (LEN_PREFIX + MAX_STREAM_FRAME);

/// What the stream delivered that was not a frame.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct StreamCounters {
    /// Frames skipped for a length out of bounds.
    pub bad_length: u64,
    /// Frames the guest sent that were dropped because the stream was full.
    pub tx_full: u64,
}

/// Frames over a length-prefixed byte stream.
pub struct StreamIo<S> {
    stream: S,
    fd: RawFd,
    name: String,
    rx: Vec<u8>,
    rx_start: usize,
    rx_end: usize,
    /// Bytes of an oversized frame still to be discarded.
    skip: usize,
    /// The peer closed its end (reported once).
    closed: bool,
    tx: Vec<u8>,
    /// The unsent tail of the last frame written.
    tx_pending: Vec<u8>,
    counters: StreamCounters,
}

impl<S: Read + Write + Send> StreamIo<S> {
    /// Frames over `stream` (non-blocking), waited on through `fd`, reported
    /// as `name`.
    pub fn new(stream: S, fd: RawFd, name: String) -> Self {
        Self {
            stream,
            fd,
            name,
            rx: vec![0; RX_CAPACITY],
            rx_start: 0,
            rx_end: 0,
            skip: 0,
            closed: false,
            tx: Vec::with_capacity(LEN_PREFIX + MAX_STREAM_FRAME),
            tx_pending: Vec::new(),
            counters: StreamCounters::default(),
        }
    }

    /// What was skipped or dropped so far.
    pub fn counters(&self) -> StreamCounters {
        self.counters
    }

    /// One whole frame from the bytes already read, with its header, if
    /// they hold one; skips what is not a frame.
    fn take_buffered(&mut self, buf: &mut [u8]) -> Option<usize> {
        loop {
            let have = self.rx_end - self.rx_start;
            if self.skip > 0 {
                let n = self.skip.min(have);
                self.skip -= n;
                self.rx_start += n;
                if self.skip > 0 {
                    return None;
                }
                continue;
            }
            if have < LEN_PREFIX {
                return None;
            }
            let at = self.rx_start;
            let mut len = [0u8; LEN_PREFIX];
            len.copy_from_slice(&self.rx[at..at + LEN_PREFIX]);
            let len = u32::from_be_bytes(len) as usize;
            let fits = buf.len().saturating_sub(HDR_LEN).min(MAX_STREAM_FRAME);
            if !(MIN_STREAM_FRAME..=fits).contains(&len) {
                self.counters.bad_length += 1;
                self.rx_start += LEN_PREFIX;
                self.skip = len;
                continue;
            }
            if have < LEN_PREFIX + len {
                return None;
            }
            let frame = &self.rx[at + LEN_PREFIX..at + LEN_PREFIX + len];
            buf[..HDR_LEN].fill(0);
            buf[HDR_LEN..HDR_LEN + len].copy_from_slice(frame);
            self.rx_start += LEN_PREFIX + len;
            return Some(HDR_LEN + len);
        }
    }

    /// Reads more of the stream after what is buffered; `Ok(false)` when
    /// nothing more is waiting.
    fn fill(&mut self) -> io::Result<bool> {
        if self.rx_start > 0 {
            self.rx.copy_within(self.rx_start..self.rx_end, 0);
            self.rx_end -= self.rx_start;
            self.rx_start = 0;
        }
        match self.stream.read(&mut self.rx[self.rx_end..]) {
            Ok(0) => {
                if !self.closed {
                    self.closed = true;
                    log::warn!("net {}: the network process closed its socket: the adapter is cut off until the VM restarts", self.name);
                }
                Ok(false)
            }
            Ok(n) => {
                self.rx_end += n;
                Ok(true)
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(false),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(true),
            Err(e) => Err(e),
        }
    }

    /// Sends what is left of the last frame; true once nothing is.
    fn flush_pending(&mut self) -> io::Result<bool> {
        while !self.tx_pending.is_empty() {
            match self.stream.write(&self.tx_pending) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    self.tx_pending.drain(..n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(true)
    }
}

impl<S: AsFd> AsFd for StreamIo<S> {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.stream.as_fd()
    }
}

impl<S: Read + Write + Send> FrameIo for StreamIo<S> {
    fn read_frame(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            if let Some(n) = self.take_buffered(buf) {
                return Ok(n);
            }
            if self.closed || !self.fill()? {
                return Err(io::ErrorKind::WouldBlock.into());
            }
        }
    }

    fn write_frame(&mut self, frame: &[u8]) -> io::Result<usize> {
        let Some(eth) = frame.get(HDR_LEN..) else {
            return Err(io::ErrorKind::InvalidInput.into());
        };
        if !self.flush_pending()? {
            self.counters.tx_full += 1;
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let len = u32::try_from(eth.len()).map_err(|_| io::ErrorKind::InvalidInput)?;
        self.tx.clear();
        self.tx.extend_from_slice(&len.to_be_bytes());
        self.tx.extend_from_slice(eth);
        let mut sent = 0;
        while sent < self.tx.len() {
            match self.stream.write(&self.tx[sent..]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => sent += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock && sent == 0 => {
                    self.counters.tx_full += 1;
                    return Err(e);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e),
            }
        }
        // A frame begun is finished before any other goes out.
        self.tx_pending.extend_from_slice(&self.tx[sent..]);
        Ok(frame.len())
    }

    fn set_offload(&mut self, _csum: bool, _tso4: bool, _tso6: bool) -> io::Result<()> {
        Ok(())
    }

    fn offloads(&self) -> bool {
        false
    }

    fn host_counters(&self) -> Vec<(&'static str, u64)> {
        vec![("stream_bad_length", self.counters.bad_length)]
    }

    fn raw_fd(&self) -> RawFd {
        self.fd
    }

    fn name(&self) -> String {
        self.name.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;
    use std::os::unix::net::UnixStream;

    fn pair() -> (StreamIo<UnixStream>, UnixStream) {
        let (a, b) = UnixStream::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        let fd = a.as_raw_fd();
        (StreamIo::new(a, fd, "test".into()), b)
    }

    fn framed(eth: &[u8]) -> Vec<u8> {
        let mut v = (eth.len() as u32).to_be_bytes().to_vec();
        v.extend_from_slice(eth);
        v
    }

    #[test]
    fn frames_arriving_in_pieces_come_out_whole_with_a_zero_header() {
        let (mut io, mut peer) = pair();
        let eth: Vec<u8> = (0..60u8).collect();
        let wire = framed(&eth);
        let mut buf = vec![0xaa; MAX_FRAME];
        peer.write_all(&wire[..3]).unwrap();
        assert_eq!(
            io.read_frame(&mut buf).unwrap_err().kind(),
            io::ErrorKind::WouldBlock
        );
        peer.write_all(&wire[3..30]).unwrap();
        assert!(io.read_frame(&mut buf).is_err());
        peer.write_all(&wire[30..]).unwrap();
        peer.write_all(&framed(&eth[..20])).unwrap();
        assert_eq!(io.read_frame(&mut buf).unwrap(), HDR_LEN + 60);
        assert_eq!(&buf[..HDR_LEN], &[0; HDR_LEN]);
        assert_eq!(&buf[HDR_LEN..HDR_LEN + 60], &eth[..]);
        assert_eq!(io.read_frame(&mut buf).unwrap(), HDR_LEN + 20);
        assert!(io.read_frame(&mut buf).is_err());
    }

    #[test]
    fn a_length_out_of_bounds_is_skipped_not_trusted() {
        let (mut io, mut peer) = pair();
        let mut wire = (100_000u32).to_be_bytes().to_vec();
        wire.extend(std::iter::repeat_n(7u8, 100_000));
        wire.extend_from_slice(&framed(&[]));
        wire.extend_from_slice(&framed(&[9; 42]));
        let writer = std::thread::spawn(move || peer.write_all(&wire).map(|_| peer));
        let mut buf = vec![0; MAX_FRAME];
        let n = loop {
            match io.read_frame(&mut buf) {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => std::thread::yield_now(),
                Err(e) => panic!("{e}"),
            }
        };
        assert_eq!(n, HDR_LEN + 42);
        assert_eq!(&buf[HDR_LEN..n], &[9; 42]);
        assert_eq!(io.counters().bad_length, 2);
        drop(writer.join().unwrap().unwrap());
    }

    #[test]
    fn sent_frames_lose_their_header_and_gain_their_length() {
        let (mut io, mut peer) = pair();
        let mut frame = vec![0xee; HDR_LEN];
        frame.extend_from_slice(&[1; 50]);
        assert_eq!(io.write_frame(&frame).unwrap(), frame.len());
        let mut got = vec![0; 54];
        peer.read_exact(&mut got).unwrap();
        assert_eq!(got, framed(&[1; 50]));
        assert_eq!(
            io.write_frame(&[0; 5]).unwrap_err().kind(),
            io::ErrorKind::InvalidInput
        );
    }

    #[test]
    fn a_full_socket_keeps_the_frame_it_began_and_drops_the_next() {
        let (mut io, mut peer) = pair();
        let mut frame = vec![0; HDR_LEN];
        frame.extend_from_slice(&[3; 60_000]);
        // Fill the socket until it takes a frame only in part.
        // (The socket may also fill exactly at a frame's end: then the next
        // frame is the one dropped.)
        let mut accepted = 0usize;
        let mut dropped = false;
        while io.tx_pending.is_empty() && !dropped {
            match io.write_frame(&frame) {
                Ok(_) => accepted += 1,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => dropped = true,
                Err(e) => panic!("{e}"),
            }
        }
        if !dropped {
            assert_eq!(
                io.write_frame(&frame).unwrap_err().kind(),
                io::ErrorKind::WouldBlock
            );
        }
        assert_eq!(io.counters().tx_full, 1);
        // The reader sees every accepted frame whole, then the next one.
        peer.set_nonblocking(false).unwrap();
        let reader = std::thread::spawn(move || {
            let mut lens = Vec::new();
            let mut len = [0; 4];
            while peer.read_exact(&mut len).is_ok() {
                let n = u32::from_be_bytes(len) as usize;
                let mut body = vec![0; n];
                peer.read_exact(&mut body).unwrap();
                assert!(body.iter().all(|&b| b == 3));
                lens.push(n);
            }
            lens
        });
        loop {
            match io.write_frame(&frame) {
                Ok(_) => break,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => std::thread::yield_now(),
                Err(e) => panic!("{e}"),
            }
        }
        while !io.flush_pending().unwrap() {
            std::thread::yield_now();
        }
        drop(io);
        let lens = reader.join().unwrap();
        assert_eq!(lens.len(), accepted + 1);
        assert!(lens.iter().all(|&n| n == 60_000));
    }

    #[test]
    fn a_closed_peer_reads_as_nothing_waiting() {
        let (mut io, peer) = pair();
        drop(peer);
        let mut buf = vec![0; MAX_FRAME];
        assert_eq!(
            io.read_frame(&mut buf).unwrap_err().kind(),
            io::ErrorKind::WouldBlock
        );
        assert!(io.closed);
    }
}
