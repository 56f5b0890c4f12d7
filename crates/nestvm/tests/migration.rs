//! Live migration between two nestvm "hosts" (two state directories) on
//! this machine's /dev/kvm, over loopback: a ticking tiny guest moves and
//! finishes its exact count on the destination; a man in the middle that
//! flips, replays or rewrites a frame, and a receiver killed mid-copy, leave
//! the source running unharmed; peers with garbage, a wrong key or nothing
//! to say do not keep the receiver from taking the real sender's VM.

mod common;
mod mitm;

use std::path::{Path, PathBuf};
use std::process::{Child, Output, Stdio};
use std::time::{Duration, Instant};

use common::{freeze, guest, kvm_or_skip, nestvm, sigkill, threads, vmm_pid, StateEnv};
use mitm::{Attack, Proxy};
use nestvm_guests::{dirtier, ticker, Ending};
use nestvm_vmm::migration::{channel, secret};

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
        self.start_with(memory, image, &[]);
    }

    /// A VM `t` running `image` on the source, with `extra` arguments to
    /// `vm new`.
    fn start_with(&self, memory: &str, image: Vec<u8>, extra: &[&str]) {
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
        ]
        .iter()
        .chain(extra)
        .copied()
        .collect::<Vec<_>>());
        self.src.ok(&["vm", "start", "t"]);
        wait_for(|| dots(&self.src.dir) >= 10, "the ticker never ticked");
    }

    /// A ticking VM `t` on the source with a 1 MiB disk image (which the
    /// guest never touches: the VMMs lock it); the image's path.
    fn start_ticker_with_disk(&self) -> PathBuf {
        let disk = self.src.dir.join("disk.img");
        std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
        let arg = format!("path={}", disk.display());
        let ticker = ticker(u32::MAX, 3000, "", Ending::PowerOff);
        self.start_with("32M", ticker, &["--disk", &arg]);
        disk
    }

    /// `vm receive t` on the destination, in the background.
    fn receive(&self, token: &Path) -> Child {
        self.receive_with(token, &[])
    }

    /// `vm receive t ... EXTRA` on the destination, in the background.
    fn receive_with(&self, token: &Path, extra: &[String]) -> Child {
        nestvm()
            .arg("--state-dir")
            .arg(&self.dst.dir)
            .args(["vm", "receive", "t", "--listen", &self.addr, "--wait", "60"])
            .arg("--token-file")
            .arg(token)
            .args(extra)
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

    /// Waits until the receiver listens (the probe is one connection that
    /// fails its handshake there).
    fn wait_listening(&self) {
        let start = Instant::now();
        while std::net::TcpStream::connect(&self.addr).is_err() {
            assert!(start.elapsed() < T, "the receiver never listened");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `vm migrate t` to the receiver, in the background, once it listens.
    fn spawn_migrate(&self, extra: &[&str]) -> Child {
        self.wait_listening();
        self.spawn_migrate_to(&self.addr, &self.token, extra)
    }

    /// `vm migrate t --to TO --token-file TOKEN`, in the background.
    fn spawn_migrate_to(&self, to: &str, token: &Path, extra: &[&str]) -> Child {
        nestvm()
            .arg("--state-dir")
            .arg(&self.src.dir)
            .args(["vm", "migrate", "t", "--to", to, "--token-file"])
            .arg(token)
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

fn wait_for(cond: impl FnMut() -> bool, what: &str) {
    common::wait_until(cond, T, what);
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// The source VM keeps running: it is Running and still ticking.
fn source_still_runs(h: &Hosts) {
    assert_eq!(h.src.state("t"), "Running", "{}", console(&h.src.dir));
    let now = dots(&h.src.dir);
    wait_for(
        || dots(&h.src.dir) > now + 20,
        "the source VM stopped ticking",
    );
}

/// The source VM keeps running; then it is killed.
fn source_runs_on(h: &Hosts) {
    source_still_runs(h);
    h.src.ok(&["vm", "kill", "t"]);
}

/// A migration that failed: the CLI says the VM runs on here, and the
/// receiver ended without the VM, saying `why`.
fn failed_and_nothing_arrived(h: &Hosts, out: &Output, receiver: Child, why: &str) {
    assert_eq!(out.status.code(), Some(1), "{}", text(out));
    assert!(text(out).contains("keeps running here"), "{}", text(out));
    let received = receiver.wait_with_output().unwrap();
    assert_ne!(received.status.code(), Some(0), "{}", text(&received));
    assert!(text(&received).contains(why), "{}", text(&received));
    assert!(!h.dst.dir.join("vms/t").exists());
}

/// How many connections the receiver dropped for a failed handshake.
fn dropped(h: &Hosts) -> usize {
    std::fs::read_to_string(h.dst.dir.join("vms/t/vmm.log"))
        .unwrap_or_default()
        .matches("failed the handshake")
        .count()
}

#[test]
fn a_running_vm_moves_and_finishes_on_the_destination() {
    if !kvm_or_skip("a_running_vm_moves_and_finishes_on_the_destination") {
        return;
    }
    let h = Hosts::new("move");
    h.start_ticker("64M", TICKS as u32);
    let receiver = h.receive(&h.token);
    // By name: resolving it is part of what the migration thread's filter
    // must allow (glibc reads /etc/hosts and may ask netlink).
    h.wait_listening();
    let by_name = h.addr.replace("127.0.0.1", "localhost");
    let out = h
        .spawn_migrate_to(&by_name, &h.token, &[])
        .wait_with_output()
        .unwrap();
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
fn a_man_in_the_middle_cannot_rewrite_flip_or_replay_a_frame() {
    if !kvm_or_skip("a_man_in_the_middle_cannot_rewrite_flip_or_replay_a_frame") {
        return;
    }
    let h = Hosts::new("mitm");
    h.start_ticker("32M", u32::MAX);
    // Frame 0 is the sender's confirmation, 1 the Hello (one chunk for a
    // VM this small), 2 the first batch of pages: the receiver always reads
    // on after it.
    for attack in [Attack::RewriteHello, Attack::Flip(2), Attack::Replay(2)] {
        let receiver = h.receive(&h.token);
        h.wait_listening();
        let proxy = Proxy::start(h.addr.clone(), attack);
        let out = h
            .spawn_migrate_to(&proxy.addr, &h.token, &[])
            .wait_with_output()
            .unwrap();
        assert!(proxy.tampered(), "{attack:?}: the frame never came by");
        failed_and_nothing_arrived(&h, &out, receiver, "a frame failed authentication");
        source_still_runs(&h);
    }
    // The same proxy leaving every frame alone: the VM moves, so the
    // failures above were the tampering's doing.
    let receiver = h.receive(&h.token);
    h.wait_listening();
    let proxy = Proxy::start(h.addr.clone(), Attack::Nothing);
    let out = h
        .spawn_migrate_to(&proxy.addr, &h.token, &[])
        .wait_with_output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(!proxy.tampered());
    assert_eq!(receiver.wait_with_output().unwrap().status.code(), Some(0));
    h.dst.ok(&["vm", "kill", "t"]);
}

/// A migration through `attack`'s proxy; the CLI's output and the
/// receiver's.
fn through(h: &Hosts, attack: Attack, extra: &[String]) -> (Output, Output) {
    let receiver = h.receive_with(&h.token, extra);
    h.wait_listening();
    let proxy = Proxy::start(h.addr.clone(), attack);
    let out = h
        .spawn_migrate_to(&proxy.addr, &h.token, &[])
        .wait_with_output()
        .unwrap();
    assert!(proxy.tampered(), "{attack:?}: the frame never came by");
    (out, receiver.wait_with_output().unwrap())
}

/// The source committed but heard nothing back: the CLI says so and how
/// to settle it, and the VM is paused here.
fn unconfirmed(h: &Hosts, out: &Output) {
    assert_eq!(out.status.code(), Some(1), "{}", text(out));
    let said = text(out);
    assert!(
        said.contains("did not confirm") && said.contains("nestvm vm kill t"),
        "{said}"
    );
    assert_eq!(
        h.src.state("t"),
        "Paused",
        "{}",
        h.src.ok(&["vm", "show", "t"])
    );
    let show = h.src.ok(&["vm", "show", "t"]);
    assert!(show.contains("Unconfirmed"), "{show}");
}

/// Cuts just before, at and just after the commit point (`Ready`, `Go`,
/// `Resumed` dropped): the destination runs the VM only if the source
/// gave it up; the source resumes on its own only if the destination
/// provably did not start it; when neither knows, the source stays paused
/// and `vm resume` there takes the disk back only if the destination does
/// not hold it. Never do two copies run, nor hold the disk for writing.
#[test]
fn a_cut_at_the_commit_point_never_leaves_two_copies_running() {
    if !kvm_or_skip("a_cut_at_the_commit_point_never_leaves_two_copies_running") {
        return;
    }
    let h = Hosts::new("commit");
    let disk = h.start_ticker_with_disk();
    // The same image, as shared storage would have it.
    let place = ["--disk".to_owned(), disk.display().to_string()];

    // No `Ready`: not committed; the source takes its disk back and runs.
    let (out, received) = through(&h, Attack::DropReady, &place);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains("keeps running here"), "{}", text(&out));
    assert_ne!(received.status.code(), Some(0), "{}", text(&received));
    assert!(!h.dst.dir.join("vms/t").exists());
    source_still_runs(&h);

    // No `Go`: the source committed, the destination never ran the VM.
    // Nobody runs it until the user resumes the source, which gets its
    // disk back (nobody holds it).
    let (out, received) = through(&h, Attack::DropGo, &place);
    unconfirmed(&h, &out);
    assert_ne!(received.status.code(), Some(0), "{}", text(&received));
    assert!(
        text(&received).contains("did not commit"),
        "{}",
        text(&received)
    );
    assert!(!h.dst.dir.join("vms/t").exists());
    let refused = h.src.run(&["vm", "save", "t"]);
    assert_ne!(
        refused.status.code(),
        Some(0),
        "a save while the outcome is unknown"
    );
    h.src.ok(&["vm", "resume", "t"]);
    source_still_runs(&h);

    // No `Resumed`: the VM runs at the destination, which holds the disk;
    // the source stays paused and cannot be resumed while it does.
    let (out, received) = through(&h, Attack::DropResumed, &place);
    unconfirmed(&h, &out);
    assert_eq!(received.status.code(), Some(0), "{}", text(&received));
    assert_eq!(h.dst.state("t"), "Running");
    let now = dots(&h.dst.dir);
    wait_for(
        || dots(&h.dst.dir) > now + 20,
        "the destination's copy does not run",
    );
    let resume = h.src.run(&["vm", "resume", "t"]);
    assert_ne!(resume.status.code(), Some(0), "{}", text(&resume));
    assert!(
        text(&resume).contains("cannot take back")
            && text(&resume).contains("destination may be running"),
        "{}",
        text(&resume)
    );
    assert_eq!(h.src.state("t"), "Paused");
    // Settled as the CLI said: this copy goes, the destination's runs on.
    h.src.ok(&["vm", "kill", "t"]);
    let now = dots(&h.dst.dir);
    wait_for(
        || dots(&h.dst.dir) > now + 20,
        "the destination's copy stopped",
    );
    h.dst.ok(&["vm", "kill", "t"]);
}

/// The source's report on its last migration.
fn report(h: &Hosts) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(h.src.dir.join("vms/t/migration.json")).unwrap()).unwrap()
}

/// Runs a VM `t` on the source that rewrites `mib` MiB of its `memory`
/// over and over and, once it made `passes` passes, migrates it with
/// `args`; both sides must succeed. The source's report.
fn migrate_dirtier(
    h: &Hosts,
    memory: &str,
    mib: u32,
    passes: usize,
    args: &[&str],
) -> serde_json::Value {
    h.start(memory, dirtier(mib));
    wait_for(
        || dots(&h.src.dir) >= passes,
        "the guest never finished a pass",
    );
    let receiver = h.receive(&h.token);
    let out = h.migrate_with(args);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let received = receiver.wait_with_output().unwrap();
    assert_eq!(received.status.code(), Some(0), "{}", text(&received));
    report(h)
}

/// The moved guest goes on writing at the destination; then it ends there.
fn writes_on_at_the_destination(h: &Hosts) {
    let before = dots(&h.dst.dir);
    wait_for(
        || dots(&h.dst.dir) > before + 2,
        "the guest stopped on the destination",
    );
    h.dst.ok(&["vm", "kill", "t"]);
}

/// The destination decides where the disks are: a VM whose disk the
/// receiver did not place, placed on an image that is not there, with a
/// mapping for a disk it does not have, or placed on an image another
/// process holds is refused before any memory moves; placed on a copy of
/// its image, it arrives and uses the copy.
#[test]
fn the_destination_places_the_disks_and_refuses_held_ones_before_memory_moves() {
    if !kvm_or_skip("the_destination_places_the_disks_and_refuses_held_ones_before_memory_moves") {
        return;
    }
    let h = Hosts::new("place");
    let disk = h.start_ticker_with_disk();
    std::fs::create_dir_all(&h.dst.dir).unwrap();
    let copy = h.dst.dir.join("copy.img");
    std::fs::copy(&disk, &copy).unwrap();
    let map = |to: &Path| {
        vec![
            "--disk".to_owned(),
            format!("{}={}", disk.display(), to.display()),
        ]
    };
    let holder = std::fs::File::open(&copy).unwrap();
    let cases: [(Vec<String>, &str, bool); 4] = [
        (vec![], "say where it is here with --disk", false),
        (
            map(&h.dst.dir.join("none.img")),
            "does not exist here",
            false,
        ),
        (
            vec!["--disk".into(), format!("/not/its.img={}", copy.display())],
            "names no disk of the arriving VM",
            false,
        ),
        (map(&copy), "is in use by another process here", true),
    ];
    for (args, why, hold) in cases {
        if hold {
            holder.try_lock().unwrap();
        }
        let receiver = h.receive_with(&h.token, &args);
        let out = h.migrate();
        failed_and_nothing_arrived(&h, &out, receiver, why);
        assert_eq!(
            report(&h)["sent_bytes"],
            0,
            "memory moved before the refusal"
        );
        source_still_runs(&h);
        if hold {
            holder.unlock().unwrap();
        }
    }
    let receiver = h.receive_with(&h.token, &map(&copy));
    let out = h.migrate();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_eq!(receiver.wait_with_output().unwrap().status.code(), Some(0));
    let v = h.dst.json(&["vm", "show", "t"]);
    assert_eq!(v["disks"][0]["path"], copy.display().to_string(), "{v}");
    h.dst.ok(&["vm", "kill", "t"]);
}

#[test]
fn hostile_peers_do_not_stop_the_receiver() {
    if !kvm_or_skip("hostile_peers_do_not_stop_the_receiver") {
        return;
    }
    let h = Hosts::new("hostile");
    h.start_ticker("32M", u32::MAX);
    let receiver = h.receive(&h.token);
    h.wait_listening();
    wait_for(|| dropped(&h) >= 1, "the probe was not dropped");
    let connect = || std::net::TcpStream::connect(&h.addr).unwrap();
    // Garbage, and a first frame far over the pre-authentication cap.
    use std::io::Write;
    connect().write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
    wait_for(|| dropped(&h) >= 2, "garbage was not dropped");
    connect().write_all(&[1, 0xff, 0xff, 0, 0]).unwrap();
    wait_for(|| dropped(&h) >= 3, "an oversized frame was not dropped");
    // A peer with another key.
    let wrong = secret::Psk::random().unwrap();
    let e = channel::initiate(connect(), &wrong).unwrap_err();
    assert!(matches!(e, channel::ChannelError::KeyRefused), "{e}");
    wait_for(|| dropped(&h) >= 4, "a wrong key was not dropped");
    // `vm migrate` with another secret file fails, and the VM runs on.
    let other = h.src.dir.join("other-token");
    secret::create(&other).unwrap();
    let out = h
        .spawn_migrate_to(&h.addr, &other, &[])
        .wait_with_output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        text(&out).contains("refused this migration secret"),
        "{}",
        text(&out)
    );
    wait_for(|| dropped(&h) >= 5, "the wrong secret was not dropped");
    source_still_runs(&h);
    // Weak or exposed secret files are refused before anything starts.
    let weak = h.src.dir.join("weak-token");
    std::fs::write(&weak, "0123456789abcdef0123456789abcdef\n").unwrap();
    let out = h
        .spawn_migrate_to(&h.addr, &weak, &[])
        .wait_with_output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("chmod 600"), "{}", text(&out));
    std::fs::set_permissions(&weak, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let out = h
        .spawn_migrate_to(&h.addr, &weak, &[])
        .wait_with_output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        text(&out).contains("not a strong migration secret"),
        "{}",
        text(&out)
    );
    // A peer that says nothing is dropped at its handshake's deadline...
    let silent = connect();
    wait_for(|| dropped(&h) >= 6, "a silent peer was never dropped");
    drop(silent);
    let log = std::fs::read_to_string(h.dst.dir.join("vms/t/vmm.log")).unwrap();
    assert!(log.contains("did not finish the handshake within"), "{log}");
    // ...and, connected first, does not keep the real sender out: it only
    // ever holds its own handshake.
    let silent = connect();
    let out = h
        .spawn_migrate_to(&h.addr, &h.token, &[])
        .wait_with_output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    drop(silent);
    let received = receiver.wait_with_output().unwrap();
    assert_eq!(received.status.code(), Some(0), "{}", text(&received));
    let log = std::fs::read_to_string(h.dst.dir.join("vms/t/vmm.log")).unwrap();
    assert!(log.contains("does not hold this migration secret"), "{log}");
    h.dst.ok(&["vm", "kill", "t"]);
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
    let pid = vmm_pid(&h.src.dir, "t");
    let migrating = h.spawn_migrate(&["--max-bandwidth", "1M", "--max-downtime", "10s"]);
    // While the capped copy goes on, its thread is there, and every
    // thread of the source VMM runs under its seccomp filter.
    wait_for(
        || threads(pid).iter().any(|(n, _)| n == "migrate"),
        "the migration thread never showed",
    );
    let all = threads(pid);
    for name in ["vcpu0", "api", "migrate"] {
        assert!(all.iter().any(|(n, _)| n == name), "{all:?}");
    }
    assert!(all.iter().all(|(_, confined)| *confined), "{all:?}");
    let out = migrating.wait_with_output().unwrap();
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
    let v = migrate_dirtier(&h, "128M", 32, 3, &["--verify", "--max-downtime", "5ms"]);
    assert!(v["rounds"].as_u64().unwrap() >= 2, "{v}");
    // It goes on writing there.
    writes_on_at_the_destination(&h);
}

/// A guest that rewrites 64 MiB over and over outruns a copy capped at
/// 64 MiB/s: each round finds all of it dirty again. Auto-converge slows
/// it (its vCPUs nap) round after round until what is left fits the
/// budget; the memory still arrives whole, and the guest runs on there at
/// full speed.
#[test]
fn a_guest_writing_faster_than_the_link_is_slowed_until_the_copy_converges() {
    let name = "a_guest_writing_faster_than_the_link_is_slowed_until_the_copy_converges";
    if !kvm_or_skip(name) {
        return;
    }
    let h = Hosts::new("converge");
    let args = [
        "--verify",
        "--max-bandwidth",
        "64M",
        "--max-downtime",
        "200ms",
    ];
    let v = migrate_dirtier(&h, "128M", 64, 2, &args);
    assert_eq!(v["phase"], "completed", "{v}");
    assert_eq!(v["converged"], true, "{v}");
    let slowed = v["slowed_pct"].as_u64().unwrap();
    assert!(
        slowed >= u64::from(nestvm_vmm::migration::converge::INITIAL),
        "{v}"
    );
    assert!(v["rounds"].as_u64().unwrap() >= 3, "{v}");
    writes_on_at_the_destination(&h);
}

/// With `--no-auto-converge` the same kind of guest is never slowed:
/// pre-copy runs its most rounds, and the final copy takes what is left.
#[test]
fn without_auto_converge_a_guest_that_outruns_the_link_is_never_slowed() {
    let name = "without_auto_converge_a_guest_that_outruns_the_link_is_never_slowed";
    if !kvm_or_skip(name) {
        return;
    }
    let h = Hosts::new("noconv");
    // 8 MiB a pass at 64 MiB/s: a round lasts at least 125 ms, in which
    // the guest rewrites far more than the 1.3 MiB a 20 ms budget allows.
    let args = [
        "--no-auto-converge",
        "--max-bandwidth",
        "64M",
        "--max-downtime",
        "20ms",
    ];
    let v = migrate_dirtier(&h, "64M", 8, 2, &args);
    assert_eq!(v["phase"], "completed", "{v}");
    assert_eq!(v["converged"], false, "{v}");
    assert_eq!(v["slowed_pct"], 0, "{v}");
    assert_eq!(
        v["rounds"].as_u64(),
        Some(u64::from(nestvm_vmm::migration::MAX_ROUNDS)),
        "{v}"
    );
    h.dst.ok(&["vm", "kill", "t"]);
}

/// Over a link that holds each of the receiver's frames back 60 ms, the
/// pause costs two round trips whatever is left to copy. The switch rule
/// counts them: with a 100 ms budget no round can fit, so pre-copy ends
/// at once and the result says why; with a 400 ms budget the expected
/// downtime it waited for includes them.
#[test]
fn the_switch_counts_the_round_trips_of_the_pause() {
    if !kvm_or_skip("the_switch_counts_the_round_trips_of_the_pause") {
        return;
    }
    let delay = Duration::from_millis(60);
    for (tag, budget) in [("rtt-short", "100ms"), ("rtt-long", "400ms")] {
        let h = Hosts::new(tag);
        h.start_ticker("32M", u32::MAX);
        let receiver = h.receive(&h.token);
        h.wait_listening();
        let proxy = Proxy::start(h.addr.clone(), Attack::Delay(delay));
        let out = h
            .spawn_migrate_to(&proxy.addr, &h.token, &["--max-downtime", budget])
            .wait_with_output()
            .unwrap();
        assert_eq!(out.status.code(), Some(0), "{}", text(&out));
        assert_eq!(receiver.wait_with_output().unwrap().status.code(), Some(0));
        let v = report(&h);
        assert_eq!(v["phase"], "completed", "{v}");
        let rtt = v["round_trip_ms"].as_f64().unwrap();
        assert!(rtt >= 60.0, "{v}");
        let expected = v["expected_downtime_ms"].as_f64().unwrap();
        assert!(expected >= 2.0 * rtt, "{v}");
        assert!(v["downtime_ms"].as_u64().unwrap() >= 120, "{v}");
        if budget == "100ms" {
            assert_eq!(v["converged"], false, "{v}");
            assert_eq!(v["rounds"], 1, "no round could have fitted: {v}");
            assert!(text(&out).contains("round trip"), "{}", text(&out));
        } else {
            assert_eq!(v["converged"], true, "{v}");
            assert!(expected <= 400.0, "{v}");
        }
        h.dst.ok(&["vm", "kill", "t"]);
    }
}

/// The pid of the passt that VM `t`'s VMM in `dir` started (its log says).
fn passt_pid(dir: &Path) -> u32 {
    let log = std::fs::read_to_string(dir.join("vms/t/vmm.log")).unwrap_or_default();
    log.split("user0: passt ")
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no passt in the VMM's log:\n{log}"))
}

/// Whether process `pid` runs (not gone, not a zombie).
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rsplit(')').next().map(|r| r.trim().to_owned()))
        .is_some_and(|r| !r.starts_with('Z'))
}

