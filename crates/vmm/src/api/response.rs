//! An answer to a control-API request: the status line, the JSON body,
//! and `Connection: close` (one request per connection). A leaf: the server
//! and the guest thread both answer through it.

use std::io::Write;
use std::os::unix::net::UnixStream;

use serde::Serialize;

/// Where a request's answer goes (its connection).
pub struct Responder(UnixStream);

impl Responder {
    /// Answers on `stream`.
    pub(crate) fn new(stream: UnixStream) -> Self {
        Self(stream)
    }

    /// Answers with `status` and a JSON body.
    pub fn send(mut self, status: u16, body: &impl Serialize) {
        let body = serde_json::to_vec(body).unwrap_or_else(|_| b"{}".to_vec());
        let _ = write_response(&mut self.0, status, None, &body);
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        202 => "Accepted",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        409 => "Conflict",
        411 => "Length Required",
        413 => "Content Too Large",
        422 => "Unprocessable Content",
        429 => "Too Many Requests",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Error",
    }
}

/// Writes a response; `allow` names the method a 405 answer allows (RFC
/// 9110 requires the `Allow` header there).
pub(super) fn write_response(
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
