//! The lab's kernel: Debian's `linux-image-amd64` (its current dependency,
//! e.g. linux-image-6.1.0-56-amd64), downloaded once with `apt-get download`,
//! unpacked with `dpkg-deb`, and cached: the bzImage plus the modules the
//! lab needs ([`MODULES`]), in load order.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::host::{apt_update_once, run};
use crate::{cache_dir, io_err, say, LabError};

/// The modules every lab level carries, in load order, with what each
/// depends on: KVM on AMD; the ACPI power button and evdev (so a guest sees
/// the power button nestvm presses); TAP and bridging (the host side of a
/// guest's network); virtio-mmio, virtio-blk and virtio-net (the guest side
/// of nestvm's devices, the balloon and vsock); ext4 (and the crc32c it checksums with) for the disk
/// images the tests make.
pub const MODULES: [(&str, &str); 29] = [
    ("irqbypass", ""),
    ("kvm", "irqbypass"),
    ("ccp", ""),
    ("kvm-amd", "kvm irqbypass ccp"),
    ("button", ""),
    ("evdev", ""),
    ("tun", ""),
    ("llc", ""),
    ("stp", "llc"),
    ("bridge", "llc stp"),
    ("virtio_ring", ""),
    ("virtio", "virtio_ring"),
    ("virtio_mmio", "virtio virtio_ring"),
    ("virtio_blk", "virtio virtio_ring"),
    ("virtio_pci_legacy_dev", ""),
    ("virtio_pci_modern_dev", ""),
    (
        "virtio_pci",
        "virtio virtio_ring virtio_pci_legacy_dev virtio_pci_modern_dev",
    ),
    ("virtio_balloon", "virtio virtio_ring"),
    ("failover", ""),
    ("net_failover", "failover"),
    ("virtio_net", "virtio_ring virtio net_failover failover"),
    ("vsock", ""),
    ("vmw_vsock_virtio_transport_common", "vsock"),
    (
        "vmw_vsock_virtio_transport",
        "virtio vmw_vsock_virtio_transport_common virtio_ring vsock",
    ),
    ("crc16", ""),
    ("mbcache", ""),
    ("jbd2", ""),
    ("crc32c_generic", ""),
    ("ext4", "jbd2 mbcache crc16"),
];

/// modules.dep for [`MODULES`] (paths relative to /lib/modules/RELEASE),
/// so busybox's modprobe can load and unload them by name.
pub fn modules_dep() -> String {
    MODULES
        .iter()
        .map(|(m, deps)| {
            let deps: Vec<String> = deps
                .split_whitespace()
                .map(|d| format!(" {d}.ko"))
                .collect();
            format!("{m}.ko:{}\n", deps.concat())
        })
        .collect()
}

/// A cached Debian kernel.
#[derive(Debug, Clone)]
pub struct Kernel {
    /// Package name, e.g. linux-image-6.1.0-56-amd64.
    pub package: String,
    /// Kernel release (`uname -r`), e.g. 6.1.0-56-amd64.
    pub release: String,
    /// The bzImage.
    pub vmlinuz: PathBuf,
    /// `(module name, .ko file)` in load order.
    pub modules: Vec<(String, PathBuf)>,
}

/// The concrete kernel package behind the `linux-image-amd64` meta-package,
/// or `$NESTVM_LAB_KERNEL_PACKAGE`.
fn package_name() -> Result<String, LabError> {
    if let Ok(p) = std::env::var("NESTVM_LAB_KERNEL_PACKAGE") {
        return Ok(p);
    }
    apt_update_once()?;
    let out = run(Command::new("apt-cache").args(["depends", "linux-image-amd64"]))?;
    out.lines()
        .filter_map(|l| l.trim().strip_prefix("Depends: "))
        .find(|p| p.starts_with("linux-image-"))
        .map(str::to_owned)
        .ok_or_else(|| {
            LabError::Missing(
                "apt-cache knows no linux-image-amd64: check /etc/apt/sources.list".into(),
            )
        })
}

