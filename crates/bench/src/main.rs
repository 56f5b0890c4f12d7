//! `nestvm-bench`: measures nestvm on this machine and writes BENCHMARKS.md
//! and benchmarks.json at the workspace root. Benchmarks are not tests: they
//! report figures against targets and never fail on a slow machine.
//!
//! 1. Exit path: a tiny guest doing N port writes, each an exit served by
//!    `nestvm run` (bus, vCPU thread, event loop), against the same guest in a
//!    bare loop on nestvm-kvm in this process (`Vcpu::run` with a handler
//!    that does nothing, no bus, no threads).
//! 2. VMM memory overhead: RSS of `nestvm run` (1 vCPU, 128 MiB, guest
//!    halted) minus the guest memory it touched.
//! 3. Time from process start to the guest's first instruction: the guest's
//!    first instructions write a byte to COM1; we time spawn to that byte.
//! 4. In the lab, nestvm side by side with QEMU: virtio-blk and virtio-net
//!    throughput and L2 boot time (see [`lab`]; `NESTVM_BENCH_LAB=0` skips it).

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

mod lab;
mod migrate;
mod saves;
use nestvm_arch::{boot, cpuid, layout, regs};
use nestvm_guests::{hello, io_loop, Ending};
use nestvm_kvm::{ExitHandler, Hypervisor, RunOutcome};
use serde::Serialize;
use vm_memory::GuestMemoryMmap;

const EXITS: u32 = 200_000;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("workspace root")
}

fn scratch() -> PathBuf {
    let d = std::env::temp_dir().join(format!("nestvm-bench-{}", std::process::id()));
    std::fs::create_dir_all(&d).expect("scratch dir");
    d
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).expect("no NaN"));
    v[v.len() / 2]
}

/// Runs `nestvm run` on `kernel` to completion; returns wall seconds.
fn time_nestvm(nestvm: &Path, kernel: &Path) -> Result<f64> {
    let start = Instant::now();
    let out = Command::new(nestvm)
        .args(["run", "--memory", "128M", "--kernel"])
        .arg(kernel)
        .stdin(Stdio::null())
        .output()?;
    let t = start.elapsed().as_secs_f64();
    if !out.status.success() {
        bail!("nestvm failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(t)
}

struct Sink;

impl ExitHandler for Sink {
    fn pio_read(&self, _: u16, data: &mut [u8]) {
        data.fill(0xff);
    }
    fn pio_write(&self, _: u16, _: &[u8]) {}
    fn mmio_read(&self, _: u64, data: &mut [u8]) {
        data.fill(0xff);
    }
    fn mmio_write(&self, _: u64, _: &[u8]) {}
}

/// The same guest on a bare loop: one vCPU on this thread, no bus. Returns
/// the seconds spent in the run loop until the guest's reset write.
fn bare_loop(kernel: &Path) -> Result<f64> {
    let hv = Hypervisor::open()?;
    let mem = GuestMemoryMmap::<()>::from_ranges(&layout::ram_ranges(128 << 20))?;
    let k = boot::load_kernel(&mem, 128 << 20, kernel)?;
    let cr3 = regs::write_boot_tables(&mem)?;
    let vm = hv.create_vm()?;
    vm.map_memory(&mem)?;
    vm.setup_irqchip_and_pit()?;
    let mut vcpu = vm.create_vcpu(0)?;
    let table = cpuid::build(
        &hv.supported_cpuid()?,
        &cpuid::CpuidPolicy {
            topology: cpuid::VcpuTopology { index: 0, count: 1 },
            tsc_khz: None,
            tsc_deadline: false,
            expose_virtualization: false,
        },
    );
    vcpu.set_cpuid(&table)?;
    let mut sregs = vcpu.sregs()?;
    regs::setup_long_mode(&mut sregs, cr3);
    vcpu.set_sregs(&sregs)?;
    vcpu.set_regs(&regs::boot_regs(k.entry))?;
    /// Counts exits until the guest writes the i8042 reset command.
    struct Until<'a>(&'a std::cell::Cell<bool>);
    impl ExitHandler for Until<'_> {
        fn pio_read(&self, p: u16, d: &mut [u8]) {
            Sink.pio_read(p, d)
        }
        fn pio_write(&self, port: u16, data: &[u8]) {
            if port == 0x64 && data == [0xfe] {
                self.0.set(true);
            }
        }
        fn mmio_read(&self, a: u64, d: &mut [u8]) {
            Sink.mmio_read(a, d)
        }
        fn mmio_write(&self, _: u64, _: &[u8]) {}
    }
    let done = std::cell::Cell::new(false);
    let start = Instant::now();
    while !done.get() {
        match vcpu.run(&Until(&done))? {
            RunOutcome::Handled | RunOutcome::Interrupted => {}
            other => bail!("bare loop: unexpected {other:?}"),
        }
        if start.elapsed() > Duration::from_secs(300) {
            bail!("bare loop did not finish");
        }
    }
    Ok(start.elapsed().as_secs_f64())
}

