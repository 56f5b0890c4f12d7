//! Lab tests: nestvm on an emulated AMD-V host (QEMU TCG), with real Debian
//! kernels. They take minutes, so `cargo test` lists them as ignored; the
//! README's test command (scripts/test.sh) runs them with `--ignored`, which
//! is how CI runs them. They need the release build of nestvm.

use std::time::Duration;

use nestvm_lab::{debian, host, image, scenario, workspace_root};

fn l1_image() -> image::L1Image {
    host::ensure_packages().expect("install the lab's Debian packages");
    let kernel = debian::kernel().expect("fetch the Debian kernel");
    let nestvm = std::env::var_os("NESTVM_BIN")
        .map(Into::into)
        .unwrap_or_else(|| workspace_root().join("target/release/nestvm"));
    image::build(&kernel, &nestvm).expect("build the L1 image")
}

/// The Debian system `nestvm image debian` builds (with busybox, for the
/// scenario's HTTP server and client), built once and cached.
fn debian_image(nestvm: &std::path::Path) -> std::path::PathBuf {
    let dir = nestvm_lab::cache_dir().join("images");
    let out = dir.join("debian-bookworm.img");
    if out.exists() {
        return out;
    }
    std::fs::create_dir_all(&dir).unwrap();
    let status = std::process::Command::new(nestvm)
        .args(["image", "debian"])
        .arg(&out)
        .args(["--packages", "busybox", "--size", "2G"])
        .status()
        .expect("run nestvm image debian");
    assert!(status.success(), "nestvm image debian failed");
    out
}

#[test]
#[ignore = "lab: boots QEMU TCG for minutes; run by scripts/test.sh (cargo test -p nestvm-lab -- --ignored)"]
fn the_reference_workflow_from_l1s_shell() {
    let img = l1_image();
    let nestvm = workspace_root().join("target/release/nestvm");
    let disk = debian_image(&nestvm);
    let beside = |suffix: &str| {
        let mut p = disk.clone().into_os_string();
        p.push(suffix);
        std::fs::read(p).expect("the image's kernel and initrd")
    };
    let mut sc = scenario::Scenario::new(
        "workflow",
        include_str!("../scenarios/workflow.sh"),
        Duration::from_secs(1800),
    );
    sc.memory_mib = 4096;
    sc.drive = Some(disk.clone());
    sc.files = vec![
        ("lab/debian.img.vmlinuz".into(), beside(".vmlinuz")),
        ("lab/debian.img.initrd".into(), beside(".initrd")),
        (
            "lab/nonce".into(),
            format!("{:x}", std::process::id() ^ 0xf10).into_bytes(),
        ),
    ];
    let report = scenario::run(&img, &sc).expect("run the scenario");
    report.assert_passed(&[
        "wf-l1-has-the-image",
        "wf-vm-new",
        "wf-enable-nested",
        "wf-nested-on",
        "wf-vm-start",
        "wf-vmm-runs-as-the-user",
        "wf-agent-answers",
        "wf-status-says-agent-answers",
        "wf-guest-sees-svm",
        "wf-cp-nestvm-in",
        "wf-cp-guest-in",
        "wf-guest-has-kvm",
        "wf-nested-vm-marker",
        "wf-nested-vm-exit-code",
        "wf-cp-in",
        "wf-cp-in-intact",
        "wf-cp-out",
        "wf-cp-out-intact",
        "wf-guest-fetches-from-l1",
        "wf-l1-reaches-guest-by-port-forward",
        "wf-guest-powered-off",
        "wf-vm-off",
    ]);
}

