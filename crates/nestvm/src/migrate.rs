//! Live migration from the command line (the reference document's Move-VM):
//! `vm receive NAME --listen ADDR` on the destination starts a `vm serve`
//! that waits for the VM; `vm migrate NAME --to ADDR` on the source asks the
//! VM's VMM to send it, and draws the progress until the VM runs there.
//! Both sides read the same migration secret from `--token-file`: `vm
//! receive` writes it, and only its path ever goes into the API's URL or a
//! process's arguments.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::anyhow;
use indicatif::{ProgressBar, ProgressStyle};
use nestvm_manager::{Store, VmName, VmState};
use nestvm_vmm::migration::placement::Placement;
use nestvm_vmm::migration::receive::{self, Arrived};
use nestvm_vmm::migration::secret::{self, Psk};
use nestvm_vmm::migration::{Phase, Progress};
use serde::de::IgnoredAny;

use crate::common::{report, runtime, store_err, tail, usage, Failure};
use crate::control::{self, state_name, API_TIMEOUT};
use crate::managed::spawn_serve;
use crate::vmdir::VmDir;

/// Parses a duration such as `50ms`, `0.3s` or `2s` (a bare number is ms).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, scale) = if let Some(n) = s.strip_suffix("ms") {
        (n, 1e-3)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1.0)
    } else {
        (s, 1e-3)
    };
    match num.trim().parse::<f64>() {
        Ok(v) if v.is_finite() && v >= 0.0 && v * scale < 3600.0 => {
            Ok(Duration::from_secs_f64(v * scale))
        }
        _ => Err(format!(
            "'{s}' is not a duration: write it like 50ms or 0.5s"
        )),
    }
}

/// Parses a bandwidth such as `100M`, `512K`, `1G` or `4MiB/s` (bytes per
/// second; a bare number is MiB/s, as for sizes); `0` means no cap.
pub fn parse_rate(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let size = t.strip_suffix("/s").unwrap_or(t);
    let min = nestvm_vmm::migration::throttle::MIN_BANDWIDTH;
    match nestvm_vmm::config::parse_size(size) {
        Ok(0) => Ok(0),
        Ok(b) if b >= min => Ok(b),
        Ok(_) => Err(format!(
            "'{s}' is below the smallest cap, {} KiB/s: give a larger RATE, or 0 for none",
            min >> 10
        )),
        Err(_) => Err(format!(
            "'{s}' is not a rate: write it like 100M, 512K or 1G (per second)"
        )),
    }
}

/// Reads the migration secret, refusing weak or exposed ones.
fn read_secret(path: &Path) -> Result<Psk, Failure> {
    secret::read(path).map_err(|e| usage(anyhow::Error::new(e)))
}

/// Where an arriving VM's disks and TAPs are on this host (`vm receive`
/// and `vm serve --incoming`).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct PlaceArgs {
    /// The sender's disk image OLD is NEW here (repeat per disk; --disk OLD keeps the path).
    #[arg(long = "disk", value_name = "OLD[=NEW]")]
    disks: Vec<String>,
    /// The sender's TAP OLD is NEW here (repeat per adapter; --tap OLD keeps the name).
    #[arg(long = "tap", value_name = "OLD[=NEW]")]
    taps: Vec<String>,
    /// Take every disk and TAP not named under the sender's paths and names (each must exist here).
    #[arg(long)]
    same_paths: bool,
}

/// `OLD=NEW` (split at the first `=`), or `OLD` for `OLD=OLD`.
fn mapping(flag: &str, s: &str) -> Result<(String, String), Failure> {
    let (old, new) = s.split_once('=').unwrap_or((s, s));
    if old.is_empty() || new.is_empty() {
        return Err(usage(anyhow!(
            "--{flag} '{s}' is not OLD=NEW or OLD: name the sender's {flag} and where it is here"
        )));
    }
    Ok((old.to_owned(), new.to_owned()))
}

impl PlaceArgs {
    /// What they say, each disk here as an absolute path.
    pub fn placement(&self) -> Result<Placement, Failure> {
        let mut disks = vec![];
        for d in &self.disks {
            let (old, new) = mapping("disk", d)?;
            let here = std::path::absolute(&new).map_err(runtime)?;
            disks.push((PathBuf::from(old), here));
        }
        let taps = self
            .taps
            .iter()
            .map(|t| mapping("tap", t))
            .collect::<Result<_, _>>()?;
        Ok(Placement {
            disks,
            taps,
            same_paths: self.same_paths,
        })
    }

