//! The VM's vCPUs as one set: started together (paused), paused, resumed,
//! read and written together, stopped together. Each operation waits for
//! every vCPU's answer, within [`STATE_TIMEOUT`], and fails loudly with the
//! vCPU that did not follow, so a caller never goes on believing a VM is
//! paused (and its state consistent) when one vCPU still runs.

use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nestvm_kvm::{Vcpu, VcpuState};
use vmm_sys_util::eventfd::EventFd;

use crate::bus::Buses;
use crate::vcpu::{Command, Event, State, StateContext, StateError, VcpuHandle};

/// How long a vCPU may take to answer a pause or hand over its state.
pub const STATE_TIMEOUT: Duration = Duration::from_secs(30);

/// Errors of the vCPU set.
#[derive(Debug, thiserror::Error)]
pub enum VcpuSetError {
    /// A vCPU thread could not be started.
    #[error("cannot start the thread of vCPU {id}")]
    Spawn {
        /// The vCPU.
        id: u32,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The eventfd the threads report on could not be shared.
    #[error("cannot share the vCPU notify eventfd")]
    Notify(#[source] std::io::Error),
    /// A vCPU thread has ended and takes no command.
    #[error("vCPU {0} has stopped")]
    Gone(u32),
    /// A vCPU did not answer in time.
    #[error("vCPU {id} did not answer within {} s", STATE_TIMEOUT.as_secs())]
    NoAnswer {
        /// The vCPU.
        id: u32,
    },
    /// A vCPU answered a pause in another state.
    #[error("vCPU {id} did not pause (it is {state:?})")]
    NotPaused {
        /// The vCPU.
        id: u32,
        /// What it reported.
        state: State,
    },
    /// Reading or writing a vCPU's state failed.
    #[error(transparent)]
    State(#[from] StateError),
    /// A state to restore does not fit this VM.
    #[error("{given} vCPU states for a VM of {have} vCPUs")]
    Count {
        /// States given.
        given: usize,
        /// vCPUs here.
        have: usize,
    },
}

/// Every vCPU thread of a VM.
pub struct VcpuSet {
    handles: Vec<VcpuHandle>,
}

impl VcpuSet {
    /// Starts one thread per vCPU, each Paused; they report on `events` and
    /// write `notify` after each report.
    pub fn spawn(
        vcpus: Vec<Vcpu>,
        buses: &Arc<Buses>,
        ctx: &StateContext,
        events: &Sender<Event>,
        notify: &EventFd,
    ) -> Result<Self, VcpuSetError> {
        let mut handles = Vec::with_capacity(vcpus.len());
        for vcpu in vcpus {
            let id = vcpu.id();
            let n = notify.try_clone().map_err(VcpuSetError::Notify)?;
            let h = VcpuHandle::spawn(vcpu, buses.clone(), ctx.clone(), events.clone(), n)
                .map_err(|source| VcpuSetError::Spawn { id, source })?;
            handles.push(h);
        }
        Ok(Self { handles })
    }

    /// How many vCPUs.
    pub fn len(&self) -> usize {
        self.handles.len()
    }

    fn send_all(&self, cmd: impl Fn() -> Command) -> Result<(), VcpuSetError> {
        let mut result = Ok(());
        for h in &self.handles {
            // Every vCPU gets the command even when one is gone.
            if !h.send(cmd()) && result.is_ok() {
                result = Err(VcpuSetError::Gone(h.id()));
            }
        }
        result
    }

    /// Puts a question to `h`; its answer comes on the receiver.
    fn put<T>(
        h: &VcpuHandle,
        question: impl FnOnce(Sender<T>) -> Command,
    ) -> Result<Receiver<T>, VcpuSetError> {
        let (tx, rx) = channel();
        match h.send(question(tx)) {
            true => Ok(rx),
            false => Err(VcpuSetError::Gone(h.id())),
        }
    }

    /// Waits until `deadline` for `h`'s answer on `rx`.
    fn answer<T>(h: &VcpuHandle, rx: Receiver<T>, deadline: Instant) -> Result<T, VcpuSetError> {
        let left = deadline.saturating_duration_since(Instant::now());
        rx.recv_timeout(left).map_err(|e| match e {
            // The thread dropped the question unanswered: it has ended.
            RecvTimeoutError::Disconnected => VcpuSetError::Gone(h.id()),
            RecvTimeoutError::Timeout => VcpuSetError::NoAnswer { id: h.id() },
        })
    }

    /// Puts one question to each vCPU, in order, before waiting for any
    /// answer (so they answer in parallel), then collects the answers in
    /// order, all within [`STATE_TIMEOUT`].
    fn ask_all<T, Q>(&self, questions: impl IntoIterator<Item = Q>) -> Result<Vec<T>, VcpuSetError>
    where
        Q: FnOnce(Sender<T>) -> Command,
    {
        let deadline = Instant::now() + STATE_TIMEOUT;
        let asked: Vec<_> = self
            .handles
            .iter()
            .zip(questions)
            .map(|(h, q)| Self::put(h, q))
            .collect::<Result<_, _>>()?;
        self.handles
            .iter()
            .zip(asked)
            .map(|(h, rx)| Self::answer(h, rx, deadline))
            .collect()
    }

    /// Pauses every vCPU and waits until each confirms it is paused.
    pub fn pause(&self) -> Result<(), VcpuSetError> {
        self.send_all(|| Command::Pause)?;
        // Commands are served in order: the state reported after the Pause
        // is Paused, unless the thread ended.
        let states = self.ask_all(std::iter::repeat(Command::Report))?;
        for (h, state) in self.handles.iter().zip(states) {
            if state != State::Paused {
                return Err(VcpuSetError::NotPaused { id: h.id(), state });
            }
        }
        Ok(())
    }

    /// Resumes every vCPU.
    pub fn resume(&self) -> Result<(), VcpuSetError> {
        self.send_all(|| Command::Resume)
    }

    /// The complete state of every (paused) vCPU, in order; they are all
    /// read at once, each by its own thread.
    pub fn save(&self) -> Result<Vec<VcpuState>, VcpuSetError> {
        let answers = self.ask_all(std::iter::repeat(Command::Save))?;
        answers
            .into_iter()
            .map(|a| a.map_err(VcpuSetError::from))
            .collect()
    }

    /// Writes `states` back into the (paused) vCPUs, all at once.
    pub fn restore(&self, states: Vec<VcpuState>) -> Result<(), VcpuSetError> {
        if states.len() != self.handles.len() {
            return Err(VcpuSetError::Count {
                given: states.len(),
                have: self.handles.len(),
            });
        }
        let questions = states
            .into_iter()
            .map(|state| move |tx| Command::Restore(Box::new(state), tx));
        let answers = self.ask_all(questions)?;
        answers
            .into_iter()
            .try_for_each(|a| a.map_err(VcpuSetError::from))
    }

    /// Has every running vCPU nap for `length` (see [`Command::Nap`]);
    /// a vCPU that is gone is skipped (the loop learns of it anyway).
    pub fn nap(&self, length: Duration) {
        let _ = self.send_all(|| Command::Nap(length));
    }

    /// The vCPUs' indices, in order.
    pub fn ids(&self) -> impl Iterator<Item = u32> + '_ {
        self.handles.iter().map(VcpuHandle::id)
    }

    /// Stops every thread and waits for each.
    pub fn stop(self) {
        let _ = self.send_all(|| Command::Stop);
        for mut h in self.handles {
            h.stop_and_join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use nestvm_guests::{hello, Ending};
    use nestvm_kvm::Hypervisor;

    use crate::config::{NestedMode, VmConfig};
    use crate::vcpu::ExitReason;

    /// A vCPU whose thread has ended (its guest triple-faulted) makes a
    /// pause, a state read and a resume fail with that vCPU named, instead
    /// of the VM being taken for paused.
    #[test]
    fn a_vcpu_that_is_gone_fails_pause_save_and_resume() {
        if !std::path::Path::new("/dev/kvm").exists() {
            assert!(std::env::var_os("NESTVM_REQUIRE_KVM").is_none());
            eprintln!("SKIPPED: /dev/kvm is not available on this machine");
            return;
        }
        let hv = Hypervisor::open().unwrap();
        nestvm_kvm::kick::install().unwrap();
        let dir = std::env::temp_dir().join(format!("nestvm-vcpus-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let kernel = dir.join("fault.elf");
        std::fs::write(&kernel, hello("", Ending::TripleFault)).unwrap();
        let config = VmConfig {
            kernel,
            initrd: None,
            cmdline: String::new(),
            cpus: 1,
            memory: 16 << 20,
            nested: NestedMode::Off,
            disks: vec![],
            nets: vec![],
            balloon: None,
            logs: Default::default(),
            vsock: None,
        };
        let vm = crate::builder::build(&config, &hv, false, Box::new(std::io::sink())).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let notify = EventFd::new(0).unwrap();
        let set = VcpuSet::spawn(vm.vcpus, &vm.buses, &vm.state_ctx, &tx, &notify).unwrap();
        set.pause().expect("a live paused vCPU confirms its pause");
        set.resume().unwrap();
        let start = Instant::now();
        loop {
            let left = Duration::from_secs(20).saturating_sub(start.elapsed());
            match rx.recv_timeout(left).expect("the vCPU reports its crash") {
                Event::Exited(0, ExitReason::Crashed { .. }) => break,
                _ => continue,
            }
        }
        assert!(matches!(set.pause(), Err(VcpuSetError::Gone(0))));
        assert!(matches!(set.save(), Err(VcpuSetError::Gone(0))));
        assert!(matches!(set.resume(), Err(VcpuSetError::Gone(0))));
        set.stop();
        let _ = std::fs::remove_dir_all(&dir);
    }
}
