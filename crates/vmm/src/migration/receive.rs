//! The receiving side of a live migration: accept one sender, check that
//! this host can run its VM, take its memory round after round, then build
//! the VM from the final state — complete and paused, like any other, its
//! disks locked — say `Ready`, and wait for the sender's `Go` (the commit
//! point, see [`super`]). Only then is the VM handed to the run loop, which
//! confirms to the sender once it resumed; without `Go` the VM is dropped
//! unrun.
//!
//! Until a peer is authenticated it is a stranger: it gets
//! [`HANDSHAKE_TIMEOUT`] for the whole handshake and a few hundred bytes per
//! frame ([`super::channel::respond`]), in a thread of its own so that a
//! stalling peer does not hold up the others (at most [`MAX_HANDSHAKES`] at
//! once); one that fails — a wrong key, garbage, an oversized frame,
//! silence — is logged and dropped, and the receiver waits on for the real
//! sender until its own deadline.

use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use nestvm_arch::layout;
use nestvm_kvm::Hypervisor;
use nestvm_snapshot::container;
use nestvm_virtio::Memory;

use super::channel::{self, Channel};
use super::placement::{self, Placement};
use super::secret::Psk;
use super::send::Final;
use super::wire::{self, Kind};
use super::{Hello, MigrationError, PROTOCOL_VERSION};
use crate::builder::BuiltVm;
use crate::persist;

const IO_TIMEOUT: Duration = Duration::from_secs(120);
/// How long a peer has to prove it holds the key, from its connection on.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Handshakes under way at once at most; connections past that are closed.
pub const MAX_HANDSHAKES: usize = 16;

/// A VM that arrived, built and paused.
pub struct Arrived {
    /// The VM.
    pub vm: BuiltVm,
    /// Whether it was running at the source (resume it) or paused.
    pub running: bool,
    /// Says so to the sender once it runs here.
    pub confirm: Confirm,
    /// Page data received.
    pub bytes: u64,
}

/// The sender, waiting to hear that the VM runs here.
pub struct Confirm(Channel<TcpStream>);

impl Confirm {
    /// Tells the sender the VM runs here: it ends its copy of the VM.
    pub fn resumed(mut self) {
        if let Err(e) = wire::send(&mut self.0, Kind::Resumed, &[]) {
            log::warn!("migration: cannot confirm to the sender: {e}");
        }
    }
}

/// Listens on `addr` (`HOST:PORT`).
pub fn listen(addr: &str) -> Result<TcpListener, MigrationError> {
    TcpListener::bind(addr).map_err(|source| MigrationError::Listen {
        addr: addr.to_owned(),
        source,
    })
}

/// Why this host cannot take the VM `hello` describes, if it cannot.
fn refusal(hello: &Hello, hv: &Hypervisor) -> Option<String> {
    if hello.version != PROTOCOL_VERSION {
        return Some(format!(
            "migration protocol {} here, {} there: use the same nestvm on both hosts",
            PROTOCOL_VERSION, hello.version
        ));
    }
    if let Err(e) = hello.config.validate() {
        return Some(format!("its definition is not valid here: {e}"));
    }
    if hello.cpuid.len() != hello.config.cpus as usize {
        return Some("its CPUID tables do not match its vCPU count".into());
    }
    if let Err(e) = persist::check_cpu(&hello.cpuid, hello.nested, hv) {
        return Some(e.to_string());
    }
    // Its disks and TAPs, where the receiver placed them, must be here.
    if let Err(e) = placement::check_here(&hello.config, &hello.source) {
        return Some(e.to_string());
    }
    None
}

/// How a receiver takes a VM: its secret, how long it waits for the
/// sender, and where the VM's disks and TAPs go here.
pub struct Terms<'a> {
    /// The migration secret.
    pub key: &'a Psk,
    /// How long to wait for the sender.
    pub wait: Duration,
    /// Where the VM's disks and TAPs are on this host.
    pub placement: &'a Placement,
    /// Whether handshakes run under Landlock, reaching no file
    /// (`--landlock`).
    pub landlock: bool,
}

