//! Dynamic memory from the command line with a tiny guest (which has no
//! balloon driver): the balloon's settings, `vm memory`, and the refusals
//! and time-outs `vm resize` gives. The guest side is tested in the lab.

mod common;

use common::{guest, kvm_or_skip, StateEnv};
use nestvm_guests::{ticker, Ending};

#[test]
fn balloon_settings_show_and_resize_refusals() {
    if !kvm_or_skip("balloon_settings_show_and_resize_refusals") {
        return;
    }
    let e = StateEnv::new("memory");
    let k = guest("memory.elf", ticker(u32::MAX, 3000, "never", Ending::Reset));
    let k = k.to_str().unwrap();
    let new = |name: &str, extra: &[&str]| {
        let mut a = vec![
            "vm", "new", name, "--kernel", k, "--memory", "64M", "--nested", "off",
        ];
        a.extend_from_slice(extra);
        e.ok(&a);
    };
    // A minimum above the memory, or a bad spec, is refused up front.
    for bad in [
        "min=128M",
        "dynamic=maybe",
        "min=32M,start=16M",
        "start=128M",
    ] {
        let out = e.run(&[
            "vm",
            "new",
            "x",
            "--kernel",
            k,
            "--memory",
            "64M",
            "--balloon",
            bad,
        ]);
        assert_eq!(out.status.code(), Some(2), "{bad}");
        assert!(String::from_utf8_lossy(&out.stderr).contains("balloon"));
    }
    // Starts with 48 of its 64 MiB; grows and shrinks from there.
    new("b", &["--balloon", "dynamic=off,min=32M,start=48M"]);
    new("p", &[]);
    assert!(e.ok(&["vm", "show", "b"]).contains("balloon: down to 32M"));
    e.ok(&["vm", "start", "b"]);
    e.ok(&["vm", "start", "p"]);
    let v = e.json(&["vm", "memory", "b"]);
    assert_eq!(v["max"], 64 << 20);
    assert_eq!(v["min"], 32 << 20);
    assert_eq!(v["target"], 48 << 20, "the start");
    assert_eq!(
        v["current"],
        64 << 20,
        "until the guest's driver hands pages over"
    );
    // Out of range: refused, a usage error.
    let out = e.run(&["vm", "resize", "b", "16M"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("outside this VM's range"));
    // In range, but this guest has no driver to follow: a clear time-out.
    let out = e.run(&["vm", "resize", "b", "40M", "--wait", "2"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("is at 64 MiB") && err.contains("virtio_balloon"),
        "{err}"
    );
    assert_eq!(e.json(&["vm", "memory", "b"])["target"], 40 << 20);
    // Without a balloon, nothing can change while it runs: said so.
    let out = e.run(&["vm", "resize", "p", "32M"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--balloon on"));
    // The balloon's target survives a save and a resume.
    e.ok(&["vm", "save", "b"]);
    e.ok(&["vm", "start", "b"]);
    assert_eq!(e.json(&["vm", "memory", "b"])["target"], 40 << 20);
    e.ok(&["vm", "kill", "b"]);
    e.ok(&["vm", "kill", "p"]);
}
