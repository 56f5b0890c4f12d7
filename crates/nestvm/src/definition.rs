//! VM definitions in the state directory (the reference document's
//! New-VM, Get-VM, Set-VM, Remove-VM): `vm new`, `vm list`, `vm show`,
//! `vm set`, `vm rm`.

use std::path::{Path, PathBuf};

use anyhow::anyhow;
use nestvm_manager::{Store, VmName, VmState};
use nestvm_vmm::config::{format_size, Overrides, VmConfig};
use serde::Serialize;

use crate::common::{print_json, report, store_err, tail, usage, Failure};
use crate::control::{self, live_state};
use crate::migrate::progress_line;
use crate::run::open_kernel;
use crate::settings::SettingsArgs;
use crate::vmdir::VmDir;

/// A disk's path made absolute, once it is seen to be a readable regular
/// file or block device (opened without blocking). An image's links are
/// resolved; a device's are kept (`/dev/disk/by-id/...` outlives the
/// `/dev/sdX` it points at today).
fn checked_disk(p: &Path) -> Result<PathBuf, Failure> {
    use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
    let cannot = |e: std::io::Error| usage(anyhow!("cannot read disk image {}: {e}", p.display()));
    let abs = std::fs::canonicalize(p).map_err(cannot)?;
    let kind = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NONBLOCK)
        .open(&abs)
        .and_then(|f| f.metadata())
        .map_err(cannot)?
        .file_type();
    if kind.is_block_device() {
        return std::path::absolute(p).map_err(cannot);
    }
    if !kind.is_file() {
        return Err(cannot(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "neither a regular file nor a block device",
        )));
    }
    Ok(abs)
}

/// Makes file settings absolute and checks they can be read (the kernel
/// must be a kernel), so a definition never points at nothing; gives each
/// network adapter without a MAC one derived from the VM's name, stored so
/// it never changes.
fn checked(mut over: Overrides, name: &VmName) -> Result<Overrides, Failure> {
    // A regular file that can be read (opened without blocking: a FIFO
    // would wait for a writer forever).
    let check = |p: &Path, what: &str| -> Result<PathBuf, Failure> {
        let cannot = |e: std::io::Error| usage(anyhow!("cannot read {what} {}: {e}", p.display()));
        let abs = std::fs::canonicalize(p).map_err(cannot)?;
        nestvm_arch::boot::open_regular(&abs).map_err(cannot)?;
        Ok(abs)
    };
    if let Some(k) = over.kernel.take() {
        let abs = check(&k, "kernel")?;
        open_kernel(&abs)?;
        over.kernel = Some(abs);
    }
    if let Some(i) = over.initrd.take() {
        over.initrd = Some(check(&i, "initrd")?);
    }
    for d in over.disks.iter_mut().flatten() {
        d.path = checked_disk(&d.path)?;
    }
    for (i, n) in over.nets.iter_mut().flatten().enumerate() {
        if n.mac.is_none() {
            let mac = nestvm_virtio::net::derived_mac(&format!("{name}/{i}"));
            n.mac = Some(nestvm_virtio::net::format_mac(&mac));
        }
    }
    Ok(over)
}

#[derive(Serialize)]
struct VmView {
    name: String,
    state: &'static str,
    /// The end of the VMM's log, when the VM is Off (why it ended).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    last_log: Vec<String>,
    kernel: PathBuf,
    initrd: Option<PathBuf>,
    cmdline: String,
    cpus: u32,
    memory: String,
    nested: &'static str,
    disks: Vec<nestvm_vmm::adapters::DiskConfig>,
    nets: Vec<nestvm_vmm::adapters::NetConfig>,
    balloon: Option<nestvm_vmm::adapters::BalloonConfig>,
    /// The vsock device: the guest's CID and the host socket's full path.
    #[serde(skip_serializing_if = "Option::is_none")]
    vsock: Option<VsockView>,
    /// The caps of its log files, bytes.
    logs: nestvm_vmm::config::logs::LogLimits,
    /// The VM's outgoing migration, while one runs or after one failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    migration: Option<nestvm_vmm::migration::Progress>,
}

/// A VM's vsock device as `vm show` says it.
#[derive(Serialize)]
struct VsockView {
    cid: u32,
    socket: PathBuf,
    /// Whether a guest agent answers on the default port (running VMs).
    #[serde(skip_serializing_if = "Option::is_none")]
    agent: Option<bool>,
}

fn view(store: &Store, name: &VmName, c: &VmConfig) -> VmView {
    let state = live_state(store, name);
    let last_log = if state == "Off" {
        tail(&VmDir::of(store, name).log, 5)
    } else {
        vec![]
    };
    VmView {
        name: name.to_string(),
        state,
        last_log,
        kernel: c.kernel.clone(),
        initrd: c.initrd.clone(),
        cmdline: c.cmdline.clone(),
        cpus: c.cpus,
        memory: format_size(c.memory),
        nested: c.nested.as_str(),
        disks: c.disks.clone(),
        nets: c.nets.clone(),
        balloon: c.balloon.clone(),
        vsock: c.vsock.as_ref().map(|v| VsockView {
            cid: v.cid,
            socket: store.vm_dir(name).join(v.socket_path()),
            agent: crate::guest::agent_answers(store, name, state),
        }),
        logs: c.logs,
        migration: match state {
            "Off" | "Saved" => None,
            // A view of the VM, not a command on it: an answer this nestvm
            // cannot read is said, and the rest is shown.
            _ => control::migration(store, name).unwrap_or_else(|e| {
                log::warn!("VM '{name}': no migration progress: {e}");
                None
            }),
        },
    }
}