/// RSS and private dirty memory of a process, each without the guest's
/// 128 MiB mapping, in KiB.
fn memory_kib(pid: u32) -> Result<(u64, u64)> {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps"))?;
    let (mut rss, mut dirty) = (0u64, 0u64);
    let mut is_guest = false;
    for line in smaps.lines() {
        let field = |l: &str| {
            l.split_whitespace()
                .nth(1)
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0)
        };
        if line.starts_with("Size:") {
            is_guest = field(line) == 128 * 1024;
        } else if is_guest {
            continue;
        } else if line.starts_with("Rss:") {
            rss += field(line);
        } else if line.starts_with("Private_Dirty:") {
            dirty += field(line);
        }
    }
    Ok((rss, dirty))
}

fn memory_overhead(nestvm: &Path, dir: &Path) -> Result<(f64, f64)> {
    let k = dir.join("halt.elf");
    std::fs::write(&k, hello("up", Ending::HaltForever))?;
    let mut child = Command::new(nestvm)
        .args(["run", "--memory", "128M", "--kernel"])
        .arg(&k)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let mut first = [0u8; 2];
    child
        .stdout
        .as_mut()
        .context("stdout")?
        .read_exact(&mut first)?;
    std::thread::sleep(Duration::from_millis(300));
    let (rss, dirty) = memory_kib(child.id())?;
    let _ = Command::new("kill").arg(child.id().to_string()).status();
    let _ = child.wait();
    Ok((rss as f64 / 1024.0, dirty as f64 / 1024.0))
}

fn first_instruction_ms(nestvm: &Path, dir: &Path, extra: &[&str]) -> Result<f64> {
    let k = dir.join("first.elf");
    std::fs::write(&k, hello("!", Ending::Reset))?;
    let mut samples = vec![];
    for _ in 0..30 {
        let start = Instant::now();
        let mut child = Command::new(nestvm)
            .args(["run", "--memory", "128M"])
            .args(extra)
            .arg("--kernel")
            .arg(&k)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()?;
        let mut b = [0u8; 1];
        child
            .stdout
            .as_mut()
            .context("stdout")?
            .read_exact(&mut b)?;
        samples.push(start.elapsed().as_secs_f64() * 1000.0);
        child.wait()?;
    }
    Ok(median(samples))
}

#[derive(Serialize)]
struct Figure {
    name: String,
    value: f64,
    unit: &'static str,
    target: &'static str,
    met: bool,
    note: String,
}

#[derive(Serialize)]
struct Results {
    date: String,
    machine: String,
    figures: Vec<Figure>,
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_owned())
        })
        .unwrap_or_default();
    let kvm = ["kvm_intel", "kvm_amd", "kvm_pvm"]
        .into_iter()
        .find(|m| Path::new(&format!("/sys/module/{m}")).exists())
        .unwrap_or("none");
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    format!(
        "{cpu}, {cores} cores, Linux {}, KVM module {kvm}",
        kernel.trim()
    )
}

