//! `nestvm run` with tiny purpose-built guests on this machine's /dev/kvm:
//! the boot path, serial output, the ways a guest ends, signals, and the
//! terminal's restoration.

mod common;

use std::os::fd::AsRawFd;
use std::time::Duration;

use common::{guest, kvm_or_skip, nestvm, run_with_timeout};
use nestvm_guests::{hello, io_loop, Ending};

const T: Duration = Duration::from_secs(60);

/// Runs `nestvm run` on a tiny guest image with 16 MiB.
fn run_tiny(file: &str, image: Vec<u8>) -> std::process::Output {
    let k = guest(file, image);
    run_with_timeout(
        nestvm()
            .args(["run", "--memory", "16M", "--kernel"])
            .arg(&k),
        T,
    )
}

/// Asserts the exit code, showing stderr when it is not the one expected.
fn assert_exit(out: &std::process::Output, code: i32) {
    assert_eq!(
        out.status.code(),
        Some(code),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn serial_output_reaches_stdout_and_reset_exits_zero() {
    if !kvm_or_skip("serial_output_reaches_stdout_and_reset_exits_zero") {
        return;
    }
    let out = run_tiny("hello.elf", hello("Hello from a tiny guest", Ending::Reset));
    assert_exit(&out, 0);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "Hello from a tiny guest"
    );
}

#[test]
fn acpi_power_off_exits_zero() {
    if !kvm_or_skip("acpi_power_off_exits_zero") {
        return;
    }
    let out = run_tiny("off.elf", hello("bye", Ending::PowerOff));
    assert_exit(&out, 0);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "bye");
}

