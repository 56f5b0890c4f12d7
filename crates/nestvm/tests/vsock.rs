//! A managed VM's vsock device, end to end without a guest driver (the
//! lab drives it with Linux's): `vm new --vsock` keeps it in the
//! definition, the VMM listens on `vsock.sock` in the VM's directory (0600,
//! `vm show` names it) and answers a host client; a saved and a
//! checkpointed VM comes back with it; `vm show`, `status` and `vm exec` say that no
//! guest agent answers (this guest has no driver), and how to get one; a
//! bad setting is a usage error.

mod common;

use std::io::{Read, Write};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use common::{guest, kvm_or_skip, StateEnv};
use nestvm_guests::{ticker, Ending};

#[test]
fn a_managed_vm_listens_on_its_vsock_socket_through_save_and_restore() {
    if !kvm_or_skip("a_managed_vm_listens_on_its_vsock_socket_through_save_and_restore") {
        return;
    }
    let k = guest(
        "vsock-ticker.elf",
        ticker(u32::MAX, 3000, "", Ending::PowerOff),
    );
    let e = StateEnv::new("vsock");
    let new = |name: &str, vsock: &str| {
        let k = k.to_str().unwrap();
        e.run(&[
            "vm", "new", name, "--kernel", k, "--memory", "32M", "--nested", "off", "--vsock",
            vsock,
        ])
    };
    let out = new("bad", "cid=2");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("reserved"));
    assert_eq!(new("t", "cid=7").status.code(), Some(0));
    let shown = e.json(&["vm", "show", "t"]);
    let socket = e.dir.join("vms/t/vsock.sock");
    assert_eq!(shown["vsock"]["cid"], 7);
    assert_eq!(shown["vsock"]["socket"], socket.to_str().unwrap());

    let listening = || {
        let m = std::fs::symlink_metadata(&socket).unwrap();
        assert!(m.file_type().is_socket());
        assert_eq!(m.permissions().mode() & 0o777, 0o600);
        // A host client is taken; with no driver in this guest its request
        // is never accepted, and closing it leaves the VM running.
        let mut c = UnixStream::connect(&socket).unwrap();
        c.write_all(b"CONNECT 52\n").unwrap();
        c.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let mut b = [0u8; 8];
        let waited = c.read(&mut b);
        assert!(
            waited.is_err(),
            "no OK without a guest that accepts: {waited:?}"
        );
    };
    let exec = |name: &str| e.run(&["vm", "exec", name, "--", "/bin/true"]);
    let said = |o: &std::process::Output| String::from_utf8_lossy(&o.stderr).into_owned();
    let stopped = exec("t");
    assert_eq!(stopped.status.code(), Some(2), "{}", said(&stopped));
    assert!(said(&stopped).contains("not running"));
    e.ok(&["vm", "start", "t"]);
    listening();
    // This guest has no vsock driver, so no agent: said, and how to get one.
    assert_eq!(e.json(&["vm", "show", "t"])["vsock"]["agent"], false);
    let status = e.json(&["status"]);
    let mine = status["vms"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "t")
        .unwrap()
        .clone();
    assert_eq!(mine["agent"], false, "{mine}");
    let notes = mine["notes"].to_string();
    assert!(
        notes.contains("qemu-ga -m vsock-listen -p 7:1234"),
        "{notes}"
    );
    let no_agent = exec("t");
    assert_eq!(no_agent.status.code(), Some(1));
    assert!(
        said(&no_agent).contains("qemu-guest-agent"),
        "{}",
        said(&no_agent)
    );
    e.ok(&["vm", "checkpoint", "t", "--name", "a"]);
    e.ok(&["vm", "save", "t"]);
    e.ok(&["vm", "start", "t"]);
    assert_eq!(e.state("t"), "Running");
    listening();
    e.ok(&["vm", "kill", "t"]);
    e.ok(&["vm", "restore", "t", "a"]);
    assert_eq!(e.state("t"), "Running");
    listening();
    e.ok(&["vm", "kill", "t"]);
    // Removed with vm set; then vm exec says what is missing.
    e.ok(&["vm", "set", "t", "--no-vsock"]);
    assert!(e.json(&["vm", "show", "t"]).get("vsock").is_none());
    let none = exec("t");
    assert_eq!(none.status.code(), Some(2));
    assert!(
        said(&none).contains("has no vsock device"),
        "{}",
        said(&none)
    );
}
