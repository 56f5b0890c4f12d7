//! Assembles the lab's initramfs images, innermost first:
//!
//! - L3: busybox, `/init`, the lab scripts.
//! - L2: the same, plus the KVM modules, `nestvm` with its shared libraries
//!   (and `lab-vsock`, the lab's two ends of a vsock stream, and Debian's
//!   `qemu-ga`, the guest agent `vm exec` and `vm cp` speak to, and its
//!   `passt`, behind `--net user`),
//!   the tiny test guests, and the Debian kernel with the L3 initramfs.
//! - L1: the same as L2 but carrying the L2 initramfs.
//!
//! A scenario script is appended to the L1 image as a second cpio archive
//! (Linux unpacks concatenated archives in order), so one base image serves
//! every scenario.

use std::path::{Path, PathBuf};

use nestvm_guests::{hello, io_loop, ticker, Ending};

/// Iterations of the tickers' busy loop between ticks ('.' on COM1).
pub const TICK_SPIN: u32 = 10_000_000;
/// Ticks of the long ticker (about a minute as L3), which keeps running
/// while the level above saves and resumes the VM around it.
pub const LONG_TICKS: u32 = 600;
/// Ticks of the longer ticker (several minutes as L3), for scenarios that do
/// more around it (resizing its VM's memory).
pub const LONGER_TICKS: u32 = 4 * LONG_TICKS;
/// Ticks of the slow ticker: as long as the long one, but a tick only every
/// ten times as many iterations. Each tick its level echoes takes that
/// level's vCPU out to the VMM above; a scenario that wants to catch the
/// vCPU running L3 (saves, state round trips) keeps those visits rare.
pub const SLOW_TICKS: u32 = LONG_TICKS / 10;

use crate::cpio::Archive;
use crate::debian::Kernel;
use crate::host::{shared_libraries, BUSYBOX, PASST, QEMU_GA};
use crate::{io_err, say, work_dir, LabError};

/// The lab scripts every level carries under /lab.
pub const SCRIPTS: [(&str, &str); 14] = [
    ("acpid", include_str!("../scripts/acpid.sh")),
    ("lib", include_str!("../scripts/lib.sh")),
    ("report", include_str!("../scripts/report.sh")),
    ("shell", include_str!("../scripts/shell.sh")),
    ("l2-tiny-l3", include_str!("../scripts/l2-tiny-l3.sh")),
    ("l2-linux-l3", include_str!("../scripts/l2-linux-l3.sh")),
    ("l2-ticker-l3", include_str!("../scripts/l2-ticker-l3.sh")),
    ("l2-no-nesting", include_str!("../scripts/l2-no-nesting.sh")),
    ("l2-devices", include_str!("../scripts/l2-devices.sh")),
    ("l2-vsock", include_str!("../scripts/l2-vsock.sh")),
    ("l2-agent", include_str!("../scripts/l2-agent.sh")),
    ("l2-usernet", include_str!("../scripts/l2-usernet.sh")),
    ("l2-bench", include_str!("../scripts/l2-bench.sh")),
    (
        "l2-long-ticker-l3",
        include_str!("../scripts/l2-long-ticker-l3.sh"),
    ),
];
const INIT: &str = include_str!("../scripts/init.sh");

/// The tiny guests every level with nestvm carries under /guests.
pub fn guests() -> Vec<(&'static str, Vec<u8>)> {
    vec![
        (
            "hello-reset.elf",
            hello("LAB-TINY: hello from a tiny guest", Ending::Reset),
        ),
        (
            "hello-poweroff.elf",
            hello("LAB-TINY: powering off", Ending::PowerOff),
        ),
        (
            "triple-fault.elf",
            hello("LAB-TINY: about to triple-fault", Ending::TripleFault),
        ),
        (
            "io-loop.elf",
            io_loop(0x80, 100_000, "LAB-TINY: io loop done", Ending::Reset),
        ),
        (
            "halt.elf",
            hello("LAB-TINY: halted until stopped", Ending::HaltForever),
        ),
        (
            "ticker-long.elf",
            ticker(
                LONG_TICKS,
                TICK_SPIN,
                "LAB-TINY: long ticker done",
                Ending::Reset,
            ),
        ),
        (
            "ticker-slow.elf",
            ticker(
                SLOW_TICKS,
                TICK_SPIN * 10,
                "LAB-TINY: long ticker done",
                Ending::Reset,
            ),
        ),
        (
            "ticker-longer.elf",
            ticker(
                LONGER_TICKS,
                TICK_SPIN,
                "LAB-TINY: long ticker done",
                Ending::Reset,
            ),
        ),
    ]
}

