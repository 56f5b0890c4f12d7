//! A saved VM's state (the JSON inside the container) from arbitrary bytes:
//! decoding refuses or gives a `VmSnapshot`, and every check a restore
//! makes before it asks KVM anything or maps memory (the definition as a
//! new VM's, the state against it, memory regions against the layout, the
//! state against a definition) refuses or passes without panicking.

#![no_main]

use libfuzzer_sys::fuzz_target;
use nestvm_vmm::persist::{self, VmSnapshot};

fuzz_target!(|data: &[u8]| {
    let Ok(snap) = serde_json::from_slice::<VmSnapshot>(data) else {
        return;
    };
    let _ = persist::check_state(&snap, &snap.config);
    let _ = persist::check_layout(snap.config.memory, &snap.memory);
    let encoded = serde_json::to_vec(&snap).expect("a decoded state encodes");
    let again: VmSnapshot = serde_json::from_slice(&encoded).expect("and decodes again");
    assert_eq!(again.config, snap.config);
});
