//! Saved states and checkpoints that must not be restored as they are, on
//! this machine's /dev/kvm with tiny guests: a checkpoint whose disk image
//! another running VM holds, states that are not of the VM their definition
//! describes or whose memory is not where RAM is, a state file too large to
//! be one; and the new VM generation ID each restore of a checkpoint gets.

mod common;

use std::fs::File;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Output;

use common::{guest, kvm_or_skip, StateEnv};
use nestvm_guests::{hello, ticker, Ending};
use nestvm_snapshot::container;
use serde_json::Value;

/// The tiny guest's definition, with `disk` as its one writable disk.
fn new_vm(e: &StateEnv, name: &str, disk: Option<&Path>) {
    let tag = e.dir.file_name().unwrap().to_string_lossy().into_owned();
    let k = guest(
        &format!("rc-{tag}-{name}.elf"),
        ticker(u32::MAX, 3000, "never", Ending::Reset),
    );
    let mut args = vec![
        "vm".to_owned(),
        "new".into(),
        name.into(),
        "--kernel".into(),
        k.to_str().unwrap().into(),
        "--memory".into(),
        "16M".into(),
        "--nested".into(),
        "off".into(),
    ];
    if let Some(d) = disk {
        args.extend(["--disk".into(), format!("path={}", d.display())]);
    }
    e.ok(&args.iter().map(String::as_str).collect::<Vec<_>>());
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn read_state(path: &Path) -> Value {
    let bytes = std::fs::read(path).unwrap();
    serde_json::from_slice(container::decode(path, &bytes).unwrap()).unwrap()
}

fn write_state(path: &Path, state: &Value) {
    let bytes = container::encode(&serde_json::to_vec(state).unwrap());
    std::fs::write(path, bytes).unwrap();
}

/// Whether something holds `path`'s exclusive lock (a VM's disk does).
fn locked(path: &Path) -> bool {
    use nix::fcntl::{Flock, FlockArg};
    Flock::lock(File::open(path).unwrap(), FlockArg::LockExclusiveNonblock).is_err()
}

fn image(e: &StateEnv, tag: &str, fill: u8) -> PathBuf {
    let p = e.dir.with_extension(format!("{tag}.img"));
    std::fs::write(&p, vec![fill; 1 << 20]).unwrap();
    p
}

fn all(path: &Path, fill: u8) -> bool {
    std::fs::read(path).unwrap().iter().all(|&b| b == fill)
}

/// VM a's checkpoint has disk X; VM b now runs on X. Restoring the
/// checkpoint would replace X under b (which would go on writing to a
/// deleted file): it is refused, by the command and by the VMM, and X, b
/// and a stay as they were.
#[test]
fn a_checkpoint_is_not_restored_over_a_disk_another_vm_holds() {
    if !kvm_or_skip("a_checkpoint_is_not_restored_over_a_disk_another_vm_holds") {
        return;
    }
    let e = StateEnv::new("rc-lock");
    let x = image(&e, "shared", b'A');
    new_vm(&e, "a", Some(&x));
    e.ok(&["vm", "start", "a"]);
    e.ok(&["vm", "checkpoint", "a", "--name", "c"]);
    e.ok(&["vm", "kill", "a"]);
    // What b writes from now on must stay in X.
    new_vm(&e, "b", Some(&x));
    e.ok(&["vm", "start", "b"]);
    File::options()
        .write(true)
        .open(&x)
        .unwrap()
        .write_all_at(&vec![b'B'; 1 << 20], 0)
        .unwrap();
    let inode = std::fs::metadata(&x).unwrap().ino();
    let unchanged = |what: &str| {
        assert!(all(&x, b'B'), "{what}: X's content is b's");
        assert_eq!(
            std::fs::metadata(&x).unwrap().ino(),
            inode,
            "{what}: X is the file b has open"
        );
        assert!(locked(&x), "{what}: b still holds X");
        assert_eq!(e.state("a"), "Off", "{what}");
        assert_eq!(e.state("b"), "Running", "{what}");
    };
    let out = e.run(&["vm", "restore", "a", "c"]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    assert!(
        err.contains(&format!(
            "disk image {} is in use by VM 'b'",
            std::fs::canonicalize(&x).unwrap().display()
        )) && err.contains("nestvm vm stop b")
            && err.contains("nothing was changed"),
        "{err}"
    );
    unchanged("vm restore");
    // The VMM itself refuses too, without the command's check before it.
    let out = e.run(&["vm", "serve", "a", "--checkpoint", "c"]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("in use by another running VM"), "{err}");
    unchanged("vm serve");
    assert_eq!(
        e.json(&["vm", "checkpoints", "a"])["checkpoints"][0]["name"],
        "c"
    );
    // Once b is stopped the checkpoint's disk comes back.
    e.ok(&["vm", "kill", "b"]);
    e.ok(&["vm", "restore", "a", "c"]);
    assert!(all(&x, b'A'));
    e.ok(&["vm", "kill", "a"]);
}

type Tamper = fn(&mut Value, &Path);

/// The saved-state cases: what is changed in the state, and what the
/// refusal says.
fn hostile_states() -> Vec<(&'static str, Tamper, &'static str)> {
    vec![
        (
            "a disk only in the state",
            |s, other| {
                let disk = serde_json::json!({"path": other, "readonly": false});
                s["config"]["disks"].as_array_mut().unwrap().push(disk);
                let dev = s["virtio"][0].clone();
                s["virtio"].as_array_mut().unwrap().push(dev);
            },
            "has disk 1 (OTHER) that the VM's definition does not list",
        ),
        (
            "another disk path",
            |s, other| s["config"]["disks"][0]["path"] = other.to_str().unwrap().into(),
            "disk 0 is OTHER (writable) in the saved state but",
        ),
        (
            "more memory",
            |s, _| s["config"]["memory"] = (32u64 << 20).into(),
            "32 MiB of memory but the VM's definition has 16 MiB",
        ),
        (
            "more vCPUs, each with its state",
            |s, _| {
                s["config"]["cpus"] = 2.into();
                for list in ["vcpus", "cpuid"] {
                    let one = s[list][0].clone();
                    s[list].as_array_mut().unwrap().push(one);
                }
            },
            "2 vCPUs but the VM's definition has 1",
        ),
        (
            "RAM on the LAPIC page",
            |s, _| {
                let page = serde_json::json!({"guest_addr": 0xfee0_0000u64, "size": 4096, "file_offset": 0});
                s["memory"].as_array_mut().unwrap().push(page);
            },
            "memory regions are not where a VM of 16 MiB has RAM (region 1",
        ),
        (
            "RAM moved into the device hole",
            |s, _| s["memory"][0]["guest_addr"] = 0xc000_0000u64.into(),
            "memory regions are not where a VM of 16 MiB has RAM (region 0",
        ),
    ]
}

/// A saved state that is not of the VM its definition describes, or
/// whose memory is not where the definition puts RAM, or a state file
/// larger than any state: each refused with one line, nothing opened or
/// deleted; the untouched state then resumes.
#[test]
fn a_saved_state_must_be_of_the_vm_its_definition_describes() {
    if !kvm_or_skip("a_saved_state_must_be_of_the_vm_its_definition_describes") {
        return;
    }
    let e = StateEnv::new("rc-saved");
    let x = image(&e, "own", b'X');
    let other = image(&e, "other", b'O');
    new_vm(&e, "d", Some(&x));
    e.ok(&["vm", "start", "d"]);
    e.ok(&["vm", "save", "d"]);
    let path = e.dir.join("vms/d/saved/state");
    let original = std::fs::read(&path).unwrap();
    let state = read_state(&path);
    let refused = |what: &str, says: &str| {
        let out = e.run(&["vm", "start", "d"]);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(1), "{what}: {err}");
        assert!(err.contains(says), "{what}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{what}: one line: {err}");
        assert!(!err.contains("panicked"), "{what}: {err}");
        assert_eq!(e.state("d"), "Saved", "{what}: the saved state is kept");
        assert!(e.dir.join("vms/d/saved/memory").exists(), "{what}");
        assert!(!locked(&other) && all(&other, b'O'), "{what}: never opened");
    };
    for (what, tamper, says) in hostile_states() {
        let mut bad = state.clone();
        tamper(&mut bad, &other);
        write_state(&path, &bad);
        refused(what, &says.replace("OTHER", &other.display().to_string()));
    }
    // Larger than any state: refused by its size, never read.
    File::create(&path).unwrap().set_len(1 << 30).unwrap();
    refused("a 1 GiB state file", "larger than");
    std::fs::write(&path, &original).unwrap();
    e.ok(&["vm", "start", "d"]);
    e.ok(&["vm", "kill", "d"]);
}

/// A checkpoint whose state names another disk is refused before the
/// running VM is stopped: it goes on running.
#[test]
fn a_checkpoint_of_another_vm_is_refused_before_the_vm_is_stopped() {
    if !kvm_or_skip("a_checkpoint_of_another_vm_is_refused_before_the_vm_is_stopped") {
        return;
    }
    let e = StateEnv::new("rc-ckpt");
    let x = image(&e, "own", b'X');
    let other = image(&e, "other", b'O');
    new_vm(&e, "d", Some(&x));
    e.ok(&["vm", "start", "d"]);
    e.ok(&["vm", "checkpoint", "d", "--name", "c"]);
    let path = e.dir.join("vms/d/checkpoints/c/state");
    let mut state = read_state(&path);
    state["config"]["disks"][0]["path"] = other.to_str().unwrap().into();
    write_state(&path, &state);
    let out = e.run(&["vm", "restore", "d", "c"]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("cannot restore checkpoint 'c' of VM 'd' (nothing was changed)")
            && err.contains(&format!("disk 0 is {} (writable)", other.display())),
        "{err}"
    );
    assert_eq!(e.state("d"), "Running", "the VM was not stopped");
    assert!(all(&other, b'O') && all(&x, b'X'));
    e.ok(&["vm", "kill", "d"]);
}

/// The VM generation ID in a memory file (guest RAM from address 0).
fn generation_id(memory: &Path) -> [u8; 16] {
    let mut id = [0u8; 16];
    File::open(memory)
        .unwrap()
        .read_exact_at(&mut id, nestvm_arch::layout::VMGENID_START)
        .unwrap();
    id
}

/// Each restore of a checkpoint gives the guest a new generation ID (the
/// checkpoint's own files keep theirs); resuming a saved state keeps it.
#[test]
fn each_restore_of_a_checkpoint_gets_a_new_generation_id() {
    if !kvm_or_skip("each_restore_of_a_checkpoint_gets_a_new_generation_id") {
        return;
    }
    let e = StateEnv::new("rc-genid");
    let k = guest("rc-genid.elf", hello("up", Ending::HaltForever));
    e.ok(&[
        "vm",
        "new",
        "g",
        "--kernel",
        k.to_str().unwrap(),
        "--memory",
        "16M",
        "--nested",
        "off",
    ]);
    e.ok(&["vm", "start", "g"]);
    e.ok(&["vm", "checkpoint", "g", "--name", "a"]);
    // The root checkpoint's memory file holds all its non-zero pages.
    let in_checkpoint = e.dir.join("vms/g/checkpoints/a/memory");
    let saved = e.dir.join("vms/g/saved/memory");
    let booted = generation_id(&in_checkpoint);
    assert_ne!(booted, [0; 16], "a new VM has a generation ID");
    let mut seen = vec![booted];
    for round in 0..2 {
        // `vm restore` drops the saved state of the round before.
        e.ok(&["vm", "restore", "g", "a"]);
        e.ok(&["vm", "save", "g"]);
        let id = generation_id(&saved);
        assert!(!seen.contains(&id), "round {round}: {id:?} was seen before");
        seen.push(id);
        assert_eq!(
            generation_id(&in_checkpoint),
            booted,
            "the checkpoint keeps its own"
        );
    }
    // A saved state is resumed once, as after a long pause: the same ID.
    e.ok(&["vm", "start", "g"]);
    e.ok(&["vm", "save", "g"]);
    assert_eq!(generation_id(&saved), *seen.last().unwrap());
    e.ok(&["vm", "discard-saved", "g"]);
}