/// Waits up to `terms.wait` for a sender holding the key on `listener`,
/// receives its VM, placed as `terms` say, and builds it paused. The
/// guest's console goes to `console`; `say` hears each step, and each
/// peer that failed to authenticate.
pub fn receive(
    listener: &TcpListener,
    terms: &Terms<'_>,
    hv: &Hypervisor,
    console: Box<dyn Write + Send>,
    say: &dyn Fn(&str),
) -> Result<Arrived, MigrationError> {
    let mut s = authenticated(listener, terms, say)?;
    let result = take_vm(&mut s, terms.placement, hv, console, say);
    // The sender hears why, unless the stream itself is gone.
    if let Err(e) = &result {
        let gone = matches!(
            e,
            MigrationError::Stream(_)
                | MigrationError::Refused(_)
                | MigrationError::Channel(channel::ChannelError::Io(_))
        );
        if !gone {
            let _ = wire::send(
                &mut s,
                Kind::Refuse,
                crate::persist::capture::chain_text(e).as_bytes(),
            );
        }
    }
    let (vm, running, bytes) = result?;
    commit(&mut s)?;
    Ok(Arrived {
        vm,
        running,
        confirm: Confirm(s),
        bytes,
    })
}

/// Says the VM is ready here and waits for the sender to give it up. Any
/// failure means this side must not run it: the sender may resume its own.
fn commit(s: &mut Channel<TcpStream>) -> Result<(), MigrationError> {
    wire::send(s, Kind::Ready, &[])
        .and_then(|()| wire::expect(s, Kind::Go))
        .map(|_| ())
        .map_err(|e| MigrationError::NotCommitted(Box::new(e)))
}

/// Reads the sender's description, refuses a VM this host cannot run,
/// then takes its memory and state.
fn take_vm(
    s: &mut Channel<TcpStream>,
    placement: &Placement,
    hv: &Hypervisor,
    console: Box<dyn Write + Send>,
    say: &dyn Fn(&str),
) -> Result<(BuiltVm, bool, u64), MigrationError> {
    let mut hello: Hello = serde_json::from_slice(&wire::expect(s, Kind::Hello)?)
        .map_err(|e| MigrationError::protocol(format!("bad hello: {e}")))?;
    let placed = placement
        .rewrite(&mut hello.config)
        .map_err(|e| e.to_string());
    if let Some(why) = placed.err().or_else(|| refusal(&hello, hv)) {
        let _ = wire::send(s, Kind::Refuse, why.as_bytes());
        return Err(MigrationError::Refused(format!("this host refused: {why}")));
    }
    let mem = Memory::from_ranges(&layout::ram_ranges(hello.config.memory))
        .map_err(|e| MigrationError::Memory(e.to_string()))?;
    // The KVM side is made now, while memory arrives, not in the downtime.
    let skeleton = persist::Skeleton::new(&hello.cpuid, mem, hv)
        .map_err(|e| MigrationError::Build(Box::new(e)))?;
    wire::send(s, Kind::Accept, &[])?;
    say("accepted the VM; receiving its memory");
    take(s, &hello, placement, skeleton, hv, console)
}

/// The outcome of one connection's handshake, from its thread.
type Handshake = (String, Result<Channel<TcpStream>, channel::ChannelError>);

/// Accepts connections until one authenticates, within `wait` in all;
/// says why each other one was dropped. Each handshake runs in a thread of
/// its own, at most [`MAX_HANDSHAKES`] at once, so peers that stall until
/// their deadline do not hold up the real sender behind them.
fn authenticated(
    listener: &TcpListener,
    terms: &Terms<'_>,
    say: &dyn Fn(&str),
) -> Result<Channel<TcpStream>, MigrationError> {
    let (key, wait) = (terms.key, terms.wait);
    let deadline = Instant::now() + wait;
    listener
        .set_nonblocking(true)
        .map_err(MigrationError::Stream)?;
    let (done, results) = mpsc::channel::<Handshake>();
    let mut in_flight = 0usize;
    loop {
        while let Ok((peer, result)) = results.try_recv() {
            in_flight -= 1;
            match result {
                Ok(ch) => {
                    say(&format!("sender {peer} authenticated"));
                    return Ok(ch);
                }
                Err(e) => say(&format!(
                    "dropped a connection from {peer} that failed the handshake: {}; still waiting",
                    crate::persist::capture::chain_text(&e)
                )),
            }
        }
        // Checked on every turn: a stream of connections does not extend it.
        if Instant::now() > deadline {
            return Err(MigrationError::Timeout(wait));
        }
        match listener.accept() {
            Ok((s, peer)) if in_flight < MAX_HANDSHAKES => {
                log::info!("migration: connection from {peer}");
                in_flight += 1;
                let peer = (peer.to_string(), terms.landlock);
                handshake(s, peer, key.clone(), done.clone());
            }
            Ok((_, peer)) => say(&format!(
                "dropped a connection from {peer}: {MAX_HANDSHAKES} handshakes are under way"
            )),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(MigrationError::Stream(e)),
        }
    }
}

