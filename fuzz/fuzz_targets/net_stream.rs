//! passt's side of a `--net user` adapter: an arbitrary byte stream, handed
//! over in arbitrary pieces, must come out as whole frames each within the
//! bounds of a frame, with an all-zero virtio-net header in front; whatever
//! the guest sends goes out length-prefixed and byte for byte. Nothing may
//! panic, and no length from the stream may size a buffer.

#![no_main]

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::sync::{Arc, Mutex};

use libfuzzer_sys::fuzz_target;
use nestvm_virtio::net::{FrameIo, HDR_LEN, MAX_FRAME};
use nestvm_virtio::net_stream::{StreamIo, MAX_STREAM_FRAME, MIN_STREAM_FRAME};

/// The peer: hands out the input in the given pieces, takes writes only up
/// to a budget (then `WouldBlock`), keeping what it took.
struct Peer {
    pieces: VecDeque<Vec<u8>>,
    room: usize,
    taken: Arc<Mutex<Vec<u8>>>,
}

impl Read for Peer {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let Some(mut p) = self.pieces.pop_front() else {
            return Err(io::ErrorKind::WouldBlock.into());
        };
        if p.is_empty() {
            return Ok(0); // the peer closed
        }
        let n = p.len().min(buf.len());
        buf[..n].copy_from_slice(&p[..n]);
        if n < p.len() {
            self.pieces.push_front(p.split_off(n));
        }
        Ok(n)
    }
}

impl Write for Peer {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.room == 0 {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let n = buf.len().min(self.room);
        self.room -= n;
        self.taken.lock().unwrap().extend_from_slice(&buf[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 3 {
        return;
    }
    // Byte 0: how the input is cut; byte 1-2: the write budget.
    let cut = usize::from(data[0]) * 97 + 1;
    let room = usize::from(u16::from_le_bytes([data[1], data[2]])) * 3;
    let input = &data[3..];
    let pieces = input.chunks(cut).map(<[u8]>::to_vec).collect();
    let taken = Arc::new(Mutex::new(Vec::new()));
    let mut io = StreamIo::new(
        Peer {
            pieces,
            room,
            taken: taken.clone(),
        },
        -1,
        "fuzz".into(),
    );
    let mut buf = vec![0xa5; MAX_FRAME];
    let mut sent = Vec::new();
    loop {
        match io.read_frame(&mut buf) {
            Ok(n) => {
                assert!((HDR_LEN + MIN_STREAM_FRAME..=HDR_LEN + MAX_STREAM_FRAME).contains(&n));
                assert!(buf[..HDR_LEN].iter().all(|&b| b == 0));
                // Echo the frame back, as a guest would send one.
                if io.write_frame(&buf[..n]).is_ok() {
                    sent.push(buf[HDR_LEN..n].to_vec());
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) => panic!("unexpected error {e}"),
        }
        assert!(sent.len() <= input.len() / (4 + MIN_STREAM_FRAME));
    }
    // What the peer took is the accepted frames, length-prefixed, in order
    // (the last perhaps cut short by the peer's budget).
    let taken = taken.lock().unwrap();
    let mut at = 0;
    for frame in &sent {
        let mut record = (frame.len() as u32).to_be_bytes().to_vec();
        record.extend_from_slice(frame);
        let end = (at + record.len()).min(taken.len());
        assert_eq!(&taken[at..end], &record[..end - at]);
        at = end;
    }
    assert_eq!(at, taken.len());
});
