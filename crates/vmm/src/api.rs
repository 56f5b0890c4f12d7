//! The control API of a running VMM: HTTP/1.1 with JSON bodies on a Unix
//! socket (described in `docs/openapi.yaml`). The server reads and routes
//! requests on a thread of its own — each within a deadline and a size
//! limit, so no client can hold up the event loop, and a slow one holds up
//! other clients for [`REQUEST_DEADLINE`] at most — and hands each valid one
//! to the run loop, which owns the vCPUs, over a channel (an eventfd wakes
//! it). [`call`] is the client.
//!
//! | method | path | does |
//! |---|---|---|
//! | GET | /v1/vm | the VM's state |
//! | PUT | /v1/vm/pause | pause every vCPU |
//! | PUT | /v1/vm/resume | resume every vCPU |
//! | PUT | /v1/vm/power-button | press the ACPI power button (the guest shuts down) |
//! | PUT | /v1/vm/kill | stop the VM at once |

use std::cell::RefCell;
use std::collections::VecDeque;
use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::rc::Rc;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::time::{Duration, Instant};

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use serde::{Deserialize, Serialize};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Longest request head we read.
const MAX_REQUEST: usize = 8 << 10;
/// How long a client has to send its whole request head.
pub const REQUEST_DEADLINE: Duration = Duration::from_secs(2);

/// What a VM is doing, as its VMM reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RunState {
    /// Built, vCPUs not yet resumed.
    Starting,
    /// Running guest code.
    Running,
    /// Every vCPU paused.
    Paused,
    /// Asked to power off; waiting for the guest.
    Stopping,
}

/// The body of GET /v1/vm and of successful actions.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmInfo {
    /// The state.
    pub state: RunState,
    /// The VMM's process id.
    pub pid: u32,
    /// vCPUs.
    pub vcpus: u32,
    /// Whether VT-x/AMD-V are exposed to the guest.
    pub nested: bool,
    /// Disks and network adapters, with their counters.
    #[serde(default)]
    pub devices: Vec<DeviceInfo>,
}

/// A virtio device in [`VmInfo`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeviceInfo {
    /// "block" or "net".
    pub kind: String,
    /// The image or TAP (and MAC and policy) it is attached to.
    pub attached: String,
    /// Whether the guest's driver started it.
    pub active: bool,
    /// Request and frame counters.
    pub counters: std::collections::BTreeMap<String, u64>,
}

/// An error body.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ApiError {
    /// What went wrong.
    pub error: String,
}

/// The body of a successful PUT /v1/vm/save.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SaveReply {
    /// The saved-VM directory.
    pub saved: std::path::PathBuf,
    /// What was written.
    #[serde(flatten)]
    pub summary: crate::snapshot::SaveSummary,
    /// vCPUs.
    pub vcpus: usize,
    /// vCPUs that were running a guest of their own (nested state saved).
    pub vcpus_in_guest_mode: usize,
}

/// The body of a successful PUT /v1/vm/checkpoint.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CheckpointReply {
    /// The new checkpoint's metadata.
    #[serde(flatten)]
    pub meta: nestvm_snapshot::layer::Meta,
    /// vCPUs that were running a guest of their own (nested state kept).
    pub vcpus_in_guest_mode: usize,
}

/// An action the run loop carries out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// GET /v1/vm.
    Info,
    /// PUT /v1/vm/pause.
    Pause,
    /// PUT /v1/vm/resume.
    Resume,
    /// PUT /v1/vm/power-button.
    PowerButton,
    /// PUT /v1/vm/kill.
    Kill,
    /// PUT /v1/vm/save: pause, save state and memory, stop.
    Save,
    /// PUT /v1/vm/checkpoint?name=C[&parent=P]: pause, write a checkpoint,
    /// carry on as before.
    Checkpoint,
    /// PUT /v1/vm/migrate?to=HOST:PORT&token=HEX[&max_downtime_ms=N][&max_bandwidth=B]: start
    /// a live migration.
    Migrate,
    /// GET /v1/vm/migration: the current or last migration's progress.
    Migration,
    /// GET /v1/vm/memory: the balloon's policy, state and guest statistics.
    Memory,
    /// PUT /v1/vm/memory?size=BYTES (or ?size=auto): resize the VM's memory.
    Resize,
}

/// A request waiting for the run loop.
pub struct Pending {
    /// What to do.
    pub action: Action,
    /// The query string's `key=value` pairs.
    pub query: Vec<(String, String)>,
    stream: UnixStream,
}