    /// Them again, as `vm serve`'s arguments (disks here absolute).
    fn serve_args(&self) -> Result<Vec<String>, Failure> {
        let p = self.placement()?;
        let mut args = vec![];
        for (old, here) in &p.disks {
            args.push(format!("--disk={}={}", old.display(), here.display()));
        }
        for (old, here) in &p.taps {
            args.push(format!("--tap={old}={here}"));
        }
        if p.same_paths {
            args.push("--same-paths".into());
        }
        Ok(args)
    }
}

/// What `vm receive` was told.
pub struct Receiving<'a> {
    /// `HOST:PORT`.
    pub listen: &'a str,
    /// The migration secret's file.
    pub token_file: &'a Path,
    /// How long to wait for the sender.
    pub wait: Duration,
    /// Where the VM's disks and TAPs are here.
    pub place: &'a PlaceArgs,
}

/// `vm receive`: reserves NAME here and starts a VMM that waits on `listen`
/// for it; returns once the VM runs here, or the receiving failed.
pub fn receive(
    store: &Store,
    name: &VmName,
    how: Receiving<'_>,
    json: bool,
) -> Result<u8, Failure> {
    if store.exists(name) {
        return Err(usage(anyhow!(
            "a VM named '{name}' already exists here: receive it under another name, or remove it first"
        )));
    }
    if store.state(name) == VmState::Live {
        return Err(usage(anyhow!("VM '{name}' is already being received here")));
    }
    let place = how.place.serve_args()?;
    let token_file = std::path::absolute(how.token_file).map_err(runtime)?;
    let (_, created) =
        secret::read_or_create(&token_file).map_err(|e| usage(anyhow::Error::new(e)))?;
    if created && !json {
        eprintln!(
            "nestvm: wrote a new migration secret to {}; copy it to the source over a secure channel (scp, not e-mail): whoever holds it can send VMs here",
            token_file.display()
        );
    }
    let dir = store.reserve(name).map_err(store_err)?;
    let p = VmDir::of(store, name);
    let mut args = vec![
        format!("--incoming={}", how.listen),
        format!("--token-file={}", token_file.display()),
        format!("--wait={}", how.wait.as_secs()),
    ];
    args.extend(place);
    let mut child = spawn_serve(store, name, &args)?;
    if !json {
        eprintln!("nestvm: waiting for VM '{name}' on {}", how.listen);
    }
    wait_arrival(store, name, &p, &dir, &mut child, json)
}

/// Waits until the VM `vm serve --incoming` (`child`) receives runs here,
/// or it ended without it (then nothing of the VM stays in `dir`).
fn wait_arrival(
    store: &Store,
    name: &VmName,
    p: &VmDir,
    dir: &Path,
    child: &mut std::process::Child,
    json: bool,
) -> Result<u8, Failure> {
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            let why = tail(&p.log, 1).join(" / ");
            // Nothing of the VM is kept: it never ran here.
            if !store.exists(name) {
                let _ = std::fs::remove_dir_all(dir);
            }
            return Err(runtime(anyhow!(
                "VM '{name}' was not received ({status}): {why}"
            )));
        }
        if store.exists(name) {
            if let Some(v) = control::up(p).map_err(runtime)? {
                report(
                    json,
                    &format!(
                        "VM '{name}' arrived and runs here (pid {}, {}); console: nestvm vm console {name}",
                        v.pid,
                        state_name(v.state)
                    ),
                    serde_json::json!({"vm": name.as_str(), "result": "received", "vmm": v}),
                );
                return Ok(0);
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// What `vm serve --incoming` was told.
pub struct Incoming<'a> {
    /// `HOST:PORT`.
    pub listen: &'a str,
    /// The migration secret's file.
    pub token_file: &'a Path,
    /// How long to wait for the sender.
    pub wait: Duration,
    /// Where the VM's disks and TAPs are here.
    pub placement: &'a Placement,
}

/// The receiving half inside `vm serve --incoming`: waits for the VM, and
/// writes its definition here once it is built.
pub fn incoming(
    store: &Store,
    name: &VmName,
    how: &Incoming<'_>,
    hv: &nestvm_kvm::Hypervisor,
    console: Box<dyn std::io::Write + Send>,
) -> Result<Arrived, Failure> {
    let key = read_secret(how.token_file)?;
    let listener = receive::listen(how.listen).map_err(|e| usage(anyhow::Error::new(e)))?;
    eprintln!("nestvm: waiting for VM '{name}' on {}", how.listen);
    let say = |s: &str| eprintln!("nestvm: {s}");
    let terms = receive::Terms {
        key: &key,
        wait: how.wait,
        placement: how.placement,
        landlock: crate::common::landlock(),
    };
    let arrived = receive::receive(&listener, &terms, hv, console, &say)
        .map_err(|e| runtime(anyhow::Error::new(e).context("the migration failed")))?;
    store.create(name, &arrived.vm.config).map_err(store_err)?;
    eprintln!(
        "nestvm: VM '{name}' arrived ({} MiB of pages)",
        arrived.bytes >> 20
    );
    Ok(arrived)
}

/// One line on a migration's progress (the progress bar, `vm show`).
pub fn progress_line(p: &Progress) -> String {
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    let cap = match p.max_bandwidth {
        Some(b) => format!(" (cap {:.1})", mib(b)),
        None => String::new(),
    };
    let slowed = match p.slowed_pct {
        0 => String::new(),
        pct => format!(" · guest slowed {pct}%"),
    };
    format!(
        "round {} · {} MiB sent · {:.1} MiB/s{cap} · {:.1} MiB dirty{slowed}",
        p.rounds,
        p.sent_bytes >> 20,
        mib(p.rate),
        mib(p.dirty_bytes)
    )
}

/// How `vm migrate` may go: its downtime budget, its bandwidth cap,
/// whether the destination verifies the memory and whether the guest may
/// be slowed.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// The longest pause for the final copy.
    pub max_downtime: Duration,
    /// Bytes per second for the copy while the VM runs (`None`: no cap).
    pub max_bandwidth: Option<u64>,
    /// `--verify`.
    pub verify: bool,
    /// Not `--no-auto-converge`.
    pub auto_converge: bool,
}

