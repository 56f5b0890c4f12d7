//! What L1's CPUs are doing when L1 falls silent: QEMU's human monitor on
//! a private Unix socket, asked for every CPU's registers. A scenario that
//! hangs (L1 printing nothing, not even its own lockup warnings) then
//! leaves in its log where each CPU was, instead of only a timeout. L1
//! boots with `nokaslr`, and its init prints where the KVM modules were
//! loaded, so the instruction pointers read straight against the kernel
//! package's System.map and the modules' symbols.
//!
//! It also wakes L1 from a lost wakeup, a QEMU 7.2 TCG bug seen in the lab:
//! L1's local APIC holds a pending interrupt (its timer's) that never
//! reaches the CPU, so L1 gets no control until something else interrupts
//! it (for 11 minutes in one run, its clock jumping by as much after).
//! The CPU is then either halted in L1, or running one of L1's nested
//! guests, which should have left guest mode for that interrupt within
//! microseconds (seen: 80 s in L3's ticker while L1 reported a soft
//! lockup). [`Monitor::lost_wakeup`] observes a pending interrupt with
//! nothing in service, the same in two looks a second apart, whatever the
//! CPU runs, and [`Monitor::poke`] presses a key on L1's keyboard: the new
//! interrupt makes QEMU look at the APIC again, and the pending one is
//! delivered (L1 has no console on its keyboard, so the key press itself
//! does nothing there, and a poke that was not needed does no harm).

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// How long L1 may print nothing before its CPUs are looked at.
pub const SILENCE: Duration = Duration::from_secs(90);
/// Looks per run at most (a run that stays silent is looked at this often,
/// enough to tell a CPU stuck in one place from one going round a loop).
pub const LOOKS: usize = 3;
/// How long one answer of the monitor may take.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(5);
/// The prompt that ends each of the monitor's answers.
const PROMPT: &str = "(qemu) ";

/// QEMU's monitor socket for one run; the socket file goes with it.
pub struct Monitor {
    path: PathBuf,
}

impl Monitor {
    /// A socket path of its own for the run of scenario `name`.
    pub fn new(name: &str) -> Self {
        let path =
            std::env::temp_dir().join(format!("nestvm-lab-{}-{name}.monitor", std::process::id()));
        let _ = std::fs::remove_file(&path);
        Self { path }
    }

    /// QEMU's `-monitor` argument for it.
    pub fn qemu_arg(&self) -> String {
        format!("unix:{},server=on,wait=off", self.path.display())
    }

    /// Where the socket is.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Every CPU's registers, which CPU is where, and the first CPU's
    /// local APIC, as the monitor prints them (terminal escapes removed).
    pub fn cpus(&self) -> std::io::Result<String> {
        let mut s = UnixStream::connect(&self.path)?;
        s.set_read_timeout(Some(ANSWER_TIMEOUT))?;
        // The greeting ends in the first prompt.
        let mut text = read_until_prompts(&mut s, 1)?;
        s.write_all(b"info cpus\ninfo registers -a\ninfo lapic\n")?;
        text.push_str(&read_until_prompts(&mut s, 3)?);
        Ok(plain(&text))
    }
}

impl Monitor {
    /// The monitor's answers to `commands` (one per line), escapes removed.
    fn ask(&self, commands: &[&str]) -> std::io::Result<String> {
        let mut s = UnixStream::connect(&self.path)?;
        s.set_read_timeout(Some(ANSWER_TIMEOUT))?;
        read_until_prompts(&mut s, 1)?;
        let mut line = commands.join("\n");
        line.push('\n');
        s.write_all(line.as_bytes())?;
        Ok(plain(&read_until_prompts(&mut s, commands.len())?))
    }

    /// Whether L1's local APIC holds an interrupt pending, with none in
    /// service: looked at twice, a second apart (a pending interrupt
    /// reaches a halted CPU, or takes a CPU out of a nested guest, in
    /// microseconds).
    pub fn lost_wakeup(&self) -> std::io::Result<Option<u32>> {
        let first = self.ask(&["info registers", "info lapic"])?;
        let Some(vector) = stuck(&first) else {
            return Ok(None);
        };
        std::thread::sleep(Duration::from_secs(1));
        let again = self.ask(&["info registers", "info lapic"])?;
        Ok((stuck(&again) == Some(vector)).then_some(vector))
    }

    /// Presses (and lets go of) a key on L1's keyboard.
    pub fn poke(&self) -> std::io::Result<()> {
        self.ask(&["sendkey shift"]).map(drop)
    }
}

