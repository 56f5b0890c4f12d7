//! A VM's definition: its settings read from a TOML file, overridden by
//! flags, validated. It knows nothing of KVM or devices, so the VMM and the
//! store of VMs (nestvm-manager) share it and nothing else.
//!
//! - this module: [`VmConfig`], [`Overrides`], sizes, [`NestedMode`];
//! - [`adapters`]: disks, network adapters and the balloon;
//! - [`vsock`]: the vsock device.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub mod adapters;
pub mod logs;
pub mod vsock;

use crate::adapters::{AdapterError, BalloonConfig, DiskConfig, NetConfig};

/// Default guest memory: 512 MiB.
pub const DEFAULT_MEMORY: u64 = 512 << 20;
/// Smallest guest memory we build (tiny test guests need little).
pub const MIN_MEMORY: u64 = 8 << 20;
/// Largest guest memory we accept (1 TiB).
pub const MAX_MEMORY: u64 = 1 << 40;
/// Most vCPUs a VM may have (APIC IDs are 8 bits in our MADT).
pub const MAX_CPUS: u32 = 255;
/// Command line used when none is given.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=-1";

/// Errors in a VM's settings.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file cannot be read.
    #[error("cannot read config file {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The config file is not valid TOML for a VM.
    #[error("config file {path} is invalid: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What the parser said, on one line.
        message: String,
    },
    /// No kernel anywhere.
    #[error("no kernel given: pass --kernel FILE or set kernel = \"FILE\" in the config file")]
    NoKernel,
    /// A size that does not parse.
    #[error("invalid size '{0}': use a number of MiB or a number with a K, M, G or T suffix, e.g. 512M or 4G")]
    BadSize(String),
    /// Memory out of range.
    #[error("memory {got_mib} MiB is out of range: give between {} MiB and {} GiB", MIN_MEMORY >> 20, MAX_MEMORY >> 30)]
    MemoryRange {
        /// What was asked, MiB.
        got_mib: u64,
    },
    /// A nested setting that is not auto, on or off.
    #[error("invalid nested setting '{0}': use auto, on or off")]
    BadNested(String),
    /// A log cap out of range.
    #[error("[logs] {file} = {got} bytes is out of range: give a size between 64K and 1T")]
    LogCap {
        /// Which log.
        file: &'static str,
        /// What was given.
        got: u64,
    },
    /// A disk or network adapter setting.
    #[error(transparent)]
    Adapter(#[from] AdapterError),
    /// A bad vsock device.
    #[error(transparent)]
    Vsock(#[from] vsock::VsockConfigError),
    /// The balloon's minimum is not within the VM's memory.
    #[error("balloon min {min_mib} MiB must be between {} MiB and the VM's memory ({memory_mib} MiB)", MIN_MEMORY >> 20)]
    BalloonMin {
        /// The minimum, MiB.
        min_mib: u64,
        /// The VM's memory, MiB.
        memory_mib: u64,
    },
    /// The balloon's start is not within its range.
    #[error("balloon start {start_mib} MiB must be between its min ({min_mib} MiB) and the VM's memory ({memory_mib} MiB)")]
    BalloonStart {
        /// The start, MiB.
        start_mib: u64,
        /// The minimum, MiB.
        min_mib: u64,
        /// The VM's memory, MiB.
        memory_mib: u64,
    },
    /// Memory that is not a whole number of pages (KVM maps only pages).
    #[error(
        "memory {got} bytes is not a whole number of 4 KiB pages: give it in K, M or G, e.g. 512M"
    )]
    MemoryAlign {
        /// What was asked, bytes.
        got: u64,
    },
    /// A path the definition file (TOML, UTF-8) cannot hold.
    #[error("the {what} path {} is not valid UTF-8, which a VM's definition cannot hold: rename the file or give a link to it with a UTF-8 name", .path.display())]
    NotUtf8 {
        /// Which setting.
        what: &'static str,
        /// The path.
        path: PathBuf,
    },
    /// The settings could not be written as TOML.
    #[error("cannot write the settings as TOML")]
    Serialize(#[source] toml::ser::Error),
    /// vCPU count out of range.
    #[error("--cpus {got} is out of range: give between 1 and {max}")]
    Cpus {
        /// What was asked.
        got: u32,
        /// The limit.
        max: u32,
    },
}

