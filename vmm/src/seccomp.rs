//! Defence in depth: every VMM thread runs under a seccomp-bpf filter (rust-vmm's `seccompiler`,
//! as in Firecracker) that allows only the system calls its kind of thread needs, and `ioctl`
//! only with the requests it makes. A guest that found a bug in the VMM would find a process
//! that can open no sockets, start no programs and reach no other device.
//!
//! A forbidden call traps (`SIGSYS`): the handler prints one line naming the thread kind and the
//! system call, then exits with [`crate::exit_code::SECCOMP`]. `--seccomp=off` disables the
//! filters (for debugging with tools that make their own system calls).
//!
//! Filters are compiled once, before the VM starts; each thread installs its own as it starts
//! its work (setup that needs more, like mapping guest RAM, happens before).

use std::collections::BTreeMap;
use std::os::raw::{c_int, c_void};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};

use kvm_bindings::{kvm_regs, kvm_sregs, kvm_userspace_memory_region};
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter, SeccompRule, TargetArch,
};
use vmm_sys_util::signal::register_signal_handler;
use vmm_sys_util::{ioctl_io_nr, ioctl_ior_nr, ioctl_iow_nr};

use crate::memory::backing::uffd;

const KVMIO: u32 = 0xAE;
ioctl_io_nr!(KVM_RUN, KVMIO, 0x80);
ioctl_ior_nr!(KVM_GET_REGS, KVMIO, 0x81, kvm_regs);
ioctl_ior_nr!(KVM_GET_SREGS, KVMIO, 0x83, kvm_sregs);
ioctl_iow_nr!(KVM_SET_REGS, KVMIO, 0x82, kvm_regs);
ioctl_iow_nr!(KVM_SET_USER_MEMORY_REGION, KVMIO, 0x46, kvm_userspace_memory_region);

