//! `nestvm image debian OUT`: a bootable Debian system to start from, built
//! with mmdebstrap from Debian's own packages — systemd and udev, the stock
//! kernel with its initramfs-tools initrd, Debian's QEMU guest agent
//! listening on vsock (what `vm exec` and `vm cp` speak to), DHCP on every
//! Ethernet adapter through systemd-networkd (so `--net user` just works),
//! and a root login without password on the serial console.
//!
//! OUT is a raw ext4-compatible disk (ext3: ext2 from mmdebstrap, grown to
//! `--size` and given a journal), the guest's `/dev/vda` with no partition
//! table; the kernel and initrd are written beside it as `OUT.vmlinuz` and
//! `OUT.initrd`, which `vm new NAME --image OUT` takes with it. Everything is
//! built in a directory beside OUT and renamed into place last, the image
//! after its kernel, so an interrupted build leaves no OUT at all; an
//! existing OUT is never overwritten.
//!
//! mmdebstrap runs as root (root mode) or, for an ordinary user, in a user
//! namespace (unshare mode, which needs the user's /etc/subuid range), and
//! genext2fs writes the filesystem, so no step needs root.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{anyhow, Context};
use indicatif::{ProgressBar, ProgressStyle};

use crate::common::{runtime, usage, Failure};

/// The packages every image has, beside `--packages`.
pub const BASE_PACKAGES: &[&str] = &[
    "systemd-sysv",
    "udev",
    "kmod",
    "linux-image-amd64",
    "initramfs-tools",
    "qemu-guest-agent",
    "systemd-resolved",
    "iproute2",
];
/// The guest agent's vsock port (the one `vm exec` uses by default).
const AGENT_PORT: u32 = nestvm_vmm::agent::DEFAULT_PORT;
/// The tools the build runs, and the Debian package of each.
const TOOLS: &[(&str, &str)] = &[
    ("mmdebstrap", "mmdebstrap"),
    ("genext2fs", "genext2fs"),
    ("e2fsck", "e2fsprogs"),
    ("resize2fs", "e2fsprogs"),
    ("tune2fs", "e2fsprogs"),
];

/// What `image debian` is asked for.
pub struct DebianImage {
    /// The disk image to write.
    pub out: PathBuf,
    /// Debian release (suite or codename).
    pub release: String,
    /// Packages beyond [`BASE_PACKAGES`].
    pub packages: Vec<String>,
    /// The disk's size in bytes.
    pub size: u64,
    /// A Debian mirror, if not mmdebstrap's default.
    pub mirror: Option<String>,
}

/// Where the kernel of image `out` goes.
pub fn kernel_of(out: &Path) -> PathBuf {
    with_suffix(out, ".vmlinuz")
}

/// Where the initrd of image `out` goes.
pub fn initrd_of(out: &Path) -> PathBuf {
    with_suffix(out, ".initrd")
}

/// The kernel command line for a VM booting image `out` (`/dev/vda`).
pub const CMDLINE: &str = "root=/dev/vda ro console=ttyS0 reboot=k panic=-1";

fn with_suffix(p: &Path, suffix: &str) -> PathBuf {
    let mut s = p.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

/// Checks a request before anything is written: names Debian could have,
/// a size a system fits in, an OUT that does not exist yet in a directory
/// that does, and the tools present.
pub fn check(req: &DebianImage) -> Result<(), Failure> {
    let name_ok = |s: &str, extra: &str| {
        !s.is_empty()
            && s.len() <= 64
            && s.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
            && s.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || extra.contains(c))
    };
    if !name_ok(&req.release, "-") {
        return Err(usage(anyhow!(
            "invalid --release '{}': use a Debian codename or suite such as bookworm",
            req.release
        )));
    }
    if let Some(p) = req.packages.iter().find(|p| !name_ok(p, "+-.")) {
        return Err(usage(anyhow!(
            "invalid package name '{p}' in --packages: use Debian package names, comma-separated"
        )));
    }
    if req.size < 1 << 30 {
        return Err(usage(anyhow!(
            "--size must be at least 1G: a Debian system with its kernel needs that"
        )));
    }
    for p in [req.out.clone(), kernel_of(&req.out), initrd_of(&req.out)] {
        if p.symlink_metadata().is_ok() {
            return Err(usage(anyhow!(
                "{} already exists: remove it or choose another OUT",
                p.display()
            )));
        }
    }
    let dir = parent(&req.out);
    if !dir.is_dir() {
        return Err(usage(anyhow!(
            "{} is not a directory: create it first",
            dir.display()
        )));
    }
    let mut missing: Vec<&str> = TOOLS
        .iter()
        .filter(|(name, _)| find_tool(name).is_none())
        .map(|(_, pkg)| *pkg)
        .collect();
    missing.dedup();
    if !missing.is_empty() {
        return Err(usage(anyhow!(
            "image debian needs {}: apt install {}",
            missing.join(", "),
            missing.join(" ")
        )));
    }
    Ok(())
}

