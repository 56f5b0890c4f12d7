//! Loading a Linux kernel (bzImage or ELF vmlinux), its initrd and command
//! line, and writing `boot_params` for the 64-bit boot protocol.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use linux_loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::loader::{bzimage::BzImage, elf::Elf, KernelLoader};
use vm_memory::bitmap::Bitmap;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::layout::{self, E820Entry};

/// `HdrS`, the setup header magic at offset 0x202 of a bzImage.
const HDRS_MAGIC: u32 = 0x5372_6448;
/// bzImage `xloadflags` bit: the kernel has a 64-bit entry point at +0x200.
const XLF_KERNEL_64: u16 = 1;
/// Linux's own limit on x86 when the header does not say (`COMMAND_LINE_SIZE`).
const DEFAULT_CMDLINE_SIZE: usize = 2048;
/// Slack we keep between the end of the decompressed kernel and the initrd.
const INITRD_GAP: u64 = 1 << 20;

/// Errors of kernel and initrd loading.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// The kernel or initrd file cannot be opened or read.
    #[error("cannot read {what} {path}")]
    Read {
        /// "kernel" or "initrd".
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The file is neither an ELF vmlinux nor a bzImage.
    #[error("{0} is not a Linux kernel: give an x86-64 bzImage (e.g. /boot/vmlinuz-*) or an ELF vmlinux")]
    NotAKernel(PathBuf),
    /// An ELF whose entry point is not in what it loads.
    #[error("{}'s entry point {entry:#x} lies outside the image it loads (a corrupt ELF?): use an x86-64 kernel", path.display())]
    EntryOutside {
        /// The kernel.
        path: PathBuf,
        /// Its entry point.
        entry: u64,
    },
    /// A bzImage without a 64-bit entry point.
    #[error("{0} has no 64-bit entry point (boot protocol < 2.12 or a 32-bit kernel): use an x86-64 kernel")]
    Not64Bit(PathBuf),
    /// The loader refused the image.
    #[error("cannot load kernel {path}")]
    Load {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: linux_loader::loader::Error,
    },
    /// Kernel plus initrd do not fit in guest memory.
    #[error("guest memory is too small: the kernel and initrd need about {need_mib} MiB below 3 GiB, the VM has {have_mib} MiB there; raise --memory")]
    TooSmall {
        /// What is needed, MiB.
        need_mib: u64,
        /// What the VM has, MiB.
        have_mib: u64,
    },
    /// The command line is longer than the kernel accepts.
    #[error(
        "kernel command line is {len} bytes, the kernel accepts at most {max}: shorten --cmdline"
    )]
    CmdlineTooLong {
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The command line has a NUL byte.
    #[error("kernel command line contains a NUL byte")]
    CmdlineNul,
    /// Writing into guest memory failed.
    #[error("cannot write {what} into guest memory")]
    GuestMemory {
        /// What was written.
        what: &'static str,
        /// The cause.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
}

/// Which boot format a kernel file is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelFormat {
    /// A compressed bzImage with a setup header.
    BzImage,
    /// An uncompressed ELF vmlinux (or any 64-bit ELF with PT_LOAD segments).
    Elf,
}

/// A kernel placed in guest memory.
#[derive(Debug, Clone)]
pub struct LoadedKernel {
    /// Its format.
    pub format: KernelFormat,
    /// Where the vCPU starts (the 64-bit entry).
    pub entry: u64,
    /// First byte past what the kernel needs in memory (incl. decompression room).
    pub end: u64,
    /// The bzImage setup header, to copy into `boot_params`.
    pub setup_header: Option<setup_header>,
}

fn read_err<'a>(
    what: &'static str,
    path: &'a Path,
) -> impl FnOnce(std::io::Error) -> BootError + 'a {
    move |source| BootError::Read {
        what,
        path: path.to_owned(),
        source,
    }
}

