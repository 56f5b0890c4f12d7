//! The event loop of a running VM: it wires every event source to the
//! [`Controller`], which owns the VM, and does nothing else. Sources: the
//! reset and power-off eventfds, vCPU thread reports, SIGINT/SIGTERM/SIGHUP
//! and SIGUSR1 through a signalfd, console input (stdin, or attached
//! clients), the virtio workers, the control API's queue, and the timer
//! that slows a guest for a migration's auto-converge.
//!
//! SIGUSR1 asks for a *state round trip*: every vCPU is paused, its complete
//! state (nested state included) is read and written back, and the VM goes
//! on as it was. It proves, on a live VM, that what snapshots and migration
//! will carry is complete; the result is reported on stderr.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::io::Read;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixListener;
use std::rc::Rc;
use std::sync::mpsc::{channel, Receiver};

use event_manager::{EventManager, EventOps, EventSet, Events, MutEventSubscriber, SubscriberOps};
use nestvm_kvm::kick;
use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::api::{ApiServer, Queue};
use crate::builder::BuiltVm;
use crate::console::{ConsoleServer, SerialFeeder};
use crate::controller::{Controller, Parts, Places};
use crate::outcome::{Outcome, VmOutcome};
use crate::vcpu::{Event, ExitReason};
use crate::vcpus::{VcpuSet, VcpuSetError};

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
    /// The vCPU threads could not be started or resumed.
    #[error("cannot start the vCPUs")]
    Vcpus(#[source] VcpuSetError),
    /// The event loop's seccomp filter could not be installed.
    #[error(transparent)]
    Seccomp(#[from] crate::seccomp::SeccompError),
    /// The event loop's thread could not enter its Landlock ruleset.
    #[error("cannot confine the event loop")]
    Jail(#[from] crate::jail::EnterError),
    /// A user-mode adapter's passt did not start.
    #[error(transparent)]
    Passt(crate::passt::PasstError),
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
    /// The threads' seccomp filters (see [`crate::seccomp`]).
    pub seccomp: crate::seccomp::Mode,
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
    /// The controller's slowing timer (auto-converge), and whether it fired.
    slowing: (std::os::fd::RawFd, Rc<Cell<bool>>),
    /// Written by threads that need the loop (a migration's stop request).
    wake: EventFd,
}

const TOKEN_RESET: u32 = 1;
const TOKEN_WAKE: u32 = 5;
const TOKEN_POWER_OFF: u32 = 2;
const TOKEN_VCPU: u32 = 3;
const TOKEN_SIGNAL: u32 = 4;
const TOKEN_SLOWING: u32 = 6;

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
        add(self.slowing.0, TOKEN_SLOWING);
        if let Some(s) = &self.signals {
            add(s.as_raw_fd(), TOKEN_SIGNAL);
        }
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        match events.data() {
            TOKEN_RESET => {
                let _ = self.reset.read();
                self.outcome.settle(VmOutcome::Reset);
            }
            TOKEN_POWER_OFF => {
                let _ = self.power_off.read();
                self.outcome.settle(VmOutcome::PowerOff);
            }
            TOKEN_VCPU => {
                let _ = self.notify.read();
                while let Ok(ev) = self.vcpu_events.try_recv() {
                    log::debug!("{ev:?}");
                    if let Event::Exited(_, reason) = ev {
                        match reason {
                            ExitReason::Stopped => {}
                            ExitReason::Reset => self.outcome.settle(VmOutcome::Reset),
                            ExitReason::PowerOff => self.outcome.settle(VmOutcome::PowerOff),
                            ExitReason::Crashed { reason, registers } => self
                                .outcome
                                .settle(VmOutcome::Crashed { reason, registers }),
                        }
                    }
                }
            }
            TOKEN_WAKE => {
                let _ = self.wake.read();
            }
            // The controller reads the timer when it serves the tick.
            TOKEN_SLOWING => self.slowing.1.set(true),
            TOKEN_SIGNAL => {
                if let Some(Ok(Some(info))) = self.signals.as_mut().map(|s| s.read_signal()) {
                    if info.ssi_signo == Signal::SIGUSR1 as u32 {
                        self.round_trip.set(true);
                    } else {
                        self.outcome
                            .settle(VmOutcome::Signal(info.ssi_signo as i32));
                    }
                }
            }
            _ => {}
        }
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
                        self.outcome.settle(VmOutcome::Quit);
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

/// Blocks SIGINT, SIGTERM, SIGHUP and SIGUSR1 in this thread (before any
/// vCPU thread exists, so every thread inherits the mask) and returns a
/// signalfd that receives them.
fn block_signals() -> Result<SignalFd, RunError> {
    let mut set = SigSet::empty();
    for s in [
        Signal::SIGINT,
        Signal::SIGTERM,
        Signal::SIGHUP,
        Signal::SIGUSR1,
    ] {
        set.add(s);
    }
    set.thread_block()
        .map_err(|e| setup("signal mask")(std::io::Error::from(e)))?;
    SignalFd::with_flags(&set, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC)
        .map_err(|e| setup("signalfd")(std::io::Error::from(e)))
}

type Loop = EventManager<Rc<RefCell<dyn MutEventSubscriber>>>;

fn subscribe(em: &mut Loop, s: impl MutEventSubscriber + 'static) {
    em.add_subscriber(Rc::new(RefCell::new(s)));
}

/// Starts the vCPU threads of `vm` (paused) and hands everything to a
/// controller; the event sources go on `em`.
fn take_charge(
    vm: BuiltVm,
    em: &mut Loop,
    wake: &EventFd,
    places: Places,
    outcome: &Outcome,
) -> Result<(Controller, Control, SerialFeeder), RunError> {
    let notify = EventFd::new(EFD_NONBLOCK).map_err(setup("vCPU notify eventfd"))?;
    let (tx, vcpu_events) = channel();
    let vcpus = VcpuSet::spawn(vm.vcpus, &vm.buses, &vm.state_ctx, &tx, &notify)
        .map_err(RunError::Vcpus)?;
    drop(tx);
    for worker in vm.virtio.workers {
        subscribe(em, Boxed(worker));
    }
    let feeder = SerialFeeder::new(vm.serial.clone()).map_err(setup("console retry timer"))?;
    let parts = Parts {
        config: vm.config,
        cpuid: vm.cpuid,
        nested: vm.nested,
        vm: std::sync::Arc::new(vm.vm),
        memory: vm.memory,
        serial: vm.serial,
        devices: vm.virtio.inspect,
        balloon: vm.virtio.balloon,
        power_button: vm.power_button,
        passt: vm.virtio.passt,
    };
    let wake_copy = wake.try_clone().map_err(setup("wake eventfd"))?;
    let slower = crate::migration::converge::Slower::new().map_err(setup("slowing timer"))?;
    let slowing = (slower.fd(), Rc::new(Cell::new(false)));
    let control = Control {
        reset: vm.reset.0,
        power_off: vm.power_off.0,
        notify,
        vcpu_events,
        signals: None,
        outcome: outcome.clone(),
        round_trip: Rc::new(Cell::new(false)),
        slowing,
        wake: wake.try_clone().map_err(setup("wake eventfd"))?,
    };
    let controller = Controller::new(parts, vcpus, places, wake_copy, outcome.clone(), slower);
    Ok((controller, control, feeder))
}

/// Resumes `vm` and runs it until it stops. Every thread is confined as
/// `opts.seccomp` says before the vCPUs first run; the calling thread, the
/// event loop's, stays confined after it returns.
pub fn run(mut vm: BuiltVm, console: Console, opts: RunOptions) -> Result<VmOutcome, RunError> {
    vm.state_ctx.seccomp = opts.seccomp;
    // passt now, not when the VM was built: an arriving VM is run only
    // after its source stopped its own passt (see `crate::passt`).
    for p in &mut vm.virtio.passt {
        p.start().map_err(RunError::Passt)?;
    }
    kick::install().map_err(setup("vCPU kick signal"))?;
    let signals = opts.handle_signals.then(block_signals).transpose()?;
    let mut em: Loop =
        EventManager::new().map_err(|e| setup("epoll")(std::io::Error::other(format!("{e:?}"))))?;
    let wake = EventFd::new(EFD_NONBLOCK).map_err(setup("wake eventfd"))?;
    let outcome = Outcome::default();
    let places = Places {
        save_dir: opts.save_dir,
        checkpoint_root: opts.checkpoint_root,
        migration_report: opts.migration_report,
        seccomp: opts.seccomp,
    };
    // Where the guest thread reaches the guest's agent: the vsock device's
    // socket (relative ones to this directory, as the device bound it).
    let agent_socket = vm.config.vsock.as_ref().map(|v| v.socket_path());
    let (mut controller, mut control, feeder) = take_charge(vm, &mut em, &wake, places, &outcome)?;
    control.signals = signals;
    let round_trip = control.round_trip.clone();
    let slowing_due = control.slowing.1.clone();
    subscribe(&mut em, control);
    if let Some(mut server) = opts.console_server {
        server.set_feeder(feeder);
        subscribe(&mut em, server);
    } else if let Some(fd) = console.input {
        subscribe(
            &mut em,
            ConsoleInput {
                input: std::fs::File::from(fd),
                feeder,
                watching_input: false,
                escape: console.escape,
                saw_escape_key: false,
                outcome: outcome.clone(),
            },
        );
    }
    let queue: Queue = Rc::new(RefCell::new(VecDeque::new()));
    if let Some(listener) = opts.api {
        let guest = agent_socket
            .map(|socket| crate::api::GuestThread::start(socket, opts.seccomp))
            .transpose()
            .map_err(setup("guest-agent thread"))?;
        let server = ApiServer::start(listener, queue.clone(), guest, opts.seccomp)
            .map_err(setup("control API thread"))?;
        subscribe(&mut em, server);
    }
    // Everything is built and every other thread started: from here on
    // the loop serves guests and clients.
    crate::jail::enter(crate::jail::Role::Guest)?;
    // For the tests of what the jail lets a guest's threads reach.
    if let Some(path) = std::env::var_os("NESTVM_JAIL_PROBE") {
        let result = std::fs::File::open(&path).map(|_| "opened".to_owned());
        let said = result.unwrap_or_else(|e| format!("refused ({e})"));
        eprintln!("nestvm: jail probe: {}: {said}", path.to_string_lossy());
    }
    crate::seccomp::install(crate::seccomp::Role::EventLoop, opts.seccomp)?;
    // For the tests of what a call outside the filter does: getppid is in
    // no filter.
    if std::env::var_os("NESTVM_SECCOMP_TRIP").is_some() {
        let _ = nix::unistd::getppid();
    }
    controller
        .start(opts.start_paused)
        .map_err(RunError::Vcpus)?;
    if let Some(started) = opts.on_started {
        started();
    }
    while !outcome.is_settled() {
        if let Err(e) = em.run() {
            log::warn!("event loop: {e:?}");
        }
        if slowing_due.replace(false) {
            controller.slowing_tick();
        }
        controller.poll_migration();
        if round_trip.replace(false) && !outcome.is_settled() {
            match controller.round_trip() {
                Ok(summary) => eprintln!("nestvm: vCPU state round trip: {summary}"),
                Err(e) => eprintln!("nestvm: vCPU state round trip failed: {}", e.error),
            }
        }
        let requests: Vec<_> = queue.borrow_mut().drain(..).collect();
        for req in requests {
            controller.serve(req);
        }
    }
    controller.finish();
    Ok(outcome.take().expect("the loop ends with an outcome"))
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
