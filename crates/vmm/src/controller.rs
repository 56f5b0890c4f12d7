//! The controller: the one owner of a running VM — its KVM VM and memory,
//! its vCPU threads, its devices' handles, its run state and an outgoing
//! migration — with one method per thing that can be done to it. The event
//! loop ([`crate::event_loop`]) hands it API requests ([`Controller::serve`])
//! and signals; nothing else touches the VM.
//!
//! Every action that needs the VM paused goes through
//! [`Controller::while_paused`], which puts the VM back as it found it
//! (running or paused) and refuses loudly when a vCPU does not pause.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use nestvm_devices::serial::SerialPort;
use nestvm_devices::EventTrigger;
use nestvm_virtio::mmio::Inspect;
use nestvm_virtio::Memory;
use serde::Serialize;
use vmm_sys_util::eventfd::EventFd;

use crate::api::CheckpointReply;
use crate::api::MigrateRequest;
use crate::api::{ApiError, DeviceInfo, Pending, Refusal, Request, RunState, SaveReply, VmInfo};
use crate::config::VmConfig;
use crate::migration::converge::Slower;
use crate::migration::send::{HandOver, Outgoing};
use crate::migration::Progress;
use crate::outcome::{Outcome, VmOutcome};
use crate::persist::capture::{chain_text, CaptureError, SaveParts};
use crate::vcpus::{VcpuSet, VcpuSetError};

/// How long a failed migration's source waits for the destination to let
/// go of the disks it opened before giving up (and staying paused).
const RECLAIM_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

/// Where a managed VM's files go; `None` where the VM has no such place.
#[derive(Default)]
pub(crate) struct Places {
    /// Where `PUT /v1/vm/save` writes the saved VM.
    pub save_dir: Option<PathBuf>,
    /// Where `PUT /v1/vm/checkpoint` keeps checkpoints.
    pub checkpoint_root: Option<PathBuf>,
    /// Where an outgoing migration's final progress is written (JSON).
    pub migration_report: Option<PathBuf>,
    /// How the threads the controller starts (a migration's) are confined.
    pub seccomp: crate::seccomp::Mode,
}

/// The parts of a built VM the controller owns.
pub(crate) struct Parts {
    pub config: VmConfig,
    pub cpuid: Vec<Vec<nestvm_kvm::kvm_bindings::kvm_cpuid_entry2>>,
    pub nested: bool,
    pub vm: Arc<nestvm_kvm::Vm>,
    pub memory: Memory,
    pub serial: Arc<Mutex<SerialPort>>,
    pub devices: Vec<Arc<Mutex<dyn Inspect>>>,
    pub balloon: Option<nestvm_virtio::balloon::Control>,
    pub power_button: EventTrigger,
    /// The user-mode adapters' passt processes (started).
    pub passt: Vec<crate::passt::Process>,
}

/// The one owner of a running VM.
pub(crate) struct Controller {
    parts: Parts,
    vcpus: VcpuSet,
    state: RunState,
    outgoing: Option<Outgoing>,
    /// Set while the VM is handed to a migration's thread, or left so by
    /// one that committed without confirmation: its vCPUs paused, its disk
    /// locks released. `true` if it was running before.
    handed_over: Option<bool>,
    last_migration: Option<Progress>,
    places: Places,
    /// Written by the migration thread when it needs the event loop.
    wake: EventFd,
    outcome: Outcome,
    /// Slows the guest while a migration's auto-converge asks for it.
    slower: Slower,
}

fn refusal(status: u16, error: String) -> Refusal {
    Refusal {
        status,
        error,
        allow: None,
    }
}

fn failed(what: &str, e: &dyn std::error::Error) -> Refusal {
    refusal(500, format!("{what}: {}", chain_text(e)))
}

impl Controller {
    /// Takes charge of `parts` and its (paused) `vcpus`.
    pub(crate) fn new(
        parts: Parts,
        vcpus: VcpuSet,
        places: Places,
        wake: EventFd,
        outcome: Outcome,
        slower: Slower,
    ) -> Self {
        Self {
            slower,
            parts,
            vcpus,
            state: RunState::Starting,
            outgoing: None,
            handed_over: None,
            last_migration: None,
            places,
            wake,
            outcome,
        }
    }

