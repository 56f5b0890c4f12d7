//! From facts to checks and a verdict: can this host give its VMs VT-x/AMD-V?
//! Every failed check carries why it fails and the exact fix; `host check`,
//! `run --nested on` and `--nested auto` all use the same words.

use serde::Serialize;

use crate::facts::{HostFacts, KvmDevice};

/// The reference document's guidance on memory for nesting.
pub const NESTING_MEMORY_KIB: u64 = 4 << 20;

/// How a check came out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Good for nesting.
    Ok,
    /// Worth knowing; does not stop nesting.
    Warn,
    /// Stops nesting.
    Fail,
    /// Information only.
    Info,
}

/// One line of the report.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    /// Stable identifier, e.g. `kvm_module`.
    pub id: &'static str,
    /// What is checked.
    pub label: &'static str,
    /// What was found.
    pub value: String,
    /// The outcome.
    pub status: Status,
    /// Why it is not Ok (for Warn and Fail).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// What to do about it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

/// The whole report.
#[derive(Debug, Clone, Serialize)]
pub struct HostReport {
    /// Every check, in order.
    pub checks: Vec<Check>,
    /// Whether VMs started here can be given VT-x/AMD-V.
    pub can_nest: bool,
    /// The nesting level our guests would run at (1 on bare metal).
    pub guest_level: u32,
}

impl HostReport {
    /// The first failing check: the reason nesting is impossible, if it is.
    pub fn blocker(&self) -> Option<&Check> {
        self.checks.iter().find(|c| c.status == Status::Fail)
    }

    /// One line: the reason and fix of the first failure (used by `run`).
    pub fn blocker_line(&self) -> Option<String> {
        self.blocker().map(|c| {
            let reason = c.reason.as_deref().unwrap_or(c.label);
            match &c.fix {
                Some(fix) => format!("{reason}; fix: {fix}"),
                None => reason.to_owned(),
            }
        })
    }

    /// The report as a table with a verdict and the reasons and fixes.
    pub fn render(&self) -> String {
        let w = self
            .checks
            .iter()
            .map(|c| c.label.len())
            .max()
            .unwrap_or(10);
        let mut out = String::new();
        out.push_str(&format!("{:<w$}  {:<6}  {}\n", "CHECK", "STATUS", "VALUE"));
        for c in &self.checks {
            let status = match c.status {
                Status::Ok => "ok",
                Status::Warn => "warn",
                Status::Fail => "FAIL",
                Status::Info => "-",
            };
            out.push_str(&format!("{:<w$}  {:<6}  {}\n", c.label, status, c.value));
        }
        out.push('\n');
        if self.can_nest {
            out.push_str(&format!(
                "Verdict: YES, this host can nest: VMs started here can run their own VMs (nestvm's guests run at level {}).\n",
                self.guest_level
            ));
        } else {
            out.push_str("Verdict: NO, VMs started here cannot run their own VMs.\n");
        }
        for c in self
            .checks
            .iter()
            .filter(|c| matches!(c.status, Status::Fail | Status::Warn))
        {
            out.push_str(&format!(
                "\n{} {}:\n  why: {}\n",
                if c.status == Status::Fail {
                    "FAIL"
                } else {
                    "warn"
                },
                c.label,
                c.reason.as_deref().unwrap_or("-")
            ));
            if let Some(fix) = &c.fix {
                out.push_str(&format!("  fix: {fix}\n"));
            }
        }
        out
    }
}

/// The module for this vendor and its modprobe name.
pub fn module_for_vendor(vendor: &str) -> Option<&'static str> {
    match vendor {
        "GenuineIntel" => Some("kvm_intel"),
        "AuthenticAMD" | "HygonGenuine" => Some("kvm_amd"),
        _ => None,
    }
}

/// The modprobe.d line that enables nesting for `module`.
pub fn modprobe_line(module: &str) -> String {
    format!("options {module} nested=1")
}

/// Where nestvm writes that line.
pub const MODPROBE_FILE: &str = "/etc/modprobe.d/nestvm-nested.conf";

