//! `nestvm host enable-nested`: the fix for a KVM module loaded with
//! `nested=0`. Writes the modprobe.d line (atomically) and reloads the module
//! when no VM holds it; otherwise says that VMs must stop or the host reboot.
//! A failed reload is retried with the old setting, so KVM is never left
//! unloaded.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::check::{modprobe_line, module_for_vendor, param_on};
use crate::facts::HostFacts;

/// Errors of enable-nested.
#[derive(Debug, thiserror::Error)]
pub enum EnableError {
    /// Nothing to enable on this host.
    #[error("{0}")]
    Impossible(String),
    /// Writing the modprobe.d file failed.
    #[error("cannot write {path}: run as root")]
    Write {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// modprobe failed and the module could not be put back.
    #[error("{module} is not loaded after a failed reload ({detail}): run 'modprobe {module}'")]
    LeftUnloaded {
        /// The module.
        module: String,
        /// What modprobe said.
        detail: String,
    },
    /// The reload ran but nesting is still off.
    #[error("{module} reloaded but nested is still '{value}': check other files in /etc/modprobe.d for 'options {module} nested=0'")]
    StillOff {
        /// The module.
        module: String,
        /// Its nested parameter now.
        value: String,
    },
}

/// What enable-nested would do.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Plan {
    /// kvm_intel or kvm_amd.
    pub module: String,
    /// The modprobe.d file.
    pub file: PathBuf,
    /// The line it must contain.
    pub line: String,
    /// Whether the file must be (re)written.
    pub write_file: bool,
    /// Whether the module is loaded now.
    pub loaded: bool,
    /// Whether nesting is on now.
    pub nested_now: bool,
    /// Users of the module now (running VMs hold it).
    pub users: u32,
}

impl Plan {
    /// Whether there is nothing to do.
    pub fn is_done(&self) -> bool {
        self.nested_now && !self.write_file
    }

    /// The steps, for the user to read before applying.
    pub fn steps(&self) -> Vec<String> {
        let mut steps = vec![];
        if self.write_file {
            steps.push(format!("write '{}' to {}", self.line, self.file.display()));
        }
        if !self.nested_now {
            if !self.loaded {
                steps.push(format!("load {} (modprobe {})", self.module, self.module));
            } else if self.users == 0 {
                steps.push(format!(
                    "reload {m} so the setting takes effect (modprobe -r {m} && modprobe {m})",
                    m = self.module
                ));
            } else {
                steps.push(format!(
                    "{} is in use ({} users: running VMs): it cannot be reloaded now; stop every VM and run this again, or reboot the host",
                    self.module, self.users
                ));
            }
        }
        steps
    }
}

fn sys_param(module: &str, name: &str) -> Option<String> {
    std::fs::read_to_string(format!("/sys/module/{module}/parameters/{name}"))
        .ok()
        .map(|s| s.trim().to_owned())
}

/// Works out what to do on this host; `file` is normally [`MODPROBE_FILE`].
pub fn plan(facts: &HostFacts, file: &Path) -> Result<Plan, EnableError> {
    if facts.kvm_module.as_deref() == Some("kvm_pvm") {
        return Err(EnableError::Impossible(
            "this host's KVM is PVM: no module parameter can expose VT-x/AMD-V to guests".into(),
        ));
    }
    let module = match module_for_vendor(&facts.vendor) {
        Some(m) if facts.cpu_vmx || facts.cpu_svm => m,
        _ => {
            return Err(EnableError::Impossible(
                "the CPU shows neither vmx nor svm: nothing on this host can enable nesting; ask the hypervisor that runs it to expose VT-x/AMD-V".into(),
            ))
        }
    };
    let line = modprobe_line(module);
    let current = std::fs::read_to_string(file).unwrap_or_default();
    let loaded = Path::new("/sys/module").join(module).exists();
    let users = std::fs::read_to_string(format!("/sys/module/{module}/refcnt"))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0);
    Ok(Plan {
        module: module.to_owned(),
        file: file.to_owned(),
        write_file: !current.lines().any(|l| l.trim() == line),
        line,
        loaded,
        nested_now: loaded && sys_param(module, "nested").is_some_and(|v| param_on(&v)),
        users,
    })
}

/// Writes `text` to `path` through a temporary file, fsync and rename.
pub fn write_atomic(path: &Path, text: &str) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension("conf.tmp");
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// Why a modprobe call failed.
#[derive(Debug, thiserror::Error)]
enum ModprobeError {
    /// modprobe could not be started.
    #[error("cannot run modprobe")]
    Run(#[source] std::io::Error),
    /// modprobe said no.
    #[error("modprobe failed: {0}")]
    Failed(String),
}

fn modprobe(args: &[&str]) -> Result<(), ModprobeError> {
    match Command::new("modprobe").args(args).output() {
        Ok(o) if o.status.success() => Ok(()),
        Ok(o) => Err(ModprobeError::Failed(
            String::from_utf8_lossy(&o.stderr).trim().to_owned(),
        )),
        Err(e) => Err(ModprobeError::Run(e)),
    }
}

/// What applying did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Applied {
    /// Nesting is on now.
    Enabled,
    /// The file is written, but the module is in use: it applies after VMs
    /// stop and the module is reloaded, or after a reboot.
    PendingReload,
}

