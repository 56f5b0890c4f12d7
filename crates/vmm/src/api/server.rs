//! The API's server: a thread that accepts one connection at a time and
//! reads its request head within [`REQUEST_DEADLINE`] and [`MAX_REQUEST`]
//! bytes, answers refusals itself, and hands each well-formed [`Request`]
//! over; [`ApiServer`] is the event loop's side, moving them into the
//! controller's [`Queue`].

use std::cell::RefCell;
use std::collections::VecDeque;
use std::io::Read;
use std::os::unix::net::{UnixListener, UnixStream};
use std::rc::Rc;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::time::{Duration, Instant};

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use serde::Serialize;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::guest::{GuestCall, GuestJob, GuestThread};
use super::response::{write_response, Responder};
use super::{parse_query, route, ApiError, Refusal, Request};

/// Longest request head we read.
const MAX_REQUEST: usize = 8 << 10;
/// How long a client has to send its whole request head.
pub const REQUEST_DEADLINE: Duration = Duration::from_secs(2);

/// A request waiting for the controller.
pub struct Pending {
    /// What to do.
    pub request: Request,
    reply: Responder,
}

impl Pending {
    /// Answers with `status` and a JSON body.
    pub fn reply(self, status: u16, body: &impl Serialize) {
        self.reply.send(status, body)
    }

    /// The request, and where its answer goes.
    pub fn into_parts(self) -> (Request, Responder) {
        (self.request, self.reply)
    }
}

/// Requests queued for the run loop.
pub type Queue = Rc<RefCell<VecDeque<Pending>>>;

/// Why a request head could not be read.
#[derive(Debug, thiserror::Error)]
pub enum HeadError {
    /// More than [`MAX_REQUEST`] bytes without the end of the head.
    #[error("request head too large (the limit is {MAX_REQUEST} bytes)")]
    TooLarge,
    /// The deadline passed first.
    #[error("the request did not arrive within {REQUEST_DEADLINE:?}")]
    Late,
    /// The client hung up first.
    #[error("connection closed before the request ended")]
    Closed,
    /// Reading failed.
    #[error("cannot read the request")]
    Read(#[source] std::io::Error),
    /// A Content-Length that is no number.
    #[error("Content-Length {0:?} is not a number of bytes")]
    Length(String),
    /// The first line is no HTTP/1 request line.
    #[error("not an HTTP request line: {0:?}")]
    NotHttp(String),
}

/// Reads a request head, all of it before `deadline`; with it, the bytes
/// of the body that came in the same reads.
fn read_request(stream: &mut UnixStream, deadline: Instant) -> Result<(Head, Vec<u8>), HeadError> {
    let mut buf = Vec::with_capacity(512);
    let mut chunk = [0u8; 512];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        if buf.len() > MAX_REQUEST {
            return Err(HeadError::TooLarge);
        }
        // One deadline for the whole head, not one per read: a client
        // sending a byte at a time gets no longer than a fast one.
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || stream.set_read_timeout(Some(left)).is_err() {
            return Err(HeadError::Late);
        }
        match stream.read(&mut chunk) {
            Ok(0) => return Err(HeadError::Closed),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return Err(HeadError::Late)
            }
            Err(e) => return Err(HeadError::Read(e)),
        }
    }
    let end = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or(buf.len())
        + 4;
    let early = buf.split_off(end.min(buf.len()));
    parse_head(&buf).map(|h| (h, early))
}

/// The header that carries a migration's secret (never a URL).
pub const SECRET_HEADER: &str = "Nestvm-Migration-Secret";

/// What the server reads of a request head.
#[derive(Debug)]
pub struct Head {
    /// The request line's method.
    pub method: String,
    /// Its path and query.
    pub target: String,
    /// The [`SECRET_HEADER`]'s value, if the head has one.
    pub secret: Option<String>,
    /// The body's length, if the head gives one (`Content-Length`).
    pub content_length: Option<u64>,
    /// Whether the head has a `Transfer-Encoding` (a body of unknown
    /// length, which no endpoint takes).
    pub transfer_encoding: bool,
}

/// The request line of a head, and the headers the API reads.
pub fn parse_head(head: &[u8]) -> Result<Head, HeadError> {
    let head = String::from_utf8_lossy(head);
    let mut lines = head.lines();
    let line = lines.next().unwrap_or_default();
    let mut parts = line.split_whitespace();
    let (method, target) = match (parts.next(), parts.next(), parts.next()) {
        (Some(m), Some(p), Some(v)) if v.starts_with("HTTP/1.") => (m.to_owned(), p.to_owned()),
        _ => return Err(HeadError::NotHttp(line.chars().take(80).collect())),
    };
    let headers: Vec<(&str, &str)> = lines
        .take_while(|l| !l.is_empty())
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim(), v.trim()))
        .collect();
    let header = |name: &str| {
        headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| *v)
    };
    let content_length = match header("Content-Length") {
        None => None,
        Some(v) => Some(
            v.parse()
                .map_err(|_| HeadError::Length(v.chars().take(40).collect()))?,
        ),
    };
    Ok(Head {
        method,
        target,
        secret: header(SECRET_HEADER).map(str::to_owned),
        content_length,
        transfer_encoding: header("Transfer-Encoding").is_some(),
    })
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
    /// Serves `listener` on a thread of its own (confined as `seccomp`
    /// says before its first connection), feeding `queue`. The thread
    /// ends at the first connection after this side is dropped.
    /// Guest-agent requests go to `guest`, the thread that runs them
    /// (`None`: the VM has no vsock device, and they are refused).
    pub fn start(
        listener: UnixListener,
        queue: Queue,
        guest: Option<GuestThread>,
        seccomp: crate::seccomp::Mode,
    ) -> std::io::Result<Self> {
        let wake = EventFd::new(EFD_NONBLOCK)?;
        let (tx, inbox) = channel();
        let signal = wake.try_clone()?;
        std::thread::Builder::new()
            .name("api".into())
            .spawn(move || {
                crate::jail::confine(crate::jail::Role::Api);
                crate::seccomp::confine(crate::seccomp::Role::Api, seccomp);
                serve(&listener, &tx, guest.as_ref(), &signal)
            })?;
        Ok(Self { inbox, wake, queue })
    }
}