/// Parses `512`, `512M`, `512MiB`, `4G`, `4096K`... (a bare number is MiB).
pub fn parse_size(s: &str) -> Result<u64, ConfigError> {
    let bad = || ConfigError::BadSize(s.to_owned());
    let t = s.trim();
    let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(digits);
    let num: u64 = num.parse().map_err(|_| bad())?;
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "m" | "mb" | "mib" => 20,
        "k" | "kb" | "kib" => 10,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        "b" => 0,
        _ => return Err(bad()),
    };
    num.checked_mul(1 << shift).ok_or_else(bad)
}

/// Formats a byte count the way [`parse_size`] reads it back.
pub fn format_size(bytes: u64) -> String {
    match bytes {
        b if b % (1 << 30) == 0 => format!("{}G", b >> 30),
        b if b % (1 << 20) == 0 => format!("{}M", b >> 20),
        b => format!("{}K", b >> 10),
    }
}

/// Whether a VM is shown the host's virtualization extensions (VT-x/AMD-V).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NestedMode {
    /// On when this host can nest, else off with a notice.
    #[default]
    Auto,
    /// Always on; refused on a host that cannot nest.
    On,
    /// Never: the guest sees no VMX/SVM.
    Off,
}

impl NestedMode {
    /// The setting as written in files and flags.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::On => "on",
            Self::Off => "off",
        }
    }
}

impl std::str::FromStr for NestedMode {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, ConfigError> {
        match s {
            "auto" => Ok(Self::Auto),
            "on" => Ok(Self::On),
            "off" => Ok(Self::Off),
            other => Err(ConfigError::BadNested(other.to_owned())),
        }
    }
}

/// A size in a TOML file: a string like "4G" or an integer number of MiB.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(untagged)]
enum SizeValue {
    Text(String),
    Mib(u64),
}

/// The file form of a VM's settings; every field optional so flags can fill in.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    kernel: Option<PathBuf>,
    initrd: Option<PathBuf>,
    cmdline: Option<String>,
    cpus: Option<u32>,
    memory: Option<SizeValue>,
    nested: Option<NestedMode>,
    // Tables come last: TOML puts them after plain values.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    logs: Option<logs::FileLogs>,
    balloon: Option<BalloonConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    vsock: Option<vsock::VsockConfig>,
    disk: Option<Vec<DiskConfig>>,
    net: Option<Vec<NetConfig>>,
}

/// Settings given on the command line; they override the file.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    /// `--kernel`.
    pub kernel: Option<PathBuf>,
    /// `--initrd`.
    pub initrd: Option<PathBuf>,
    /// `--cmdline`.
    pub cmdline: Option<String>,
    /// `--cpus`.
    pub cpus: Option<u32>,
    /// `--memory`, unparsed.
    pub memory: Option<String>,
    /// `--nested`.
    pub nested: Option<NestedMode>,
    /// `--disk`, all of them (replacing the file's).
    pub disks: Option<Vec<DiskConfig>>,
    /// `--net`, all of them (replacing the file's).
    pub nets: Option<Vec<NetConfig>>,
    /// `--balloon` (`Some(None)`: `--no-balloon`).
    pub balloon: Option<Option<BalloonConfig>>,
    /// `--vsock` (`Some(None)`: `--no-vsock`).
    pub vsock: Option<Option<vsock::VsockConfig>>,
    /// `--console-log-max`, unparsed.
    pub console_log_max: Option<String>,
    /// `--vmm-log-max`, unparsed.
    pub vmm_log_max: Option<String>,
}

