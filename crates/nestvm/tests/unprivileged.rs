//! A VM run end to end by an ordinary user who may use /dev/kvm, as
//! Debian's `kvm` group allows: `nestvm run`, then a managed VM in the
//! user's XDG data directory through start, pause, save, start of the saved
//! VM, a checkpoint and its restore, with the VMM running as that user
//! under its seccomp filters and everything it writes owned by that user.
//!
//! Run as root (as CI is), the test takes a user ID that owns nothing
//! (64000, no account needed), lends it /dev/kvm the way Debian's udev rule
//! does (group `kvm`, mode 0660; a group of its own if the host has no
//! `kvm`) and puts /dev/kvm's group and mode back afterwards. Run as anyone
//! else, it runs as that user, or is skipped if they cannot open /dev/kvm.

mod common;

use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use common::{guest, kvm_or_skip, run_with_timeout, scratch, threads, vmm_pid};
use nestvm_guests::{hello, ticker, Ending};

const T: Duration = Duration::from_secs(60);
/// The user the test runs nestvm as, when it runs as root.
const USER: u32 = 64_000;
/// The group that stands in for `kvm` where the host has none.
const SPARE_KVM_GID: u32 = 64_001;

/// /dev/kvm lent to the `kvm` group for the test; its group and mode come
/// back on drop, whatever the test did.
struct Lent {
    gid: u32,
    mode: u32,
    kvm_gid: u32,
}

impl Lent {
    fn new() -> Self {
        let m = std::fs::metadata("/dev/kvm").expect("stat /dev/kvm");
        let kvm_gid = kvm_group().unwrap_or(SPARE_KVM_GID);
        std::os::unix::fs::chown("/dev/kvm", None, Some(kvm_gid)).expect("chgrp /dev/kvm");
        std::fs::set_permissions("/dev/kvm", std::fs::Permissions::from_mode(0o660))
            .expect("chmod /dev/kvm");
        Self {
            gid: m.gid(),
            mode: m.mode() & 0o7777,
            kvm_gid,
        }
    }
}

impl Drop for Lent {
    fn drop(&mut self) {
        let _ = std::os::unix::fs::chown("/dev/kvm", None, Some(self.gid));
        let _ = std::fs::set_permissions("/dev/kvm", std::fs::Permissions::from_mode(self.mode));
    }
}

/// The host's `kvm` group, if it has one.
fn kvm_group() -> Option<u32> {
    let groups = std::fs::read_to_string("/etc/group").ok()?;
    groups.lines().find_map(|l| {
        let mut f = l.split(':');
        (f.next() == Some("kvm")).then(|| f.nth(1)?.parse().ok())?
    })
}

/// Who the test runs nestvm as, and where that user's home is.
struct User {
    /// `Some((uid, kvm gid))` when the test switches to another user.
    switch: Option<(u32, u32)>,
    home: PathBuf,
}

impl User {
    fn nestvm(&self, args: &[&str]) -> Command {
        let bin = env!("CARGO_BIN_EXE_nestvm");
        let mut c = match self.switch {
            Some((uid, gid)) => {
                let mut c = Command::new("setpriv");
                c.arg(format!("--reuid={uid}"))
                    .arg(format!("--regid={uid}"))
                    .arg(format!("--groups={gid}"))
                    .arg("--")
                    .arg(bin);
                c
            }
            None => Command::new(bin),
        };
        c.args(args)
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .env("HOME", &self.home)
            .env("XDG_DATA_HOME", self.home.join(".local/share"))
            .stdin(Stdio::null());
        c
    }

