//! `vm exec` and `vm cp`: a command run in a running guest, a file copied
//! in or out, through the guest's own agent (the stock QEMU guest agent on
//! the VM's vsock device), with no network set up. Each goes through the
//! VM's control API (`PUT /v1/vm/exec`, `GET`/`PUT /v1/vm/file`), whose
//! guest thread talks to the agent (`nestvm_vmm::agent`).

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::anyhow;
use base64::Engine;
use nestvm_manager::{Store, VmName, VmState};
use nestvm_vmm::api::{AgentReply, ExecReply, ExecRequest, FilePiece, FileWritten, FILE_PIECE};

use crate::common::{runtime, store_err, usage, vm_name, Failure};
use crate::control::{self, Answer, API_TIMEOUT};
use crate::vmdir::VmDir;

/// Parses `vm exec --timeout`: a bare number is seconds (as for `vm stop
/// --timeout`), else a duration with its unit (`500ms`, `90s`); at most a
/// day.
pub fn parse_timeout(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    if let Ok(secs) = t.parse::<u64>() {
        return match secs {
            0 => Err(format!("'{s}' is no time at all: give seconds, e.g. 60")),
            1..=86_400 => Ok(Duration::from_secs(secs)),
            _ => Err(format!(
                "'{s}' seconds is more than a day: give at most 86400"
            )),
        };
    }
    crate::migrate::parse_duration(t).map_err(|_| {
        format!("'{s}' is not a timeout: give seconds (60) or a duration (500ms, 90s)")
    })
}

/// Whether a guest agent answers on the default port of VM `name`, whose
/// state is `state` (asked of its VMM: `GET /v1/vm/agent`); `None` unless
/// it runs.
pub fn agent_answers(store: &Store, name: &VmName, state: &str) -> Option<bool> {
    (state == "Running").then(|| {
        let socket = VmDir::of(store, name).control;
        matches!(
            control::request::<AgentReply>(&socket, "GET", "/v1/vm/agent", API_TIMEOUT, 200),
            Ok(Answer::Done(AgentReply { answers: true, .. }))
        )
    })
}

/// The control socket of running VM `name`, which has a vsock device.
fn running(store: &Store, name: &VmName) -> Result<std::path::PathBuf, Failure> {
    let config = store.load(name).map_err(store_err)?;
    if config.vsock.is_none() {
        return Err(usage(anyhow!(
            "VM '{name}' has no vsock device, which its guest agent needs: 'nestvm vm set {name} --vsock cid=3', then start it again"
        )));
    }
    if store.state(name) != VmState::Live {
        return Err(usage(anyhow!(
            "VM '{name}' is not running: 'nestvm vm start {name}' first"
        )));
    }
    Ok(VmDir::of(store, name).control)
}

/// One guest-agent call to VM `name`'s API: its reply, or the VMM's
/// reason as a runtime failure.
fn ask<T: serde::de::DeserializeOwned>(
    name: &VmName,
    socket: &Path,
    (method, path): (&str, &str),
    body: &[u8],
    timeout: Duration,
) -> Result<T, Failure> {
    match control::request_body(socket, (method, path), body, timeout, 200) {
        Ok(Answer::Done(v)) => Ok(v),
        Ok(Answer::Refused { error, .. }) => Err(runtime(anyhow!(error))),
        Err(e) => Err(runtime(anyhow!("VM '{name}': {e}"))),
    }
}

fn unbase64(name: &VmName, text: &str) -> Result<Vec<u8>, Failure> {
    base64::engine::general_purpose::STANDARD
        .decode(text)
        .map_err(|e| {
            runtime(anyhow!(
                "VM '{name}': its VMM sent output that is not base64: {e}"
            ))
        })
}

/// `vm exec NAME [--port P] [--timeout S] -- CMD ARGS...`: runs CMD in the
/// guest (`PUT /v1/vm/exec`); its output is this command's, its exit code
/// too.
pub fn exec(
    store: &Store,
    name: &VmName,
    port: u32,
    timeout: Duration,
    cmd: &[String],
) -> Result<u8, Failure> {
    let (path, args) = cmd.split_first().ok_or_else(|| {
        usage(anyhow!(
            "no command given: 'nestvm vm exec {name} -- CMD ARGS...'"
        ))
    })?;
    let socket = running(store, name)?;
    let body = serde_json::to_vec(&ExecRequest {
        path: path.clone(),
        args: args.to_vec(),
        timeout_s: timeout.as_secs().max(1),
    })
    .map_err(runtime)?;
    if body.len() as u64 > nestvm_vmm::api::MAX_EXEC_BODY {
        return Err(usage(anyhow!(
            "the command is {} bytes, more than the {} a guest command may be: copy a script in with 'vm cp' and run that",
            body.len(),
            nestvm_vmm::api::MAX_EXEC_BODY
        )));
    }
    // The VMM answers when the command ends, or when its timeout and the
    // agent's own wait have passed.
    let wait = timeout.max(Duration::from_secs(1)) + AGENT_SLACK;
    let done: ExecReply = ask(
        name,
        &socket,
        ("PUT", &format!("/v1/vm/exec?port={port}")),
        &body,
        wait,
    )?;
    let _ = std::io::stdout().write_all(&unbase64(name, &done.stdout)?);
    let _ = std::io::stderr().write_all(&unbase64(name, &done.stderr)?);
    if done.truncated {
        eprintln!("nestvm: the guest agent kept only the start of the command's output");
    }
    Ok(match done.exit_code {
        0..=255 => done.exit_code as u8,
        _ => 1,
    })
}

