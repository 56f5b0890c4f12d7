//! Live migration between two nestvm "hosts" (two state directories) on
//! this machine's /dev/kvm, over loopback: a ticking tiny guest moves and
//! finishes its exact count on the destination; a wrong token and a
//! receiver killed mid-copy leave the source running unharmed.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Output, Stdio};
use std::time::{Duration, Instant};

use common::{freeze, guest, kvm_or_skip, nestvm, sigkill, vmm_pid, StateEnv};
use nestvm_guests::{dirtier, ticker, Ending};

const T: Duration = Duration::from_secs(90);
const TICKS: usize = 400;

struct Hosts {
    src: StateEnv,
    dst: StateEnv,
    token: PathBuf,
    addr: String,
}

impl Hosts {
    fn new(tag: &str) -> Self {
        let src = StateEnv::new(&format!("mig-{tag}-src"));
        let dst = StateEnv::new(&format!("mig-{tag}-dst"));
        std::fs::create_dir_all(&src.dir).unwrap();
        let token = src.dir.join("token");
        let port = common::free_port();
        Self {
            src,
            dst,
            token,
            addr: format!("127.0.0.1:{port}"),
        }
    }

    /// A ticking VM `t` running on the source, `memory` big; it ends after
    /// `ticks` dots.
    fn start_ticker(&self, memory: &str, ticks: u32) {
        self.start(memory, ticker(ticks, 3000, "TICKER-DONE", Ending::PowerOff));
    }

    /// A VM `t` running `image` on the source.
    fn start(&self, memory: &str, image: Vec<u8>) {
        let k = guest(
            &format!(
                "mig-{}.elf",
                self.src.dir.file_name().unwrap().to_string_lossy()
            ),
            image,
        );
        self.src.ok(&[
            "vm",
            "new",
            "t",
            "--kernel",
            k.to_str().unwrap(),
            "--memory",
            memory,
            "--nested",
            "off",
        ]);
        self.src.ok(&["vm", "start", "t"]);
        wait_for(|| dots(&self.src.dir) >= 10, "the ticker never ticked");
    }

    /// `vm receive t` on the destination, in the background.
    fn receive(&self, token: &Path) -> Child {
        nestvm()
            .arg("--state-dir")
            .arg(&self.dst.dir)
            .args(["vm", "receive", "t", "--listen", &self.addr, "--wait", "60"])
            .arg("--token-file")
            .arg(token)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    }

    fn migrate(&self) -> Output {
        self.migrate_with(&[])
    }

    fn migrate_with(&self, extra: &[&str]) -> Output {
        self.spawn_migrate(extra).wait_with_output().unwrap()
    }

    /// `vm migrate t` to the receiver, in the background, once it listens.
    fn spawn_migrate(&self, extra: &[&str]) -> Child {
        let start = Instant::now();
        // The receiver needs a moment to listen.
        while std::net::TcpStream::connect(&self.addr).is_err() {
            assert!(start.elapsed() < T, "the receiver never listened");
            std::thread::sleep(Duration::from_millis(20));
        }
        nestvm()
            .arg("--state-dir")
            .arg(&self.src.dir)
            .args(["vm", "migrate", "t", "--to", &self.addr, "--token-file"])
            .arg(&self.token)
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    }

    /// The source VMM's report on its migration, while it runs.
    fn progress(&self) -> Option<serde_json::Value> {
        let control = self.src.dir.join("vms/t/control.sock");
        match nestvm_vmm::api::call(&control, "GET", "/v1/vm/migration", Duration::from_secs(5)) {
            Ok((200, v)) => Some(v),
            _ => None,
        }
    }
}

fn console(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("vms/t/console.log")).unwrap_or_default()
}

fn dots(dir: &Path) -> usize {
    console(dir).matches('.').count()
}

