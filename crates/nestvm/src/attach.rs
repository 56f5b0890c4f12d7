//! `nestvm vm console NAME`: attach this terminal to a running VM's serial
//! console. Recent output is shown first; Ctrl-] detaches (the VM runs on);
//! attaching again later shows what came meanwhile. End of input detaches too.

use std::io::{IsTerminal, Read, Write};
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;

use anyhow::anyhow;
use nestvm_manager::{Store, VmName, VmState};
use nestvm_vmm::terminal::RawModeGuard;

use crate::common::{runtime, store_err, Failure};
use crate::vmdir::VmDir;

/// Ctrl-].
const DETACH_KEY: u8 = 0x1d;

pub fn attach(store: &Store, name: &VmName) -> Result<u8, Failure> {
    store.load(name).map_err(store_err)?;
    if store.state(name) != VmState::Live {
        return Err(runtime(anyhow!(
            "VM '{name}' is not running: 'nestvm vm start {name}' starts it"
        )));
    }
    let sock = VmDir::of(store, name).console;
    let stream = UnixStream::connect(&sock).map_err(|e| {
        runtime(anyhow!(
            "cannot reach VM '{name}''s console at {}: {e}",
            sock.display()
        ))
    })?;
    eprintln!("nestvm: attached to VM '{name}'s console; type Ctrl-] to detach");
    let stdin = std::io::stdin();
    let guard = if stdin.is_terminal() {
        RawModeGuard::enable(stdin.as_fd())
    } else {
        None
    };
    let mut from_vm = stream.try_clone().map_err(runtime)?;
    let output = std::thread::spawn(move || {
        let mut out = std::io::stdout();
        let mut buf = [0u8; 4096];
        loop {
            match from_vm.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    if out.write_all(&buf[..n]).and_then(|_| out.flush()).is_err() {
                        return;
                    }
                }
            }
        }
    });
    let mut to_vm = stream;
    let mut buf = [0u8; 256];
    let mut input = stdin.lock();
    let ended_by_vm = loop {
        if output.is_finished() {
            break true;
        }
        let n = match input.read(&mut buf) {
            Ok(0) | Err(_) => break false,
            Ok(n) => n,
        };
        let chunk = &buf[..n];
        let (send, detach) = match chunk.iter().position(|&b| b == DETACH_KEY) {
            Some(i) => (&chunk[..i], true),
            None => (chunk, false),
        };
        if to_vm.write_all(send).is_err() {
            break true;
        }
        if detach {
            break false;
        }
    };
    // Let output that is on its way arrive, then leave.
    std::thread::sleep(std::time::Duration::from_millis(100));
    let _ = to_vm.shutdown(std::net::Shutdown::Both);
    let _ = output.join();
    drop(guard);
    if ended_by_vm {
        eprintln!("\r\nnestvm: the console closed (the VM stopped, or another client attached)");
    } else {
        eprintln!("\r\nnestvm: detached from VM '{name}' (it keeps running)");
    }
    Ok(0)
}
