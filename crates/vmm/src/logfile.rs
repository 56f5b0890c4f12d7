//! Log files a guest cannot grow without bound, and log lines a guest
//! cannot flood.
//!
//! - [`RotatingFile`]: `console.log` — past its cap the file is renamed
//!   `NAME.1` (replacing an older one) and a new one is started, so at most
//!   twice the cap stays on disk.
//! - [`RateLimited`]: wraps the process's logger; each place in the code
//!   that logs gets a burst of [`BURST`] lines, then one a second, and the
//!   next line it is allowed says how many were dropped meanwhile. A guest
//!   that makes the VMM warn in a loop costs a few lines a second.
//! - [`cap_stderr`]: `vmm.log` is the VMM's stderr; once the logger sees
//!   it past its cap it is rotated the same way and stderr moved to the new
//!   file (`dup2`), so `eprintln!` and the logger both follow.

use std::collections::HashMap;
use std::fs::File;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Lines a call site may log at once before it is slowed down.
pub const BURST: u32 = 20;
/// How often a slowed-down call site gets a line through.
pub const REFILL: Duration = Duration::from_secs(1);

fn open_log(path: &Path, append: bool) -> std::io::Result<File> {
    std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .append(append)
        .truncate(!append)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
}

/// `PATH.1`, where a rotated log goes.
fn rotated(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".1");
    PathBuf::from(name)
}

/// A log file rotated at its cap.
pub struct RotatingFile {
    path: PathBuf,
    file: File,
    size: u64,
    cap: u64,
}

impl RotatingFile {
    /// Opens `path` for appending (a resumed VM's log goes on), rotating at
    /// `cap` bytes.
    pub fn open(path: &Path, cap: u64, append: bool) -> std::io::Result<Self> {
        let file = open_log(path, append)?;
        let size = file.metadata()?.len();
        Ok(Self {
            path: path.to_owned(),
            file,
            size,
            cap,
        })
    }

    fn rotate(&mut self) -> std::io::Result<()> {
        std::fs::rename(&self.path, rotated(&self.path))?;
        self.file = open_log(&self.path, false)?;
        self.size = 0;
        Ok(())
    }
}

impl Write for RotatingFile {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.size > 0 && self.size.saturating_add(buf.len() as u64) > self.cap {
            self.rotate()?;
        }
        // A single write larger than the cap still goes in whole: the next
        // one rotates it away.
        let n = self.file.write(buf)?;
        self.size += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
}

/// Per call site budgets: a token bucket each.
#[derive(Default)]
pub struct Limiter {
    sites: HashMap<(&'static str, u32), Bucket>,
}

struct Bucket {
    tokens: u32,
    last: Instant,
    dropped: u64,
}

/// What the limiter says of one line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Log it; `dropped` lines of this site were left out before it.
    Log {
        /// Lines dropped since the last one logged.
        dropped: u64,
    },
    /// Leave it out.
    Drop,
}

impl Limiter {
    /// Whether a line from `site` may be logged at `now`.
    pub fn admit(&mut self, site: (&'static str, u32), now: Instant) -> Verdict {
        let b = self.sites.entry(site).or_insert(Bucket {
            tokens: BURST,
            last: now,
            dropped: 0,
        });
        let refills = now.saturating_duration_since(b.last).as_millis() / REFILL.as_millis();
        if refills > 0 {
            b.tokens = b
                .tokens
                .saturating_add(refills.min(u128::from(BURST)) as u32)
                .min(BURST);
            b.last = now;
        }
        if b.tokens == 0 {
            b.dropped += 1;
            return Verdict::Drop;
        }
        b.tokens -= 1;
        Verdict::Log {
            dropped: std::mem::take(&mut b.dropped),
        }
    }
}

/// Where stderr is rotated to, once [`cap_stderr`] is called.
struct StderrCap {
    path: PathBuf,
    cap: u64,
}

static STDERR_CAP: Mutex<Option<StderrCap>> = Mutex::new(None);

/// Caps `path`, the file this process's stderr (and stdout) go to, at
/// `cap` bytes: the logger rotates it when it sees it past the cap.
pub fn cap_stderr(path: &Path, cap: u64) {
    *STDERR_CAP.lock().unwrap_or_else(|p| p.into_inner()) = Some(StderrCap {
        path: path.to_owned(),
        cap,
    });
}

/// Rotates the capped stderr file if it has grown past its cap.
fn rotate_stderr_if_full() {
    let guard = STDERR_CAP.lock().unwrap_or_else(|p| p.into_inner());
    let Some(c) = guard.as_ref() else { return };
    let size = match nix::sys::stat::fstat(libc::STDERR_FILENO) {
        Ok(st) => u64::try_from(st.st_size).unwrap_or(0),
        Err(_) => return,
    };
    if size <= c.cap {
        return;
    }
    if let Err(e) = redirect_to_new(&c.path) {
        // Nowhere better to say it: the old file takes one more line.
        let _ = writeln!(
            std::io::stderr(),
            "nestvm: cannot rotate {}: {e}",
            c.path.display()
        );
    }
}

/// Renames `path` to `PATH.1` and points stdout and stderr at a new `path`.
fn redirect_to_new(path: &Path) -> std::io::Result<()> {
    std::fs::rename(path, rotated(path))?;
    let file = open_log(path, false)?;
    for fd in [libc::STDOUT_FILENO, libc::STDERR_FILENO] {
        nix::unistd::dup2(file.as_raw_fd(), fd).map_err(std::io::Error::from)?;
    }
    Ok(())
}

/// A logger that passes each call site's lines through a [`Limiter`].
pub struct RateLimited<L> {
    inner: L,
    limiter: Mutex<Limiter>,
}

impl<L: log::Log> RateLimited<L> {
    /// Wraps `inner`.
    pub fn new(inner: L) -> Self {
        Self {
            inner,
            limiter: Mutex::new(Limiter::default()),
        }
    }
}

impl<L: log::Log> log::Log for RateLimited<L> {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        self.inner.enabled(metadata)
    }

