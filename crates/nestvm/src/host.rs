//! `nestvm host check` and `nestvm host enable-nested`.

use std::path::Path;

use anyhow::anyhow;
use nestvm_host::check::MODPROBE_FILE;
use nestvm_host::enable::{apply, plan, Applied};
use nestvm_host::{evaluate, gather};

use crate::{runtime, Failure};

/// Prints the host report; exit 0 when the host can nest, 1 when not.
pub fn check(json: bool) -> Result<u8, Failure> {
    let report = evaluate(&gather());
    if json {
        let text = serde_json::to_string_pretty(&report).map_err(runtime)?;
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
        crate::report(
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
        crate::report(
            json,
            "dry run: nothing changed; run again with --yes to apply",
            value("dry-run"),
        );
        return Ok(0);
    }
    match apply(&plan).map_err(runtime)? {
        Applied::Enabled => {
            crate::report(json, &format!("done: {} is loaded with nested on", plan.module), value("enabled"));
            Ok(0)
        }
        Applied::PendingReload => Err(runtime(anyhow!(
            "{} is written, but {} is in use by running VMs: stop them and run 'nestvm host enable-nested --yes' again, or reboot",
            plan.file.display(),
            plan.module
        ))),
    }
}
