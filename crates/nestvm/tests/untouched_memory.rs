//! Saves and checkpoints never read guest memory the guest never touched:
//! a tiny guest in 1 GiB touches a few pages, and a checkpoint of it costs
//! the VMM a few thousand page faults, not one per page (262,144), and the
//! first checkpoint after a restore — its memory mapped from the saved
//! file, mostly holes — leaves the VMM's resident memory small instead of
//! filling it with the file's holes.

mod common;

use std::time::{Duration, Instant};

use common::{guest, kvm_or_skip, vmm_pid, StateEnv};
use nestvm_guests::{ticker, Ending};

/// A field of /proc/PID/stat after the command (1-based, as `man proc`).
fn stat_field(pid: i32, n: usize) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after = stat.rsplit(')').next().unwrap();
    after
        .split_whitespace()
        .nth(n - 3)
        .unwrap()
        .parse()
        .unwrap()
}

/// VmRSS of `pid`, MiB.
fn rss_mib(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    kb / 1024
}

#[test]
fn saves_and_checkpoints_read_only_memory_the_guest_touched() {
    if !kvm_or_skip("saves_and_checkpoints_read_only_memory_the_guest_touched") {
        return;
    }
    let e = StateEnv::new("untouched");
    let k = guest(
        "untouched.elf",
        ticker(u32::MAX, 3000, "", Ending::PowerOff),
    );
    let kernel = k.to_str().unwrap();
    e.ok(&[
        "vm", "new", "big", "--kernel", kernel, "--memory", "1G", "--nested", "off",
    ]);
    e.ok(&["vm", "start", "big"]);
    let pid = vmm_pid(&e.dir, "big");
    // minflt is the 10th field.
    let before = stat_field(pid, 10);
    e.ok(&["vm", "checkpoint", "big", "--name", "one"]);
    let faults = stat_field(pid, 10) - before;
    assert!(
        faults < 20_000,
        "a checkpoint of 1 GiB cost {faults} page faults"
    );

    // Saved, then restored: the memory is the saved file's, mostly holes.
    e.ok(&["vm", "save", "big"]);
    let memory = e.dir.join("vms/big/saved/memory");
    let file = std::fs::metadata(&memory).unwrap();
    use std::os::unix::fs::MetadataExt;
    assert_eq!(file.len(), 1 << 30);
    assert!(
        file.blocks() * 512 < 64 << 20,
        "the memory file is not sparse"
    );
    e.ok(&["vm", "start", "big"]);
    let pid = vmm_pid(&e.dir, "big");
    let start = Instant::now();
    while e.state("big") != "Running" {
        assert!(start.elapsed() < Duration::from_secs(30), "never resumed");
        std::thread::sleep(Duration::from_millis(20));
    }
    e.ok(&["vm", "checkpoint", "big", "--name", "two"]);
    let rss = rss_mib(pid);
    assert!(
        rss < 128,
        "the VMM holds {rss} MiB after checkpointing a restored VM"
    );
    e.ok(&["vm", "kill", "big"]);
}