    /// Runs the built VM, or leaves it paused.
    pub(crate) fn start(&mut self, paused: bool) -> Result<(), VcpuSetError> {
        if !paused {
            self.vcpus.resume()?;
        }
        self.state = if paused {
            RunState::Paused
        } else {
            RunState::Running
        };
        Ok(())
    }

    fn save_parts(&self) -> SaveParts<'_> {
        SaveParts {
            config: &self.parts.config,
            cpuid: &self.parts.cpuid,
            nested: self.parts.nested,
            vm: &self.parts.vm,
            memory: &self.parts.memory,
            serial: &self.parts.serial,
            virtio: &self.parts.devices,
        }
    }

    /// `GET /v1/vm`.
    pub(crate) fn info(&self) -> VmInfo {
        VmInfo {
            state: self.state,
            pid: std::process::id(),
            vcpus: self.vcpus.len() as u32,
            nested: self.parts.nested,
            devices: self.parts.devices.iter().map(device_info).collect(),
        }
    }

    /// Runs `f` with every vCPU paused, then puts the VM back as it was.
    /// A vCPU that does not pause fails the request (and the others run
    /// again); `f` never sees a half-paused VM.
    fn while_paused<T>(
        &mut self,
        f: impl FnOnce(&Self) -> Result<T, Refusal>,
    ) -> Result<T, Refusal> {
        let running = self.state != RunState::Paused;
        if running {
            self.pause_vcpus()?;
        }
        let result = f(self);
        if running {
            self.resume_vcpus()?;
        }
        result
    }

    fn pause_vcpus(&mut self) -> Result<(), Refusal> {
        self.vcpus.pause().map_err(|e| {
            // Leave no vCPU paused behind a failed request.
            if let Err(r) = self.vcpus.resume() {
                log::error!("after a failed pause, cannot resume the VM: {r}");
            }
            failed("cannot pause the VM", &e)
        })
    }

    fn resume_vcpus(&mut self) -> Result<(), Refusal> {
        self.vcpus
            .resume()
            .map_err(|e| failed("cannot resume the VM", &e))
    }

    /// `PUT /v1/vm/pause`.
    pub(crate) fn pause(&mut self) -> Result<VmInfo, Refusal> {
        if self.state != RunState::Paused {
            if self.handed_over.is_some() {
                return Err(refusal(409, "a migration of this VM is under way".into()));
            }
            self.pause_vcpus()?;
            self.state = RunState::Paused;
        }
        Ok(self.info())
    }

    /// `PUT /v1/vm/resume`. A VM a migration left unconfirmed takes its
    /// disk locks back first, and stays paused if it cannot.
    pub(crate) fn resume(&mut self) -> Result<VmInfo, Refusal> {
        if self.state != RunState::Paused {
            return Err(refusal(
                409,
                format!("the VM is not paused ({:?})", self.state),
            ));
        }
        self.take_back()?;
        self.resume_vcpus()?;
        self.state = RunState::Running;
        Ok(self.info())
    }

    /// `PUT /v1/vm/power-button`: a paused VM runs again to shut down.
    pub(crate) fn power_button(&mut self) -> Result<VmInfo, Refusal> {
        // The guest would have to run to shut down, and the destination may
        // be running it: only an explicit resume (or a kill) settles that.
        if self.handed_over.is_some() {
            return Err(refusal(
                409,
                "the VM was handed to a migration's destination, which may be running it: end this copy with kill, or resume it if it does not run there".into(),
            ));
        }
        if self.state == RunState::Paused {
            self.resume_vcpus()?;
        }
        self.parts
            .power_button
            .0
            .write(1)
            .map_err(|e| failed("cannot press the power button", &e))?;
        self.state = RunState::Stopping;
        Ok(self.info())
    }

    /// `PUT /v1/vm/kill`.
    pub(crate) fn kill(&mut self) -> VmInfo {
        self.outcome.settle(VmOutcome::Killed);
        VmInfo {
            state: RunState::Stopping,
            ..self.info()
        }
    }

    fn no_migration(&self) -> Result<(), Refusal> {
        match (&self.outgoing, self.handed_over) {
            (Some(_), _) => Err(refusal(409, "a migration of this VM is under way".into())),
            (None, Some(_)) => Err(refusal(
                409,
                "a migration committed without the destination confirming: check whether the VM runs there; then kill this copy (nestvm vm kill) or resume it (nestvm vm resume)".into(),
            )),
            (None, None) => Ok(()),
        }
    }

    /// Takes back the disk locks a migration let go of (nothing to do if
    /// none did); refused while a migration holds the VM, or while another
    /// VM (the destination, on this host) holds a lock.
    fn take_back(&mut self) -> Result<(), Refusal> {
        if self.handed_over.is_none() {
            return Ok(());
        }
        if self.outgoing.is_some() {
            return Err(refusal(
                409,
                "the VM is being handed over to a migration's destination: wait for the migration to end".into(),
            ));
        }
        crate::migration::send::reclaim_disks(&self.save_parts()).map_err(|e| {
            refusal(
                409,
                format!(
                    "{}: the destination may be running this VM; the VM stays paused here",
                    chain_text(&e)
                ),
            )
        })?;
        crate::migration::send::thaw_devices(&self.save_parts());
        self.handed_over = None;
        Ok(())
    }

    /// `PUT /v1/vm/save`: the VM is saved and ends (or, on failure, goes
    /// on as it was).
    pub(crate) fn save(&mut self) -> Result<SaveReply, Refusal> {
        self.no_migration()?;
        let Some(dir) = self.places.save_dir.clone() else {
            return Err(refusal(
                409,
                "only managed VMs can be saved (nestvm vm save NAME)".into(),
            ));
        };
        if self.state != RunState::Paused {
            self.pause_vcpus()?;
        }
        match crate::persist::capture::save_vm(&self.vcpus, &self.save_parts(), &dir) {
            Ok((summary, vcpus_in_guest_mode)) => {
                self.outcome.settle(VmOutcome::Saved);
                Ok(SaveReply {
                    saved: dir,
                    summary,
                    vcpus: self.vcpus.len(),
                    vcpus_in_guest_mode,
                })
            }
            Err(e) => {
                if self.state != RunState::Paused {
                    self.resume_vcpus()?;
                }
                Err(failed("cannot save the VM", &e))
            }
        }
    }

    /// `PUT /v1/vm/checkpoint?name=&parent=`: the request is checked before
    /// the VM is paused.
    pub(crate) fn checkpoint(
        &mut self,
        name: &str,
        parent: Option<&str>,
    ) -> Result<CheckpointReply, Refusal> {
        self.no_migration()?;
        let Some(root) = self.places.checkpoint_root.clone() else {
            return Err(refusal(
                409,
                "only managed VMs have checkpoints (nestvm vm checkpoint NAME)".into(),
            ));
        };
        crate::persist::capture::check_checkpoint(&root, name, parent)
            .map_err(|(s, e)| refusal(s, e))?;
        let (meta, vcpus_in_guest_mode) = self.while_paused(|c| {
            crate::persist::capture::checkpoint_vm(&c.vcpus, &c.save_parts(), &root, (name, parent))
                .map_err(|e: CaptureError| failed("cannot take the checkpoint", &e))
        })?;
        Ok(CheckpointReply {
            meta,
            vcpus_in_guest_mode,
        })
    }

    /// `PUT /v1/vm/migrate`: starts the sending thread.
    pub(crate) fn migrate(&mut self, req: MigrateRequest) -> Result<Progress, Refusal> {
        self.no_migration()?;
        let start = self.wake.try_clone().and_then(|wake| {
            let passt = self
                .parts
                .passt
                .iter()
                .filter_map(|p| p.stopper())
                .collect();
            let vm = (self.parts.vm.clone(), passt);
            Outgoing::begin(req, &self.save_parts(), vm, wake, self.places.seccomp)
        });
        let o = start.map_err(|e| failed("cannot start the migration", &e))?;
        if let Some(path) = &self.places.migration_report {
            let _ = std::fs::remove_file(path);
        }
        let progress = o.progress();
        self.outgoing = Some(o);
        Ok(progress)
    }

    /// `GET /v1/vm/migration`.
    pub(crate) fn migration(&self) -> Result<Progress, Refusal> {
        self.outgoing
            .as_ref()
            .map(Outgoing::progress)
            .or_else(|| self.last_migration.clone())
            .ok_or_else(|| refusal(404, "this VM has not been migrated".into()))
    }

    /// What the migration thread needs from the loop: its stop request
    /// served (the VM paused, captured and handed over, without waiting)
    /// and, once it ended, its outcome carried out and its report written.
    pub(crate) fn poll_migration(&mut self) {
        let Some(o) = &self.outgoing else { return };
        if let Some(reply) = o.stop_request() {
            let running = self.state != RunState::Paused;
            match Outgoing::hand_over(reply, &self.vcpus, &self.save_parts(), running) {
                HandOver::Handed | HandOver::Stuck => {
                    self.handed_over = Some(running);
                    self.state = RunState::Paused;
                }
                HandOver::Back => {}
            }
        }
        if self.outgoing.as_ref().is_some_and(Outgoing::finished) {
            let o = self.outgoing.take().expect("checked above");
            let o = o.join();
            let mut progress = o.progress();
            self.settle_migration(&mut progress);
            self.write_report(&progress);
            self.last_migration = Some(progress);
        }
        self.sync_slowing();
    }

    /// Slows the guest as much as the migration asks now (auto-converge;
    /// not at all without one).
    fn sync_slowing(&mut self) {
        let share = self.outgoing.as_ref().map_or(0, Outgoing::slowed);
        match self.slower.set(share) {
            Ok(false) => {}
            Ok(true) if share == 0 => log::info!("migration: the guest is no longer slowed"),
            Ok(true) => log::info!("migration: the guest is slowed by {share}% (auto-converge)"),
            Err(e) => log::warn!("migration: cannot slow the guest by {share}%: {e}"),
        }
    }

    /// The slowing timer fired: every running vCPU naps its share.
    pub(crate) fn slowing_tick(&mut self) {
        if let Some(nap) = self.slower.due() {
            if self.state == RunState::Running {
                self.vcpus.nap(nap);
            }
        }
    }

    /// Carries out an ended migration's outcome: the VM ends (it runs at
    /// the destination), comes back (the destination never ran it), or
    /// stays paused (nobody knows whether the destination runs it).
    fn settle_migration(&mut self, progress: &mut Progress) {
        use crate::migration::Phase;
        match progress.phase {
            Phase::Completed => self.outcome.settle(VmOutcome::Migrated),
            Phase::Failed => {
                let Some(running) = self.handed_over else {
                    return;
                };
                // The destination never runs the VM, but may still hold a
                // disk it opened until it notices the failure: wait for it.
                let deadline = std::time::Instant::now() + RECLAIM_WAIT;
                while let Err(r) = self.take_back() {
                    if std::time::Instant::now() < deadline {
                        std::thread::sleep(std::time::Duration::from_millis(50));
                        continue;
                    }
                    log::error!("migration failed, and {}", r.error);
                    let e = progress.error.get_or_insert_with(String::new);
                    e.push_str(&format!("; and {}", r.error));
                    return;
                }
                if running && self.resume_vcpus().is_ok() {
                    self.state = RunState::Running;
                }
            }
            // Paused, locks released, until the user settles it.
            _ => {}
        }
    }

    /// Waits for (or, with `cancel`, stops) a migration's thread, and writes
    /// its final progress to the report file.
    fn end_migration(&self, o: Outgoing, cancel: bool) -> Progress {
        let o = if cancel { o.cancel() } else { o.join() };
        let progress = o.progress();
        self.write_report(&progress);
        progress
    }

    /// Writes a migration's final progress to the report file.
    fn write_report(&self, progress: &Progress) {
        if let Some(path) = &self.places.migration_report {
            let json = serde_json::to_vec(progress).unwrap_or_default();
            if let Err(e) = nestvm_snapshot::atomic::write_file(path, &json, 0o600) {
                log::warn!("cannot write the migration report: {e}");
            }
        }
    }

    /// SIGUSR1: every vCPU's complete state read and written back, the VM
    /// left as it was (a paused VM stays paused). Returns a summary.
    pub(crate) fn round_trip(&mut self) -> Result<String, Refusal> {
        self.while_paused(|c| {
            let states = c
                .vcpus
                .save()
                .map_err(|e| failed("cannot read the vCPUs", &e))?;
            let summary: Vec<String> = c.vcpus.ids().zip(&states).map(describe).collect();
            c.vcpus
                .restore(states)
                .map_err(|e| failed("cannot write the vCPUs back", &e))?;
            Ok(summary.join("; "))
        })
    }

    /// Carries out one API request and answers it.
    pub(crate) fn serve(&mut self, pending: Pending) {
        let (request, reply) = pending.into_parts();
        let config_memory = self.parts.config.memory;
        let balloon = self.parts.balloon.as_ref();
        match request {
            Request::Info => answer(reply, 200, Ok(self.info())),
            Request::Pause => answer(reply, 200, self.pause()),
            Request::Resume => answer(reply, 200, self.resume()),
            Request::PowerButton => answer(reply, 202, self.power_button()),
            Request::Kill => answer(reply, 200, Ok(self.kill())),
            Request::Save => answer(reply, 200, self.save()),
            Request::Checkpoint { name, parent } => {
                answer(reply, 200, self.checkpoint(&name, parent.as_deref()))
            }
            Request::Migrate(req) => answer(reply, 202, self.migrate(req)),
            Request::Migration => answer(reply, 200, self.migration()),
            Request::Memory => answer(reply, 200, crate::balloon::memory(balloon, config_memory)),
            Request::Resize(_) if self.handed_over.is_some() => answer::<VmInfo>(
                reply,
                409,
                Err(refusal(409, "a migration holds the VM's state".into())),
            ),
            Request::Resize(target) => answer(
                reply,
                200,
                crate::balloon::resize(balloon, config_memory, target),
            ),
        }
    }

    /// Ends the VM: a migration still running is stopped, every vCPU thread
    /// is stopped, and each device's counters are reported.
    pub(crate) fn finish(mut self) {
        if let Some(o) = self.outgoing.take() {
            // Migrated: the thread is finishing; otherwise the VM ended under it.
            let migrated = self.outcome.is(&VmOutcome::Migrated);
            self.end_migration(o, !migrated);
        }
        self.vcpus.stop();
        // What each disk and adapter did, for the user and for scripts.
        for info in self.parts.devices.iter().map(device_info) {
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
    }
}

/// Answers `reply` with `ok` and the body, or with the refusal.
fn answer<T: Serialize>(reply: crate::api::Responder, ok: u16, result: Result<T, Refusal>) {
    match result {
        Ok(body) => reply.send(ok, &body),
        Err(r) => reply.send(r.status, &ApiError { error: r.error }),
    }
}

/// One vCPU's carried state, for the round trip's report.
fn describe((id, state): (u32, &nestvm_kvm::VcpuState)) -> String {
    match &state.nested {
        Some(n) => format!(
            "vCPU {id}: {} MSRs, nested state {} bytes ({}{})",
            state.msrs.len(),
            n.len(),
            if n.format() == 1 { "SVM" } else { "VMX" },
            if n.guest_mode() {
                ", in guest mode"
            } else {
                ""
            }
        ),
        None => format!("vCPU {id}: {} MSRs, no nested state", state.msrs.len()),
    }
}

fn device_info(dev: &Arc<Mutex<dyn Inspect>>) -> DeviceInfo {
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