#[test]
fn triple_fault_exits_one_with_registers() {
    if !kvm_or_skip("triple_fault_exits_one_with_registers") {
        return;
    }
    let out = run_tiny("tf.elf", hello("about to fault", Ending::TripleFault));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "stderr: {err}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "about to fault");
    assert!(err.contains("triple-faulted"), "{err}");
    assert!(
        err.contains("rip=0x") && err.contains("cr3=0x9000"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn smp_memory_above_4g_and_config_file() {
    if !kvm_or_skip("smp_memory_above_4g_and_config_file") {
        return;
    }
    let k = guest("cfg.elf", hello("configured", Ending::Reset));
    let cfg = common::scratch("cfg").join("vm.toml");
    std::fs::write(
        &cfg,
        format!("kernel = {:?}\ncpus = 2\nmemory = \"1G\"\n", k),
    )
    .unwrap();
    // Flags override the file: 6 GiB puts RAM above the 32-bit hole.
    let out = run_with_timeout(
        nestvm()
            .args(["run", "--memory", "6G", "--config"])
            .arg(&cfg),
        T,
    );
    assert_eq!(
        out.status.code(),
        Some(0),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "configured");
}

#[test]
fn port_io_exits_go_through_the_bus() {
    if !kvm_or_skip("port_io_exits_go_through_the_bus") {
        return;
    }
    let out = run_tiny("loop.elf", io_loop(0x80, 2000, "looped", Ending::Reset));
    assert_exit(&out, 0);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "looped");
}

#[test]
fn sigterm_stops_a_halted_guest() {
    if !kvm_or_skip("sigterm_stops_a_halted_guest") {
        return;
    }
    let k = guest("halt.elf", hello("halting", Ending::HaltForever));
    let mut child = nestvm()
        .args(["run", "--memory", "16M", "--kernel"])
        .arg(&k)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // The guest has printed everything and halted: only then is it signalled.
    let mut said = [0u8; 7];
    std::io::Read::read_exact(child.stdout.as_mut().unwrap(), &mut said).unwrap();
    assert_eq!(&said, b"halting");
    assert!(
        child.try_wait().unwrap().is_none(),
        "a halted guest keeps nestvm running"
    );
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let start = std::time::Instant::now();
    let out = loop {
        if child.try_wait().unwrap().is_some() {
            break child.wait_with_output().unwrap();
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "SIGTERM did not stop nestvm"
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    assert_eq!(out.status.code(), Some(128 + 15));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "",
        "nothing after halting"
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("signal 15"));
}

/// With a terminal on stdin, nestvm puts it in raw mode and restores it on
/// every exit path: a guest reset, a crash, and a signal.
#[test]
fn terminal_is_restored_on_every_exit_path() {
    if !kvm_or_skip("terminal_is_restored_on_every_exit_path") {
        return;
    }
    use nix::sys::termios::{tcgetattr, LocalFlags};
    let cases = [
        ("reset", hello("r", Ending::Reset), None, Some(0)),
        ("crash", hello("c", Ending::TripleFault), None, Some(1)),
        (
            "signal",
            hello("s", Ending::HaltForever),
            Some(nix::sys::signal::Signal::SIGINT),
            Some(130),
        ),
    ];
    for (name, image, signal, code) in cases {
        let pty = nix::pty::openpty(None, None).unwrap();
        let before = tcgetattr(&pty.slave).unwrap();
        assert!(before.local_flags.contains(LocalFlags::ICANON));
        let k = guest(&format!("tty-{name}.elf"), image);
        let slave = std::fs::File::from(pty.slave.try_clone().unwrap());
        let mut child = nestvm()
            .args(["run", "--memory", "16M", "--kernel"])
            .arg(&k)
            .stdin(slave)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        if let Some(sig) = signal {
            // Wait until nestvm has the terminal in raw mode, then signal it.
            let start = std::time::Instant::now();
            while tcgetattr(&pty.slave)
                .unwrap()
                .local_flags
                .contains(LocalFlags::ICANON)
            {
                assert!(
                    start.elapsed() < Duration::from_secs(10),
                    "{name}: never entered raw mode"
                );
                std::thread::sleep(Duration::from_millis(10));
            }
            nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), sig).unwrap();
        }
        let start = std::time::Instant::now();
        while child.try_wait().unwrap().is_none() {
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "{name}: nestvm did not exit"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        let out = child.wait_with_output().unwrap();
        assert_eq!(
            out.status.code(),
            code,
            "{name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let after = tcgetattr(&pty.slave).unwrap();
        assert_eq!(
            after.local_flags, before.local_flags,
            "{name}: local flags restored"
        );
        assert_eq!(
            after.input_flags, before.input_flags,
            "{name}: input flags restored"
        );
        let _ = pty.master.as_raw_fd();
    }
}

#[test]
fn disks_and_a_network_adapter_are_attached() {
    if !kvm_or_skip("disks_and_a_network_adapter_are_attached") {
        return;
    }
    let dir = common::scratch("virtio");
    let rw = dir.join("rw.img");
    let ro = dir.join("ro.img");
    std::fs::write(&rw, vec![0u8; 1 << 20]).unwrap();
    std::fs::write(&ro, vec![0u8; 4096]).unwrap();
    let k = guest("virtio.elf", hello("devices", Ending::Reset));
    // A TAP can be created as root; otherwise the disks alone.
    let tap = format!("nvit{}", std::process::id() % 100_000);
    let as_root = nix_is_root();
    let mut cmd = nestvm();
    cmd.args(["run", "--memory", "16M", "--kernel"])
        .arg(&k)
        .arg("--disk")
        .arg(format!("path={}", rw.display()))
        .arg("--disk")
        .arg(format!("path={},readonly=on", ro.display()));
    if as_root {
        cmd.args(["--net", &format!("tap={tap},mac_spoofing=on")]);
    }
    // A user-mode adapter needs no root: passt starts with the VM.
    cmd.args(["--net", "user,hostfwd=tcp:0-:22"]);
    let out = run_with_timeout(&mut cmd, T);
    assert_exit(&out, 2);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("invalid --net 'user,hostfwd=tcp:0-:22'"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let args: Vec<_> = cmd.get_args().map(|a| a.to_owned()).collect();
    let mut cmd = nestvm();
    cmd.args(&args[..args.len() - 1]).arg("user");
    let out = run_with_timeout(&mut cmd, T);
    assert_exit(&out, 0);
    let err = String::from_utf8_lossy(&out.stderr);
    let user = if as_root { "user1" } else { "user0" };
    assert!(err.contains(&format!("net {user} (passt)")), "{err}");
    assert!(err.contains("stream_bad_length=0"), "{err}");
    // passt ended with the VMM's end of its socket (it is a zombie of the
    // ended VMM at most, never still serving).
    let pid: u32 = err
        .split(&format!("{user}: passt "))
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .and_then(|p| p.parse().ok())
        .expect("passt's pid in the log");
    // passt sees the end of its socket when the VMM has exited: it is
    // given a bound to notice, never a sleep.
    let serving = || {
        std::fs::read_to_string(format!("/proc/{pid}/cmdline"))
            .unwrap_or_default()
            .contains("passt")
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while serving() {
        assert!(
            std::time::Instant::now() < deadline,
            "passt {pid} still runs after its VM ended"
        );
        std::thread::yield_now();
    }
    // The guest never drives them, but each device was built, wired to KVM
    // (irqfd, ioeventfds) and reports its counters at the end.
    assert!(
        err.contains(&format!("block {}: errors=0", rw.display())),
        "{err}"
    );
    assert!(
        err.contains(&format!("block {} (read-only)", ro.display())),
        "{err}"
    );
    if as_root {
        assert!(err.contains(&format!("net {tap} mac 52:56:")), "{err}");
        assert!(err.contains("mac_spoofing on"), "{err}");
    }
}

fn nix_is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .map(|s| {
            s.lines()
                .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false)
}
