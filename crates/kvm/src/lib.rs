//! The KVM boundary of nestvm.
//!
//! Everything that talks to `/dev/kvm` lives here: opening the hypervisor and
//! reading its capabilities ([`hypervisor`]), creating a VM with its memory
//! slots, irqchip and PIT ([`vm`]), and running vCPUs ([`vcpu`]). A vCPU exit
//! leaves this crate as plain port/MMIO calls on an [`ExitHandler`] (the device
//! bus), so devices never see a KVM type. [`kick`] lets another thread pull a
//! vCPU out of `KVM_RUN` without races. [`state`] reads and writes a vCPU's
//! complete state, nested virtualization state included. [`memory`] gives
//! guest pages back to the host (balloon). [`tap`] opens the
//! TAP devices behind guest network adapters (the other host interface that
//! needs `ioctl`s).

pub mod hypervisor;
pub mod kick;
pub mod memory;
pub mod sigsys;
pub mod state;
pub mod tap;
pub mod vcpu;
pub mod vm;

pub use hypervisor::{Hypervisor, HypervisorError};
pub use state::{NestedState, VcpuState};
pub use vcpu::{ExitHandler, RunOutcome, Vcpu, VcpuError};
pub use vm::{Vm, VmError, VmState};

/// Re-exported so the layers above share one set of KVM data types.
pub use kvm_bindings;
