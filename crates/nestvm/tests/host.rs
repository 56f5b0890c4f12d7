//! `nestvm host check` and `--nested` on this machine, whose KVM is PVM and
//! so cannot nest: the check says NO and names PVM, `--nested on` is refused
//! before the VM is built, `--nested auto` runs with a notice. The lab tests
//! cover hosts that can nest.

mod common;

use std::time::Duration;

use common::{guest, kvm_or_skip, nestvm, run_with_timeout};
use nestvm_guests::{hello, ticker, Ending};

const T: Duration = Duration::from_secs(60);

fn is_pvm() -> bool {
    std::path::Path::new("/sys/module/kvm_pvm").exists()
}

/// The facts `nestvm --json host check` recorded on one of these machines
/// (PVM, 2026-12-01): the verdict on them is checked on any host.
const PVM_FACTS: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/pvm-host-facts.json"
);

/// `host check`, as text and JSON, on a PVM host: NO, naming PVM, with a fix.
fn assert_pvm_verdict(facts: Option<&str>) {
    let cmd = |json: bool| {
        let mut c = nestvm();
        if json {
            c.arg("--json");
        }
        c.args(["host", "check"]);
        if let Some(f) = facts {
            c.env("NESTVM_HOST_FACTS", f);
        }
        run_with_timeout(&mut c, T)
    };
    let out = cmd(false);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("Verdict: NO"), "{text}");
    assert!(
        text.contains("kvm_pvm") && text.contains("PVM-enabled"),
        "{text}"
    );
    assert!(text.contains("fix:"), "{text}");
    for row in [
        "/dev/kvm",
        "KVM module",
        "KVM_CAP_NESTED_STATE",
        "this host runs under",
        "memory available",
    ] {
        assert!(text.contains(row), "missing row {row}: {text}");
    }

    let out = cmd(true);
    assert_eq!(out.status.code(), Some(1));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("valid JSON");
    assert_eq!(v["can_nest"], false);
    assert_eq!(v["facts"]["kvm_module"], "kvm_pvm", "the facts it judged");
    let module = v["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["id"] == "kvm_module")
        .expect("kvm_module check");
    assert_eq!(module["value"], "kvm_pvm");
    assert_eq!(module["status"], "fail");
    assert!(module["fix"].as_str().unwrap().contains("VT-x/AMD-V"));
}

#[test]
fn host_check_judges_recorded_pvm_facts_on_any_host() {
    assert_pvm_verdict(Some(PVM_FACTS));
}

#[test]
fn recorded_facts_that_are_not_facts_are_a_usage_error() {
    let bad = common::scratch("facts").join("bad.json");
    std::fs::write(&bad, "{\"vendor\": 7}").unwrap();
    let out = run_with_timeout(
        nestvm()
            .args(["host", "check"])
            .env("NESTVM_HOST_FACTS", &bad),
        T,
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("NESTVM_HOST_FACTS"), "{err}");
}

#[test]
fn host_check_on_this_pvm_host_says_no_and_why() {
    if !kvm_or_skip("host_check_on_this_pvm_host_says_no_and_why") {
        return;
    }
    if !is_pvm() {
        eprintln!("SKIPPED host_check_on_this_pvm_host_says_no_and_why: this host's KVM is not PVM (the recorded-facts test covers the verdict)");
        return;
    }
    assert_pvm_verdict(None);
}

#[test]
fn nested_on_is_refused_before_boot_and_auto_runs_with_a_notice() {
    if !kvm_or_skip("nested_on_is_refused_before_boot_and_auto_runs_with_a_notice") || !is_pvm() {
        return;
    }
    let k = guest("nested.elf", hello("booted", Ending::Reset));
    let out = run_with_timeout(
        nestvm()
            .args(["run", "--nested", "on", "--memory", "16M", "--kernel"])
            .arg(&k),
        T,
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(out.stdout.is_empty(), "the guest must not have run");
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(
        err.contains("--nested on") && err.contains("PVM") && err.contains("fix:"),
        "{err}"
    );

    let out = run_with_timeout(
        nestvm()
            .args(["run", "--memory", "16M", "--kernel"])
            .arg(&k),
        T,
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "booted");
    assert!(err.contains("nesting is off for this VM"), "{err}");

    let out = run_with_timeout(
        nestvm()
            .args(["run", "--nested", "off", "--memory", "16M", "--kernel"])
            .arg(&k),
        T,
    );
    assert_eq!(out.status.code(), Some(0));
    assert!(
        !String::from_utf8_lossy(&out.stderr).contains("nesting is off"),
        "off is silent"
    );

    let out = run_with_timeout(
        nestvm()
            .args(["run", "--nested", "maybe", "--kernel"])
            .arg(&k),
        T,
    );
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn enable_nested_refuses_on_pvm_and_changes_nothing() {
    if !is_pvm() {
        eprintln!(
            "SKIPPED enable_nested_refuses_on_pvm_and_changes_nothing: this host's KVM is not PVM"
        );
        return;
    }
    let out = run_with_timeout(nestvm().args(["host", "enable-nested", "--yes"]), T);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("PVM"), "{err}");
    assert!(!std::path::Path::new("/etc/modprobe.d/nestvm-nested.conf").exists());
}

/// SIGUSR1 reads every vCPU's complete state and writes it back; the guest
/// carries on (the lab repeats this with nested state while L3 runs). Each
/// signal goes once the previous round trip was reported, to a guest that
/// ticks until it is stopped: none can find the VM already ended.
#[test]
fn sigusr1_state_round_trip_keeps_the_guest_running() {
    if !kvm_or_skip("sigusr1_state_round_trip_keeps_the_guest_running") {
        return;
    }
    use std::sync::mpsc::channel;
    let k = guest(
        "ticker-on.elf",
        ticker(u32::MAX, 200, "never", Ending::Reset),
    );
    let mut child = nestvm()
        .args([
            "run", "--nested", "off", "--cpus", "2", "--memory", "16M", "--kernel",
        ])
        .arg(&k)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    // Each reader forwards what it reads: bytes of guest output, VMM lines.
    let (dots_tx, dots) = channel::<usize>();
    let mut stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        let mut buf = [0u8; 256];
        while let Ok(n @ 1..) = std::io::Read::read(&mut stdout, &mut buf) {
            let _ = dots_tx.send(n);
        }
    });
    let (lines_tx, lines) = channel::<String>();
    let stderr = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for l in std::io::BufRead::lines(std::io::BufReader::new(stderr)).map_while(Result::ok) {
            let _ = lines_tx.send(l);
        }
    });
    let mut err = String::new();
    dots.recv_timeout(T).expect("the guest never printed");
    for trip in 1..=3 {
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGUSR1).unwrap();
        while err.matches("vCPU state round trip: vCPU 0").count() < trip {
            let l = lines.recv_timeout(T).expect("no round trip reported");
            err.push_str(&l);
            err.push('\n');
            assert!(!l.contains("failed"), "{err}");
        }
    }
    // Output that the guest printed after the last state was written back.
    while dots.try_recv().is_ok() {}
    dots.recv_timeout(T)
        .expect("the guest stopped after the round trips");
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    let status = child.wait().unwrap();
    err.extend(lines.iter().map(|l| l + "\n"));
    assert_eq!(status.code(), Some(128 + 15), "{err}");
    assert!(err.contains("vCPU 1:"), "every vCPU is carried: {err}");
    assert!(!err.contains("failed"), "{err}");
}
