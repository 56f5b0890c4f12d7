//! Running managed VMs: `vm start` spawns one detached nestvm process per
//! VM (`vm serve`, see `serve.rs`), which holds the VM's run lock, serves
//! its control API on `control.sock` and its console on `console.sock`, and
//! logs to `vmm.log`. `stop`, `kill`, `pause`, `resume` talk to that API;
//! [`start_from`], [`stop_locked`] and [`kill_hard`] serve the commands that
//! restart or stop a VM on the way (restore, enable-nested), and
//! [`spawn_serve`] the one that receives a VM (migrate).

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::anyhow;
use nestvm_manager::{Store, VmName, VmState};
use nestvm_vmm::api::VmInfo;
use serde::de::IgnoredAny;

use crate::common::{report, runtime, store_err, tail, Failure};
use crate::control::{self, state_name, API_TIMEOUT};
use crate::vmdir::VmDir;

/// How long `vm start` waits for the VM to be up.
const START_TIMEOUT: Duration = Duration::from_secs(60);
fn not_running(name: &VmName) -> Failure {
    runtime(anyhow!(
        "VM '{name}' is not running: 'nestvm vm start {name}' starts it"
    ))
}

/// `vm start`.
pub fn start(store: &Store, name: &VmName, json: bool) -> Result<u8, Failure> {
    start_from(store, name, None, json)
}

/// Starts the VM detached: from `checkpoint` if given, else from its saved
/// state if it has one, else fresh.
pub fn start_from(
    store: &Store,
    name: &VmName,
    checkpoint: Option<&str>,
    json: bool,
) -> Result<u8, Failure> {
    let _cmd = store.lock(name).map_err(store_err)?;
    store.load(name).map_err(store_err)?;
    match store.state(name) {
        VmState::Live => return Err(runtime(anyhow!("VM '{name}' is already running"))),
        VmState::Saved | VmState::Off => {}
    }
    let p = VmDir::of(store, name);
    let resuming = p.saved.exists() && checkpoint.is_none();
    if !resuming && checkpoint.is_none() {
        // A fresh start descends from no checkpoint.
        store.checkpoints(name).set_current(None).map_err(runtime)?;
    }
    let extra: Vec<String> = checkpoint
        .map(|c| format!("--checkpoint={c}"))
        .into_iter()
        .collect();
    #[allow(clippy::zombie_processes)] // detached on purpose; init reaps it once we exit
    let mut child = spawn_serve(store, name, &extra)?;
    // The VMM says when its VM runs and its API listens: no polling.
    let ready = wait_ready(&mut child, START_TIMEOUT);
    let up = match ready {
        Start::Up => control::up(&p).map_err(runtime)?,
        Start::Ended => None,
        Start::Late => {
            let _ = child.kill();
            let _ = child.wait();
            return Err(runtime(anyhow!(
                "VM '{name}' did not come up within {START_TIMEOUT:?}; see {}",
                p.log.display()
            )));
        }
    };
    let Some(v) = up else {
        let status = child.wait().map_err(runtime)?;
        return Err(runtime(anyhow!(
            "VM '{name}' failed to start ({status}): {}",
            tail(&p.log, 3).join(" / ")
        )));
    };
    report(
        json,
        &format!(
            "{} VM '{name}' (pid {}, {}); console: nestvm vm console {name}",
            match (checkpoint, resuming) {
                (Some(_), _) => "restored checkpoint of",
                (None, true) => "resumed saved",
                (None, false) => "started",
            },
            v.pid,
            state_name(v.state)
        ),
        serde_json::json!({"vm": name.as_str(), "result": if resuming { "resumed" } else { "started" }, "vmm": v}),
    );
    Ok(0)
}

/// What `vm serve` said about its start.
enum Start {
    /// Its VM runs and its API listens.
    Up,
    /// It ended without saying so.
    Ended,
    /// It said nothing in time.
    Late,
}

/// Waits up to `timeout` for `vm serve` (`child`) to say its VM runs: the
/// line [`crate::common::SERVE_READY`] on its standard output, a pipe.
fn wait_ready(child: &mut std::process::Child, timeout: Duration) -> Start {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    use std::io::Read;
    use std::os::fd::AsFd;
    let Some(mut out) = child.stdout.take() else {
        return Start::Ended;
    };
    let deadline = Instant::now() + timeout;
    let mut said = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let ms = u16::try_from(left.as_millis()).unwrap_or(u16::MAX);
        let mut fds = [PollFd::new(out.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, PollTimeout::from(ms)) {
            Ok(0) if left.is_zero() => return Start::Late,
            Ok(_) | Err(nix::errno::Errno::EINTR) => {}
            Err(_) => return Start::Ended,
        }
        let mut buf = [0u8; 64];
        match out.read(&mut buf) {
            Ok(0) | Err(_) => return Start::Ended,
            Ok(n) => said.extend_from_slice(&buf[..n]),
        }
        if said.contains(&b'\n') {
            return match said.starts_with(crate::common::SERVE_READY.as_bytes()) {
                true => Start::Up,
                false => Start::Ended,
            };
        }
        if said.len() > 64 {
            return Start::Ended;
        }
    }
}

/// vmm.log, truncated for a new run: 0600 whatever the umask, and never
/// through a symbolic link.
fn private_log(path: &std::path::Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .mode(0o600)
        .custom_flags(nix::libc::O_NOFOLLOW)
        .open(path)
}

