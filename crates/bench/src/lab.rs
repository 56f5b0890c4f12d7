//! Side by side with QEMU in the lab: one L1 (QEMU TCG with AMD-V) runs the
//! same L2 kernel, initramfs, disk image and bridged TAP under nestvm and
//! under QEMU `-accel kvm` (microvm, whose virtio-mmio devices are declared
//! in ACPI like nestvm's), alternating, and L2 measures sequential disk
//! write and read, a TCP download, and L1 times boot to L2's /init
//! (`crates/lab/scenarios/bench.sh`, `crates/lab/scripts/l2-bench.sh`).
//! Then L2, running its own L3, is saved, restored and live-migrated over
//! loopback by each VMM ([`Moves`]).
//! Absolute figures are bound by TCG; the ratios are what compare.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use nestvm_lab::{debian, host, image, scenario, workspace_root};

/// Medians of one VMM's runs.
#[derive(Debug, Default, Clone)]
pub struct Row {
    /// Runs that completed.
    pub runs: usize,
    /// VMM start to L2's /init, seconds.
    pub boot_s: f64,
    /// Sequential write, MiB/s.
    pub write_mibs: f64,
    /// Sequential read, MiB/s.
    pub read_mibs: f64,
    /// TCP download, MiB/s.
    pub net_mibs: f64,
}

/// Medians of one VMM's save, restore and migration of a nesting L2.
#[derive(Debug, Default, Clone)]
pub struct Moves {
    /// Runs that completed.
    pub runs: usize,
    /// Save (pause, write state and memory, stop), seconds.
    pub save_s: f64,
    /// Restore until running, seconds.
    pub restore_s: f64,
    /// Live migration, whole, seconds.
    pub mig_s: f64,
    /// Its downtime as the VMM reports it, ms.
    pub downtime_ms: f64,
}

/// The `LAB-BENCH vmm=NAME` lines with `key`, as medians per VMM and field.
fn medians(log: &str, key: &str) -> BTreeMap<String, (usize, BTreeMap<String, f64>)> {
    let mut samples: BTreeMap<String, BTreeMap<String, Vec<f64>>> = BTreeMap::new();
    for line in log.lines() {
        let Some(rest) = line.split("LAB-BENCH ").nth(1) else {
            continue;
        };
        let kv: BTreeMap<&str, &str> = rest
            .split_whitespace()
            .filter_map(|w| w.split_once('='))
            .collect();
        let (Some(vmm), true) = (kv.get("vmm"), kv.get(key).is_some_and(|v| !v.is_empty())) else {
            continue; // an incomplete run, or another part's line
        };
        let entry = samples.entry(vmm.to_string()).or_default();
        for (k, v) in &kv {
            if let Ok(x) = v.parse::<f64>() {
                entry.entry(k.to_string()).or_default().push(x);
            }
        }
    }
    samples
        .into_iter()
        .map(|(vmm, m)| {
            let runs = m.get(key).map_or(0, Vec::len);
            let meds = m.into_iter().map(|(k, v)| (k, median(v))).collect();
            (vmm, (runs, meds))
        })
        .collect()
}

