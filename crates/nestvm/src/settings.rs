//! A VM's settings as command-line flags, shared by `nestvm run`,
//! `vm new` and `vm set`, and read into the VMM's `Overrides`.

use std::path::PathBuf;

use clap::Args;

use crate::common::{usage, Failure};

/// A VM's settings, as flags (shared by `run`, `vm new` and `vm set`).
#[derive(Args)]
pub struct SettingsArgs {
    /// A disk built by 'nestvm image debian FILE': boots FILE.vmlinuz and
    /// FILE.initrd with FILE as its first disk (/dev/vda), a vsock device
    /// (cid=3) for vm exec, and root=/dev/vda on the serial console, each
    /// unless given otherwise.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["kernel", "initrd"])]
    image: Option<PathBuf>,
    /// Kernel image: an x86-64 bzImage or ELF vmlinux.
    #[arg(long)]
    kernel: Option<PathBuf>,
    /// Initial ramdisk.
    #[arg(long)]
    initrd: Option<PathBuf>,
    /// Kernel command line [default: "console=ttyS0 reboot=k panic=-1"].
    #[arg(long)]
    cmdline: Option<String>,
    /// Number of vCPUs [default: 1].
    #[arg(long)]
    cpus: Option<u32>,
    /// Guest memory, e.g. 512M or 4G (a bare number is MiB) [default: 512M].
    #[arg(long)]
    memory: Option<String>,
    /// Show the host's VT-x/AMD-V to the guest: auto (when the host can),
    /// on (refuse if it cannot), off [default: auto].
    #[arg(long, value_parser = ["auto", "on", "off"])]
    nested: Option<String>,
    /// A virtio disk: path=FILE[,readonly=on][,serial=ID] (raw image; ID is what
    /// the guest reads as the disk's serial); repeat for more.
    #[arg(long, value_name = "path=FILE[,readonly=on][,serial=ID]")]
    disk: Vec<String>,
    /// A virtio network adapter on a TAP device:
    /// tap=NAME[,mac=MAC][,mac_spoofing=on|off]; or without root, through
    /// passt: user[,hostfwd=tcp:HOSTPORT-:GUESTPORT]... (DHCP, DNS,
    /// outbound TCP/UDP; hostfwd ports on the host reach the guest). Repeat
    /// for more. The TAP is created if missing and nestvm may (root);
    /// mac_spoofing=on lets guests bridged inside this VM use their own MACs.
    #[arg(
        long,
        value_name = "tap=NAME[,mac=MAC][,mac_spoofing=on|off] | user[,hostfwd=tcp:H-:G]"
    )]
    net: Vec<String>,
    /// A memory balloon, so the VM's memory can shrink to min and grow back
    /// while it runs (vm resize); dynamic=on follows the guest's demand:
    /// on | dynamic=on|off[,min=SIZE][,start=SIZE] [default min: 256M;
    /// start: all of --memory].
    #[arg(long, value_name = "on|dynamic=on[,min=SIZE][,start=SIZE]")]
    balloon: Option<String>,
    /// Remove the balloon (with vm set).
    #[arg(long, conflicts_with = "balloon")]
    no_balloon: bool,
    /// A vsock device, a channel to the guest without a network: the guest
    /// has CID N; host programs connect to the socket (a managed VM's is
    /// vsock.sock in its directory) and write CONNECT PORT.
    #[arg(long, value_name = "cid=N[,socket=PATH]")]
    vsock: Option<String>,
    /// Remove the vsock device (with vm set).
    #[arg(long, conflicts_with = "vsock")]
    no_vsock: bool,
    /// Remove every disk (with vm set).
    #[arg(long, conflicts_with = "disk")]
    no_disks: bool,
    /// Remove every network adapter (with vm set).
    #[arg(long, conflicts_with = "net")]
    no_nets: bool,
    /// The size at which console.log is rotated (one old file is kept as
    /// console.log.1) [default: 16M].
    #[arg(long, value_name = "SIZE")]
    console_log_max: Option<String>,
    /// The size at which vmm.log is rotated (one old file is kept as
    /// vmm.log.1) [default: 16M].
    #[arg(long, value_name = "SIZE")]
    vmm_log_max: Option<String>,
}

impl SettingsArgs {
    /// The flags as overrides of a VM's settings.
    pub fn overrides(self) -> Result<nestvm_vmm::config::Overrides, Failure> {
        let nested = match self.nested.as_deref() {
            Some(s) => Some(s.parse().map_err(usage)?),
            None => None,
        };
        use nestvm_vmm::adapters::{parse_balloon, parse_disk, parse_net};
        let balloon = match (&self.balloon, self.no_balloon) {
            (Some(b), _) => Some(Some(parse_balloon(b).map_err(usage)?)),
            (None, true) => Some(None),
            (None, false) => None,
        };
        let vsock = match (&self.vsock, self.no_vsock) {
            (Some(v), _) => Some(Some(
                nestvm_vmm::config::vsock::parse_vsock(v).map_err(usage)?,
            )),
            (None, true) => Some(None),
            (None, false) => None,
        };
        let mut disks = self
            .disk
            .iter()
            .map(|d| parse_disk(d))
            .collect::<Result<Vec<_>, _>>()
            .map_err(usage)?;
        let (mut kernel, mut initrd, mut cmdline, mut vsock) =
            (self.kernel, self.initrd, self.cmdline, vsock);
        if let Some(image) = &self.image {
            // The image's own files beside it, and its disk first.
            let path = image.to_string_lossy();
            if path.contains(',') {
                return Err(usage(anyhow::anyhow!(
                    "--image {path}: a path with ',' cannot be a disk; rename it"
                )));
            }
            disks.insert(0, parse_disk(&format!("path={path}")).map_err(usage)?);
            kernel = Some(crate::image::kernel_of(image));
            initrd = Some(crate::image::initrd_of(image));
            cmdline = cmdline.or_else(|| Some(crate::image::CMDLINE.to_owned()));
            if vsock.is_none() {
                vsock = Some(Some(
                    nestvm_vmm::config::vsock::parse_vsock("cid=3").map_err(usage)?,
                ));
            }
        }
        let nets = self
            .net
            .iter()
            .map(|n| parse_net(n))
            .collect::<Result<Vec<_>, _>>()
            .map_err(usage)?;
        Ok(nestvm_vmm::config::Overrides {
            disks: (self.no_disks || !disks.is_empty()).then_some(disks),
            nets: (self.no_nets || !nets.is_empty()).then_some(nets),
            balloon,
            vsock,
            kernel,
            initrd,
            cmdline,
            cpus: self.cpus,
            memory: self.memory,
            nested,
            console_log_max: self.console_log_max,
            vmm_log_max: self.vmm_log_max,
        })
    }
}