fn parent(p: &Path) -> PathBuf {
    match p.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_owned(),
        _ => PathBuf::from("."),
    }
}

/// Where program `name` is: on PATH, or in the sbin directories an
/// ordinary user's PATH often lacks (e2fsck, resize2fs, tune2fs).
fn find_tool(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/bin:/bin".into());
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")])
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// The program to run for `name` ([`check`] made sure it is there).
fn tool(name: &str) -> PathBuf {
    find_tool(name).unwrap_or_else(|| PathBuf::from(name))
}

/// Builds the image (see the module's header).
pub fn build(req: &DebianImage) -> Result<(), Failure> {
    check(req)?;
    let work = Work::create(&req.out)?;
    crate::image_files::write_overlay(&work.dir.join("overlay"), AGENT_PORT).map_err(runtime)?;
    let fs = work.dir.join("root.ext2");
    mmdebstrap(req, &work.dir, &fs)?;
    eprintln!("image: growing the filesystem and giving it a journal");
    // e2fsck exits 1 when it fixed something: genext2fs leaves counts for
    // it to fix; only 4 and above are errors.
    let fsck = Command::new(tool("e2fsck")).arg("-fp").arg(&fs).output();
    match fsck {
        Ok(o) if o.status.code().is_some_and(|c| c < 4) => {}
        Ok(o) => return Err(failed("e2fsck", &o.stderr)),
        Err(e) => return Err(runtime(anyhow!("cannot run e2fsck: {e}"))),
    }
    let size = format!("{}K", req.size / 1024);
    run_tool(Command::new(tool("resize2fs")).arg(&fs).arg(&size))?;
    run_tool(
        Command::new(tool("tune2fs"))
            .args(["-j", "-L", "nestvm-root"])
            .arg(&fs),
    )?;
    for f in ["vmlinuz", "initrd"] {
        let meta = std::fs::metadata(work.dir.join(f))
            .with_context(|| format!("mmdebstrap left no {f}"))
            .map_err(runtime)?;
        if meta.len() < 1 << 20 {
            return Err(runtime(anyhow!(
                "the image's {f} is only {} bytes",
                meta.len()
            )));
        }
    }
    work.finish(&req.out)
}

fn run_tool(cmd: &mut Command) -> Result<(), Failure> {
    let name = cmd.get_program().to_string_lossy().into_owned();
    let out = cmd
        .output()
        .map_err(|e| runtime(anyhow!("cannot run {name}: {e}")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(failed(&name, &out.stderr))
    }
}

fn failed(what: &str, stderr: &[u8]) -> Failure {
    let text = String::from_utf8_lossy(stderr);
    let last = text
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("");
    runtime(anyhow!("{what} failed: {last}"))
}

/// A shell word that means exactly `s`.
fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// Runs mmdebstrap into the ext2 filesystem `fs`, copying the kernel and
/// initrd out into `work`, with its progress shown.
fn mmdebstrap(req: &DebianImage, work: &Path, fs: &Path) -> Result<(), Failure> {
    let mut include: Vec<String> = BASE_PACKAGES.iter().map(|s| s.to_string()).collect();
    include.extend(req.packages.iter().cloned());
    let w = sh_quote(&work.to_string_lossy());
    let mut cmd = Command::new(tool("mmdebstrap"));
    cmd.args(["--variant=minbase", "--verbose"])
        .arg(format!("--include={}", include.join(",")))
        .args([
            "--dpkgopt=path-exclude=/usr/share/doc/*",
            "--dpkgopt=path-exclude=/usr/share/man/*",
            "--dpkgopt=path-exclude=/usr/share/locale/*",
        ])
        // (Inside the hook, as root of the build's namespace, `cp -a`
        // makes the overlay root's in the image in either mode.)
        .arg(format!("--customize-hook=cp -a {w}/overlay/. \"$1\"/"))
        .arg("--customize-hook=chroot \"$1\" passwd -d root")
        .arg("--customize-hook=chroot \"$1\" systemctl enable systemd-networkd systemd-resolved")
        .arg(format!(
            "--customize-hook=cp \"$1\"/boot/vmlinuz-* {w}/vmlinuz && cp \"$1\"/boot/initrd.img-* {w}/initrd"
        ))
        .arg(&req.release)
        .arg(fs);
    if let Some(m) = &req.mirror {
        cmd.arg(m);
    }
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| runtime(anyhow!("cannot run mmdebstrap: {e}")))?;
    let bar = progress();
    let mut log = std::fs::File::create(work.join("mmdebstrap.log")).map_err(runtime)?;
    let mut tail: Vec<String> = Vec::new();
    if let Some(err) = child.stderr.take() {
        for line in BufReader::new(err).lines().map_while(Result::ok) {
            let _ = writeln!(log, "{line}");
            if let Some(info) = line.strip_prefix("I: ") {
                bar.set_message(info.chars().take(70).collect::<String>());
                if bar.is_hidden() {
                    eprintln!("image: {info}");
                }
            }
            tail.push(line);
            if tail.len() > 20 {
                tail.remove(0);
            }
        }
    }
    let status = child.wait().map_err(runtime)?;
    bar.finish_and_clear();
    if !status.success() {
        return Err(runtime(anyhow!(
            "mmdebstrap failed ({status}): {}",
            tail.iter()
                .rev()
                .find(|l| l.starts_with("E: "))
                .or(tail.last())
                .map_or("", String::as_str)
        )));
    }
    Ok(())
}

fn progress() -> ProgressBar {
    use std::io::IsTerminal;
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new_spinner();
    if let Ok(style) = ProgressStyle::with_template("{spinner} [{elapsed}] {msg}") {
        bar.set_style(style);
    }
    bar.enable_steady_tick(std::time::Duration::from_millis(200));
    bar
}

/// The build's own directory beside OUT, removed unless finished.
struct Work {
    dir: PathBuf,
}

impl Work {
    fn create(out: &Path) -> Result<Self, Failure> {
        let name = out
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let dir = parent(out).join(format!(".{name}.building-{}", std::process::id()));
        std::fs::create_dir(&dir)
            .map_err(|e| runtime(anyhow!("cannot create {}: {e}", dir.display())))?;
        Ok(Self { dir })
    }

    /// Moves the kernel, the initrd and then the image into place, each
    /// synced first, and the directory after.
    fn finish(self, out: &Path) -> Result<(), Failure> {
        for (from, to) in [
            ("vmlinuz", kernel_of(out)),
            ("initrd", initrd_of(out)),
            ("root.ext2", out.to_owned()),
        ] {
            let from = self.dir.join(from);
            std::fs::File::open(&from)
                .and_then(|f| f.sync_all())
                .and_then(|()| std::fs::rename(&from, &to))
                .map_err(|e| runtime(anyhow!("cannot move {} into place: {e}", to.display())))?;
        }
        if let Ok(d) = std::fs::File::open(parent(out)) {
            let _ = d.sync_all();
        }
        Ok(())
    }
}

impl Drop for Work {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(out: &Path) -> DebianImage {
        DebianImage {
            out: out.to_owned(),
            release: "bookworm".into(),
            packages: vec![],
            size: 2 << 30,
            mirror: None,
        }
    }

    #[test]
    fn bad_requests_are_refused_before_anything_is_written() {
        let dir = std::env::temp_dir().join(format!("nestvm-image-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let out = dir.join("d.img");
        let bad = |r: DebianImage, says: &str| {
            let e = check(&r).expect_err("refused");
            assert_eq!(e.code, 2);
            assert!(e.error.to_string().contains(says), "{}", e.error);
        };
        bad(
            DebianImage {
                release: "Bookworm;rm".into(),
                ..req(&out)
            },
            "--release",
        );
        bad(
            DebianImage {
                packages: vec!["vim".into(), "a b".into()],
                ..req(&out)
            },
            "'a b'",
        );
        bad(
            DebianImage {
                size: 100 << 20,
                ..req(&out)
            },
            "at least 1G",
        );
        bad(req(&dir.join("nowhere/d.img")), "not a directory");
        std::fs::write(kernel_of(&out), b"mine").unwrap();
        bad(req(&out), "already exists");
        assert_eq!(std::fs::read(kernel_of(&out)).unwrap(), b"mine");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_path_is_one_shell_word() {
        assert_eq!(sh_quote("/tmp/a b"), "'/tmp/a b'");
        assert_eq!(sh_quote("it's"), r"'it'\''s'");
        assert_eq!(
            kernel_of(Path::new("/x/d.img")),
            Path::new("/x/d.img.vmlinuz")
        );
    }
}
