//! Boots L1 under QEMU TCG with an emulated AMD-V CPU, runs a scenario script
//! inside it, and reports each `check` the script made.
//!
//! The recipe (from LAB-NOTES.md): `qemu-system-x86_64 -accel tcg -cpu
//! EPYC,+svm -m ... -kernel vmlinuz -initrd l1.cpio`, serial console on
//! stdout. L1's serial log is written to `target/lab/logs/NAME.log` and kept.

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{channel, RecvTimeoutError};
use std::time::{Duration, Instant};

use crate::host::QEMU;
use crate::image::{with_scenario, L1Image};
use crate::watchdog::{Monitor, LOOKS, SILENCE};
use crate::{io_err, say, work_dir, LabError};

/// One lab run: a script for L1 and how to boot L1.
#[derive(Debug, Clone)]
pub struct Scenario {
    /// Name, used for files and messages.
    pub name: String,
    /// Shell script run by L1's init (with /lab/lib.sh loaded).
    pub script: String,
    /// How long the whole L1 run may take.
    pub timeout: Duration,
    /// kvm-amd's `nested` parameter in L1.
    pub l1_nested: bool,
    /// L1's CPUs.
    pub cpus: u32,
    /// L1's memory in MiB.
    pub memory_mib: u32,
    /// Extra files for L1: (path from the image's root, contents), each
    /// executable (e.g. "lab/disk.img", or a host program and its libraries).
    pub files: Vec<(String, Vec<u8>)>,
    /// A raw disk image for L1 (its `/dev/vda`, virtio-blk on PCI), used
    /// copy-on-write so that the file itself is never changed.
    pub drive: Option<PathBuf>,
}

impl Scenario {
    /// A scenario with the usual L1: 1 CPU, 3 GiB, nested=1.
    ///
    /// One CPU, as in LAB-NOTES' recipe. With two, QEMU 7.2's emulated
    /// AMD-V intermittently hung in either TCG mode: with a thread per CPU
    /// both L1 CPUs went silent as an L2 started (not even a `timeout` in
    /// L1 fired; before that, RCU stalls and an L2 that died just after its
    /// restore); with both CPUs in one thread, L2 deadlocked on a spinlock
    /// inside an interrupt handler (the [`crate::watchdog`]'s register dump,
    /// read against the kernel's symbols). L2 guests with several vCPUs
    /// still work: they are threads in L1. Scenarios that need L2's vCPU
    /// caught in guest mode keep L2's console quiet meanwhile and retry
    /// until they observe it.
    pub fn new(name: &str, script: &str, timeout: Duration) -> Self {
        Self {
            name: name.to_owned(),
            script: script.to_owned(),
            timeout,
            l1_nested: true,
            cpus: 1,
            memory_mib: 3072,
            files: Vec::new(),
            drive: None,
        }
    }
}

/// What a scenario run found.
#[derive(Debug)]
pub struct Report {
    /// Scenario name.
    pub name: String,
    /// `(check name, passed)` in the order they were reported.
    pub checks: Vec<(String, bool)>,
    /// Whether L1's init finished the script (vs. a timeout or crash).
    pub completed: bool,
    /// The `require`d check after whose failure L1 stopped the scenario.
    pub stopped_after: Option<String>,
    /// L1's serial log.
    pub log: PathBuf,
    /// Wall time of the run.
    pub elapsed: Duration,
}

impl Report {
    /// Whether the named check was reported as passed.
    pub fn passed(&self, check: &str) -> Option<bool> {
        self.checks
            .iter()
            .rev()
            .find(|(n, _)| n == check)
            .map(|(_, p)| *p)
    }

    /// The names among `expected` that did not pass (failed or never reported),
    /// and a note if the run did not complete.
    pub fn problems(&self, expected: &[&str]) -> Vec<String> {
        let mut out = vec![];
        match &self.stopped_after {
            Some(failed) => out.push(format!(
                "scenario stopped early after {:?}: {failed} failed, and the checks after it depend on it",
                self.elapsed
            )),
            None if !self.completed => out.push(format!(
                "scenario did not complete within its timeout ({:?})",
                self.elapsed
            )),
            None => {}
        }
        // A failed check fails the run even when the caller did not list
        // it (a retried step's extra rounds, say).
        for (name, passed) in &self.checks {
            if !passed && !expected.contains(&name.as_str()) {
                out.push(format!("check {name} FAILED (an extra check)"));
            }
        }
        for name in expected {
            match (self.passed(name), &self.stopped_after) {
                (Some(true), _) => {}
                (Some(false), _) => out.push(format!("check {name} FAILED")),
                (None, Some(failed)) => {
                    out.push(format!("check {name} did not run (stopped after {failed})"))
                }
                (None, None) => out.push(format!("check {name} was never reported")),
            }
        }
        out
    }

