//! How large a managed VM's log files may grow: `console.log` (what the
//! guest printed) and `vmm.log` (what its VMM said). A guest decides how
//! much it prints, so both are capped; past its cap a file is rotated (the
//! old one kept as `NAME.1`), so at most twice the cap stays on disk.
//!
//! In a definition file:
//!
//! ```toml
//! [logs]
//! console = "16M"
//! vmm = "16M"
//! ```
//!
//! or `--console-log-max SIZE` and `--vmm-log-max SIZE` on `vm new`/`vm set`.

use serde::{Deserialize, Serialize};

use crate::{format_size, parse_size, ConfigError};

/// The default cap of each log file.
pub const DEFAULT_LOG_CAP: u64 = 16 << 20;
/// The smallest cap accepted (a few screens of boot messages).
pub const MIN_LOG_CAP: u64 = 64 << 10;
/// The largest cap accepted.
pub const MAX_LOG_CAP: u64 = 1 << 40;

/// The caps of a VM's log files, bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogLimits {
    /// `console.log`.
    pub console: u64,
    /// `vmm.log`.
    pub vmm: u64,
}

impl Default for LogLimits {
    fn default() -> Self {
        Self {
            console: DEFAULT_LOG_CAP,
            vmm: DEFAULT_LOG_CAP,
        }
    }
}

/// The `[logs]` table of a definition file.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct FileLogs {
    #[serde(skip_serializing_if = "Option::is_none")]
    console: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    vmm: Option<String>,
}

impl LogLimits {
    /// The caps a `[logs]` table gives (defaults for what it leaves out).
    pub(crate) fn from_file(file: Option<&FileLogs>) -> Result<Self, ConfigError> {
        let mut limits = Self::default();
        if let Some(f) = file {
            if let Some(s) = &f.console {
                limits.console = parse_size(s)?;
            }
            if let Some(s) = &f.vmm {
                limits.vmm = parse_size(s)?;
            }
        }
        Ok(limits)
    }

    /// These caps with the sizes given (`--console-log-max`,
    /// `--vmm-log-max`) instead.
    pub fn with(self, console: Option<&str>, vmm: Option<&str>) -> Result<Self, ConfigError> {
        Ok(Self {
            console: console.map(parse_size).transpose()?.unwrap_or(self.console),
            vmm: vmm.map(parse_size).transpose()?.unwrap_or(self.vmm),
        })
    }

    /// The `[logs]` table for these caps; none when they are the defaults.
    pub(crate) fn to_file(self) -> Option<FileLogs> {
        let d = Self::default();
        (self != d).then(|| FileLogs {
            console: (self.console != d.console).then(|| format_size(self.console)),
            vmm: (self.vmm != d.vmm).then(|| format_size(self.vmm)),
        })
    }

    /// Refuses a cap outside [`MIN_LOG_CAP`]..=[`MAX_LOG_CAP`].
    pub fn validate(&self) -> Result<(), ConfigError> {
        for (file, got) in [("console", self.console), ("vmm", self.vmm)] {
            if !(MIN_LOG_CAP..=MAX_LOG_CAP).contains(&got) {
                return Err(ConfigError::LogCap { file, got });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_from_a_table_with_defaults_and_bounds() {
        assert_eq!(LogLimits::from_file(None).unwrap(), LogLimits::default());
        let f = FileLogs {
            console: Some("1M".into()),
            vmm: None,
        };
        let l = LogLimits::from_file(Some(&f)).unwrap();
        assert_eq!((l.console, l.vmm), (1 << 20, DEFAULT_LOG_CAP));
        assert!(l.validate().is_ok());
        let back = l.to_file().unwrap();
        assert_eq!(
            (back.console.as_deref(), back.vmm.as_deref()),
            (Some("1M"), None)
        );
        assert!(LogLimits::default().to_file().is_none());
        let tiny = LogLimits {
            console: 1000,
            ..LogLimits::default()
        };
        assert!(matches!(
            tiny.validate(),
            Err(ConfigError::LogCap {
                file: "console",
                got: 1000
            })
        ));
        let bad = FileLogs {
            console: Some("lots".into()),
            vmm: None,
        };
        assert!(LogLimits::from_file(Some(&bad)).is_err());
    }
}
