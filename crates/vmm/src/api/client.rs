//! The control API's client: one request per connection, the JSON answer
//! and its status back.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

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

/// The largest answer read: a file piece of [`super::FILE_PIECE`] bytes
/// or a command's output, base64 in JSON, with room to spare.
pub const MAX_ANSWER: u64 = 48 << 20;

/// Calls the API at `socket`; returns the status and the JSON body.
pub fn call(
    socket: &Path,
    method: &str,
    path: &str,
    timeout: Duration,
) -> Result<(u16, serde_json::Value), CallError> {
    call_with(socket, method, path, &[], timeout)
}

/// [`call`] with `headers` (name, value) in the request.
pub fn call_with(
    socket: &Path,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    timeout: Duration,
) -> Result<(u16, serde_json::Value), CallError> {
    call_body(socket, method, path, headers, &[], timeout)
}

/// [`call_with`] with a request body.
pub fn call_body(
    socket: &Path,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
    timeout: Duration,
) -> Result<(u16, serde_json::Value), CallError> {
    if let Some((name, _)) = headers
        .iter()
        .find(|(n, v)| n.contains([':', '\r', '\n']) || v.contains(['\r', '\n']))
    {
        return Err(CallError::Protocol(format!(
            "header {name:?} would break the request"
        )));
    }
    let unreachable = |e| CallError::Unreachable(socket.display().to_string(), e);
    let mut s = UnixStream::connect(socket).map_err(unreachable)?;
    s.set_read_timeout(Some(timeout)).map_err(unreachable)?;
    s.set_write_timeout(Some(timeout)).map_err(unreachable)?;
    let extra: String = headers
        .iter()
        .map(|(n, v)| format!("{n}: {v}\r\n"))
        .collect();
    let wrote = write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: nestvm\r\n{extra}Content-Length: {}\r\n\r\n",
        body.len()
    )
    .and_then(|()| s.write_all(body));
    // A VMM that refuses a request may answer before it read the body and
    // close: its answer still says why.
    let mut text = String::new();
    let read = (&mut s).take(MAX_ANSWER + 1).read_to_string(&mut text);
    match (wrote, read) {
        (_, Ok(_)) if !text.is_empty() => {}
        (Err(e), _) | (Ok(()), Err(e)) => return Err(unreachable(e)),
        (Ok(()), Ok(_)) => {}
    }
    if text.len() as u64 > MAX_ANSWER {
        return Err(CallError::Protocol(format!(
            "an answer longer than {MAX_ANSWER} bytes"
        )));
    }
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