/// The pending vector, if `text` (`info registers` and `info lapic` of a
/// one-CPU guest) shows an interrupt requested and nothing in service,
/// and the CPU able to take it: running (in L1 with interrupts on, or in
/// a nested guest, whose registers these then are: L1's timer takes it
/// out of guest mode whatever the guest's flags), or halted with
/// interrupts on. A CPU halted with interrupts off waits for an NMI and
/// is not stuck this way.
fn stuck(text: &str) -> Option<u32> {
    let halted = text.contains("HLT=1");
    let if_set = text
        .split_whitespace()
        .find_map(|w| w.strip_prefix("RFL="))
        .and_then(|v| u64::from_str_radix(v, 16).ok())
        .is_some_and(|rfl| rfl & 0x200 != 0);
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .map(str::trim)
    };
    let idle = field("ISR").is_some_and(|v| v.starts_with("(none)"));
    let pending = field("IRR").and_then(|v| v.split_whitespace().next()?.parse().ok());
    ((!halted || if_set) && idle).then_some(pending).flatten()
}

impl Drop for Monitor {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Reads until `n` more prompts came, the monitor closed, or it went
/// quiet for [`ANSWER_TIMEOUT`].
fn read_until_prompts(s: &mut UnixStream, n: usize) -> std::io::Result<String> {
    let start = Instant::now();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    while String::from_utf8_lossy(&out).matches(PROMPT).count() < n {
        if start.elapsed() > ANSWER_TIMEOUT * 2 {
            break;
        }
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(k) => out.extend_from_slice(&buf[..k]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                break
            }
            Err(e) => return Err(e),
        }
    }
    Ok(String::from_utf8_lossy(&out).into_owned())
}

/// `text` without terminal escapes (`ESC [ ... letter`) and carriage
/// returns, which the monitor's line editor sprinkles in.
fn plain(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        match c {
            '\x1b' => {
                for e in chars.by_ref() {
                    if e.is_ascii_alphabetic() {
                        break;
                    }
                }
            }
            '\r' => {}
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    #[test]
    fn an_interrupt_pending_and_never_taken_is_stuck() {
        let regs = "RIP=ffffffff81a592eb RFL=00000206 [-----P-] CPL=0 II=0 A20=1 SMM=0 HLT=1\n";
        let lapic = "Timer\t DCR=0x3 current_count = 0\nISR\t (none)\nIRR\t 236\n";
        assert_eq!(stuck(&format!("{regs}{lapic}")), Some(236));
        // Running (in L1, or in a nested guest with its own flags, as in
        // the lab's L3 ticker): stuck as well.
        let running = "RIP=000000000010000a RFL=00000002 [-------] CPL=0 II=0 A20=1 SMM=0 HLT=0\n";
        assert_eq!(stuck(&format!("{running}{lapic}")), Some(236));
        // Halted with interrupts off, serving one, or nothing pending: not.
        assert_eq!(
            stuck(&format!("{}{lapic}", regs.replace("00000206", "00000006"))),
            None
        );
        assert_eq!(
            stuck(&format!("{regs}{}", lapic.replace("(none)", "236"))),
            None
        );
        assert_eq!(
            stuck(&format!(
                "{running}{}",
                lapic.replace("IRR\t 236", "IRR\t (none)")
            )),
            None
        );
    }

    #[test]
    fn escapes_and_carriage_returns_are_removed() {
        assert_eq!(plain("a\x1b[K\x1b[Db\r\nc"), "ab\nc");
    }

    /// A stand-in monitor that greets, then answers the three commands with
    /// a line and a prompt each, as QEMU's does.
    #[test]
    fn the_answer_is_read_up_to_the_last_prompt() {
        let m = Monitor::new("watchdog-test");
        let listener = UnixListener::bind(m.path()).unwrap();
        let peer = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            s.write_all(b"QEMU monitor\r\n(qemu) ").unwrap();
            let mut got = Vec::new();
            let mut buf = [0u8; 64];
            while got.iter().filter(|&&b| b == b'\n').count() < 3 {
                let n = s.read(&mut buf).unwrap();
                got.extend_from_slice(&buf[..n]);
            }
            let answers = "* CPU #0: thread_id=1\r\n(qemu) RIP=ffffffff81000000\r\n(qemu) \
                           ISR\t (none)\r\n(qemu) ";
            s.write_all(answers.as_bytes()).unwrap();
            String::from_utf8(got).unwrap()
        });
        let text = m.cpus().unwrap();
        assert_eq!(
            peer.join().unwrap(),
            "info cpus\ninfo registers -a\ninfo lapic\n"
        );
        assert!(text.contains("CPU #0") && text.contains("RIP=ffffffff81000000"));
        assert!(text.contains("ISR\t (none)"));
        assert!(!text.contains('\r'));
    }
}
