//! Managed VMs with tiny guests on this machine's /dev/kvm: start detached,
//! the true state in list/show, the console, pause/resume, stop, kill, a
//! VMM killed behind our back, and two commands at once.

mod common;

use std::path::PathBuf;
use std::process::Output;
use std::time::{Duration, Instant};

use common::{freeze, guest, kvm_or_skip, nestvm, sigkill, vmm_pid, StateEnv};
use nestvm_guests::{hello, ticker, Ending};

const T: Duration = Duration::from_secs(60);

/// A state directory for managed tiny guests.
struct Env {
    env: StateEnv,
    dir: PathBuf,
}

impl Env {
    fn new(tag: &str) -> Self {
        let env = StateEnv::new(&format!("life-{tag}"));
        Self {
            dir: env.dir.clone(),
            env,
        }
    }

    fn run(&self, args: &[&str]) -> Output {
        self.env.run(args)
    }

    fn ok(&self, args: &[&str]) -> String {
        self.env.ok(args)
    }

    fn state(&self, name: &str) -> String {
        self.env.state(name)
    }

    fn new_vm(&self, name: &str, image: Vec<u8>) {
        let k = guest(
            &format!(
                "life-{name}-{}.elf",
                self.dir.file_name().unwrap().to_string_lossy()
            ),
            image,
        );
        self.ok(&[
            "vm",
            "new",
            name,
            "--kernel",
            k.to_str().unwrap(),
            "--memory",
            "16M",
            "--nested",
            "off",
        ]);
    }

    fn wait_state(&self, name: &str, want: &str) {
        let start = Instant::now();
        while self.state(name) != want {
            assert!(start.elapsed() < T, "VM {name} never became {want}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Runs `nestvm ARGS` (a save or checkpoint of VM `name`) and kills the
    /// VM's VMM with SIGKILL as soon as `staged/memory` appears, i.e. in the
    /// middle of writing it. Returns what the command said.
    fn kill_vmm_while(&self, name: &str, args: &[&str], staged: &std::path::Path) -> Output {
        let pid = vmm_pid(&self.dir, name);
        let cmd = nestvm()
            .arg("--state-dir")
            .arg(&self.dir)
            .args(args)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let start = Instant::now();
        while !staged.join("memory").exists() {
            assert!(start.elapsed() < T, "{args:?} never started writing");
            std::thread::sleep(Duration::from_millis(2));
        }
        // Frozen, the VMM cannot finish behind the check: the kill lands
        // in the middle of the write, or the test says it could not.
        freeze(pid);
        assert!(
            staged.join("memory").exists() && !staged.with_extension("").exists(),
            "{args:?} finished before the VMM could be stopped mid-write"
        );
        sigkill(pid);
        cmd.wait_with_output().unwrap()
    }

    fn console_log(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.join("vms").join(name).join("console.log"))
            .unwrap_or_default()
    }
}

#[test]
fn start_list_console_pause_resume_stop_rm() {
    if !kvm_or_skip("start_list_console_pause_resume_stop_rm") {
        return;
    }
    let e = Env::new("main");
    // Ticks forever (well, for a very long time) at a visible pace.
    e.new_vm("t", ticker(u32::MAX, 2000, "never", Ending::Reset));
    assert_eq!(e.state("t"), "Off");
    assert!(e.ok(&["vm", "start", "t"]).contains("started VM 't'"));
    assert!(e.ok(&["vm", "list"]).contains("Running"));
    // The console shows what the guest printed, then detaches at end of input.
    let out = e.run(&["vm", "console", "t"]);
    assert_eq!(out.status.code(), Some(0));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("..."),
        "console replays output"
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("detached"));
    // Paused: no guest output for a while. Resumed: output again.
    assert!(e.ok(&["vm", "pause", "t"]).contains("Paused"));
    assert_eq!(e.state("t"), "Paused");
    let frozen = e.console_log("t").len();
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        e.console_log("t").len(),
        frozen,
        "a paused guest prints nothing"
    );
    assert!(e.ok(&["vm", "resume", "t"]).contains("Running"));
    let start = Instant::now();
    while e.console_log("t").len() == frozen {
        assert!(start.elapsed() < T, "the guest never ran again");
        std::thread::sleep(Duration::from_millis(20));
    }
    // Re-attaching shows output produced while detached.
    let again = e.run(&["vm", "console", "t"]);
    assert!(String::from_utf8_lossy(&again.stdout).len() >= 3);
    // The tiny guest has no ACPI, so the power button is ignored: hard stop after the timeout.
    let out = e.ok(&["vm", "stop", "t", "--timeout", "1"]);
    assert!(out.contains("hard stop"), "{out}");
    assert_eq!(e.state("t"), "Off");
    assert!(
        e.ok(&["vm", "show", "t"]).contains("ended: Killed"),
        "last log lines are shown"
    );
    e.ok(&["vm", "rm", "t"]);
}

