//! `nestvm-lab`: builds the lab image and runs a scenario script in L1.
//!
//! `nestvm-lab run SCRIPT [--timeout SECS] [--l1-nested 0|1] [--cpus N]` prints each
//! check and exits 0 when all passed; `nestvm-lab image` only builds.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use nestvm_lab::{debian, host, image, scenario, workspace_root};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let nestvm = std::env::var_os("NESTVM_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target/release/nestvm"));
    host::ensure_packages()?;
    let kernel = debian::kernel()?;
    let img = image::build(&kernel, &nestvm)?;
    match args.first().map(String::as_str) {
        Some("image") => {
            println!("{}\n{}", img.vmlinuz.display(), img.initrd.display());
            Ok(())
        }
        Some("run") => {
            let path = args
                .get(1)
                .context("usage: nestvm-lab run SCRIPT [--timeout SECS] [--l1-nested 0|1] [--cpus N]")?;
            let script =
                std::fs::read_to_string(path).with_context(|| format!("cannot read {path}"))?;
            let name = std::path::Path::new(path)
                .file_stem()
                .map_or("scenario".into(), |s| s.to_string_lossy().into_owned());
            let mut sc = scenario::Scenario::new(&name, &script, Duration::from_secs(900));
            let mut rest = args[2..].iter();
            while let Some(flag) = rest.next() {
                let value = rest
                    .next()
                    .with_context(|| format!("{flag} needs a value"))?;
                match flag.as_str() {
                    "--timeout" => sc.timeout = Duration::from_secs(value.parse()?),
                    "--l1-nested" => sc.l1_nested = value == "1",
                    "--cpus" => sc.cpus = value.parse()?,
                    other => bail!("unknown option {other}"),
                }
            }
            let report = scenario::run(&img, &sc)?;
            let failed: Vec<_> = report.checks.iter().filter(|(_, ok)| !ok).collect();
            for (name, ok) in &report.checks {
                println!("{} {name}", if *ok { "PASS" } else { "FAIL" });
            }
            println!(
                "{} passed, {} failed",
                report.checks.len() - failed.len(),
                failed.len()
            );
            if !failed.is_empty() || !report.completed {
                bail!(
                    "scenario failed (completed: {}); log: {}",
                    report.completed,
                    report.log.display()
                );
            }
            Ok(())
        }
        _ => bail!(
            "usage: nestvm-lab image | nestvm-lab run SCRIPT [--timeout SECS] [--l1-nested 0|1] [--cpus N]"
        ),
    }
}