/// A built L1 image.
#[derive(Debug, Clone)]
pub struct L1Image {
    /// L1's kernel (the same Debian kernel runs at every level).
    pub vmlinuz: PathBuf,
    /// L1's base initramfs.
    pub initrd: PathBuf,
}

fn read(path: &Path) -> Result<Vec<u8>, LabError> {
    std::fs::read(path).map_err(io_err("cannot read", path))
}

/// Adds `dir` and all its parents (once) to the archive.
fn dirs(a: &mut Archive, seen: &mut Vec<String>, dir: &str) {
    let mut cur = String::new();
    for part in dir.split('/').filter(|p| !p.is_empty()) {
        if !cur.is_empty() {
            cur.push('/');
        }
        cur.push_str(part);
        if !seen.contains(&cur) {
            a.dir(&cur);
            seen.push(cur.clone());
        }
    }
}

/// The parts of a level's image.
struct Level<'a> {
    kernel: &'a Kernel,
    nestvm: Option<&'a Path>,
    child_initrd: Option<Vec<u8>>,
}

fn level_image(level: &Level<'_>) -> Result<Vec<u8>, LabError> {
    let mut a = Archive::new();
    let mut seen = vec![];
    for d in ["bin", "proc", "sys", "dev", "tmp", "run", "lab"] {
        dirs(&mut a, &mut seen, d);
    }
    a.file("bin/busybox", 0o755, &read(Path::new(BUSYBOX))?);
    a.symlink("bin/sh", "busybox");
    a.file("init", 0o755, INIT.as_bytes());
    for (name, text) in SCRIPTS {
        a.file(&format!("lab/{name}.sh"), 0o644, text.as_bytes());
    }
    dirs(&mut a, &mut seen, "etc/modprobe.d");
    if let Some(nestvm) = level.nestvm {
        let moddir = format!("lib/modules/{}", level.kernel.release);
        dirs(&mut a, &mut seen, &moddir);
        for (name, ko) in &level.kernel.modules {
            a.file(&format!("{moddir}/{name}.ko"), 0o644, &read(ko)?);
        }
        a.file(
            &format!("{moddir}/modules.dep"),
            0o644,
            crate::debian::modules_dep().as_bytes(),
        );
        dirs(&mut a, &mut seen, "nestvm");
        a.file("nestvm/nestvm", 0o755, &read(nestvm)?);
        // The lab's vsock ends, built beside nestvm (same libraries), and
        // Debian's guest agent, which `vm exec` speaks to.
        let vsock = nestvm.with_file_name("lab-vsock");
        a.file("nestvm/lab-vsock", 0o755, &read(&vsock)?);
        a.file("nestvm/qemu-ga", 0o755, &read(Path::new(QEMU_GA))?);
        // Debian's passt, behind `--net user` adapters (in /usr/bin, where
        // nestvm finds it, with the AVX2 build it switches to where it can).
        dirs(&mut a, &mut seen, "usr/bin");
        for exe in PASST {
            a.file(exe.trim_start_matches('/'), 0o755, &read(Path::new(exe))?);
        }
        let mut libs = shared_libraries(nestvm)?;
        for exe in [QEMU_GA, PASST[0], PASST[1]] {
            for lib in shared_libraries(Path::new(exe))? {
                if !libs.contains(&lib) {
                    libs.push(lib);
                }
            }
        }
        for lib in libs {
            let inside = lib.to_string_lossy().trim_start_matches('/').to_owned();
            if let Some(parent) = Path::new(&inside).parent() {
                dirs(&mut a, &mut seen, &parent.to_string_lossy());
            }
            // Follow symlinks: the image gets the real bytes under the linked name.
            a.file(&inside, 0o755, &read(&lib)?);
        }
        dirs(&mut a, &mut seen, "guests");
        for (name, bytes) in guests() {
            a.file(&format!("guests/{name}"), 0o644, &bytes);
        }
    }
    if let Some(child) = &level.child_initrd {
        dirs(&mut a, &mut seen, "next");
        a.file("next/vmlinuz", 0o644, &read(&level.kernel.vmlinuz)?);
        a.file("next/initrd", 0o644, child);
    }
    Ok(a.finish())
}

