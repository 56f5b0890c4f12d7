//! The control API's guest-agent requests — `GET /v1/vm/agent`, `PUT
//! /v1/vm/exec`, `GET` and `PUT /v1/vm/file` — run on a thread of their own
//! (the guest thread), since a command in the guest may run for a day and
//! the agent answers one client at a time. The API thread parses each
//! request's line ([`GuestCall::parse`]) and hands the connection over; the
//! guest thread reads the body within [`BODY_DEADLINE`], talks to the
//! guest's agent through the VM's vsock socket (`crate::agent`, as the CLI
//! did) and answers. At most [`QUEUE`] requests wait; more are refused
//! with 429. The VM's own state is never touched here.
//!
//! The guest is hostile: every answer of its agent is bounded and checked
//! there; a failing agent fails that one request (502), a silent one is a
//! 503 that names the package to install, a command that outlives its
//! timeout a 504.

use std::io::Read;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::mpsc::{sync_channel, SyncSender, TrySendError};
use std::time::{Duration, Instant};

use base64::Engine;
use serde::{Deserialize, Serialize};

use super::response::Responder;
use super::{Action, ApiError, Refusal};
use crate::agent::{Agent, AgentError, DEFAULT_PORT};

/// The most bytes one file request moves (`GET` answers, `PUT` bodies); a
/// copy of a larger file takes several, each at the next offset.
pub const FILE_PIECE: usize = 4 << 20;
/// The largest `PUT /v1/vm/exec` body.
pub const MAX_EXEC_BODY: u64 = 256 << 10;
/// How long a client has to send a body, once its head was read.
pub const BODY_DEADLINE: Duration = Duration::from_secs(10);
/// Requests that may wait for the guest thread.
pub const QUEUE: usize = 4;
/// How long `GET /v1/vm/agent` gives the agent to answer.
pub const PROBE_WAIT: Duration = Duration::from_secs(2);
/// A command's timeout when the body gives none, and the longest one.
pub const DEFAULT_EXEC_TIMEOUT_S: u64 = 60;
const MAX_EXEC_TIMEOUT_S: u64 = 86_400;

/// The body of `PUT /v1/vm/exec`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecRequest {
    /// The program, as the guest finds it (an absolute path, or a name
    /// on the agent's PATH).
    pub path: String,
    /// Its arguments.
    #[serde(default)]
    pub args: Vec<String>,
    /// How long it may run, seconds (1 to 86400; 60 when not given).
    #[serde(default = "default_timeout")]
    pub timeout_s: u64,
}

fn default_timeout() -> u64 {
    DEFAULT_EXEC_TIMEOUT_S
}

impl ExecRequest {
    /// The body `bytes`, checked, or a 400.
    pub fn from_body(bytes: &[u8]) -> Result<Self, Refusal> {
        let bad = |why: String| Refusal::new(400, why);
        let req: Self = serde_json::from_slice(bytes).map_err(|e| {
            bad(format!(
                "the body is not an exec request ({{\"path\", \"args\", \"timeout_s\"}}): {e}"
            ))
        })?;
        if req.path.is_empty()
            || req.path.contains('\0')
            || req.args.iter().any(|a| a.contains('\0'))
        {
            return Err(bad(
                "the program and its arguments must be non-empty text without NUL bytes".into(),
            ));
        }
        if !(1..=MAX_EXEC_TIMEOUT_S).contains(&req.timeout_s) {
            return Err(bad(format!(
                "timeout_s={} is out of range: give 1 to {MAX_EXEC_TIMEOUT_S} seconds",
                req.timeout_s
            )));
        }
        Ok(req)
    }
}

/// The answer to `PUT /v1/vm/exec`: what the command did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecReply {
    /// Its exit code, or 128 + the signal that ended it.
    pub exit_code: i32,
    /// Its standard output, base64.
    pub stdout: String,
    /// Its standard error, base64.
    pub stderr: String,
    /// Whether the agent kept only the start of its output.
    pub truncated: bool,
}

