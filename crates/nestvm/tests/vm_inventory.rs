//! `nestvm vm new/list/show/set/rm`, `vm enable-nested` and `status` on a
//! private state directory. No KVM is needed: definitions are files.

mod common;

use std::path::{Path, PathBuf};
use std::process::Output;

use common::{guest, nestvm, StateEnv};
use nestvm_guests::{hello, Ending};

/// A state directory with a tiny guest to point definitions at.
struct Env {
    env: StateEnv,
    dir: PathBuf,
    kernel: PathBuf,
}

impl Env {
    fn new(tag: &str) -> Self {
        let env = StateEnv::new(tag);
        let kernel = guest(&format!("inv-{tag}.elf"), hello("x", Ending::Reset));
        Self {
            dir: env.dir.clone(),
            env,
            kernel,
        }
    }

    fn run(&self, args: &[&str]) -> Output {
        self.env.run(args)
    }

    fn ok(&self, args: &[&str]) -> String {
        self.env.ok(args)
    }

    fn json(&self, args: &[&str]) -> serde_json::Value {
        self.env.json(args)
    }

    fn fails(&self, args: &[&str], code: i32, needle: &str) {
        let out = self.run(args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(code), "{args:?}: {err}");
        assert!(
            err.contains(needle),
            "{args:?}: expected '{needle}' in {err}"
        );
        assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    }

    fn kernel(&self) -> &str {
        self.kernel.to_str().unwrap()
    }
}

#[test]
fn define_list_show_change_remove() {
    let e = Env::new("crud");
    assert!(e.ok(&["vm", "list"]).contains("no VMs"));
    e.ok(&[
        "vm",
        "new",
        "web",
        "--kernel",
        e.kernel(),
        "--memory",
        "1G",
        "--cpus",
        "2",
    ]);
    e.ok(&["vm", "new", "db", "--kernel", e.kernel()]);
    let list = e.json(&["vm", "list", "--json"]);
    let names: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, vec!["db", "web"]);
    let web = e.json(&["vm", "show", "web", "--json"]);
    assert_eq!(
        (
            web["cpus"].as_u64(),
            web["memory"].as_str(),
            web["state"].as_str()
        ),
        (Some(2), Some("1G"), Some("Off"))
    );
    assert_eq!(
        web["kernel"].as_str(),
        Some(std::fs::canonicalize(&e.kernel).unwrap().to_str().unwrap())
    );
    e.ok(&["vm", "set", "web", "--cpus", "4", "--nested", "off"]);
    let web = e.json(&["vm", "show", "web", "--json"]);
    assert_eq!(
        (
            web["cpus"].as_u64(),
            web["nested"].as_str(),
            web["memory"].as_str()
        ),
        (Some(4), Some("off"), Some("1G"))
    );
    // The definition is the `run --config` format: nestvm run can read it.
    let def = e.dir.join("vms/web/vm.toml");
    assert!(std::fs::read_to_string(&def).unwrap().contains("cpus = 4"));
    // Action commands report JSON too.
    let v: serde_json::Value =
        serde_json::from_str(&e.ok(&["vm", "set", "db", "--cpus", "2", "--json"])).unwrap();
    assert_eq!(
        (v["vm"].as_str(), v["result"].as_str()),
        (Some("db"), Some("updated"))
    );
    e.ok(&["vm", "rm", "web"]);
    assert!(!e.dir.join("vms/web").exists());
    e.fails(&["vm", "show", "web"], 2, "no VM named 'web'");
}

#[test]
fn bad_names_duplicates_and_settings_are_refused_without_harm() {
    let e = Env::new("bad");
    for bad in ["../etc", ".hidden", "a/b", "", "x y"] {
        e.fails(
            &["vm", "new", bad, "--kernel", e.kernel()],
            2,
            "invalid VM name",
        );
    }
    assert!(!e.dir.join("etc").exists() && !e.dir.join("vms/etc").exists());
    e.ok(&["vm", "new", "a", "--kernel", e.kernel()]);
    e.fails(
        &["vm", "new", "a", "--kernel", e.kernel()],
        2,
        "already exists",
    );
    e.fails(
        &["vm", "new", "b", "--kernel", "/etc/hostname"],
        2,
        "is not a Linux kernel",
    );
    e.fails(
        &["vm", "new", "c", "--kernel", "/nonexistent"],
        2,
        "cannot read kernel",
    );
    e.fails(&["vm", "new", "d"], 2, "no kernel given");
    let before = std::fs::read_to_string(e.dir.join("vms/a/vm.toml")).unwrap();
    e.fails(&["vm", "set", "a", "--memory", "1M"], 2, "out of range");
    e.fails(&["vm", "set", "a", "--cpus", "0"], 2, "out of range");
    assert_eq!(
        std::fs::read_to_string(e.dir.join("vms/a/vm.toml")).unwrap(),
        before
    );
    let names: Vec<String> = std::fs::read_dir(e.dir.join("vms"))
        .unwrap()
        .flatten()
        .map(|d| d.file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, vec!["a"], "no half-made VMs");
}