/// Opens `path` for reading if it is a regular file. The open itself never
/// blocks (O_NONBLOCK: a FIFO would wait for a writer forever); anything but
/// a regular file (a FIFO, a directory, a device) is refused with
/// `InvalidInput`.
pub fn open_regular(path: &Path) -> std::io::Result<File> {
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)?;
    if !file.metadata()?.is_file() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "not a regular file",
        ));
    }
    Ok(file)
}

/// Tells a bzImage from an ELF by their magic numbers.
pub fn detect_format(file: &mut File, path: &Path) -> Result<KernelFormat, BootError> {
    let mut head = [0u8; 0x210];
    file.seek(SeekFrom::Start(0))
        .map_err(read_err("kernel", path))?;
    let n = read_up_to(file, &mut head).map_err(read_err("kernel", path))?;
    if n >= 4 && head[..4] == *b"\x7fELF" {
        // Class 64 (2), little endian (1), machine x86-64 (62).
        if n >= 20 && head[4] == 2 && head[5] == 1 && u16::from_le_bytes([head[18], head[19]]) == 62
        {
            return Ok(KernelFormat::Elf);
        }
        return Err(BootError::NotAKernel(path.to_owned()));
    }
    if n >= 0x206
        && u32::from_le_bytes([head[0x202], head[0x203], head[0x204], head[0x205]]) == HDRS_MAGIC
    {
        return Ok(KernelFormat::BzImage);
    }
    Err(BootError::NotAKernel(path.to_owned()))
}

/// Where an ELF's loadable segments end: in the file, and in memory.
#[derive(Debug, PartialEq, Eq)]
struct ElfExtent {
    file_end: u64,
    memory_end: u64,
}

/// Reads the program headers of the ELF64 in `file` (at most 256 of them).
fn elf_extent(file: &mut File) -> std::io::Result<ElfExtent> {
    const PT_LOAD: u32 = 1;
    let mut eh = [0u8; 64];
    file.seek(SeekFrom::Start(0))?;
    file.read_exact(&mut eh)?;
    let u16_at = |b: &[u8], o: usize| u64::from(u16::from_le_bytes([b[o], b[o + 1]]));
    let u64_at = |b: &[u8], o: usize| {
        let mut w = [0u8; 8];
        w.copy_from_slice(&b[o..o + 8]);
        u64::from_le_bytes(w)
    };
    let (phoff, phentsize, phnum) = (u64_at(&eh, 0x20), u16_at(&eh, 0x36), u16_at(&eh, 0x38));
    if phentsize < 56 || phnum > 256 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "its program headers are malformed",
        ));
    }
    let mut x = ElfExtent {
        file_end: 0,
        memory_end: 0,
    };
    let mut ph = [0u8; 56];
    for i in 0..phnum {
        file.seek(SeekFrom::Start(phoff.saturating_add(i * phentsize)))?;
        file.read_exact(&mut ph)?;
        if u32::from_le_bytes([ph[0], ph[1], ph[2], ph[3]]) != PT_LOAD {
            continue;
        }
        let (offset, paddr) = (u64_at(&ph, 0x08), u64_at(&ph, 0x18));
        let (filesz, memsz) = (u64_at(&ph, 0x20), u64_at(&ph, 0x28));
        x.file_end = x.file_end.max(offset.saturating_add(filesz));
        x.memory_end = x.memory_end.max(paddr.saturating_add(memsz));
    }
    Ok(x)
}

