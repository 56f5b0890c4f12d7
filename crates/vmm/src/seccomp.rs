//! seccomp filters for the VMM's threads, one per kind of thread
//! ([`Role`]), each allowing the system calls that thread makes and no
//! other; KVM's ioctls are named one by one. A call outside the filter
//! traps: `nestvm_kvm::sigsys` writes which call it was to the VMM's log
//! and ends the VMM ([`Mode::On`], the default), or the kernel logs it and
//! lets it through ([`Mode::Log`], to find what a filter lacks), or no
//! filter is installed ([`Mode::Off`]).
//!
//! Each thread installs its own filter as it starts, before it runs guest
//! code or reads anything a guest or a client sent: the vCPU threads
//! before their first `KVM_RUN`, the API thread before its first
//! connection, the migration thread before it connects, and the event
//! loop's thread after it has built the VM and started the others, just
//! before the vCPUs are resumed. A filter is inherited by threads started
//! later, so the event loop's allows what the migration thread (started
//! from it) needs; each thread's own filter is what narrows it.
//!
//! Every thread may log, and logging may rotate `vmm.log` or `console.log`
//! (open, rename, dup2): those calls are in every filter.

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

use nestvm_kvm::kvm_bindings::{
    kvm_clock_data, kvm_debugregs, kvm_dirty_log, kvm_fpu, kvm_irqchip, kvm_lapic_state,
    kvm_mp_state, kvm_msrs, kvm_nested_state, kvm_pit_state2, kvm_regs, kvm_sregs,
    kvm_userspace_memory_region, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
};

/// Whether filters are installed, and what a call outside one does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mode {
    /// Filters on; a call outside one ends the VMM with a log line.
    #[default]
    On,
    /// Filters on; a call outside one is logged by the kernel (the audit
    /// log, `dmesg`) and allowed.
    Log,
    /// No filters.
    Off,
}

/// A seccomp mode that is not one.
#[derive(Debug, thiserror::Error)]
#[error("'{0}' is not on, log or off")]
pub struct ModeError(String);

impl std::str::FromStr for Mode {
    type Err = ModeError;
    fn from_str(s: &str) -> Result<Self, ModeError> {
        match s {
            "on" => Ok(Mode::On),
            "log" => Ok(Mode::Log),
            "off" => Ok(Mode::Off),
            _ => Err(ModeError(s.to_owned())),
        }
    }
}

impl Mode {
    /// `on`, `log` or `off`.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::On => "on",
            Mode::Log => "log",
            Mode::Off => "off",
        }
    }
}

/// The kinds of VMM thread, each with a filter of its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// A vCPU: `KVM_RUN`, its own state ioctls, and the devices it reaches
    /// through the buses (the serial port writes the console's files).
    Vcpu,
    /// The event loop: devices' queues, the console, the controller
    /// (saves, checkpoints, the dirty log), and what the migration thread
    /// started from it needs.
    EventLoop,
    /// The control API's thread: accept, read and answer requests.
    Api,
    /// An outgoing migration: connect, then send memory and state.
    Migration,
    /// The control API's guest thread: connect to the VM's own vsock
    /// socket, talk to the guest's agent, answer the API's client.
    Agent,
}