    fn log(&self, record: &log::Record<'_>) {
        if !self.inner.enabled(record.metadata()) {
            return;
        }
        let site = (
            record.file_static().unwrap_or("?"),
            record.line().unwrap_or(0),
        );
        let verdict = self
            .limiter
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .admit(site, Instant::now());
        match verdict {
            Verdict::Drop => {}
            Verdict::Log { dropped: 0 } => {
                rotate_stderr_if_full();
                self.inner.log(record);
            }
            Verdict::Log { dropped } => {
                rotate_stderr_if_full();
                self.inner.log(
                    &log::Record::builder()
                        .args(format_args!(
                            "{} ({dropped} more like it dropped)",
                            record.args()
                        ))
                        .metadata(record.metadata().clone())
                        .module_path(record.module_path())
                        .file(record.file())
                        .line(record.line())
                        .build(),
                );
            }
        }
    }

    fn flush(&self) {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_call_site_gets_a_burst_then_one_a_second_and_hears_of_drops() {
        let mut l = Limiter::default();
        let t0 = Instant::now();
        let site = ("a.rs", 7);
        for _ in 0..BURST {
            assert_eq!(l.admit(site, t0), Verdict::Log { dropped: 0 });
        }
        for _ in 0..1000 {
            assert_eq!(l.admit(site, t0), Verdict::Drop);
        }
        // Another site is not held back by this one.
        assert_eq!(l.admit(("b.rs", 1), t0), Verdict::Log { dropped: 0 });
        assert_eq!(l.admit(site, t0 + REFILL), Verdict::Log { dropped: 1000 });
        assert_eq!(l.admit(site, t0 + REFILL), Verdict::Drop);
        // A long quiet spell refills the burst, no more.
        let later = t0 + REFILL * 1000;
        let logged = (0..BURST + 5)
            .filter(|_| l.admit(site, later) != Verdict::Drop)
            .count();
        assert_eq!(logged, BURST as usize);
    }

    #[test]
    fn a_file_past_its_cap_is_rotated_keeping_one_old_file() {
        let dir = std::env::temp_dir().join(format!("nestvm-logfile-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("console.log");
        let _ = std::fs::remove_file(rotated(&path));
        let mut f = RotatingFile::open(&path, 1000, false).unwrap();
        for _ in 0..35 {
            f.write_all(&[b'x'; 100]).unwrap();
        }
        let size = |p: &Path| std::fs::metadata(p).unwrap().len();
        // 3500 bytes written through a 1000-byte cap: the current file and
        // one rotated file, each within the cap; older output is gone.
        assert_eq!(size(&path), 500);
        assert_eq!(size(&rotated(&path)), 1000);
        assert!(!dir.join("console.log.2").exists());
        // Reopened for appending, the size already there counts.
        drop(f);
        let mut f = RotatingFile::open(&path, 1000, true).unwrap();
        f.write_all(&[b'y'; 100]).unwrap();
        assert_eq!(size(&path), 600);
        f.write_all(&[b'z'; 500]).unwrap();
        assert_eq!((size(&path), size(&rotated(&path))), (500, 600));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