#[test]
fn user_networking_and_its_port_forward_move_with_the_vm_on_one_host() {
    if !kvm_or_skip("user_networking_and_its_port_forward_move_with_the_vm_on_one_host") {
        return;
    }
    let h = Hosts::new("usernet");
    let port = common::free_port();
    let net = format!("user,hostfwd=tcp:{port}-:8080");
    let ticker = ticker(u32::MAX, 3000, "", Ending::PowerOff);
    h.start_with("32M", ticker, &["--net", &net]);
    let listening = || std::net::TcpStream::connect(("127.0.0.1", port)).is_ok();
    wait_for(
        listening,
        "the source's passt never took the forwarded port",
    );
    let source_passt = passt_pid(&h.src.dir);
    let receiver = h.receive(&h.token);
    let out = h.migrate();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let received = receiver.wait_with_output().unwrap();
    assert_eq!(received.status.code(), Some(0), "{}", text(&received));
    // The source stopped its passt before it gave the VM up, so the
    // destination's own passt, started after that, holds the same port.
    assert!(!alive(source_passt), "the source's passt still runs");
    let dst_passt = passt_pid(&h.dst.dir);
    assert_ne!(dst_passt, source_passt);
    wait_for(
        listening,
        "the destination's passt never took the forwarded port",
    );
    assert!(alive(dst_passt), "the destination's passt ended");
    let log = std::fs::read_to_string(h.dst.dir.join("vms/t/vmm.log")).unwrap();
    assert!(!log.contains("Failed to bind"), "{log}");
    assert_eq!(h.dst.state("t"), "Running");
    h.dst.ok(&["vm", "kill", "t"]);
}
