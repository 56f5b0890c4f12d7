//! The packages the lab needs on the machine running it, installed when missing.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::{say, LabError};

/// The QEMU binary.
pub const QEMU: &str = "qemu-system-x86_64";
/// Where Debian installs it.
pub const QEMU_PATH: &str = "/usr/bin/qemu-system-x86_64";
/// busybox from Debian's busybox-static.
pub const BUSYBOX: &str = "/bin/busybox";
/// Debian's QEMU guest agent, which the lab's guests run for `vm exec`.
pub const QEMU_GA: &str = "/usr/sbin/qemu-ga";
/// Debian's passt (and its AVX2 build), behind nestvm's `--net user`.
pub const PASST: [&str; 2] = ["/usr/bin/passt", "/usr/bin/passt.avx2"];

fn have(cmd: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {cmd} >/dev/null 2>&1")])
        .status()
        .is_ok_and(|s| s.success())
}

fn is_static(path: &Path) -> bool {
    // A static executable has no PT_INTERP: `ldd` says so.
    Command::new("ldd")
        .arg(path)
        .output()
        .map(|o| {
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            );
            text.contains("not a dynamic executable") || text.contains("statically linked")
        })
        .unwrap_or(false)
}

/// Runs a command, turning failure into an error with its stderr.
pub fn run(cmd: &mut Command) -> Result<String, LabError> {
    let shown = format!("{cmd:?}").replace('"', "");
    let out = cmd.output().map_err(|e| LabError::Command {
        command: shown.clone(),
        detail: e.to_string(),
    })?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let tail: Vec<&str> = err.lines().rev().take(3).collect();
        return Err(LabError::Command {
            command: shown,
            detail: format!(
                "{} ({})",
                out.status,
                tail.into_iter().rev().collect::<Vec<_>>().join(" / ")
            ),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Makes sure apt's package lists exist (a fresh machine may have none).
pub fn apt_update_once() -> Result<(), LabError> {
    let lists = Path::new("/var/lib/apt/lists");
    let has_lists = std::fs::read_dir(lists)
        .map(|d| {
            d.flatten()
                .any(|e| e.file_name().to_string_lossy().contains("_Packages"))
        })
        .unwrap_or(false);
    if !has_lists {
        say("apt has no package lists yet: running apt-get update");
        run(Command::new("apt-get").arg("update"))?;
    }
    Ok(())
}

/// Installs the Debian packages the lab needs that are not there yet.
pub fn ensure_packages() -> Result<(), LabError> {
    let mut missing = vec![];
    if !have(QEMU) {
        missing.push("qemu-system-x86");
    }
    if !Path::new(BUSYBOX).exists() || !is_static(Path::new(BUSYBOX)) {
        missing.push("busybox-static");
    }
    if !Path::new(QEMU_GA).exists() {
        missing.push("qemu-guest-agent");
    }
    if PASST.iter().any(|p| !Path::new(p).exists()) {
        missing.push("passt");
    }
    if !have("mke2fs")
        && !Path::new("/usr/sbin/mke2fs").exists()
        && !Path::new("/sbin/mke2fs").exists()
    {
        missing.push("e2fsprogs");
    }
    if missing.is_empty() {
        return Ok(());
    }
    say(format!(
        "installing Debian packages the lab needs: {}",
        missing.join(" ")
    ));
    apt_update_once()?;
    let attempt = run(Command::new("apt-get")
        .args(["install", "-y", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"));
    if attempt.is_err() {
        // Stale lists are the usual cause: refresh and try once more.
        run(Command::new("apt-get").arg("update"))?;
        run(Command::new("apt-get")
            .args(["install", "-y", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"))?;
    }
    Ok(())
}

/// The shared libraries an executable needs, as (path in the image, host path).
pub fn shared_libraries(exe: &Path) -> Result<Vec<PathBuf>, LabError> {
    let out = run(Command::new("ldd").arg(exe))?;
    let mut libs = vec![];
    for line in out.lines() {
        // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" or "/lib64/ld-linux-x86-64.so.2 (0x...)"
        let path = match line.split("=>").nth(1) {
            Some(rest) => rest.split_whitespace().next(),
            None => line
                .split_whitespace()
                .next()
                .filter(|p| p.starts_with('/')),
        };
        if let Some(p) = path.filter(|p| p.starts_with('/')) {
            libs.push(PathBuf::from(p));
        }
    }
    Ok(libs)
}

/// QEMU for side-by-side benchmarks inside L1: the emulator, the shared
/// libraries it needs and the microvm firmware, as (path, contents).
pub fn qemu_files() -> Result<Vec<(String, Vec<u8>)>, LabError> {
    let exe = Path::new(QEMU_PATH);
    let firmware = Path::new("/usr/share/qemu/bios-microvm.bin");
    let mut out = Vec::new();
    for p in std::iter::once(exe.to_path_buf())
        .chain(shared_libraries(exe)?)
        .chain(std::iter::once(firmware.to_path_buf()))
    {
        let bytes = std::fs::read(&p).map_err(crate::io_err("cannot read", &p))?;
        out.push((p.to_string_lossy().into_owned(), bytes));
    }
    Ok(out)
}