/// Whether a sysfs boolean module parameter (Y/N or 1/0) is on.
pub fn param_on(v: &str) -> bool {
    matches!(v.trim(), "Y" | "y" | "1")
}

fn check(id: &'static str, label: &'static str, value: String, status: Status) -> Check {
    Check {
        id,
        label,
        value,
        status,
        reason: None,
        fix: None,
    }
}

fn fail(mut c: Check, status: Status, reason: impl Into<String>, fix: Option<String>) -> Check {
    c.status = status;
    c.reason = Some(reason.into());
    c.fix = fix;
    c
}

/// Evaluates `facts`.
pub fn evaluate(f: &HostFacts) -> HostReport {
    let mut checks = vec![];
    let pvm = f.kvm_module.as_deref() == Some("kvm_pvm");
    let expose_hint = "ask the hypervisor that runs this machine to expose VT-x/AMD-V to it \
        (nestvm: --nested on; QEMU: -cpu host or +vmx/+svm; Hyper-V: Set-VMProcessor -ExposeVirtualizationExtensions $true)";

    checks.push(check(
        "cpu",
        "processor",
        format!("{} ({})", f.model, f.vendor),
        Status::Info,
    ));
    let ext = match (f.cpu_vmx, f.cpu_svm) {
        (true, _) => "vmx (Intel VT-x)".to_owned(),
        (_, true) => "svm (AMD-V)".to_owned(),
        _ => "none".to_owned(),
    };
    let c = check(
        "cpu_extensions",
        "virtualization extensions in CPU flags",
        ext,
        Status::Ok,
    );
    checks.push(if f.cpu_vmx || f.cpu_svm {
        c
    } else if pvm {
        fail(
            c,
            Status::Fail,
            "the CPU shows neither vmx nor svm; this host's KVM is PVM, which runs guests without them and cannot give them to guests",
            Some("run nestvm on a host whose CPU (or hypervisor) exposes VT-x or AMD-V".into()),
        )
    } else {
        fail(c, Status::Fail, "the CPU shows neither vmx nor svm", Some(expose_hint.into()))
    });

    let c = check(
        "kvm_device",
        "/dev/kvm",
        format!("{:?}", f.kvm_device).to_lowercase(),
        Status::Ok,
    );
    checks.push(match &f.kvm_device {
        KvmDevice::Usable => {
            let mut c = c;
            c.value = "present, opened by this user".into();
            c
        }
        KvmDevice::Missing => fail(
            c,
            Status::Fail,
            "/dev/kvm does not exist",
            Some(match module_for_vendor(&f.vendor) {
                Some(m) if f.cpu_vmx || f.cpu_svm => format!("modprobe {m}"),
                _ => expose_hint.into(),
            }),
        ),
        KvmDevice::NoPermission => fail(
            c,
            Status::Fail,
            "this user may not open /dev/kvm",
            Some("usermod -aG kvm $USER, then log in again (or run as root)".into()),
        ),
        KvmDevice::Broken(e) => fail(
            c,
            Status::Fail,
            format!("/dev/kvm does not work: {e}"),
            None,
        ),
    });

    let module = f.kvm_module.clone().unwrap_or_else(|| "none".into());
    let c = check("kvm_module", "KVM module", module.clone(), Status::Ok);
    checks.push(match module.as_str() {
        "kvm_intel" | "kvm_amd" => c,
        "kvm_pvm" => fail(
            c,
            Status::Fail,
            "PVM: /dev/kvm works, but unmodified guest kernels run under instruction emulation \
             (guest kernels must be PVM-enabled to be fast) and no virtualization extension can be exposed to guests",
            Some("use a host with VT-x/AMD-V (bare metal, or a VM whose hypervisor exposes them) for nesting".into()),
        ),
        _ => fail(
            c,
            Status::Fail,
            "no KVM vendor module is loaded",
            module_for_vendor(&f.vendor)
                .filter(|_| f.cpu_vmx || f.cpu_svm)
                .map(|m| format!("modprobe {m}"))
                .or_else(|| Some(expose_hint.into())),
        ),
    });

    let vendor_module = matches!(module.as_str(), "kvm_intel" | "kvm_amd");
    if vendor_module {
        let v = f.nested_param.clone().unwrap_or_else(|| "unknown".into());
        let c = check(
            "nested_param",
            "module parameter nested",
            v.clone(),
            Status::Ok,
        );
        checks.push(if param_on(&v) {
            c
        } else {
            fail(
                c,
                Status::Fail,
                format!("{module} is loaded with nested={v}"),
                Some(format!(
                    "run 'nestvm host enable-nested --yes', or by hand: echo '{}' > {MODPROBE_FILE}; stop every VM; modprobe -r {module} && modprobe {module}",
                    modprobe_line(&module)
                )),
            )
        });
        let label = if module == "kvm_amd" {
            "NPT (nested paging)"
        } else {
            "EPT (extended page tables)"
        };
        let v = f
            .two_dimensional_paging
            .clone()
            .unwrap_or_else(|| "unknown".into());
        let c = check("tdp", label, v.clone(), Status::Ok);
        checks.push(if param_on(&v) {
            c
        } else {
            fail(
                c,
                Status::Warn,
                "without two-dimensional paging nested guests run on shadow page tables, much slower",
                Some(format!("load {module} with its default (ept=1 / npt=1)")),
            )
        });
        if let Some(offers) = f.kvm_offers_virtualization {
            let c = check(
                "kvm_cpuid",
                "KVM offers VMX/SVM to guests",
                if offers { "yes" } else { "no" }.into(),
                Status::Ok,
            );
            let nested_on = f.nested_param.as_deref().is_some_and(param_on);
            // With nested off, the nested_param check already says why.
            checks.push(if offers || !nested_on {
                c
            } else {
                fail(
                    c,
                    Status::Fail,
                    "KVM's supported CPUID has no VMX/SVM although nested is on",
                    None,
                )
            });
        }
    }

    let cap = f.nested_state_cap.unwrap_or(0);
    let c = check(
        "nested_state",
        "KVM_CAP_NESTED_STATE",
        if cap > 0 {
            format!("{cap} bytes")
        } else {
            "absent".into()
        },
        Status::Ok,
    );
    checks.push(if cap > 0 || !vendor_module {
        let mut c = c;
        if cap == 0 {
            c.status = Status::Info;
        }
        c
    } else {
        fail(
            c,
            Status::Warn,
            "KVM cannot save a vCPU's nested state: snapshots and migration of VMs that run VMs are not possible",
            Some("use Linux 4.19+ (Intel) or 5.8+ (AMD)".into()),
        )
    });

    let level = if f.hypervisor.is_some() { 2 } else { 1 };
    checks.push(check(
        "hypervisor",
        "this host runs under",
        match &f.hypervisor {
            Some(h) => format!(
                "{h} (this host is a VM: nestvm's guests run at level 2, theirs at level 3)"
            ),
            None => "nothing detected (bare metal: nestvm's guests run at level 1)".into(),
        },
        Status::Info,
    ));

    if !f.confidential_guest.is_empty() {
        let c = check(
            "confidential",
            "confidential-computing guest",
            f.confidential_guest.join(", "),
            Status::Ok,
        );
        checks.push(fail(
            c,
            Status::Fail,
            "this host is a SEV-ES/SNP or TDX guest: its hypervisor cannot run nested guests for it",
            Some("run nestvm on a host that is not a confidential VM".into()),
        ));
    }

    let gib = f.mem_available_kib as f64 / (1024.0 * 1024.0);
    let c = check(
        "memory",
        "memory available",
        format!("{gib:.1} GiB"),
        Status::Ok,
    );
    checks.push(if f.mem_available_kib >= NESTING_MEMORY_KIB {
        c
    } else {
        fail(
            c,
            Status::Warn,
            "less than 4 GiB available: the reference guidance for nesting is at least 4 GiB",
            Some("free memory or add RAM; give each VM that hosts VMs enough --memory".into()),
        )
    });

    let can_nest = !checks.iter().any(|c| c.status == Status::Fail);
    HostReport {
        checks,
        can_nest,
        guest_level: level,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn amd_nested() -> HostFacts {
        HostFacts {
            vendor: "AuthenticAMD".into(),
            model: "AMD EPYC".into(),
            cpu_vmx: false,
            cpu_svm: true,
            confidential_guest: vec![],
            kvm_device: KvmDevice::Usable,
            kvm_module: Some("kvm_amd".into()),
            nested_param: Some("1".into()),
            two_dimensional_paging: Some("1".into()),
            nested_state_cap: Some(16384),
            kvm_offers_virtualization: Some(true),
            hypervisor: None,
            mem_available_kib: 16 << 20,
        }
    }

    #[test]
    fn a_good_amd_host_can_nest() {
        let r = evaluate(&amd_nested());
        assert!(r.can_nest, "{}", r.render());
        assert_eq!(r.guest_level, 1);
        assert!(r.render().contains("Verdict: YES"));
        assert!(r.blocker_line().is_none());
    }

    #[test]
    fn nested_zero_gives_the_modprobe_fix() {
        let mut f = amd_nested();
        f.nested_param = Some("0".into());
        f.kvm_offers_virtualization = Some(false);
        let r = evaluate(&f);
        assert!(!r.can_nest);
        let line = r.blocker_line().unwrap();
        assert!(line.contains("kvm_amd is loaded with nested=0"), "{line}");
        assert!(
            line.contains("options kvm_amd nested=1") && line.contains(MODPROBE_FILE),
            "{line}"
        );
        assert!(
            line.contains("modprobe -r kvm_amd && modprobe kvm_amd"),
            "{line}"
        );
    }

    #[test]
    fn pvm_is_named_and_explained() {
        let f = HostFacts {
            vendor: "GenuineIntel".into(),
            cpu_svm: false,
            kvm_module: Some("kvm_pvm".into()),
            nested_param: None,
            two_dimensional_paging: None,
            nested_state_cap: Some(0),
            kvm_offers_virtualization: Some(false),
            hypervisor: Some("KVM".into()),
            ..amd_nested()
        };
        let r = evaluate(&f);
        assert!(!r.can_nest);
        let text = r.render();
        assert!(text.contains("Verdict: NO"));
        assert!(
            text.contains("PVM") && text.contains("instruction emulation"),
            "{text}"
        );
        assert!(text.contains("PVM-enabled"), "{text}");
        assert_eq!(r.guest_level, 2);
        assert!(r.blocker_line().unwrap().contains("PVM"));
    }

    #[test]
    fn a_vm_without_extensions_is_told_to_ask_its_hypervisor() {
        let f = HostFacts {
            cpu_svm: false,
            kvm_device: KvmDevice::Missing,
            kvm_module: None,
            nested_param: None,
            nested_state_cap: None,
            kvm_offers_virtualization: None,
            hypervisor: Some("Microsoft Hyper-V".into()),
            ..amd_nested()
        };
        let r = evaluate(&f);
        assert!(!r.can_nest);
        let line = r.blocker_line().unwrap();
        assert!(
            line.contains("neither vmx nor svm") && line.contains("ExposeVirtualizationExtensions"),
            "{line}"
        );
    }

    #[test]
    fn confidential_guests_and_permissions_block() {
        let mut f = amd_nested();
        f.confidential_guest = vec!["sev_snp".into()];
        assert!(!evaluate(&f).can_nest);
        let mut f = amd_nested();
        f.kvm_device = KvmDevice::NoPermission;
        let r = evaluate(&f);
        assert!(r.blocker_line().unwrap().contains("usermod -aG kvm"));
    }

    #[test]
    fn low_memory_warns_but_does_not_block() {
        let mut f = amd_nested();
        f.mem_available_kib = 2 << 20;
        let r = evaluate(&f);
        assert!(r.can_nest);
        let m = r.checks.iter().find(|c| c.id == "memory").unwrap();
        assert_eq!(m.status, Status::Warn);
        assert!(r.render().contains("4 GiB"));
    }

    #[test]
    fn json_has_every_check_and_the_verdict() {
        let r = evaluate(&amd_nested());
        let v: serde_json::Value =
            serde_json::from_str(&serde_json::to_string(&r).unwrap()).unwrap();
        assert_eq!(v["can_nest"], true);
        assert!(v["checks"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["id"] == "nested_param"));
    }
}