fn read_up_to(file: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match file.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// Loads the kernel at `path` into `mem` (whose low RAM ends at `low_end`).
pub fn load_kernel<B: Bitmap>(
    mem: &GuestMemoryMmap<B>,
    low_end: u64,
    path: &Path,
) -> Result<LoadedKernel, BootError> {
    let mut file = open_regular(path).map_err(read_err("kernel", path))?;
    let format = detect_format(&mut file, path)?;
    let file_len = file.metadata().map_err(read_err("kernel", path))?.len();
    let too_small = |need: u64| BootError::TooSmall {
        need_mib: need.div_ceil(1 << 20),
        have_mib: low_end >> 20,
    };
    let load_err = |source| BootError::Load {
        path: path.to_owned(),
        source,
    };
    match format {
        KernelFormat::BzImage => {
            if layout::HIMEM_START + file_len > low_end {
                return Err(too_small(layout::HIMEM_START + file_len));
            }
            let res = BzImage::load(
                mem,
                None,
                &mut file,
                Some(GuestAddress(layout::HIMEM_START)),
            )
            .map_err(load_err)?;
            let hdr = res
                .setup_header
                .expect("the bzImage loader returns its header");
            if hdr.version < 0x020c || hdr.xloadflags & XLF_KERNEL_64 == 0 {
                return Err(BootError::Not64Bit(path.to_owned()));
            }
            let load = res.kernel_load.0;
            // The decompressor needs init_size bytes from the load address.
            let end = (load + u64::from(hdr.init_size)).max(res.kernel_end);
            if end > low_end {
                return Err(too_small(end));
            }
            Ok(LoadedKernel {
                format,
                entry: load + 0x200,
                end,
                setup_header: Some(hdr),
            })
        }
        KernelFormat::Elf => {
            if file_len > low_end {
                return Err(too_small(file_len));
            }
            let res = Elf::load(
                mem,
                None,
                &mut file,
                Some(GuestAddress(layout::HIMEM_START)),
            )
            .map_err(|e| match e {
                // A segment could not be copied in: it lies past the end of
                // the file (a truncated vmlinux), or past guest memory.
                linux_loader::loader::Error::Elf(
                    linux_loader::loader::elf::Error::ReadKernelImage,
                ) => match elf_extent(&mut file) {
                    Ok(x) if x.file_end > file_len => BootError::Read {
                        what: "kernel",
                        path: path.to_owned(),
                        source: std::io::Error::new(
                            std::io::ErrorKind::UnexpectedEof,
                            format!(
                                "its segments end at byte {}, the file at {file_len} (truncated?)",
                                x.file_end
                            ),
                        ),
                    },
                    Ok(x) => too_small(x.memory_end),
                    Err(source) => BootError::Read {
                        what: "kernel",
                        path: path.to_owned(),
                        source,
                    },
                },
                other => load_err(other),
            })?;
            // A segment's memory size may reach past what its file size
            // filled (its zeroed tail): all of it must fit guest memory.
            if res.kernel_end > low_end {
                return Err(too_small(res.kernel_end));
            }
            // The entry point must lie in what was loaded: a corrupt (or
            // hostile) header would send the boot vCPU into nowhere.
            let entry = res.kernel_load.0;
            if entry < layout::HIMEM_START || entry >= res.kernel_end {
                return Err(BootError::EntryOutside {
                    path: path.to_owned(),
                    entry,
                });
            }
            Ok(LoadedKernel {
                format,
                entry,
                end: res.kernel_end,
                setup_header: None,
            })
        }
    }
}

/// Places the initrd at the top of low RAM (below the kernel's limit) and
/// returns its address and size.
pub fn load_initrd<B: Bitmap>(
    mem: &GuestMemoryMmap<B>,
    low_end: u64,
    kernel: &LoadedKernel,
    path: &Path,
) -> Result<(u64, u64), BootError> {
    let mut file = open_regular(path).map_err(read_err("initrd", path))?;
    let size = file.metadata().map_err(read_err("initrd", path))?.len();
    let max = kernel
        .setup_header
        .map(|h| u64::from(h.initrd_addr_max) + 1)
        .filter(|&m| m > layout::HIMEM_START)
        .unwrap_or(u64::from(u32::MAX) + 1)
        .min(low_end);
    let addr = max.saturating_sub(size) & !0xfff;
    if size > max || addr < kernel.end + INITRD_GAP {
        return Err(BootError::TooSmall {
            need_mib: (kernel.end + INITRD_GAP + size).div_ceil(1 << 20),
            have_mib: low_end >> 20,
        });
    }
    mem.read_exact_volatile_from(GuestAddress(addr), &mut file, size as usize)
        .map_err(|source| BootError::GuestMemory {
            what: "the initrd",
            source,
        })?;
    Ok((addr, size))
}

/// Writes the command line (NUL-terminated) at [`layout::CMDLINE_START`].
pub fn write_cmdline<B: Bitmap>(
    mem: &GuestMemoryMmap<B>,
    kernel: &LoadedKernel,
    cmdline: &str,
) -> Result<(), BootError> {
    if cmdline.contains('\0') {
        return Err(BootError::CmdlineNul);
    }
    let max = kernel
        .setup_header
        .map(|h| h.cmdline_size as usize)
        .filter(|&s| s > 0)
        .unwrap_or(DEFAULT_CMDLINE_SIZE)
        .min(layout::CMDLINE_MAX - 1);
    if cmdline.len() > max {
        return Err(BootError::CmdlineTooLong {
            len: cmdline.len(),
            max,
        });
    }
    let mut bytes = cmdline.as_bytes().to_vec();
    bytes.push(0);
    mem.write_slice(&bytes, GuestAddress(layout::CMDLINE_START))
        .map_err(|source| BootError::GuestMemory {
            what: "the command line",
            source,
        })
}

/// Everything `boot_params` carries.
#[derive(Debug, Clone)]
pub struct BootInfo<'a> {
    /// The loaded kernel.
    pub kernel: &'a LoadedKernel,
    /// Length of the command line (without the NUL).
    pub cmdline_len: usize,
    /// Initrd address and size, if any.
    pub initrd: Option<(u64, u64)>,
    /// The e820 map.
    pub e820: &'a [E820Entry],
    /// Address of the ACPI RSDP.
    pub rsdp: u64,
}

