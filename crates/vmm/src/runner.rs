//! Runs a built VM: starts its vCPU threads (paused), resumes them, and runs
//! the event loop until the VM stops. Events: console input (stdin into the
//! UART), the reset and power-off eventfds, vCPU thread reports, and
//! SIGINT/SIGTERM/SIGHUP through a signalfd.
//!
//! SIGUSR1 asks for a *state round trip*: every vCPU is paused, its complete
//! state (nested state included) is read and written back, and the VM
//! resumes. It proves, on a live VM, that what snapshots and migration will
//! carry is complete; the result is reported on stderr.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::io::Read;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixListener;
use std::rc::Rc;
use std::sync::mpsc::{channel, Receiver};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use event_manager::{EventManager, EventOps, EventSet, Events, MutEventSubscriber, SubscriberOps};
use nestvm_devices::serial::SerialPort;
use nestvm_kvm::kick;
use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::timerfd::TimerFd;

use crate::api::{Action, ApiError, ApiServer, DeviceInfo, Queue, RunState, VmInfo};
use crate::builder::BuiltVm;
use crate::capture::{
    checkpoint_request, checkpoint_vm, collect_states, save_vm, SaveParts, STATE_TIMEOUT,
};
use crate::console::ConsoleServer;
use crate::migration::send::Outgoing;
use crate::vcpu::{Command, Event, ExitReason, State, VcpuHandle};

/// How a VM ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmOutcome {
    /// The guest reset itself (i8042, ACPI reset or a KVM reset event).
    Reset,
    /// The guest powered off (ACPI S5 or a KVM shutdown event).
    PowerOff,
    /// nestvm got this signal and stopped the VM.
    Signal(i32),
    /// The user typed the console's quit sequence.
    Quit,
    /// The control API asked for the VM to stop at once.
    Killed,
    /// The VM was saved (`PUT /v1/vm/save`) and stopped.
    Saved,
    /// The VM was migrated (`PUT /v1/vm/migrate`) and runs elsewhere now.
    Migrated,
    /// The guest crashed.
    Crashed {
        /// What happened.
        reason: String,
        /// Register dump of the vCPU.
        registers: String,
    },
}

