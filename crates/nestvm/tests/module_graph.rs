//! Imports run one way: in the two crates that grew knots before (the VMM
//! and the CLI), no module imports another that imports it back, directly
//! or through others. A module's imports are the `crate::NAME` paths in its
//! code (comments and its `#[cfg(test)]` part left out); a loop among them
//! fails this test with the modules that form it.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

type Graph = BTreeMap<String, BTreeSet<String>>;

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The crate's top-level modules, each with the top-level modules it uses.
fn graph(src: &Path) -> Graph {
    let mut files = Vec::new();
    rust_files(src, &mut files);
    let top = |p: &Path| {
        let rel = p.strip_prefix(src).unwrap();
        let first = rel
            .components()
            .next()
            .unwrap()
            .as_os_str()
            .to_string_lossy();
        first.trim_end_matches(".rs").to_owned()
    };
    let mut g = Graph::new();
    let roots = ["lib", "main"];
    let names: BTreeSet<String> = files
        .iter()
        .map(|p| top(p))
        .filter(|n| !roots.contains(&n.as_str()))
        .collect();
    for f in &files {
        let me = top(f);
        if roots.contains(&me.as_str()) {
            continue;
        }
        let text = std::fs::read_to_string(f).unwrap();
        let code = text.split("#[cfg(test)]").next().unwrap_or_default();
        let deps = g.entry(me.clone()).or_default();
        for line in code.lines().filter(|l| !l.trim_start().starts_with("//")) {
            for part in line.split("crate::").skip(1) {
                let used: String = part
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                if used != me && names.contains(&used) {
                    deps.insert(used);
                }
            }
            // `use crate::{a, b::c}`
            if let Some(list) = line.split("crate::{").nth(1) {
                for item in list.split([',', '}']) {
                    let used = item.trim().split("::").next().unwrap_or_default();
                    if used != me && names.contains(used) {
                        deps.insert(used.to_owned());
                    }
                }
            }
        }
    }
    g
}

/// A module that reaches itself again through its imports, with the path.
fn find_loop(g: &Graph) -> Option<Vec<String>> {
    fn walk(g: &Graph, at: &str, path: &mut Vec<String>, done: &mut BTreeSet<String>) -> bool {
        if let Some(i) = path.iter().position(|p| p == at) {
            path.drain(..i);
            path.push(at.to_owned());
            return true;
        }
        if done.contains(at) {
            return false;
        }
        path.push(at.to_owned());
        for next in g.get(at).into_iter().flatten() {
            if walk(g, next, path, done) {
                return true;
            }
        }
        path.pop();
        done.insert(at.to_owned());
        false
    }
    let mut done = BTreeSet::new();
    for start in g.keys() {
        let mut path = Vec::new();
        if walk(g, start, &mut path, &mut done) {
            return Some(path);
        }
    }
    None
}

fn crate_src(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(name)
        .join("src")
}

#[test]
fn the_vmm_and_cli_modules_import_one_way() {
    for krate in ["vmm", "nestvm"] {
        let g = graph(&crate_src(krate));
        assert!(g.len() > 5, "{krate}: modules found: {g:?}");
        if let Some(cycle) = find_loop(&g) {
            panic!(
                "crates/{krate}: modules import each other: {}",
                cycle.join(" -> ")
            );
        }
    }
}

#[test]
fn a_loop_is_found() {
    let mut g = Graph::new();
    for (a, b) in [("a", "b"), ("b", "c"), ("c", "a"), ("d", "a")] {
        g.entry(a.into()).or_default().insert(b.into());
    }
    assert_eq!(find_loop(&g).unwrap(), ["a", "b", "c", "a"]);
    g.get_mut("c").unwrap().clear();
    assert_eq!(find_loop(&g), None);
}