/// A VM's complete, validated settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmConfig {
    /// Kernel image (bzImage or ELF vmlinux).
    pub kernel: PathBuf,
    /// Initial ramdisk.
    pub initrd: Option<PathBuf>,
    /// Kernel command line.
    pub cmdline: String,
    /// Number of vCPUs.
    pub cpus: u32,
    /// Guest memory in bytes.
    pub memory: u64,
    /// Whether the guest may run its own VMs.
    pub nested: NestedMode,
    /// virtio-blk disks.
    pub disks: Vec<DiskConfig>,
    /// virtio-net adapters.
    pub nets: Vec<NetConfig>,
    /// The memory balloon, if the VM has one.
    #[serde(default)]
    pub balloon: Option<BalloonConfig>,
    /// How large its log files may grow (managed VMs).
    #[serde(default)]
    pub logs: logs::LogLimits,
    /// The vsock device, if the VM has one.
    #[serde(default)]
    pub vsock: Option<vsock::VsockConfig>,
}

impl VmConfig {
    /// Reads `file` (if any), applies `over`, fills defaults and validates.
    pub fn resolve(file: Option<&Path>, over: Overrides) -> Result<Self, ConfigError> {
        match file {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.to_owned(),
                    source,
                })?;
                Self::resolve_text(Some((path, &text)), over)
            }
            None => Self::resolve_text(None, over),
        }
    }

    /// [`VmConfig::resolve`] of a file already read: `text`, read from `path`.
    pub fn resolve_text(file: Option<(&Path, &str)>, over: Overrides) -> Result<Self, ConfigError> {
        let base = match file {
            Some((path, text)) => {
                let mut cfg: FileConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
                    path: path.to_owned(),
                    message: e.message().replace('\n', " "),
                })?;
                // Relative paths in a file are relative to the file.
                let dir = path.parent().unwrap_or(Path::new("."));
                let disks = cfg.disk.iter_mut().flatten().map(|d| &mut d.path);
                for p in [&mut cfg.kernel, &mut cfg.initrd]
                    .into_iter()
                    .flatten()
                    .chain(disks)
                {
                    if p.is_relative() {
                        *p = dir.join(&*p);
                    }
                }
                cfg
            }
            None => FileConfig::default(),
        };
        let memory = match over.memory {
            Some(s) => parse_size(&s)?,
            None => match base.memory {
                Some(SizeValue::Text(s)) => parse_size(&s)?,
                Some(SizeValue::Mib(m)) => m
                    .checked_mul(1 << 20)
                    .ok_or(ConfigError::BadSize(m.to_string()))?,
                None => DEFAULT_MEMORY,
            },
        };
        let cfg = VmConfig {
            kernel: over.kernel.or(base.kernel).ok_or(ConfigError::NoKernel)?,
            initrd: over.initrd.or(base.initrd),
            cmdline: over
                .cmdline
                .or(base.cmdline)
                .unwrap_or_else(|| DEFAULT_CMDLINE.to_owned()),
            cpus: over.cpus.or(base.cpus).unwrap_or(1),
            memory,
            nested: over.nested.or(base.nested).unwrap_or_default(),
            disks: over.disks.or(base.disk).unwrap_or_default(),
            nets: over.nets.or(base.net).unwrap_or_default(),
            balloon: over.balloon.unwrap_or(base.balloon),
            vsock: over.vsock.unwrap_or(base.vsock),
            logs: logs::LogLimits::from_file(base.logs.as_ref())?
                .with(over.console_log_max.as_deref(), over.vmm_log_max.as_deref())?,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// The settings in the file format [`VmConfig::resolve`] reads back
    /// (fails only for settings [`VmConfig::validate`] refuses).
    pub fn to_toml(&self) -> Result<String, ConfigError> {
        let file = FileConfig {
            kernel: Some(self.kernel.clone()),
            initrd: self.initrd.clone(),
            cmdline: Some(self.cmdline.clone()),
            cpus: Some(self.cpus),
            memory: Some(SizeValue::Text(format_size(self.memory))),
            nested: Some(self.nested),
            disk: (!self.disks.is_empty()).then(|| self.disks.clone()),
            net: (!self.nets.is_empty()).then(|| self.nets.clone()),
            balloon: self.balloon.clone(),
            vsock: self.vsock.clone(),
            logs: self.logs.to_file(),
        };
        toml::to_string(&file).map_err(ConfigError::Serialize)
    }

    /// How many virtio devices these settings make: disks, adapters, the
    /// balloon, the vsock device.
    pub fn device_count(&self) -> usize {
        self.disks.len()
            + self.nets.len()
            + usize::from(self.balloon.is_some())
            + usize::from(self.vsock.is_some())
    }

    /// Applies `over` to these settings and validates the result.
    pub fn with(&self, over: Overrides) -> Result<Self, ConfigError> {
        let cfg = VmConfig {
            kernel: over.kernel.unwrap_or_else(|| self.kernel.clone()),
            initrd: over.initrd.or_else(|| self.initrd.clone()),
            cmdline: over.cmdline.unwrap_or_else(|| self.cmdline.clone()),
            cpus: over.cpus.unwrap_or(self.cpus),
            memory: match over.memory {
                Some(s) => parse_size(&s)?,
                None => self.memory,
            },
            nested: over.nested.unwrap_or(self.nested),
            disks: over.disks.unwrap_or_else(|| self.disks.clone()),
            nets: over.nets.unwrap_or_else(|| self.nets.clone()),
            balloon: over.balloon.unwrap_or_else(|| self.balloon.clone()),
            vsock: over.vsock.unwrap_or_else(|| self.vsock.clone()),
            logs: self
                .logs
                .with(over.console_log_max.as_deref(), over.vmm_log_max.as_deref())?,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks ranges that need no host knowledge.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !(MIN_MEMORY..=MAX_MEMORY).contains(&self.memory) {
            return Err(ConfigError::MemoryRange {
                got_mib: self.memory >> 20,
            });
        }
        if self.memory % 4096 != 0 {
            return Err(ConfigError::MemoryAlign { got: self.memory });
        }
        let paths = [
            ("kernel", Some(&self.kernel)),
            ("initrd", self.initrd.as_ref()),
        ];
        let disks = self.disks.iter().map(|d| ("disk image", Some(&d.path)));
        for (what, path) in paths.into_iter().chain(disks) {
            if let Some(p) = path.filter(|p| p.to_str().is_none()) {
                return Err(ConfigError::NotUtf8 {
                    what,
                    path: p.clone(),
                });
            }
        }
        if self.cpus == 0 || self.cpus > MAX_CPUS {
            return Err(ConfigError::Cpus {
                got: self.cpus,
                max: MAX_CPUS,
            });
        }
        adapters::validate(&self.disks, &self.nets, self.balloon.as_ref())?;
        if let Some(v) = &self.vsock {
            v.validate()?;
            let total = self.device_count();
            if total > adapters::MAX_DEVICES {
                return Err(AdapterError::TooMany(total).into());
            }
        }
        self.logs.validate()?;
        if let Some(b) = &self.balloon {
            let min = b.min_bytes()?;
            if min < MIN_MEMORY || min > self.memory {
                return Err(ConfigError::BalloonMin {
                    min_mib: min >> 20,
                    memory_mib: self.memory >> 20,
                });
            }
            if let Some(start) = b.start_bytes()? {
                if start < min || start > self.memory {
                    return Err(ConfigError::BalloonStart {
                        start_mib: start >> 20,
                        min_mib: min >> 20,
                        memory_mib: self.memory >> 20,
                    });
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn over_kernel() -> Overrides {
        Overrides {
            kernel: Some("/boot/vmlinuz".into()),
            ..Default::default()
        }
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("512").unwrap(), 512 << 20);
        assert_eq!(parse_size("512M").unwrap(), 512 << 20);
        assert_eq!(parse_size("4G").unwrap(), 4 << 30);
        assert_eq!(parse_size("6GiB").unwrap(), 6 << 30);
        assert_eq!(parse_size("65536k").unwrap(), 64 << 20);
        assert_eq!(parse_size(" 1T ").unwrap(), 1 << 40);
        for bad in [
            "",
            "G",
            "12Q",
            "-1",
            "1.5G",
            "99999999999999999999G",
            "4 G B",
        ] {
            let e = parse_size(bad).unwrap_err();
            assert!(e.to_string().contains("invalid size"), "{bad}: {e}");
        }
        assert_eq!(format_size(4 << 30), "4G");
        assert_eq!(format_size(384 << 20), "384M");
    }

    #[test]
    fn defaults_and_flags() {
        let c = VmConfig::resolve(None, over_kernel()).unwrap();
        assert_eq!(
            (c.cpus, c.memory, c.cmdline.as_str()),
            (1, DEFAULT_MEMORY, DEFAULT_CMDLINE)
        );
        let e = VmConfig::resolve(None, Overrides::default()).unwrap_err();
        assert!(matches!(e, ConfigError::NoKernel));
        assert!(e.to_string().contains("--kernel"));
    }

    #[test]
    fn ranges_are_checked() {
        let mut o = over_kernel();
        o.cpus = Some(0);
        assert!(matches!(
            VmConfig::resolve(None, o.clone()),
            Err(ConfigError::Cpus { got: 0, .. })
        ));
        o.cpus = Some(256);
        assert!(matches!(
            VmConfig::resolve(None, o),
            Err(ConfigError::Cpus { got: 256, .. })
        ));
        let mut o = over_kernel();
        o.memory = Some("1M".into());
        let e = VmConfig::resolve(None, o).unwrap_err();
        assert!(matches!(e, ConfigError::MemoryRange { got_mib: 1 }), "{e}");
        let mut o = over_kernel();
        o.memory = Some("lots".into());
        assert!(matches!(
            VmConfig::resolve(None, o),
            Err(ConfigError::BadSize(_))
        ));
        // Not a whole number of pages: refused here, not by KVM.
        let mut o = over_kernel();
        o.memory = Some("65537K".into());
        let e = VmConfig::resolve(None, o).unwrap_err();
        assert!(
            matches!(e, ConfigError::MemoryAlign { got: 67_109_888 }),
            "{e}"
        );
        let mut o = over_kernel();
        o.memory = Some("65540K".into());
        assert!(VmConfig::resolve(None, o).is_ok(), "whole pages are fine");
    }

    #[test]
    fn paths_a_definition_cannot_hold_are_refused() {
        use std::os::unix::ffi::OsStrExt;
        let odd = PathBuf::from(std::ffi::OsStr::from_bytes(b"/tmp/k\xff.elf"));
        let o = Overrides {
            kernel: Some(odd.clone()),
            ..Default::default()
        };
        let e = VmConfig::resolve(None, o).unwrap_err();
        assert!(
            matches!(&e, ConfigError::NotUtf8 { what: "kernel", .. }),
            "{e}"
        );
        assert!(e.to_string().contains("not valid UTF-8"), "{e}");
        // Nor can it be written, should such a config be made by hand.
        let mut c = VmConfig::resolve(None, over_kernel()).unwrap();
        c.initrd = Some(odd);
        assert!(matches!(
            c.validate(),
            Err(ConfigError::NotUtf8 { what: "initrd", .. })
        ));
        assert!(matches!(c.to_toml(), Err(ConfigError::Serialize(_))));
    }

    fn write(name: &str, text: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("nestvm-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    #[test]
    fn file_then_flags() {
        let p = write(
            "vm.toml",
            "kernel = \"vmlinuz\"\ninitrd = \"/abs/initrd\"\ncpus = 2\nmemory = \"6G\"\ncmdline = \"console=ttyS0\"\n",
        );
        let c = VmConfig::resolve(Some(&p), Overrides::default()).unwrap();
        assert_eq!(c.kernel, p.parent().unwrap().join("vmlinuz"));
        assert_eq!(c.initrd.as_deref(), Some(Path::new("/abs/initrd")));
        assert_eq!((c.cpus, c.memory), (2, 6 << 30));
        let o = Overrides {
            cpus: Some(4),
            memory: Some("1G".into()),
            ..Default::default()
        };
        let c = VmConfig::resolve(Some(&p), o).unwrap();
        assert_eq!(
            (c.cpus, c.memory, c.cmdline.as_str()),
            (4, 1 << 30, "console=ttyS0")
        );
        let p = write(
            "disks.toml",
            "kernel = \"/k\"\n[[disk]]\npath = \"d.img\"\n[[net]]\ntap = \"t0\"\nmac_spoofing = true\n",
        );
        let c = VmConfig::resolve(Some(&p), Overrides::default()).unwrap();
        assert_eq!(c.disks[0].path, p.parent().unwrap().join("d.img"));
        assert!(c.nets[0].mac_spoofing && c.nets[0].mac.is_none());
        let p = write("mib.toml", "kernel = \"/k\"\nmemory = 256\n");
        assert_eq!(
            VmConfig::resolve(Some(&p), Overrides::default())
                .unwrap()
                .memory,
            256 << 20
        );
    }

    #[test]
    fn files_round_trip_and_with_overrides() {
        let c = VmConfig {
            kernel: "/boot/vmlinuz".into(),
            initrd: Some("/boot/initrd".into()),
            cmdline: "console=ttyS0 quiet".into(),
            cpus: 3,
            memory: 1536 << 20,
            nested: NestedMode::On,
            disks: vec![
                DiskConfig {
                    path: "/img/root.img".into(),
                    readonly: true,
                    serial: Some("root 1".into()),
                },
                DiskConfig {
                    path: "/img/data.img".into(),
                    readonly: false,
                    serial: None,
                },
            ],
            nets: vec![NetConfig {
                tap: "tap0".into(),
                mac: Some("52:56:00:00:00:07".into()),
                mac_spoofing: true,
                ..Default::default()
            }],
            balloon: Some(adapters::parse_balloon("dynamic=on,min=512M").unwrap()),
            vsock: Some(vsock::parse_vsock("cid=7,socket=/run/v.sock").unwrap()),
            logs: logs::LogLimits {
                console: 1 << 20,
                ..Default::default()
            },
        };
        let text = c.to_toml().unwrap();
        assert!(text.contains("[logs]\nconsole = \"1M\"\n"), "{text}");
        assert_eq!(text.matches("serial = \"root 1\"").count(), 1, "{text}");
        assert_eq!(
            text.matches("serial").count(),
            1,
            "no default written: {text}"
        );
        let p = write("round.toml", &text);
        assert_eq!(
            VmConfig::resolve(Some(&p), Overrides::default()).unwrap(),
            c
        );
        let changed = c
            .with(Overrides {
                cpus: Some(4),
                memory: Some("4G".into()),
                ..Default::default()
            })
            .unwrap();
        assert_eq!(
            (changed.cpus, changed.memory, changed.kernel.clone()),
            (4, 4 << 30, c.kernel.clone())
        );
        assert!(c
            .with(Overrides {
                cpus: Some(0),
                ..Default::default()
            })
            .is_err());
    }

    #[test]
    fn bad_files() {
        let p = write("typo.toml", "kernel = \"/k\"\ncpu = 2\n");
        let e = VmConfig::resolve(Some(&p), Overrides::default()).unwrap_err();
        assert!(matches!(e, ConfigError::Parse { .. }));
        assert!(e.to_string().contains("cpu"), "{e}");
        assert!(!e.to_string().contains('\n'));
        let p = write("broken.toml", "kernel = \n");
        assert!(matches!(
            VmConfig::resolve(Some(&p), Overrides::default()),
            Err(ConfigError::Parse { .. })
        ));
        let e = VmConfig::resolve(Some(Path::new("/nonexistent.toml")), Overrides::default())
            .unwrap_err();
        assert!(matches!(e, ConfigError::Read { .. }));
    }
}