#[test]
#[ignore = "lab: boots QEMU TCG for minutes; run by scripts/test.sh (cargo test -p nestvm-lab -- --ignored)"]
fn core_boots_debian_as_l2() {
    let img = l1_image();
    let sc = scenario::Scenario::new(
        "core",
        include_str!("../scenarios/core.sh"),
        Duration::from_secs(900),
    );
    let report = scenario::run(&img, &sc).expect("run the scenario");
    report.assert_passed(&[
        "l1-has-svm",
        "l1-has-kvm",
        "smp-exit-0",
        "smp-init-reached",
        "smp-nproc-2",
        "smp-memtotal-512m",
        "smp-hypervisor-bit",
        "smp-acpi-poweroff",
        "big-exit-0",
        "big-nproc-1",
        "big-memtotal-5g",
        "cfg-exit-0",
        "cfg-flag-overrides-file",
        "cfg-memtotal-256m",
        "shell-exit-0",
        "shell-input-reached-guest",
        "shell-ended",
    ]);
}

#[test]
#[ignore = "lab: boots QEMU TCG for minutes; run by scripts/test.sh (cargo test -p nestvm-lab -- --ignored)"]
fn nested_guests_three_levels_deep() {
    let img = l1_image();
    let sc = scenario::Scenario::new(
        "nested",
        include_str!("../scenarios/nested.sh"),
        Duration::from_secs(1500),
    );
    let report = scenario::run(&img, &sc).expect("run the scenario");
    report.assert_passed(&[
        "l1-host-check-yes",
        "l1-host-check-json",
        // L2 with nesting on, a tiny L3 inside it.
        "l2-sees-svm",
        "l2-kvm-amd-loaded",
        "l2-host-check-yes",
        "l2-runs-tiny-l3",
        "l3-tiny-printed",
        "l2on-exit-0",
        "l2on-kvm-amd-loaded",
        // L2 with nesting off.
        "l2off-no-svm",
        "l2off-no-kvm-device",
        "l2off-nestvm-exit-1",
        "l2off-nestvm-says-why",
        "l2off-nestvm-names-cause",
        "l2off-exit-0",
        "l2off-kvm-amd-refused",
        // vCPU state with nested state, read and written back while L3 runs.
        "l2-ticker-l3-exit-0",
        "l3-ticker-finished",
        "rt-exit-0",
        "rt-six-round-trips",
        "rt-no-failure",
        "rt-saved-svm-nested-state",
        "rt-one-in-guest-mode",
        "rt-l3-kept-running",
        "rt-l3-all-ticks",
        // Debian's kernel as L3.
        "l2-runs-linux-l3",
        "l3-linux-init-reached",
        "l3linux-l2-exit-0",
    ]);
}

#[test]
#[ignore = "lab: boots QEMU TCG for minutes; run by scripts/test.sh (cargo test -p nestvm-lab -- --ignored)"]
fn enable_nested_fixes_a_host_loaded_with_nested_0() {
    let img = l1_image();
    let mut sc = scenario::Scenario::new(
        "enable",
        include_str!("../scenarios/enable.sh"),
        Duration::from_secs(900),
    );
    sc.l1_nested = false;
    let report = scenario::run(&img, &sc).expect("run the scenario");
    report.assert_passed(&[
        "en-starts-nested-0",
        "en-check-says-no",
        "en-check-exit-1",
        "en-check-names-cause",
        "en-check-gives-fix",
        "en-nested-on-refused",
        "en-nested-on-says-why",
        "en-dry-run-lists-line",
        "en-dry-run-changes-nothing",
        "en-busy-refused",
        "en-busy-says-in-use",
        "en-busy-vm-runs",
        "en-busy-kvm-still-loaded",
        "en-busy-vm-outlived-it",
        "en-applied",
        "en-now-nested-1",
        "en-file-written",
        "en-check-now-yes",
        "en-second-run-changes-nothing",
        "en-vm-after-exit-0",
        "en-vm-after-sees-svm",
    ]);
}