/// Why a filter could not be made or installed.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    /// The rules did not make a filter.
    #[error("cannot build the {0:?} thread's seccomp filter")]
    Build(Role, #[source] seccompiler::BackendError),
    /// The filter did not compile to BPF.
    #[error("cannot compile the {0:?} thread's seccomp filter")]
    Compile(Role, #[source] seccompiler::BackendError),
    /// The trap handler could not be installed.
    #[error("cannot install the SIGSYS handler")]
    Handler(#[source] std::io::Error),
    /// The kernel refused the filter.
    #[error("cannot install the {0:?} thread's seccomp filter")]
    Install(Role, #[source] seccompiler::Error),
}

const KVMIO: u32 = 0xAE;
vmm_sys_util::ioctl_io_nr!(KVM_RUN, KVMIO, 0x80);
vmm_sys_util::ioctl_ior_nr!(KVM_GET_REGS, KVMIO, 0x81, kvm_regs);
vmm_sys_util::ioctl_iow_nr!(KVM_SET_REGS, KVMIO, 0x82, kvm_regs);
vmm_sys_util::ioctl_ior_nr!(KVM_GET_SREGS, KVMIO, 0x83, kvm_sregs);
vmm_sys_util::ioctl_iow_nr!(KVM_SET_SREGS, KVMIO, 0x84, kvm_sregs);
vmm_sys_util::ioctl_iowr_nr!(KVM_GET_MSRS, KVMIO, 0x88, kvm_msrs);
vmm_sys_util::ioctl_iow_nr!(KVM_SET_MSRS, KVMIO, 0x89, kvm_msrs);
vmm_sys_util::ioctl_ior_nr!(KVM_GET_FPU, KVMIO, 0x8c, kvm_fpu);
vmm_sys_util::ioctl_iow_nr!(KVM_SET_FPU, KVMIO, 0x8d, kvm_fpu);
vmm_sys_util::ioctl_ior_nr!(KVM_GET_LAPIC, KVMIO, 0x8e, kvm_lapic_state);
vmm_sys_util::ioctl_iow_nr!(KVM_SET_LAPIC, KVMIO, 0x8f, kvm_lapic_state);
vmm_sys_util::ioctl_ior_nr!(KVM_GET_MP_STATE, KVMIO, 0x98, kvm_mp_state);
vmm_sys_util::ioctl_iow_nr!(KVM_SET_MP_STATE, KVMIO, 0x99, kvm_mp_state);
vmm_sys_util::ioctl_ior_nr!(KVM_GET_VCPU_EVENTS, KVMIO, 0x9f, kvm_vcpu_events);
vmm_sys_util::ioctl_iow_nr!(KVM_SET_VCPU_EVENTS, KVMIO, 0xa0, kvm_vcpu_events);
vmm_sys_util::ioctl_ior_nr!(KVM_GET_DEBUGREGS, KVMIO, 0xa1, kvm_debugregs);
vmm_sys_util::ioctl_iow_nr!(KVM_SET_DEBUGREGS, KVMIO, 0xa2, kvm_debugregs);
vmm_sys_util::ioctl_ior_nr!(KVM_GET_XSAVE, KVMIO, 0xa4, kvm_xsave);
vmm_sys_util::ioctl_iow_nr!(KVM_SET_XSAVE, KVMIO, 0xa5, kvm_xsave);
vmm_sys_util::ioctl_ior_nr!(KVM_GET_XCRS, KVMIO, 0xa6, kvm_xcrs);
vmm_sys_util::ioctl_iow_nr!(KVM_SET_XCRS, KVMIO, 0xa7, kvm_xcrs);
vmm_sys_util::ioctl_io_nr!(KVM_KVMCLOCK_CTRL, KVMIO, 0xad);
vmm_sys_util::ioctl_iowr_nr!(KVM_GET_NESTED_STATE, KVMIO, 0xbe, kvm_nested_state);
vmm_sys_util::ioctl_iow_nr!(KVM_SET_NESTED_STATE, KVMIO, 0xbf, kvm_nested_state);
vmm_sys_util::ioctl_iow_nr!(KVM_GET_DIRTY_LOG, KVMIO, 0x42, kvm_dirty_log);
vmm_sys_util::ioctl_iow_nr!(
    KVM_SET_USER_MEMORY_REGION,
    KVMIO,
    0x46,
    kvm_userspace_memory_region
);
vmm_sys_util::ioctl_iowr_nr!(KVM_GET_IRQCHIP, KVMIO, 0x62, kvm_irqchip);
vmm_sys_util::ioctl_ior_nr!(KVM_GET_CLOCK, KVMIO, 0x7c, kvm_clock_data);
vmm_sys_util::ioctl_ior_nr!(KVM_GET_PIT2, KVMIO, 0x9f, kvm_pit_state2);

/// A vCPU's own ioctls: running it, and reading and writing its state.
fn vcpu_ioctls() -> Vec<u64> {
    [
        KVM_RUN(),
        KVM_GET_REGS(),
        KVM_SET_REGS(),
        KVM_GET_SREGS(),
        KVM_SET_SREGS(),
        KVM_GET_MSRS(),
        KVM_SET_MSRS(),
        KVM_GET_FPU(),
        KVM_SET_FPU(),
        KVM_GET_LAPIC(),
        KVM_SET_LAPIC(),
        KVM_GET_MP_STATE(),
        KVM_SET_MP_STATE(),
        KVM_GET_VCPU_EVENTS(),
        KVM_SET_VCPU_EVENTS(),
        KVM_GET_DEBUGREGS(),
        KVM_SET_DEBUGREGS(),
        KVM_GET_XSAVE(),
        KVM_SET_XSAVE(),
        KVM_GET_XCRS(),
        KVM_SET_XCRS(),
        KVM_KVMCLOCK_CTRL(),
        KVM_GET_NESTED_STATE(),
        KVM_SET_NESTED_STATE(),
        // A network adapter's offloads, set as the guest's driver
        // activates it (a register write, on the vCPU thread).
        libc::TUNSETOFFLOAD,
    ]
    .to_vec()
}

/// The event loop's ioctls: the VM-wide state a save captures, the dirty
/// log, and sockets made non-blocking.
fn event_loop_ioctls() -> Vec<u64> {
    let kvm = [
        KVM_GET_DIRTY_LOG(),
        KVM_SET_USER_MEMORY_REGION(),
        KVM_GET_IRQCHIP(),
        KVM_GET_CLOCK(),
        KVM_GET_PIT2(),
    ];
    let io = [libc::FIONBIO, libc::TCGETS, libc::TCSETS, libc::TIOCGWINSZ];
    kvm.into_iter().chain(io).collect()
}

/// Calls every thread makes: memory, threads' own housekeeping, time,
/// signals (the vCPU kick, the trap itself), and logging, which may
/// rotate a log file.
const COMMON: &[i64] = &[
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_readv,
    libc::SYS_writev,
    libc::SYS_close,
    libc::SYS_futex,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mprotect,
    libc::SYS_madvise,
    libc::SYS_brk,
    libc::SYS_mremap,
    libc::SYS_rt_sigreturn,
    libc::SYS_rt_sigprocmask,
    libc::SYS_sigaltstack,
    libc::SYS_exit,
    libc::SYS_exit_group,
    libc::SYS_sched_yield,
    libc::SYS_sched_getaffinity,
    libc::SYS_getpid,
    libc::SYS_gettid,
    libc::SYS_clock_gettime,
    libc::SYS_clock_nanosleep,
    libc::SYS_nanosleep,
    libc::SYS_restart_syscall,
    libc::SYS_getrandom,
    libc::SYS_lseek,
    libc::SYS_fstat,
    libc::SYS_newfstatat,
    libc::SYS_statx,
    libc::SYS_openat,
    libc::SYS_rename,
    libc::SYS_renameat,
    libc::SYS_renameat2,
    libc::SYS_dup,
    libc::SYS_dup2,
    libc::SYS_dup3,
    libc::SYS_fcntl,
    libc::SYS_poll,
    libc::SYS_ppoll,
];

/// What the event loop adds: its epoll, the devices' files and TAPs, the
/// console's and migration's sockets, saves and checkpoints (files made,
/// synced, renamed, removed; memory read with `pread` or mapped), the
/// balloon (discarding pages), timers and eventfds, signals, and stopping
/// the vCPU threads.
const EVENT_LOOP: &[i64] = &[
    libc::SYS_epoll_create1,
    libc::SYS_epoll_ctl,
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_eventfd2,
    libc::SYS_timerfd_create,
    libc::SYS_timerfd_settime,
    libc::SYS_signalfd4,
    libc::SYS_preadv,
    libc::SYS_pwritev,
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_fsync,
    libc::SYS_fdatasync,
    libc::SYS_fallocate,
    libc::SYS_ftruncate,
    libc::SYS_copy_file_range,
    libc::SYS_sendfile,
    libc::SYS_mkdir,
    libc::SYS_mkdirat,
    libc::SYS_unlink,
    libc::SYS_unlinkat,
    libc::SYS_rmdir,
    libc::SYS_getdents64,
    libc::SYS_flock,
    libc::SYS_fchmod,
    libc::SYS_fchmodat,
    libc::SYS_access,
    libc::SYS_faccessat,
    libc::SYS_faccessat2,
    libc::SYS_readlink,
    libc::SYS_readlinkat,
    libc::SYS_getcwd,
    libc::SYS_socket,
    libc::SYS_connect,
    libc::SYS_accept4,
    libc::SYS_bind,
    libc::SYS_listen,
    libc::SYS_getsockopt,
    libc::SYS_setsockopt,
    libc::SYS_getsockname,
    libc::SYS_getpeername,
    libc::SYS_shutdown,
    libc::SYS_sendto,
    libc::SYS_recvfrom,
    libc::SYS_sendmsg,
    libc::SYS_recvmsg,
    libc::SYS_sendmmsg,
    libc::SYS_recvmmsg,
    libc::SYS_tgkill,
    libc::SYS_rt_sigaction,
    libc::SYS_rt_sigtimedwait,
    libc::SYS_clone3,
    libc::SYS_clone,
    libc::SYS_set_robust_list,
    libc::SYS_rseq,
    libc::SYS_prctl,
    // The migration thread installs its own filter on top.
    libc::SYS_seccomp,
    libc::SYS_getuid,
    libc::SYS_geteuid,
    libc::SYS_uname,
    libc::SYS_mincore,
    // The migration thread's wait for the VM's passt to end.
    libc::SYS_wait4,
];

/// What the API thread adds: its socket's connections, with deadlines.
const API: &[i64] = &[
    libc::SYS_accept4,
    libc::SYS_recvfrom,
    libc::SYS_sendto,
    libc::SYS_setsockopt,
    libc::SYS_getsockopt,
    libc::SYS_shutdown,
    libc::SYS_eventfd2,
    libc::SYS_fsync,
];

/// What the migration thread adds: resolving (glibc: /etc/hosts, a
/// netlink query, DNS) and connecting, the stream.
const MIGRATION: &[i64] = &[
    libc::SYS_socket,
    libc::SYS_connect,
    libc::SYS_bind,
    libc::SYS_sendmmsg,
    libc::SYS_recvmmsg,
    libc::SYS_uname,
    libc::SYS_getsockopt,
    libc::SYS_setsockopt,
    libc::SYS_getsockname,
    libc::SYS_getpeername,
    libc::SYS_sendto,
    libc::SYS_recvfrom,
    libc::SYS_sendmsg,
    libc::SYS_recvmsg,
    libc::SYS_shutdown,
    libc::SYS_pread64,
    libc::SYS_fsync,
    libc::SYS_ioctl,
    // Waiting for the VM's passt to end at the commit point.
    libc::SYS_wait4,
];

/// What the guest thread adds: a connection to the vsock device's socket,
/// with deadlines, and the API client's connection it answers on.
const AGENT: &[i64] = &[
    libc::SYS_socket,
    libc::SYS_connect,
    libc::SYS_recvfrom,
    libc::SYS_sendto,
    libc::SYS_setsockopt,
    libc::SYS_getsockopt,
    libc::SYS_shutdown,
];

/// What a vCPU thread adds: its eventfd reports, the console's files
/// (the serial port writes them) and clients (a socket write).
const VCPU: &[i64] = &[
    libc::SYS_sendto,
    libc::SYS_sendmsg,
    libc::SYS_fsync,
    libc::SYS_tgkill,
];

/// `ioctl` allowed only with one of `requests` as its second argument.
fn ioctl_rules(role: Role, requests: &[u64]) -> Result<Vec<SeccompRule>, SeccompError> {
    requests
        .iter()
        .map(|&r| {
            SeccompCondition::new(1, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, r)
                .and_then(|c| SeccompRule::new(vec![c]))
                .map_err(|e| SeccompError::Build(role, e))
        })
        .collect()
}

/// The filter of `role`, trapping (or, with `log`, logging) other calls.
pub fn filter(role: Role, log: bool) -> Result<BpfProgram, SeccompError> {
    let (own, ioctls): (&[i64], Vec<u64>) = match role {
        Role::Vcpu => (VCPU, vcpu_ioctls()),
        Role::EventLoop => (EVENT_LOOP, event_loop_ioctls()),
        // Its socket made blocking again (FIONBIO).
        Role::Api => (API, vec![libc::FIONBIO]),
        // Its ioctls are a socket's (FIONBIO): the inherited event loop
        // filter names them.
        Role::Migration => (MIGRATION, vec![]),
        Role::Agent => (AGENT, vec![]),
    };
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    for &nr in COMMON.iter().chain(own) {
        rules.insert(nr, vec![]);
    }
    if !ioctls.is_empty() {
        rules.insert(libc::SYS_ioctl, ioctl_rules(role, &ioctls)?);
    }
    let mismatch = match log {
        true => SeccompAction::Log,
        false => SeccompAction::Trap,
    };
    let f = SeccompFilter::new(rules, mismatch, SeccompAction::Allow, TargetArch::x86_64)
        .map_err(|e| SeccompError::Build(role, e))?;
    f.try_into().map_err(|e| SeccompError::Compile(role, e))
}

/// Installs `role`'s filter on the calling thread, as `mode` says.
pub fn install(role: Role, mode: Mode) -> Result<(), SeccompError> {
    if mode == Mode::Off {
        return Ok(());
    }
    nestvm_kvm::sigsys::install().map_err(SeccompError::Handler)?;
    let prog = filter(role, mode == Mode::Log)?;
    seccompiler::apply_filter(&prog).map_err(|e| SeccompError::Install(role, e))
}

/// Installs `role`'s filter on the calling thread, or, if that fails,
/// ends the process: a thread that is to be confined never runs without
/// its filter.
pub fn confine(role: Role, mode: Mode) {
    if let Err(e) = install(role, mode) {
        let mut text = e.to_string();
        let mut cause = std::error::Error::source(&e);
        while let Some(c) = cause {
            text.push_str(&format!(": {c}"));
            cause = c.source();
        }
        eprintln!("nestvm: error: {text}; the VMM stops (--seccomp off runs it unconfined)");
        std::process::exit(1);
    }
}

/// Whether the calling thread runs under a seccomp filter (`Seccomp: 2`
/// in its /proc status).
pub fn confined() -> bool {
    std::fs::read_to_string("/proc/thread-self/status")
        .map(|s| {
            s.lines()
                .any(|l| l.split_whitespace().eq(["Seccomp:", "2"]))
        })
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_filter_builds_and_modes_parse() {
        for role in [
            Role::Vcpu,
            Role::EventLoop,
            Role::Api,
            Role::Migration,
            Role::Agent,
        ] {
            for log in [false, true] {
                assert!(!filter(role, log).unwrap().is_empty(), "{role:?}");
            }
        }
        for m in [Mode::On, Mode::Log, Mode::Off] {
            assert_eq!(m.as_str().parse::<Mode>().unwrap(), m);
        }
        let e = "yes".parse::<Mode>().unwrap_err();
        assert!(e.to_string().contains("on, log or off"), "{e}");
    }

    #[test]
    fn the_kvm_ioctl_numbers_are_the_kernels() {
        // From linux/kvm.h, as `strace -X raw` shows them.
        assert_eq!(KVM_RUN(), 0xae80);
        assert_eq!(KVM_GET_REGS(), 0x8090_ae81);
        assert_eq!(KVM_SET_SREGS(), 0x4138_ae84);
        assert_eq!(KVM_GET_NESTED_STATE(), 0xc080_aebe);
        assert_eq!(KVM_GET_DIRTY_LOG(), 0x4010_ae42);
    }

    /// A thread under the API filter may do what the API does; a call
    /// outside it, in log mode, is let through (the kernel logs it) —
    /// in a thread of its own, so the test process stays unconfined.
    #[test]
    fn a_confined_thread_says_so_and_keeps_working() {
        let t = std::thread::spawn(|| {
            install(Role::Api, Mode::Log).unwrap();
            let confined = confined();
            // mknodat is in no filter: logged, and it fails on its own.
            let dir = std::env::temp_dir();
            let odd = std::fs::metadata(&dir).is_ok();
            (confined, odd)
        });
        assert_eq!(t.join().unwrap(), (true, true));
        assert!(!confined(), "the filter stayed with its thread");
    }
}
