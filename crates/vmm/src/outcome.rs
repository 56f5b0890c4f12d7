//! How a VM ends ([`VmOutcome`]), and the one slot every part of the event
//! loop may settle it in: the first outcome wins, later ones are ignored.

use std::cell::RefCell;
use std::rc::Rc;

/// How a VM ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmOutcome {
    /// The guest reset itself (i8042, ACPI reset or a KVM reset event).
    Reset,
    /// The guest powered off (ACPI S5 or a KVM shutdown event).
    PowerOff,
    /// nestvm got this signal and stopped the VM.
    Signal(i32),
    /// The user typed the console's quit sequence.
    Quit,
    /// The control API asked for the VM to stop at once.
    Killed,
    /// The VM was saved (`PUT /v1/vm/save`) and stopped.
    Saved,
    /// The VM was migrated (`PUT /v1/vm/migrate`) and runs elsewhere now.
    Migrated,
    /// The guest crashed.
    Crashed {
        /// What happened.
        reason: String,
        /// Register dump of the vCPU.
        registers: String,
    },
}

/// The outcome slot, shared by the event loop's subscribers and the
/// controller (all on the event loop's thread).
#[derive(Clone, Default)]
pub(crate) struct Outcome(Rc<RefCell<Option<VmOutcome>>>);

impl Outcome {
    /// Records `value` unless an outcome is already there.
    pub(crate) fn settle(&self, value: VmOutcome) {
        let mut o = self.0.borrow_mut();
        if o.is_none() {
            *o = Some(value);
        }
    }

    /// Whether the VM has ended.
    pub(crate) fn is_settled(&self) -> bool {
        self.0.borrow().is_some()
    }

    /// Whether it ended this way.
    pub(crate) fn is(&self, value: &VmOutcome) -> bool {
        self.0.borrow().as_ref() == Some(value)
    }

    /// The outcome, once settled.
    pub(crate) fn take(&self) -> Option<VmOutcome> {
        self.0.borrow_mut().take()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_outcome_wins() {
        let o = Outcome::default();
        assert!(!o.is_settled());
        o.settle(VmOutcome::Saved);
        o.clone().settle(VmOutcome::PowerOff);
        assert!(o.is(&VmOutcome::Saved));
        assert_eq!(o.take(), Some(VmOutcome::Saved));
    }
}