/// Errors of the run loop itself (not of the guest).
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// Setting up the event loop or its event sources failed.
    #[error("cannot set up the event loop ({what})")]
    Setup {
        /// Which part.
        what: &'static str,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Starting a vCPU thread failed.
    #[error("cannot start a vCPU thread")]
    Spawn(#[source] std::io::Error),
}

fn setup(what: &'static str) -> impl FnOnce(std::io::Error) -> RunError {
    move |source| RunError::Setup { what, source }
}

/// Console wiring for a run.
pub struct Console {
    /// Where input for the guest's serial port comes from.
    pub input: Option<OwnedFd>,
    /// Whether Ctrl-A x quits (interactive terminals).
    pub escape: bool,
}

/// Options for a run.
#[derive(Default)]
pub struct RunOptions {
    /// Stop cleanly on SIGINT/SIGTERM/SIGHUP (blocks them in this thread).
    pub handle_signals: bool,
    /// Serve the control API on this socket.
    pub api: Option<UnixListener>,
    /// Serve the console to attaching clients (instead of `Console::input`).
    pub console_server: Option<ConsoleServer>,
    /// Where `PUT /v1/vm/save` writes the saved VM (managed VMs only).
    pub save_dir: Option<std::path::PathBuf>,
    /// Where `PUT /v1/vm/checkpoint` keeps checkpoints (managed VMs only).
    pub checkpoint_root: Option<std::path::PathBuf>,
    /// Where an outgoing migration's final progress is written (JSON) when
    /// it ends, since a migrated VMM is gone before anyone can ask.
    pub migration_report: Option<std::path::PathBuf>,
    /// Leave the VM paused instead of resuming it (a migrated paused VM).
    pub start_paused: bool,
    /// Called once the VM runs (or is ready, if `start_paused`): a migration
    /// receiver confirms to its sender here.
    pub on_started: Option<Box<dyn FnOnce()>>,
}

type Outcome = Rc<RefCell<Option<VmOutcome>>>;

fn settle(outcome: &Outcome, value: VmOutcome) {
    let mut o = outcome.borrow_mut();
    if o.is_none() {
        *o = Some(value);
    }
}

/// Watches reset/power-off eventfds, vCPU reports and signals.
struct Control {
    reset: EventFd,
    power_off: EventFd,
    notify: EventFd,
    vcpu_events: Receiver<Event>,
    signals: Option<SignalFd>,
    outcome: Outcome,
    round_trip: Rc<Cell<bool>>,
    /// Written by threads that need the loop (a migration's stop request).
    wake: EventFd,
}

const TOKEN_RESET: u32 = 1;
const TOKEN_WAKE: u32 = 5;
const TOKEN_POWER_OFF: u32 = 2;
const TOKEN_VCPU: u32 = 3;
const TOKEN_SIGNAL: u32 = 4;

impl MutEventSubscriber for Control {
    fn init(&mut self, ops: &mut EventOps) {
        let mut add = |fd: i32, token| {
            if let Err(e) = ops.add(Events::with_data_raw(fd, token, EventSet::IN)) {
                log::error!("event loop: cannot watch fd {fd}: {e:?}");
            }
        };
        add(self.reset.as_raw_fd(), TOKEN_RESET);
        add(self.power_off.as_raw_fd(), TOKEN_POWER_OFF);
        add(self.notify.as_raw_fd(), TOKEN_VCPU);
        add(self.wake.as_raw_fd(), TOKEN_WAKE);
        if let Some(s) = &self.signals {
            add(s.as_raw_fd(), TOKEN_SIGNAL);
        }
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        match events.data() {
            TOKEN_RESET => {
                let _ = self.reset.read();
                settle(&self.outcome, VmOutcome::Reset);
            }
            TOKEN_POWER_OFF => {
                let _ = self.power_off.read();
                settle(&self.outcome, VmOutcome::PowerOff);
            }
            TOKEN_VCPU => {
                let _ = self.notify.read();
                while let Ok(ev) = self.vcpu_events.try_recv() {
                    log::debug!("{ev:?}");
                    if let Event::Exited(_, reason) = ev {
                        match reason {
                            ExitReason::Stopped => {}
                            ExitReason::Reset => settle(&self.outcome, VmOutcome::Reset),
                            ExitReason::PowerOff => settle(&self.outcome, VmOutcome::PowerOff),
                            ExitReason::Crashed { reason, registers } => {
                                settle(&self.outcome, VmOutcome::Crashed { reason, registers })
                            }
                        }
                    }
                }
            }
            TOKEN_WAKE => {
                let _ = self.wake.read();
            }
            TOKEN_SIGNAL => {
                if let Some(Ok(Some(info))) = self.signals.as_mut().map(|s| s.read_signal()) {
                    if info.ssi_signo == Signal::SIGUSR1 as u32 {
                        self.round_trip.set(true);
                    } else {
                        settle(&self.outcome, VmOutcome::Signal(info.ssi_signo as i32));
                    }
                }
            }
            _ => {}
        }
    }
}

/// Moves input into the guest's UART. When the UART's receive FIFO is full,
/// input waits in `pending` and a timer retries, so pasted text is never
/// dropped; while anything is pending the source is not read.
pub(crate) struct SerialFeeder {
    serial: Arc<Mutex<SerialPort>>,
    pending: Vec<u8>,
    retry: TimerFd,
}

impl SerialFeeder {
    fn new(serial: Arc<Mutex<SerialPort>>) -> Result<Self, RunError> {
        Ok(Self {
            serial,
            pending: Vec::new(),
            retry: TimerFd::new().map_err(|e| {
                setup("console retry timer")(std::io::Error::from_raw_os_error(e.errno()))
            })?,
        })
    }

    pub(crate) fn push(&mut self, bytes: &[u8]) {
        self.pending.extend_from_slice(bytes);
    }

    /// Moves what the UART can take from `pending` into it.
    pub(crate) fn flush(&mut self) {
        let mut uart = self.serial.lock().unwrap_or_else(|p| p.into_inner());
        let n = uart.queue_input(&self.pending);
        self.pending.drain(..n);
    }

    /// Nothing waits: the source may be read.
    pub(crate) fn is_idle(&self) -> bool {
        self.pending.is_empty()
    }

    /// Starts (every 5 ms) or stops the retry timer.
    pub(crate) fn arm_retry(&mut self, on: bool) {
        let d = if on {
            Duration::from_millis(5)
        } else {
            Duration::ZERO
        };
        if let Err(e) = self.retry.reset(d, Some(d).filter(|d| !d.is_zero())) {
            log::warn!("console: cannot arm the retry timer: {e}");
        }
    }

    pub(crate) fn ack_retry(&mut self) {
        let _ = self.retry.wait();
    }

    pub(crate) fn retry_fd(&self) -> RawFd {
        self.retry.as_raw_fd()
    }
}

/// Feeds nestvm's own stdin (or any fd) to the UART, with the Ctrl-A x escape.
struct ConsoleInput {
    input: std::fs::File,
    feeder: SerialFeeder,
    watching_input: bool,
    escape: bool,
    saw_escape_key: bool,
    outcome: Outcome,
}

const TOKEN_INPUT: u32 = 10;
const TOKEN_RETRY: u32 = 11;
/// Ctrl-A.
const ESCAPE_KEY: u8 = 0x01;

impl ConsoleInput {
    fn filter_escape(&mut self, bytes: &[u8]) {
        for &b in bytes {
            if self.saw_escape_key {
                self.saw_escape_key = false;
                match b {
                    b'x' | b'X' => {
                        settle(&self.outcome, VmOutcome::Quit);
                        return;
                    }
                    ESCAPE_KEY => self.feeder.push(&[ESCAPE_KEY]),
                    other => self.feeder.push(&[ESCAPE_KEY, other]),
                }
            } else if self.escape && b == ESCAPE_KEY {
                self.saw_escape_key = true;
            } else {
                self.feeder.push(&[b]);
            }
        }
    }

    fn watch(&mut self, ops: &mut EventOps) {
        let want_input = self.feeder.is_idle();
        if want_input != self.watching_input {
            let ev = Events::with_data(&self.input, TOKEN_INPUT, EventSet::IN);
            let r = if want_input {
                ops.add(ev)
            } else {
                ops.remove(ev)
            };
            if let Err(e) = r {
                log::warn!("console: cannot change input watch: {e:?}");
            }
            self.watching_input = want_input;
        }
        self.feeder.arm_retry(!want_input);
    }
}

impl MutEventSubscriber for ConsoleInput {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::with_data(&self.input, TOKEN_INPUT, EventSet::IN)) {
            log::info!("console input not available: {e:?}");
            return;
        }
        self.watching_input = true;
        let _ = ops.add(Events::with_data_raw(
            self.feeder.retry_fd(),
            TOKEN_RETRY,
            EventSet::IN,
        ));
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        match events.data() {
            TOKEN_INPUT => {
                let mut buf = [0u8; 256];
                match self.input.read(&mut buf) {
                    Ok(0) | Err(_) => {
                        // End of input (or a broken fd): the guest keeps running without it.
                        let _ =
                            ops.remove(Events::with_data(&self.input, TOKEN_INPUT, EventSet::IN));
                        self.watching_input = false;
                        return;
                    }
                    Ok(n) => self.filter_escape(&buf[..n]),
                }
            }
            TOKEN_RETRY => self.feeder.ack_retry(),
            _ => return,
        }
        self.feeder.flush();
        self.watch(ops);
    }
}