/// Parses the save/restore/migration lines into one row per VMM.
pub fn parse_moves(log: &str) -> BTreeMap<String, Moves> {
    medians(log, "downtime_ms")
        .into_iter()
        .map(|(vmm, (runs, m))| {
            let get = |k: &str| m.get(k).copied().unwrap_or(f64::NAN);
            let row = Moves {
                runs,
                save_s: get("save_s"),
                restore_s: get("restore_s"),
                mig_s: get("mig_s"),
                downtime_ms: get("downtime_ms"),
            };
            (vmm, row)
        })
        .collect()
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Parses the scenario's I/O `LAB-BENCH key=value...` lines into one row per VMM.
pub fn parse(log: &str) -> BTreeMap<String, Row> {
    medians(log, "net_mibs")
        .into_iter()
        .map(|(vmm, (runs, m))| {
            let get = |k: &str| m.get(k).copied().unwrap_or(f64::NAN);
            let row = Row {
                runs,
                boot_s: get("boot_s"),
                write_mibs: get("write_mibs"),
                read_mibs: get("read_mibs"),
                net_mibs: get("net_mibs"),
            };
            (vmm, row)
        })
        .collect()
}

/// What the bench scenario measured.
pub struct LabFigures {
    /// nestvm's I/O and boot.
    pub nestvm: Row,
    /// QEMU's.
    pub qemu: Row,
    /// nestvm's and QEMU's save, restore and migration, when both completed.
    pub moves: Option<(Moves, Moves)>,
}

/// Runs the bench scenario.
pub fn run() -> Result<LabFigures> {
    host::ensure_packages().context("install the lab's Debian packages")?;
    let kernel = debian::kernel().context("fetch the Debian kernel")?;
    let nestvm = workspace_root().join("target/release/nestvm");
    let img = image::build(&kernel, &nestvm).context("build the L1 image")?;
    let mut sc = scenario::Scenario::new(
        "bench",
        include_str!("../../lab/scenarios/bench.sh"),
        Duration::from_secs(2400),
    );
    sc.files = host::qemu_files().context("collect QEMU for L1")?;
    let report = scenario::run(&img, &sc).context("run the bench scenario")?;
    let log = std::fs::read_to_string(&report.log)
        .with_context(|| format!("read {}", report.log.display()))?;
    let rows = parse(&log);
    let moves = parse_moves(&log);
    let moves = match (moves.get("nestvm-moves"), moves.get("qemu-moves")) {
        (Some(n), Some(q)) => Some((n.clone(), q.clone())),
        _ => None,
    };
    match (rows.get("nestvm"), rows.get("qemu")) {
        (Some(n), Some(q)) => Ok(LabFigures {
            nestvm: n.clone(),
            qemu: q.clone(),
            moves,
        }),
        _ => bail!(
            "the bench scenario did not complete both VMMs; see {}",
            report.log.display()
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_rows_and_takes_medians() {
        let log = "noise\n\
            LAB-BENCH vmm=nestvm run=1 boot_s=10.5 write_mibs=20.0 read_mibs=40.0 net_mibs=5.0\n\
            LAB-BENCH vmm=qemu run=1 boot_s=12.0 write_mibs=18.0 read_mibs=41.0 net_mibs=4.0\n\
            LAB-BENCH vmm=nestvm run=2 boot_s=11.5 write_mibs=22.0 read_mibs=44.0 net_mibs=6.0\n\
            LAB-BENCH vmm=qemu run=2 boot_s=9.0\n";
        let rows = parse(log);
        assert_eq!(rows["nestvm"].runs, 2);
        assert_eq!(rows["nestvm"].boot_s, 11.5);
        assert_eq!(rows["qemu"].runs, 1, "incomplete runs are left out");
        assert_eq!(rows["qemu"].net_mibs, 4.0);
        let moves = parse_moves(
            "LAB-BENCH vmm=nestvm-moves run=1 save_s=1.5 restore_s=0.5 mig_s=4.0 downtime_ms=200\n\
             LAB-BENCH vmm=qemu-moves run=1 save_s=2.0 restore_s=1.0 mig_s=5.0 downtime_ms=\n\
             LAB-BENCH vmm=qemu-moves run=2 save_s=2.5 restore_s=1.5 mig_s=6.0 downtime_ms=300\n",
        );
        assert_eq!(moves["nestvm-moves"].downtime_ms, 200.0);
        assert_eq!(
            moves["qemu-moves"].runs, 1,
            "a run without a downtime is left out"
        );
        assert_eq!(moves["qemu-moves"].mig_s, 6.0);
        assert!(!parse(log).contains_key("nestvm-moves"));
    }
}
