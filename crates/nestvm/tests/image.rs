//! `nestvm image debian` for real: mmdebstrap builds a Debian system from
//! Debian's mirror into a raw disk, with its kernel and initrd beside it,
//! and `vm new --image` takes all three. The disk is read back with
//! e2fsprogs' debugfs, not mounted: the files the guest needs to boot on
//! its own, be reached by `vm exec` and take an address by DHCP are there.
//! (Booting it needs a host with VT-x/AMD-V: the lab.) Needs the network
//! to a Debian mirror, as the set-up does; takes a few minutes.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::{run_with_timeout, StateEnv};

/// mmdebstrap's download and install, with room for a slow mirror.
const BUILD: Duration = Duration::from_secs(1500);

fn debugfs(image: &Path, request: &str) -> String {
    let out = Command::new("debugfs")
        .args(["-R", request])
        .arg(image)
        .output()
        .expect("debugfs (e2fsprogs) runs");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn image_debian_builds_a_system_vm_new_image_boots_from() {
    let e = StateEnv::new("image");
    let dir = common::scratch("image");
    let out = dir.join("debian.img");
    let mut build = common::nestvm();
    build
        .args(["image", "debian"])
        .arg(&out)
        .args(["--size", "2G", "--packages", "busybox"]);
    let built = run_with_timeout(&mut build, BUILD);
    let said = String::from_utf8_lossy(&built.stderr).into_owned();
    assert_eq!(built.status.code(), Some(0), "{said}");
    assert!(said.contains("image: "), "progress is shown: {said}");
    // The kernel is a bzImage, the initrd is there, the disk is sparse and
    // nothing of the build is left beside them.
    let kernel = std::fs::read(dir.join("debian.img.vmlinuz")).unwrap();
    assert_eq!(&kernel[0x202..0x206], b"HdrS", "a bzImage");
    assert!(
        std::fs::metadata(dir.join("debian.img.initrd"))
            .unwrap()
            .len()
            > 1 << 20
    );
    let meta = std::fs::metadata(&out).unwrap();
    assert_eq!(meta.len(), 2 << 30);
    use std::os::unix::fs::MetadataExt;
    assert!(meta.blocks() * 512 < meta.len(), "sparse");
    let mut left: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    assert_eq!(
        left,
        ["debian.img", "debian.img.initrd", "debian.img.vmlinuz"]
    );
    // Inside: a journal, the agent on vsock at boot, DHCP, root's console
    // login, the disk as root, and the extra package.
    let sb = Command::new("dumpe2fs")
        .arg("-h")
        .arg(&out)
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&sb.stdout).contains("has_journal"));
    let agent = debugfs(&out, "cat /etc/systemd/system/qemu-guest-agent.service");
    assert!(
        agent.contains("-m vsock-listen -p 4294967295:1234"),
        "{agent}"
    );
    let wants = debugfs(&out, "ls -l /etc/systemd/system/multi-user.target.wants");
    for unit in ["qemu-guest-agent.service", "systemd-networkd.service"] {
        assert!(wants.contains(unit), "{unit} starts at boot: {wants}");
    }
    assert!(debugfs(&out, "cat /etc/systemd/network/80-nestvm-dhcp.network").contains("DHCP=yes"));
    assert!(
        debugfs(&out, "cat /etc/shadow").contains("root::"),
        "root logs in on the console"
    );
    assert!(debugfs(&out, "cat /etc/fstab").contains("/dev/vda /"));
    for exe in [
        "/usr/sbin/qemu-ga",
        "/usr/bin/busybox",
        "/usr/lib/systemd/systemd",
    ] {
        assert!(
            debugfs(&out, &format!("stat {exe}")).contains("Type: regular"),
            "{exe}"
        );
    }
    let etc = debugfs(&out, "stat /etc");
    assert!(
        etc.contains("Mode:  0755") && etc.contains("User:     0"),
        "{etc}"
    );
    // An existing image is never overwritten.
    let again = run_with_timeout(
        common::nestvm().args(["image", "debian"]).arg(&out),
        Duration::from_secs(30),
    );
    assert_eq!(again.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&again.stderr).contains("already exists"));
    // vm new --image takes the kernel, the initrd, the disk, a vsock
    // device and the command line.
    e.ok(&[
        "vm",
        "new",
        "d",
        "--image",
        out.to_str().unwrap(),
        "--memory",
        "1G",
    ]);
    let shown = e.json(&["vm", "show", "d"]);
    assert_eq!(
        shown["kernel"],
        dir.join("debian.img.vmlinuz").to_str().unwrap()
    );
    assert_eq!(
        shown["initrd"],
        dir.join("debian.img.initrd").to_str().unwrap()
    );
    assert_eq!(shown["disks"][0]["path"], out.to_str().unwrap());
    assert_eq!(shown["vsock"]["cid"], 3);
    assert!(shown["cmdline"]
        .as_str()
        .unwrap()
        .starts_with("root=/dev/vda "));
    keep_for_the_lab(&out);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The lab's workflow scenario boots the same image (bookworm, with
/// busybox): it is handed over to the lab's cache (nestvm-lab's
/// `cache_dir()`: $NESTVM_LAB_CACHE, else $XDG_CACHE_HOME or ~/.cache, then
/// nestvm-lab) unless one is there, so the test command builds it once.
fn keep_for_the_lab(out: &Path) {
    let base = std::env::var_os("NESTVM_LAB_CACHE")
        .map(std::path::PathBuf::from)
        .or_else(|| {
            let cache = std::env::var_os("XDG_CACHE_HOME")
                .map(std::path::PathBuf::from)
                .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cache")))?;
            Some(cache.join("nestvm-lab"))
        });
    let Some(dir) = base.map(|b| b.join("images")) else {
        return;
    };
    let target = dir.join("debian-bookworm.img");
    if target.exists() || std::fs::create_dir_all(&dir).is_err() {
        return;
    }
    // The image last: the lab takes it as the sign that all three are there.
    for suffix in [".vmlinuz", ".initrd", ""] {
        let mut from = out.as_os_str().to_owned();
        from.push(suffix);
        let mut to = target.as_os_str().to_owned();
        to.push(suffix);
        if std::fs::rename(&from, &to).is_err() && std::fs::copy(&from, &to).is_err() {
            return;
        }
    }
}

#[test]
fn image_flags_are_checked_before_anything_is_written() {
    let dir = common::scratch("image-flags");
    let out = dir.join("x.img");
    for (args, says) in [
        (vec!["--size", "lots"], "size"),
        (vec!["--release", "../etc"], "--release"),
        (vec!["--packages", "ok,not ok"], "package name"),
    ] {
        let r = run_with_timeout(
            common::nestvm()
                .args(["image", "debian"])
                .arg(&out)
                .args(&args),
            Duration::from_secs(30),
        );
        assert_eq!(r.status.code(), Some(2), "{args:?}");
        let err = String::from_utf8_lossy(&r.stderr);
        assert!(
            err.contains(says) && err.lines().count() == 1,
            "{args:?}: {err}"
        );
    }
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0);
    // --image and --kernel are one or the other.
    let e = StateEnv::new("image-flags");
    let both = e.run(&["vm", "new", "v", "--image", "/x.img", "--kernel", "/k"]);
    assert_eq!(both.status.code(), Some(2));
}