/// Resumes `vm` and runs it until it stops.
pub fn run(vm: BuiltVm, console: Console, opts: RunOptions) -> Result<VmOutcome, RunError> {
    kick::install().map_err(setup("vCPU kick signal"))?;
    let signals = if opts.handle_signals {
        let mut set = SigSet::empty();
        for s in [
            Signal::SIGINT,
            Signal::SIGTERM,
            Signal::SIGHUP,
            Signal::SIGUSR1,
        ] {
            set.add(s);
        }
        // Blocked here before any vCPU thread exists, so every thread
        // inherits the mask and the signalfd receives them all.
        set.thread_block()
            .map_err(|e| setup("signal mask")(std::io::Error::from(e)))?;
        Some(
            SignalFd::with_flags(&set, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC)
                .map_err(|e| setup("signalfd")(std::io::Error::from(e)))?,
        )
    } else {
        None
    };

    let BuiltVm {
        vcpus,
        buses,
        serial,
        reset,
        power_off,
        power_button,
        state_ctx,
        nested,
        virtio,
        vm: kvm_vm,
        memory,
        config,
        cpuid,
        ..
    } = vm;
    let notify = EventFd::new(EFD_NONBLOCK).map_err(setup("vCPU notify eventfd"))?;
    let wake = EventFd::new(EFD_NONBLOCK).map_err(setup("wake eventfd"))?;
    let kvm_vm = Arc::new(kvm_vm);
    let mut outgoing: Option<Outgoing> = None;
    let mut last_migration: Option<crate::migration::Progress> = None;
    let (tx, rx) = channel();
    let mut handles = Vec::with_capacity(vcpus.len());
    for vcpu in vcpus {
        let n = notify.try_clone().map_err(setup("vCPU notify eventfd"))?;
        handles.push(
            VcpuHandle::spawn(vcpu, buses.clone(), state_ctx.clone(), tx.clone(), n)
                .map_err(RunError::Spawn)?,
        );
    }
    drop(tx);

    let outcome: Outcome = Rc::new(RefCell::new(None));
    let round_trip = Rc::new(Cell::new(false));
    let mut em: EventManager<Rc<RefCell<dyn MutEventSubscriber>>> =
        EventManager::new().map_err(|e| setup("epoll")(std::io::Error::other(format!("{e:?}"))))?;
    em.add_subscriber(Rc::new(RefCell::new(Control {
        reset: reset.0,
        power_off: power_off.0,
        notify,
        vcpu_events: rx,
        signals,
        outcome: outcome.clone(),
        round_trip: round_trip.clone(),
        wake: wake.try_clone().map_err(setup("wake eventfd"))?,
    })));
    if let Some(mut server) = opts.console_server {
        server.set_feeder(SerialFeeder::new(serial.clone())?);
        em.add_subscriber(Rc::new(RefCell::new(server)));
    } else if let Some(fd) = console.input {
        em.add_subscriber(Rc::new(RefCell::new(ConsoleInput {
            input: std::fs::File::from(fd),
            feeder: SerialFeeder::new(serial.clone())?,
            watching_input: false,
            escape: console.escape,
            saw_escape_key: false,
            outcome: outcome.clone(),
        })));
    }
    for worker in virtio.workers {
        em.add_subscriber(Rc::new(RefCell::new(Boxed(worker))));
    }
    let queue: Queue = Rc::new(RefCell::new(VecDeque::new()));
    if let Some(listener) = opts.api {
        let server =
            ApiServer::start(listener, queue.clone()).map_err(setup("control API thread"))?;
        em.add_subscriber(Rc::new(RefCell::new(server)));
    }
    // What saves and checkpoints capture besides the vCPUs.
    let parts = SaveParts {
        config: &config,
        cpuid: &cpuid,
        nested,
        vm: &kvm_vm,
        memory: &memory,
        serial: &serial,
        virtio: &virtio.inspect,
    };
    let mut run_state = RunState::Starting;
    log::debug!("VM built: {run_state:?}");

    if opts.start_paused {
        run_state = RunState::Paused;
    } else {
        resume_all(&handles);
        run_state = RunState::Running;
    }
    if let Some(started) = opts.on_started {
        started();
    }
    while outcome.borrow().is_none() {
        if let Err(e) = em.run() {
            log::warn!("event loop: {e:?}");
        }
        if let Some(o) = &outgoing {
            if let Some(reply) = o.stop_request() {
                let running = run_state == RunState::Running;
                if Outgoing::hand_over(reply, &handles, &parts, running) {
                    settle(&outcome, VmOutcome::Migrated);
                }
            }
        }
        if outgoing.as_ref().is_some_and(|o| o.finished()) {
            let o = outgoing.take().expect("checked above");
            last_migration = Some(end_migration(o, false, opts.migration_report.as_deref()));
        }
        if round_trip.replace(false) && outcome.borrow().is_none() {
            match state_round_trip(&handles, run_state != RunState::Paused) {
                Ok(summary) => eprintln!("nestvm: vCPU state round trip: {summary}"),
                Err(e) => eprintln!("nestvm: vCPU state round trip failed: {e}"),
            }
        }
        let requests: Vec<_> = queue.borrow_mut().drain(..).collect();
        for req in requests {
            let info = |state| VmInfo {
                state,
                pid: std::process::id(),
                vcpus: handles.len() as u32,
                nested,
                devices: virtio.inspect.iter().map(device_info).collect(),
            };
            match req.action {
                Action::Info => req.reply(200, &info(run_state)),
                Action::Pause if run_state == RunState::Paused => req.reply(200, &info(run_state)),
                Action::Pause => {
                    pause_all(&handles);
                    run_state = RunState::Paused;
                    req.reply(200, &info(run_state));
                }
                Action::Resume if run_state != RunState::Paused => req.reply(
                    409,
                    &ApiError {
                        error: format!("the VM is not paused ({run_state:?})"),
                    },
                ),
                Action::Resume => {
                    for h in &handles {
                        h.send(Command::Resume);
                    }
                    run_state = RunState::Running;
                    req.reply(200, &info(run_state));
                }
                Action::PowerButton => {
                    if run_state == RunState::Paused {
                        for h in &handles {
                            h.send(Command::Resume);
                        }
                    }
                    if let Err(e) = power_button.0.write(1) {
                        log::error!("cannot press the power button: {e}");
                    }
                    run_state = RunState::Stopping;
                    req.reply(202, &info(run_state));
                }
                Action::Kill => {
                    settle(&outcome, VmOutcome::Killed);
                    req.reply(200, &info(RunState::Stopping));
                }
                Action::Migration => match outgoing
                    .as_ref()
                    .map(|o| o.progress())
                    .or(last_migration.clone())
                {
                    Some(p) => req.reply(200, &p),
                    None => req.reply(
                        404,
                        &ApiError {
                            error: "this VM has not been migrated".into(),
                        },
                    ),
                },
                Action::Memory | Action::Resize => {
                    crate::balloon::serve(req, virtio.balloon.as_ref(), config.memory)
                }
                Action::Migrate | Action::Save | Action::Checkpoint if outgoing.is_some() => req
                    .reply(
                        409,
                        &ApiError {
                            error: "a migration of this VM is under way".into(),
                        },
                    ),
                Action::Migrate => {
                    let started = wake
                        .try_clone()
                        .map_err(|e| format!("cannot share the wake eventfd: {e}"))
                        .and_then(|w| Outgoing::from_query(&req.query, &parts, kvm_vm.clone(), w));
                    match started {
                        Ok(o) => {
                            if let Some(path) = &opts.migration_report {
                                let _ = std::fs::remove_file(path);
                            }
                            req.reply(202, &o.progress());
                            outgoing = Some(o);
                        }
                        Err(e) => req.reply(400, &ApiError { error: e }),
                    }
                }
                Action::Checkpoint => {
                    let Some(root) = &opts.checkpoint_root else {
                        req.reply(
                            409,
                            &ApiError {
                                error:
                                    "only managed VMs have checkpoints (nestvm vm checkpoint NAME)"
                                        .into(),
                            },
                        );
                        continue;
                    };
                    let (name, parent) = match checkpoint_request(&req.query, root) {
                        Ok(asked) => asked,
                        Err((status, error)) => {
                            req.reply(status, &ApiError { error });
                            continue;
                        }
                    };
                    let was_paused = run_state == RunState::Paused;
                    if !was_paused {
                        pause_all(&handles);
                    }
                    let result = checkpoint_vm(&handles, &parts, root, (&name, parent.as_deref()));
                    if !was_paused {
                        for h in &handles {
                            h.send(Command::Resume);
                        }
                    }
                    match result {
                        Ok(v) => req.reply(200, &v),
                        Err(e) => req.reply(
                            500,
                            &ApiError {
                                error: format!("cannot take the checkpoint: {e}"),
                            },
                        ),
                    }
                }
                Action::Save => {
                    let Some(dir) = &opts.save_dir else {
                        req.reply(
                            409,
                            &ApiError {
                                error: "only managed VMs can be saved (nestvm vm save NAME)".into(),
                            },
                        );
                        continue;
                    };
                    if run_state != RunState::Paused {
                        pause_all(&handles);
                    }
                    match save_vm(&handles, &parts, dir) {
                        Ok((summary, in_guest_mode)) => {
                            settle(&outcome, VmOutcome::Saved);
                            req.reply(
                                200,
                                &crate::api::SaveReply {
                                    saved: dir.clone(),
                                    summary,
                                    vcpus: handles.len(),
                                    vcpus_in_guest_mode: in_guest_mode,
                                },
                            );
                        }
                        Err(e) => {
                            if run_state != RunState::Paused {
                                for h in &handles {
                                    h.send(Command::Resume);
                                }
                            }
                            req.reply(
                                500,
                                &ApiError {
                                    error: format!("cannot save the VM: {e}"),
                                },
                            );
                        }
                    }
                }
            }
        }
    }
    if let Some(o) = outgoing.take() {
        // Migrated: the thread is finishing; otherwise the VM ended under it.
        let migrated = *outcome.borrow() == Some(VmOutcome::Migrated);
        end_migration(o, !migrated, opts.migration_report.as_deref());
    }
    for h in &handles {
        h.send(Command::Stop);
    }
    for mut h in handles {
        h.stop_and_join();
    }
    // What each disk and adapter did, for the user and for scripts.
    for info in virtio.inspect.iter().map(device_info) {
        let counters: Vec<String> = info
            .counters
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        eprintln!(
            "nestvm: {} {}: {}",
            info.kind,
            info.attached,
            counters.join(" ")
        );
    }
    let result = outcome
        .borrow_mut()
        .take()
        .expect("loop ends with an outcome");
    Ok(result)
}

