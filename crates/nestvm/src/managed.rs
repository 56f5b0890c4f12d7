//! Running managed VMs: `vm start` spawns one detached nestvm process per VM
//! (`vm serve`), which holds the VM's run lock, serves its control API on
//! `control.sock` and its console on `console.sock`, and logs to `vmm.log`.
//! `stop`, `kill`, `pause`, `resume` talk to that API.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::anyhow;
use nestvm_kvm::Hypervisor;
use nestvm_manager::lock;
use nestvm_manager::{Store, VmName, VmState};
use nestvm_vmm::api::call;
use nestvm_vmm::console::{ConsoleHub, ConsoleServer};
use nestvm_vmm::runner::{Console, RunOptions};
use nestvm_vmm::{build, run, VmOutcome};

use crate::run::{cannot_run_vms, resolve_nested};
use crate::vm::store_err;
use crate::{runtime, usage, Failure};

/// How long `vm start` waits for the VM to be up.
const START_TIMEOUT: Duration = Duration::from_secs(60);
const API_TIMEOUT: Duration = Duration::from_secs(10);

/// The files of a managed VM.
pub struct Paths {
    /// Control API socket.
    pub control: PathBuf,
    /// Console socket.
    pub console: PathBuf,
    /// The VMM's log.
    pub log: PathBuf,
    /// The console's log.
    pub console_log: PathBuf,
    /// The VMM's pid.
    pub pid: PathBuf,
    /// The run lock.
    pub run_lock: PathBuf,
}

/// Where a VM's runtime files are.
pub fn paths(store: &Store, name: &VmName) -> Paths {
    let d = store.vm_dir(name);
    Paths {
        control: d.join("control.sock"),
        console: d.join("console.sock"),
        log: d.join("vmm.log"),
        console_log: d.join("console.log"),
        pid: d.join("vmm.pid"),
        run_lock: d.join("run.lock"),
    }
}

/// The live state of a VM: the VMM's answer when it runs.
pub fn live_state(store: &Store, name: &VmName) -> &'static str {
    match store.state(name) {
        VmState::Off => "Off",
        VmState::Saved => "Saved",
        VmState::Live => match call(&paths(store, name).control, "GET", "/v1/vm", API_TIMEOUT) {
            Ok((200, v)) => match v["state"].as_str() {
                Some("Running") => "Running",
                Some("Paused") => "Paused",
                Some("Stopping") => "Stopping",
                _ => "Starting",
            },
            // The lock is held but the API is not up yet.
            _ => "Starting",
        },
    }
}

/// The last `n` lines of a file.
pub fn tail(path: &Path, n: usize) -> Vec<String> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<String> = text.lines().map(str::to_owned).collect();
    lines[lines.len().saturating_sub(n)..].to_vec()
}

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
    let resuming = crate::saved::saved_dir(store, name).exists() && checkpoint.is_none();
    if !resuming && checkpoint.is_none() {
        // A fresh start descends from no checkpoint.
        store.checkpoints(name).set_current(None).map_err(runtime)?;
    }
    let p = paths(store, name);
    let extra: Vec<String> = checkpoint
        .map(|c| format!("--checkpoint={c}"))
        .into_iter()
        .collect();
    #[allow(clippy::zombie_processes)] // detached on purpose; init reaps it once we exit
    let mut child = spawn_serve(store, name, &extra)?;
    let start = Instant::now();
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(runtime(anyhow!(
                "VM '{name}' failed to start ({status}): {}",
                tail(&p.log, 3).join(" / ")
            )));
        }
        if let Ok((200, v)) = call(&p.control, "GET", "/v1/vm", API_TIMEOUT) {
            crate::report(
                json,
                &format!(
                    "{} VM '{name}' (pid {}, {}); console: nestvm vm console {name}",
                    match (checkpoint, resuming) {
                        (Some(_), _) => "restored checkpoint of",
                        (None, true) => "resumed saved",
                        (None, false) => "started",
                    },
                    v["pid"],
                    v["state"].as_str().unwrap_or("?")
                ),
                serde_json::json!({"vm": name.as_str(), "result": if resuming { "resumed" } else { "started" }, "vmm": v}),
            );
            return Ok(0);
        }
        if start.elapsed() > START_TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            return Err(runtime(anyhow!(
                "VM '{name}' did not come up within {START_TIMEOUT:?}; see {}",
                p.log.display()
            )));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// What `vm serve` builds the VM from.
pub enum From {
    /// Its saved state if it has one, else its definition.
    Definition,
    /// A checkpoint.
    Checkpoint(String),
    /// A migration arriving on `listen`.
    Incoming {
        /// `HOST:PORT`.
        listen: String,
        /// The shared token.
        token_file: PathBuf,
        /// How long to wait for the sender.
        wait: Duration,
    },
}

/// Spawns `nestvm vm serve NAME EXTRA...` detached: its own process group
/// (a Ctrl-C in this terminal does not reach the VM), output in `vmm.log`.
pub fn spawn_serve(
    store: &Store,
    name: &VmName,
    extra: &[String],
) -> Result<std::process::Child, Failure> {
    let p = paths(store, name);
    let log = std::fs::File::create(&p.log)
        .map_err(|e| runtime(anyhow!("cannot create {}: {e}", p.log.display())))?;
    let exe = std::env::current_exe().map_err(runtime)?;
    let mut cmd = Command::new(exe);
    cmd.arg("--state-dir")
        .arg(store.root())
        .args(["vm", "serve", name.as_str()])
        .args(extra)
        .stdin(Stdio::null())
        .stdout(log.try_clone().map_err(runtime)?)
        .stderr(log);
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    cmd.spawn()
        .map_err(|e| runtime(anyhow!("cannot start the VMM process: {e}")))
}