#[test]
fn state_directory_is_private() {
    use std::os::unix::fs::PermissionsExt;
    let e = Env::new("perm");
    e.ok(&["vm", "new", "p", "--kernel", e.kernel()]);
    for d in [e.dir.clone(), e.dir.join("vms"), e.dir.join("vms/p")] {
        assert_eq!(
            std::fs::metadata(&d).unwrap().permissions().mode() & 0o777,
            0o700,
            "{}",
            d.display()
        );
    }
}

/// A process holding the VM's run lock stands for its VMM: while it lives
/// the VM is Running and refuses changes; once killed the VM is Off.
#[test]
fn a_vm_held_by_a_live_process_refuses_changes_and_is_off_once_it_dies() {
    let e = Env::new("live");
    e.ok(&["vm", "new", "r", "--kernel", e.kernel()]);
    let lock = e.dir.join("vms/r/run.lock");
    let mut holder = std::process::Command::new("sh")
        .args([
            "-c",
            "exec 9>\"$0\"; flock 9; echo locked; exec sleep infinity",
        ])
        .arg(&lock)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(holder.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    if line.trim() != "locked" {
        eprintln!("SKIPPED: flock(1) is not installed");
        let _ = holder.kill();
        let _ = holder.wait();
        return;
    }
    // The lock is held but no VMM answers on its API (yet): Starting.
    assert_eq!(e.json(&["vm", "show", "r", "--json"])["state"], "Starting");
    e.fails(&["vm", "set", "r", "--cpus", "2"], 1, "is running");
    e.fails(&["vm", "rm", "r"], 1, "is running");
    holder.kill().unwrap();
    holder.wait().unwrap();
    assert_eq!(e.json(&["vm", "show", "r", "--json"])["state"], "Off");
    e.ok(&["vm", "set", "r", "--cpus", "2"]);
}

#[test]
fn concurrent_changes_do_not_corrupt_the_definition() {
    let e = Env::new("race");
    e.ok(&["vm", "new", "c", "--kernel", e.kernel()]);
    let children: Vec<_> = (1..=8)
        .map(|n| {
            nestvm()
                .arg("--state-dir")
                .arg(&e.dir)
                .args(["vm", "set", "c", "--cpus", &n.to_string()])
                .stdout(std::process::Stdio::null())
                .spawn()
                .unwrap()
        })
        .collect();
    for mut c in children {
        assert!(c.wait().unwrap().success());
    }
    let v = e.json(&["vm", "show", "c", "--json"]);
    assert!((1..=8).contains(&v["cpus"].as_u64().unwrap()));
    assert!(!Path::new(&e.dir.join("vms/c/vm.tmp")).exists());
}

#[test]
fn saved_state_needs_force_to_remove() {
    let e = Env::new("saved");
    e.ok(&["vm", "new", "s", "--kernel", e.kernel()]);
    std::fs::create_dir_all(e.dir.join("vms/s/saved")).unwrap();
    std::fs::write(e.dir.join("vms/s/saved/state"), b"x").unwrap();
    assert_eq!(e.json(&["vm", "show", "s", "--json"])["state"], "Saved");
    e.fails(&["vm", "rm", "s"], 2, "--force");
    e.ok(&["vm", "rm", "s", "--force"]);
}

#[test]
fn enable_nested_lists_asks_applies_and_is_idempotent() {
    let e = Env::new("enable");
    e.ok(&[
        "vm",
        "new",
        "n",
        "--kernel",
        e.kernel(),
        "--memory",
        "1G",
        "--nested",
        "off",
    ]);
    // No terminal and no --yes: nothing can be asked, nothing changes.
    e.fails(&["vm", "enable-nested", "n"], 2, "--yes");
    assert_eq!(e.json(&["vm", "show", "n", "--json"])["nested"], "off");
    let out = e.ok(&["vm", "enable-nested", "n", "--yes"]);
    assert!(
        out.contains("nested: off -> on") && out.contains("from 1G to 4G"),
        "{out}"
    );
    let v = e.json(&["vm", "show", "n", "--json"]);
    assert_eq!(
        (v["nested"].as_str(), v["memory"].as_str()),
        (Some("on"), Some("4G"))
    );
    assert!(e
        .ok(&["vm", "enable-nested", "n", "--yes"])
        .contains("already set up"));
    // --keep-memory leaves memory alone.
    e.ok(&[
        "vm",
        "new",
        "k",
        "--kernel",
        e.kernel(),
        "--memory",
        "1G",
        "--nested",
        "off",
    ]);
    e.ok(&["vm", "enable-nested", "k", "--yes", "--keep-memory"]);
    assert_eq!(e.json(&["vm", "show", "k", "--json"])["memory"], "1G");
    // A saved state taken without nesting is discarded.
    e.ok(&[
        "vm",
        "new",
        "s",
        "--kernel",
        e.kernel(),
        "--memory",
        "4G",
        "--nested",
        "off",
    ]);
    std::fs::create_dir_all(e.dir.join("vms/s/saved")).unwrap();
    std::fs::write(e.dir.join("vms/s/saved/state"), b"x").unwrap();
    let out = e.ok(&["vm", "enable-nested", "s", "--yes"]);
    assert!(out.contains("discard its saved state"), "{out}");
    assert!(!e.dir.join("vms/s/saved").exists());
}

#[test]
fn status_reports_host_and_every_vm_with_reasons() {
    let e = Env::new("status");
    e.ok(&[
        "vm",
        "new",
        "off",
        "--kernel",
        e.kernel(),
        "--nested",
        "off",
    ]);
    e.ok(&[
        "vm",
        "new",
        "on",
        "--kernel",
        e.kernel(),
        "--nested",
        "on",
        "--memory",
        "4G",
    ]);
    let s = e.json(&["status", "--json"]);
    let host_can = s["host"]["can_nest"].as_bool().unwrap();
    let vms = s["vms"].as_array().unwrap();
    let off = vms.iter().find(|v| v["name"] == "off").unwrap();
    assert_eq!(off["can_host_vms"], false);
    assert!(off["reasons"][0].as_str().unwrap().contains("not exposed"));
    let on = vms.iter().find(|v| v["name"] == "on").unwrap();
    assert_eq!(on["can_host_vms"].as_bool().unwrap(), host_can);
    if !host_can {
        assert!(on["reasons"][0]
            .as_str()
            .unwrap()
            .contains("host cannot nest"));
    }
    let text = e.ok(&["status"]);
    assert!(
        text.contains("Host: ") && text.contains("CAN HOST VMS"),
        "{text}"
    );
    // The networking rule for guests inside a VM: MAC spoofing.
    let notes = |s: &serde_json::Value| {
        s["vms"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == "on")
            .unwrap()["notes"]
            .to_string()
    };
    assert!(notes(&s).contains("no network adapter"), "{s}");
    e.ok(&["vm", "set", "on", "--net", "tap=t5"]);
    let s = e.json(&["status", "--json"]);
    assert!(notes(&s).contains("mac_spoofing off"), "{s}");
    e.ok(&["vm", "set", "on", "--net", "tap=t5,mac_spoofing=on"]);
    let s = e.json(&["status", "--json"]);
    assert!(
        !notes(&s).contains("mac_spoofing") && !notes(&s).contains("no network"),
        "{s}"
    );
}

#[test]
fn definitions_keep_disks_and_adapters_with_stable_macs() {
    let e = Env::new("adapters");
    let img = e.dir.with_extension("disk.img");
    std::fs::write(&img, vec![0u8; 4096]).unwrap();
    let disk = format!("path={},readonly=on", img.display());
    let new = |name: &str| {
        e.ok(&[
            "vm",
            "new",
            name,
            "--kernel",
            e.kernel(),
            "--disk",
            &disk,
            "--net",
            "tap=t0",
            "--net",
            "tap=t1,mac=52:56:00:00:00:09,mac_spoofing=on",
        ]);
        e.json(&["vm", "show", name, "--json"])
    };
    let a = new("alpha");
    assert_eq!(a["disks"][0]["readonly"], true);
    assert_eq!(a["nets"][1]["mac"], "52:56:00:00:00:09");
    assert_eq!(a["nets"][1]["mac_spoofing"], true);
    assert_eq!(a["nets"][0]["mac_spoofing"], false);
    let derived = a["nets"][0]["mac"].as_str().unwrap().to_owned();
    assert!(derived.starts_with("52:56:"), "{derived}");
    // Stable: the same name gives the same MAC; another name another one.
    e.ok(&["vm", "rm", "alpha"]);
    assert_eq!(new("alpha")["nets"][0]["mac"], derived.as_str());
    assert_ne!(new("beta")["nets"][0]["mac"], derived.as_str());
    let text = e.ok(&["vm", "show", "alpha"]);
    assert!(text.contains("net:     tap t0 mac 52:56:"), "{text}");
    assert!(text.contains("(read-only)"), "{text}");
    // The definition file holds them, and --no-nets removes them.
    let def = std::fs::read_to_string(e.dir.join("vms/alpha/vm.toml")).unwrap();
    assert!(def.contains("[[net]]") && def.contains("[[disk]]"), "{def}");
    e.ok(&["vm", "set", "alpha", "--no-nets"]);
    let a = e.json(&["vm", "show", "alpha", "--json"]);
    assert_eq!(a["nets"].as_array().unwrap().len(), 0);
    assert_eq!(a["disks"].as_array().unwrap().len(), 1);
    e.fails(
        &[
            "vm",
            "new",
            "gamma",
            "--kernel",
            e.kernel(),
            "--disk",
            "/nonexistent.img",
        ],
        2,
        "cannot read disk image",
    );
}