impl Pending {
    /// Answers with `status` and a JSON body.
    pub fn reply(mut self, status: u16, body: &impl Serialize) {
        let body = serde_json::to_vec(body).unwrap_or_else(|_| b"{}".to_vec());
        let _ = write_response(&mut self.stream, status, None, &body);
    }
}

/// Requests queued for the run loop.
pub type Queue = Rc<RefCell<VecDeque<Pending>>>;

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        202 => "Accepted",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        409 => "Conflict",
        _ => "Error",
    }
}

/// Writes a response; `allow` names the method a 405 answer allows (RFC
/// 9110 requires the `Allow` header there).
fn write_response(
    w: &mut impl Write,
    status: u16,
    allow: Option<&str>,
    body: &[u8],
) -> std::io::Result<()> {
    let allow = allow.map(|m| format!("Allow: {m}\r\n")).unwrap_or_default();
    write!(
        w,
        "HTTP/1.1 {status} {}\r\n{allow}Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        reason(status),
        body.len()
    )?;
    w.write_all(body)?;
    w.flush()
}

/// Reads a request head, all of it before `deadline`; returns (method, path).
fn read_request(stream: &mut UnixStream, deadline: Instant) -> Result<(String, String), String> {
    let mut buf = Vec::with_capacity(512);
    let mut chunk = [0u8; 512];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        if buf.len() > MAX_REQUEST {
            return Err("request head too large".into());
        }
        // One deadline for the whole head, not one per read: a client
        // sending a byte at a time gets no longer than a fast one.
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || stream.set_read_timeout(Some(left)).is_err() {
            return Err(format!(
                "the request did not arrive within {REQUEST_DEADLINE:?}"
            ));
        }
        match stream.read(&mut chunk) {
            Ok(0) => return Err("connection closed before the request ended".into()),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return Err(format!(
                    "the request did not arrive within {REQUEST_DEADLINE:?}"
                ))
            }
            Err(e) => return Err(format!("cannot read the request: {e}")),
        }
    }
    let head = String::from_utf8_lossy(&buf);
    let line = head.lines().next().unwrap_or_default();
    let mut parts = line.split_whitespace();
    match (parts.next(), parts.next(), parts.next()) {
        (Some(m), Some(p), Some(v)) if v.starts_with("HTTP/1.") => Ok((m.to_owned(), p.to_owned())),
        _ => Err(format!("not an HTTP request line: {line:?}")),
    }
}

/// The `key=value` pairs after `?` in `path` (no percent-decoding: names
/// nestvm passes are plain).
pub fn parse_query(path: &str) -> Vec<(String, String)> {
    path.split_once('?')
        .map(|(_, q)| {
            q.split('&')
                .filter_map(|kv| kv.split_once('='))
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect()
        })
        .unwrap_or_default()
}

/// Why the server itself refused a request, before the run loop saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// The HTTP status.
    pub status: u16,
    /// The message.
    pub error: String,
    /// For 405: the method the path takes.
    pub allow: Option<&'static str>,
}

impl Refusal {
    fn new(status: u16, error: String) -> Self {
        Refusal {
            status,
            error,
            allow: None,
        }
    }
}

/// Maps a method and path to an action, or a refusal.
pub fn route(method: &str, path: &str) -> Result<Action, Refusal> {
    let path = path.split('?').next().unwrap_or_default();
    let action = match path {
        "/v1/vm" => Action::Info,
        "/v1/vm/pause" => Action::Pause,
        "/v1/vm/resume" => Action::Resume,
        "/v1/vm/power-button" => Action::PowerButton,
        "/v1/vm/kill" => Action::Kill,
        "/v1/vm/save" => Action::Save,
        "/v1/vm/checkpoint" => Action::Checkpoint,
        "/v1/vm/migrate" => Action::Migrate,
        "/v1/vm/migration" => Action::Migration,
        "/v1/vm/memory" if method == "PUT" => Action::Resize,
        "/v1/vm/memory" => Action::Memory,
        _ => return Err(Refusal::new(404, format!("no such endpoint {path}"))),
    };
    // What the path takes (the Allow header of a 405), and whether this
    // method is one of it (/v1/vm/memory routes PUT to Resize above).
    let (allow, ok) = match action {
        Action::Info | Action::Migration => ("GET", method == "GET"),
        Action::Memory | Action::Resize => ("GET, PUT", matches!(method, "GET" | "PUT")),
        _ => ("PUT", method == "PUT"),
    };
    if !ok {
        return Err(Refusal {
            status: 405,
            error: format!("{path} takes {allow}, not {method}"),
            allow: Some(allow),
        });
    }
    Ok(action)
}

