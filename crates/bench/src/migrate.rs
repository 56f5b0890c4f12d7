//! Live migration of a managed 1 GiB VM between two state directories on
//! this machine, over loopback: total time and downtime for an idle guest
//! (a ticker: memory mostly untouched) and a busy one (rewriting 256 MiB
//! over and over), from the source's migration report.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use nestvm_guests::{dirtier, ticker, Ending};

use crate::saves::{median, nestvm};

/// One kind of guest's figures (medians).
#[derive(Debug, Clone, Copy)]
pub struct MigrationFigures {
    /// `vm migrate` wall time, ms.
    pub total_ms: f64,
    /// From the pause at the source to running at the destination, ms.
    pub downtime_ms: f64,
    /// Pre-copy rounds.
    pub rounds: f64,
    /// MiB of page data sent.
    pub sent_mib: f64,
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Migrates a VM running `image` `runs` times (back and forth between two
/// state directories).
fn measure(
    bin: &Path,
    dir: &Path,
    tag: &str,
    image: Vec<u8>,
    runs: usize,
) -> Result<MigrationFigures> {
    let hosts = [
        dir.join(format!("mig-{tag}-a")),
        dir.join(format!("mig-{tag}-b")),
    ];
    for h in &hosts {
        let _ = std::fs::remove_dir_all(h);
        std::fs::create_dir_all(h)?;
    }
    let k = dir.join(format!("mig-{tag}.elf"));
    std::fs::write(&k, image)?;
    let token = dir.join("mig-token");
    // The first `vm receive` writes a new secret there; the later ones read it.
    let _ = std::fs::remove_file(&token);
    let kernel = k.to_string_lossy().into_owned();
    let token_s = token.to_string_lossy().into_owned();
    nestvm(
        bin,
        &hosts[0],
        &[
            "vm", "new", "m", "--kernel", &kernel, "--memory", "1G", "--nested", "off",
        ],
    )?;
    nestvm(bin, &hosts[0], &["vm", "start", "m"])?;
    let (mut total, mut down, mut rounds, mut sent) = (vec![], vec![], vec![], vec![]);
    for i in 0..runs {
        let (src, dst) = (&hosts[i % 2], &hosts[(i + 1) % 2]);
        // The destination must not know the VM: drop what a previous move left.
        let _ = std::fs::remove_dir_all(dst.join("vms/m"));
        std::thread::sleep(Duration::from_millis(300));
        let addr = format!("127.0.0.1:{}", free_port()?);
        let mut recv = Command::new(bin)
            .arg("--state-dir")
            .arg(dst)
            .args([
                "vm",
                "receive",
                "m",
                "--listen",
                &addr,
                "--token-file",
                &token_s,
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        let t = Instant::now();
        while std::net::TcpStream::connect(&addr).is_err() {
            if t.elapsed() > Duration::from_secs(30) {
                bail!("the receiver never listened");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let t = Instant::now();
        nestvm(
            bin,
            src,
            &[
                "vm",
                "migrate",
                "m",
                "--to",
                &addr,
                "--token-file",
                &token_s,
            ],
        )?;
        total.push(t.elapsed().as_secs_f64() * 1000.0);
        if !recv.wait()?.success() {
            bail!("the receiver failed");
        }
        let report: serde_json::Value = serde_json::from_slice(
            &std::fs::read(src.join("vms/m/migration.json")).context("the migration report")?,
        )?;
        down.push(report["downtime_ms"].as_f64().unwrap_or(f64::NAN));
        rounds.push(report["rounds"].as_f64().unwrap_or(f64::NAN));
        sent.push(report["sent_bytes"].as_f64().unwrap_or(0.0) / f64::from(1 << 20));
    }
    let last = &hosts[runs % 2];
    nestvm(bin, last, &["vm", "kill", "m"])?;
    for h in &hosts {
        let _ = std::fs::remove_dir_all(h);
    }
    Ok(MigrationFigures {
        total_ms: median(total),
        downtime_ms: median(down),
        rounds: median(rounds),
        sent_mib: median(sent),
    })
}

/// Idle and busy guests, `runs` migrations each.
pub fn run(bin: &Path, dir: &Path, runs: usize) -> Result<(MigrationFigures, MigrationFigures)> {
    let idle = measure(
        bin,
        dir,
        "idle",
        ticker(u32::MAX, 3000, "", Ending::Reset),
        runs,
    )?;
    let busy = measure(bin, dir, "busy", dirtier(256), runs)?;
    Ok((idle, busy))
}