/// The answer to `GET /v1/vm/agent`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentReply {
    /// Whether a guest agent answered on `port` within two seconds.
    pub answers: bool,
    /// The vsock port asked.
    pub port: u32,
}

/// The answer to `GET /v1/vm/file`: one piece of the guest's file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FilePiece {
    /// Where the piece starts in the file.
    pub offset: u64,
    /// Its bytes, base64 (at most [`FILE_PIECE`] of them).
    pub data: String,
    /// Whether it reaches the end of the file.
    pub eof: bool,
}

/// The answer to `PUT /v1/vm/file`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileWritten {
    /// Bytes written by this request.
    pub bytes: u64,
    /// The file's size now: the next piece's offset.
    pub size: u64,
}

/// What a guest-agent request asks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GuestAsk {
    /// `GET /v1/vm/agent`.
    Probe,
    /// `PUT /v1/vm/exec`, its body to come.
    Exec,
    /// `GET /v1/vm/file?path=P[&offset=N]`.
    Read {
        /// The guest's file.
        path: String,
        /// Where to start.
        offset: u64,
    },
    /// `PUT /v1/vm/file?path=P[&offset=N]`, its body the bytes.
    Write {
        /// The guest's file.
        path: String,
        /// Where the bytes go: 0 creates or truncates the file, past 0
        /// continues it and must equal its size.
        offset: u64,
    },
}

/// A guest-agent request's line and head, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestCall {
    /// What it asks.
    pub ask: GuestAsk,
    /// The agent's vsock port (`port=`, 1234 when not given).
    pub port: u32,
    /// The body's length (its Content-Length).
    pub body: u64,
}

impl GuestCall {
    /// The guest-agent request `action` with its query and the head's
    /// Content-Length, or a 400, 411 or 413.
    pub fn parse(
        action: Action,
        query: &[(String, String)],
        content_length: Option<u64>,
    ) -> Result<Self, Refusal> {
        let get = |k: &str| query.iter().find(|(q, _)| q == k).map(|(_, v)| v.as_str());
        let bad = |why: String| Refusal::new(400, why);
        let port = match get("port") {
            None => DEFAULT_PORT,
            Some(p) => p
                .parse()
                .map_err(|_| bad(format!("port={p} is not a vsock port (0 to 4294967295)")))?,
        };
        let path = || -> Result<String, Refusal> {
            match get("path") {
                Some(p) if p.starts_with('/') && !p.contains('\0') => Ok(p.to_owned()),
                Some(p) => Err(bad(format!(
                    "path={p:?} is not an absolute path in the guest"
                ))),
                None => Err(bad("no guest path given (path=/absolute/path)".into())),
            }
        };
        let offset = match get("offset") {
            None => 0,
            Some(o) => o
                .parse()
                .map_err(|_| bad(format!("offset={o} is not a number of bytes")))?,
        };
        let (ask, max_body) = match action {
            Action::Agent => (GuestAsk::Probe, 0),
            Action::Exec => (GuestAsk::Exec, MAX_EXEC_BODY),
            Action::FileRead => (
                GuestAsk::Read {
                    path: path()?,
                    offset,
                },
                0,
            ),
            Action::FileWrite => (
                GuestAsk::Write {
                    path: path()?,
                    offset,
                },
                FILE_PIECE as u64,
            ),
            _ => return Err(bad(format!("{action:?} is not a guest-agent request"))),
        };
        let body = match (content_length, max_body) {
            (None, 0) => 0,
            (None, _) => return Err(Refusal::new(411, "this request needs its body's Content-Length".into())),
            (Some(n), max) if n > max => {
                return Err(Refusal::new(
                    413,
                    format!("the body is {n} bytes; this request takes at most {max} (a larger file goes in pieces, each at the next offset)"),
                ))
            }
            (Some(n), _) => n,
        };
        Ok(Self { ask, port, body })
    }
}

/// A request handed to the guest thread: what it asks, the body bytes
/// already read with the head, and where the answer goes.
pub struct GuestJob {
    /// The checked request.
    pub call: GuestCall,
    /// Bytes after the head that the API thread read.
    pub early: Vec<u8>,
    /// The connection: the rest of the body, then the answer.
    pub stream: UnixStream,
}