/// Spawns `nestvm vm serve NAME EXTRA...` detached: its own process group
/// (a Ctrl-C in this terminal does not reach the VM), output in `vmm.log`.
pub fn spawn_serve(
    store: &Store,
    name: &VmName,
    extra: &[String],
) -> Result<std::process::Child, Failure> {
    let p = VmDir::of(store, name);
    let log = private_log(&p.log)
        .map_err(|e| runtime(anyhow!("cannot create {}: {e}", p.log.display())))?;
    let exe = std::env::current_exe().map_err(runtime)?;
    let mut cmd = Command::new(exe);
    cmd.arg("--state-dir")
        .arg(store.root())
        .arg(format!("--seccomp={}", crate::common::seccomp().as_str()))
        .arg(format!(
            "--landlock={}",
            if crate::common::landlock() {
                "on"
            } else {
                "off"
            }
        ))
        .arg(format!("--vmm-user={}", crate::common::vmm_user_spec()))
        .args(["vm", "serve", name.as_str()])
        .args(extra)
        .stdin(Stdio::null())
        // Its standard output says when the VM runs (see `wait_ready`);
        // everything else goes to the log.
        .stdout(Stdio::piped())
        .stderr(log);
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    cmd.spawn()
        .map_err(|e| runtime(anyhow!("cannot start the VMM process: {e}")))
}

fn wait_off(store: &Store, name: &VmName, timeout: Duration) -> bool {
    let start = Instant::now();
    while store.state(name) == VmState::Live {
        if start.elapsed() > timeout {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    true
}

pub fn kill_hard(store: &Store, name: &VmName) -> Result<(), Failure> {
    let p = VmDir::of(store, name);
    // Whatever it answers, it is checked below by whether it let go.
    let _ = control::request::<IgnoredAny>(&p.control, "PUT", "/v1/vm/kill", API_TIMEOUT, 200);
    if wait_off(store, name, Duration::from_secs(5)) {
        return Ok(());
    }
    // The VMM does not answer: end its process.
    let pid: i32 = std::fs::read_to_string(&p.pid)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .ok_or_else(|| runtime(anyhow!("VM '{name}' does not answer and has no pid file")))?;
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    );
    if wait_off(store, name, Duration::from_secs(10)) {
        Ok(())
    } else {
        Err(runtime(anyhow!("VM '{name}' (pid {pid}) would not stop")))
    }
}

/// How a stop ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stopped {
    /// It was not running.
    NotRunning,
    /// The guest powered off after the power button.
    PoweredOff,
    /// It was stopped hard after the timeout.
    Hard,
}

/// Stops a VM whose command lock the caller holds: the ACPI power button,
/// then a hard stop after `timeout`.
pub fn stop_locked(store: &Store, name: &VmName, timeout: Duration) -> Result<Stopped, Failure> {
    if store.state(name) != VmState::Live {
        return Ok(Stopped::NotRunning);
    }
    let p = VmDir::of(store, name);
    let pressed =
        control::done::<IgnoredAny>(&p.control, "PUT", "/v1/vm/power-button", API_TIMEOUT, 202);
    match pressed {
        Ok(_) => {
            if wait_off(store, name, timeout) {
                return Ok(Stopped::PoweredOff);
            }
            eprintln!("nestvm: VM '{name}' did not power off within {timeout:?}: stopping it hard");
        }
        Err(e) => {
            eprintln!("nestvm: VM '{name}' did not take the power button ({e}): stopping it hard")
        }
    }
    kill_hard(store, name)?;
    Ok(Stopped::Hard)
}

/// `vm stop`.
pub fn stop(store: &Store, name: &VmName, timeout: Duration, json: bool) -> Result<u8, Failure> {
    let _cmd = store.lock(name).map_err(store_err)?;
    let (how, text) = match stop_locked(store, name, timeout)? {
        Stopped::NotRunning => ("not-running", format!("VM '{name}' is not running")),
        Stopped::PoweredOff => (
            "powered-off",
            format!("stopped VM '{name}': the guest powered off"),
        ),
        Stopped::Hard => ("hard-stop", format!("stopped VM '{name}' (hard stop)")),
    };
    report(
        json,
        &text,
        serde_json::json!({"vm": name.as_str(), "result": how}),
    );
    Ok(0)
}

/// `vm kill`.
pub fn kill(store: &Store, name: &VmName, json: bool) -> Result<u8, Failure> {
    let _cmd = store.lock(name).map_err(store_err)?;
    if store.state(name) != VmState::Live {
        return Err(not_running(name));
    }
    kill_hard(store, name)?;
    report(
        json,
        &format!("killed VM '{name}'"),
        serde_json::json!({"vm": name.as_str(), "result": "killed"}),
    );
    Ok(0)
}

/// `vm pause` and `vm resume`.
pub fn pause_resume(store: &Store, name: &VmName, pause: bool, json: bool) -> Result<u8, Failure> {
    let _cmd = store.lock(name).map_err(store_err)?;
    if store.state(name) != VmState::Live {
        return Err(not_running(name));
    }
    let path = if pause {
        "/v1/vm/pause"
    } else {
        "/v1/vm/resume"
    };
    let socket = VmDir::of(store, name).control;
    let v: VmInfo = control::done(&socket, "PUT", path, API_TIMEOUT, 200)
        .map_err(|e| runtime(anyhow!("VM '{name}': {e}")))?;
    report(
        json,
        &format!("VM '{name}' is {}", state_name(v.state)),
        serde_json::json!({"vm": name.as_str(), "vmm": v}),
    );
    Ok(0)
}
