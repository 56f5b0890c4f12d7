//! The migration secret: the pre-shared key both ends of a migration hold,
//! and the file it lives in (`--token-file`).
//!
//! `vm receive` writes it: 32 random bytes as 64 hex digits and a newline,
//! in a file it creates (`O_CREAT|O_EXCL|O_NOFOLLOW`, mode 0600: never over
//! an existing file or through a symbolic link). Reading takes exactly that
//! format and nothing weaker: another length, a key with few distinct bytes
//! (typed by hand, not drawn), or a file other users may read is refused
//! with a line that says how to fix it. The key is never printed: its
//! `Debug` hides it, and it goes into URLs, logs and process arguments only
//! as the path of its file.

use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// Bytes of key (Noise's pre-shared keys are 32 bytes).
pub const KEY_LEN: usize = 32;
/// A drawn key has about 30 distinct bytes; one with fewer than this was
/// made up (the chance for a random one is far below 2^-100).
const MIN_DISTINCT: usize = 16;
/// Longer files are not secrets nestvm wrote; nothing past this is read.
const MAX_FILE: u64 = 256;

/// Errors of the secret's file.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    /// The file could not be opened or read.
    #[error(
        "cannot read the migration secret {} ('nestvm vm receive' writes it)",
        path.display()
    )]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A new file could not be made.
    #[error("cannot create the migration secret {}", path.display())]
    Create {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// No random bytes could be had.
    #[error("cannot draw random bytes for a migration secret")]
    Random(#[source] std::io::Error),
    /// Others may read it.
    #[error(
        "the migration secret {} can be read by other users (mode {mode:03o}): run 'chmod 600 {}'",
        path.display(),
        path.display()
    )]
    Exposed {
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// It is not what nestvm writes.
    #[error(
        "{} is not a strong migration secret ({why}): remove it and let 'nestvm vm receive' write a new one, then copy that to the source",
        path.display()
    )]
    Weak {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        why: &'static str,
    },
}

/// A migration key.
#[derive(Clone, PartialEq, Eq)]
pub struct Psk([u8; KEY_LEN]);

impl Psk {
    /// The key `bytes` (for tests; a real key comes from [`read`]).
    pub fn from_bytes(bytes: [u8; KEY_LEN]) -> Self {
        Psk(bytes)
    }

    /// The key's bytes.
    pub fn bytes(&self) -> &[u8; KEY_LEN] {
        &self.0
    }

    /// A new random key.
    pub fn random() -> Result<Self, SecretError> {
        let mut k = [0u8; KEY_LEN];
        std::fs::File::open("/dev/urandom")
            .and_then(|mut f| f.read_exact(&mut k))
            .map_err(SecretError::Random)?;
        Ok(Psk(k))
    }

    /// The file's text: hex digits and a newline.
    /// The key as the 64 hex digits its file holds (for the API's secret
    /// header; never for a URL, a log or a process's arguments).
    pub fn hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    fn text(&self) -> String {
        let mut s: String = self.0.iter().map(|b| format!("{b:02x}")).collect();
        s.push('\n');
        s
    }
}

impl std::fmt::Debug for Psk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Psk(hidden)")
    }
}

impl Drop for Psk {
    fn drop(&mut self) {
        self.0.fill(0);
        std::hint::black_box(&self.0);
    }
}

/// The key in `text`, if it is in the format nestvm writes (trailing
/// whitespace aside).
pub fn parse(text: &str) -> Result<Psk, &'static str> {
    let hex = text.trim_end();
    if hex.len() != 2 * KEY_LEN {
        return Err("not 64 hex digits, i.e. 32 random bytes");
    }
    let mut k = [0u8; KEY_LEN];
    for (i, b) in k.iter_mut().enumerate() {
        *b = hex
            .get(2 * i..2 * i + 2)
            .and_then(|d| u8::from_str_radix(d, 16).ok())
            .ok_or("not hex digits")?;
    }
    let mut seen = [false; 256];
    k.iter().for_each(|&b| seen[usize::from(b)] = true);
    if seen.iter().filter(|&&s| s).count() < MIN_DISTINCT {
        return Err("too regular to have been drawn at random");
    }
    Ok(Psk(k))
}