/// A boxed subscriber, so devices of any backend share one event loop.
struct Boxed(Box<dyn MutEventSubscriber + Send>);

impl MutEventSubscriber for Boxed {
    fn init(&mut self, ops: &mut EventOps) {
        self.0.init(ops)
    }
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        self.0.process(events, ops)
    }
}

fn device_info(dev: &Arc<Mutex<dyn nestvm_virtio::mmio::Inspect>>) -> DeviceInfo {
    let r = dev.lock().unwrap_or_else(|p| p.into_inner()).report();
    DeviceInfo {
        kind: r.kind.to_owned(),
        attached: r.attached,
        active: r.active,
        counters: r
            .counters
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v))
            .collect(),
    }
}

/// Waits for (or, with `cancel`, stops) a migration's thread, and writes
/// its final progress to `report`.
fn end_migration(
    o: Outgoing,
    cancel: bool,
    report: Option<&std::path::Path>,
) -> crate::migration::Progress {
    let o = if cancel { o.cancel() } else { o.join() };
    let progress = o.progress();
    if let Some(path) = report {
        let json = serde_json::to_vec(&progress).unwrap_or_default();
        if let Err(e) = nestvm_snapshot::atomic::write_file(path, &json, 0o600) {
            log::warn!("cannot write the migration report: {e}");
        }
    }
    progress
}

