//! A VM's checkpoints as the inventory keeps them: the `checkpoints/`
//! folder of its directory, one folder per checkpoint (in
//! [`nestvm_snapshot::layer`]'s format, written by the VMM), and `CURRENT`,
//! naming the checkpoint the VM's present state descends from (the parent
//! of the next one). Listing, the name rule, the current pointer and removal
//! (a checkpoint's pages are folded into its children first, so they stay
//! whole) need no VMM. Callers hold the VM's command lock.

use std::path::{Path, PathBuf};

use nestvm_snapshot::atomic;
pub use nestvm_snapshot::layer::Meta;
use nestvm_snapshot::layer::{self, LayerError};

/// The pointer file in the checkpoints folder.
const CURRENT_FILE: &str = "CURRENT";

/// Errors of the checkpoint bookkeeping.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// A name that cannot be a checkpoint's.
    #[error("invalid checkpoint name '{0}': use up to 64 letters, digits, '-', '_' or '.'")]
    InvalidName(String),
    /// A new checkpoint's name is taken.
    #[error("a checkpoint named '{0}' exists: pick another name")]
    Exists(String),
    /// No checkpoint of that name.
    #[error("no checkpoint named '{0}'")]
    NotFound(String),
    /// A checkpoint's files.
    #[error(transparent)]
    Layer(#[from] LayerError),
    /// Writing the `CURRENT` pointer.
    #[error(transparent)]
    Atomic(#[from] atomic::AtomicError),
    /// Another file operation.
    #[error("cannot {what} {path}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> CheckpointError {
    let path = path.to_owned();
    move |source| CheckpointError::Io { what, path, source }
}

/// The checkpoints of one VM.
#[derive(Debug, Clone)]
pub struct Checkpoints {
    root: PathBuf,
}

impl Checkpoints {
    /// The checkpoints kept in folder `root`.
    pub fn new(root: PathBuf) -> Self {
        Self { root }
    }

    /// The checkpoints folder (it may not exist yet).
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Whether checkpoint `c` exists.
    pub fn exists(&self, c: &str) -> bool {
        layer::valid_name(c) && self.root.join(c).is_dir()
    }

    /// The folder of existing checkpoint `c`.
    pub fn dir(&self, c: &str) -> Result<PathBuf, CheckpointError> {
        if !self.exists(c) {
            return Err(CheckpointError::NotFound(c.to_owned()));
        }
        Ok(self.root.join(c))
    }

    /// Checks that `c` can name a new checkpoint.
    pub fn check_new(&self, c: &str) -> Result<(), CheckpointError> {
        if !layer::valid_name(c) {
            return Err(CheckpointError::InvalidName(c.to_owned()));
        }
        if self.root.join(c).exists() {
            return Err(CheckpointError::Exists(c.to_owned()));
        }
        Ok(())
    }

    /// The first free name of the form `checkpoint-N`.
    pub fn next_name(&self) -> String {
        (1..)
            .map(|i| format!("checkpoint-{i}"))
            .find(|n| !self.root.join(n).exists())
            .expect("some number is free")
    }

    fn current_file(&self) -> PathBuf {
        self.root.join(CURRENT_FILE)
    }

    /// What `CURRENT` says, whether or not that checkpoint exists.
    fn pointer(&self) -> Option<String> {
        std::fs::read_to_string(self.current_file())
            .ok()
            .map(|s| s.trim().to_owned())
    }

    /// The checkpoint the VM's present state descends from.
    pub fn current(&self) -> Option<String> {
        self.pointer().filter(|c| self.exists(c))
    }

    /// Records (or, with `None`, clears) the current checkpoint.
    pub fn set_current(&self, c: Option<&str>) -> Result<(), CheckpointError> {
        match c {
            Some(c) => {
                atomic::create_private_dir_all(&self.root).map_err(io("create", &self.root))?;
                atomic::write_file(&self.current_file(), c.as_bytes(), 0o600)?;
            }
            None => {
                let _ = std::fs::remove_file(self.current_file());
            }
        }
        Ok(())
    }

    /// Every checkpoint's metadata, oldest first (a folder whose metadata
    /// does not read is no checkpoint).
    pub fn list(&self) -> Vec<Meta> {
        let mut all: Vec<Meta> = std::fs::read_dir(&self.root)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.path().is_dir())
            .filter_map(|e| layer::read_meta(&e.path()).ok())
            .collect();
        all.sort_by(|a, b| (a.created, &a.name).cmp(&(b.created, &b.name)));
        all
    }

    /// Removes checkpoint `c`: its pages are first folded into each child
    /// (each published whole in one rename), whose parent becomes `c`'s;
    /// if `c` was current, its parent becomes current. Returns its metadata.
    pub fn remove(&self, c: &str) -> Result<Meta, CheckpointError> {
        let dir = self.dir(c)?;
        let meta = layer::read_meta(&dir)?;
        for child in self
            .list()
            .iter()
            .filter(|m| m.parent.as_deref() == Some(c))
        {
            let child_dir = self.root.join(&child.name);
            let staged = self.root.join(format!("{}.tmp", child.name));
            let _ = std::fs::remove_dir_all(&staged);
            layer::fold_into_child(&dir, &child_dir, &staged, meta.parent.clone())?;
            atomic::publish_dir(&staged, &child_dir)?;
        }
        let was_current = self.pointer().as_deref() == Some(c);
        std::fs::remove_dir_all(&dir).map_err(io("remove", &dir))?;
        if was_current {
            self.set_current(meta.parent.as_deref())?;
        }
        Ok(meta)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    fn scratch(tag: &str) -> Checkpoints {
        let d = std::env::temp_dir().join(format!("nestvm-cps-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        Checkpoints::new(d.join("checkpoints"))
    }

    /// Writes checkpoint `name` of a 4-page memory holding page `page`
    /// filled with `fill`.
    fn take(
        cps: &Checkpoints,
        name: &str,
        parent: Option<&str>,
        created: u64,
        page: u64,
        fill: u8,
    ) {
        let dir = cps.root().join(name);
        std::fs::create_dir_all(&dir).unwrap();
        let f = std::fs::File::create(dir.join(layer::MEMORY_FILE)).unwrap();
        f.set_len(4 * layer::PAGE).unwrap();
        f.write_all_at(&[fill; layer::PAGE as usize], page * layer::PAGE)
            .unwrap();
        std::fs::write(dir.join(layer::PAGES_FILE), [1u8 << page]).unwrap();
        let meta = Meta {
            name: name.into(),
            parent: parent.map(Into::into),
            created,
            memory_bytes: 4 * layer::PAGE,
            written_bytes: layer::PAGE,
        };
        layer::write_meta(&dir, &meta).unwrap();
    }

    #[test]
    fn names_listing_and_the_current_pointer() {
        let cps = scratch("list");
        assert!(cps.list().is_empty());
        assert_eq!(cps.current(), None);
        assert_eq!(cps.next_name(), "checkpoint-1");
        take(&cps, "checkpoint-1", None, 5, 0, 1);
        take(&cps, "b", Some("checkpoint-1"), 2, 1, 2);
        assert_eq!(cps.next_name(), "checkpoint-2");
        let names: Vec<_> = cps.list().into_iter().map(|m| m.name).collect();
        assert_eq!(names, ["b", "checkpoint-1"], "oldest first");
        assert!(matches!(
            cps.check_new("b"),
            Err(CheckpointError::Exists(_))
        ));
        assert!(matches!(
            cps.check_new("../x"),
            Err(CheckpointError::InvalidName(_))
        ));
        assert!(matches!(cps.dir("../b"), Err(CheckpointError::NotFound(_))));
        cps.set_current(Some("b")).unwrap();
        assert_eq!(cps.current().as_deref(), Some("b"));
        cps.set_current(Some("gone")).unwrap();
        assert_eq!(cps.current(), None, "a pointer to nothing is no current");
        cps.set_current(None).unwrap();
        assert_eq!(cps.current(), None);
    }

    #[test]
    fn removing_folds_into_children_and_moves_current_up() {
        let cps = scratch("remove");
        take(&cps, "a", None, 1, 0, 1);
        take(&cps, "b", Some("a"), 2, 1, 2);
        take(&cps, "c", Some("b"), 3, 2, 3);
        cps.set_current(Some("b")).unwrap();
        let gone = cps.remove("b").unwrap();
        assert_eq!(gone.parent.as_deref(), Some("a"));
        assert!(!cps.exists("b"));
        assert_eq!(cps.current().as_deref(), Some("a"));
        let c = layer::read_meta(&cps.root().join("c")).unwrap();
        assert_eq!(c.parent.as_deref(), Some("a"));
        assert_eq!(c.written_bytes, 2 * layer::PAGE, "b's page moved into c");
        let chain = layer::chain(cps.root(), "c").unwrap();
        let mut buf = [0u8; layer::PAGE as usize];
        chain[0].1.read(1, &mut buf).unwrap();
        assert_eq!(buf[0], 2);
        assert!(matches!(cps.remove("b"), Err(CheckpointError::NotFound(_))));
    }
}