/// The API thread's handle on the guest thread.
pub struct GuestThread {
    jobs: SyncSender<GuestJob>,
}

impl GuestThread {
    /// Starts the thread, which reaches the agent through the VM's vsock
    /// socket `socket` and is confined as `seccomp` says before its first
    /// request.
    pub fn start(socket: PathBuf, seccomp: crate::seccomp::Mode) -> std::io::Result<Self> {
        let (jobs, inbox) = sync_channel::<GuestJob>(QUEUE);
        std::thread::Builder::new()
            .name("guest-agent".into())
            .spawn(move || {
                crate::jail::confine(crate::jail::Role::Guest);
                crate::seccomp::confine(crate::seccomp::Role::Agent, seccomp);
                for job in inbox {
                    serve(&socket, job);
                }
            })?;
        Ok(Self { jobs })
    }

    /// Queues `job`, or answers it 429 (or 503 if the thread is gone).
    pub fn offer(&self, job: GuestJob) {
        match self.jobs.try_send(job) {
            Ok(()) => {}
            Err(TrySendError::Full(job)) => Responder::new(job.stream).send(
                429,
                &ApiError {
                    error: format!("the guest agent has {QUEUE} requests waiting: try again when one is answered"),
                },
            ),
            Err(TrySendError::Disconnected(job)) => Responder::new(job.stream).send(
                503,
                &ApiError { error: "the VMM's guest-agent thread has stopped".into() },
            ),
        }
    }
}

/// Reads the rest of a body of `len` bytes within [`BODY_DEADLINE`].
fn read_body(job: &mut GuestJob, len: u64) -> Result<Vec<u8>, Refusal> {
    let bad = |why: String| Refusal::new(400, why);
    let len = usize::try_from(len).map_err(|_| bad("the body is too large".into()))?;
    let mut body = std::mem::take(&mut job.early);
    if body.len() > len {
        return Err(bad(format!(
            "{} bytes came after a body of {len}",
            body.len() - len
        )));
    }
    let deadline = Instant::now() + BODY_DEADLINE;
    let mut chunk = vec![0u8; 64 << 10];
    while body.len() < len {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || job.stream.set_read_timeout(Some(left)).is_err() {
            return Err(bad(format!(
                "the body did not arrive within {BODY_DEADLINE:?}"
            )));
        }
        let want = chunk.len().min(len - body.len());
        match job.stream.read(&mut chunk[..want]) {
            Ok(0) => {
                return Err(bad(format!(
                    "the body ended after {} of {len} bytes",
                    body.len()
                )))
            }
            Ok(n) => body.extend_from_slice(&chunk[..n]),
            Err(_) => {
                return Err(bad(format!(
                    "the body did not arrive within {BODY_DEADLINE:?}"
                )))
            }
        }
    }
    Ok(body)
}

/// The status and message of an agent failure.
fn failure(e: &AgentError) -> Refusal {
    let status = match e {
        AgentError::Socket { .. } | AgentError::NoAgent(_) => 503,
        AgentError::Refused { .. } => 422,
        AgentError::Misplaced { .. } => 409,
        AgentError::Timeout(..) => 504,
        AgentError::Io(_) | AgentError::Protocol(_) => 502,
    };
    Refusal::new(status, crate::persist::capture::chain_text(e))
}

/// One request, answered.
fn serve(socket: &std::path::Path, mut job: GuestJob) {
    let answered = answer(socket, &mut job);
    let reply = Responder::new(job.stream);
    match answered {
        Ok((status, body)) => reply.send(status, &body),
        Err(r) => reply.send(r.status, &ApiError { error: r.error }),
    }
}

