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
