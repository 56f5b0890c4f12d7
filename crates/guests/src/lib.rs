//! Tiny x86-64 guests for tests, the lab and benchmarks.
//!
//! Each is a 64-bit ELF whose one PT_LOAD segment sits at 1 MiB, entered in
//! long mode by nestvm's 64-bit boot path exactly like a Linux vmlinux. They
//! run a few dozen instructions at CPL0 (emulated, so slow, on a PVM host) and
//! talk only through port I/O: COM1 for text, then one of the ways a guest
//! ends — i8042 reset, ACPI power-off, a triple fault, or halting forever.
//!
//! The machine code is assembled by hand below; each program lists its
//! instructions with offsets so the jumps can be checked.

/// Where the guest is loaded and entered.
pub const LOAD_ADDR: u64 = 0x10_0000;

/// How a guest ends after its work.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// `out 0x64, 0xfe`: i8042 CPU reset.
    Reset,
    /// ACPI S5 through the sleep control port 0x3c0.
    PowerOff,
    /// `ud2` with an empty IDT: a triple fault.
    TripleFault,
    /// `cli; hlt` forever (only a signal stops it).
    HaltForever,
}

impl Ending {
    fn code(self) -> Vec<u8> {
        match self {
            // mov al, 0xfe; out 0x64, al; hlt; jmp $-1
            Ending::Reset => vec![0xb0, 0xfe, 0xe6, 0x64, 0xf4, 0xeb, 0xfd],
            // mov dx, 0x3c0; mov al, (5 << 2) | SLP_EN; out dx, al; hlt; jmp $-1
            Ending::PowerOff => vec![0x66, 0xba, 0xc0, 0x03, 0xb0, 0x34, 0xee, 0xf4, 0xeb, 0xfd],
            // ud2
            Ending::TripleFault => vec![0x0f, 0x0b],
            // cli; hlt; jmp $-1
            Ending::HaltForever => vec![0xfa, 0xf4, 0xeb, 0xfd],
        }
    }
}

/// Prints `message` on COM1, then ends as told.
pub fn hello(message: &str, ending: Ending) -> Vec<u8> {
    assert!(
        !message.as_bytes().contains(&0),
        "message must not contain NUL"
    );
    let end = ending.code();
    // 0:  66 ba f8 03        mov dx, 0x3f8
    // 4:  48 8d 35 <disp32>  lea rsi, [rip + msg]      (next rip = 11)
    // 11: ac                 lodsb
    // 12: 84 c0              test al, al
    // 14: 74 03              jz 19
    // 16: ee                 out dx, al
    // 17: eb f8              jmp 11
    // 19: <ending>
    // msg: bytes, 0
    let msg_offset = 19 + end.len() as i32;
    let mut code = vec![0x66, 0xba, 0xf8, 0x03, 0x48, 0x8d, 0x35];
    code.extend_from_slice(&(msg_offset - 11).to_le_bytes());
    code.extend_from_slice(&[0xac, 0x84, 0xc0, 0x74, 0x03, 0xee, 0xeb, 0xf8]);
    code.extend_from_slice(&end);
    code.extend_from_slice(message.as_bytes());
    code.push(0);
    elf(&code)
}

/// Writes to `port` `count` times (each write is one exit to the VMM's bus),
/// then prints `message` and ends as told.
pub fn io_loop(port: u8, count: u32, message: &str, ending: Ending) -> Vec<u8> {
    // 0:  b9 <imm32>   mov ecx, count
    // 5:  e6 <port>    out port, al
    // 7:  ff c9        dec ecx
    // 9:  75 fa        jnz 5
    // 11: <hello>
    let mut code = vec![0xb9];
    code.extend_from_slice(&count.max(1).to_le_bytes());
    code.extend_from_slice(&[0xe6, port, 0xff, 0xc9, 0x75, 0xfa]);
    let tail = hello(message, ending);
    code.extend_from_slice(&tail[ELF_CODE_OFFSET..]);
    // The hello part uses rip-relative addressing only, so it can move.
    elf(&code)
}

/// Prints `ticks` dots on COM1, with a busy loop of `spin` iterations before
/// each, then prints `message` and ends as told: a guest that visibly keeps
/// running for a while (used to show a nested guest survives operations on
/// the VM around it).
pub fn ticker(ticks: u32, spin: u32, message: &str, ending: Ending) -> Vec<u8> {
    // 0:  b9 <imm32>   mov ecx, ticks
    // 5:  bb <imm32>   mov ebx, spin
    // 10: ff cb        dec ebx
    // 12: 75 fc        jnz 10
    // 14: 66 ba f8 03  mov dx, 0x3f8
    // 18: b0 2e        mov al, '.'
    // 20: ee           out dx, al
    // 21: ff c9        dec ecx
    // 23: 75 ec        jnz 5
    // 25: <hello>
    let mut code = vec![0xb9];
    code.extend_from_slice(&ticks.max(1).to_le_bytes());
    code.push(0xbb);
    code.extend_from_slice(&spin.max(1).to_le_bytes());
    code.extend_from_slice(&[
        0xff, 0xcb, 0x75, 0xfc, 0x66, 0xba, 0xf8, 0x03, 0xb0, b'.', 0xee, 0xff, 0xc9, 0x75, 0xec,
    ]);
    let tail = hello(message, ending);
    code.extend_from_slice(&tail[ELF_CODE_OFFSET..]);
    elf(&code)
}