fn find_file(dir: &Path, name_prefix: &str, suffixes: &[&str]) -> Option<PathBuf> {
    for entry in std::fs::read_dir(dir).ok()?.flatten() {
        let p = entry.path();
        if p.is_dir() {
            if let Some(found) = find_file(&p, name_prefix, suffixes) {
                return Some(found);
            }
        } else if let Some(n) = p.file_name().and_then(|n| n.to_str()) {
            if suffixes.iter().any(|s| n == format!("{name_prefix}{s}")) {
                return Some(p);
            }
        }
    }
    None
}

/// Returns the cached kernel, fetching it on first use.
pub fn kernel() -> Result<Kernel, LabError> {
    let package = package_name()?;
    let dir = cache_dir().join(&package);
    let vmlinuz = dir.join("vmlinuz");
    let modules: Vec<(String, PathBuf)> = MODULES
        .iter()
        .map(|(m, _)| (m.to_string(), dir.join(format!("{m}.ko"))))
        .collect();
    let release = package.trim_start_matches("linux-image-").to_owned();
    // The marker names the modules extracted, so a longer list re-extracts.
    let ready = dir.join(".complete");
    let wanted = MODULES.map(|(m, _)| m).join(",");
    if std::fs::read_to_string(&ready).is_ok_and(|m| m == wanted) {
        return Ok(Kernel {
            package,
            release,
            vmlinuz,
            modules,
        });
    }

    say(format!(
        "fetching Debian kernel package {package} (cached in {})",
        dir.display()
    ));
    let tmp = dir.with_extension("partial");
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(io_err("cannot create", &tmp))?;
    let download = || {
        run(Command::new("apt-get")
            .args(["download", &package])
            .current_dir(&tmp))
    };
    if download().is_err() {
        // Stale package lists name a version the mirror no longer has.
        say("apt-get download failed: refreshing the package lists and trying again");
        run(Command::new("apt-get").arg("update"))?;
        download()?;
    }
    let deb = std::fs::read_dir(&tmp)
        .map_err(io_err("cannot list", &tmp))?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .ok_or_else(|| LabError::Missing(format!("apt-get download {package} left no .deb")))?;
    let unpacked = tmp.join("root");
    run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&unpacked))?;
    let boot_image = std::fs::read_dir(unpacked.join("boot"))
        .ok()
        .and_then(|d| {
            d.flatten().map(|e| e.path()).find(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-"))
            })
        })
        .ok_or_else(|| LabError::Missing(format!("{package} has no /boot/vmlinuz-*")))?;
    let staged = tmp.join("staged");
    std::fs::create_dir_all(&staged).map_err(io_err("cannot create", &staged))?;
    std::fs::copy(&boot_image, staged.join("vmlinuz"))
        .map_err(io_err("cannot copy", &boot_image))?;
    for (m, _) in MODULES {
        let src = find_file(
            &unpacked.join("lib/modules"),
            m,
            &[".ko", ".ko.xz", ".ko.zst"],
        )
        .or_else(|| {
            find_file(
                &unpacked.join("usr/lib/modules"),
                m,
                &[".ko", ".ko.xz", ".ko.zst"],
            )
        })
        .ok_or_else(|| LabError::Missing(format!("{package} has no module {m}")))?;
        let dst = staged.join(format!("{m}.ko"));
        match src.extension().and_then(|e| e.to_str()) {
            Some("xz") => {
                let out = Command::new("xz")
                    .arg("-dc")
                    .arg(&src)
                    .output()
                    .map_err(io_err("cannot run xz on", &src))?;
                std::fs::write(&dst, out.stdout).map_err(io_err("cannot write", &dst))?;
            }
            Some("zst") => {
                let out = Command::new("zstd")
                    .arg("-dc")
                    .arg(&src)
                    .output()
                    .map_err(io_err("cannot run zstd on", &src))?;
                std::fs::write(&dst, out.stdout).map_err(io_err("cannot write", &dst))?;
            }
            _ => {
                std::fs::copy(&src, &dst).map_err(io_err("cannot copy", &src))?;
            }
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::rename(&staged, &dir).map_err(io_err("cannot move into place", &dir))?;
    std::fs::write(&ready, &wanted).map_err(io_err("cannot write", &ready))?;
    let _ = std::fs::remove_dir_all(&tmp);
    Ok(Kernel {
        package,
        release,
        vmlinuz,
        modules,
    })
}
