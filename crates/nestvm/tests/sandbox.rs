//! The VMM's seccomp filters, seen from outside: every thread of a running
//! VM's VMM is confined (`Seccomp: 2`) unless `--seccomp off`; a system
//! call outside a filter (the test-only `NESTVM_SECCOMP_TRIP` makes the
//! event loop call getppid, which no filter allows) stops the VMM with a
//! line in its log naming the call, and with `--seccomp log` is let
//! through while the VM runs on. (The migration thread's filter is checked
//! in migration.rs, during a capped copy.) And the jail around them: the
//! threads a guest drives open files in the VM's directory, not elsewhere,
//! unless `--landlock off`.

mod common;

use std::path::Path;
use std::time::Duration;

use common::{guest, kvm_or_skip, nestvm, run_with_timeout, threads, vmm_pid, StateEnv};
use nestvm_guests::{ticker, Ending};

const T: Duration = Duration::from_secs(60);
/// getppid(2) on x86-64.
const GETPPID: &str = "system call 110,";

fn wait_for(cond: impl FnMut() -> bool, what: &str) {
    common::wait_until(cond, T, what);
}

fn console(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("vms/t/console.log")).unwrap_or_default()
}

fn vmm_log(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("vms/t/vmm.log")).unwrap_or_default()
}

/// A two-vCPU ticking VM `t`, defined in `env`.
fn define(env: &StateEnv) {
    let k = guest(
        &format!(
            "sandbox-{}.elf",
            env.dir.file_name().unwrap().to_string_lossy()
        ),
        ticker(u32::MAX, 3000, "", Ending::PowerOff),
    );
    env.ok(&[
        "vm",
        "new",
        "t",
        "--kernel",
        k.to_str().unwrap(),
        "--memory",
        "32M",
        "--cpus",
        "2",
        "--nested",
        "off",
    ]);
}

