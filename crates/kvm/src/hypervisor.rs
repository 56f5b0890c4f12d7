//! Opening `/dev/kvm` and asking it what it can do.

use std::io;
use std::path::{Path, PathBuf};

use kvm_bindings::{kvm_cpuid_entry2, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Cap, Kvm};

use crate::vm::Vm;

/// Errors of the hypervisor handle.
#[derive(Debug, thiserror::Error)]
pub enum HypervisorError {
    /// The device node does not exist.
    #[error("{0} does not exist: load the KVM module for this CPU (modprobe kvm_intel or kvm_amd) or run on a host with hardware virtualization")]
    NotFound(PathBuf),
    /// The device node exists but this user may not open it.
    #[error("no permission to open {0}: add this user to the 'kvm' group (usermod -aG kvm $USER, then log in again) or run as root")]
    PermissionDenied(PathBuf),
    /// Any other failure to open the device node.
    #[error("cannot open {path}")]
    Open {
        /// The device node.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// KVM speaks an API version we do not.
    #[error("KVM API version {0} is not supported (need 12)")]
    ApiVersion(i32),
    /// `KVM_CREATE_VM` failed.
    #[error("KVM_CREATE_VM failed")]
    CreateVm(#[source] kvm_ioctls::Error),
    /// `KVM_GET_MSR_INDEX_LIST` failed.
    #[error("KVM_GET_MSR_INDEX_LIST failed")]
    MsrList(#[source] kvm_ioctls::Error),
    /// `KVM_GET_SUPPORTED_CPUID` failed.
    #[error("KVM_GET_SUPPORTED_CPUID failed")]
    SupportedCpuid(#[source] kvm_ioctls::Error),
}

/// An open `/dev/kvm`.
pub struct Hypervisor {
    kvm: Kvm,
    /// `KVM_GET_SUPPORTED_CPUID`, asked once: it is slow on some hosts and
    /// several layers need it.
    supported: std::sync::OnceLock<Vec<kvm_cpuid_entry2>>,
}

/// The default KVM device node.
pub const KVM_PATH: &str = "/dev/kvm";

impl Hypervisor {
    /// Opens the default `/dev/kvm`.
    pub fn open() -> Result<Self, HypervisorError> {
        Self::open_path(Path::new(KVM_PATH))
    }

    /// Opens a KVM device node at `path`, turning the usual failures into
    /// errors that say what to do.
    pub fn open_path(path: &Path) -> Result<Self, HypervisorError> {
        let cpath = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).map_err(|_| {
            HypervisorError::Open {
                path: path.to_owned(),
                source: io::Error::from(io::ErrorKind::InvalidInput),
            }
        })?;
        let kvm = Kvm::new_with_path(&cpath).map_err(|e| {
            let err = io::Error::from_raw_os_error(e.errno());
            match err.kind() {
                io::ErrorKind::NotFound => HypervisorError::NotFound(path.to_owned()),
                io::ErrorKind::PermissionDenied => {
                    HypervisorError::PermissionDenied(path.to_owned())
                }
                _ => HypervisorError::Open {
                    path: path.to_owned(),
                    source: err,
                },
            }
        })?;
        let version = kvm.get_api_version();
        if version != 12 {
            return Err(HypervisorError::ApiVersion(version));
        }
        Ok(Self {
            kvm,
            supported: std::sync::OnceLock::new(),
        })
    }

    /// The most vCPUs one VM may have.
    pub fn max_vcpus(&self) -> usize {
        self.kvm.get_max_vcpus()
    }

    /// The CPUID entries KVM can virtualize on this host.
    pub fn supported_cpuid(&self) -> Result<Vec<kvm_cpuid_entry2>, HypervisorError> {
        if let Some(c) = self.supported.get() {
            return Ok(c.clone());
        }
        let cpuid = self
            .kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(HypervisorError::SupportedCpuid)?;
        Ok(self
            .supported
            .get_or_init(|| cpuid.as_slice().to_vec())
            .clone())
    }

    /// Whether KVM can save and restore nested virtualization state
    /// (`KVM_CAP_NESTED_STATE` > 0).
    pub fn nested_state_size(&self) -> i32 {
        self.kvm.check_extension_int(Cap::NestedState)
    }

    /// The MSRs KVM can save and restore (`KVM_GET_MSR_INDEX_LIST`).
    pub fn msr_index_list(&self) -> Result<Vec<u32>, HypervisorError> {
        let list = self
            .kvm
            .get_msr_index_list()
            .map_err(HypervisorError::MsrList)?;
        Ok(list.as_slice().to_vec())
    }

    /// Whether the in-kernel TSC deadline timer is offered.
    pub fn has_tsc_deadline(&self) -> bool {
        self.kvm.check_extension(Cap::TscDeadlineTimer)
    }

    /// Creates an empty VM.
    pub fn create_vm(&self) -> Result<Vm, HypervisorError> {
        let fd = self.kvm.create_vm().map_err(HypervisorError::CreateVm)?;
        Ok(Vm::new(fd))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_device_says_what_to_do() {
        let err = Hypervisor::open_path(Path::new("/nonexistent/kvm"))
            .err()
            .unwrap();
        assert!(matches!(err, HypervisorError::NotFound(_)));
        let msg = err.to_string();
        assert!(
            msg.contains("/nonexistent/kvm does not exist") && msg.contains("modprobe"),
            "{msg}"
        );
    }

    #[test]
    fn a_file_that_is_not_kvm_is_refused() {
        // /dev/null opens but answers no KVM ioctl.
        let err = Hypervisor::open_path(Path::new("/dev/null")).err().unwrap();
        assert!(matches!(err, HypervisorError::ApiVersion(_)), "{err}");
    }
}