#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("cannot build the seccomp filter for {0} threads")]
    Build(&'static str, #[source] seccompiler::BackendError),
    #[error("cannot compile the seccomp filter for {0} threads")]
    Compile(&'static str, #[source] seccompiler::BackendError),
    #[error("cannot install the seccomp filter of a {0} thread")]
    Apply(&'static str, #[source] seccompiler::Error),
    #[error("cannot install the SIGSYS handler")]
    Handler(#[source] vmm_sys_util::errno::Error),
}

/// The kinds of VMM threads, each with its own filter.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
#[repr(u8)]
pub enum ThreadKind {
    /// The main thread once the VM runs: waits for events, writes the stats.
    Main = 1,
    /// A vCPU: `KVM_RUN`, port I/O, memory calls.
    Vcpu = 2,
    /// A second-level fault handler.
    Fault = 3,
    /// The signal-forwarding thread.
    Signals = 4,
    /// The control API's server.
    Api = 5,
    /// The swapper (host-side swap's evictions).
    Swapper = 6,
    /// The ticker (timer ticks for guests that schedule threads).
    Ticker = 7,
    /// The slab rings' service thread.
    Rings = 8,
}

impl ThreadKind {
    const ALL: [ThreadKind; 8] = [
        ThreadKind::Main,
        ThreadKind::Vcpu,
        ThreadKind::Fault,
        ThreadKind::Signals,
        ThreadKind::Api,
        ThreadKind::Swapper,
        ThreadKind::Ticker,
        ThreadKind::Rings,
    ];

    /// The name used in messages.
    pub fn name(self) -> &'static str {
        match self {
            ThreadKind::Main => "main",
            ThreadKind::Vcpu => "vCPU",
            ThreadKind::Fault => "fault handler",
            ThreadKind::Signals => "signals",
            ThreadKind::Api => "API",
            ThreadKind::Swapper => "swapper",
            ThreadKind::Ticker => "ticker",
            ThreadKind::Rings => "slab rings",
        }
    }

    fn from_u8(v: u8) -> Option<ThreadKind> {
        ThreadKind::ALL.into_iter().find(|k| *k as u8 == v)
    }
}

/// The compiled filters, when seccomp is on.
static FILTERS: OnceLock<BTreeMap<ThreadKind, BpfProgram>> = OnceLock::new();

thread_local! {
    /// This thread's kind, for the SIGSYS message (0: none).
    static KIND: AtomicU8 = const { AtomicU8::new(0) };
}

/// System calls every VMM thread makes: memory (the allocator, `MADV_DONTNEED` of guest RAM),
/// locks, console and log output, reading `/proc/self/status`, thread exit, and signal returns
/// (the vCPU kick and signal-hook's handler, which runs in whatever thread the signal hits and
/// writes to its socket).
const COMMON: &[libc::c_long] = &[
    libc::SYS_read,
    // KVM's statistics files are read by position (they ignore lseek).
    libc::SYS_pread64,
    libc::SYS_write,
    libc::SYS_close,
    libc::SYS_openat,
    libc::SYS_statx,
    libc::SYS_newfstatat,
    libc::SYS_fstat,
    libc::SYS_lseek,
    libc::SYS_futex,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_mprotect,
    libc::SYS_madvise,
    libc::SYS_brk,
    libc::SYS_rt_sigreturn,
    libc::SYS_rt_sigprocmask,
    libc::SYS_sigaltstack,
    libc::SYS_sendto,
    libc::SYS_sched_yield,
    libc::SYS_sched_getaffinity,
    libc::SYS_gettid,
    libc::SYS_getpid,
    libc::SYS_clock_gettime,
    libc::SYS_clock_nanosleep,
    libc::SYS_nanosleep,
    libc::SYS_restart_syscall,
    // A panic's report reads the working directory.
    libc::SYS_getcwd,
    // Swap's figures: how much of its location table has memory.
    libc::SYS_mincore,
    libc::SYS_exit,
    libc::SYS_exit_group,
];

/// `ioctl` requests on guest RAM's userfaultfd: installing, waking and write-protecting pages.
fn uffd_ioctls() -> Vec<u64> {
    vec![uffd::UFFDIO_COPY(), uffd::UFFDIO_ZEROPAGE(), uffd::UFFDIO_WAKE(), uffd::UFFDIO_WRITEPROTECT()]
}

/// The system calls and `ioctl` requests a kind of thread may make.
fn allowed(kind: ThreadKind) -> (Vec<libc::c_long>, Vec<u64>) {
    let mut calls = COMMON.to_vec();
    let ioctls = match kind {
        // KVM_RUN and the registers it reads (CR2 for faults, all of them for crash reports)
        // and writes (entering the guest's notification handler), memslots as the memory
        // manager hands out frames, and userfaultfd as it backs or invalidates frames.
        ThreadKind::Vcpu => {
            let mut v = vec![KVM_RUN(), KVM_GET_REGS(), KVM_SET_REGS(), KVM_GET_SREGS(), KVM_SET_USER_MEMORY_REGION()];
            v.extend(uffd_ioctls());
            v
        }
        // Swap-ins read the swap file (buffered files drop their cached pages after); scattered
        // first touches hand missing pages over to the kernel (registered again).
        ThreadKind::Fault => {
            calls.extend([libc::SYS_preadv, libc::SYS_fadvise64]);
            let mut v = uffd_ioctls();
            v.extend([uffd::UFFDIO_UNREGISTER(), uffd::UFFDIO_REGISTER()]);
            v
        }
        // Evictions move pages out of guest RAM and write them; PUT /swap/in reads them back.
        ThreadKind::Swapper => {
            calls.extend([
                libc::SYS_preadv,
                libc::SYS_pwrite64,
                libc::SYS_pwritev,
                libc::SYS_fadvise64,
                libc::SYS_sync_file_range,
                libc::SYS_fdatasync,
            ]);
            let mut v = uffd_ioctls();
            v.push(uffd::UFFDIO_MOVE());
            v
        }
        ThreadKind::Main => {
            // Kicking vCPU threads out of KVM_RUN; removing the API socket at exit.
            calls.extend([libc::SYS_tgkill, libc::SYS_rt_sigaction, libc::SYS_unlink, libc::SYS_unlinkat]);
            Vec::new()
        }
        // What a memory call does to slabs: memslots as frames come into use, userfaultfd as
        // it backs or invalidates them.
        ThreadKind::Rings => {
            let mut v = vec![KVM_SET_USER_MEMORY_REGION()];
            v.extend(uffd_ioctls());
            v
        }
        // Kicks of vCPUs whose ticks are due (and, under --profile, the sampler's kicks).
        ThreadKind::Ticker => {
            calls.push(libc::SYS_tgkill);
            Vec::new()
        }
        ThreadKind::Signals => {
            calls.extend([libc::SYS_recvfrom, libc::SYS_poll, libc::SYS_ppoll]);
            Vec::new()
        }
        // The server's event loop (epoll, its waker), connections on the listening socket it
        // was given, and kicks of the vCPU that takes a notification.
        ThreadKind::Api => {
            calls.extend([
                libc::SYS_epoll_wait,
                libc::SYS_epoll_pwait,
                libc::SYS_epoll_ctl,
                libc::SYS_accept4,
                libc::SYS_recvfrom,
                libc::SYS_recvmsg,
                libc::SYS_sendmsg,
                libc::SYS_writev,
                libc::SYS_shutdown,
                libc::SYS_getsockopt,
                libc::SYS_getrandom,
                libc::SYS_tgkill,
            ]);
            Vec::new()
        }
    };
    (calls, ioctls)
}

fn filter(kind: ThreadKind) -> Result<BpfProgram, SeccompError> {
    let build = |e| SeccompError::Build(kind.name(), e);
    let (calls, ioctls) = allowed(kind);
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = calls.into_iter().map(|c| (c, Vec::new())).collect();
    // Debug builds check that a descriptor is open before closing it (`fcntl(fd, F_GETFD)`).
    let getfd =
        SeccompCondition::new(1, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, libc::F_GETFD as u64).map_err(build)?;
    rules.insert(libc::SYS_fcntl, vec![SeccompRule::new(vec![getfd]).map_err(build)?]);
    if !ioctls.is_empty() {
        let by_request = ioctls
            .into_iter()
            .map(|r| {
                SeccompRule::new(vec![
                    SeccompCondition::new(1, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, r).map_err(build)?,
                ])
                .map_err(build)
            })
            .collect::<Result<Vec<_>, _>>()?;
        rules.insert(libc::SYS_ioctl, by_request);
    }
    let f = SeccompFilter::new(rules, SeccompAction::Trap, SeccompAction::Allow, TargetArch::x86_64).map_err(build)?;
    f.try_into().map_err(|e| SeccompError::Compile(kind.name(), e))
}

/// Compiles every thread kind's filter and installs the SIGSYS handler; from now on each thread
/// calls [`apply`]. Without this (`--seccomp=off`), [`apply`] does nothing.
pub fn enable() -> Result<(), SeccompError> {
    let filters = ThreadKind::ALL.into_iter().map(|k| Ok((k, filter(k)?))).collect::<Result<_, SeccompError>>()?;
    register_signal_handler(libc::SIGSYS, on_sigsys).map_err(SeccompError::Handler)?;
    let _ = FILTERS.set(filters);
    Ok(())
}

/// Installs `kind`'s filter on the calling thread (if seccomp is on). Irrevocable.
pub fn apply(kind: ThreadKind) -> Result<(), SeccompError> {
    let Some(filters) = FILTERS.get() else { return Ok(()) };
    KIND.with(|k| k.store(kind as u8, Ordering::Relaxed));
    seccompiler::apply_filter(&filters[&kind]).map_err(|e| SeccompError::Apply(kind.name(), e))?;
    self_test(kind);
    Ok(())
}

/// `VMM_SECCOMP_SELFTEST=<kind>` (`main`, `vcpu`, `fault`, `signals`, `api`, `swapper`, `ticker`, `rings`): that kind of thread makes
/// a forbidden system call right after installing its filter. For the tests.
fn self_test(kind: ThreadKind) {
    let wanted = std::env::var("VMM_SECCOMP_SELFTEST").ok();
    let name = match kind {
        ThreadKind::Main => "main",
        ThreadKind::Vcpu => "vcpu",
        ThreadKind::Fault => "fault",
        ThreadKind::Signals => "signals",
        ThreadKind::Api => "api",
        ThreadKind::Swapper => "swapper",
        ThreadKind::Ticker => "ticker",
        ThreadKind::Rings => "rings",
    };
    if wanted.as_deref() == Some(name) {
        // SAFETY: socket(2) with constant arguments; it is meant to be refused.
        unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
    }
}

/// `siginfo_t` for SIGSYS, as far as the VMM reads it (`<asm-generic/siginfo.h>`).
#[repr(C)]
struct SigsysInfo {
    si_signo: c_int,
    si_errno: c_int,
    si_code: c_int,
    _pad: c_int,
    call_addr: *mut c_void,
    syscall: c_int,
    arch: u32,
}

/// Names of the system calls a compromised VMM would most likely try.
const NAMES: &[(libc::c_long, &str)] = &[
    (libc::SYS_socket, "socket"),
    (libc::SYS_connect, "connect"),
    (libc::SYS_execve, "execve"),
    (libc::SYS_execveat, "execveat"),
    (libc::SYS_clone, "clone"),
    (libc::SYS_clone3, "clone3"),
    (libc::SYS_fork, "fork"),
    (libc::SYS_ptrace, "ptrace"),
    (libc::SYS_ioctl, "ioctl"),
    (libc::SYS_open, "open"),
    (libc::SYS_mount, "mount"),
    (libc::SYS_kill, "kill"),
    (libc::SYS_tgkill, "tgkill"),
    (libc::SYS_prctl, "prctl"),
    (libc::SYS_userfaultfd, "userfaultfd"),
    (libc::SYS_mbind, "mbind"),
];

/// Async-signal-safe: formats into a stack buffer, writes it, exits the process.
extern "C" fn on_sigsys(_: c_int, info: *mut libc::siginfo_t, _: *mut c_void) {
    // SAFETY: the kernel passes a valid siginfo for SIGSYS, laid out as `SigsysInfo`.
    let nr = unsafe { (*info.cast::<SigsysInfo>()).syscall };
    let kind = KIND.with(|k| ThreadKind::from_u8(k.load(Ordering::Relaxed))).map_or("VMM", ThreadKind::name);
    let name = NAMES.iter().find(|(n, _)| *n == libc::c_long::from(nr)).map_or("?", |(_, s)| s);
    let mut buf = [0u8; 256];
    let mut len = 0;
    let mut put = |s: &[u8]| {
        let n = s.len().min(buf.len() - len);
        buf[len..len + n].copy_from_slice(&s[..n]);
        len += n;
    };
    put(b"vmm: error: seccomp: the ");
    put(kind.as_bytes());
    put(b" thread made a forbidden system call, ");
    let mut digits = [0u8; 12];
    let mut i = digits.len();
    let mut v = nr.unsigned_abs();
    loop {
        i -= 1;
        digits[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    put(&digits[i..]);
    put(b" (");
    put(name.as_bytes());
    put(b"); the VMM stops (--seccomp=off disables the filters)\n");
    // Two threads may trip at once (the swapper and its writer share a filter): one line only.
    static REPORTED: AtomicBool = AtomicBool::new(false);
    let first = !REPORTED.swap(true, Ordering::SeqCst);
    if !first {
        // The first one writes its line and ends the process; exiting here could cut it off.
        loop {
            std::hint::spin_loop();
        }
    }
    // SAFETY: write(2) and _exit(2) are async-signal-safe; the buffer is valid for `len` bytes.
    unsafe {
        libc::write(2, buf.as_ptr().cast(), len);
        libc::_exit(i32::from(crate::exit_code::SECCOMP));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_filter_compiles_and_denies_what_no_thread_needs() {
        for k in ThreadKind::ALL {
            let (calls, _) = allowed(k);
            for forbidden in [libc::SYS_socket, libc::SYS_execve, libc::SYS_clone3, libc::SYS_ptrace] {
                assert!(!calls.contains(&forbidden), "{} may call {forbidden}", k.name());
            }
            assert!(!filter(k).unwrap().is_empty());
        }
    }
}