/// A vCPU state round trip (SIGUSR1) of a VM the API paused leaves it
/// paused: it prints nothing more, says Paused, and saves.
#[test]
fn a_state_round_trip_keeps_a_paused_vm_paused() {
    if !kvm_or_skip("a_state_round_trip_keeps_a_paused_vm_paused") {
        return;
    }
    let e = Env::new("rtpause");
    e.new_vm("p", ticker(u32::MAX, 2000, "never", Ending::Reset));
    e.ok(&["vm", "start", "p"]);
    let start = Instant::now();
    while e.console_log("p").is_empty() {
        assert!(start.elapsed() < T, "the ticker never ticked");
        std::thread::sleep(Duration::from_millis(10));
    }
    e.ok(&["vm", "pause", "p"]);
    let frozen = e.console_log("p").len();
    let log = e.dir.join("vms/p/vmm.log");
    let trips = || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .matches("vCPU state round trip: vCPU 0")
            .count()
    };
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(vmm_pid(&e.dir, "p")),
        nix::sys::signal::Signal::SIGUSR1,
    )
    .unwrap();
    while trips() == 0 {
        assert!(start.elapsed() < T, "no round trip reported");
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(e.state("p"), "Paused");
    // Another API request is served after the round trip: had the vCPUs
    // been resumed, the guest would have printed by the time the save
    // below has paused it again.
    assert!(e.ok(&["vm", "save", "p"]).contains("saved VM 'p'"));
    assert_eq!(
        e.console_log("p").len(),
        frozen,
        "a paused guest prints nothing"
    );
    e.ok(&["vm", "discard-saved", "p"]);
}

/// A checkpoint request with a missing, bad or taken name is refused
/// before the VM is paused (it was a 500 after a pause and a capture).
#[test]
fn a_bad_checkpoint_name_is_refused_before_the_vm_is_paused() {
    if !kvm_or_skip("a_bad_checkpoint_name_is_refused_before_the_vm_is_paused") {
        return;
    }
    let e = Env::new("ckname");
    e.new_vm("n", ticker(u32::MAX, 2000, "never", Ending::Reset));
    e.ok(&["vm", "start", "n"]);
    e.ok(&["vm", "checkpoint", "n", "--name", "a"]);
    let control = e.dir.join("vms/n/control.sock");
    let put = |q: &str| {
        let path = format!("/v1/vm/checkpoint{q}");
        nestvm_vmm::api::call(&control, "PUT", &path, T).unwrap()
    };
    for (q, want, says) in [
        ("", 400, "no checkpoint name"),
        ("?name=", 400, "invalid checkpoint name"),
        ("?name=../x", 400, "invalid checkpoint name"),
        ("?name=a", 409, "exists"),
        ("?name=b&parent=nope", 404, "no checkpoint named 'nope'"),
        ("?name=b&parent=%F0%AD", 400, "invalid parent"),
    ] {
        let (status, body) = put(q);
        assert_eq!(status, want, "{q}: {body}");
        assert!(
            body["error"].as_str().unwrap().contains(says),
            "{q}: {body}"
        );
        assert_eq!(e.state("n"), "Running", "{q}: never paused");
    }
    e.ok(&["vm", "kill", "n"]);
}

#[test]
fn a_guest_that_powers_off_leaves_the_vm_off() {
    if !kvm_or_skip("a_guest_that_powers_off_leaves_the_vm_off") {
        return;
    }
    let e = Env::new("poweroff");
    e.new_vm("p", hello("bye", Ending::PowerOff));
    let out = e.run(&["vm", "start", "p"]);
    // It may power off before `start` sees it up; either way it ends Off.
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() || text.contains("failed to start"),
        "{text}"
    );
    e.wait_state("p", "Off");
    assert!(e.console_log("p").contains("bye"));
    assert!(e.ok(&["vm", "show", "p"]).contains("PowerOff"));
}