/// Resumes every vCPU.
pub(crate) fn resume_all(handles: &[VcpuHandle]) {
    for h in handles {
        h.send(Command::Resume);
    }
}

/// Pauses every vCPU and waits until each has.
pub(crate) fn pause_all(handles: &[VcpuHandle]) {
    for h in handles {
        h.send(Command::Pause);
    }
    for h in handles {
        // Commands are served in order: the state reported after the Pause is Paused.
        let (tx, rx) = channel();
        h.send(Command::Report(tx));
        match rx.recv_timeout(STATE_TIMEOUT) {
            Ok(State::Paused) => {}
            other => log::warn!("vCPU {} did not confirm its pause ({other:?})", h.id()),
        }
    }
}

/// Pauses every vCPU, reads its complete state, writes it back, and resumes
/// the vCPUs if `resume` (a VM the API paused stays paused). Returns a
/// summary of what was carried.
pub fn state_round_trip(handles: &[VcpuHandle], resume: bool) -> Result<String, String> {
    for h in handles {
        h.send(Command::Pause);
    }
    let result = (|| {
        let mut states = collect_states(handles)?;
        let mut parts = vec![];
        for (h, state) in handles.iter().zip(states.drain(..)) {
            parts.push(match &state.nested {
                Some(n) => format!(
                    "vCPU {}: {} MSRs, nested state {} bytes ({}{})",
                    h.id(),
                    state.msrs.len(),
                    n.len(),
                    if n.format() == 1 { "SVM" } else { "VMX" },
                    if n.guest_mode() {
                        ", in guest mode"
                    } else {
                        ""
                    }
                ),
                None => format!(
                    "vCPU {}: {} MSRs, no nested state",
                    h.id(),
                    state.msrs.len()
                ),
            });
            let (tx, rx) = channel();
            h.send(Command::Restore(Box::new(state), tx));
            rx.recv_timeout(STATE_TIMEOUT)
                .map_err(|_| format!("vCPU {} did not answer", h.id()))??;
        }
        Ok(parts.join("; "))
    })();
    if resume {
        resume_all(handles);
    }
    result
}