/// The API thread: one connection at a time, each given at most
/// [`REQUEST_DEADLINE`]; refusals are answered here, the rest handed over.
fn serve(
    listener: &UnixListener,
    tx: &Sender<Pending>,
    guest: Option<&GuestThread>,
    wake: &EventFd,
) {
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
        match route_one(&mut stream, guest) {
            Ok(Routed::Vm(request)) => {
                let pending = Pending {
                    request,
                    reply: Responder::new(stream),
                };
                if tx.send(pending).is_err() {
                    return; // the VMM is done with its API
                }
                let _ = wake.write(1);
            }
            Ok(Routed::Guest(call, early)) => {
                if let Some(g) = guest {
                    g.offer(GuestJob {
                        call,
                        early,
                        stream,
                    });
                }
            }
            Err((r, unread)) => {
                let body = serde_json::to_vec(&ApiError { error: r.error }).unwrap_or_default();
                let _ = write_response(&mut stream, r.status, r.allow, &body);
                discard(&mut stream, unread);
            }
        }
    }
}

/// Reads and drops what is left of a refused request's body (at most
/// `unread` bytes, the largest body any request takes, within
/// [`REQUEST_DEADLINE`]), so closing the connection does not reset it
/// under a client still sending, before the client read the answer.
fn discard(stream: &mut UnixStream, unread: u64) {
    let mut left = unread.min(super::guest::FILE_PIECE as u64);
    let deadline = Instant::now() + REQUEST_DEADLINE;
    let mut chunk = [0u8; 16 << 10];
    while left > 0 {
        let wait = deadline.saturating_duration_since(Instant::now());
        if wait.is_zero() || stream.set_read_timeout(Some(wait)).is_err() {
            return;
        }
        let want = chunk.len().min(usize::try_from(left).unwrap_or(usize::MAX));
        match stream.read(&mut chunk[..want]) {
            Ok(0) | Err(_) => return,
            Ok(n) => left -= n as u64,
        }
    }
}

/// Where a request goes: the controller, or the guest thread (with the
/// body's first bytes).
enum Routed {
    Vm(Request),
    Guest(GuestCall, Vec<u8>),
}

/// Reads, routes and parses one request, or refuses it (with the bytes
/// of its body not yet read).
fn route_one(
    stream: &mut UnixStream,
    guest: Option<&GuestThread>,
) -> Result<Routed, (Refusal, u64)> {
    let (head, early) = read_request(stream, Instant::now() + REQUEST_DEADLINE)
        .map_err(|e| (Refusal::new(400, e.to_string()), 0))?;
    let unread = head
        .content_length
        .unwrap_or(0)
        .saturating_sub(early.len() as u64);
    route_head(&head, early, guest).map_err(|r| (r, unread))
}

/// Routes and parses a request's head; `early` is the start of its body.
fn route_head(head: &Head, early: Vec<u8>, guest: Option<&GuestThread>) -> Result<Routed, Refusal> {
    if head.transfer_encoding {
        return Err(Refusal::new(
            411,
            "a Transfer-Encoding body is not taken: send its Content-Length".into(),
        ));
    }
    let action = route(&head.method, &head.target)?;
    let query = parse_query(&head.target);
    if !action.is_guest() {
        return Request::parse(action, &query, head.secret.as_deref()).map(Routed::Vm);
    }
    let call = GuestCall::parse(action, &query, head.content_length)?;
    if guest.is_none() {
        return Err(Refusal::new(
            409,
            "this VM has no vsock device, which its guest agent needs: 'nestvm vm set NAME --vsock cid=3', then start it again".into(),
        ));
    }
    Ok(Routed::Guest(call, early))
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
        ApiServer::start(
            UnixListener::bind(&sock).unwrap(),
            queue.clone(),
            None,
            crate::seccomp::Mode::Off,
        )
        .unwrap(),
    ));
    em.add_subscriber(server);
    (sock, queue, em)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{call, RunState, VmInfo};
    use std::io::Write;

    #[test]
    fn the_head_gives_its_request_line_and_secret_header_only() {
        let h = parse_head(
            b"PUT /v1/vm/migrate?to=h:1 HTTP/1.1\r\nHost: x\r\nnestvm-migration-secret:  ab12 \r\n\r\n",
        )
        .unwrap();
        assert_eq!(
            (h.method.as_str(), h.target.as_str(), h.secret.as_deref()),
            ("PUT", "/v1/vm/migrate?to=h:1", Some("ab12"))
        );
        // Nothing past the head's end is a header.
        let h = parse_head(b"GET /v1/vm HTTP/1.1\r\n\r\nNestvm-Migration-Secret: x\r\n").unwrap();
        assert_eq!(h.secret, None);
        assert!(parse_head(b"GET /v1/vm\r\n\r\n").is_err());
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
        assert!(matches!(pending.request, Request::Info));
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
    use crate::api::call;
    use event_manager::SubscriberOps;
    use std::io::Write;
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
    use std::io::Write;

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
                (1, Err(e)) => assert!(matches!(e, HeadError::TooLarge), "round {round}: {e}"),
                (_, Err(_)) => {}
                (_, Ok(r)) => panic!("round {round}: random bytes parsed as {r:?}"),
            }
        }
    }
}