/// Reads the key in `path`, refusing weak or exposed ones.
pub fn read(path: &Path) -> Result<Psk, SecretError> {
    let read_err = |source| SecretError::Read {
        path: path.to_owned(),
        source,
    };
    let f = std::fs::File::open(path).map_err(read_err)?;
    let mode = f.metadata().map_err(read_err)?.mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(SecretError::Exposed {
            path: path.to_owned(),
            mode,
        });
    }
    let mut text = String::new();
    f.take(MAX_FILE)
        .read_to_string(&mut text)
        .map_err(read_err)?;
    parse(&text).map_err(|why| SecretError::Weak {
        path: path.to_owned(),
        why,
    })
}

/// Writes a new random key to `path`, which must not exist.
pub fn create(path: &Path) -> Result<Psk, SecretError> {
    let key = Psk::random()?;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .map_err(|source| SecretError::Create {
            path: path.to_owned(),
            source,
        })?;
    f.write_all(key.text().as_bytes())
        .and_then(|()| f.sync_all())
        .map_err(|source| SecretError::Create {
            path: path.to_owned(),
            source,
        })?;
    Ok(key)
}

/// Reads the key in `path`, or writes a new one there if there is no
/// file; says whether it wrote one.
pub fn read_or_create(path: &Path) -> Result<(Psk, bool), SecretError> {
    match create(path) {
        Ok(key) => Ok((key, true)),
        Err(SecretError::Create { source, .. })
            if source.kind() == std::io::ErrorKind::AlreadyExists =>
        {
            Ok((read(path)?, false))
        }
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn scratch(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("nestvm-secret-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        let p = d.join(name);
        let _ = std::fs::remove_file(&p);
        p
    }

    #[test]
    fn a_new_secret_is_random_private_and_read_back() {
        let p = scratch("new");
        let (key, created) = read_or_create(&p).unwrap();
        assert!(created);
        let meta = std::fs::symlink_metadata(&p).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        let text = std::fs::read_to_string(&p).unwrap();
        assert_eq!(text.len(), 65, "{text}");
        assert_eq!(read_or_create(&p).unwrap(), (key.clone(), false));
        assert_eq!(read(&p).unwrap(), key);
        assert!(!format!("{key:?}").contains(&text[..8]), "Debug hides it");
        assert_ne!(Psk::random().unwrap(), key);
    }

    #[test]
    fn creating_never_overwrites_or_follows_a_link() {
        let target = scratch("target");
        std::fs::write(&target, "precious").unwrap();
        let link = scratch("link");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        assert!(matches!(create(&link), Err(SecretError::Create { .. })));
        assert!(matches!(create(&target), Err(SecretError::Create { .. })));
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "precious");
    }

    #[test]
    fn weak_or_exposed_secrets_are_refused() {
        for (text, why) in [
            (
                "0123456789abcdef0123456789abcdef\n".to_owned(),
                "64 hex digits",
            ),
            (String::new(), "64 hex digits"),
            ("0123456789abcdef".repeat(4), "too regular"),
            ("00".repeat(32), "too regular"),
            (format!("{}zz", "ab".repeat(31)), "hex digits"),
            ("é".repeat(32), "hex digits"),
        ] {
            let p = scratch("weak");
            std::fs::write(&p, &text).unwrap();
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
            let e = read(&p).unwrap_err().to_string();
            assert!(
                e.contains(why) && e.contains("nestvm vm receive"),
                "{text}: {e}"
            );
        }
        let p = scratch("exposed");
        create(&p).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = read(&p).unwrap_err().to_string();
        assert!(e.contains("chmod 600"), "{e}");
        let good: String = (0u8..32).map(|b| format!("{:02x}", b * 7)).collect();
        assert!(parse(&format!("{good}\n")).is_ok());
        assert!(parse(&good.to_uppercase()).is_ok());
    }
}
