//! One thread per vCPU, running an explicit state machine:
//!
//! ```text
//!            Resume                 guest exit needing the VMM
//!  Paused ────────────▶ Running ─────────────────────────────▶ Exited
//!    ▲  ◀──────────────    │          (reset, power-off, crash)
//!    │       Pause         │ Stop
//!    └──── Stop ───────────┴──────────────────────────────────▶ Exited
//! ```
//!
//! A Running vCPU may also *nap* (a migration's auto-converge slowing a
//! guest that dirties memory faster than the link carries it): it stays
//! Running but leaves the guest unrun until the nap ends, serving every
//! command meanwhile, so a pause or a stop is never held up by a nap.
//!
//! Commands arrive on a channel, and each is followed by a kick so a vCPU
//! inside `KVM_RUN` sees it at once. The thread reports state changes on an
//! event channel and writes an eventfd so the VMM's event loop wakes up.

use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nestvm_kvm::kick::Kicker;
use nestvm_kvm::{RunOutcome, Vcpu, VcpuError, VcpuState};
use vmm_sys_util::eventfd::EventFd;

use crate::bus::Buses;

/// KVM system event types (`KVM_SYSTEM_EVENT_*`).
const SYSTEM_EVENT_SHUTDOWN: u32 = 1;
const SYSTEM_EVENT_RESET: u32 = 2;

/// What the VMM asks of a vCPU thread.
#[derive(Debug)]
pub enum Command {
    /// Start or continue running the guest.
    Resume,
    /// Stop running the guest but keep the thread and its state.
    Pause,
    /// Leave the thread.
    Stop,
    /// If Running, run no guest code for this long (commands are still
    /// served); a later nap replaces an earlier one.
    Nap(Duration),
    /// Answer with the vCPU's state once every earlier command is served.
    Report(Sender<State>),
    /// Read the vCPU's complete state (only while Paused).
    Save(Sender<Result<VcpuState, StateError>>),
    /// Write the vCPU's complete state (only while Paused).
    Restore(Box<VcpuState>, Sender<Result<(), StateError>>),
}

/// Why a vCPU's state could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// The vCPU was not paused.
    #[error("vCPU {0} is running: pause it first")]
    NotPaused(u32),
    /// The exit it was in could not be completed first.
    #[error("vCPU {id} cannot complete its pending I/O exit")]
    PendingIo {
        /// The vCPU.
        id: u32,
        /// KVM's error.
        #[source]
        source: VcpuError,
    },
    /// KVM refused to hand over part of the state.
    #[error("cannot read vCPU {id}'s state")]
    Save {
        /// The vCPU.
        id: u32,
        /// KVM's error.
        #[source]
        source: VcpuError,
    },
    /// KVM refused part of the state.
    #[error("cannot write vCPU {id}'s state")]
    Restore {
        /// The vCPU.
        id: u32,
        /// KVM's error.
        #[source]
        source: VcpuError,
    },
}

/// What saving a vCPU's state needs to know about the host.
#[derive(Debug, Clone)]
pub struct StateContext {
    /// KVM_GET_MSR_INDEX_LIST.
    pub msr_indices: Arc<Vec<u32>>,
    /// Whether KVM has KVM_CAP_NESTED_STATE.
    pub nested_state: bool,
    /// The vCPU thread's seccomp filter, installed before its first run.
    pub seccomp: crate::seccomp::Mode,
}

/// The vCPU thread's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Not running guest code; waiting for a command.
    Paused,
    /// Running guest code.
    Running,
    /// Finished; the thread ends.
    Exited,
}

/// Why a vCPU thread ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitReason {
    /// The VMM asked it to stop.
    Stopped,
    /// The guest asked for a reset through KVM.
    Reset,
    /// The guest asked for power-off through KVM.
    PowerOff,
    /// The guest crashed; `registers` is a dump of its state.
    Crashed {
        /// What happened.
        reason: String,
        /// Register dump.
        registers: String,
    },
}

/// What a vCPU thread reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// vCPU `id` entered `state`.
    State(u32, State),
    /// vCPU `id` ended for this reason.
    Exited(u32, ExitReason),
}

/// The state machine of one vCPU.
struct Machine {
    vcpu: Vcpu,
    buses: Arc<Buses>,
    state_ctx: StateContext,
    state: State,
    commands: Receiver<Command>,
    events: Sender<Event>,
    notify: EventFd,
    /// Until when a Running vCPU naps.
    nap_until: Option<Instant>,
}

