//! `nestvm host check` and `nestvm host enable-nested`.

use std::path::Path;

use anyhow::anyhow;
use nestvm_host::check::MODPROBE_FILE;
use nestvm_host::enable::{apply, plan, Applied};
use nestvm_host::{evaluate, gather, HostFacts};

use crate::common::{report, runtime, usage, Failure};

/// Where `host check` reads recorded facts instead of this host's.
pub const FACTS_ENV: &str = "NESTVM_HOST_FACTS";

/// This host's facts, or those recorded in the file `NESTVM_HOST_FACTS`
/// names (the `facts` of another host's `host check --json`, or that whole
/// output): what nestvm would say about that host, said here.
fn facts() -> Result<HostFacts, Failure> {
    let Some(path) = std::env::var_os(FACTS_ENV) else {
        return Ok(gather());
    };
    let bad = |e: &dyn std::fmt::Display| {
        usage(anyhow!(
            "{FACTS_ENV}={}: {e}: give the output of 'nestvm --json host check', or unset it",
            Path::new(&path).display()
        ))
    };
    let text = std::fs::read_to_string(&path).map_err(|e| bad(&e))?;
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| bad(&e))?;
    let facts = v.get("facts").cloned().unwrap_or(v);
    serde_json::from_value(facts).map_err(|e| bad(&e))
}

/// Prints the host report; exit 0 when the host can nest, 1 when not.
pub fn check(json: bool) -> Result<u8, Failure> {
    let facts = facts()?;
    let report = evaluate(&facts);
    if json {
        let mut v = serde_json::to_value(&report).map_err(runtime)?;
        v["facts"] = serde_json::to_value(&facts).map_err(runtime)?;
        let text = serde_json::to_string_pretty(&v).map_err(runtime)?;
        println!("{text}");
    } else {
        print!("{}", report.render());
    }
    Ok(if report.can_nest { 0 } else { 1 })
}

/// Lists, then (with `yes`) applies the module-parameter fix.
pub fn enable_nested(yes: bool, json: bool) -> Result<u8, Failure> {
    let facts = gather();
    let plan = plan(&facts, Path::new(MODPROBE_FILE)).map_err(runtime)?;
    let value =
        |result: &str| serde_json::json!({"plan": plan, "steps": plan.steps(), "result": result});
    if plan.is_done() {
        report(
            json,
            &format!(
                "nesting is already enabled: {} is loaded with nested on and {} has '{}'; nothing changed",
                plan.module,
                plan.file.display(),
                plan.line
            ),
            value("already-enabled"),
        );
        return Ok(0);
    }
    if !json {
        println!("nestvm host enable-nested will:");
        for step in plan.steps() {
            println!("  - {step}");
        }
    }
    if !yes {
        report(
            json,
            "dry run: nothing changed; run again with --yes to apply",
            value("dry-run"),
        );
        return Ok(0);
    }
    match apply(&plan).map_err(runtime)? {
        Applied::Enabled => {
            report(json, &format!("done: {} is loaded with nested on", plan.module), value("enabled"));
            Ok(0)
        }
        Applied::PendingReload => Err(runtime(anyhow!(
            "{} is written, but {} is in use by running VMs: stop them and run 'nestvm host enable-nested --yes' again, or reboot",
            plan.file.display(),
            plan.module
        ))),
    }
}