/// Writes one quadword into each 4 KiB page of `mib` MiB from 2 MiB up,
/// over and over, printing a dot after each pass: a guest that keeps
/// dirtying memory (the busy case of live migration). Never ends.
pub fn dirtier(mib: u32) -> Vec<u8> {
    // 0:  48 c7 c7 00 00 20 00  mov rdi, 0x200000
    // 7:  b9 <imm32>            mov ecx, pages
    // 12: 48 89 1f              mov [rdi], rbx
    // 15: 48 81 c7 00 10 00 00  add rdi, 0x1000
    // 22: ff c9                 dec ecx
    // 24: 75 f2                 jnz 12
    // 26: 48 ff c3              inc rbx
    // 29: 66 ba f8 03           mov dx, 0x3f8
    // 33: b0 2e                 mov al, '.'
    // 35: ee                    out dx, al
    // 36: eb da                 jmp 0
    let mut code = vec![0x48, 0xc7, 0xc7, 0x00, 0x00, 0x20, 0x00, 0xb9];
    code.extend_from_slice(&(mib.max(1) * 256).to_le_bytes());
    code.extend_from_slice(&[
        0x48, 0x89, 0x1f, 0x48, 0x81, 0xc7, 0x00, 0x10, 0x00, 0x00, 0xff, 0xc9, 0x75, 0xf2, 0x48,
        0xff, 0xc3, 0x66, 0xba, 0xf8, 0x03, 0xb0, b'.', 0xee, 0xeb, 0xda,
    ]);
    assert_eq!(code.len(), 38, "offsets above");
    elf(&code)
}

/// File offset of the code in images made by [`elf`].
pub const ELF_CODE_OFFSET: usize = 0x1000;

/// Wraps `code` in a minimal x86-64 ELF executable loaded and entered at [`LOAD_ADDR`].
pub fn elf(code: &[u8]) -> Vec<u8> {
    let mut f = vec![0u8; ELF_CODE_OFFSET];
    let put =
        |f: &mut Vec<u8>, at: usize, bytes: &[u8]| f[at..at + bytes.len()].copy_from_slice(bytes);
    put(&mut f, 0, b"\x7fELF");
    put(&mut f, 4, &[2, 1, 1]); // 64-bit, little endian, version 1
    put(&mut f, 16, &2u16.to_le_bytes()); // ET_EXEC
    put(&mut f, 18, &62u16.to_le_bytes()); // EM_X86_64
    put(&mut f, 20, &1u32.to_le_bytes());
    put(&mut f, 24, &LOAD_ADDR.to_le_bytes()); // e_entry
    put(&mut f, 32, &64u64.to_le_bytes()); // e_phoff
    put(&mut f, 52, &64u16.to_le_bytes()); // e_ehsize
    put(&mut f, 54, &56u16.to_le_bytes()); // e_phentsize
    put(&mut f, 56, &1u16.to_le_bytes()); // e_phnum
    let len = (code.len() as u64).to_le_bytes();
    put(&mut f, 64, &1u32.to_le_bytes()); // PT_LOAD
    put(&mut f, 68, &7u32.to_le_bytes()); // RWX
    put(&mut f, 72, &(ELF_CODE_OFFSET as u64).to_le_bytes());
    put(&mut f, 80, &LOAD_ADDR.to_le_bytes()); // p_vaddr
    put(&mut f, 88, &LOAD_ADDR.to_le_bytes()); // p_paddr
    put(&mut f, 96, &len); // p_filesz
    put(&mut f, 104, &len); // p_memsz
    put(&mut f, 112, &0x1000u64.to_le_bytes()); // p_align
    f.extend_from_slice(code);
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hello_layout() {
        let img = hello("hi", Ending::Reset);
        let code = &img[ELF_CODE_OFFSET..];
        // The lea displacement lands on the message.
        let disp = i32::from_le_bytes(code[7..11].try_into().unwrap());
        assert_eq!(&code[(11 + disp) as usize..], b"hi\0");
        assert_eq!(&img[..4], b"\x7fELF");
        assert_eq!(
            u64::from_le_bytes(img[24..32].try_into().unwrap()),
            LOAD_ADDR
        );
    }

    #[test]
    fn ticker_jumps_land_on_their_targets() {
        let img = ticker(3, 7, "t", Ending::Reset);
        let code = &img[ELF_CODE_OFFSET..];
        // jnz at 12 (rel8 at 13) goes back to 10; jnz at 23 (rel8 at 24) to 5.
        assert_eq!(14 + i32::from(code[13] as i8), 10);
        assert_eq!(25 + i32::from(code[24] as i8), 5);
        let disp = i32::from_le_bytes(code[25 + 7..25 + 11].try_into().unwrap());
        assert_eq!(&code[(25 + 11 + disp) as usize..], b"t\0");
    }

    #[test]
    fn io_loop_keeps_the_message_reachable() {
        let img = io_loop(0x80, 10, "done", Ending::PowerOff);
        let code = &img[ELF_CODE_OFFSET..];
        let disp = i32::from_le_bytes(code[11 + 7..11 + 11].try_into().unwrap());
        assert_eq!(&code[(11 + 11 + disp) as usize..], b"done\0");
        assert_eq!(u32::from_le_bytes(code[1..5].try_into().unwrap()), 10);
    }
}