fn wait_for(mut cond: impl FnMut() -> bool, what: &str) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < T, "{what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// The source VM keeps running: it is Running and still ticking.
fn source_runs_on(h: &Hosts) {
    assert_eq!(h.src.state("t"), "Running", "{}", console(&h.src.dir));
    let now = dots(&h.src.dir);
    wait_for(
        || dots(&h.src.dir) > now + 20,
        "the source VM stopped ticking",
    );
    h.src.ok(&["vm", "kill", "t"]);
}

#[test]
fn a_running_vm_moves_and_finishes_on_the_destination() {
    if !kvm_or_skip("a_running_vm_moves_and_finishes_on_the_destination") {
        return;
    }
    let h = Hosts::new("move");
    h.start_ticker("64M", TICKS as u32);
    let receiver = h.receive(&h.token);
    let out = h.migrate();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let said = text(&out);
    assert!(said.contains("now runs at"), "{said}");
    let received = receiver.wait_with_output().unwrap();
    assert_eq!(received.status.code(), Some(0), "{}", text(&received));
    assert!(text(&received).contains("arrived and runs here"));
    // The source VMM ended; its definition stays, Off.
    assert_eq!(h.src.state("t"), "Off");
    let vmm_log = std::fs::read_to_string(h.src.dir.join("vms/t/vmm.log")).unwrap();
    assert!(vmm_log.contains("Migrated"), "{vmm_log}");
    // The destination carries on from the very tick it was at: the two
    // consoles together hold every dot exactly once.
    let before = dots(&h.src.dir);
    assert!(before < TICKS, "migrated after the guest ended");
    wait_for(
        || h.dst.state("t") == "Off",
        "the migrated VM never finished",
    );
    let after = console(&h.dst.dir);
    assert_eq!(before + after.matches('.').count(), TICKS, "{after}");
    assert!(after.ends_with("TICKER-DONE"), "{after}");
    // The migration's report says what happened.
    let v: serde_json::Value =
        serde_json::from_slice(&std::fs::read(h.src.dir.join("vms/t/migration.json")).unwrap())
            .unwrap();
    assert_eq!(v["phase"], "completed", "{v}");
    assert!(v["rounds"].as_u64().unwrap() >= 1, "{v}");
    assert!(v["downtime_ms"].as_u64().is_some(), "{v}");
}

#[test]
fn a_wrong_token_is_refused_and_the_source_runs_on() {
    if !kvm_or_skip("a_wrong_token_is_refused_and_the_source_runs_on") {
        return;
    }
    let h = Hosts::new("token");
    h.start_ticker("32M", u32::MAX);
    let other = h.dst.dir.with_extension("other-token");
    std::fs::write(&other, "0123456789abcdef0123456789abcdef\n").unwrap();
    std::fs::write(&h.token, "fedcba9876543210fedcba9876543210\n").unwrap();
    let receiver = h.receive(&other);
    let out = h.migrate();
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains("keeps running here"), "{}", text(&out));
    let received = receiver.wait_with_output().unwrap();
    assert_eq!(received.status.code(), Some(1));
    assert!(
        text(&received).contains("does not hold this token"),
        "{}",
        text(&received)
    );
    // Nothing of the VM is left on the destination.
    assert!(!h.dst.dir.join("vms/t").exists());
    source_runs_on(&h);
}