fn answer(
    socket: &std::path::Path,
    job: &mut GuestJob,
) -> Result<(u16, serde_json::Value), Refusal> {
    let b64 = base64::engine::general_purpose::STANDARD;
    let body = read_body(job, job.call.body)?;
    let port = job.call.port;
    if job.call.ask == GuestAsk::Probe {
        let answers = Agent::connect(socket, port, PROBE_WAIT).is_ok();
        return Ok((200, value(&AgentReply { answers, port })));
    }
    let exec = match job.call.ask {
        GuestAsk::Exec => Some(ExecRequest::from_body(&body)?),
        _ => None,
    };
    let mut agent =
        Agent::connect(socket, port, crate::agent::CONNECT_WAIT).map_err(|e| failure(&e))?;
    let reply = match (&job.call.ask, exec) {
        (GuestAsk::Exec, Some(x)) => {
            let done = agent
                .exec(&x.path, &x.args, Duration::from_secs(x.timeout_s))
                .map_err(|e| failure(&e))?;
            value(&ExecReply {
                exit_code: done.code,
                stdout: b64.encode(&done.stdout),
                stderr: b64.encode(&done.stderr),
                truncated: done.truncated,
            })
        }
        (GuestAsk::Read { path, offset }, _) => {
            let (data, eof) = agent
                .read_at(path, *offset, FILE_PIECE)
                .map_err(|e| failure(&e))?;
            value(&FilePiece {
                offset: *offset,
                data: b64.encode(&data),
                eof,
            })
        }
        (GuestAsk::Write { path, offset }, _) => {
            agent
                .write_at(path, *offset, &body)
                .map_err(|e| failure(&e))?;
            let bytes = body.len() as u64;
            value(&FileWritten {
                bytes,
                size: offset + bytes,
            })
        }
        _ => {
            return Err(Refusal::new(
                400,
                "a request the guest thread does not take".into(),
            ))
        }
    };
    Ok((200, reply))
}

