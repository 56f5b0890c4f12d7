//! Talking to the guest's own agent, the stock QEMU guest agent (Debian's
//! `qemu-guest-agent`, run in the guest as `qemu-ga -m vsock-listen -p
//! CID:PORT`), over the VM's vsock device: `vm exec` (the reference's
//! Invoke-Command -VMName) and `vm cp` (Copy-VMFile) speak its protocol,
//! one JSON command per line and one JSON answer per line, not an agent of
//! nestvm's own.
//!
//! Everything the agent says is input: each answer line is bounded
//! ([`MAX_LINE`]), must be JSON, and an `error` answer is the agent's
//! refusal of that one command. A leaf of this crate: the control API's
//! guest thread (`api::guest`) and the CLI's `status` use it.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use base64::Engine;
use serde_json::{json, Value};

/// The vsock port `vm exec` and `vm cp` expect the agent on by default.
pub const DEFAULT_PORT: u32 = 1234;
/// The longest answer line read (a file chunk or a command's captured
/// output, base64-encoded).
const MAX_LINE: u64 = 64 << 20;
/// How long `vm exec` and `vm cp` wait for the agent to answer at all.
pub const CONNECT_WAIT: Duration = Duration::from_secs(10);
/// How long the agent has to answer a command that does not run one.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);
/// Bytes of a file moved per guest-file-read/-write.
const CHUNK: usize = 1 << 20;

