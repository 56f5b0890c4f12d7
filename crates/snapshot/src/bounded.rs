//! Reading a whole file that may be hostile: at most a limit of bytes, found
//! out before anything is allocated for it (its size as the filesystem
//! tells it) and held to while reading (a file that grows, or is no file at
//! all, such as a FIFO or `/dev/zero` behind a symlink, is never read past
//! the limit).

use std::io::Read;
use std::path::Path;

/// Why a bounded read failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum BoundedError {
    /// The file cannot be opened or read.
    #[error("cannot read it")]
    Io(#[source] std::io::Error),
    /// It holds more than the limit.
    #[error("it is larger than {0} bytes")]
    TooLarge(u64),
}

/// The bytes of `path`, if there are at most `limit` of them.
pub(crate) fn read(path: &Path, limit: u64) -> Result<Vec<u8>, BoundedError> {
    let file = std::fs::File::open(path).map_err(BoundedError::Io)?;
    let len = file.metadata().map_err(BoundedError::Io)?.len();
    if len > limit {
        return Err(BoundedError::TooLarge(limit));
    }
    let mut bytes = Vec::with_capacity(len as usize);
    file.take(limit + 1)
        .read_to_end(&mut bytes)
        .map_err(BoundedError::Io)?;
    if bytes.len() as u64 > limit {
        return Err(BoundedError::TooLarge(limit));
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_over_the_limit_are_refused_unread() {
        let d = std::env::temp_dir().join(format!("nestvm-bounded-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        let p = d.join("f");
        std::fs::write(&p, b"12345").unwrap();
        assert_eq!(read(&p, 5).unwrap(), b"12345");
        assert!(matches!(read(&p, 4), Err(BoundedError::TooLarge(4))));
        // A sparse terabyte is refused by its size, not read.
        std::fs::File::create(&p).unwrap().set_len(1 << 40).unwrap();
        assert!(matches!(read(&p, 1 << 20), Err(BoundedError::TooLarge(_))));
        // A file whose size says nothing is still not read past the limit.
        assert!(matches!(
            read(Path::new("/dev/zero"), 4096),
            Err(BoundedError::TooLarge(4096))
        ));
        assert!(matches!(
            read(&d.join("missing"), 1),
            Err(BoundedError::Io(_))
        ));
    }
}
