//! The serial console of a detached VM: output goes to a ring buffer (what a
//! newly attached client sees first), a log file, and the attached client;
//! input comes from the attached client. One client at a time: a new attach
//! replaces the old one. [`SerialFeeder`] moves input, from a client or
//! from nestvm's own stdin, into the guest's UART without dropping any.

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use nestvm_devices::serial::SerialPort;

use crate::logfile::RotatingFile;
use vmm_sys_util::timerfd::TimerFd;

/// How much recent output a new client is shown.
pub const REPLAY_BYTES: usize = 16 << 10;

struct HubInner {
    ring: VecDeque<u8>,
    log: Option<RotatingFile>,
    client: Option<UnixStream>,
}

/// Where the guest's console output goes.
pub struct ConsoleHub {
    inner: Mutex<HubInner>,
}

impl ConsoleHub {
    /// A hub that also appends everything to `log` (rotated at its cap).
    pub fn new(log: Option<RotatingFile>) -> Arc<Self> {
        Arc::new(Self {
            inner: Mutex::new(HubInner {
                ring: VecDeque::with_capacity(REPLAY_BYTES),
                log,
                client: None,
            }),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HubInner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A writer for the serial device.
    pub fn writer(self: &Arc<Self>) -> HubWriter {
        HubWriter(self.clone())
    }

    /// Makes `client` the attached client, after showing it recent output.
    fn attach(&self, mut client: UnixStream) -> std::io::Result<UnixStream> {
        let mut inner = self.lock();
        if let Some(old) = inner.client.take() {
            let _ =
                (&old).write_all(b"\r\n[nestvm: another console client attached; detached]\r\n");
            let _ = old.shutdown(std::net::Shutdown::Both);
        }
        client.set_write_timeout(Some(std::time::Duration::from_secs(2)))?;
        let (a, b) = inner.ring.as_slices();
        client.write_all(a)?;
        client.write_all(b)?;
        client.set_nonblocking(true)?;
        inner.client = Some(client.try_clone()?);
        Ok(client)
    }

    fn detach(&self) {
        self.lock().client = None;
    }
}

/// The serial device's output writer.
pub struct HubWriter(Arc<ConsoleHub>);

impl Write for HubWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut inner = self.0.lock();
        for &b in buf {
            if inner.ring.len() == REPLAY_BYTES {
                inner.ring.pop_front();
            }
            inner.ring.push_back(b);
        }
        // The client first, then the log: whoever sees output in the log
        // knows the attached client has been sent it too.
        let drop_client = match inner.client.as_mut() {
            // A client that cannot keep up loses output, never stalls the guest.
            Some(c) => match c.write(buf) {
                Ok(_) => false,
                Err(e) => e.kind() != std::io::ErrorKind::WouldBlock,
            },
            None => false,
        };
        if drop_client {
            inner.client = None;
        }
        if let Some(log) = inner.log.as_mut() {
            let _ = log.write_all(buf);
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Accepts console clients and feeds their input to the guest's UART.
pub struct ConsoleServer {
    listener: UnixListener,
    hub: Arc<ConsoleHub>,
    feeder: Option<SerialFeeder>,
    client: Option<UnixStream>,
    watching_client: bool,
}

const TOKEN_LISTEN: u32 = 20;
const TOKEN_CLIENT: u32 = 21;
const TOKEN_RETRY: u32 = 22;

impl ConsoleServer {
    /// A server on `listener` for `hub`'s console.
    pub fn new(listener: UnixListener, hub: Arc<ConsoleHub>) -> Self {
        Self {
            listener,
            hub,
            feeder: None,
            client: None,
            watching_client: false,
        }
    }

    pub(crate) fn set_feeder(&mut self, feeder: SerialFeeder) {
        self.feeder = Some(feeder);
    }

    fn client_events(c: &UnixStream) -> Events {
        Events::with_data(c, TOKEN_CLIENT, EventSet::IN)
    }

    fn drop_client(&mut self, ops: &mut EventOps) {
        if let Some(c) = self.client.take() {
            if self.watching_client {
                let _ = ops.remove(Self::client_events(&c));
            }
        }
        self.watching_client = false;
        self.hub.detach();
    }

    /// Watches the client only while the UART can take more input.
    fn rewatch(&mut self, ops: &mut EventOps) {
        let Some(feeder) = self.feeder.as_mut() else {
            return;
        };
        let want = feeder.is_idle();
        if let Some(c) = &self.client {
            if want != self.watching_client {
                let ev = Self::client_events(c);
                let _ = if want { ops.add(ev) } else { ops.remove(ev) };
                self.watching_client = want;
            }
        }
        feeder.arm_retry(!want);
    }
}

impl MutEventSubscriber for ConsoleServer {
    fn init(&mut self, ops: &mut EventOps) {
        let _ = self.listener.set_nonblocking(true);
        if let Err(e) = ops.add(Events::with_data(
            &self.listener,
            TOKEN_LISTEN,
            EventSet::IN,
        )) {
            log::error!("console server: cannot watch the socket: {e:?}");
        }
        if let Some(f) = &self.feeder {
            let _ = ops.add(Events::with_data_raw(
                f.retry_fd(),
                TOKEN_RETRY,
                EventSet::IN,
            ));
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        match events.data() {
            TOKEN_LISTEN => {
                let Ok((stream, _)) = self.listener.accept() else {
                    return;
                };
                self.drop_client(ops);
                match self.hub.attach(stream) {
                    Ok(c) => {
                        self.client = Some(c);
                        self.watching_client = false;
                    }
                    Err(e) => log::warn!("console client could not attach: {e}"),
                }
            }
            TOKEN_CLIENT => {
                let mut buf = [0u8; 256];
                let n = match self.client.as_mut().map(|c| c.read(&mut buf)) {
                    Some(Ok(n)) if n > 0 => n,
                    Some(Err(e)) if e.kind() == std::io::ErrorKind::WouldBlock => return,
                    _ => {
                        self.drop_client(ops);
                        return;
                    }
                };
                if let Some(f) = self.feeder.as_mut() {
                    f.push(&buf[..n]);
                }
            }
            TOKEN_RETRY => {
                if let Some(f) = self.feeder.as_mut() {
                    f.ack_retry();
                }
            }
            _ => return,
        }
        if let Some(f) = self.feeder.as_mut() {
            f.flush();
        }
        self.rewatch(ops);
    }
}

/// Moves input into the guest's UART. When the UART's receive FIFO is full,
/// input waits in `pending` and a timer retries, so pasted text is never
/// dropped; while anything is pending the source is not read.
pub(crate) struct SerialFeeder {
    serial: Arc<Mutex<SerialPort>>,
    pending: Vec<u8>,
    retry: TimerFd,
}

impl SerialFeeder {
    /// A feeder for `serial`, with its retry timer.
    pub(crate) fn new(serial: Arc<Mutex<SerialPort>>) -> std::io::Result<Self> {
        Ok(Self {
            serial,
            pending: Vec::new(),
            retry: TimerFd::new().map_err(|e| std::io::Error::from_raw_os_error(e.errno()))?,
        })
    }

    pub(crate) fn push(&mut self, bytes: &[u8]) {
        self.pending.extend_from_slice(bytes);
    }

    /// Moves what the UART can take from `pending` into it.
    pub(crate) fn flush(&mut self) {
        let mut uart = self.serial.lock().unwrap_or_else(|p| p.into_inner());
        let n = uart.queue_input(&self.pending);
        self.pending.drain(..n);
    }

    /// Nothing waits: the source may be read.
    pub(crate) fn is_idle(&self) -> bool {
        self.pending.is_empty()
    }

    /// Starts (every 5 ms) or stops the retry timer.
    pub(crate) fn arm_retry(&mut self, on: bool) {
        let d = if on {
            Duration::from_millis(5)
        } else {
            Duration::ZERO
        };
        if let Err(e) = self.retry.reset(d, Some(d).filter(|d| !d.is_zero())) {
            log::warn!("console: cannot arm the retry timer: {e}");
        }
    }

    pub(crate) fn ack_retry(&mut self) {
        let _ = self.retry.wait();
    }

    pub(crate) fn retry_fd(&self) -> RawFd {
        self.retry.as_raw_fd()
    }
}