/// The control API's server: a thread that accepts and reads requests, and
/// the event loop's side, which moves them into the run loop's [`Queue`].
pub struct ApiServer {
    inbox: Receiver<Pending>,
    wake: EventFd,
    queue: Queue,
}

const TOKEN_API: u32 = 30;

impl ApiServer {
    /// Serves `listener` on a thread of its own, feeding `queue`. The
    /// thread ends at the first connection after this side is dropped.
    pub fn start(listener: UnixListener, queue: Queue) -> std::io::Result<Self> {
        let wake = EventFd::new(EFD_NONBLOCK)?;
        let (tx, inbox) = channel();
        let signal = wake.try_clone()?;
        std::thread::Builder::new()
            .name("api".into())
            .spawn(move || serve(&listener, &tx, &signal))?;
        Ok(Self { inbox, wake, queue })
    }
}

/// The API thread: one connection at a time, each given at most
/// [`REQUEST_DEADLINE`]; refusals are answered here, the rest handed over.
fn serve(listener: &UnixListener, tx: &Sender<Pending>, wake: &EventFd) {
    if let Err(e) = listener.set_nonblocking(false) {
        log::error!("control API: cannot wait on its socket: {e}");
        return;
    }
    for conn in listener.incoming() {
        let mut stream = match conn {
            Ok(s) => s,
            Err(e) => {
                log::warn!("control API: cannot accept: {e}");
                continue;
            }
        };
        let _ = stream.set_write_timeout(Some(REQUEST_DEADLINE));
        let routed = read_request(&mut stream, Instant::now() + REQUEST_DEADLINE)
            .map_err(|e| Refusal::new(400, e))
            .and_then(|(m, p)| route(&m, &p).map(|a| (a, p)));
        match routed {
            Ok((action, path)) => {
                let pending = Pending {
                    action,
                    query: parse_query(&path),
                    stream,
                };
                if tx.send(pending).is_err() {
                    return; // the VMM is done with its API
                }
                let _ = wake.write(1);
            }
            Err(r) => {
                let body = serde_json::to_vec(&ApiError { error: r.error }).unwrap_or_default();
                let _ = write_response(&mut stream, r.status, r.allow, &body);
            }
        }
    }
}

impl MutEventSubscriber for ApiServer {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::with_data(&self.wake, TOKEN_API, EventSet::IN)) {
            log::error!("control API: cannot watch its eventfd: {e:?}");
        }
    }

    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.wake.read();
        let mut queue = self.queue.borrow_mut();
        queue.extend(self.inbox.try_iter());
    }
}

/// Errors of the client.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// No VMM answers on the socket.
    #[error("no VMM answers on {0}")]
    Unreachable(String, #[source] std::io::Error),
    /// The answer was not HTTP/JSON.
    #[error("bad answer from the VMM: {0}")]
    Protocol(String),
}

/// Calls the API at `socket`; returns the status and the JSON body.
pub fn call(
    socket: &Path,
    method: &str,
    path: &str,
    timeout: Duration,
) -> Result<(u16, serde_json::Value), CallError> {
    let unreachable = |e| CallError::Unreachable(socket.display().to_string(), e);
    let mut s = UnixStream::connect(socket).map_err(unreachable)?;
    s.set_read_timeout(Some(timeout)).map_err(unreachable)?;
    s.set_write_timeout(Some(timeout)).map_err(unreachable)?;
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: nestvm\r\nContent-Length: 0\r\n\r\n"
    )
    .map_err(unreachable)?;
    let mut text = String::new();
    s.read_to_string(&mut text).map_err(unreachable)?;
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| CallError::Protocol("no header end".into()))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| CallError::Protocol(format!("bad status line {:?}", head.lines().next())))?;
    let json = serde_json::from_str(body).map_err(|e| CallError::Protocol(e.to_string()))?;
    Ok((status, json))
}