/// Builds the L1 image around `nestvm` (the binary under test).
pub fn build(kernel: &Kernel, nestvm: &Path) -> Result<L1Image, LabError> {
    if !nestvm.exists() {
        return Err(LabError::Missing(format!(
            "{} does not exist: build it first (cargo build --release)",
            nestvm.display()
        )));
    }
    say("assembling the L1, L2 and L3 initramfs images");
    let l3 = level_image(&Level {
        kernel,
        nestvm: None,
        child_initrd: None,
    })?;
    let l2 = level_image(&Level {
        kernel,
        nestvm: Some(nestvm),
        child_initrd: Some(l3),
    })?;
    let l1 = level_image(&Level {
        kernel,
        nestvm: Some(nestvm),
        child_initrd: Some(l2),
    })?;
    let dir = work_dir();
    std::fs::create_dir_all(&dir).map_err(io_err("cannot create", &dir))?;
    let initrd = dir.join("l1-base.cpio");
    write_atomic(&initrd, &l1)?;
    Ok(L1Image {
        vmlinuz: kernel.vmlinuz.clone(),
        initrd,
    })
}

/// An ext2 image of `size_mib` MiB holding `files` (name, contents), made
/// with e2fsprogs' `mke2fs -d` (no root, no loop device needed).
pub fn ext2_image(name: &str, size_mib: u32, files: &[(&str, &[u8])]) -> Result<Vec<u8>, LabError> {
    let dir = work_dir().join(format!("{name}.d"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).map_err(io_err("cannot create", &dir))?;
    for (f, contents) in files {
        let p = dir.join(f);
        std::fs::write(&p, contents).map_err(io_err("cannot write", &p))?;
    }
    let img = work_dir().join(format!("{name}.img"));
    let _ = std::fs::remove_file(&img);
    let mke2fs = ["/usr/sbin/mke2fs", "/sbin/mke2fs"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .unwrap_or("mke2fs");
    crate::host::run(
        std::process::Command::new(mke2fs)
            .args(["-q", "-F", "-t", "ext2", "-d"])
            .arg(&dir)
            .arg(&img)
            .arg(format!("{size_mib}M")),
    )?;
    let bytes = read(&img)?;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(bytes)
}

/// Writes `bytes` to `path` through a temporary file and a rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), LabError> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).map_err(io_err("cannot write", &tmp))?;
    std::fs::rename(&tmp, path).map_err(io_err("cannot rename into", path))
}

/// The L1 initramfs for one scenario: the base image plus `/lab/scenario.sh`
/// and the scenario's files.
pub fn with_scenario(image: &L1Image, sc: &crate::scenario::Scenario) -> Result<PathBuf, LabError> {
    let mut bytes = read(&image.initrd)?;
    let mut a = Archive::new();
    a.file("lab/scenario.sh", 0o644, sc.script.as_bytes());
    let mut seen = vec![];
    for (path, contents) in &sc.files {
        let path = path.trim_start_matches('/');
        if let Some(parent) = Path::new(path).parent() {
            dirs(&mut a, &mut seen, &parent.to_string_lossy());
        }
        a.file(path, 0o755, contents);
    }
    bytes.extend_from_slice(&a.finish());
    let path = work_dir().join(format!("l1-{}.cpio", sc.name));
    write_atomic(&path, &bytes)?;
    Ok(path)
}