/// Carries out `plan`.
pub fn apply(plan: &Plan) -> Result<Applied, EnableError> {
    if plan.write_file {
        let mut text = std::fs::read_to_string(&plan.file).unwrap_or_default();
        if text.is_empty() {
            text.push_str(
                "# Written by 'nestvm host enable-nested': expose VT-x/AMD-V to KVM guests.\n",
            );
        }
        // Drop any older nested= option for this module from our file.
        let prefix = format!("options {} nested=", plan.module);
        text = text
            .lines()
            .filter(|l| !l.trim().starts_with(&prefix))
            .map(|l| format!("{l}\n"))
            .collect();
        text.push_str(&plan.line);
        text.push('\n');
        write_atomic(&plan.file, &text).map_err(|source| EnableError::Write {
            path: plan.file.clone(),
            source,
        })?;
    }
    if plan.nested_now {
        return Ok(Applied::Enabled);
    }
    let m = plan.module.as_str();
    if plan.loaded {
        if plan.users > 0 {
            return Ok(Applied::PendingReload);
        }
        if let Err(e) = modprobe(&["-r", m]) {
            // Still loaded (someone grabbed it): nothing is lost.
            if Path::new("/sys/module").join(m).exists() {
                return Err(EnableError::Impossible(format!(
                    "cannot unload {m} ({e}): stop every VM and run this again, or reboot"
                )));
            }
        }
    }
    if let Err(first) = modprobe(&[m]) {
        // Try once more (plain load) so KVM is not left missing.
        if modprobe(&[m]).is_err() || !Path::new("/sys/module").join(m).exists() {
            return Err(EnableError::LeftUnloaded {
                module: m.to_owned(),
                detail: first.to_string(),
            });
        }
    }
    match sys_param(m, "nested") {
        Some(v) if param_on(&v) => Ok(Applied::Enabled),
        v => Err(EnableError::StillOff {
            module: m.to_owned(),
            value: v.unwrap_or_else(|| "unknown".into()),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::facts::KvmDevice;

    fn facts(vendor: &str, module: Option<&str>) -> HostFacts {
        HostFacts {
            vendor: vendor.into(),
            model: "cpu".into(),
            cpu_vmx: vendor == "GenuineIntel",
            cpu_svm: vendor == "AuthenticAMD",
            confidential_guest: vec![],
            kvm_device: KvmDevice::Usable,
            kvm_module: module.map(Into::into),
            nested_param: None,
            two_dimensional_paging: None,
            nested_state_cap: None,
            kvm_offers_virtualization: None,
            hypervisor: None,
            mem_available_kib: 0,
        }
    }

    #[test]
    fn pvm_and_extensionless_hosts_are_refused() {
        let f = facts("GenuineIntel", Some("kvm_pvm"));
        let e = plan(&f, Path::new("/nonexistent")).unwrap_err();
        assert!(e.to_string().contains("PVM"));
        let mut f = facts("GenuineIntel", None);
        f.cpu_vmx = false;
        assert!(plan(&f, Path::new("/nonexistent"))
            .unwrap_err()
            .to_string()
            .contains("neither vmx nor svm"));
    }

    #[test]
    fn plan_names_the_vendor_module_and_the_file_line() {
        let dir = std::env::temp_dir().join(format!("nestvm-enable-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("nestvm-nested.conf");
        let _ = std::fs::remove_file(&file);
        let p = plan(&facts("AuthenticAMD", None), &file).unwrap();
        assert_eq!(p.module, "kvm_amd");
        assert_eq!(p.line, "options kvm_amd nested=1");
        assert!(p.write_file);
        assert!(p.steps()[0].contains("options kvm_amd nested=1"));
        std::fs::write(&file, "options kvm_amd nested=1\n").unwrap();
        let p = plan(&facts("AuthenticAMD", None), &file).unwrap();
        assert!(!p.write_file);
        assert_eq!(
            plan(&facts("GenuineIntel", None), &file).unwrap().module,
            "kvm_intel"
        );
    }

    #[test]
    fn atomic_write_replaces_whole_files() {
        let dir = std::env::temp_dir().join(format!("nestvm-atomic-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("x.conf");
        write_atomic(&f, "one\n").unwrap();
        write_atomic(&f, "two\n").unwrap();
        assert_eq!(std::fs::read_to_string(&f).unwrap(), "two\n");
        assert!(!dir.join("x.conf.tmp").exists());
    }
}