/// A server on a fresh socket (`tag` names it), its queue, and an event
/// loop that runs it.
#[cfg(test)]
fn test_server(
    tag: &str,
) -> (
    std::path::PathBuf,
    Queue,
    event_manager::EventManager<Rc<RefCell<dyn MutEventSubscriber>>>,
) {
    use event_manager::SubscriberOps;
    let dir = std::env::temp_dir().join(format!("nestvm-api-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let sock = dir.join("control.sock");
    let _ = std::fs::remove_file(&sock);
    let queue: Queue = Rc::new(RefCell::new(VecDeque::new()));
    let mut em = event_manager::EventManager::new().unwrap();
    let server: Rc<RefCell<dyn MutEventSubscriber>> = Rc::new(RefCell::new(
        ApiServer::start(UnixListener::bind(&sock).unwrap(), queue.clone()).unwrap(),
    ));
    em.add_subscriber(server);
    (sock, queue, em)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes() {
        assert_eq!(route("GET", "/v1/vm"), Ok(Action::Info));
        assert_eq!(route("PUT", "/v1/vm/pause"), Ok(Action::Pause));
        assert_eq!(route("PUT", "/v1/vm/kill"), Ok(Action::Kill));
        assert_eq!(route("PUT", "/v1/vm/migrate?to=a:1"), Ok(Action::Migrate));
        assert_eq!(route("GET", "/v1/vm/migration"), Ok(Action::Migration));
        assert_eq!(route("GET", "/v1/vm/memory"), Ok(Action::Memory));
        assert_eq!(route("PUT", "/v1/vm/memory?size=auto"), Ok(Action::Resize));
        let refused = |m, p| route(m, p).unwrap_err();
        assert_eq!(refused("POST", "/v1/vm/memory").allow, Some("GET, PUT"));
        assert_eq!(refused("PUT", "/v1/vm/migration").allow, Some("GET"));
        assert_eq!(refused("PUT", "/v1/vm").status, 405);
        assert_eq!(refused("GET", "/v1/vm/pause").allow, Some("PUT"));
        let missing = refused("GET", "/etc/passwd");
        assert_eq!((missing.status, missing.allow), (404, None));
    }

    #[test]
    fn server_queues_good_requests_and_answers_bad_ones() {
        let (sock, queue, mut em) = test_server("queue");
        let serve_until = |em: &mut event_manager::EventManager<_>, done: &dyn Fn() -> bool| {
            let start = std::time::Instant::now();
            while !done() {
                assert!(
                    start.elapsed() < Duration::from_secs(5),
                    "server did not answer"
                );
                em.run_with_timeout(50).unwrap();
            }
        };

        // A good request is queued for the run loop, which answers it.
        let sock2 = sock.clone();
        let client =
            std::thread::spawn(move || call(&sock2, "GET", "/v1/vm", Duration::from_secs(5)));
        serve_until(&mut em, &|| !queue.borrow().is_empty());
        let pending = queue.borrow_mut().pop_front().unwrap();
        assert_eq!(pending.action, Action::Info);
        pending.reply(
            200,
            &VmInfo {
                state: RunState::Paused,
                pid: 7,
                vcpus: 2,
                nested: true,
                devices: vec![],
            },
        );
        let (status, body) = client.join().unwrap().unwrap();
        assert_eq!(
            (status, body["state"].as_str(), body["vcpus"].as_u64()),
            (200, Some("Paused"), Some(2))
        );

        // Bad requests are answered by the server itself and never queued.
        for (method, path, want) in [("PUT", "/v1/vm", 405), ("GET", "/nope", 404)] {
            let sock2 = sock.clone();
            let client =
                std::thread::spawn(move || call(&sock2, method, path, Duration::from_secs(5)));
            let start = std::time::Instant::now();
            while !client.is_finished() {
                assert!(start.elapsed() < Duration::from_secs(5));
                em.run_with_timeout(50).unwrap();
            }
            let (status, body) = client.join().unwrap().unwrap();
            assert_eq!(status, want, "{method} {path}");
            assert!(body["error"].as_str().is_some());
            assert!(queue.borrow().is_empty());
        }

        // The API thread answers what it refuses by itself.
        let raw = |request: &[u8]| {
            let mut s = UnixStream::connect(&sock).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            s.write_all(request).unwrap();
            let mut text = String::new();
            let _ = s.read_to_string(&mut text);
            text
        };
        // A 405 says which method the path takes (RFC 9110).
        let text = raw(b"POST /v1/vm HTTP/1.1\r\n\r\n");
        assert!(text.starts_with("HTTP/1.1 405"), "{text}");
        assert!(text.contains("\r\nAllow: GET\r\n"), "{text}");
        // Garbage gets 400 and the server carries on.
        assert!(raw(b"garbage\r\n\r\n").starts_with("HTTP/1.1 400"));
        assert!(raw(b"GET /nope HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 404"));
    }
}

#[cfg(test)]
mod slow_clients {
    use super::*;
    use event_manager::SubscriberOps;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    /// Counts its events: stands for a virtio queue or the console.
    struct Device(EventFd, Rc<RefCell<u32>>);

    impl MutEventSubscriber for Device {
        fn init(&mut self, ops: &mut EventOps) {
            ops.add(Events::new(&self.0, EventSet::IN)).unwrap();
        }
        fn process(&mut self, _: Events, _: &mut EventOps) {
            let _ = self.0.read();
            *self.1.borrow_mut() += 1;
        }
    }

    /// A client that sends its request a byte every 50 ms holds neither the
    /// event loop (another device is served meanwhile) nor, past the
    /// deadline, the API (it is cut off; the next client is answered).
    #[test]
    fn a_trickling_client_stalls_nothing_and_is_cut_off() {
        let (sock, queue, mut em) = test_server("slow");
        let served = Rc::new(RefCell::new(0));
        let dev = EventFd::new(EFD_NONBLOCK).unwrap();
        em.add_subscriber(Rc::new(RefCell::new(Device(
            dev.try_clone().unwrap(),
            served.clone(),
        ))));

        let trickling = Arc::new(AtomicBool::new(true));
        let started = Arc::new(AtomicBool::new(false));
        let (sock2, still, began) = (sock.clone(), trickling.clone(), started.clone());
        let slow = std::thread::spawn(move || {
            let mut s = UnixStream::connect(&sock2).unwrap();
            let mut answer = String::new();
            let head = b"GET /v1/vm HTTP/1.1\r\nHost: x\r\nX-Padding: ";
            for b in head.iter().cycle().take(2000) {
                if s.write_all(&[*b]).is_err() {
                    break;
                }
                began.store(true, Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = s.read_to_string(&mut answer);
            still.store(false, Ordering::SeqCst);
            answer
        });
        while !started.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(5));
        }
        // The loop turns with the slow request pending (a server on the
        // loop's thread would sit in it now), then a device event comes:
        // it is served while the client still trickles (for 100 s).
        em.run_with_timeout(50).unwrap();
        dev.write(1).unwrap();
        while *served.borrow() == 0 {
            em.run_with_timeout(50).unwrap();
        }
        assert!(
            trickling.load(Ordering::SeqCst),
            "served while the client trickled"
        );
        // The API cut it off at its deadline, and answers the next client.
        let sock2 = sock.clone();
        let next =
            std::thread::spawn(move || call(&sock2, "GET", "/v1/vm", Duration::from_secs(30)));
        let start = Instant::now();
        while queue.borrow().is_empty() {
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "the next client was never read"
            );
            em.run_with_timeout(50).unwrap();
        }
        queue
            .borrow_mut()
            .pop_front()
            .unwrap()
            .reply(200, &ApiError { error: "ok".into() });
        assert_eq!(next.join().unwrap().unwrap().0, 200);
        let cut = slow.join().unwrap();
        assert!(cut.starts_with("HTTP/1.1 400"), "{cut}");
        assert!(cut.contains("did not arrive within"), "{cut}");
    }
}

#[cfg(test)]
mod hostile {
    use super::*;

    /// Random bytes, truncated and oversized request heads: the parser
    /// answers with an error, never panics, never reads without bound.
    #[test]
    fn garbage_requests_are_refused() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for round in 0..300 {
            let (mut a, mut b) = UnixStream::pair().unwrap();
            b.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            let len = (next() % 600) as usize;
            let mut bytes: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            match round % 3 {
                0 => bytes.extend_from_slice(b"\r\n\r\n"),
                1 => bytes.extend(std::iter::repeat_n(b'A', MAX_REQUEST + 10)),
                _ => {}
            }
            let writer = std::thread::spawn(move || {
                let _ = a.write_all(&bytes);
                drop(a);
            });
            let result = read_request(&mut b, Instant::now() + REQUEST_DEADLINE);
            writer.join().unwrap();
            // Random bytes are no request line (the seed is fixed: this
            // holds for every run), and an oversized head is cut off.
            match (round % 3, result) {
                (1, Err(e)) => assert!(e.contains("too large"), "round {round}: {e}"),
                (_, Err(e)) => assert!(!e.is_empty()),
                (_, Ok(r)) => panic!("round {round}: random bytes parsed as {r:?}"),
            }
        }
    }
}