/// What a guest-agent call may take beyond its own work: the VMM's wait
/// for the agent to answer at all, and a queue of others before it.
const AGENT_SLACK: Duration = Duration::from_secs(60);

/// One side of `vm cp`: `NAME:PATH` in the guest, or a host path.
enum Side {
    Guest(VmName, String),
    Host(PathBuf),
}

fn side(s: &str) -> Result<Side, Failure> {
    match s.split_once(':') {
        Some((vm, path)) if !vm.is_empty() && !vm.contains('/') => {
            if !path.starts_with('/') {
                return Err(usage(anyhow!(
                    "'{s}': the guest's path must be absolute (NAME:/path/in/guest)"
                )));
            }
            Ok(Side::Guest(vm_name(vm)?, path.to_owned()))
        }
        _ => Ok(Side::Host(PathBuf::from(s))),
    }
}

/// `vm cp SRC DST`: one of them `NAME:PATH` in a running guest, copied in
/// pieces through its VMM (`GET`/`PUT /v1/vm/file`).
pub fn copy(store: &Store, from: &str, to: &str, port: u32, json: bool) -> Result<u8, Failure> {
    let bytes = match (side(from)?, side(to)?) {
        (Side::Guest(name, guest), Side::Host(host)) => {
            let socket = running(store, &name)?;
            copy_out(&name, &socket, port, &guest, &host)?
        }
        (Side::Host(host), Side::Guest(name, guest)) => {
            let socket = running(store, &name)?;
            let mut f = std::fs::File::open(&host)
                .map_err(|e| usage(anyhow!("cannot read {}: {e}", host.display())))?;
            copy_in(&name, &socket, port, &mut f, &guest)?
        }
        _ => {
            return Err(usage(anyhow!(
                "one side of 'vm cp' is NAME:/path in a running guest, the other a path here"
            )))
        }
    };
    if json {
        println!("{}", serde_json::json!({ "bytes": bytes }));
    } else {
        println!("copied {bytes} bytes");
    }
    Ok(0)
}

fn file_path(guest: &str, port: u32, offset: u64) -> String {
    format!(
        "/v1/vm/file?path={}&port={port}&offset={offset}",
        nestvm_vmm::api::percent_encode(guest)
    )
}

/// Host file `from` into the guest's `guest`, piece by piece.
fn copy_in(
    name: &VmName,
    socket: &Path,
    port: u32,
    from: &mut std::fs::File,
    guest: &str,
) -> Result<u64, Failure> {
    let mut buf = vec![0u8; FILE_PIECE];
    let mut offset = 0u64;
    loop {
        let mut n = 0;
        while n < buf.len() {
            match from.read(&mut buf[n..]) {
                Ok(0) => break,
                Ok(k) => n += k,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(runtime(anyhow!("cannot read the file to copy: {e}"))),
            }
        }
        // The first piece creates the file, even an empty one.
        if n == 0 && offset > 0 {
            return Ok(offset);
        }
        let path = file_path(guest, port, offset);
        let wrote: FileWritten = ask(name, socket, ("PUT", &path), &buf[..n], AGENT_SLACK)?;
        offset = wrote.size;
        if n < buf.len() {
            return Ok(offset);
        }
    }
}

/// The guest's `guest` into host file `host`, through a temporary file,
/// fsync and rename: a failed copy leaves what was there.
fn copy_out(
    name: &VmName,
    socket: &Path,
    port: u32,
    guest: &str,
    host: &Path,
) -> Result<u64, Failure> {
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = host.with_extension("nestvm-cp.tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(nix::libc::O_NOFOLLOW)
        .open(&tmp)
        .map_err(|e| usage(anyhow!("cannot write {}: {e}", tmp.display())))?;
    let copied = (|| {
        let mut offset = 0u64;
        loop {
            let piece: FilePiece = ask(
                name,
                socket,
                ("GET", &file_path(guest, port, offset)),
                &[],
                AGENT_SLACK,
            )?;
            if piece.offset != offset {
                return Err(runtime(anyhow!(
                    "VM '{name}': its VMM sent the piece at {} for {offset}",
                    piece.offset
                )));
            }
            let data = unbase64(name, &piece.data)?;
            f.write_all(&data).map_err(runtime)?;
            offset += data.len() as u64;
            if piece.eof || data.is_empty() {
                return Ok(offset);
            }
        }
    })()
    .and_then(|n| f.sync_all().map(|()| n).map_err(runtime))
    .and_then(|n| std::fs::rename(&tmp, host).map(|()| n).map_err(runtime));
    if copied.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    copied
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bare_timeout_is_seconds() {
        assert_eq!(parse_timeout("20"), Ok(Duration::from_secs(20)));
        assert_eq!(parse_timeout("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_timeout("90s"), Ok(Duration::from_secs(90)));
        for bad in ["0", "86401", "soon", "-1"] {
            assert!(parse_timeout(bad).is_err(), "{bad}");
        }
    }
}
