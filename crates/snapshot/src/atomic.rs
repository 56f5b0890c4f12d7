//! Crash-safe writes: a file or a whole directory appears complete under its
//! final name, or not at all.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// An I/O error with the path it concerns.
#[derive(Debug, thiserror::Error)]
#[error("cannot {what} {path}")]
pub struct AtomicError {
    /// The operation.
    pub what: &'static str,
    /// The path.
    pub path: PathBuf,
    /// The cause.
    #[source]
    pub source: std::io::Error,
}

fn err(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> AtomicError {
    let path = path.to_owned();
    move |source| AtomicError { what, path, source }
}

/// Creates `dir` and any missing parents, each private to its owner (0700
/// whatever the umask): what a VM's directory holds (memory images,
/// checkpoints) is for its owner alone.
pub fn create_private_dir_all(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}

/// fsyncs a directory, so a rename or creation in it is durable.
pub fn sync_dir(dir: &Path) -> Result<(), AtomicError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(err("sync directory", dir))
}

/// Creates `path` (mode `mode`) with `bytes` and fsyncs it. For files inside
/// a directory that [`publish_dir`] renames into place afterwards.
pub fn write_synced(path: &Path, bytes: &[u8], mode: u32) -> Result<(), AtomicError> {
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(path)
        .map_err(err("create", path))?;
    f.write_all(bytes).map_err(err("write", path))?;
    f.sync_all().map_err(err("sync", path))
}

/// Replaces `path` with `bytes`: temporary file, fsync, rename, fsync of
/// the directory.
pub fn write_file(path: &Path, bytes: &[u8], mode: u32) -> Result<(), AtomicError> {
    let tmp = path.with_extension("tmp");
    write_synced(&tmp, bytes, mode)?;
    std::fs::rename(&tmp, path).map_err(err("rename into", path))?;
    sync_dir(path.parent().unwrap_or(Path::new(".")))
}

/// Puts the complete directory `staged` in place as `dest`, replacing what
/// was there: `dest` is first renamed aside, then `staged` renamed to
/// `dest`, then the old one removed. A crash leaves `dest` either the old
/// or the new complete directory (or, between the two renames, the old one
/// under `dest.old`, which [`recover_dir`] puts back).
pub fn publish_dir(staged: &Path, dest: &Path) -> Result<(), AtomicError> {
    let old = aside(dest);
    let _ = std::fs::remove_dir_all(&old);
    let had_old = dest.exists();
    if had_old {
        std::fs::rename(dest, &old).map_err(err("move aside", dest))?;
    }
    std::fs::rename(staged, dest).map_err(err("rename into", dest))?;
    sync_dir(dest.parent().unwrap_or(Path::new(".")))?;
    if had_old {
        let _ = std::fs::remove_dir_all(&old);
    }
    Ok(())
}

fn aside(dest: &Path) -> PathBuf {
    let mut name = dest.file_name().unwrap_or_default().to_os_string();
    name.push(".old");
    dest.with_file_name(name)
}

/// After a crash: puts a directory left aside by [`publish_dir`] back if
/// `dest` is missing, and removes a half-written `staged` directory.
pub fn recover_dir(staged: &Path, dest: &Path) {
    let old = aside(dest);
    if !dest.exists() && old.exists() {
        let _ = std::fs::rename(&old, dest);
    } else {
        let _ = std::fs::remove_dir_all(&old);
    }
    let _ = std::fs::remove_dir_all(staged);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("nestvm-atomic-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn files_are_replaced_whole() {
        let d = scratch("file");
        let p = d.join("f");
        write_file(&p, b"one", 0o600).unwrap();
        write_file(&p, b"two", 0o600).unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        assert!(!d.join("f.tmp").exists());
    }

    #[test]
    fn directories_are_published_and_recovered() {
        let d = scratch("dir");
        let dest = d.join("saved");
        for v in [b"v1", b"v2"] {
            let staged = d.join("saved.tmp");
            std::fs::create_dir_all(&staged).unwrap();
            write_synced(&staged.join("state"), v, 0o600).unwrap();
            publish_dir(&staged, &dest).unwrap();
            assert_eq!(std::fs::read(dest.join("state")).unwrap(), v);
        }
        // A crash between the two renames: the old one comes back.
        std::fs::rename(&dest, d.join("saved.old")).unwrap();
        std::fs::create_dir_all(d.join("saved.tmp")).unwrap();
        recover_dir(&d.join("saved.tmp"), &dest);
        assert_eq!(std::fs::read(dest.join("state")).unwrap(), b"v2");
        assert!(!d.join("saved.tmp").exists());
    }
}
