//! What this host can do for nested virtualization — the host half of the
//! reference document's Get-NestedVirtStatus, and its module-parameter fix.
//!
//! - [`facts`]: reads the host (CPU, /dev/kvm, the KVM module and its
//!   parameters, KVM capabilities, the hypervisor under us, memory).
//! - [`check`]: turns facts into checks, each with its value, and a verdict;
//!   every failed check has a reason and an exact fix. Pure, so every kind of
//!   host is unit-tested from fabricated facts.
//! - [`enable`]: applies the fix for a KVM module loaded with `nested=0`.

pub mod check;
pub mod enable;
pub mod facts;

pub use check::{evaluate, HostReport, Status};
pub use facts::{gather, gather_with, HostFacts, KvmDevice};
