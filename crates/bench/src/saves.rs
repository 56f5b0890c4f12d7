//! Save, resume and checkpoint of a managed 1 GiB VM on this machine's KVM:
//! wall time of `vm save`, of `vm start` of the Saved VM, of `vm checkpoint`,
//! and the time from running `vm start` on a Saved VM to the guest's next
//! instruction (a ticker guest that prints a byte every few hundred
//! instructions, seen as the console log growing).

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use nestvm_guests::{ticker, Ending};

/// Medians, in milliseconds.
#[derive(Debug, Clone, Copy)]
pub struct SaveFigures {
    /// `vm save` wall time.
    pub save_ms: f64,
    /// `vm start` of the Saved VM, wall time (until its API answers).
    pub resume_ms: f64,
    /// From running `vm start` on the Saved VM to the guest's next output.
    pub first_instruction_ms: f64,
    /// `vm checkpoint` of the running VM, wall time.
    pub checkpoint_ms: f64,
}

pub(crate) fn nestvm(bin: &Path, state: &Path, args: &[&str]) -> Result<()> {
    let out = Command::new(bin)
        .arg("--state-dir")
        .arg(state)
        .args(args)
        .stdin(Stdio::null())
        .output()?;
    if !out.status.success() {
        bail!("nestvm {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

pub(crate) fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Runs `runs` rounds of start, save, resume, checkpoint, kill.
pub fn measure(bin: &Path, dir: &Path, runs: usize) -> Result<SaveFigures> {
    let state = dir.join("saves-state");
    let _ = std::fs::remove_dir_all(&state);
    let k = dir.join("fast-ticker.elf");
    std::fs::write(&k, ticker(u32::MAX, 100, "", Ending::Reset))?;
    let kernel = k.to_string_lossy().into_owned();
    nestvm(
        bin,
        &state,
        &[
            "vm", "new", "b", "--kernel", &kernel, "--memory", "1G", "--nested", "off",
        ],
    )?;
    let log = state.join("vms/b/console.log");
    let size = || std::fs::metadata(&log).map_or(0, |m| m.len());
    let (mut save, mut resume, mut first, mut ckpt) = (vec![], vec![], vec![], vec![]);
    for _ in 0..runs {
        nestvm(bin, &state, &["vm", "start", "b"])?;
        std::thread::sleep(Duration::from_millis(100));
        let t = Instant::now();
        nestvm(bin, &state, &["vm", "save", "b"])?;
        save.push(t.elapsed().as_secs_f64() * 1000.0);
        let before = size();
        let t = Instant::now();
        let mut child = Command::new(bin)
            .arg("--state-dir")
            .arg(&state)
            .args(["vm", "start", "b"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()?;
        while size() == before {
            if t.elapsed() > Duration::from_secs(30) {
                bail!("the resumed guest never printed");
            }
            std::thread::sleep(Duration::from_micros(50));
        }
        first.push(t.elapsed().as_secs_f64() * 1000.0);
        child.wait()?;
        resume.push(t.elapsed().as_secs_f64() * 1000.0);
        let t = Instant::now();
        nestvm(bin, &state, &["vm", "checkpoint", "b"])?;
        ckpt.push(t.elapsed().as_secs_f64() * 1000.0);
        nestvm(bin, &state, &["vm", "kill", "b"])?;
    }
    let _ = std::fs::remove_dir_all(&state);
    Ok(SaveFigures {
        save_ms: median(save),
        resume_ms: median(resume),
        first_instruction_ms: median(first),
        checkpoint_ms: median(ckpt),
    })
}