    /// Panics with the problems and the end of L1's log unless every
    /// expected check passed and the run completed.
    pub fn assert_passed(&self, expected: &[&str]) {
        let problems = self.problems(expected);
        if problems.is_empty() {
            return;
        }
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(60).collect();
        panic!(
            "lab scenario '{}' failed:\n  {}\nlast lines of L1's serial log ({}):\n{}",
            self.name,
            problems.join("\n  "),
            self.log.display(),
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        );
    }
}

/// Kills QEMU if the run is abandoned.
struct Qemu(Child);

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Writes where L1's CPUs are into its log: L1 has been silent for
/// [`SILENCE`].
fn look_at_cpus(monitor: &Monitor, log: &mut std::fs::File, name: &str) {
    let what = match monitor.cpus() {
        Ok(text) => text,
        Err(e) => format!("(the monitor did not answer: {e})"),
    };
    say(format!(
        "scenario '{name}': L1 printed nothing for {} s; its CPUs' registers are in the log",
        SILENCE.as_secs()
    ));
    let _ = writeln!(
        log,
        "[lab watchdog] L1 printed nothing for {} s; QEMU's monitor says:",
        SILENCE.as_secs()
    );
    for line in what.lines() {
        let _ = writeln!(log, "[lab watchdog] {line}");
    }
}

/// How often L1 is looked at for a lost wakeup.
const WAKEUP_LOOKS: Duration = Duration::from_secs(5);

/// Looks at L1 every [`WAKEUP_LOOKS`] for a lost wakeup (see
/// [`crate::watchdog`]) and pokes it out of one, saying so through `tx`
/// (into the log). Stops once the flag it returns is set or QEMU's monitor
/// is gone.
fn wake_lost_wakeups(
    monitor: std::sync::Arc<Monitor>,
    tx: std::sync::mpsc::Sender<String>,
) -> std::sync::Arc<std::sync::atomic::AtomicBool> {
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let done = stop.clone();
    std::thread::spawn(move || {
        while !done.load(std::sync::atomic::Ordering::Relaxed) {
            std::thread::sleep(WAKEUP_LOOKS);
            // No monitor any more: QEMU has ended (and this thread must
            // let go of `tx`, for the loop to see L1's output end).
            let Ok(found) = monitor.lost_wakeup() else {
                break;
            };
            if let Some(vector) = found {
                let poked = monitor.poke().is_ok();
                let _ = tx.send(format!(
                    "[lab watchdog] L1's interrupt {vector} stayed pending and not taken \
                     for a second (a QEMU lost wakeup); {}",
                    if poked {
                        "a key press woke it"
                    } else {
                        "it could not be poked"
                    }
                ));
            }
        }
    });
    stop
}