#[test]
#[ignore = "lab: boots QEMU TCG for minutes; run by scripts/test.sh (cargo test -p nestvm-lab -- --ignored)"]
fn managed_vms_with_a_linux_guest() {
    let img = l1_image();
    let sc = scenario::Scenario::new(
        "manage",
        include_str!("../scenarios/manage.sh"),
        Duration::from_secs(1200),
    );
    let report = scenario::run(&img, &sc).expect("run the scenario");
    report.assert_passed(&[
        "mg-start",
        "mg-list-running",
        "mg-shell-ready",
        "mg-console-input-reached-guest",
        "mg-console-detached",
        "mg-running-after-detach",
        "mg-reattach-shows-earlier-output",
        "mg-reattach-new-output",
        "mg-paused",
        "mg-resumed",
        "mg-off-after-guest-poweroff",
        "mg-log-says-poweroff",
        "mg-acpid-ready",
        "mg-stop-graceful",
        "mg-guest-saw-power-button",
        "mg-off-after-stop",
        "mg-e-ran-and-powered-off",
        "mg-e-ran-without-svm",
        "mg-status-says-not-exposed",
        "mg-e-ran-again",
        "mg-e-sees-svm-after-enable",
        "mg-status-e-can-host-vms",
        "mg-b-acpid-ready-again",
        "mg-enable-stopped-running-vm",
        "mg-enable-applied",
        "mg-all-removed",
    ]);
}

#[test]
#[ignore = "lab: boots QEMU TCG for minutes; run by scripts/test.sh (cargo test -p nestvm-lab -- --ignored)"]
fn virtio_disk_and_network_with_mac_spoofing_policy() {
    let img = l1_image();
    let nonce = format!("{:x}", std::process::id() ^ 0x5eed);
    let host_file = format!("written on the host {nonce}\n");
    let disk = image::ext2_image(
        "devices-disk",
        16,
        &[("from-host.txt", host_file.as_bytes())],
    )
    .expect("make the ext2 disk image (e2fsprogs)");
    let mut sc = scenario::Scenario::new(
        "devices",
        include_str!("../scenarios/devices.sh"),
        Duration::from_secs(1500),
    );
    sc.files = vec![
        ("lab/disk.img".into(), disk),
        ("lab/nonce".into(), nonce.into_bytes()),
    ];
    let report = scenario::run(&img, &sc).expect("run the scenario");
    report.assert_passed(&[
        "dev-tap-created",
        "l2dev-first-has-disk",
        "l2dev-first-has-nic",
        "l2dev-reads-host-file",
        "l2dev-umount",
        "l2dev-first-ping",
        "dev-down-10mib-intact",
        "dev-down-10mib-size",
        "dev-up-10mib-intact",
        "dev-own-frames-arrive",
        "dev-spoof-off-frames-never-arrive",
        "l2dev-first-level-above-checked",
        "dev-poweroff-exit-0",
        "dev-spoofed-frames-counted",
        "dev-image-has-l2-file",
        "l2dev-second-has-disk",
        "l2dev-ro-device",
        "l2dev-file-persisted",
        "l2dev-ro-write-refused",
        "l2dev-second-ping",
        "dev-spoof-on-frames-arrive",
        "l2dev-second-level-above-checked",
        "dev2-exit-0",
        "dev2-nothing-dropped",
        "l2vs-driver-bound",
        "l2vs-served-host-client",
        "l2vs-guest-to-host",
        "vs-host-gets-ok",
        "vs-host-to-guest",
        "vs-exit-0",
        "vs-host-served-guest",
        "ga-agent-answers",
        "ga-status-says-agent-answers",
        "ga-exec-stdout",
        "ga-exec-stderr",
        "ga-exec-exit-code",
        "ga-cp-in",
        "ga-cp-in-intact",
        "ga-cp-out",
        "ga-cp-out-intact",
        "un-dhcp-lease",
        "un-fetch-from-l1",
        "un-fetched-intact",
        "un-port-forward-reaches-guest",
        "ga-no-agent-says-how",
    ]);
}