/// The lab comparison as figures: each VMM's medians and nestvm/QEMU.
fn lab_figures(n: &lab::Row, q: &lab::Row) -> Vec<Figure> {
    let runs = format!(
        "lab, L2 under each VMM in one L1, median of {} / {} runs",
        n.runs, q.runs
    );
    side_by_side(
        &[
            ("L2 boot to /init", "s", n.boot_s, q.boot_s, false),
            (
                "virtio-blk sequential write (64 MiB, O_DIRECT, fsync)",
                "MiB/s",
                n.write_mibs,
                q.write_mibs,
                true,
            ),
            (
                "virtio-blk sequential read (64 MiB, O_DIRECT)",
                "MiB/s",
                n.read_mibs,
                q.read_mibs,
                true,
            ),
            (
                "virtio-net TCP download from L1 (32 MiB over HTTP)",
                "MiB/s",
                n.net_mibs,
                q.net_mibs,
                true,
            ),
        ],
        &runs,
    )
}

/// Save, restore and live migration of a nesting L2, nestvm against QEMU.
fn moves_figures(n: &lab::Moves, q: &lab::Moves) -> Vec<Figure> {
    let runs = format!(
        "lab, 256 MiB L2 running its own L3, median of {} / {} runs; QEMU saves by migrating to a file",
        n.runs, q.runs
    );
    side_by_side(
        &[
            ("save of a nesting L2", "s", n.save_s, q.save_s, false),
            (
                "restore of it until running",
                "s",
                n.restore_s,
                q.restore_s,
                false,
            ),
            (
                "live migration over loopback, total as each VMM reports it",
                "s",
                n.mig_s,
                q.mig_s,
                false,
            ),
            (
                "live migration downtime (budget 50 ms)",
                "ms",
                n.downtime_ms,
                q.downtime_ms,
                false,
            ),
        ],
        &runs,
    )
}

