//! Run as root, the VMM gives up root once its VM is built (needs root;
//! skipped otherwise): it runs as the `--vmm-user` (every thread, no way
//! back, under its filters) and still does its whole job on a disk image
//! only root can open, in a state directory only root can enter: run,
//! checkpoint, save, start of the saved VM, restore. What it leaves in the
//! VM's directory root takes back, and refuses when something was planted
//! there; the definition stays root's throughout.

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use common::{guest, kvm_or_skip, threads, vmm_pid, StateEnv};
use nestvm_guests::{ticker, Ending};

/// The user the VMMs of this test become.
const VMM_UID: u32 = 64010;

/// The `Uid:`, `Gid:` and `Groups:` lines of a process's status, and
/// whether it has no_new_privs.
fn credentials(pid: i32) -> (String, String, String, bool) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.split_whitespace().collect::<Vec<_>>().join(" "))
            .unwrap_or_default()
    };
    let nnp = field("NoNewPrivs:") == "1";
    (field("Uid:"), field("Gid:"), field("Groups:"), nnp)
}

fn owner(p: &Path) -> u32 {
    std::fs::symlink_metadata(p).unwrap().uid()
}

fn failing(e: &StateEnv, args: &[&str]) -> String {
    let out = e.run(args);
    let said = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "{args:?}: {said}");
    said
}

#[test]
fn a_root_vmm_becomes_its_user_and_still_runs_saves_and_checkpoints() {
    if !kvm_or_skip("a_root_vmm_becomes_its_user_and_still_runs_saves_and_checkpoints") {
        return;
    }
    if !nix::unistd::Uid::effective().is_root() {
        eprintln!("SKIPPED: needs root");
        return;
    }
    // A disk only root can reach: 0600 in a 0700 folder.
    let private = common::scratch("drop-disks");
    std::fs::set_permissions(&private, PermissionsExt::from_mode(0o700)).unwrap();
    let disk = private.join("disk.img");
    std::fs::write(&disk, vec![0x11u8; 1 << 20]).unwrap();
    std::fs::set_permissions(&disk, PermissionsExt::from_mode(0o600)).unwrap();
    let k = guest(
        "drop-ticker.elf",
        ticker(u32::MAX, 3000, "", Ending::PowerOff),
    );
    let e = StateEnv::new("drop");
    let user = format!("--vmm-user={VMM_UID}:{VMM_UID}");
    let with_user = |args: &[&'static str]| -> Vec<String> {
        std::iter::once(user.clone())
            .chain(args.iter().map(|a| a.to_string()))
            .collect()
    };
    let ok = |args: Vec<String>| e.ok(&args.iter().map(String::as_str).collect::<Vec<_>>());
    e.ok(&[
        "vm",
        "new",
        "t",
        "--kernel",
        k.to_str().unwrap(),
        "--memory",
        "32M",
        "--nested",
        "off",
        "--disk",
        &format!("path={}", disk.display()),
    ]);
    let vm = e.dir.join("vms/t");
    ok(with_user(&["vm", "start", "t"]));
    let pid = vmm_pid(&e.dir, "t");
    let id = format!("{VMM_UID} {VMM_UID} {VMM_UID} {VMM_UID}");
    assert_eq!(
        credentials(pid),
        (id.clone(), id, VMM_UID.to_string(), true),
        "(uid, gid, groups, no_new_privs) of the VMM"
    );
    let t = threads(pid);
    assert!(t.len() >= 3 && t.iter().all(|(_, c)| *c), "{t:?}");
    assert_eq!((owner(&vm), owner(&vm.join("vm.toml"))), (VMM_UID, 0));

    // A checkpoint copies the disk through the VMM's open descriptor.
    e.ok(&["vm", "checkpoint", "t", "--name", "a"]);
    let copy = vm.join("checkpoints/a/disk-0.img");
    assert_eq!(std::fs::read(&copy).unwrap(), vec![0x11u8; 1 << 20]);
    assert_eq!(owner(&copy), VMM_UID, "the VMM wrote it as its user");
    // A save, and a start of the saved VM, as the user again.
    e.ok(&["vm", "save", "t"]);
    assert_eq!(e.state("t"), "Saved");
    assert_eq!(owner(&copy), VMM_UID);
    // Any command that takes the stopped VM's lock takes it all back first
    // (this one then refuses: the VM does not run).
    assert_eq!(
        e.run(&["vm", "checkpoint", "t", "--name", "b"])
            .status
            .code(),
        Some(2)
    );
    for f in ["", "saved", "checkpoints/a/disk-0.img", "vmm.log"] {
        assert_eq!(owner(&vm.join(f)), 0, "{f} taken back");
    }
    ok(with_user(&["vm", "start", "t"]));
    assert_eq!(e.state("t"), "Running");
    assert_eq!(
        credentials(vmm_pid(&e.dir, "t")).0.split(' ').next(),
        Some("64010")
    );
    e.ok(&["vm", "kill", "t"]);
    ok(with_user(&["vm", "restore", "t", "a"]));
    assert_eq!(e.state("t"), "Running");
    e.ok(&["vm", "kill", "t"]);

    // --vmm-user root keeps root's rights.
    e.ok(&["--vmm-user", "root", "vm", "start", "t"]);
    assert!(credentials(vmm_pid(&e.dir, "t")).0.starts_with("0 "));
    e.ok(&["vm", "kill", "t"]);
}

#[test]
fn what_an_unprivileged_vmm_planted_stops_root_with_the_reason() {
    if !kvm_or_skip("what_an_unprivileged_vmm_planted_stops_root_with_the_reason") {
        return;
    }
    if !nix::unistd::Uid::effective().is_root() {
        eprintln!("SKIPPED: needs root");
        return;
    }
    let k = guest(
        "drop-planted.elf",
        ticker(u32::MAX, 3000, "", Ending::PowerOff),
    );
    let e = StateEnv::new("drop-planted");
    e.ok(&[
        "vm",
        "new",
        "t",
        "--kernel",
        k.to_str().unwrap(),
        "--memory",
        "32M",
        "--nested",
        "off",
    ]);
    let vm = e.dir.join("vms/t");
    // What a compromised VMM could leave: a link root would follow out.
    std::os::unix::fs::symlink("/etc/shadow", vm.join("console.log")).unwrap();
    let said = failing(&e, &["vm", "start", "t"]);
    assert!(said.contains("console.log is a symbolic link"), "{said}");
    assert_eq!(said.trim().lines().count(), 1, "{said}");
    std::fs::remove_file(vm.join("console.log")).unwrap();
    // Its definition swapped for one of its own.
    let def = vm.join("vm.toml");
    nix::unistd::chown(&def, Some(VMM_UID.into()), Some(VMM_UID.into())).unwrap();
    let said = failing(&e, &["vm", "show", "t"]);
    assert!(said.contains("belongs to uid 64010"), "{said}");
    nix::unistd::chown(&def, Some(0.into()), Some(0.into())).unwrap();
    e.ok(&["vm", "start", "t"]);
    e.ok(&["vm", "kill", "t"]);

    // A user that does not exist is a usage error.
    let out = e.run(&["--vmm-user", "no-such-user-here", "vm", "start", "t"]);
    let said = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{said}");
    assert!(said.contains("no user 'no-such-user-here'"), "{said}");
}