/// Draws the migration's progress until it completes or fails; its last
/// progress (from the report the VMM leaves as it ends, if gone).
fn follow(store: &Store, name: &VmName, p: &VmDir, json: bool) -> Result<Progress, Failure> {
    let started = Instant::now();
    let bar = if json {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(0)
    };
    bar.set_style(
        ProgressStyle::with_template("{spinner} migrating: [{bar:30}] {msg}")
            .expect("a valid template")
            .progress_chars("=> "),
    );
    let last = loop {
        let now = control::migration(store, name).map_err(|e| {
            bar.finish_and_clear();
            runtime(anyhow!("VM '{name}''s migration: {e}"))
        })?;
        let done = match &now {
            Some(n) => n.phase.ended(),
            // The VMM is gone (it ends once the VM runs elsewhere): the
            // report it left says how it went.
            None => true,
        };
        if let Some(n) = &now {
            bar.set_length(n.memory_bytes);
            bar.set_position(n.sent_bytes.min(n.memory_bytes));
            bar.set_message(progress_line(n));
        }
        if done {
            let from_file = std::fs::read(&p.migration_report)
                .ok()
                .and_then(|b| serde_json::from_slice::<Progress>(&b).ok());
            match from_file.or(now) {
                Some(p) => break p,
                None if started.elapsed() < Duration::from_secs(5) => {}
                None => {
                    bar.finish_and_clear();
                    return Err(runtime(anyhow!(
                        "lost track of VM '{name}''s migration: see {}",
                        p.log.display()
                    )));
                }
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    bar.finish_and_clear();
    Ok(last)
}

/// `vm migrate`: sends the running VM to a `vm receive` at `to`.
pub fn migrate(
    store: &Store,
    name: &VmName,
    to: &str,
    token_file: &Path,
    limits: Limits,
    json: bool,
) -> Result<u8, Failure> {
    let _cmd = store.lock(name).map_err(store_err)?;
    if store.state(name) != VmState::Live {
        return Err(usage(anyhow!(
            "VM '{name}' is not running: only a running or paused VM can be migrated (a stopped one needs only its definition and disks copied)"
        )));
    }
    if to.contains(['&', '?', ' ', '#']) {
        return Err(usage(anyhow!("'{to}' is not HOST:PORT")));
    }
    // Read here, and sent in a header of the request (never its URL): a VMM
    // that gave up root may not be able to read the file.
    let key = read_secret(token_file)?.hex();
    let p = VmDir::of(store, name);
    let path = format!(
        "/v1/vm/migrate?to={to}&max_downtime_ms={}&max_bandwidth={}&verify={}&auto_converge={}",
        limits.max_downtime.as_millis(),
        limits.max_bandwidth.unwrap_or(0),
        u8::from(limits.verify),
        u8::from(limits.auto_converge)
    );
    let headers = [(nestvm_vmm::api::SECRET_HEADER, key.as_str())];
    // The reply is the migration's first progress; the loop below reads it.
    let answer =
        control::request_with::<IgnoredAny>(&p.control, ("PUT", &path, &headers), API_TIMEOUT, 202);
    match answer {
        Ok(control::Answer::Done(_)) => {}
        Ok(control::Answer::Refused { error, .. }) => {
            return Err(runtime(anyhow!("VM '{name}' was not migrated: {error}")))
        }
        Err(e) => return Err(runtime(anyhow!("VM '{name}' was not migrated: {e}"))),
    }
    let last = follow(store, name, &p, json)?;
    let error = last.error.clone().unwrap_or_default();
    match last.phase {
        Phase::Failed => {
            // Paused if it was, or if a disk lock could not be taken back.
            let here = match control::up(&p) {
                Ok(Some(v)) if v.state == nestvm_vmm::api::RunState::Running => {
                    "it keeps running here"
                }
                _ => "it stays paused here ('nestvm vm show' says why)",
            };
            return Err(runtime(anyhow!(
                "VM '{name}' was not migrated ({error}); {here}"
            )));
        }
        Phase::Unconfirmed => {
            return Err(runtime(anyhow!(
                "VM '{name}' was handed over to {to}, which did not confirm it runs it ({error}); it stays paused here. Check on the destination with 'nestvm vm show {name}': if it runs there, end this copy with 'nestvm vm kill {name}'; if not, resume it here with 'nestvm vm resume {name}'"
            )));
        }
        _ => {}
    }
    // The source VMM ends once the VM runs there.
    let deadline = Instant::now() + Duration::from_secs(30);
    while store.state(name) == VmState::Live && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    report(
        json,
        &format!(
            "VM '{name}' now runs at {to}: {} rounds, {} MiB sent in {:.1} s, downtime {} ms (budget {} ms{}); its definition stays here ('nestvm vm rm {name}' removes it)",
            last.rounds,
            last.sent_bytes >> 20,
            last.elapsed_ms as f64 / 1000.0,
            last.downtime_ms.unwrap_or(0),
            last.max_downtime_ms,
            match (last.converged, last.downtime_ms.unwrap_or(0) > last.max_downtime_ms) {
                (Some(false), _) => match last.round_trip_ms {
                    Some(rtt)
                        if 2.0 * rtt >= last.max_downtime_ms as f64
                            && last.rounds < nestvm_vmm::migration::MAX_ROUNDS =>
                    {
                        format!(
                        ", not met: the round trip to {to} alone takes {rtt:.0} ms, twice in the pause"
                    )
                    }
                    _ => ", not met: the guest dirtied memory faster than it could be sent".to_owned(),
                },
                (_, true) => match last.downtime_parts {
                    Some(d) => format!(
                        ", not met although the last pages fitted it: {:.0} ms to pause and capture, {:.0} ms to send, {:.0} ms to resume there",
                        d.stop_ms, d.copy_ms, d.resume_ms
                    ),
                    None => ", not met".to_owned(),
                },
                _ => String::new(),
            },
        ),
        serde_json::json!({"vm": name.as_str(), "result": "migrated", "migration": last}),
    );
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The progress line says how much auto-converge slows the guest, and
    /// says nothing of it while the guest is not slowed.
    #[test]
    fn the_progress_line_shows_how_much_the_guest_is_slowed() {
        let mut p = Progress {
            rounds: 4,
            sent_bytes: 300 << 20,
            rate: 64 << 20,
            dirty_bytes: 8 << 20,
            ..Default::default()
        };
        let line = progress_line(&p);
        assert_eq!(line, "round 4 · 300 MiB sent · 64.0 MiB/s · 8.0 MiB dirty");
        p.slowed_pct = 40;
        let line = progress_line(&p);
        assert!(line.ends_with(" · guest slowed 40%"), "{line}");
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("50ms").unwrap(), Duration::from_millis(50));
        assert_eq!(parse_duration("0.3s").unwrap(), Duration::from_millis(300));
        assert_eq!(parse_duration("20").unwrap(), Duration::from_millis(20));
        for bad in ["", "fast", "-1ms", "1h", "nan"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn rates() {
        assert_eq!(parse_rate("4M").unwrap(), 4 << 20);
        assert_eq!(parse_rate("4MiB/s").unwrap(), 4 << 20);
        assert_eq!(parse_rate("512K").unwrap(), 512 << 10);
        assert_eq!(parse_rate("2").unwrap(), 2 << 20, "bare numbers are MiB/s");
        assert_eq!(parse_rate("0").unwrap(), 0, "no cap");
        assert!(parse_rate("1K").unwrap_err().contains("smallest cap"));
        for bad in ["", "fast", "-1M", "1.5M", "4M/h"] {
            assert!(parse_rate(bad).unwrap_err().contains("not a rate"), "{bad}");
        }
    }
}