impl Machine {
    fn report(&self, event: Event) {
        // The VMM may already be gone when it is tearing down; nothing to do then.
        let _ = self.events.send(event);
        let _ = self.notify.write(1);
    }

    fn enter(&mut self, state: State) {
        if self.state != state {
            // A nap belongs to one stretch of running.
            self.nap_until = None;
            self.state = state;
            self.report(Event::State(self.vcpu.id(), state));
        }
    }

    /// Applies one command; returns an exit reason if it ends the thread.
    fn apply(&mut self, cmd: Command) -> Option<ExitReason> {
        match cmd {
            Command::Resume => {
                if self.state == State::Paused {
                    // As QEMU does, once the vCPU runs again after a pause
                    // (and its state was perhaps read and written): the
                    // guest's watchdogs must not take the pause for a lockup;
                    // a guest without kvmclock has none to calm.
                    if let Err(e) = self.vcpu.note_paused() {
                        log::debug!("{e}");
                    }
                }
                self.enter(State::Running)
            }
            Command::Pause => self.enter(State::Paused),
            Command::Stop => return Some(ExitReason::Stopped),
            Command::Nap(length) => {
                if self.state == State::Running {
                    self.nap_until = Instant::now().checked_add(length);
                }
            }
            Command::Report(reply) => {
                let _ = reply.send(self.state);
            }
            Command::Save(reply) => {
                let _ = reply.send(self.save());
            }
            Command::Restore(state, reply) => {
                let id = self.vcpu.id();
                let result = if self.state == State::Paused {
                    state
                        .restore(&self.vcpu)
                        .map_err(|source| StateError::Restore { id, source })
                } else {
                    Err(StateError::NotPaused(id))
                };
                let _ = reply.send(result);
            }
        }
        None
    }

    /// The paused vCPU's complete state.
    fn save(&mut self) -> Result<VcpuState, StateError> {
        let id = self.vcpu.id();
        if self.state != State::Paused {
            return Err(StateError::NotPaused(id));
        }
        self.vcpu
            .complete_pending_io()
            .map_err(|source| StateError::PendingIo { id, source })?;
        VcpuState::save(
            &self.vcpu,
            &self.state_ctx.msr_indices,
            self.state_ctx.nested_state,
        )
        .map_err(|source| StateError::Save { id, source })
    }

    /// One step of the machine.
    fn step(&mut self) -> Option<ExitReason> {
        match self.state {
            State::Paused => match self.commands.recv() {
                Ok(cmd) => self.apply(cmd),
                Err(_) => Some(ExitReason::Stopped),
            },
            State::Running => {
                while let Ok(cmd) = self.commands.try_recv() {
                    if let Some(exit) = self.apply(cmd) {
                        return Some(exit);
                    }
                }
                if self.state != State::Running {
                    return None;
                }
                match self.nap_left() {
                    Some(left) => self.nap(left),
                    None => self.run_once(),
                }
            }
            State::Exited => Some(ExitReason::Stopped),
        }
    }

    /// What is left of the current nap, if any.
    fn nap_left(&mut self) -> Option<Duration> {
        let left = self
            .nap_until?
            .checked_duration_since(Instant::now())
            .filter(|d| !d.is_zero());
        if left.is_none() {
            self.nap_until = None;
        }
        left
    }

    /// Naps for at most `left`, ending early to serve a command.
    fn nap(&mut self, left: Duration) -> Option<ExitReason> {
        match self.commands.recv_timeout(left) {
            Ok(cmd) => self.apply(cmd),
            Err(RecvTimeoutError::Timeout) => {
                self.nap_until = None;
                None
            }
            Err(RecvTimeoutError::Disconnected) => Some(ExitReason::Stopped),
        }
    }

    fn crashed(&self, reason: String) -> Option<ExitReason> {
        Some(ExitReason::Crashed {
            reason,
            registers: self.vcpu.dump(),
        })
    }

    fn run_once(&mut self) -> Option<ExitReason> {
        let id = self.vcpu.id();
        match self.vcpu.run(self.buses.as_ref()) {
            Ok(RunOutcome::Handled | RunOutcome::Interrupted | RunOutcome::Halted) => None,
            Ok(RunOutcome::Shutdown) => {
                self.crashed(format!("vCPU {id} triple-faulted (KVM_EXIT_SHUTDOWN)"))
            }
            Ok(RunOutcome::SystemEvent(SYSTEM_EVENT_RESET)) => Some(ExitReason::Reset),
            Ok(RunOutcome::SystemEvent(SYSTEM_EVENT_SHUTDOWN)) => Some(ExitReason::PowerOff),
            Ok(RunOutcome::SystemEvent(kind)) => {
                self.crashed(format!("vCPU {id}: guest system event {kind}"))
            }
            Ok(RunOutcome::Failed(why)) => self.crashed(format!("vCPU {id}: {why}")),
            Err(e) => self.crashed(e.to_string()),
        }
    }

