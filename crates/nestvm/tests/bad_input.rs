//! Bad input to `nestvm run`: one line naming the problem and the fix, exit
//! code 2, never a panic. None of these needs /dev/kvm: settings and the
//! kernel are checked before KVM is opened... except the vCPU limit, which
//! only KVM knows.

mod common;

use std::time::Duration;

use common::{guest, nestvm, run_with_timeout, scratch};
use nestvm_guests::{hello, Ending};

fn expect_usage_error(args: &[&str], needle: &str) {
    let out = run_with_timeout(nestvm().args(args), Duration::from_secs(30));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
    assert_eq!(
        err.trim_end().lines().count(),
        1,
        "{args:?}: one line: {err}"
    );
    assert!(
        err.contains(needle),
        "{args:?}: expected '{needle}' in: {err}"
    );
    assert!(
        !err.contains("panicked") && !err.contains("backtrace"),
        "{err}"
    );
    assert!(out.stdout.is_empty());
}

#[test]
fn settings_errors() {
    let k = guest("ok.elf", hello("x", Ending::Reset));
    let k = k.to_str().unwrap();
    expect_usage_error(&["run"], "no kernel given");
    expect_usage_error(
        &["run", "--kernel", k, "--cpus", "0"],
        "--cpus 0 is out of range",
    );
    expect_usage_error(
        &["run", "--kernel", k, "--memory", "12Q"],
        "invalid size '12Q'",
    );
    expect_usage_error(&["run", "--kernel", k, "--memory", "1M"], "out of range");
    expect_usage_error(
        &["run", "--kernel", k, "--memory", "65537K"],
        "not a whole number of 4 KiB pages",
    );
    expect_usage_error(
        &["run", "--kernel", k, "--cpus", "256"],
        "--cpus 256 is out of range",
    );
    expect_usage_error(
        &["run", "--kernel", k, "--cpus", "many"],
        "invalid value 'many'",
    );
    expect_usage_error(&["frobnicate"], "unrecognized subcommand");
    let cfg = scratch("bad-cfg").join("vm.toml");
    std::fs::write(&cfg, "kernel = \"x\"\nmemroy = \"1G\"\n").unwrap();
    expect_usage_error(
        &["run", "--config", cfg.to_str().unwrap()],
        "unknown field `memroy`",
    );
    expect_usage_error(
        &["run", "--config", "/nonexistent/vm.toml"],
        "cannot read config file",
    );
}

fn kernel_errors_need_kvm_first() -> bool {
    // Kernel checks happen when the VM is built, after /dev/kvm is opened.
    common::kvm_or_skip("kernel_errors")
}

#[test]
fn kernel_errors() {
    if !kernel_errors_need_kvm_first() {
        return;
    }
    expect_usage_error(
        &["run", "--kernel", "/nonexistent/vmlinuz"],
        "cannot read kernel /nonexistent/vmlinuz",
    );
    let not_kernel = scratch("nk").join("notes.txt");
    std::fs::write(&not_kernel, "just text\n").unwrap();
    expect_usage_error(
        &["run", "--kernel", not_kernel.to_str().unwrap()],
        "is not a Linux kernel",
    );
    let k = guest("k.elf", hello("x", Ending::Reset));
    let big = scratch("big").join("initrd");
    std::fs::write(&big, vec![0u8; 20 << 20]).unwrap();
    expect_usage_error(
        &[
            "run",
            "--kernel",
            k.to_str().unwrap(),
            "--initrd",
            big.to_str().unwrap(),
            "--memory",
            "16M",
        ],
        "guest memory is too small",
    );
    expect_usage_error(
        &[
            "run",
            "--kernel",
            k.to_str().unwrap(),
            "--initrd",
            "/nonexistent/initrd",
        ],
        "cannot read initrd",
    );
    let long = "x".repeat(5000);
    expect_usage_error(
        &["run", "--kernel", k.to_str().unwrap(), "--cmdline", &long],
        "command line is 5000 bytes",
    );
}

#[test]
fn disk_and_network_errors() {
    let k = guest("dev.elf", hello("x", Ending::Reset));
    let k = k.to_str().unwrap();
    expect_usage_error(
        &["run", "--kernel", k, "--disk", "cache=none"],
        "invalid --disk 'cache=none'",
    );
    expect_usage_error(
        &["run", "--kernel", k, "--disk", "path=/nonexistent/d.img"],
        "cannot open disk image /nonexistent/d.img",
    );
    let tiny = scratch("bad-disk").join("tiny.img");
    std::fs::write(&tiny, [0u8; 100]).unwrap();
    expect_usage_error(
        &["run", "--kernel", k, "--disk", tiny.to_str().unwrap()],
        "smaller than one 512-byte sector",
    );
    expect_usage_error(
        &["run", "--kernel", k, "--net", "tap=has space"],
        "invalid TAP name 'has space'",
    );
    expect_usage_error(
        &[
            "run",
            "--kernel",
            k,
            "--net",
            "tap=t0,mac=01:00:5e:00:00:01",
        ],
        "invalid MAC address",
    );
    expect_usage_error(
        &["run", "--kernel", k, "--net", "tap=t0", "--net", "tap=t0"],
        "TAP 't0' is given twice",
    );
    expect_usage_error(
        &["run", "--kernel", k, "--net", "tap=t0,mac_spoofing=maybe"],
        "invalid --net",
    );
}

/// A kernel whose path is not UTF-8 cannot go into a VM's definition (TOML):
/// `vm new` says so and exits 2, and defines nothing.
#[test]
fn a_non_utf8_kernel_path_is_a_usage_error() {
    use std::os::unix::ffi::OsStrExt;
    let dir = scratch("non-utf8");
    let k = dir.join(std::ffi::OsStr::from_bytes(b"kernel-\xff.elf"));
    std::fs::write(&k, hello("x", Ending::Reset)).unwrap();
    let state = dir.join("state");
    let out = run_with_timeout(
        nestvm()
            .arg("--state-dir")
            .arg(&state)
            .args(["vm", "new", "odd", "--kernel"])
            .arg(&k),
        Duration::from_secs(30),
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("not valid UTF-8"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    assert!(!state.join("vms/odd").exists(), "nothing is defined");
}
