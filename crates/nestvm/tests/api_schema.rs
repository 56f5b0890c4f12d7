//! The control API against its own description: schemathesis (PyPI, in the
//! venv `scripts/setup.sh` makes) generates requests from
//! `docs/openapi.yaml` — valid ones and malformed ones — and sends them to a
//! live VM's control socket, which socat (Debian) bridges to a loopback TCP
//! port. Every answer must be what the schema says (status, headers, body),
//! none a 5xx, and the VMM must still answer afterwards.
//!
//! Routes that end the VMM or reach out of this machine are left out:
//! kill, save and power-button end the VM (each has its own tests), and
//! migrate would connect to whatever address the generator writes.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{guest, kvm_or_skip, StateEnv};
use nestvm_guests::{ticker, Ending};

const T: Duration = Duration::from_secs(30);

/// schemathesis' `st`, where the test command installed it.
fn schemathesis() -> Option<PathBuf> {
    let st = PathBuf::from(std::env::var_os("NESTVM_VENV")?).join("bin/st");
    st.exists().then_some(st)
}

/// Kills managed VM `name` however the test ends, so a failed run leaves
/// no VMM behind.
struct KillOnDrop<'a>(&'a StateEnv, &'static str);

impl Drop for KillOnDrop<'_> {
    fn drop(&mut self) {
        let _ = self.0.run(&["vm", "kill", self.1]);
    }
}

struct Bridge(Child);

impl Drop for Bridge {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// socat from `127.0.0.1:port` to the Unix socket `to`, once it listens.
fn bridge(port: u16, to: &Path) -> Bridge {
    let child = Command::new("socat")
        .arg(format!("TCP-LISTEN:{port},bind=127.0.0.1,reuseaddr,fork"))
        .arg(format!("UNIX-CONNECT:{}", to.display()))
        .stderr(Stdio::null())
        .spawn()
        .expect("socat (Debian package socat; scripts/setup.sh installs it)");
    let b = Bridge(child);
    let start = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(start.elapsed() < T, "socat never listened");
        std::thread::sleep(Duration::from_millis(20));
    }
    b
}

#[test]
fn every_documented_route_answers_as_its_schema_says() {
    if !kvm_or_skip("every_documented_route_answers_as_its_schema_says") {
        return;
    }
    let Some(st) = schemathesis() else {
        assert!(
            std::env::var_os("NESTVM_REQUIRE_KVM").is_none(),
            "schemathesis is missing: scripts/setup.sh installs it (NESTVM_VENV)"
        );
        eprintln!("SKIPPED every_documented_route_answers_as_its_schema_says: no schemathesis (run scripts/test.sh)");
        return;
    };
    let env = StateEnv::new("api-schema");
    let k = guest(
        "api-schema.elf",
        ticker(u32::MAX, 3000, "never", Ending::Reset),
    );
    env.ok(&[
        "vm",
        "new",
        "a",
        "--kernel",
        k.to_str().unwrap(),
        "--memory",
        "16M",
    ]);
    env.ok(&["vm", "start", "a"]);
    let _vm = KillOnDrop(&env, "a");
    let control = env.dir.join("vms/a/control.sock");
    let port = common::free_port();
    let _bridge = bridge(port, &control);
    let spec = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/openapi.yaml");
    // A fixed seed and a fixed number of cases: the same requests each run.
    let out = Command::new(st)
        .current_dir(&env.dir)
        .arg("run")
        .arg(&spec)
        .args(["--url", &format!("http://127.0.0.1:{port}")])
        .args(["--checks", "all", "--workers", "1", "--no-color"])
        .args([
            "--seed",
            "7",
            "--max-examples",
            "200",
            "--generation-database",
            "none",
        ])
        .args(["--request-timeout", "20"])
        .args([
            "--exclude-path",
            "/v1/vm/kill",
            "--exclude-path",
            "/v1/vm/save",
            "--exclude-path",
            "/v1/vm/power-button",
            "--exclude-path",
            "/v1/vm/migrate",
        ])
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "schemathesis found failures:\n{said}");
    assert!(
        said.contains("Tested: 11"),
        "every included route was tested:\n{said}"
    );
    // The VMM survived all of it and still answers as it should.
    let (status, body) = nestvm_vmm::api::call(&control, "GET", "/v1/vm", T).unwrap();
    assert_eq!(status, 200, "{body}");
    assert!(
        matches!(body["state"].as_str(), Some("Running" | "Paused")),
        "{body}"
    );
}
