//! What a guest prints cannot fill the host's disk: a managed VM's
//! `console.log` is rotated at the cap its definition sets, keeping one old
//! file (needs /dev/kvm).

mod common;

use std::time::{Duration, Instant};

use common::{guest, kvm_or_skip, StateEnv};
use nestvm_guests::{ticker, Ending};

#[test]
fn a_guest_flooding_its_console_cannot_grow_console_log_past_its_cap() {
    if !kvm_or_skip("a_guest_flooding_its_console_cannot_grow_console_log_past_its_cap") {
        return;
    }
    let e = StateEnv::new("logcap");
    // 400 000 characters as fast as the guest can print them, against a
    // 64 KiB cap: six rotations and more.
    let k = guest(
        "flood.elf",
        ticker(400_000, 1, "flood done", Ending::HaltForever),
    );
    e.ok(&[
        "vm",
        "new",
        "f",
        "--kernel",
        k.to_str().unwrap(),
        "--memory",
        "16M",
        "--nested",
        "off",
        "--console-log-max",
        "64K",
    ]);
    let show = e.json(&["vm", "show", "f"]);
    assert_eq!(show["logs"]["console"], 64 << 10, "{show}");
    e.ok(&["vm", "start", "f"]);
    let dir = e.dir.join("vms/f");
    let log = dir.join("console.log");
    let start = Instant::now();
    while !std::fs::read_to_string(&log)
        .unwrap_or_default()
        .contains("flood done")
    {
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "the guest never finished printing"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let size = |name: &str| std::fs::metadata(dir.join(name)).map(|m| m.len());
    assert!(size("console.log").unwrap() <= 64 << 10);
    assert_eq!(size("console.log.1").unwrap(), 64 << 10);
    assert!(size("console.log.2").is_err(), "only one old file is kept");
    e.ok(&["vm", "kill", "f"]);
    // A cap below the floor is a usage error naming the range.
    let out = e.run(&["vm", "set", "f", "--console-log-max", "1K"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("between 64K and 1T"));
}