    fn run(&self, args: &[&str]) -> Output {
        run_with_timeout(&mut self.nestvm(args), T)
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert_eq!(
            out.status.code(),
            Some(0),
            "{args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn state(&self, name: &str) -> String {
        let v: serde_json::Value =
            serde_json::from_str(&self.ok(&["vm", "show", name, "--json"])).expect("JSON");
        v["state"].as_str().unwrap_or_default().to_owned()
    }

    fn wait_state(&self, name: &str, state: &str) {
        common::wait_until(
            || self.state(name) == state,
            T,
            &format!("VM {name} {state}"),
        );
    }

    fn state_dir(&self) -> PathBuf {
        self.home.join(".local/share/nestvm")
    }
}

/// A guest image readable by the user the test runs nestvm as.
fn readable_guest(name: &str, image: Vec<u8>) -> PathBuf {
    let p = guest(name, image);
    for q in [p.parent().unwrap(), p.as_path()] {
        std::fs::set_permissions(q, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    p
}

/// Every file under `dir` (and `dir` itself) belongs to `uid` and is
/// closed to everyone else.
fn all_private_to(dir: &Path, uid: u32) -> Result<(), String> {
    let m = std::fs::symlink_metadata(dir).map_err(|e| e.to_string())?;
    if m.uid() != uid {
        return Err(format!("{} belongs to uid {}", dir.display(), m.uid()));
    }
    if !m.file_type().is_socket() && m.mode() & 0o077 != 0 {
        return Err(format!("{} has mode {:o}", dir.display(), m.mode() & 0o777));
    }
    if m.is_dir() {
        for e in std::fs::read_dir(dir).map_err(|e| e.to_string())? {
            all_private_to(&e.map_err(|e| e.to_string())?.path(), uid)?;
        }
    }
    Ok(())
}

#[test]
fn an_ordinary_user_in_the_kvm_group_runs_vms_end_to_end() {
    if !kvm_or_skip("an_ordinary_user_in_the_kvm_group_runs_vms_end_to_end") {
        return;
    }
    let root = nix::unistd::geteuid().is_root();
    if !root
        && std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
            .is_err()
    {
        eprintln!("SKIPPED: this user cannot open /dev/kvm (add them to the kvm group)");
        return;
    }
    let lent = root.then(Lent::new);
    let home = scratch("unprivileged-home");
    let _ = std::fs::remove_dir_all(&home);
    std::fs::create_dir(&home).unwrap();
    let uid = if root {
        USER
    } else {
        nix::unistd::geteuid().as_raw()
    };
    if root {
        std::os::unix::fs::chown(&home, Some(USER), Some(USER)).unwrap();
    }
    let user = User {
        switch: lent.as_ref().map(|l| (USER, l.kvm_gid)),
        home,
    };

    // An unmanaged VM, in the foreground.
    let k = readable_guest(
        "unprivileged-hello.elf",
        hello("HELLO-UNPRIVILEGED", Ending::PowerOff),
    );
    let out = user.ok(&["run", "--kernel", k.to_str().unwrap(), "--memory", "16M"]);
    assert!(out.contains("HELLO-UNPRIVILEGED"), "{out}");

    // A managed VM, in the user's own state directory.
    let k = readable_guest(
        "unprivileged-ticker.elf",
        ticker(u32::MAX, 3000, "", Ending::PowerOff),
    );
    user.ok(&[
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
    user.ok(&["vm", "start", "t"]);
    let dir = user.state_dir();
    let m = std::fs::metadata(&dir).expect("the state directory is under XDG_DATA_HOME");
    assert_eq!(m.mode() & 0o777, 0o700);
    let pid = vmm_pid(&dir, "t");
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let uids = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
    assert!(
        uids.split_whitespace()
            .skip(1)
            .all(|u| u == uid.to_string()),
        "the VMM runs as {uids}"
    );
    let ts = threads(pid);
    assert!(ts.iter().all(|(_, confined)| *confined), "{ts:?}");
    let console = dir.join("vms/t/console.log");
    let dots = || {
        std::fs::read_to_string(&console)
            .unwrap_or_default()
            .matches('.')
            .count()
    };
    common::wait_until(|| dots() > 10, T, "the guest ticks");

    user.ok(&["vm", "pause", "t"]);
    assert_eq!(user.state("t"), "Paused");
    user.ok(&["vm", "resume", "t"]);
    assert!(user.ok(&["vm", "save", "t"]).contains("saved VM 't'"));
    assert_eq!(user.state("t"), "Saved");
    user.ok(&["vm", "start", "t"]);
    assert_eq!(user.state("t"), "Running");
    let n = dots();
    common::wait_until(|| dots() > n + 10, T, "the resumed guest ticks");
    user.ok(&["vm", "checkpoint", "t", "--name", "a"]);
    user.ok(&["vm", "kill", "t"]);
    user.wait_state("t", "Off");
    assert!(user
        .ok(&["vm", "restore", "t", "a"])
        .contains("restored checkpoint of VM 't'"));
    user.wait_state("t", "Running");
    let n = dots();
    common::wait_until(|| dots() > n + 10, T, "the restored guest ticks");
    user.ok(&["vm", "kill", "t"]);
    user.wait_state("t", "Off");
    if let Err(e) = all_private_to(&dir, uid) {
        panic!("the user's state directory holds a file not theirs alone: {e}");
    }
    drop(lent);
}
