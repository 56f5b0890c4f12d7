//! `vm exec` and `vm cp`: a command run in a running guest, a file copied
//! in or out, through the guest's own agent (`agent.rs`: the QEMU guest
//! agent on the VM's vsock device), with no network set up.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::anyhow;
use nestvm_manager::{Store, VmName, VmState};

use crate::agent::Agent;
use crate::common::{runtime, store_err, usage, vm_name, Failure};

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

/// How long `vm show` and `status` give a guest agent to answer.
const AGENT_PROBE: Duration = Duration::from_secs(2);

/// Whether a guest agent answers on the default port of the vsock device
/// `vsock` of VM `name`, whose state is `state`; `None` unless it runs.
pub fn agent_answers(
    store: &Store,
    name: &VmName,
    vsock: &nestvm_vmm::config::vsock::VsockConfig,
    state: &str,
) -> Option<bool> {
    let socket = store.vm_dir(name).join(vsock.socket_path());
    (state == "Running")
        .then(|| Agent::connect(&socket, crate::agent::DEFAULT_PORT, AGENT_PROBE).is_ok())
}

/// The running VM `name`'s agent on `port`.
fn agent(store: &Store, name: &VmName, port: u32) -> Result<Agent, Failure> {
    let config = store.load(name).map_err(store_err)?;
    let Some(vsock) = &config.vsock else {
        return Err(usage(anyhow!(
            "VM '{name}' has no vsock device, which its guest agent needs: 'nestvm vm set {name} --vsock cid=3', then start it again"
        )));
    };
    if store.state(name) != VmState::Live {
        return Err(usage(anyhow!(
            "VM '{name}' is not running: 'nestvm vm start {name}' first"
        )));
    }
    let socket = store.vm_dir(name).join(vsock.socket_path());
    Agent::connect(&socket, port, crate::agent::CONNECT_WAIT)
        .map_err(|e| runtime(anyhow::Error::new(e)))
}

/// `vm exec NAME [--port P] [--timeout S] -- CMD ARGS...`: runs CMD in the
/// guest; its output is this command's, its exit code too.
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
    let mut agent = agent(store, name, port)?;
    let done = agent
        .exec(path, args, timeout)
        .map_err(|e| runtime(anyhow::Error::new(e)))?;
    let _ = std::io::stdout().write_all(&done.stdout);
    let _ = std::io::stderr().write_all(&done.stderr);
    if done.truncated {
        eprintln!("nestvm: the guest agent kept only the start of the command's output");
    }
    Ok(match done.code {
        0..=255 => done.code as u8,
        _ => 1,
    })
}

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

/// `vm cp SRC DST`: one of them `NAME:PATH` in a running guest.
pub fn copy(store: &Store, from: &str, to: &str, port: u32, json: bool) -> Result<u8, Failure> {
    let bytes = match (side(from)?, side(to)?) {
        (Side::Guest(name, guest), Side::Host(host)) => {
            let mut agent = agent(store, &name, port)?;
            copy_out(&mut agent, &guest, &host)?
        }
        (Side::Host(host), Side::Guest(name, guest)) => {
            let mut agent = agent(store, &name, port)?;
            let mut f = std::fs::File::open(&host)
                .map_err(|e| usage(anyhow!("cannot read {}: {e}", host.display())))?;
            agent
                .write_file(&mut f, &guest)
                .map_err(|e| runtime(anyhow::Error::new(e)))?
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

/// The guest's `guest` into host file `host`, through a temporary file,
/// fsync and rename: a failed copy leaves what was there.
fn copy_out(agent: &mut Agent, guest: &str, host: &Path) -> Result<u64, Failure> {
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
    let copied = agent
        .read_file(guest, &mut f)
        .map_err(|e| runtime(anyhow::Error::new(e)))
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