/// Each figure for nestvm, for QEMU, and their ratio.
fn side_by_side(rows: &[(&str, &'static str, f64, f64, bool)], runs: &str) -> Vec<Figure> {
    let round = |x: f64| (x * 100.0).round() / 100.0;
    let mut out = vec![];
    for &(name, unit, a, b, higher_better) in rows {
        let runs = runs.to_owned();
        out.push(Figure {
            name: format!("{name}: nestvm"),
            value: round(a),
            unit,
            target: "—",
            met: true,
            note: runs.clone(),
        });
        out.push(Figure {
            name: format!("{name}: QEMU -accel kvm (microvm)"),
            value: round(b),
            unit,
            target: "—",
            met: true,
            note: runs.clone(),
        });
        out.push(Figure {
            name: format!("{name}: nestvm / QEMU"),
            value: round(a / b),
            unit: "ratio",
            target: "—",
            met: true,
            note: if higher_better {
                "higher is better for nestvm".into()
            } else {
                "lower is better for nestvm".into()
            },
        });
    }
    out
}

fn main() -> Result<()> {
    let nestvm = root().join("target/release/nestvm");
    if !nestvm.exists() {
        bail!(
            "{} is missing: run cargo build --release first",
            nestvm.display()
        );
    }
    let dir = scratch();
    // One group alone, for working on it: prints its figures, writes nothing.
    match std::env::var("NESTVM_BENCH_ONLY").as_deref() {
        Ok("migration") => {
            let (idle, busy) = migrate::run(&nestvm, &dir, 3)?;
            println!("idle: {idle:?}\nbusy: {busy:?}");
            return Ok(());
        }
        Ok("saves") => {
            println!("{:?}", saves::measure(&nestvm, &dir, 5)?);
            return Ok(());
        }
        _ => {}
    }
    eprintln!("[bench] exit path: {EXITS} port writes through nestvm run, and on a bare loop");
    let loop_k = dir.join("loop.elf");
    std::fs::write(&loop_k, io_loop(0x80, EXITS, "", Ending::Reset))?;
    let empty_k = dir.join("empty.elf");
    std::fs::write(&empty_k, io_loop(0x80, 1, "", Ending::Reset))?;
    let runs = 5;
    let with = median(
        (0..runs)
            .map(|_| time_nestvm(&nestvm, &loop_k))
            .collect::<Result<_>>()?,
    );
    let without = median(
        (0..runs)
            .map(|_| time_nestvm(&nestvm, &empty_k))
            .collect::<Result<_>>()?,
    );
    let nestvm_rate = f64::from(EXITS) / (with - without).max(1e-9);
    let bare = median(
        (0..runs)
            .map(|_| bare_loop(&loop_k))
            .collect::<Result<_>>()?,
    );
    let bare_rate = f64::from(EXITS) / bare;
    let ratio = nestvm_rate / bare_rate;

    eprintln!("[bench] VMM memory overhead");
    let samples: Vec<(f64, f64)> = (0..5)
        .map(|_| memory_overhead(&nestvm, &dir))
        .collect::<Result<_>>()?;
    let overhead = median(samples.iter().map(|s| s.0).collect());
    let private = median(samples.iter().map(|s| s.1).collect());
    eprintln!("[bench] time to the guest's first instruction (30 runs)");
    let first = first_instruction_ms(&nestvm, &dir, &["--nested", "off"])?;
    let first_auto = first_instruction_ms(&nestvm, &dir, &[])?;
    let host_can_nest = Command::new(&nestvm)
        .args(["host", "check"])
        .stdout(Stdio::null())
        .status()?
        .success();

    eprintln!("[bench] save, resume and checkpoint of a 1 GiB VM (5 rounds)");
    let sv = saves::measure(&nestvm, &dir, 5)?;
    eprintln!("[bench] live migration of a 1 GiB VM over loopback, idle and busy (5 each)");
    let (idle, busy) = migrate::run(&nestvm, &dir, 5)?;
    let lab = if std::env::var("NESTVM_BENCH_LAB").as_deref() == Ok("0") {
        eprintln!("[bench] NESTVM_BENCH_LAB=0: skipping the lab comparison with QEMU");
        None
    } else {
        eprintln!("[bench] the lab: nestvm and QEMU side by side in one L1 (several minutes)");
        Some(lab::run()?)
    };

    let mut figures = vec![
        Figure {
            name: "port-I/O exits/s through nestvm's bus".into(),
            value: nestvm_rate.round(),
            unit: "exits/s",
            target: "—",
            met: true,
            note: format!("median of {runs} runs of {EXITS} exits, start-up subtracted"),
        },
        Figure {
            name: "port-I/O exits/s on a bare loop".into(),
            value: bare_rate.round(),
            unit: "exits/s",
            target: "—",
            met: true,
            note: "nestvm-kvm Vcpu::run, no-op handler, same thread".into(),
        },
        Figure {
            name: "exit path: nestvm / bare".into(),
            value: (ratio * 1000.0).round() / 1000.0,
            unit: "ratio",
            target: ">= 0.9",
            met: ratio >= 0.9,
            note: String::new(),
        },
        Figure {
            name: "VMM memory overhead (RSS minus guest memory touched)".into(),
            value: (overhead * 100.0).round() / 100.0,
            unit: "MiB",
            target: "<= 3 MiB",
            met: overhead <= 3.0,
            note: "1 vCPU, 128 MiB, guest halted; median of 5; includes shared text of nestvm and glibc".into(),
        },
        Figure {
            name: "VMM private dirty memory (the same, without shared text)".into(),
            value: (private * 100.0).round() / 100.0,
            unit: "MiB",
            target: "—",
            met: true,
            note: "what each further VMM process really adds".into(),
        },
        Figure {
            name: "process start to guest's first instruction".into(),
            value: (first * 100.0).round() / 100.0,
            unit: "ms",
            target: "<= 10 ms",
            met: first <= 10.0,
            note: "--nested off; spawn to the first COM1 byte; median of 30".into(),
        },
        Figure {
            name: "the same with the default --nested auto".into(),
            value: (first_auto * 100.0).round() / 100.0,
            unit: "ms",
            target: "—",
            met: true,
            note: if host_can_nest {
                "this host can nest: auto only checks KVM's CPUID".into()
            } else {
                "this host cannot nest: auto also probes the host to say why, once".into()
            },
        },
    ];
    let note =
        "1 GiB managed VM, tiny ticker guest (memory mostly untouched), median of 5".to_owned();
    for (name, value, target, met) in [
        (
            "vm save (pause, write state and memory, stop)",
            sv.save_ms,
            "—",
            true,
        ),
        (
            "vm start of a Saved VM (until its API answers)",
            sv.resume_ms,
            "—",
            true,
        ),
        (
            "vm start of a Saved VM to its next guest instruction",
            sv.first_instruction_ms,
            "<= 5 ms",
            sv.first_instruction_ms <= 5.0,
        ),
        (
            "vm checkpoint of a running VM (first: a root)",
            sv.checkpoint_ms,
            "—",
            true,
        ),
    ] {
        figures.push(Figure {
            name: name.into(),
            value: (value * 100.0).round() / 100.0,
            unit: "ms",
            target,
            met,
            note: note.clone(),
        });
    }
    for (kind, m) in [("idle", idle), ("busy", busy)] {
        let note = format!(
            "1 GiB VM, {} guest, two nestvm over loopback; {} rounds, {:.0} MiB sent; median of 5",
            kind, m.rounds, m.sent_mib
        );
        figures.push(Figure {
            name: format!("live migration total time, {kind} guest"),
            value: m.total_ms.round(),
            unit: "ms",
            target: "—",
            met: true,
            note: note.clone(),
        });
        figures.push(Figure {
            name: format!("live migration downtime, {kind} guest"),
            value: (m.downtime_ms * 10.0).round() / 10.0,
            unit: "ms",
            target: "<= 50 ms",
            met: m.downtime_ms <= 50.0,
            note,
        });
    }
    if let Some(l) = &lab {
        figures.extend(lab_figures(&l.nestvm, &l.qemu));
        if let Some((n, q)) = &l.moves {
            figures.extend(moves_figures(n, q));
        }
    }
    let date = String::from_utf8(
        Command::new("date")
            .args(["-u", "+%Y-%m-%d %H:%M UTC"])
            .output()?
            .stdout,
    )?
    .trim()
    .to_owned();
    let results = Results {
        date,
        machine: machine(),
        figures,
    };
    let json = serde_json::to_string_pretty(&results)?;
    let mut md = format!(
        "# nestvm benchmarks\n\nMeasured {} on: {}.\nProduced by `./scripts/bench.sh` (figures, not tests).\n\n| figure | value | unit | target | met |\n|---|---|---|---|---|\n",
        results.date, results.machine
    );
    for f in &results.figures {
        md.push_str(&format!(
            "| {}{} | {} | {} | {} | {} |\n",
            f.name,
            if f.note.is_empty() {
                String::new()
            } else {
                format!(" ({})", f.note)
            },
            f.value,
            f.unit,
            f.target,
            if f.target == "—" {
                ""
            } else if f.met {
                "yes"
            } else {
                "no"
            }
        ));
    }
    if lab.is_some() {
        md.push_str("\nThe lab figures come from one L1 (QEMU TCG emulating an AMD-V host) running the same L2 kernel, initramfs, raw disk image and bridged TAP under nestvm and under QEMU `-accel kvm` (microvm, virtio-mmio, no vhost), alternating; TCG bounds the absolute numbers, the ratios compare the VMMs.\n");
    }
    md.push_str("\nOn this machine KVM is PVM: guest CPL0 code (all of these tiny guests) is instruction-emulated, so exit rates are far below what VT-x/AMD-V hosts reach; the ratio is what compares.\n");
    for (name, text) in [("benchmarks.json", json + "\n"), ("BENCHMARKS.md", md)] {
        let path = root().join(name);
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, &text)?;
        std::fs::rename(&tmp, &path)?;
    }
    print!("{}", std::fs::read_to_string(root().join("BENCHMARKS.md"))?);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