#[test]
fn a_killed_vmm_shows_off_with_its_log_and_can_start_again() {
    if !kvm_or_skip("a_killed_vmm_shows_off_with_its_log_and_can_start_again") {
        return;
    }
    let e = Env::new("killed");
    e.new_vm("k", hello("up", Ending::HaltForever));
    e.ok(&["vm", "start", "k"]);
    let pid = vmm_pid(&e.dir, "k");
    sigkill(pid);
    e.wait_state("k", "Off");
    let show = e.ok(&["vm", "show", "k"]);
    assert!(
        show.contains("last VMM log lines") && show.contains("running (pid"),
        "{show}"
    );
    // Stale sockets do not stop a new start.
    e.ok(&["vm", "start", "k"]);
    assert_eq!(e.state("k"), "Running");
    e.ok(&["vm", "kill", "k"]);
    assert_eq!(e.state("k"), "Off");
    let out = e.run(&["vm", "kill", "k"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("is not running"));
}

#[test]
fn two_starts_at_once_start_one_vmm() {
    if !kvm_or_skip("two_starts_at_once_start_one_vmm") {
        return;
    }
    let e = Env::new("race");
    e.new_vm("r", hello("up", Ending::HaltForever));
    let spawn = || {
        nestvm()
            .arg("--state-dir")
            .arg(&e.dir)
            .args(["vm", "start", "r"])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (a, b) = (spawn(), spawn());
    let (a, b) = (a.wait_with_output().unwrap(), b.wait_with_output().unwrap());
    let oks = [&a, &b].iter().filter(|o| o.status.success()).count();
    assert_eq!(oks, 1, "exactly one start wins");
    let loser = if a.status.success() { &b } else { &a };
    assert!(String::from_utf8_lossy(&loser.stderr).contains("already running"));
    // Changes are refused while it runs.
    let out = e.run(&["vm", "set", "r", "--cpus", "2"]);
    assert_eq!(out.status.code(), Some(1));
    e.ok(&["vm", "kill", "r"]);
}

#[test]
fn a_broken_definition_fails_start_with_the_reason() {
    if !kvm_or_skip("a_broken_definition_fails_start_with_the_reason") {
        return;
    }
    let e = Env::new("broken");
    let k = guest("life-broken.elf", hello("x", Ending::Reset));
    e.ok(&[
        "vm",
        "new",
        "b",
        "--kernel",
        k.to_str().unwrap(),
        "--memory",
        "16M",
        "--nested",
        "off",
    ]);
    std::fs::remove_file(&k).unwrap();
    let out = e.run(&["vm", "start", "b"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("failed to start") && err.contains("cannot read kernel"),
        "{err}"
    );
    assert_eq!(e.state("b"), "Off");
}

#[test]
fn enable_nested_stops_a_running_vm_first() {
    if !kvm_or_skip("enable_nested_stops_a_running_vm_first") {
        return;
    }
    let e = Env::new("enable-running");
    e.new_vm("n", hello("up", Ending::HaltForever));
    e.ok(&["vm", "start", "n"]);
    let out = e.ok(&[
        "vm",
        "enable-nested",
        "n",
        "--yes",
        "--keep-memory",
        "--timeout",
        "1",
    ]);
    assert!(
        out.contains("stop it") && out.contains("stopped VM 'n' (Hard)"),
        "{out}"
    );
    assert_eq!(e.state("n"), "Off");
    let v: serde_json::Value = serde_json::from_str(&e.ok(&["vm", "show", "n", "--json"])).unwrap();
    assert_eq!(v["nested"], "on");
}

#[test]
fn save_then_start_resumes_exactly_where_it_was() {
    if !kvm_or_skip("save_then_start_resumes_exactly_where_it_was") {
        return;
    }
    let e = Env::new("save");
    // A guest that prints a known number of dots then a message: if any
    // register, the stack or memory were lost in the save, the count or
    // the message would be wrong.
    const TICKS: usize = 400;
    e.new_vm(
        "s",
        ticker(TICKS as u32, 3000, "TICKER-DONE", Ending::PowerOff),
    );
    // With a user-mode adapter: the resumed VMM starts its own passt.
    e.ok(&["vm", "set", "s", "--net", "user"]);
    e.ok(&["vm", "start", "s"]);
    let start = Instant::now();
    while e.console_log("s").len() < 20 {
        assert!(start.elapsed() < T, "the ticker never ticked");
        std::thread::sleep(Duration::from_millis(10));
    }
    let out = e.ok(&["vm", "save", "s"]);
    assert!(out.contains("saved VM 's'"), "{out}");
    assert_eq!(e.state("s"), "Saved");
    let before = e.console_log("s");
    assert!(!before.contains("TICKER-DONE"), "saved mid-run: {before}");
    let saved = e.dir.join("vms/s/saved");
    assert!(saved.join("state").exists() && saved.join("memory").exists());
    // The saved state is kept by rm without --force, and set is refused.
    let rm = e.run(&["vm", "rm", "s"]);
    assert_eq!(rm.status.code(), Some(2));
    let set = e.run(&["vm", "set", "s", "--cpus", "2"]);
    assert_eq!(set.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&set.stderr).contains("saved state"));
    // Resume: the count goes on from where it was and the guest finishes.
    assert!(e.ok(&["vm", "start", "s"]).contains("resumed saved VM 's'"));
    assert!(!saved.exists(), "a resumed saved state is consumed");
    e.wait_state("s", "Off");
    let log = e.console_log("s");
    assert!(log.starts_with(&before), "the console log goes on");
    assert_eq!(log.matches('.').count(), TICKS, "{log}");
    assert!(log.ends_with("TICKER-DONE"), "{log}");
    let vmm_log = std::fs::read_to_string(e.dir.join("vms/s/vmm.log")).unwrap();
    assert!(vmm_log.contains("PowerOff"), "{vmm_log}");
    assert!(vmm_log.contains("net user0 (passt)"), "{vmm_log}");
}

#[test]
fn corrupted_or_discarded_saved_states() {
    if !kvm_or_skip("corrupted_or_discarded_saved_states") {
        return;
    }
    let e = Env::new("corrupt");
    e.new_vm("c", ticker(u32::MAX, 3000, "never", Ending::Reset));
    e.ok(&["vm", "start", "c"]);
    std::thread::sleep(Duration::from_millis(200));
    e.ok(&["vm", "save", "c"]);
    // One flipped byte in the state: refused by its checksum, and kept.
    let state = e.dir.join("vms/c/saved/state");
    let mut bytes = std::fs::read(&state).unwrap();
    let last = bytes.len() - 10;
    bytes[last] ^= 0x01;
    std::fs::write(&state, &bytes).unwrap();
    let out = e.run(&["vm", "start", "c"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_ne!(out.status.code(), Some(0));
    assert!(err.contains("corrupted (checksum mismatch)"), "{err}");
    assert_eq!(e.state("c"), "Saved", "the saved state is kept");
    // Discarded: the VM starts fresh.
    assert!(e.ok(&["vm", "discard-saved", "c"]).contains("discarded"));
    assert_eq!(e.state("c"), "Off");
    assert_eq!(e.run(&["vm", "discard-saved", "c"]).status.code(), Some(2));
    e.ok(&["vm", "start", "c"]);
    assert!(e.ok(&["vm", "kill", "c"]).contains("c"));
    // Saving needs a running VM.
    assert_eq!(e.run(&["vm", "save", "c"]).status.code(), Some(2));
}

#[test]
fn a_vmm_killed_mid_save_leaves_no_half_saved_state() {
    if !kvm_or_skip("a_vmm_killed_mid_save_leaves_no_half_saved_state") {
        return;
    }
    let e = Env::new("killsave");
    // 4 GiB: the save scans every page, which takes long enough to kill it.
    let k = guest("killsave.elf", hello("up", Ending::HaltForever));
    e.ok(&[
        "vm",
        "new",
        "k",
        "--kernel",
        k.to_str().unwrap(),
        "--memory",
        "4G",
        "--nested",
        "off",
    ]);
    e.ok(&["vm", "start", "k"]);
    // Kill the VMM once the save has begun writing.
    let staged = e.dir.join("vms/k/saved.tmp");
    let out = e.kill_vmm_while("k", &["vm", "save", "k"], &staged);
    assert_ne!(out.status.code(), Some(0), "the save cannot have succeeded");
    // Nothing half-written is taken for a saved state: the VM is Off.
    assert!(!e.dir.join("vms/k/saved").exists());
    e.wait_state("k", "Off");
    // It starts fresh, and the next save completes (clearing the leftovers).
    assert!(e.ok(&["vm", "start", "k"]).contains("started VM 'k'"));
    assert!(e.ok(&["vm", "save", "k"]).contains("saved VM 'k'"));
    assert!(!staged.exists());
    assert_eq!(e.state("k"), "Saved");
    e.ok(&["vm", "discard-saved", "k"]);
}

#[test]
fn checkpoints_go_back_in_time_and_survive_removing_their_parent() {
    if !kvm_or_skip("checkpoints_go_back_in_time_and_survive_removing_their_parent") {
        return;
    }
    let e = Env::new("ckpt");
    const TICKS: usize = 300;
    e.new_vm(
        "t",
        ticker(TICKS as u32, 3000, "TICKER-DONE", Ending::PowerOff),
    );
    let dots = |e: &Env| e.console_log("t").matches('.').count();
    let wait_dots = |e: &Env, n: usize| {
        let start = Instant::now();
        while dots(e) < n {
            assert!(start.elapsed() < T, "the ticker stalled below {n}");
            std::thread::sleep(Duration::from_millis(5));
        }
    };
    // A checkpoint taken while paused, so we know the exact count in it.
    let take = |e: &Env, args: &[&str]| -> usize {
        e.ok(&["vm", "pause", "t"]);
        let n = dots(e);
        let mut a = vec!["vm", "checkpoint", "t"];
        a.extend_from_slice(args);
        assert!(e.ok(&a).contains("took checkpoint"));
        e.ok(&["vm", "resume", "t"]);
        n
    };
    e.ok(&["vm", "start", "t"]);
    wait_dots(&e, 30);
    let at_a = take(&e, &["--name", "a"]);
    wait_dots(&e, at_a + 60);
    let at_1 = take(&e, &[]);
    assert!(at_1 > at_a);
    let tree = e.ok(&["vm", "checkpoints", "t"]);
    assert!(tree.starts_with("a  ("), "{tree}");
    assert!(tree.contains("\n  checkpoint-1  <- current"), "{tree}");
    let v = e.env.json(&["vm", "checkpoints", "t"]);
    assert_eq!(v["checkpoints"][1]["parent"], "a");
    // Restore a (the VM, paused so the log stands still, is stopped first):
    // the count goes back to a, then on to the end.
    e.ok(&["vm", "pause", "t"]);
    let before = e.console_log("t").len();
    assert!(e
        .ok(&["vm", "restore", "t", "a"])
        .contains("restored checkpoint of VM 't'"));
    e.wait_state("t", "Off");
    let after = e.console_log("t")[before..].to_owned();
    assert_eq!(after.matches('.').count(), TICKS - at_a, "{after}");
    assert!(after.ends_with("TICKER-DONE"), "{after}");
    // Remove a: checkpoint-1 takes its pages and stands alone, still whole.
    e.ok(&["vm", "checkpoint", "rm", "t", "a"]);
    let v = e.env.json(&["vm", "checkpoints", "t"]);
    assert_eq!(v["checkpoints"].as_array().unwrap().len(), 1);
    assert!(v["checkpoints"][0]["parent"].is_null());
    let before = e.console_log("t").len();
    e.ok(&["vm", "restore", "t", "checkpoint-1"]);
    e.wait_state("t", "Off");
    let after = e.console_log("t")[before..].to_owned();
    assert_eq!(after.matches('.').count(), TICKS - at_1, "{after}");
    assert!(after.ends_with("TICKER-DONE"), "{after}");
    // Checkpoints of a VM that is not running, and unknown names, are refused.
    assert_eq!(e.run(&["vm", "checkpoint", "t"]).status.code(), Some(2));
    assert_eq!(
        e.run(&["vm", "restore", "t", "nope"]).status.code(),
        Some(2)
    );
    assert_eq!(
        e.run(&["vm", "checkpoint", "rm", "t", "nope"])
            .status
            .code(),
        Some(2)
    );
    assert_eq!(
        e.run(&["vm", "rm", "t"]).status.code(),
        Some(2),
        "checkpoints need --force"
    );
    e.ok(&["vm", "rm", "t", "--force"]);
}

#[test]
fn a_vmm_killed_mid_checkpoint_leaves_earlier_checkpoints_whole() {
    if !kvm_or_skip("a_vmm_killed_mid_checkpoint_leaves_earlier_checkpoints_whole") {
        return;
    }
    let e = Env::new("killckpt");
    let k = guest("killckpt.elf", hello("up", Ending::HaltForever));
    e.ok(&[
        "vm",
        "new",
        "k",
        "--kernel",
        k.to_str().unwrap(),
        "--memory",
        "2G",
        "--nested",
        "off",
    ]);
    e.ok(&["vm", "start", "k"]);
    e.ok(&["vm", "checkpoint", "k", "--name", "a"]);
    let staged = e.dir.join("vms/k/checkpoints/b.tmp");
    let out = e.kill_vmm_while("k", &["vm", "checkpoint", "k", "--name", "b"], &staged);
    assert_ne!(out.status.code(), Some(0));
    e.wait_state("k", "Off");
    // Only a is there, whole: it restores, and b can be taken again.
    let v = e.env.json(&["vm", "checkpoints", "k"]);
    let names: Vec<_> = v["checkpoints"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].clone())
        .collect();
    assert_eq!(names, vec![serde_json::json!("a")]);
    assert!(e
        .ok(&["vm", "restore", "k", "a"])
        .contains("restored checkpoint"));
    assert_eq!(e.state("k"), "Running");
    e.ok(&["vm", "checkpoint", "k", "--name", "b"]);
    assert!(!staged.exists());
    e.ok(&["vm", "kill", "k"]);
}

#[test]
fn a_saved_vm_using_cpu_features_this_host_lacks_is_refused() {
    if !kvm_or_skip("a_saved_vm_using_cpu_features_this_host_lacks_is_refused") {
        return;
    }
    let e = Env::new("cpufeat");
    e.new_vm("f", ticker(u32::MAX, 3000, "never", Ending::Reset));
    e.ok(&["vm", "start", "f"]);
    e.ok(&["vm", "save", "f"]);
    // Give the saved guest a CPU feature no x86 host has (CPUID 7.0 EDX
    // bit 0 is reserved), with a valid checksum: only the CPU check can
    // refuse it.
    let path = e.dir.join("vms/f/saved/state");
    let bytes = std::fs::read(&path).unwrap();
    let payload = nestvm_snapshot::container::decode(&path, &bytes).unwrap();
    let mut state: serde_json::Value = serde_json::from_slice(payload).unwrap();
    // kvm-bindings serializes each kvm_cpuid_entry2 as its 40 bytes:
    // function, index, flags, eax, ebx, ecx, edx (u32 each), padding.
    let mut changed = 0;
    for entry in state["cpuid"][0].as_array_mut().unwrap() {
        let b = entry.as_array_mut().unwrap();
        let word = |b: &[serde_json::Value], at: usize| {
            (0..4).fold(0u32, |w, i| {
                w | (b[at + i].as_u64().unwrap() as u32) << (8 * i)
            })
        };
        if word(b, 0) == 7 && word(b, 4) == 0 {
            b[24] = (b[24].as_u64().unwrap() | 1).into();
            changed += 1;
        }
    }
    assert_eq!(changed, 1, "leaf 7.0 found");
    let payload = serde_json::to_vec(&state).unwrap();
    std::fs::write(&path, nestvm_snapshot::container::encode(&payload)).unwrap();
    let out = e.run(&["vm", "start", "f"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_ne!(out.status.code(), Some(0));
    assert!(
        err.contains("CPU features are not all available here"),
        "{err}"
    );
    assert!(err.contains("CPUID 0x7.0 edx bits 0x1"), "{err}");
    assert_eq!(e.state("f"), "Saved", "the saved state is kept");
    e.ok(&["vm", "discard-saved", "f"]);
}

/// A saved state is checked as a new VM's definition would be: no vCPU,
/// more devices than the machine has lines for, or a state that
/// contradicts its own definition is refused (the VMM does not panic or
/// run a VM without vCPUs), and the saved state is kept.
#[test]
fn a_saved_state_with_an_impossible_definition_is_refused() {
    if !kvm_or_skip("a_saved_state_with_an_impossible_definition_is_refused") {
        return;
    }
    let e = Env::new("baddef");
    e.new_vm("d", ticker(u32::MAX, 3000, "never", Ending::Reset));
    e.ok(&["vm", "start", "d"]);
    e.ok(&["vm", "save", "d"]);
    let path = e.dir.join("vms/d/saved/state");
    let original = std::fs::read(&path).unwrap();
    let payload = nestvm_snapshot::container::decode(&path, &original).unwrap();
    let state: serde_json::Value = serde_json::from_slice(payload).unwrap();
    type Tamper = fn(&mut serde_json::Value);
    let cases: [(&str, Tamper, &str); 3] = [
        (
            "no vCPU",
            |s| s["config"]["cpus"] = 0.into(),
            "definition is refused",
        ),
        (
            "17 disks",
            |s| {
                let disk = serde_json::json!({"path": "/dev/null", "readonly": true});
                s["config"]["disks"] = vec![disk; 17].into();
            },
            "definition is refused",
        ),
        (
            "two vCPUs' worth of state for one",
            |s| {
                let v = s["vcpus"][0].clone();
                s["vcpus"].as_array_mut().unwrap().push(v);
            },
            "does not match its own definition",
        ),
    ];
    for (what, tamper, says) in cases {
        let mut bad = state.clone();
        tamper(&mut bad);
        let bytes = nestvm_snapshot::container::encode(&serde_json::to_vec(&bad).unwrap());
        std::fs::write(&path, bytes).unwrap();
        let out = e.run(&["vm", "start", "d"]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{what}: {err}");
        assert!(err.contains(says), "{what}: {err}");
        assert!(!err.contains("panicked"), "{what}: {err}");
        assert_eq!(e.state("d"), "Saved", "{what}: the saved state is kept");
    }
    std::fs::write(&path, &original).unwrap();
    e.ok(&["vm", "start", "d"]);
    e.ok(&["vm", "kill", "d"]);
}

#[test]
fn restoring_a_checkpoint_puts_its_writable_disks_back() {
    if !kvm_or_skip("restoring_a_checkpoint_puts_its_writable_disks_back") {
        return;
    }
    let e = Env::new("ckptdisk");
    let disk = e.dir.with_extension("disk.img");
    let ro = e.dir.with_extension("ro.img");
    std::fs::write(&disk, vec![b'A'; 1 << 20]).unwrap();
    std::fs::write(&ro, vec![b'R'; 4096]).unwrap();
    let k = guest("ckptdisk.elf", hello("up", Ending::HaltForever));
    e.ok(&[
        "vm",
        "new",
        "d",
        "--kernel",
        k.to_str().unwrap(),
        "--memory",
        "16M",
        "--nested",
        "off",
        "--disk",
        &format!("path={}", disk.display()),
        "--disk",
        &format!("path={},readonly=on", ro.display()),
    ]);
    e.ok(&["vm", "start", "d"]);
    e.ok(&["vm", "checkpoint", "d", "--name", "a"]);
    // After the checkpoint the disk changes (as guest writes would change it).
    std::fs::write(&disk, vec![b'B'; 1 << 20]).unwrap();
    e.ok(&["vm", "checkpoint", "d", "--name", "b"]);
    std::fs::write(&disk, vec![b'C'; 1 << 20]).unwrap();
    // Removing a folds it into b, disk copy included; restoring b brings B back.
    e.ok(&["vm", "checkpoint", "rm", "d", "a"]);
    e.ok(&["vm", "restore", "d", "b"]);
    assert!(std::fs::read(&disk).unwrap().iter().all(|&c| c == b'B'));
    assert!(
        std::fs::read(&ro).unwrap().iter().all(|&c| c == b'R'),
        "read-only disks are not copied"
    );
    e.ok(&["vm", "kill", "d"]);
    e.ok(&["vm", "rm", "d", "--force"]);
}