/// `vm start t` with `extra` global flags and the environment `vars`.
fn start(env: &StateEnv, extra: &[&str], vars: &[(&str, &str)]) {
    let out = try_start(env, extra, vars);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `vm start t` as [`start`] does, whatever comes of it.
fn try_start(env: &StateEnv, extra: &[&str], vars: &[(&str, &str)]) -> std::process::Output {
    let mut cmd = nestvm();
    cmd.arg("--state-dir")
        .arg(&env.dir)
        .args(extra)
        .args(["vm", "start", "t"]);
    for (k, v) in vars {
        cmd.env(k, v);
    }
    run_with_timeout(&mut cmd, T)
}

#[test]
fn every_vmm_thread_is_confined_unless_told_otherwise() {
    if !kvm_or_skip("every_vmm_thread_is_confined_unless_told_otherwise") {
        return;
    }
    let env = StateEnv::new("sandbox-on");
    define(&env);
    start(&env, &[], &[]);
    wait_for(
        || console(&env.dir).contains(".."),
        "the guest never ticked",
    );
    let all = threads(vmm_pid(&env.dir, "t"));
    for name in ["vcpu0", "vcpu1", "api"] {
        assert!(all.iter().any(|(n, _)| n == name), "{all:?}");
    }
    assert!(all.iter().all(|(_, confined)| *confined), "{all:?}");
    // The VM works under them: the API answers, the guest pauses and
    // goes on, and it is saved and resumed.
    env.ok(&["vm", "pause", "t"]);
    env.ok(&["vm", "resume", "t"]);
    env.ok(&["vm", "save", "t"]);
    env.ok(&["vm", "start", "t"]);
    let now = console(&env.dir).matches('.').count();
    wait_for(
        || console(&env.dir).matches('.').count() > now + 5,
        "the resumed guest does not tick",
    );
    assert!(threads(vmm_pid(&env.dir, "t")).iter().all(|(_, c)| *c));
    env.ok(&["vm", "kill", "t"]);

    let off = StateEnv::new("sandbox-off");
    define(&off);
    start(&off, &["--seccomp", "off"], &[]);
    wait_for(
        || console(&off.dir).contains(".."),
        "the guest never ticked",
    );
    let all = threads(vmm_pid(&off.dir, "t"));
    assert!(all.iter().all(|(_, confined)| !confined), "{all:?}");
    off.ok(&["vm", "kill", "t"]);
}

#[test]
fn a_call_outside_the_filter_stops_the_vmm_and_says_which() {
    if !kvm_or_skip("a_call_outside_the_filter_stops_the_vmm_and_says_which") {
        return;
    }
    let env = StateEnv::new("sandbox-trip");
    define(&env);
    // The call comes as the VM is about to run: `vm start` says so.
    let out = try_start(&env, &[], &[("NESTVM_SECCOMP_TRIP", "1")]);
    let said = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "{said}");
    assert!(
        said.contains("exit status: 159") && said.contains(GETPPID),
        "{said}"
    );
    assert_eq!(env.state("t"), "Off");
    let log = vmm_log(&env.dir);
    assert!(
        log.contains("nestvm: seccomp: a VMM thread made system call") && log.contains(GETPPID),
        "{log}"
    );

    // Logged instead: the same call goes through and the VM runs on.
    let logged = StateEnv::new("sandbox-log");
    define(&logged);
    start(
        &logged,
        &["--seccomp", "log"],
        &[("NESTVM_SECCOMP_TRIP", "1")],
    );
    wait_for(
        || console(&logged.dir).contains(".."),
        "the guest never ticked",
    );
    assert_eq!(logged.state("t"), "Running");
    assert!(!vmm_log(&logged.dir).contains("seccomp:"));
    assert!(threads(vmm_pid(&logged.dir, "t")).iter().all(|(_, c)| *c));
    logged.ok(&["vm", "kill", "t"]);

    // A mode that is not one is a usage error.
    let out = run_with_timeout(
        nestvm().args(["--seccomp", "maybe", "status"]),
        Duration::from_secs(30),
    );
    assert_eq!(out.status.code(), Some(2));
}

/// The test-only `NESTVM_JAIL_PROBE` makes the event loop, once in its
/// Landlock ruleset, open a file and say in vmm.log whether it could.
#[test]
fn the_threads_a_guest_drives_reach_only_the_vms_directory_and_disks() {
    if !kvm_or_skip("the_threads_a_guest_drives_reach_only_the_vms_directory_and_disks") {
        return;
    }
    let secret = common::scratch("sandbox-secret").join("host-file");
    std::fs::write(&secret, b"not the guest's").unwrap();
    let probe = |env: &StateEnv, extra: &[&str], path: &Path| -> String {
        define(env);
        start(env, extra, &[("NESTVM_JAIL_PROBE", path.to_str().unwrap())]);
        wait_for(
            || vmm_log(&env.dir).contains("jail probe:"),
            "no probe line",
        );
        env.ok(&["vm", "kill", "t"]);
        let log = vmm_log(&env.dir);
        let line = log.lines().find(|l| l.contains("jail probe:")).unwrap();
        line.to_owned()
    };
    let jailed = StateEnv::new("jail-on");
    let said = probe(&jailed, &[], &secret);
    if said.contains("opened") && vmm_log(&jailed.dir).contains("has no Landlock") {
        eprintln!("SKIPPED: this kernel has no Landlock");
        return;
    }
    assert!(said.contains("refused (Permission denied"), "{said}");
    // Its own directory it reaches (its own files: the definition stays
    // root's where the VMM gave up root; a relative path is from the VM's
    // directory, where the VMM works).
    let own = StateEnv::new("jail-own");
    assert!(probe(&own, &[], Path::new("console.log")).contains("opened"));
    // --landlock off: the VMM's user's rights.
    let off = StateEnv::new("jail-off");
    assert!(probe(&off, &["--landlock", "off"], &secret).contains("opened"));
}