    fn run(mut self) {
        // Before the first command, hence before any guest code runs.
        crate::jail::confine(crate::jail::Role::Guest);
        crate::seccomp::confine(crate::seccomp::Role::Vcpu, self.state_ctx.seccomp);
        let reason = loop {
            if let Some(reason) = self.step() {
                break reason;
            }
        };
        self.state = State::Exited;
        // No command is taken from here on: senders learn it at once
        // (before the exit is reported), not by waiting for an answer.
        self.commands = std::sync::mpsc::channel().1;
        self.report(Event::Exited(self.vcpu.id(), reason));
    }
}

/// The VMM's handle on a vCPU thread.
pub struct VcpuHandle {
    id: u32,
    commands: Sender<Command>,
    kicker: Kicker,
    thread: Option<JoinHandle<()>>,
}

impl VcpuHandle {
    /// Starts the thread for `vcpu`, in the Paused state.
    pub fn spawn(
        vcpu: Vcpu,
        buses: Arc<Buses>,
        state_ctx: StateContext,
        events: Sender<Event>,
        notify: EventFd,
    ) -> std::io::Result<Self> {
        let id = vcpu.id();
        let kicker = vcpu.kicker();
        let (tx, rx) = std::sync::mpsc::channel();
        let machine = Machine {
            vcpu,
            buses,
            state_ctx,
            state: State::Paused,
            commands: rx,
            events,
            notify,
            nap_until: None,
        };
        let thread = std::thread::Builder::new()
            .name(format!("vcpu{id}"))
            .spawn(move || machine.run())?;
        Ok(Self {
            id,
            commands: tx,
            kicker,
            thread: Some(thread),
        })
    }

    /// This vCPU's index.
    pub fn id(&self) -> u32 {
        self.id
    }

    /// Sends a command and kicks the thread out of `KVM_RUN` to see it.
    /// Returns false when the thread has ended and cannot take it.
    pub fn send(&self, cmd: Command) -> bool {
        if self.commands.send(cmd).is_err() {
            return false;
        }
        if let Some(t) = &self.thread {
            if !t.is_finished() {
                if let Err(e) = self.kicker.kick(t) {
                    log::warn!("cannot kick vCPU {}: {e}", self.id);
                }
            }
        }
        true
    }

    /// Stops the thread and waits for it.
    pub fn stop_and_join(&mut self) {
        self.send(Command::Stop);
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                log::error!("vCPU {} thread panicked", self.id);
            }
        }
    }
}