/// A reply as a JSON value.
fn value(reply: impl Serialize) -> serde_json::Value {
    serde_json::to_value(reply).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::testing::rig;
    use crate::api::{call, call_body, route, ApiServer, Queue};
    use std::os::unix::net::UnixListener;

    const T: Duration = Duration::from_secs(30);

    fn call_of(action: Action, query: &str, len: Option<u64>) -> Result<GuestCall, Refusal> {
        GuestCall::parse(
            action,
            &super::super::parse_query(&format!("/x?{query}")),
            len,
        )
    }

    #[test]
    fn guest_requests_are_checked_before_they_are_queued() {
        assert_eq!(route("GET", "/v1/vm/agent"), Ok(Action::Agent));
        assert_eq!(route("PUT", "/v1/vm/exec"), Ok(Action::Exec));
        assert_eq!(route("GET", "/v1/vm/file?path=/a"), Ok(Action::FileRead));
        assert_eq!(route("PUT", "/v1/vm/file?path=/a"), Ok(Action::FileWrite));
        assert_eq!(route("GET", "/v1/vm/exec").unwrap_err().status, 405);
        assert_eq!(
            route("DELETE", "/v1/vm/file").unwrap_err().allow,
            Some("GET, PUT")
        );
        let probe = call_of(Action::Agent, "port=77", None).unwrap();
        assert_eq!(
            (probe.ask, probe.port, probe.body),
            (GuestAsk::Probe, 77, 0)
        );
        let read = call_of(Action::FileRead, "path=/etc/a%20b&offset=9", None).unwrap();
        assert_eq!(
            (read.ask, read.port),
            (
                GuestAsk::Read {
                    path: "/etc/a b".into(),
                    offset: 9
                },
                DEFAULT_PORT
            )
        );
        let status = |a, q, l| call_of(a, q, l).unwrap_err().status;
        assert_eq!(status(Action::FileRead, "path=etc", None), 400);
        assert_eq!(status(Action::FileRead, "offset=1", None), 400);
        assert_eq!(status(Action::FileRead, "path=/a&offset=-1", None), 400);
        assert_eq!(status(Action::Agent, "port=99999999999", None), 400);
        assert_eq!(status(Action::Exec, "", None), 411);
        assert_eq!(status(Action::Exec, "", Some(MAX_EXEC_BODY + 1)), 413);
        assert_eq!(
            status(Action::FileWrite, "path=/a", Some(FILE_PIECE as u64 + 1)),
            413
        );
        assert_eq!(status(Action::Pause, "", None), 400);
        assert!(call_of(Action::FileWrite, "path=/a", Some(0)).is_ok());
    }

    #[test]
    fn exec_bodies_are_checked() {
        let ok = ExecRequest::from_body(br#"{"path": "/bin/true"}"#).unwrap();
        assert_eq!((ok.args.len(), ok.timeout_s), (0, DEFAULT_EXEC_TIMEOUT_S));
        for bad in [
            &b"not json"[..],
            br#"{"path": ""}"#,
            br#"{"path": "/bin/x", "timeout_s": 0}"#,
            br#"{"path": "/bin/x", "timeout_s": 86401}"#,
            br#"{"path": "/bin/x", "args": ["a\u0000b"]}"#,
            br#"{"path": "/bin/x", "env": []}"#,
            br#"{"args": []}"#,
        ] {
            let e = ExecRequest::from_body(bad).unwrap_err();
            assert_eq!(e.status, 400, "{}", String::from_utf8_lossy(bad));
        }
    }

    /// An API server whose guest thread reaches the agent through `device`,
    /// both threads under their seccomp filters (a call outside one ends
    /// this test process).
    fn server(dir: &std::path::Path, device: &std::path::Path) -> (PathBuf, ApiServer) {
        let sock = dir.join("control.sock");
        let queue: Queue = Default::default();
        let on = crate::seccomp::Mode::On;
        let guest = GuestThread::start(device.to_owned(), on).unwrap();
        let api =
            ApiServer::start(UnixListener::bind(&sock).unwrap(), queue, Some(guest), on).unwrap();
        (sock, api)
    }

    fn b64(s: &str) -> Vec<u8> {
        base64::engine::general_purpose::STANDARD.decode(s).unwrap()
    }

    #[test]
    fn the_api_runs_commands_and_copies_files_through_the_real_agent() {
        let Some(r) = rig("api") else { return };
        let (sock, _api) = server(&r.dir, &r.device);
        let (status, v) = call(&sock, "GET", "/v1/vm/agent", T).unwrap();
        assert_eq!((status, v["answers"].as_bool()), (200, Some(true)), "{v}");
        let (_, v) = call(&sock, "GET", "/v1/vm/agent?port=999", T).unwrap();
        assert_eq!(v["answers"], false, "{v}");

        let body = br#"{"path": "/bin/sh", "args": ["-c", "echo out; echo err >&2; exit 3"]}"#;
        let (status, v) = call_body(&sock, "PUT", "/v1/vm/exec", &[], body, T).unwrap();
        assert_eq!(status, 200, "{v}");
        let done: ExecReply = serde_json::from_value(v).unwrap();
        assert_eq!(
            (done.exit_code, b64(&done.stdout), b64(&done.stderr)),
            (3, b"out\n".to_vec(), b"err\n".to_vec())
        );
        let body = br#"{"path": "/bin/sleep", "args": ["30"], "timeout_s": 1}"#;
        let (status, v) = call_body(&sock, "PUT", "/v1/vm/exec", &[], body, T).unwrap();
        assert_eq!(status, 504, "{v}");
        let body = br#"{"path": "/no/such/program"}"#;
        assert_eq!(
            call_body(&sock, "PUT", "/v1/vm/exec", &[], body, T)
                .unwrap()
                .0,
            422
        );
        let (status, v) = call_body(
            &sock,
            "PUT",
            "/v1/vm/exec?port=999",
            &[],
            br#"{"path": "/bin/true"}"#,
            T,
        )
        .unwrap();
        assert_eq!(status, 503, "{v}");
        assert!(
            v["error"].as_str().unwrap().contains("qemu-guest-agent"),
            "{v}"
        );

        // A file of two pieces in, a misplaced piece refused, all of it out.
        let data: Vec<u8> = (0..(FILE_PIECE + 4321))
            .map(|i| (i * 13 % 253) as u8)
            .collect();
        let inside = crate::api::percent_encode(&r.dir.join("copied in").display().to_string());
        let put = |offset: usize, bytes: &[u8]| {
            call_body(
                &sock,
                "PUT",
                &format!("/v1/vm/file?path={inside}&offset={offset}"),
                &[],
                bytes,
                T,
            )
            .unwrap()
        };
        let (status, v) = put(0, &data[..FILE_PIECE]);
        assert_eq!(
            (status, v["size"].as_u64()),
            (200, Some(FILE_PIECE as u64)),
            "{v}"
        );
        assert_eq!(put(FILE_PIECE + 1, b"x").0, 409);
        assert_eq!(put(FILE_PIECE, &data[FILE_PIECE..]).0, 200);
        let mut back = Vec::new();
        loop {
            let (status, v) = call(
                &sock,
                "GET",
                &format!("/v1/vm/file?path={inside}&offset={}", back.len()),
                T,
            )
            .unwrap();
            assert_eq!(status, 200, "{v}");
            let piece: FilePiece = serde_json::from_value(v).unwrap();
            back.extend(b64(&piece.data));
            if piece.eof {
                break;
            }
        }
        assert!(back == data, "the copy differs");
        assert_eq!(
            call(&sock, "GET", "/v1/vm/file?path=/no/such/file", T)
                .unwrap()
                .0,
            422
        );
        // A body that never comes fails that request only.
        let mut s = UnixStream::connect(&sock).unwrap();
        std::io::Write::write_all(
            &mut s,
            format!("PUT /v1/vm/file?path={inside} HTTP/1.1\r\nContent-Length: 10\r\n\r\nabc")
                .as_bytes(),
        )
        .unwrap();
        s.shutdown(std::net::Shutdown::Write).unwrap();
        let mut answer = String::new();
        s.read_to_string(&mut answer).unwrap();
        assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
        assert_eq!(call(&sock, "GET", "/v1/vm/agent", T).unwrap().0, 200);
    }

    #[test]
    fn a_busy_agent_queues_a_few_requests_and_refuses_more() {
        let Some(r) = rig("busy") else { return };
        let (sock, _api) = server(&r.dir, &r.device);
        // A command that runs until this test lets it go: the guest thread
        // is busy from the moment it starts.
        let fifo = r.dir.join("release");
        let started = r.dir.join("started");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
        let script = format!(
            "touch '{}'; read x < '{}'",
            started.display(),
            fifo.display()
        );
        let body = serde_json::to_vec(&ExecRequest {
            path: "/bin/sh".into(),
            args: vec!["-c".into(), script],
            timeout_s: 60,
        })
        .unwrap();
        let spawn = |body: Vec<u8>| {
            let sock = sock.clone();
            std::thread::spawn(move || {
                call_body(&sock, "PUT", "/v1/vm/exec", &[], &body, T)
                    .unwrap()
                    .0
            })
        };
        let first = spawn(body);
        let start = Instant::now();
        while !started.exists() {
            assert!(start.elapsed() < T, "the command never started");
            std::thread::sleep(Duration::from_millis(10));
        }
        // QUEUE requests, sent one after the other without waiting for
        // their answers: the API thread takes connections in order, so they
        // fill the queue before the next one is read, which is refused.
        let waiting: Vec<UnixStream> = (0..QUEUE)
            .map(|_| {
                let mut s = UnixStream::connect(&sock).unwrap();
                let req = b"PUT /v1/vm/exec HTTP/1.1\r\nContent-Length: 21\r\n\r\n{\"path\": \"/bin/true\"}";
                std::io::Write::write_all(&mut s, req).unwrap();
                s
            })
            .collect();
        let (status, v) = call_body(
            &sock,
            "PUT",
            "/v1/vm/exec",
            &[],
            br#"{"path": "/bin/true"}"#,
            T,
        )
        .unwrap();
        assert_eq!(status, 429, "{v}");
        std::fs::write(&fifo, b"go\n").unwrap();
        assert_eq!(first.join().unwrap(), 200);
        for mut w in waiting {
            let mut answer = String::new();
            w.read_to_string(&mut answer).unwrap();
            assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        }
    }
}