/// Runs the receiver's half of the handshake with `s` in a thread, which
/// reports to `done` (to nobody if a sender was chosen meanwhile). The
/// thread can open no file (with Landlock): a stranger's bytes reach it.
fn handshake(
    s: TcpStream,
    (peer, landlock): (String, bool),
    key: Psk,
    done: mpsc::Sender<Handshake>,
) {
    let (report, who) = (done.clone(), peer.clone());
    let spawned = std::thread::Builder::new()
        .name("migrate-handshake".into())
        .spawn(move || {
            let confined = crate::jail::enter_no_files(landlock)
                .map_err(|e| channel::ChannelError::Io(std::io::Error::other(e)));
            let result = confined
                .and_then(|_| s.set_nonblocking(false).map_err(channel::ChannelError::Io))
                .and_then(|()| {
                    let _ = s.set_nodelay(true);
                    channel::respond(s, &key, HANDSHAKE_TIMEOUT, IO_TIMEOUT)
                });
            let _ = done.send((peer, result));
        });
    if let Err(e) = spawned {
        let _ = report.send((who, Err(channel::ChannelError::Io(e))));
    }
}

/// Takes memory until the final state, then builds the VM.
fn take(
    s: &mut Channel<TcpStream>,
    hello: &Hello,
    placement: &Placement,
    skeleton: persist::Skeleton,
    hv: &Hypervisor,
    console: Box<dyn Write + Send>,
) -> Result<(BuiltVm, bool, u64), MigrationError> {
    let mem = skeleton.memory();
    let mut bytes = 0u64;
    let state = loop {
        match wire::recv(s)? {
            (Kind::Pages, payload) => {
                wire::apply_pages(mem, &payload)?;
                bytes += payload.len() as u64;
            }
            (Kind::State, payload) => break payload,
            // At once: the sender times the answer.
            (Kind::Ping, payload) => wire::send(s, Kind::Pong, &payload)?,
            (kind, _) => {
                return Err(MigrationError::protocol(format!(
                    "unexpected {kind:?} during the copy"
                )))
            }
        }
    };
    let json = container::decode(std::path::Path::new("the migrated state"), &state)
        .map_err(|e| MigrationError::protocol(e.to_string()))?;
    let mut fin: Final = serde_json::from_slice(json)
        .map_err(|e| MigrationError::protocol(format!("bad state: {e}")))?;
    // The state must describe the VM that was accepted, not another one,
    // and its disks and TAPs go where the first description's went.
    placement
        .rewrite(&mut fin.snapshot.config)
        .map_err(|e| MigrationError::protocol(format!("the final state: {e}")))?;
    if fin.snapshot.config != hello.config
        || fin.snapshot.nested != hello.nested
        || fin.snapshot.cpuid != hello.cpuid
    {
        return Err(MigrationError::protocol(
            "the final state is not the VM first described",
        ));
    }
    if let Some(want) = fin.memory_digest {
        let got = wire::memory_digest(mem)?;
        if got != want {
            return Err(MigrationError::Differs { got, want });
        }
    }
    let vm = skeleton
        .restore(fin.snapshot, hv, console)
        .map_err(|e| MigrationError::Restore(Box::new(e)))?;
    Ok((vm, fin.running, bytes))
}