#[test]
#[ignore = "lab: boots QEMU TCG for minutes; run by scripts/test.sh (cargo test -p nestvm-lab -- --ignored)"]
fn save_and_resume_a_vm_that_runs_its_own_vm() {
    let img = l1_image();
    let sc = scenario::Scenario::new(
        "snapshots",
        include_str!("../scenarios/snapshots.sh"),
        Duration::from_secs(1500),
    );
    let report = scenario::run(&img, &sc).expect("run the scenario");
    let mut expected: Vec<String> = vec!["sr-l3-started".into()];
    for c in 1..=3 {
        for name in [
            "sr-save-{}-ok",
            "sr-state-saved-{}",
            "sr-saved-mid-run-{}",
            "sr-nothing-runs-while-saved-{}",
            "sr-resumed-{}",
        ] {
            expected.push(name.replace("{}", &c.to_string()));
        }
    }
    for name in [
        "sr-saved-in-guest-mode",
        "ck-taken",
        "ck-l3-went-on",
        "ck-restored",
        "ck-l3-back-then-on",
        "sr-l3-continues",
        "l2-long-ticker-exit-0",
        "sr-l2-powered-off",
        "sr-l3-all-ticks-in-one-run",
        "sr-l2-ended-cleanly",
        "ck-vmgenid-driver-bound",
        "ck-vmgenid-changed",
    ] {
        expected.push(name.into());
    }
    let expected: Vec<&str> = expected.iter().map(String::as_str).collect();
    report.assert_passed(&expected);
}

#[test]
#[ignore = "lab: boots QEMU TCG for minutes; run by scripts/test.sh (cargo test -p nestvm-lab -- --ignored)"]
fn live_migrate_a_vm_that_runs_its_own_vm() {
    let img = l1_image();
    let sc = scenario::Scenario::new(
        "migration",
        include_str!("../scenarios/migration.sh"),
        Duration::from_secs(1500),
    );
    let report = scenario::run(&img, &sc).expect("run the scenario");
    report.assert_passed(&[
        "mg-l3-started",
        "mg-l3-ticking",
        "mg-receiver-listens",
        "mg-copy-started",
        "mg-copy-under-way",
        "mg-receiver-frozen",
        "mg-killed-mid-copy",
        "mg-killed-receiver-fails-migration",
        "mg-source-says-it-keeps-running",
        "mg-source-still-running",
        "mg-source-still-ticking",
        "mg-nothing-left-at-destination",
        "mg-receiver-listens-again",
        "mg-migrated",
        "mg-received",
        "mg-source-ended",
        "mg-source-log-says-migrated",
        "mg-destination-runs",
        "mg-l3-went-on-there",
        "mg-l3-continues-to-the-end",
        "l2-long-ticker-exit-0",
        "mg-l2-powered-off-there",
        "mg-l3-all-ticks-in-one-run",
        "mg-vmgenid-kept",
    ]);
}

#[test]
#[ignore = "lab: boots QEMU TCG for minutes; run by scripts/test.sh (cargo test -p nestvm-lab -- --ignored)"]
fn resize_the_memory_of_a_vm_that_runs_its_own_vm() {
    let img = l1_image();
    let sc = scenario::Scenario::new(
        "memory",
        include_str!("../scenarios/memory.sh"),
        Duration::from_secs(1500),
    );
    let report = scenario::run(&img, &sc).expect("run the scenario");
    report.assert_passed(&[
        "bl-l3-started",
        "bl-guest-reports-statistics",
        "bl-shrunk",
        "bl-guest-sees-less",
        "bl-guest-touched-its-memory",
        "bl-host-got-memory-back",
        "bl-l3-ticks-while-small",
        "bl-grown",
        "bl-guest-sees-more",
        "bl-l3-ticks-after-growing",
        "bl-below-min-refused",
        "bl-auto-follows-demand",
        "bl-auto-flag",
        "bl-saved",
        "bl-balloon-resumed",
        "bl-l3-ticks-after-resume",
        "bl-l3-continues-to-the-end",
        "l2-long-ticker-exit-0",
        "bl-l2-powered-off",
        "bl-l3-all-ticks-in-one-run",
    ]);
}