#[test]
fn killing_the_receiver_mid_copy_leaves_the_source_running() {
    if !kvm_or_skip("killing_the_receiver_mid_copy_leaves_the_source_running") {
        return;
    }
    let h = Hosts::new("kill");
    // The guest keeps 32 MiB written, so round 1 has at least that much to
    // send: at a cap of 4 MiB/s the copy lasts 8 s or more, whatever this
    // machine's speed.
    h.start("128M", dirtier(32));
    wait_for(|| dots(&h.src.dir) >= 1, "the guest never finished a pass");
    let receiver = h.receive(&h.token);
    let migrate = h.spawn_migrate(&["--json", "--max-bandwidth", "4M"]);
    // Once the copy is under way, freeze the receiving VMM: nothing it does
    // can change what is checked next, and the kill lands in that state.
    wait_for(
        || {
            h.progress()
                .is_some_and(|v| v["sent_bytes"].as_u64() > Some(0))
        },
        "the copy never started",
    );
    let pid = vmm_pid(&h.dst.dir, "t");
    freeze(pid);
    let v = h.progress().expect("the source reports its migration");
    assert_eq!(v["phase"], "precopy", "the copy is still under way: {v}");
    assert_eq!(v["rounds"], 0, "still in the first round: {v}");
    assert_eq!(v["max_bandwidth"], 4 << 20, "{v}");
    assert!(!h.dst.dir.join("vms/t/vm.toml").exists());
    sigkill(pid);
    let out = migrate.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains("keeps running here"), "{}", text(&out));
    let received = receiver.wait_with_output().unwrap();
    assert_ne!(received.status.code(), Some(0));
    source_runs_on(&h);
}

#[test]
fn a_bandwidth_cap_makes_the_copy_last_and_is_reported() {
    if !kvm_or_skip("a_bandwidth_cap_makes_the_copy_last_and_is_reported") {
        return;
    }
    let h = Hosts::new("cap");
    // 4 MiB written once per pass; a 10 s budget lets round 1 be the only
    // one. At 1 MiB/s that round cannot take less than 4 s.
    h.start("64M", dirtier(4));
    wait_for(|| dots(&h.src.dir) >= 1, "the guest never finished a pass");
    let receiver = h.receive(&h.token);
    let out = h.migrate_with(&["--max-bandwidth", "1M", "--max-downtime", "10s"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_eq!(receiver.wait_with_output().unwrap().status.code(), Some(0));
    let v: serde_json::Value =
        serde_json::from_slice(&std::fs::read(h.src.dir.join("vms/t/migration.json")).unwrap())
            .unwrap();
    assert_eq!(v["phase"], "completed", "{v}");
    assert_eq!(v["max_bandwidth"], 1 << 20, "{v}");
    assert!(v["sent_bytes"].as_u64().unwrap() >= 4 << 20, "{v}");
    assert!(
        v["elapsed_ms"].as_u64().unwrap() >= 4000,
        "the cap held: {v}"
    );
    // A rate below the smallest cap is a usage error, and nothing starts.
    let low = h.dst.run(&[
        "vm",
        "migrate",
        "t",
        "--to",
        &h.addr,
        "--token-file",
        h.token.to_str().unwrap(),
        "--max-bandwidth",
        "1K",
    ]);
    assert_eq!(low.status.code(), Some(2), "{}", text(&low));
    assert!(text(&low).contains("smallest cap"), "{}", text(&low));
    h.dst.ok(&["vm", "kill", "t"]);
}

#[test]
fn a_guest_rewriting_its_memory_arrives_with_every_page() {
    if !kvm_or_skip("a_guest_rewriting_its_memory_arrives_with_every_page") {
        return;
    }
    let h = Hosts::new("busy");
    // Rewrites 32 MiB over and over: every pre-copy round finds it dirty,
    // and the last pages written before the pause must still arrive. The
    // destination compares a digest of all memory with the source's.
    h.start("128M", dirtier(32));
    wait_for(|| dots(&h.src.dir) >= 3, "the guest never finished a pass");
    let receiver = h.receive(&h.token);
    let out = h.migrate_with(&["--verify", "--max-downtime", "5ms"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let received = receiver.wait_with_output().unwrap();
    assert_eq!(received.status.code(), Some(0), "{}", text(&received));
    let v: serde_json::Value =
        serde_json::from_slice(&std::fs::read(h.src.dir.join("vms/t/migration.json")).unwrap())
            .unwrap();
    assert!(v["rounds"].as_u64().unwrap() >= 2, "{v}");
    // It goes on writing there.
    let before = dots(&h.dst.dir);
    wait_for(
        || dots(&h.dst.dir) > before + 2,
        "the guest stopped on the destination",
    );
    h.dst.ok(&["vm", "kill", "t"]);
}