/// Runs `scenario` in a fresh L1 booted from `image`.
pub fn run(image: &L1Image, scenario: &Scenario) -> Result<Report, LabError> {
    let initrd = with_scenario(image, scenario)?;
    let logs = work_dir().join("logs");
    std::fs::create_dir_all(&logs).map_err(io_err("cannot create", &logs))?;
    let log_path = logs.join(format!("{}.log", scenario.name));
    let mut log = std::fs::File::create(&log_path).map_err(io_err("cannot create", &log_path))?;
    let append = format!(
        "console=ttyS0 panic=-1 nokaslr lab.level=1 lab.nested={} lab.script=scenario",
        u8::from(scenario.l1_nested)
    );
    let monitor = std::sync::Arc::new(Monitor::new(&scenario.name));
    let mut cmd = Command::new(QEMU);
    cmd.args([
        "-accel",
        "tcg,thread=multi",
        "-cpu",
        "EPYC,+svm",
        "-machine",
        "q35",
    ])
    .args([
        "-smp",
        &scenario.cpus.to_string(),
        "-m",
        &format!("{}M", scenario.memory_mib),
    ])
    .arg("-monitor")
    .arg(monitor.qemu_arg())
    .args([
        "-nodefaults",
        "-no-reboot",
        "-display",
        "none",
        "-serial",
        "stdio",
    ])
    .arg("-kernel")
    .arg(&image.vmlinuz)
    .arg("-initrd")
    .arg(&initrd)
    .args(["-append", &append]);
    if let Some(d) = &scenario.drive {
        cmd.arg("-drive").arg(format!(
            "file={},format=raw,if=virtio,snapshot=on",
            d.display().to_string().replace(',', ",,")
        ));
    }
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    say(format!(
        "scenario '{}': booting L1 (QEMU TCG, EPYC+svm, {} CPU(s), {} MiB), timeout {:?}; log {}",
        scenario.name,
        scenario.cpus,
        scenario.memory_mib,
        scenario.timeout,
        log_path.display()
    ));
    let start = Instant::now();
    let mut child = cmd.spawn().map_err(|e| LabError::Command {
        command: QEMU.into(),
        detail: e.to_string(),
    })?;
    let stdout = child.stdout.take().expect("stdout is piped");
    let stderr = child.stderr.take().expect("stderr is piped");
    let qemu = Qemu(child);
    let (tx, rx) = channel::<String>();
    let tx2 = tx.clone();
    let waker = wake_lost_wakeups(monitor.clone(), tx.clone());
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).split(b'\n').map_while(Result::ok) {
            let _ = tx.send(
                String::from_utf8_lossy(&line)
                    .trim_end_matches('\r')
                    .to_owned(),
            );
        }
    });
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx2.send(format!("[qemu stderr] {line}"));
        }
    });

    let verbose = std::env::var_os("NESTVM_LAB_VERBOSE").is_some();
    let deadline = start + scenario.timeout;
    let mut checks = vec![];
    let mut completed = false;
    let mut stopped_after = None;
    let mut heard = Instant::now();
    let mut looks = 0;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let wait = match looks < LOOKS {
            true => left.min(SILENCE.saturating_sub(heard.elapsed())),
            false => left,
        };
        match rx.recv_timeout(wait) {
            Ok(line) => {
                heard = Instant::now();
                let _ = writeln!(log, "{line}");
                if let Some(rest) = line.strip_prefix("LAB-CHECK ") {
                    let mut parts = rest.splitn(2, ' ');
                    let verdict = parts.next().unwrap_or_default();
                    let name = parts.next().unwrap_or_default().trim().to_owned();
                    say(format!("  {verdict} {name}"));
                    checks.push((name, verdict == "PASS"));
                } else if line.starts_with("LAB-L1: done") {
                    completed = true;
                } else if let Some(failed) = line.strip_prefix("LAB-STOP L1 after ") {
                    say(format!("  STOP after {failed}"));
                    stopped_after = Some(failed.trim().to_owned());
                } else if verbose
                    || line.starts_with("LAB-L")
                    || line.starts_with("[qemu")
                    || line.starts_with("[lab")
                {
                    say(format!("  | {line}"));
                }
            }
            Err(RecvTimeoutError::Disconnected) => break,
            Err(RecvTimeoutError::Timeout) if Instant::now() < deadline => {
                looks += 1;
                heard = Instant::now();
                look_at_cpus(&monitor, &mut log, &scenario.name);
            }
            Err(RecvTimeoutError::Timeout) => {
                say(format!(
                    "scenario '{}' timed out after {:?}",
                    scenario.name, scenario.timeout
                ));
                break;
            }
        }
    }
    waker.store(true, std::sync::atomic::Ordering::Relaxed);
    drop(qemu);
    let elapsed = start.elapsed();
    say(format!(
        "scenario '{}' ended after {:.1}s",
        scenario.name,
        elapsed.as_secs_f64()
    ));
    Ok(Report {
        name: scenario.name.clone(),
        checks,
        completed,
        stopped_after,
        log: log_path,
        elapsed,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(checks: &[(&str, bool)], completed: bool, stopped: Option<&str>) -> Report {
        Report {
            name: "t".into(),
            checks: checks.iter().map(|(n, p)| (n.to_string(), *p)).collect(),
            completed,
            stopped_after: stopped.map(str::to_owned),
            log: PathBuf::from("/dev/null"),
            elapsed: Duration::from_secs(1),
        }
    }

    #[test]
    fn a_stopped_scenario_names_the_failed_requirement_and_what_did_not_run() {
        let r = report(&[("a", true), ("b", false)], false, Some("b"));
        let p = r.problems(&["a", "b", "c"]);
        assert_eq!(p.len(), 3, "{p:?}");
        assert!(
            p[0].contains("stopped early") && p[0].contains("b failed"),
            "{p:?}"
        );
        assert_eq!(p[1], "check b FAILED");
        assert_eq!(p[2], "check c did not run (stopped after b)");
    }

    #[test]
    fn a_failed_check_that_was_not_listed_is_a_problem_too() {
        let r = report(&[("a", true), ("retry-4", false)], true, None);
        assert_eq!(
            r.problems(&["a"]),
            ["check retry-4 FAILED (an extra check)"]
        );
    }

    #[test]
    fn a_complete_run_with_every_check_passed_has_no_problem() {
        let r = report(&[("a", true), ("b", true)], true, None);
        assert!(r.problems(&["a", "b"]).is_empty());
        let r = report(&[("a", true)], false, None);
        let p = r.problems(&["a", "b"]);
        assert!(p[0].contains("did not complete"), "{p:?}");
        assert_eq!(p[1], "check b was never reported");
    }
}
