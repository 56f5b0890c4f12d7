//! A block device as a VM's disk, end to end on a loop device (needs root
//! and losetup; skipped where there are none): the VM runs with it, a second
//! VM cannot take it for writing while the first holds it, a checkpoint
//! copies it, and restoring the checkpoint writes its contents back into
//! the device (a device cannot be renamed over as an image file is).

mod common;

use std::os::unix::fs::FileTypeExt;
use std::path::PathBuf;
use std::time::Duration;

use common::{guest, kvm_or_skip, StateEnv};
use nestvm_guests::{ticker, Ending};

/// The device's size: larger than the VM's memory by more than the VMM's
/// file-size limit allows for, so a checkpoint's copy of it is only
/// possible if that limit counts the device's size.
const DEVICE: usize = 128 << 20;

/// A loop device over a scratch image, detached on drop.
struct LoopDevice {
    dev: PathBuf,
    image: PathBuf,
}

impl LoopDevice {
    fn attach(fill: u8) -> Option<Self> {
        let image = common::scratch("loop").join("backing.img");
        std::fs::write(&image, vec![fill; DEVICE]).unwrap();
        let out = std::process::Command::new("losetup")
            .args(["-f", "--show"])
            .arg(&image)
            .output()
            .ok()?;
        if !out.status.success() {
            return None;
        }
        let dev = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        Some(Self { dev, image })
    }

    /// The device's contents, through the device.
    fn contents(&self) -> Vec<u8> {
        std::fs::read(&self.dev).unwrap()
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = std::process::Command::new("losetup")
            .arg("-d")
            .arg(&self.dev)
            .status();
        let _ = std::fs::remove_file(&self.image);
    }
}

#[test]
fn a_loop_device_is_a_disk_through_runs_checkpoints_and_restores() {
    if !kvm_or_skip("a_loop_device_is_a_disk_through_runs_checkpoints_and_restores") {
        return;
    }
    let Some(lo) = LoopDevice::attach(0x5a) else {
        eprintln!("SKIPPED: no loop device here (needs root and losetup)");
        return;
    };
    let dev = lo.dev.to_str().unwrap().to_owned();
    let k = guest(
        "blockdev-ticker.elf",
        ticker(u32::MAX, 3000, "", Ending::PowerOff),
    );
    let e = StateEnv::new("blockdev");
    let disk = format!("path={dev}");
    for name in ["t", "u"] {
        e.ok(&[
            "vm",
            "new",
            name,
            "--kernel",
            k.to_str().unwrap(),
            "--memory",
            "32M",
            "--nested",
            "off",
            "--disk",
            &disk,
        ]);
    }
    e.ok(&["vm", "start", "t"]);
    let console = e.dir.join("vms/t/console.log");
    let ticks = || std::fs::read_to_string(&console).unwrap_or_default().len();
    common::wait_until(|| ticks() > 5, Duration::from_secs(30), "t ticks");
    // The device is t's: u cannot have it for writing.
    let out = e.run(&["vm", "start", "u"]);
    let said = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_ne!(out.status.code(), Some(0), "{said}");
    assert!(said.contains("in use"), "{said}");
    // A checkpoint holds the device's contents as they were.
    e.ok(&["vm", "checkpoint", "t", "--name", "a"]);
    e.ok(&["vm", "kill", "t"]);
    let copy = std::fs::read(e.dir.join("vms/t/checkpoints/a/disk-0.img"));
    assert_eq!(
        copy.ok().map(|c| c.len()),
        Some(DEVICE),
        "the copy is the device's size"
    );
    // Changed behind the checkpoint's back, then restored.
    std::fs::write(&lo.dev, vec![0xc3; DEVICE]).unwrap();
    assert!(lo.contents().iter().all(|&b| b == 0xc3));
    assert!(e
        .ok(&["vm", "restore", "t", "a"])
        .contains("restored checkpoint of VM 't'"));
    assert!(
        lo.contents().iter().all(|&b| b == 0x5a),
        "the checkpoint's contents are back in the device"
    );
    let still = std::fs::metadata(&lo.dev).unwrap().file_type();
    assert!(still.is_block_device(), "the device is still a device");
    e.ok(&["vm", "kill", "t"]);
}