/// `vm serve`: the detached VMM process of a managed VM.
pub fn serve(store: &Store, name: &VmName, from: From) -> Result<u8, Failure> {
    let p = paths(store, name);
    let _running = lock::lock(&p.run_lock, false)
        .map_err(|_| runtime(anyhow!("VM '{name}' is already running")))?;
    // An arriving VM brings its definition with it.
    let config = match from {
        From::Incoming { .. } => None,
        _ => Some(store.load(name).map_err(store_err)?),
    };
    std::fs::write(&p.pid, format!("{}\n", std::process::id())).map_err(runtime)?;
    let hv = Hypervisor::open().map_err(cannot_run_vms)?;
    let saved = crate::saved::saved_dir(store, name);
    let checkpoints = store.checkpoints(name).root().to_owned();
    let checkpoint = match &from {
        From::Checkpoint(c) => Some(c.as_str()),
        _ => None,
    };
    let resuming = (saved.exists() && config.is_some()) || checkpoint.is_some();
    // A resumed VM's console log goes on where it stopped.
    let console_log = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .append(resuming)
        .truncate(!resuming)
        .open(&p.console_log)
        .map_err(runtime)?;
    let hub = ConsoleHub::new(Some(console_log));
    let mut arrival = None;
    let (vm, notice) = if let From::Incoming {
        listen,
        token_file,
        wait,
    } = &from
    {
        let arrived = crate::migrate::incoming(
            store,
            name,
            listen,
            token_file,
            *wait,
            &hv,
            Box::new(hub.writer()),
        )?;
        arrival = Some((arrived.running, arrived.confirm));
        (arrived.vm, None)
    } else if let Some(c) = checkpoint {
        let vm =
            nestvm_vmm::snapshot::restore_checkpoint(&checkpoints, c, &hv, Box::new(hub.writer()))
                .map_err(|e| {
                    runtime(
                        anyhow::Error::new(e).context(format!("cannot restore checkpoint '{c}'")),
                    )
                })?;
        (vm, None)
    } else if resuming {
        (
            crate::saved::restore(&saved, &hv, Box::new(hub.writer()))?,
            None,
        )
    } else {
        let config = config.expect("loaded unless incoming");
        let (expose, notice) = resolve_nested(config.nested, &hv)?;
        let vm = build(&config, &hv, expose, Box::new(hub.writer())).map_err(|e| {
            if e.is_usage() {
                usage(e)
            } else {
                runtime(anyhow::Error::new(e).context("cannot build the VM"))
            }
        })?;
        (vm, notice)
    };
    if let Some(n) = notice {
        eprintln!("{n}");
    }
    let bind = |path: &Path| {
        // Stale sockets of a VMM that died: we hold the run lock, so no live one uses them.
        let _ = std::fs::remove_file(path);
        let l = std::os::unix::net::UnixListener::bind(path)
            .map_err(|e| runtime(anyhow!("cannot listen on {}: {e}", path.display())))?;
        std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .map_err(runtime)?;
        Ok::<_, Failure>(l)
    };
    let api = bind(&p.control)?;
    let console = bind(&p.console)?;
    eprintln!("nestvm: VM '{name}' running (pid {})", std::process::id());
    let outcome = run(
        vm,
        Console {
            input: None,
            escape: false,
        },
        RunOptions {
            handle_signals: true,
            api: Some(api),
            console_server: Some(ConsoleServer::new(console, hub)),
            save_dir: Some(saved),
            checkpoint_root: Some(checkpoints),
            migration_report: Some(store.vm_dir(name).join("migration.json")),
            start_paused: arrival.as_ref().is_some_and(|(running, _)| !running),
            on_started: arrival
                .map(|(_, confirm)| Box::new(move || confirm.resumed()) as Box<dyn FnOnce()>),
        },
    )
    .map_err(runtime);
    for f in [&p.control, &p.console, &p.pid] {
        let _ = std::fs::remove_file(f);
    }
    let outcome = outcome?;
    eprintln!("nestvm: VM '{name}' ended: {outcome:?}");
    Ok(match outcome {
        VmOutcome::Crashed { .. } => 1,
        VmOutcome::Signal(n) => 128u8.saturating_add(n as u8),
        _ => 0,
    })
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
    let p = paths(store, name);
    let _ = call(&p.control, "PUT", "/v1/vm/kill", API_TIMEOUT);
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
    let p = paths(store, name);
    match call(&p.control, "PUT", "/v1/vm/power-button", API_TIMEOUT) {
        Ok((202, _)) => {
            if wait_off(store, name, timeout) {
                return Ok(Stopped::PoweredOff);
            }
            eprintln!("nestvm: VM '{name}' did not power off within {timeout:?}: stopping it hard");
        }
        other => eprintln!(
            "nestvm: VM '{name}' did not take the power button ({other:?}): stopping it hard"
        ),
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
    crate::report(
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
    crate::report(
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
    match call(&paths(store, name).control, "PUT", path, API_TIMEOUT) {
        Ok((200, v)) => {
            crate::report(
                json,
                &format!("VM '{name}' is {}", v["state"].as_str().unwrap_or("?")),
                serde_json::json!({"vm": name.as_str(), "vmm": v}),
            );
            Ok(0)
        }
        Ok((_, v)) => Err(runtime(anyhow!(
            "VM '{name}': {}",
            v["error"].as_str().unwrap_or("refused")
        ))),
        Err(e) => Err(runtime(anyhow!("VM '{name}': {e}"))),
    }
}
