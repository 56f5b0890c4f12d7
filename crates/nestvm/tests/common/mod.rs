//! Helpers shared by the binary's integration tests.
#![allow(dead_code)] // each test binary uses its own subset of these helpers

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The binary under test.
pub fn nestvm() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_nestvm"));
    c.stdin(Stdio::null());
    c
}

/// Whether this machine can run KVM tests. Without /dev/kvm the test is
/// skipped with a message on stderr, unless NESTVM_REQUIRE_KVM is set (CI),
/// where a missing /dev/kvm is a failure.
pub fn kvm_or_skip(test: &str) -> bool {
    if Path::new("/dev/kvm").exists() {
        return true;
    }
    if std::env::var_os("NESTVM_REQUIRE_KVM").is_some() {
        panic!("{test}: /dev/kvm is missing but NESTVM_REQUIRE_KVM is set");
    }
    eprintln!("SKIPPED {test}: /dev/kvm is not available on this machine");
    false
}

/// A scratch directory for this test process.
pub fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("nestvm-it-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Writes a guest image and returns its path.
pub fn guest(name: &str, image: Vec<u8>) -> PathBuf {
    let p = scratch("guests").join(name);
    std::fs::write(&p, image).unwrap();
    p
}

/// Runs a command with a deadline, killing it if it overruns.
pub fn run_with_timeout(cmd: &mut Command, timeout: Duration) -> Output {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn nestvm");
    let start = Instant::now();
    loop {
        if child.try_wait().unwrap().is_some() {
            return child.wait_with_output().unwrap();
        }
        if start.elapsed() > timeout {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "timed out after {timeout:?}; stdout: {}; stderr: {}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A private state directory and the nestvm commands run against it.
pub struct StateEnv {
    /// The state directory.
    pub dir: PathBuf,
}

impl StateEnv {
    /// A fresh state directory named after `tag`.
    pub fn new(tag: &str) -> Self {
        let dir = scratch(&format!("state-{tag}"));
        let _ = std::fs::remove_dir_all(&dir);
        Self { dir }
    }

    /// Runs `nestvm --state-dir DIR ARGS`.
    pub fn run(&self, args: &[&str]) -> Output {
        run_with_timeout(
            nestvm().arg("--state-dir").arg(&self.dir).args(args),
            Duration::from_secs(60),
        )
    }

    /// Runs and expects exit 0; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert_eq!(
            out.status.code(),
            Some(0),
            "{args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs with --json and parses stdout.
    pub fn json(&self, args: &[&str]) -> serde_json::Value {
        let mut a = args.to_vec();
        if !a.contains(&"--json") {
            a.push("--json");
        }
        serde_json::from_str(&self.ok(&a)).expect("valid JSON")
    }

    /// A VM's state as `vm show` reports it.
    pub fn state(&self, name: &str) -> String {
        self.json(&["vm", "show", name])["state"]
            .as_str()
            .unwrap()
            .to_owned()
    }
}

/// A test that failed half-way leaves no VMM behind: each VM of the state
/// directory whose VMM still runs (its pid file names a process started
/// with this directory) is killed.
impl Drop for StateEnv {
    fn drop(&mut self) {
        let Ok(vms) = std::fs::read_dir(self.dir.join("vms")) else {
            return;
        };
        let ours = self.dir.to_string_lossy().into_owned();
        for vm in vms.flatten() {
            let Some(pid) = std::fs::read_to_string(vm.path().join("vmm.pid"))
                .ok()
                .and_then(|p| p.trim().parse::<i32>().ok())
            else {
                continue;
            };
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            if String::from_utf8_lossy(&cmdline).contains(&ours) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
    }
}

/// A TCP port on loopback that was free a moment ago.
#[allow(dead_code)] // not every test binary listens
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The pid of the VMM running managed VM `name` in `state_dir`.
pub fn vmm_pid(state_dir: &Path, name: &str) -> i32 {
    std::fs::read_to_string(state_dir.join("vms").join(name).join("vmm.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

/// Polls `cond` every 20 ms until it holds; fails the test saying `what`
/// once `limit` has passed.
#[allow(dead_code)] // not every test binary waits
pub fn wait_until(mut cond: impl FnMut() -> bool, limit: Duration, what: &str) {
    let start = std::time::Instant::now();
    while !cond() {
        assert!(start.elapsed() < limit, "{what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Each thread of process `pid`: its name, and whether it runs under a
/// seccomp filter (`Seccomp: 2` in its status).
#[allow(dead_code)] // not every test binary looks at threads
pub fn threads(pid: i32) -> Vec<(String, bool)> {
    let mut out = vec![];
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for t in tasks.flatten() {
        let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
        let status = std::fs::read_to_string(t.path().join("status")).unwrap_or_default();
        let confined = status
            .lines()
            .any(|l| l.split_whitespace().eq(["Seccomp:", "2"]));
        out.push((comm.trim().to_owned(), confined));
    }
    out
}

/// Kills process `pid` with SIGKILL (a VMM dying behind nestvm's back).
pub fn sigkill(pid: i32) {
    signal(pid, nix::sys::signal::Signal::SIGKILL);
}

/// Freezes process `pid` with SIGSTOP and returns once it is stopped, so
/// that what a test then observes of it stays true until it acts (a kill).
#[allow(dead_code)] // not every test binary freezes a process
pub fn freeze(pid: i32) {
    signal(pid, nix::sys::signal::Signal::SIGSTOP);
    let stat = format!("/proc/{pid}/stat");
    let start = std::time::Instant::now();
    // The third field of /proc/PID/stat is the state: T once stopped.
    while std::fs::read_to_string(&stat)
        .ok()
        .and_then(|s| s.rsplit(") ").next().map(|r| r.starts_with('T')))
        != Some(true)
    {
        assert!(
            start.elapsed() < std::time::Duration::from_secs(10),
            "process {pid} did not stop"
        );
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
}

fn signal(pid: i32, sig: nix::sys::signal::Signal) {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig).unwrap();
}
