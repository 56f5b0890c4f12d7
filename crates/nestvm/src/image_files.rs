//! The files `image debian` puts into the Debian system it builds, over
//! what the packages install: the disk as root filesystem, a host name,
//! DHCP on every Ethernet adapter (systemd-networkd), and Debian's guest
//! agent started at boot on vsock (a unit in place of the package's, which
//! waits for a virtio-serial port).

use std::io;
use std::path::Path;

/// The CID a guest's agent listens on: any (VMADDR_CID_ANY), so the image
/// serves whatever `--vsock cid=N` its VM is given.
pub const ANY_CID: u32 = u32::MAX;
/// The guest agent's unit, in place of Debian's.
pub const AGENT_UNIT: &str = "etc/systemd/system/qemu-guest-agent.service";

/// The overlay's files: (path under the root, contents).
pub fn files(agent_port: u32) -> Vec<(&'static str, String)> {
    vec![
        ("etc/hostname", "nestvm\n".into()),
        (
            "etc/hosts",
            "127.0.0.1 localhost\n127.0.1.1 nestvm\n".into(),
        ),
        (
            "etc/fstab",
            "/dev/vda / auto defaults,errors=remount-ro 0 1\n".into(),
        ),
        (
            "etc/systemd/network/80-nestvm-dhcp.network",
            "[Match]\nType=ether\n\n[Network]\nDHCP=yes\n".into(),
        ),
        (
            "etc/modules-load.d/nestvm-vsock.conf",
            "vmw_vsock_virtio_transport\n".into(),
        ),
        (
            // Debian's unit is bound to a virtio-serial port (a dependency
            // no drop-in can remove): this unit takes its place, listens on
            // vsock from boot on, and comes back if it stops.
            AGENT_UNIT,
            format!(
                "[Unit]\nDescription=QEMU Guest Agent on vsock (nestvm vm exec, vm cp)\n\
                 After=systemd-modules-load.service\nStartLimitIntervalSec=0\n\n\
                 [Service]\nExecStart=/usr/sbin/qemu-ga -m vsock-listen -p {ANY_CID}:{agent_port}\n\
                 Restart=always\nRestartSec=1\n\n\
                 [Install]\nWantedBy=multi-user.target\n"
            ),
        ),
    ]
}

/// Writes the overlay under `dir`, with the link that starts the agent at
/// boot.
pub fn write_overlay(dir: &Path, agent_port: u32) -> io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    // Modes are set, not left to the umask: the overlay's directories
    // become the image's /etc and below.
    let mkdir = |d: &Path| {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(d)
    };
    for (path, text) in files(agent_port) {
        let p = dir.join(path);
        if let Some(d) = p.parent() {
            mkdir(d)?;
        }
        std::fs::write(&p, text)?;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644))?;
    }
    let wants = dir.join("etc/systemd/system/multi-user.target.wants");
    mkdir(&wants)?;
    for d in walk_dirs(dir)? {
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755))?;
    }
    std::os::unix::fs::symlink(
        Path::new("/").join(AGENT_UNIT),
        wants.join("qemu-guest-agent.service"),
    )
}

/// `dir` and every directory under it.
fn walk_dirs(dir: &Path) -> io::Result<Vec<std::path::PathBuf>> {
    let mut out = vec![dir.to_owned()];
    let mut i = 0;
    while i < out.len() {
        for e in std::fs::read_dir(&out[i])? {
            let e = e?;
            if e.file_type()?.is_dir() {
                out.push(e.path());
            }
        }
        i += 1;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_agent_listens_on_vsock_at_boot() {
        let dir = std::env::temp_dir().join(format!("nestvm-overlay-{}", std::process::id()));
        write_overlay(&dir, 1234).unwrap();
        let unit = std::fs::read_to_string(dir.join(AGENT_UNIT)).unwrap();
        assert!(unit.contains("ExecStart=/usr/sbin/qemu-ga -m vsock-listen -p 4294967295:1234"));
        assert!(
            !unit.contains("BindsTo"),
            "not bound to a virtio-serial port"
        );
        let link = std::fs::read_link(
            dir.join("etc/systemd/system/multi-user.target.wants/qemu-guest-agent.service"),
        )
        .unwrap();
        assert_eq!(link, Path::new("/").join(AGENT_UNIT));
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.join("etc"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o755, "the image's /etc stays world-readable");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
