//! Builds a VM complete and paused: guest memory, kernel, initrd, command
//! line, ACPI tables, a fresh VM generation ID and boot_params; then the KVM VM with its irqchip and
//! PIT, the devices on their buses (virtio disks and adapters through
//! [`crate::virtio`]), and every vCPU with CPUID, MSRs, LAPIC and
//! (for the boot vCPU) the 64-bit entry registers. Nothing runs until
//! [`crate::event_loop::run`] resumes it.

use std::io::Write;
use std::sync::{Arc, Mutex};

use nestvm_arch::{acpi, boot, cpuid, layout, regs};
use nestvm_devices::acpi_pm::AcpiPm;
use nestvm_devices::bus::BusError;
use nestvm_devices::i8042::{I8042, I8042_PORT, I8042_PORT_LEN};
use nestvm_devices::serial::{SerialPort, SERIAL_PORT_LEN};
use nestvm_devices::EventTrigger;
use nestvm_kvm::{Hypervisor, HypervisorError, Vcpu, VcpuError, VmError};
use nestvm_virtio::Memory;

use crate::bus::Buses;
use crate::config::VmConfig;
use crate::vcpu::StateContext;

/// Errors while building a VM.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// More vCPUs than KVM allows.
    #[error("--cpus {got} is more than this host's KVM allows ({max}): lower --cpus")]
    TooManyCpus {
        /// What was asked.
        got: u32,
        /// KVM's limit.
        max: usize,
    },
    /// Guest memory cannot be allocated.
    #[error("cannot allocate {mib} MiB of guest memory: lower --memory or free host memory")]
    Memory {
        /// The size asked for.
        mib: u64,
        /// The cause.
        #[source]
        source: vm_memory::mmap::FromRangesError,
    },
    /// Kernel, initrd or command line.
    #[error(transparent)]
    Boot(#[from] boot::BootError),
    /// ACPI tables.
    #[error(transparent)]
    Acpi(#[from] acpi::AcpiError),
    /// Page tables or GDT.
    #[error(transparent)]
    Regs(#[from] regs::RegsError),
    /// Opening KVM.
    #[error(transparent)]
    Hypervisor(#[from] HypervisorError),
    /// A VM-wide KVM call.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// A vCPU KVM call.
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    /// An eventfd for a device.
    #[error("cannot create an eventfd for {0}")]
    EventFd(&'static str, #[source] std::io::Error),
    /// Two devices claim the same addresses.
    #[error("device layout is inconsistent")]
    Bus(#[from] BusError),
    /// The virtio devices.
    #[error(transparent)]
    Attach(#[from] crate::virtio::AttachError),
    /// The saved UART.
    #[error("cannot restore the serial port")]
    Serial(#[from] nestvm_devices::serial::SerialError),
    /// No random bytes for the VM generation ID.
    #[error("cannot read random bytes for the VM generation ID from /dev/urandom")]
    Random(#[source] std::io::Error),
    /// A setting that slipped past validation.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
}

impl BuildError {
    /// True for errors the user fixes by changing the command or config
    /// (exit code 2), false for host or runtime failures (exit code 1).
    pub fn is_usage(&self) -> bool {
        use boot::BootError as B;
        match self {
            Self::TooManyCpus { .. } | Self::Config(_) => true,
            Self::Attach(a) => a.is_usage(),
            Self::Boot(b) => matches!(
                b,
                B::Read { .. }
                    | B::NotAKernel(_)
                    | B::EntryOutside { .. }
                    | B::Not64Bit(_)
                    | B::TooSmall { .. }
                    | B::CmdlineTooLong { .. }
                    | B::CmdlineNul
                    | B::Load { .. }
            ),
            _ => false,
        }
    }
}

/// A VM built and paused.
pub struct BuiltVm {
    /// Its settings.
    pub config: VmConfig,
    /// vCPUs, not yet running. Declared before `memory` and `vm` so they are
    /// dropped first.
    pub(crate) vcpus: Vec<Vcpu>,
    pub(crate) buses: Arc<Buses>,
    pub(crate) serial: Arc<Mutex<SerialPort>>,
    pub(crate) reset: EventTrigger,
    pub(crate) power_off: EventTrigger,
    pub(crate) power_button: EventTrigger,
    /// Raises the interrupt that tells the guest its generation ID changed.
    pub(crate) generation: EventTrigger,
    pub(crate) state_ctx: StateContext,
    pub(crate) nested: bool,
    pub(crate) virtio: crate::virtio::VirtioDevices,
    /// The CPUID table each vCPU was given (snapshots carry it).
    pub(crate) cpuid: Vec<Vec<nestvm_kvm::kvm_bindings::kvm_cpuid_entry2>>,
    pub(crate) vm: nestvm_kvm::Vm,
    pub(crate) memory: Memory,
}

pub(crate) fn event(what: &'static str) -> Result<EventTrigger, BuildError> {
    EventTrigger::new().map_err(|e| BuildError::EventFd(what, e))
}

fn clone_event(t: &EventTrigger, what: &'static str) -> Result<EventTrigger, BuildError> {
    t.try_clone().map_err(|e| BuildError::EventFd(what, e))
}

/// Builds the VM described by `config`; the guest's console output goes to
/// `console`. `nested` says whether the guest is shown VT-x/AMD-V (decided
/// by the caller from `config.nested` and what the host can do).
pub fn build(
    config: &VmConfig,
    hv: &Hypervisor,
    nested: bool,
    console: Box<dyn Write + Send>,
) -> Result<BuiltVm, BuildError> {
    let max = hv.max_vcpus();
    if config.cpus as usize > max {
        return Err(BuildError::TooManyCpus {
            got: config.cpus,
            max,
        });
    }
    let memory = load_guest_memory(config)?;

    let vm = hv.create_vm()?;
    vm.map_memory(&memory.0)?;
    vm.setup_irqchip_and_pit()?;
    let devices = attach_devices(config, &vm, &memory.0, None, |irq| {
        Ok(SerialPort::new(irq, console))
    })?;

    // vCPUs.
    let supported = hv.supported_cpuid()?;
    let tsc_deadline = hv.has_tsc_deadline();
    let mut vcpus = Vec::with_capacity(config.cpus as usize);
    let mut tables = Vec::with_capacity(config.cpus as usize);
    for index in 0..config.cpus {
        let vcpu = vm.create_vcpu(u64::from(index))?;
        let tsc_khz = match vcpu.tsc_khz() {
            Ok(k) if k > 0 => Some(k),
            _ => None,
        };
        let table = cpuid::build(
            &supported,
            &cpuid::CpuidPolicy {
                topology: cpuid::VcpuTopology {
                    index,
                    count: config.cpus,
                },
                tsc_khz,
                tsc_deadline,
                expose_virtualization: nested,
            },
        );
        vcpu.set_cpuid(&table)?;
        tables.push(table);
        vcpu.set_msrs(&regs::boot_msrs())?;
        vcpu.set_fpu(&regs::boot_fpu())?;
        let mut lapic = vcpu.lapic()?;
        regs::setup_lint(&mut lapic);
        vcpu.set_lapic(&lapic)?;
        if index == 0 {
            let mut sregs = vcpu.sregs()?;
            regs::setup_long_mode(&mut sregs, memory.1.cr3);
            vcpu.set_sregs(&sregs)?;
            vcpu.set_regs(&regs::boot_regs(memory.1.entry))?;
        }
        vcpus.push(vcpu);
    }

    BuiltVm::assemble(
        hv,
        config.clone(),
        nested,
        vcpus,
        tables,
        devices,
        vm,
        memory.0,
    )
}

impl BuiltVm {
    /// Puts the parts of a built (or restored) VM together.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn assemble(
        hv: &Hypervisor,
        config: VmConfig,
        nested: bool,
        vcpus: Vec<Vcpu>,
        cpuid: Vec<Vec<nestvm_kvm::kvm_bindings::kvm_cpuid_entry2>>,
        devices: Devices,
        vm: nestvm_kvm::Vm,
        memory: Memory,
    ) -> Result<Self, BuildError> {
        let state_ctx = StateContext {
            msr_indices: Arc::new(hv.msr_index_list()?),
            nested_state: hv.nested_state_size() > 0,
            // Confined only when run: `run` sets what its options say.
            seccomp: crate::seccomp::Mode::Off,
        };
        Ok(Self {
            config,
            state_ctx,
            vcpus,
            buses: Arc::new(devices.buses),
            serial: devices.serial,
            reset: devices.reset,
            power_off: devices.power_off,
            power_button: devices.power_button,
            generation: devices.generation,
            nested,
            virtio: devices.virtio,
            cpuid,
            vm,
            memory,
        })
    }
}

/// A VM's devices, wired to its KVM VM.
pub(crate) struct Devices {
    pub buses: Buses,
    pub serial: Arc<Mutex<SerialPort>>,
    pub reset: EventTrigger,
    pub power_off: EventTrigger,
    pub power_button: EventTrigger,
    pub generation: EventTrigger,
    pub virtio: crate::virtio::VirtioDevices,
}

/// Puts every device on the buses and wires its interrupts: the UART
/// (`make_serial` gets its interrupt line: a new UART, or one restored from
/// a snapshot), the reset and ACPI registers, the power button, the
/// generation ID's event, and the
/// virtio devices (new, or built from `saved_virtio`).
pub(crate) fn attach_devices(
    config: &VmConfig,
    vm: &nestvm_kvm::Vm,
    memory: &Memory,
    saved_virtio: Option<&[nestvm_virtio::mmio::MmioSnapshot]>,
    make_serial: impl FnOnce(EventTrigger) -> Result<SerialPort, BuildError>,
) -> Result<Devices, BuildError> {
    // Every VM, new, restored or arriving, passes here before its VMM gives
    // up root (which makes /proc/self unreadable to it) and enters its
    // sandbox: saves, checkpoints and migrations skip memory never touched.
    nestvm_kvm::memory::open_pagemap();
    let serial_irq = event("the serial interrupt")?;
    vm.register_irqfd(&serial_irq.0, acpi::COM1_GSI)?;
    let serial = Arc::new(Mutex::new(make_serial(serial_irq)?));
    let reset = event("reset")?;
    let power_off = event("power-off")?;
    // The ACPI power button: a write raises the Generic Event Device's interrupt.
    let power_button = event("the power button")?;
    vm.register_irqfd(&power_button.0, acpi::GED_GSI)?;
    // The generation ID changed: the same device's second interrupt.
    let generation = event("the generation ID")?;
    vm.register_irqfd(&generation.0, acpi::VMGENID_GSI)?;
    let mut buses = Buses::default();
    let virtio = crate::virtio::attach(config, vm, memory, &mut buses.mmio, saved_virtio)?;
    buses
        .pio
        .insert(serial.clone(), u64::from(acpi::COM1_PORT), SERIAL_PORT_LEN)?;
    buses.pio.insert(
        Arc::new(Mutex::new(I8042::new(clone_event(&reset, "reset")?))),
        I8042_PORT,
        I8042_PORT_LEN,
    )?;
    buses.pio.insert(
        Arc::new(Mutex::new(AcpiPm::new(
            acpi::S5_SLEEP_TYPE,
            acpi::RESET_VALUE,
            clone_event(&power_off, "power-off")?,
            clone_event(&reset, "reset")?,
        ))),
        u64::from(acpi::SLEEP_CONTROL_PORT),
        2,
    )?;
    Ok(Devices {
        buses,
        serial,
        reset,
        power_off,
        power_button,
        generation,
        virtio,
    })
}

/// A new random VM generation ID.
pub(crate) fn new_generation_id() -> Result<[u8; layout::VMGENID_LEN], BuildError> {
    use std::io::Read;
    let mut id = [0u8; layout::VMGENID_LEN];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut id))
        .map_err(BuildError::Random)?;
    Ok(id)
}

/// Where the boot vCPU starts.
struct Entry {
    entry: u64,
    cr3: u64,
}

/// Allocates guest memory and fills it: kernel, initrd, command line, ACPI,
/// boot_params, GDT and page tables. Needs no KVM, so bad kernels and sizes
/// are reported the same on any host.
fn load_guest_memory(config: &VmConfig) -> Result<(Memory, Entry), BuildError> {
    let memory = Memory::from_ranges(&layout::ram_ranges(config.memory)).map_err(|source| {
        BuildError::Memory {
            mib: config.memory >> 20,
            source,
        }
    })?;
    let low_end = layout::low_ram_end(config.memory);
    let kernel = boot::load_kernel(&memory, low_end, &config.kernel)?;
    let initrd = match &config.initrd {
        Some(path) => Some(boot::load_initrd(&memory, low_end, &kernel, path)?),
        None => None,
    };
    boot::write_cmdline(&memory, &kernel, &config.cmdline)?;
    let rsdp = acpi::write_tables(&memory, config.cpus, &crate::virtio::slots(config))?;
    acpi::write_generation_id(&memory, &new_generation_id()?)?;
    let e820 = layout::e820_map(config.memory);
    let params = boot::build_boot_params(&boot::BootInfo {
        kernel: &kernel,
        cmdline_len: config.cmdline.len(),
        initrd,
        e820: &e820,
        rsdp,
    });
    boot::write_boot_params(&memory, &params)?;
    let cr3 = regs::write_boot_tables(&memory)?;
    Ok((
        memory,
        Entry {
            entry: kernel.entry,
            cr3,
        },
    ))
}