/// `vm new`.
pub fn new(
    store: &Store,
    name: &VmName,
    settings: SettingsArgs,
    json: bool,
) -> Result<u8, Failure> {
    let over = checked(settings.overrides()?, name)?;
    let config = VmConfig::resolve(None, over).map_err(usage)?;
    store.create(name, &config).map_err(store_err)?;
    report(
        json,
        &format!("created VM '{name}' in {}", store.vm_dir(name).display()),
        serde_json::json!({"vm": name.as_str(), "result": "created", "dir": store.vm_dir(name)}),
    );
    Ok(0)
}

/// `vm list`.
pub fn list(store: &Store, json: bool) -> Result<u8, Failure> {
    let mut rows = vec![];
    for name in store.list().map_err(store_err)? {
        let config = store.load(&name).map_err(store_err)?;
        rows.push(view(store, &name, &config));
    }
    if json {
        print_json(&rows)?;
    } else if rows.is_empty() {
        println!(
            "no VMs in {} ('nestvm vm new NAME --kernel FILE' makes one)",
            store.root().display()
        );
    } else {
        println!(
            "{:<20} {:<8} {:>4} {:>7} {:<6} KERNEL",
            "NAME", "STATE", "CPUS", "MEMORY", "NESTED"
        );
        for r in rows {
            println!(
                "{:<20} {:<8} {:>4} {:>7} {:<6} {}",
                r.name,
                r.state,
                r.cpus,
                r.memory,
                r.nested,
                r.kernel.display()
            );
        }
    }
    Ok(0)
}

/// `vm show`.
pub fn show(store: &Store, name: &VmName, json: bool) -> Result<u8, Failure> {
    let config = store.load(name).map_err(store_err)?;
    let v = view(store, name, &config);
    if json {
        print_json(&v)?;
    } else {
        println!(
            "name:    {}\nstate:   {}\nkernel:  {}",
            v.name,
            v.state,
            v.kernel.display()
        );
        if let Some(i) = &v.initrd {
            println!("initrd:  {}", i.display());
        }
        println!(
            "cmdline: {}\ncpus:    {}\nmemory:  {}\nnested:  {}\ndir:     {}",
            v.cmdline,
            v.cpus,
            v.memory,
            v.nested,
            store.vm_dir(name).display()
        );
        for d in &v.disks {
            let ro = if d.readonly { " (read-only)" } else { "" };
            println!("disk:    {}{ro}", d.path.display());
        }
        for n in &v.nets {
            let on = match n.user {
                true => match n.hostfwd.is_empty() {
                    true => "user (passt)".to_owned(),
                    false => format!("user (passt), hostfwd {}", n.hostfwd.join(" ")),
                },
                false => format!("tap {}", n.tap),
            };
            println!(
                "net:     {on} mac {} mac_spoofing {}",
                n.mac.as_deref().unwrap_or("(derived)"),
                if n.mac_spoofing { "on" } else { "off" }
            );
        }
        if let Some(b) = &v.balloon {
            println!(
                "balloon: down to {}{}",
                b.min,
                if b.dynamic { ", follows demand" } else { "" }
            );
        }
        if let Some(v) = &v.vsock {
            let agent = match v.agent {
                Some(true) => ", guest agent answers (vm exec, vm cp)",
                Some(false) => ", no guest agent answers (see 'nestvm vm exec --help')",
                None => "",
            };
            println!("vsock:   cid {} on {}{agent}", v.cid, v.socket.display());
        }
        println!(
            "logs:    console.log up to {}, vmm.log up to {} (one older file each)",
            format_size(v.logs.console),
            format_size(v.logs.vmm)
        );
        if let Some(m) = &v.migration {
            println!("migration: {:?} to {}: {}", m.phase, m.to, progress_line(m));
            if let Some(e) = &m.error {
                println!("           {e}");
            }
            if m.phase == nestvm_vmm::migration::Phase::Unconfirmed {
                println!(
                    "           the VM may run at {}: if it does, 'nestvm vm kill {}' here; if not, 'nestvm vm resume {}' here",
                    m.to, v.name, v.name
                );
            }
        }
        if !v.last_log.is_empty() {
            println!("last VMM log lines:");
            for l in &v.last_log {
                println!("  {l}");
            }
        }
    }
    Ok(0)
}

/// `vm set`: refused while the VM has a saved state.
pub fn set(
    store: &Store,
    name: &VmName,
    settings: SettingsArgs,
    json: bool,
) -> Result<u8, Failure> {
    if store.state(name) == VmState::Saved {
        return Err(usage(anyhow!(
            "VM '{name}' has a saved state, which keeps the settings it was saved with: 'nestvm vm start {name}' and stop it, or 'nestvm vm discard-saved {name}', then change it"
        )));
    }
    let over = checked(settings.overrides()?, name)?;
    store.set(name, over).map_err(store_err)?;
    report(
        json,
        &format!("updated VM '{name}'"),
        serde_json::json!({"vm": name.as_str(), "result": "updated"}),
    );
    Ok(0)
}

/// `vm rm`: with `force`, its saved state and checkpoints go too.
pub fn remove(store: &Store, name: &VmName, force: bool, json: bool) -> Result<u8, Failure> {
    store.remove(name, force).map_err(store_err)?;
    report(
        json,
        &format!("removed VM '{name}'"),
        serde_json::json!({"vm": name.as_str(), "result": "removed"}),
    );
    Ok(0)
}