impl Drop for VcpuHandle {
    fn drop(&mut self) {
        self.stop_and_join();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::sync::mpsc::channel;
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use nestvm_guests::{hello, Ending};
    use nestvm_kvm::Hypervisor;

    use crate::config::VmConfig;

    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn kvm() -> Option<Hypervisor> {
        if !std::path::Path::new("/dev/kvm").exists() {
            assert!(
                std::env::var_os("NESTVM_REQUIRE_KVM").is_none(),
                "/dev/kvm missing but NESTVM_REQUIRE_KVM is set"
            );
            eprintln!("SKIPPED: /dev/kvm is not available on this machine");
            return None;
        }
        Some(Hypervisor::open().expect("open /dev/kvm"))
    }

    fn next_event(rx: &Receiver<Event>) -> Event {
        rx.recv_timeout(Duration::from_secs(20))
            .expect("vCPU event")
    }

    /// One vCPU of a 16 MiB VM running `image`, Paused, in its thread;
    /// its reports, what its guest prints, and the directory to remove.
    fn one_vcpu(
        hv: &Hypervisor,
        tag: &str,
        image: Vec<u8>,
    ) -> (VcpuHandle, Receiver<Event>, Captured, std::path::PathBuf) {
        nestvm_kvm::kick::install().unwrap();
        let dir = std::env::temp_dir().join(format!("nestvm-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let kernel = dir.join("guest.elf");
        std::fs::write(&kernel, image).unwrap();
        let config = VmConfig {
            kernel,
            initrd: None,
            cmdline: String::new(),
            cpus: 1,
            memory: 16 << 20,
            nested: crate::config::NestedMode::Off,
            disks: vec![],
            nets: vec![],
            balloon: None,
            logs: Default::default(),
            vsock: None,
        };
        let out = Captured::default();
        let mut vm = crate::builder::build(&config, hv, false, Box::new(out.clone())).unwrap();
        let (tx, rx) = channel();
        let notify = EventFd::new(0).unwrap();
        let vcpu = vm.vcpus.remove(0);
        let handle =
            VcpuHandle::spawn(vcpu, vm.buses.clone(), vm.state_ctx.clone(), tx, notify).unwrap();
        (handle, rx, out, dir)
    }

    /// The machine starts Paused, runs only after Resume, can be paused and
    /// resumed, and reports the guest's reset as its exit.
    #[test]
    fn paused_until_resumed_then_pause_resume_and_exit() {
        let Some(hv) = kvm() else { return };
        let (mut handle, rx, out, dir) = one_vcpu(&hv, "vcpu", hello("up", Ending::HaltForever));

        // Built and paused: no guest instruction has run.
        std::thread::sleep(Duration::from_millis(200));
        assert!(out.0.lock().unwrap().is_empty());
        assert!(rx.try_recv().is_err());

        handle.send(Command::Resume);
        assert_eq!(next_event(&rx), Event::State(0, State::Running));
        let start = std::time::Instant::now();
        while out.0.lock().unwrap().as_slice() != b"up" {
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "guest never printed"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        // The guest now sits in `hlt`: a pause must still get through.
        handle.send(Command::Pause);
        assert_eq!(next_event(&rx), Event::State(0, State::Paused));
        handle.send(Command::Resume);
        assert_eq!(next_event(&rx), Event::State(0, State::Running));
        // State can be read and written only while paused.
        let (stx, srx) = channel();
        handle.send(Command::Save(stx));
        assert!(matches!(srx.recv().unwrap(), Err(StateError::NotPaused(0))));
        handle.send(Command::Pause);
        assert_eq!(next_event(&rx), Event::State(0, State::Paused));
        let (stx, srx) = channel();
        handle.send(Command::Save(stx));
        let state = srx.recv().unwrap().expect("save while paused");
        // Halted inside the tiny guest's code, in long mode with our page tables.
        assert!(
            (0x10_0000..0x10_0100).contains(&state.regs.rip),
            "{:#x}",
            state.regs.rip
        );
        assert_eq!(state.sregs.cr3, nestvm_arch::layout::PML4_START);
        assert!(!state.msrs.is_empty());
        let (rtx, rrx) = channel();
        handle.send(Command::Restore(Box::new(state), rtx));
        rrx.recv().unwrap().expect("restore while paused");
        handle.send(Command::Resume);
        assert_eq!(next_event(&rx), Event::State(0, State::Running));
        handle.stop_and_join();
        assert_eq!(next_event(&rx), Event::Exited(0, ExitReason::Stopped));
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A napping vCPU runs no guest code, yet serves a pause and a stop at
    /// once: a nap far longer than any wait here never delays either.
    #[test]
    fn a_nap_stops_the_guest_but_never_holds_up_a_pause_or_a_stop() {
        let Some(hv) = kvm() else { return };
        // Prints a dot after each pass over 1 MiB: output while it runs.
        let (mut handle, rx, out, dir) = one_vcpu(&hv, "nap", nestvm_guests::dirtier(1));
        let dots = || out.0.lock().unwrap().len();
        handle.send(Command::Resume);
        assert_eq!(next_event(&rx), Event::State(0, State::Running));
        let start = std::time::Instant::now();
        while dots() < 3 {
            assert!(start.elapsed() < Duration::from_secs(20), "no output");
            std::thread::sleep(Duration::from_millis(5));
        }
        let long = Duration::from_secs(600);
        handle.send(Command::Nap(long));
        // Commands are served in order: once this is answered, it naps.
        let (stx, srx) = channel();
        handle.send(Command::Report(stx));
        assert_eq!(
            srx.recv_timeout(Duration::from_secs(20)),
            Ok(State::Running)
        );
        let napping = dots();
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(dots(), napping, "the guest ran during its nap");
        handle.send(Command::Pause);
        assert_eq!(next_event(&rx), Event::State(0, State::Paused));
        // A pause ends the nap: resumed, the guest runs again.
        handle.send(Command::Resume);
        assert_eq!(next_event(&rx), Event::State(0, State::Running));
        let start = std::time::Instant::now();
        while dots() < napping + 3 {
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "it stayed asleep"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        handle.send(Command::Nap(long));
        handle.stop_and_join();
        assert_eq!(next_event(&rx), Event::Exited(0, ExitReason::Stopped));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
