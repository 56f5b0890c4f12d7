//! Reading the host: everything `check` needs, gathered once.

use std::path::Path;

use nestvm_kvm::{Hypervisor, HypervisorError};
use serde::{Deserialize, Serialize};

/// The state of `/dev/kvm` for this user.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KvmDevice {
    /// Not there.
    Missing,
    /// There, but this user may not open it.
    NoPermission,
    /// Opened; it failed otherwise.
    Broken(String),
    /// Opened and answered.
    Usable,
}

/// What the host is, as read from it (or recorded on another host: `host
/// check --json` prints them as `facts`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HostFacts {
    /// CPU vendor id (GenuineIntel, AuthenticAMD, ...).
    pub vendor: String,
    /// CPU model name.
    pub model: String,
    /// Whether /proc/cpuinfo lists vmx.
    pub cpu_vmx: bool,
    /// Whether /proc/cpuinfo lists svm.
    pub cpu_svm: bool,
    /// Confidential-computing guest features in /proc/cpuinfo (sev, sev_es, sev_snp, tdx_guest).
    pub confidential_guest: Vec<String>,
    /// /dev/kvm.
    pub kvm_device: KvmDevice,
    /// The loaded KVM vendor module: kvm_intel, kvm_amd, kvm_pvm, or none.
    pub kvm_module: Option<String>,
    /// That module's `nested` parameter, as sysfs shows it (Y/N/1/0).
    pub nested_param: Option<String>,
    /// EPT (Intel) or NPT (AMD) parameter of the module.
    pub two_dimensional_paging: Option<String>,
    /// KVM_CAP_NESTED_STATE (bytes of nested state; 0 = none).
    pub nested_state_cap: Option<i32>,
    /// Whether KVM's supported CPUID offers VMX/SVM to guests.
    pub kvm_offers_virtualization: Option<bool>,
    /// The hypervisor running this host, from CPUID 0x40000000, if any.
    pub hypervisor: Option<String>,
    /// MemAvailable in KiB.
    pub mem_available_kib: u64,
}

fn cpuinfo_field<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    text.lines()
        .find(|l| l.split(':').next().is_some_and(|k| k.trim() == key))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim())
}

fn read_trim(path: impl AsRef<Path>) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()
        .map(|s| s.trim().to_owned())
}

/// Names the hypervisor from its CPUID signature.
pub fn hypervisor_name(signature: &str) -> String {
    match signature {
        "KVMKVMKVM" => "KVM".into(),
        "Microsoft Hv" => "Microsoft Hyper-V".into(),
        "VMwareVMware" => "VMware".into(),
        "XenVMMXenVMM" => "Xen".into(),
        "TCGTCGTCGTCG" => "QEMU TCG".into(),
        "bhyve bhyve " => "bhyve".into(),
        "ACRNACRNACRN" => "ACRN".into(),
        " lrpepyh  vr" => "Parallels".into(),
        "VBoxVBoxVBox" => "VirtualBox".into(),
        other => format!("unknown ({other:?})"),
    }
}

fn cpuid_hypervisor() -> Option<String> {
    let leaf1 = std::arch::x86_64::__cpuid(1);
    if leaf1.ecx & (1 << 31) == 0 {
        return None;
    }
    let r = std::arch::x86_64::__cpuid(0x4000_0000);
    let bytes: Vec<u8> = [r.ebx, r.ecx, r.edx]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    let sig = String::from_utf8_lossy(&bytes)
        .trim_end_matches('\0')
        .to_owned();
    Some(hypervisor_name(&sig))
}

/// Reads the facts of this host.
pub fn gather() -> HostFacts {
    gather_with(None)
}

/// Reads the facts of this host, reusing an open `/dev/kvm` when given.
pub fn gather_with(open: Option<&Hypervisor>) -> HostFacts {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let flags: Vec<&str> = cpuinfo_field(&cpuinfo, "flags")
        .unwrap_or("")
        .split_whitespace()
        .collect();
    let has = |f: &str| flags.contains(&f);
    let kvm_module = ["kvm_intel", "kvm_amd", "kvm_pvm"]
        .into_iter()
        .find(|m| Path::new("/sys/module").join(m).exists())
        .map(str::to_owned);
    let param = |p: &str| {
        kvm_module
            .as_ref()
            .and_then(|m| read_trim(format!("/sys/module/{m}/parameters/{p}")))
    };
    let opened;
    let (kvm_device, hv) = match open {
        Some(hv) => (KvmDevice::Usable, Some(hv)),
        None => match Hypervisor::open() {
            Ok(hv) => {
                opened = hv;
                (KvmDevice::Usable, Some(&opened))
            }
            Err(HypervisorError::NotFound(_)) => (KvmDevice::Missing, None),
            Err(HypervisorError::PermissionDenied(_)) => (KvmDevice::NoPermission, None),
            Err(e) => (KvmDevice::Broken(e.to_string()), None),
        },
    };
    let kvm_offers_virtualization = hv
        .and_then(|h| h.supported_cpuid().ok())
        .map(|c| nestvm_arch::cpuid::shows_virtualization(&c));
    let mem_available_kib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            cpuinfo_field(&m, "MemAvailable")
                .and_then(|v| v.split_whitespace().next().and_then(|n| n.parse().ok()))
        })
        .unwrap_or(0);
    HostFacts {
        vendor: cpuinfo_field(&cpuinfo, "vendor_id")
            .unwrap_or("unknown")
            .to_owned(),
        model: cpuinfo_field(&cpuinfo, "model name")
            .unwrap_or("unknown")
            .to_owned(),
        cpu_vmx: has("vmx"),
        cpu_svm: has("svm"),
        confidential_guest: ["sev", "sev_es", "sev_snp", "tdx_guest"]
            .into_iter()
            .filter(|f| has(f) && has("hypervisor"))
            .map(str::to_owned)
            .collect(),
        kvm_device,
        nested_param: param("nested"),
        two_dimensional_paging: param(if kvm_module.as_deref() == Some("kvm_amd") {
            "npt"
        } else {
            "ept"
        }),
        kvm_module,
        nested_state_cap: hv.map(Hypervisor::nested_state_size),
        kvm_offers_virtualization,
        hypervisor: cpuid_hypervisor(),
        mem_available_kib,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpuinfo_fields() {
        let text = "processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 7B13\nflags\t\t: fpu svm lm\n";
        assert_eq!(cpuinfo_field(text, "vendor_id"), Some("AuthenticAMD"));
        assert_eq!(cpuinfo_field(text, "model name"), Some("AMD EPYC 7B13"));
        assert_eq!(cpuinfo_field(text, "flags"), Some("fpu svm lm"));
        assert_eq!(cpuinfo_field(text, "missing"), None);
    }

    #[test]
    fn hypervisor_signatures() {
        assert_eq!(hypervisor_name("KVMKVMKVM"), "KVM");
        assert_eq!(hypervisor_name("Microsoft Hv"), "Microsoft Hyper-V");
        assert!(hypervisor_name("????").starts_with("unknown"));
    }

    #[test]
    fn gather_reads_this_host() {
        let f = gather();
        assert!(!f.vendor.is_empty());
        assert!(f.mem_available_kib > 0);
    }
}
