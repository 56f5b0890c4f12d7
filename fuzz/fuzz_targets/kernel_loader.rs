//! The kernel loader on arbitrary files: a bzImage header or an ELF
//! vmlinux with any sizes, offsets and entry points. It loads a kernel that
//! lies inside guest memory below the limit, or refuses the file; nothing
//! panics or writes outside memory.

#![no_main]

use libfuzzer_sys::fuzz_target;
use nestvm_arch::boot::load_kernel;
use vm_memory::{GuestAddress, GuestMemoryMmap};

fuzz_target!(|data: &[u8]| {
    let dir = std::env::temp_dir().join(format!("nestvm-fuzz-kernel-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&dir);
    let path = dir.join("kernel");
    if std::fs::write(&path, data).is_err() {
        return;
    }
    let mem: GuestMemoryMmap<()> =
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 32 << 20)]).unwrap();
    if let Ok(k) = load_kernel(&mem, 32 << 20, &path) {
        assert!(k.entry < 32 << 20, "entry {:#x} outside memory", k.entry);
    }
});
