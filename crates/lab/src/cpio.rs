//! A writer for the "newc" cpio format that Linux unpacks as its initramfs.

use std::io::{self, Write};

/// Builds a newc archive in memory.
#[derive(Default)]
pub struct Archive {
    out: Vec<u8>,
    ino: u32,
}

impl Archive {
    /// An empty archive.
    pub fn new() -> Self {
        Self::default()
    }

    fn entry(&mut self, name: &str, mode: u32, data: &[u8]) {
        self.ino += 1;
        let header = format!(
            "070701{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}",
            self.ino,
            mode,
            0, // uid
            0, // gid
            1, // nlink
            0, // mtime
            data.len(),
            0,
            0,
            0,
            0,
            name.len() + 1,
            0
        );
        self.out.extend_from_slice(header.as_bytes());
        self.out.extend_from_slice(name.as_bytes());
        self.out.push(0);
        self.pad();
        self.out.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        while self.out.len() % 4 != 0 {
            self.out.push(0);
        }
    }

    /// Adds a directory (parents must be added first).
    pub fn dir(&mut self, name: &str) -> &mut Self {
        self.entry(name, 0o040755, &[]);
        self
    }

    /// Adds a regular file with permission bits `perm`.
    pub fn file(&mut self, name: &str, perm: u32, data: &[u8]) -> &mut Self {
        self.entry(name, 0o100000 | (perm & 0o7777), data);
        self
    }

    /// Adds a symbolic link.
    pub fn symlink(&mut self, name: &str, target: &str) -> &mut Self {
        self.entry(name, 0o120777, target.as_bytes());
        self
    }

    /// Ends the archive and returns its bytes.
    pub fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, &[]);
        // Initramfs archives may be concatenated; 512-byte padding keeps tools happy.
        while self.out.len() % 512 != 0 {
            self.out.push(0);
        }
        self.out
    }

    /// Writes the finished archive to `w`.
    pub fn write_to(self, mut w: impl Write) -> io::Result<()> {
        w.write_all(&self.finish())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newc_headers_and_padding() {
        let mut a = Archive::new();
        a.dir("bin")
            .file("bin/x", 0o755, b"hello")
            .symlink("sh", "bin/x");
        let bytes = a.finish();
        assert_eq!(bytes.len() % 512, 0);
        assert!(bytes.starts_with(b"070701"));
        let text = String::from_utf8_lossy(&bytes);
        assert!(text.contains("bin/x\0"));
        assert!(text.contains("hello"));
        assert!(text.contains("TRAILER!!!"));
        // Every header starts on a 4-byte boundary.
        for (i, _) in text.match_indices("070701") {
            assert_eq!(i % 4, 0);
        }
    }

    /// Cross-checks with the system's cpio when it is installed.
    #[test]
    fn system_cpio_lists_our_archive() {
        let Ok(status) = std::process::Command::new("cpio").arg("--version").output() else {
            eprintln!("cpio not installed: cross-check skipped (the format test above still ran)");
            return;
        };
        assert!(status.status.success());
        let mut a = Archive::new();
        a.dir("d").file("d/f", 0o644, b"data").symlink("l", "d/f");
        let path = std::env::temp_dir().join(format!("nestvm-cpio-{}.cpio", std::process::id()));
        std::fs::write(&path, a.finish()).unwrap();
        let out = std::process::Command::new("cpio")
            .args(["-t", "-F"])
            .arg(&path)
            .output()
            .unwrap();
        let listing = String::from_utf8_lossy(&out.stdout);
        assert_eq!(listing.lines().collect::<Vec<_>>(), vec!["d", "d/f", "l"]);
    }
}