/// Builds the zero page.
pub fn build_boot_params(info: &BootInfo<'_>) -> boot_params {
    let mut params = boot_params::default();
    if let Some(hdr) = info.kernel.setup_header {
        params.hdr = hdr;
    }
    params.hdr.type_of_loader = 0xff;
    params.hdr.boot_flag = 0xaa55;
    params.hdr.header = HDRS_MAGIC;
    params.hdr.cmd_line_ptr = layout::CMDLINE_START as u32;
    params.hdr.cmdline_size = info.cmdline_len as u32;
    if params.hdr.kernel_alignment == 0 {
        params.hdr.kernel_alignment = 0x0100_0000;
    }
    if let Some((addr, size)) = info.initrd {
        params.hdr.ramdisk_image = addr as u32;
        params.hdr.ramdisk_size = size as u32;
    }
    params.acpi_rsdp_addr = info.rsdp;
    for (slot, e) in params.e820_table.iter_mut().zip(info.e820) {
        *slot = boot_e820_entry {
            addr: e.addr,
            size: e.size,
            r#type: e.kind as u32,
        };
    }
    params.e820_entries = info.e820.len().min(params.e820_table.len()) as u8;
    params
}

/// Writes the zero page into guest memory.
pub fn write_boot_params<B: Bitmap>(
    mem: &GuestMemoryMmap<B>,
    params: &boot_params,
) -> Result<(), BootError> {
    mem.write_obj(*params, GuestAddress(layout::ZERO_PAGE_START))
        .map_err(|source| BootError::GuestMemory {
            what: "boot_params",
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    const MIB: u64 = 1 << 20;

    fn mem(size: u64) -> GuestMemoryMmap {
        GuestMemoryMmap::<()>::from_ranges(&layout::ram_ranges(size)).unwrap()
    }

    fn temp_file(name: &str, bytes: &[u8]) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("nestvm-arch-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join(name);
        std::fs::File::create(&p).unwrap().write_all(bytes).unwrap();
        p
    }

    /// A minimal 64-bit ELF with one PT_LOAD of `code` at 1 MiB.
    fn tiny_elf(code: &[u8]) -> Vec<u8> {
        let mut f = vec![0u8; 0x1000];
        f[..4].copy_from_slice(b"\x7fELF");
        f[4] = 2; // 64-bit
        f[5] = 1; // little endian
        f[6] = 1;
        f[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
        f[18..20].copy_from_slice(&62u16.to_le_bytes()); // x86-64
        f[20..24].copy_from_slice(&1u32.to_le_bytes());
        f[24..32].copy_from_slice(&0x10_0000u64.to_le_bytes()); // entry
        f[32..40].copy_from_slice(&64u64.to_le_bytes()); // phoff
        f[52..54].copy_from_slice(&64u16.to_le_bytes()); // ehsize
        f[54..56].copy_from_slice(&56u16.to_le_bytes()); // phentsize
        f[56..58].copy_from_slice(&1u16.to_le_bytes()); // phnum
        let ph = &mut f[64..120];
        ph[0..4].copy_from_slice(&1u32.to_le_bytes()); // PT_LOAD
        ph[4..8].copy_from_slice(&5u32.to_le_bytes());
        ph[8..16].copy_from_slice(&0x1000u64.to_le_bytes()); // offset
        ph[16..24].copy_from_slice(&0x10_0000u64.to_le_bytes()); // vaddr
        ph[24..32].copy_from_slice(&0x10_0000u64.to_le_bytes()); // paddr
        ph[32..40].copy_from_slice(&(code.len() as u64).to_le_bytes());
        ph[40..48].copy_from_slice(&(code.len() as u64).to_le_bytes());
        f.extend_from_slice(code);
        f
    }

    #[test]
    fn elf_kernel_is_loaded_at_its_address() {
        let path = temp_file("k.elf", &tiny_elf(&[0xf4, 0xeb, 0xfd]));
        let m = mem(16 * MIB);
        let k = load_kernel(&m, 16 * MIB, &path).unwrap();
        assert_eq!(k.format, KernelFormat::Elf);
        assert_eq!(k.entry, 0x10_0000);
        let b: [u8; 3] = m.read_obj(GuestAddress(0x10_0000)).unwrap();
        assert_eq!(b, [0xf4, 0xeb, 0xfd]);
    }

    /// Found by the kernel_loader fuzz target: an ELF whose entry point
    /// lies outside every segment it loads was accepted.
    #[test]
    fn an_elf_entry_outside_what_it_loads_is_refused() {
        let m = mem(16 * MIB);
        // (An entry below the load address linux-loader refuses itself.)
        for entry in [0x10_0000u64 + 3, 0x10_0000_0000_0000] {
            let mut bad = tiny_elf(&[0xf4, 0xeb, 0xfd]);
            bad[24..32].copy_from_slice(&entry.to_le_bytes());
            let path = temp_file("entry.elf", &bad);
            let err = load_kernel(&m, 16 * MIB, &path).unwrap_err();
            assert!(
                matches!(err, BootError::EntryOutside { .. }),
                "{entry:#x}: {err}"
            );
        }
    }

    #[test]
    fn garbage_is_not_a_kernel() {
        let path = temp_file("garbage", b"#!/bin/sh\necho hello\n");
        let m = mem(16 * MIB);
        let err = load_kernel(&m, 16 * MIB, &path).unwrap_err();
        assert!(matches!(err, BootError::NotAKernel(_)), "{err}");
        assert!(err.to_string().contains("not a Linux kernel"));
        // A 32-bit ELF is refused the same way.
        let mut elf32 = tiny_elf(&[0xf4]);
        elf32[4] = 1;
        let path = temp_file("elf32", &elf32);
        assert!(matches!(
            load_kernel(&m, 16 * MIB, &path),
            Err(BootError::NotAKernel(_))
        ));
    }

    #[test]
    fn elf_read_errors_say_what_went_wrong() {
        let m = mem(16 * MIB);
        // The segment says 64 bytes, the file holds 3 of them: truncated,
        // not "memory too small".
        let mut cut = tiny_elf(&[0xf4; 64]);
        cut.truncate(0x1003);
        let path = temp_file("cut.elf", &cut);
        let err = load_kernel(&m, 16 * MIB, &path).unwrap_err();
        assert!(matches!(err, BootError::Read { .. }), "{err}");
        let chain = format!("{err}: {}", std::error::Error::source(&err).unwrap());
        assert!(chain.contains("truncated"), "{chain}");
        // A segment loaded past the end of guest memory is "too small".
        let mut far = tiny_elf(&vec![0xf4; 2 * MIB as usize]);
        far[64 + 24..64 + 32].copy_from_slice(&(15 * MIB).to_le_bytes());
        let path = temp_file("far.elf", &far);
        let err = load_kernel(&m, 16 * MIB, &path).unwrap_err();
        assert!(
            matches!(err, BootError::TooSmall { need_mib: 17, .. }),
            "{err}"
        );
    }

    #[test]
    fn only_regular_files_are_opened_and_a_fifo_does_not_block() {
        let dir = std::env::temp_dir().join(format!("nestvm-arch-fifo-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let fifo = dir.join("k.fifo");
        let _ = std::fs::remove_file(&fifo);
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
        let m = mem(16 * MIB);
        for p in [fifo.as_path(), dir.as_path()] {
            let err = load_kernel(&m, 16 * MIB, p).unwrap_err();
            let cause = std::error::Error::source(&err).unwrap().to_string();
            assert!(cause.contains("not a regular file"), "{p:?}: {cause}");
        }
    }

    #[test]
    fn missing_kernel_names_the_file() {
        let m = mem(16 * MIB);
        let err = load_kernel(&m, 16 * MIB, Path::new("/nonexistent/vmlinuz")).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/vmlinuz"), "{err}");
    }

    /// A fake bzImage: setup header with HdrS and 64-bit entry, payload after.
    fn fake_bzimage(payload: usize, init_size: u32, xloadflags: u16) -> Vec<u8> {
        let setup_sects = 4u8;
        let mut f = vec![0u8; (setup_sects as usize + 1) * 512 + payload];
        f[0x1f1] = setup_sects;
        f[0x1fe..0x200].copy_from_slice(&0xaa55u16.to_le_bytes());
        f[0x202..0x206].copy_from_slice(&HDRS_MAGIC.to_le_bytes());
        f[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes()); // version 2.15
        f[0x211] = 1; // loadflags: LOADED_HIGH
        f[0x214..0x218].copy_from_slice(&0x10_0000u32.to_le_bytes()); // code32_start
        f[0x22c..0x230].copy_from_slice(&0x7fff_ffffu32.to_le_bytes()); // initrd_addr_max
        f[0x236..0x238].copy_from_slice(&xloadflags.to_le_bytes());
        f[0x238..0x23c].copy_from_slice(&2048u32.to_le_bytes()); // cmdline_size
        f[0x260..0x264].copy_from_slice(&init_size.to_le_bytes());
        f
    }

    #[test]
    fn bzimage_entry_is_64bit_entry_and_init_size_counts() {
        let path = temp_file("bz", &fake_bzimage(4096, 8 << 20, 1));
        let m = mem(64 * MIB);
        let k = load_kernel(&m, 64 * MIB, &path).unwrap();
        assert_eq!(k.format, KernelFormat::BzImage);
        assert_eq!(k.entry, 0x10_0200);
        assert_eq!(k.end, 0x10_0000 + (8 << 20));
        // Too little memory for init_size.
        let m = mem(8 * MIB);
        let err = load_kernel(&m, 8 * MIB, &path).unwrap_err();
        assert!(matches!(err, BootError::TooSmall { .. }), "{err}");
        assert!(err.to_string().contains("--memory"));
    }

    #[test]
    fn bzimage_without_64bit_entry_is_refused() {
        let path = temp_file("bz32", &fake_bzimage(4096, 1 << 20, 0));
        let m = mem(64 * MIB);
        assert!(matches!(
            load_kernel(&m, 64 * MIB, &path),
            Err(BootError::Not64Bit(_))
        ));
    }

    #[test]
    fn initrd_goes_to_the_top_of_low_ram_and_too_big_is_refused() {
        let kpath = temp_file("bz2", &fake_bzimage(4096, 4 << 20, 1));
        let m = mem(64 * MIB);
        let k = load_kernel(&m, 64 * MIB, &kpath).unwrap();
        let ipath = temp_file("initrd", &vec![0x5a; 3 * MIB as usize + 5]);
        let (addr, size) = load_initrd(&m, 64 * MIB, &k, &ipath).unwrap();
        assert_eq!(size, 3 * MIB + 5);
        assert_eq!(addr & 0xfff, 0);
        assert!(addr + size <= 64 * MIB && addr >= k.end);
        let b: u8 = m.read_obj(GuestAddress(addr + size - 1)).unwrap();
        assert_eq!(b, 0x5a);
        let big = temp_file("big-initrd", &vec![0u8; 62 * MIB as usize]);
        let err = load_initrd(&m, 64 * MIB, &k, &big).unwrap_err();
        assert!(matches!(err, BootError::TooSmall { .. }), "{err}");
    }

    #[test]
    fn cmdline_limits() {
        let path = temp_file("k2.elf", &tiny_elf(&[0xf4]));
        let m = mem(16 * MIB);
        let k = load_kernel(&m, 16 * MIB, &path).unwrap();
        write_cmdline(&m, &k, "console=ttyS0").unwrap();
        let mut buf = [0u8; 14];
        m.read_slice(&mut buf, GuestAddress(layout::CMDLINE_START))
            .unwrap();
        assert_eq!(&buf, b"console=ttyS0\0");
        let long = "x".repeat(DEFAULT_CMDLINE_SIZE + 1);
        assert!(matches!(
            write_cmdline(&m, &k, &long),
            Err(BootError::CmdlineTooLong { .. })
        ));
        assert!(matches!(
            write_cmdline(&m, &k, "a\0b"),
            Err(BootError::CmdlineNul)
        ));
    }

    #[test]
    fn boot_params_carry_e820_initrd_cmdline_and_rsdp() {
        let path = temp_file("bz3", &fake_bzimage(4096, 1 << 20, 1));
        let m = mem(64 * MIB);
        let k = load_kernel(&m, 64 * MIB, &path).unwrap();
        let e820 = layout::e820_map(6 << 30);
        let p = build_boot_params(&BootInfo {
            kernel: &k,
            cmdline_len: 13,
            initrd: Some((0x300_0000, 0x1234)),
            e820: &e820,
            rsdp: layout::ACPI_START,
        });
        assert_eq!({ p.hdr.boot_flag }, 0xaa55);
        assert_eq!({ p.hdr.header }, HDRS_MAGIC);
        assert_eq!({ p.hdr.type_of_loader }, 0xff);
        assert_eq!({ p.hdr.cmd_line_ptr }, layout::CMDLINE_START as u32);
        assert_eq!({ p.hdr.ramdisk_image }, 0x300_0000);
        assert_eq!({ p.hdr.ramdisk_size }, 0x1234);
        assert_eq!({ p.acpi_rsdp_addr }, layout::ACPI_START);
        assert_eq!(p.e820_entries as usize, e820.len());
        let high = p.e820_table[e820.len() - 1];
        assert_eq!(
            ({ high.addr }, { high.size }, { high.r#type }),
            (4 << 30, 3 << 30, 1)
        );
        write_boot_params(&m, &p).unwrap();
        let back: boot_params = m.read_obj(GuestAddress(layout::ZERO_PAGE_START)).unwrap();
        assert_eq!({ back.hdr.ramdisk_size }, 0x1234);
    }
}