/// Errors of the guest agent.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The device's socket.
    #[error("cannot reach the VM's vsock device at {path}")]
    Socket {
        /// The socket.
        path: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Nothing answered on the port.
    #[error("no guest agent answers on vsock port {0} (is the guest's vmw_vsock_virtio_transport loaded?): install Debian's qemu-guest-agent in the guest and run 'qemu-ga -m vsock-listen -p CID:{0}' there, CID being the VM's vsock cid (or give --port)")]
    NoAgent(u32),
    /// The connection failed midway.
    #[error("the guest agent's connection failed")]
    Io(#[source] std::io::Error),
    /// An answer that is not the protocol's.
    #[error("the guest agent's answer is not one this nestvm reads: {0}")]
    Protocol(String),
    /// The agent refused a command.
    #[error("the guest agent refused {command}: {desc}")]
    Refused {
        /// The command.
        command: String,
        /// Its reason.
        desc: String,
    },
    /// A copy's next piece does not continue the guest's file.
    #[error("the guest's file is {size} bytes, not {offset}: continue at offset {size}, or start again at 0")]
    Misplaced {
        /// The file's size.
        size: u64,
        /// Where the piece was to go.
        offset: u64,
    },
    /// The command did not end in time.
    #[error("the command still runs in the guest after {0:?} (pid {1} there): give a longer --timeout, or end it in the guest")]
    Timeout(Duration, i64),
}

/// What a command run in the guest did.
#[derive(Debug, PartialEq, Eq)]
pub struct Exited {
    /// Its exit code, or 128 + the signal that ended it.
    pub code: i32,
    /// What it wrote to its standard output.
    pub stdout: Vec<u8>,
    /// What it wrote to its standard error.
    pub stderr: Vec<u8>,
    /// The agent kept only the start of its output.
    pub truncated: bool,
}

/// A connection to the guest agent.
pub struct Agent {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Agent {
    /// Connects through the vsock device's socket to `port` in the guest
    /// (the device's `CONNECT` handshake), then synchronises with the agent,
    /// all within `wait` (a guest without a vsock driver never answers).
    pub fn connect(socket: &Path, port: u32, wait: Duration) -> Result<Self, AgentError> {
        let socket_err = |source| AgentError::Socket {
            path: socket.display().to_string(),
            source,
        };
        let mut s = UnixStream::connect(socket).map_err(socket_err)?;
        s.set_read_timeout(Some(wait)).map_err(socket_err)?;
        s.write_all(format!("CONNECT {port}\n").as_bytes())
            .map_err(socket_err)?;
        let mut reader = BufReader::new(s.try_clone().map_err(socket_err)?);
        // The device closes the connection if nothing listens on the port,
        // and answers OK once something accepted it.
        let mut ok = String::new();
        match (&mut reader).take(64).read_line(&mut ok) {
            Ok(_) if ok.starts_with("OK ") => {}
            _ => return Err(AgentError::NoAgent(port)),
        }
        let mut agent = Self { reader, writer: s };
        agent.sync().map_err(|e| match e {
            AgentError::Io(_) => AgentError::NoAgent(port),
            e => e,
        })?;
        agent
            .writer
            .set_read_timeout(Some(ANSWER_TIMEOUT))
            .map_err(AgentError::Io)?;
        Ok(agent)
    }

    /// `guest-sync` with a fresh ID: answers left over from an earlier
    /// client are skipped until the agent echoes it.
    fn sync(&mut self) -> Result<(), AgentError> {
        // Any number a JSON reader keeps exactly (below 2^53).
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        let id = (nanos ^ u64::from(std::process::id())) & ((1 << 53) - 1);
        self.send("guest-sync", json!({ "id": id }))?;
        for _ in 0..64 {
            if self.answer("guest-sync")? == json!(id) {
                return Ok(());
            }
        }
        Err(AgentError::Protocol(
            "guest-sync never echoed its ID".into(),
        ))
    }

    fn send(&mut self, command: &str, arguments: Value) -> Result<(), AgentError> {
        let line = json!({ "execute": command, "arguments": arguments }).to_string();
        self.writer
            .write_all(format!("{line}\n").as_bytes())
            .map_err(AgentError::Io)
    }

    /// The next answer's `return` value.
    fn answer(&mut self, command: &str) -> Result<Value, AgentError> {
        let mut line = Vec::new();
        (&mut self.reader)
            .take(MAX_LINE)
            .read_until(b'\n', &mut line)
            .map_err(AgentError::Io)?;
        if line.last() != Some(&b'\n') {
            return Err(AgentError::Protocol(format!(
                "an answer to {command} ended early or was longer than {MAX_LINE} bytes"
            )));
        }
        let v: Value = serde_json::from_slice(&line)
            .map_err(|e| AgentError::Protocol(format!("{command}: {e}")))?;
        if let Some(e) = v.get("error") {
            let desc = e["desc"].as_str().unwrap_or("no reason given").to_owned();
            return Err(AgentError::Refused {
                command: command.to_owned(),
                desc,
            });
        }
        v.get("return")
            .cloned()
            .ok_or_else(|| AgentError::Protocol(format!("{command}: no return value")))
    }

    /// Runs `command` and returns its `return` value.
    pub fn call(&mut self, command: &str, arguments: Value) -> Result<Value, AgentError> {
        self.send(command, arguments)?;
        self.answer(command)
    }

    /// Runs `path` with `args` in the guest and waits up to `timeout` for it
    /// to end, with its output.
    pub fn exec(
        &mut self,
        path: &str,
        args: &[String],
        timeout: Duration,
    ) -> Result<Exited, AgentError> {
        let started = self.call(
            "guest-exec",
            json!({ "path": path, "arg": args, "capture-output": true }),
        )?;
        let pid = started["pid"]
            .as_i64()
            .ok_or_else(|| AgentError::Protocol("guest-exec: no pid".into()))?;
        let deadline = Instant::now() + timeout;
        // The agent only answers when asked: ask often at first, then
        // less, for a long command.
        let mut pause = Duration::from_millis(5);
        loop {
            let status = self.call("guest-exec-status", json!({ "pid": pid }))?;
            if status["exited"].as_bool() == Some(true) {
                return exited(&status);
            }
            if Instant::now() >= deadline {
                return Err(AgentError::Timeout(timeout, pid));
            }
            std::thread::sleep(pause.min(deadline.saturating_duration_since(Instant::now())));
            pause = (pause * 2).min(Duration::from_millis(200));
        }
    }

    /// Up to `max` bytes of the guest's file `path` from byte `offset`,
    /// and whether they reach its end.
    pub fn read_at(
        &mut self,
        path: &str,
        offset: u64,
        max: usize,
    ) -> Result<(Vec<u8>, bool), AgentError> {
        let handle = self.call("guest-file-open", json!({ "path": path, "mode": "r" }))?;
        let result = (|| {
            if offset > 0 {
                self.seek(&handle, offset, "set")?;
            }
            let mut data = Vec::new();
            while data.len() < max {
                let count = CHUNK.min(max - data.len());
                let chunk = self.call(
                    "guest-file-read",
                    json!({ "handle": handle, "count": count }),
                )?;
                let piece = decode(&chunk["buf-b64"])?;
                if piece.len() > count {
                    return Err(AgentError::Protocol(format!(
                        "guest-file-read gave {} bytes for {count}",
                        piece.len()
                    )));
                }
                data.extend_from_slice(&piece);
                if chunk["eof"].as_bool() != Some(false) || piece.is_empty() {
                    return Ok((data, true));
                }
            }
            Ok((data, false))
        })();
        let closed = self.call("guest-file-close", json!({ "handle": handle }));
        let read = result?;
        closed.map(|_| read)
    }

    /// Writes `data` into the guest's file `path` at `offset`: at 0 the
    /// file is created or truncated; past 0 the file must be exactly
    /// `offset` bytes long (the next piece of a copy), else
    /// [`AgentError::Misplaced`] and nothing is written.
    pub fn write_at(&mut self, path: &str, offset: u64, data: &[u8]) -> Result<(), AgentError> {
        let mode = if offset == 0 { "w" } else { "r+" };
        let handle = self.call("guest-file-open", json!({ "path": path, "mode": mode }))?;
        let b64 = base64::engine::general_purpose::STANDARD;
        let result = (|| {
            if offset > 0 {
                let size = self.seek(&handle, 0, "end")?;
                if size != offset {
                    return Err(AgentError::Misplaced { size, offset });
                }
            }
            for piece in data.chunks(CHUNK) {
                let args = json!({ "handle": handle, "buf-b64": b64.encode(piece) });
                let wrote = self.call("guest-file-write", args)?;
                if wrote["count"].as_u64() != Some(piece.len() as u64) {
                    return Err(AgentError::Protocol(format!(
                        "guest-file-write took {} of {} bytes",
                        wrote["count"],
                        piece.len()
                    )));
                }
            }
            Ok(())
        })();
        let closed = self.call("guest-file-close", json!({ "handle": handle }));
        result?;
        closed.map(|_| ())
    }

    /// `guest-file-seek`: the position it reached.
    fn seek(&mut self, handle: &Value, offset: u64, whence: &str) -> Result<u64, AgentError> {
        let at = self.call(
            "guest-file-seek",
            json!({ "handle": handle, "offset": offset, "whence": whence }),
        )?;
        at["position"]
            .as_u64()
            .ok_or_else(|| AgentError::Protocol("guest-file-seek: no position".into()))
    }
}

fn decode(v: &Value) -> Result<Vec<u8>, AgentError> {
    let text = v.as_str().unwrap_or("");
    base64::engine::general_purpose::STANDARD
        .decode(text)
        .map_err(|e| AgentError::Protocol(format!("output that is not base64: {e}")))
}

/// A `guest-exec-status` of a command that ended.
fn exited(status: &Value) -> Result<Exited, AgentError> {
    let code = match (status["exitcode"].as_i64(), status["signal"].as_i64()) {
        (Some(c), _) => c,
        (None, Some(s)) => 128 + s,
        (None, None) => -1,
    };
    let code =
        i32::try_from(code).map_err(|_| AgentError::Protocol(format!("exit code {code}")))?;
    Ok(Exited {
        code,
        stdout: decode(&status["out-data"])?,
        stderr: decode(&status["err-data"])?,
        truncated: status["out-truncated"].as_bool() == Some(true)
            || status["err-truncated"].as_bool() == Some(true),
    })
}

#[cfg(test)]
pub(crate) mod testing {
    //! A real qemu-ga behind a stand-in for the vsock device, for this
    //! module's tests and the API's.
    use super::*;
    use std::os::unix::net::UnixListener;
    use std::path::PathBuf;
    use std::process::{Child, Command};

    const QEMU_GA: &str = "/usr/sbin/qemu-ga";

    /// A real qemu-ga on a Unix socket, behind a stand-in for the vsock
    /// device's host side (its `CONNECT`/`OK` handshake, then bytes both
    /// ways), so the client meets the agent exactly as through a guest.
    pub(crate) struct Rig {
        pub(crate) dir: PathBuf,
        pub(crate) device: PathBuf,
        agent: Child,
    }

    impl Drop for Rig {
        fn drop(&mut self) {
            let _ = self.agent.kill();
            let _ = self.agent.wait();
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    fn relay(device: UnixListener, agent_socket: PathBuf) {
        for conn in device.incoming().flatten() {
            let mut line = String::new();
            let mut r = BufReader::new(conn.try_clone().unwrap());
            if r.read_line(&mut line).is_err() || line != format!("CONNECT {DEFAULT_PORT}\n") {
                continue; // nothing listens on that port: closed
            }
            let Ok(to_agent) = UnixStream::connect(&agent_socket) else {
                continue;
            };
            let mut conn = conn;
            conn.write_all(b"OK 1073741824\n").unwrap();
            let (a, mut b) = (to_agent.try_clone().unwrap(), conn.try_clone().unwrap());
            std::thread::spawn(move || {
                std::io::copy(&mut r, &mut a.try_clone().unwrap())
                    .map(|_| a.shutdown(std::net::Shutdown::Write))
            });
            let mut from_agent = to_agent;
            std::thread::spawn(move || std::io::copy(&mut from_agent, &mut b));
        }
    }

    pub(crate) fn rig(tag: &str) -> Option<Rig> {
        if !Path::new(QEMU_GA).exists() {
            eprintln!("SKIPPED: no {QEMU_GA} (scripts/setup.sh installs qemu-guest-agent)");
            return None;
        }
        let dir = std::env::temp_dir().join(format!("nestvm-qga-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let agent_socket = dir.join("qga.sock");
        let agent = Command::new(QEMU_GA)
            .args(["-m", "unix-listen", "-p"])
            .arg(&agent_socket)
            .arg("-t")
            .arg(&dir)
            .arg("-f")
            .arg(dir.join("qga.pid"))
            .spawn()
            .unwrap();
        let device = dir.join("vsock.sock");
        let listener = UnixListener::bind(&device).unwrap();
        let rig = Rig { dir, device, agent };
        let start = Instant::now();
        while !agent_socket.exists() {
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "qemu-ga never listened"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        std::thread::spawn(move || relay(listener, agent_socket));
        Some(rig)
    }
}

#[cfg(test)]
mod tests {
    use super::testing::rig;
    use super::*;
    use std::os::unix::net::UnixListener;

    #[test]
    fn a_command_runs_in_the_guest_with_its_output_and_exit_code() {
        let Some(r) = rig("exec") else { return };
        let mut a = Agent::connect(&r.device, DEFAULT_PORT, Duration::from_secs(10)).unwrap();
        let sh = |s: &str| vec!["-c".to_owned(), s.to_owned()];
        let done = a
            .exec(
                "/bin/sh",
                &sh("echo out; echo err >&2; exit 3"),
                Duration::from_secs(30),
            )
            .unwrap();
        assert_eq!(
            done,
            Exited {
                code: 3,
                stdout: b"out\n".to_vec(),
                stderr: b"err\n".to_vec(),
                truncated: false
            }
        );
        let killed = a
            .exec("/bin/sh", &sh("kill -9 $$"), Duration::from_secs(30))
            .unwrap();
        assert_eq!(killed.code, 128 + 9);
        let e = a
            .exec("/bin/sleep", &["30".into()], Duration::from_millis(300))
            .unwrap_err();
        assert!(e.to_string().contains("still runs in the guest"), "{e}");
        let e = a
            .exec("/no/such/program", &[], Duration::from_secs(30))
            .unwrap_err();
        assert!(matches!(e, AgentError::Refused { .. }), "{e}");
    }

    #[test]
    fn files_go_in_and_come_back_out_whole_in_pieces() {
        let Some(r) = rig("files") else { return };
        let mut a = Agent::connect(&r.device, DEFAULT_PORT, Duration::from_secs(10)).unwrap();
        // Several chunks, every byte value, in two pieces.
        let data: Vec<u8> = (0..(3 * CHUNK + 17)).map(|i| (i * 7 % 251) as u8).collect();
        let inside = r.dir.join("in-the-guest").display().to_string();
        let half = data.len() / 2;
        a.write_at(&inside, 0, &data[..half]).unwrap();
        // A piece that would leave a hole, or overlap, is refused.
        for wrong in [half as u64 + 1, half as u64 - 1] {
            let e = a.write_at(&inside, wrong, b"x").unwrap_err();
            assert!(matches!(e, AgentError::Misplaced { .. }), "{e}");
        }
        a.write_at(&inside, half as u64, &data[half..]).unwrap();
        let (first, eof) = a.read_at(&inside, 0, 2 * CHUNK).unwrap();
        assert!(!eof && first.len() == 2 * CHUNK);
        let (rest, eof) = a.read_at(&inside, first.len() as u64, 4 * CHUNK).unwrap();
        assert!(eof);
        assert!([first, rest].concat() == data, "the copy differs");
        // Writing at 0 again truncates.
        a.write_at(&inside, 0, b"short").unwrap();
        assert_eq!(
            a.read_at(&inside, 0, 100).unwrap(),
            (b"short".to_vec(), true)
        );
        let e = a.read_at("/no/such/file", 0, 10).unwrap_err();
        assert!(e.to_string().contains("refused guest-file-open"), "{e}");
    }

    #[test]
    fn no_agent_and_a_hostile_one_are_said_clearly() {
        let Some(r) = rig("none") else { return };
        let e = Agent::connect(&r.device, 999, Duration::from_secs(10))
            .err()
            .unwrap();
        assert!(e.to_string().contains("qemu-guest-agent"), "{e}");
        // Not JSON, and an endless line: each a protocol error, no hang.
        let fake = r.dir.join("fake.sock");
        let l = UnixListener::bind(&fake).unwrap();
        std::thread::spawn(move || {
            for (i, c) in l.incoming().flatten().enumerate() {
                let mut c = c;
                let _ = c.write_all(b"OK 1\n");
                // Its guest-sync, read before the bad answer.
                let mut r = BufReader::new(c.try_clone().unwrap());
                let (mut connect, mut sync) = (String::new(), String::new());
                let _ = r
                    .read_line(&mut connect)
                    .and_then(|_| r.read_line(&mut sync));
                let _ = match i {
                    0 => c.write_all(b"<html>\n"),
                    _ => c.write_all(b"{\"return\": 1}"), // then EOF, no newline
                };
            }
        });
        for _ in 0..2 {
            let e = Agent::connect(&fake, DEFAULT_PORT, Duration::from_secs(10))
                .err()
                .unwrap();
            assert!(matches!(e, AgentError::Protocol(_)), "{e}");
        }
    }
}
