//! nestvm's VM inventory.
//!
//! - [`store`]: the state directory (`/var/lib/nestvm` as root,
//!   `$XDG_DATA_HOME/nestvm` otherwise, or `--state-dir`/`NESTVM_STATE_DIR`),
//!   one private directory per VM holding its definition (`vm.toml`, the
//!   same format `nestvm run --config` reads), written atomically.
//! - [`name`]: VM names, validated so none can escape the state directory.
//! - [`lock`]: a per-VM command lock, so two commands on one VM never
//!   interleave, and the run lock a VMM process holds for its whole life, so
//!   a VM whose VMM died is seen as Off at once.
//! - [`checkpoints`]: a VM's checkpoint tree as bookkeeping: its folder,
//!   the `CURRENT` pointer, listing, the name rule, and removing a
//!   checkpoint by folding its pages into its children.
//! - [`ownership`]: a VM's directory handed to the user a root-started VMM
//!   becomes, and taken back (checked for what that user planted) before
//!   root reads it again.

pub mod checkpoints;
pub mod lock;
pub mod name;
pub mod ownership;
pub mod store;

pub use checkpoints::{CheckpointError, Checkpoints};
pub use name::VmName;
pub use store::{Store, StoreError, VmState};
