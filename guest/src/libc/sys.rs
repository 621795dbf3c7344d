//! The process: `write` to the console, `sysconf` and `getrusage` with real figures (memory
//! from the VMM's STATS call), and the end of the program (`exit`, `abort`, fatal errors) with
//! its `@result` line.

use core::fmt::Write;
use core::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use crate::sched::{self, NoPreempt};
use crate::{heap, mem};

use super::errno::EINVAL;
use super::time::{Timeval, now_ns, tsc_to_ns};

static CPUS: AtomicU32 = AtomicU32::new(1);
/// The running program's name and when its `main` started (ns since boot).
static NAME: spin_name::Name = spin_name::Name::new();
static START_NS: AtomicU64 = AtomicU64::new(0);
/// The largest resident size a `getrusage` saw, in KiB.
static MAX_RSS_KIB: AtomicU64 = AtomicU64::new(0);

/// A fixed-size name that can be set once and read from any vCPU.
mod spin_name {
    use core::cell::UnsafeCell;
    use core::sync::atomic::{AtomicUsize, Ordering};

    pub struct Name {
        len: AtomicUsize,
        buf: UnsafeCell<[u8; 64]>,
    }

    // SAFETY: `buf` is written once, before `len` is published with Release; readers read it
    // after an Acquire load of `len`.
    unsafe impl Sync for Name {}

    impl Name {
        pub const fn new() -> Self {
            Name { len: AtomicUsize::new(0), buf: UnsafeCell::new([0; 64]) }
        }

        pub fn set(&self, s: &str) {
            let n = s.len().min(64);
            // SAFETY: called once, before any reader (see the Sync impl).
            unsafe { (&mut *self.buf.get())[..n].copy_from_slice(&s.as_bytes()[..n]) };
            self.len.store(n, Ordering::Release);
        }

        pub fn get(&self) -> &str {
            let n = self.len.load(Ordering::Acquire);
            // SAFETY: the first n bytes were written before n was published.
            let b = unsafe { &(&*self.buf.get())[..n] };
            core::str::from_utf8(b).unwrap_or("?")
        }
    }
}

pub fn init(cpus: u32, name: &str) {
    CPUS.store(cpus.max(1), Ordering::Relaxed);
    NAME.set(name);
}

/// Marks the start of `main`.
pub fn started() {
    START_NS.store(now_ns(), Ordering::Relaxed);
}

pub fn cpus() -> u32 {
    CPUS.load(Ordering::Relaxed)
}

/// Writes bytes to the console (both stdout and stderr go there).
pub fn console_write(bytes: &[u8]) {
    let _g = NoPreempt::new();
    crate::console::write_bytes(bytes);
}

/// # Safety
/// `buf` is readable for `len` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn write(fd: i32, buf: *const u8, len: usize) -> isize {
    if fd != 1 && fd != 2 {
        super::set_errno(9); // EBADF
        return -1;
    }
    // SAFETY: as the caller promised.
    console_write(unsafe { core::slice::from_raw_parts(buf, len) });
    len as isize
}

fn stats() -> Option<protocol::MemStats> {
    let _g = NoPreempt::new();
    mem::stats(0).ok()
}

/// Frames the guest holds (everything the VMM handed it), in pages.
fn used_pages() -> u64 {
    stats().map_or(0, |s| s.allocated_frames.saturating_sub(s.balloon_frames))
}

#[unsafe(no_mangle)]
pub extern "C" fn sysconf(name: i32) -> i64 {
    const SC_CLK_TCK: i32 = 2;
    const SC_OPEN_MAX: i32 = 4;
    const SC_PAGESIZE: i32 = 30;
    const SC_NPROCESSORS_CONF: i32 = 83;
    const SC_NPROCESSORS_ONLN: i32 = 84;
    const SC_PHYS_PAGES: i32 = 85;
    const SC_AVPHYS_PAGES: i32 = 86;
    match name {
        SC_CLK_TCK => 100,
        SC_OPEN_MAX => 1024,
        SC_PAGESIZE => 4096,
        SC_NPROCESSORS_CONF | SC_NPROCESSORS_ONLN => i64::from(cpus()),
        SC_PHYS_PAGES => stats().map_or(-1, |s| s.total_frames as i64),
        SC_AVPHYS_PAGES => stats().map_or(-1, |s| s.free_frames as i64),
        _ => {
            super::set_errno(EINVAL);
            -1
        }
    }
}

#[unsafe(no_mangle)]
pub extern "C" fn getpagesize() -> i32 {
    4096
}

#[unsafe(no_mangle)]
pub extern "C" fn get_nprocs() -> i32 {
    cpus() as i32
}

#[unsafe(no_mangle)]
pub extern "C" fn get_nprocs_conf() -> i32 {
    cpus() as i32
}

#[unsafe(no_mangle)]
pub extern "C" fn getpid() -> i32 {
    1
}

/// glibc's `struct rusage`.
#[repr(C)]
pub struct Rusage {
    utime: Timeval,
    stime: Timeval,
    maxrss: i64,
    ixrss: i64,
    idrss: i64,
    isrss: i64,
    minflt: i64,
    majflt: i64,
    nswap: i64,
    inblock: i64,
    oublock: i64,
    msgsnd: i64,
    msgrcv: i64,
    nsignals: i64,
    nvcsw: i64,
    nivcsw: i64,
}

/// CPU time (all threads, or the caller's), the largest resident size seen (KiB, from the
/// VMM), page faults the guest took, switches.
///
/// # Safety
/// `usage` is writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn getrusage(who: i32, usage: *mut Rusage) -> i32 {
    const RUSAGE_SELF: i32 = 0;
    const RUSAGE_THREAD: i32 = 1;
    let tsc = match who {
        RUSAGE_SELF => sched::process_tsc(cpus()),
        RUSAGE_THREAD => sched::thread_tsc(),
        _ => {
            super::set_errno(EINVAL);
            return -1;
        }
    };
    let ns = tsc_to_ns(tsc);
    let rss = used_pages() * 4;
    let max = MAX_RSS_KIB.fetch_max(rss, Ordering::Relaxed).max(rss);
    let r = Rusage {
        utime: Timeval { tv_sec: (ns / 1_000_000_000) as i64, tv_usec: (ns % 1_000_000_000 / 1000) as i64 },
        stime: Timeval { tv_sec: 0, tv_usec: 0 },
        maxrss: max as i64,
        ixrss: 0,
        idrss: 0,
        isrss: 0,
        minflt: crate::trap::LAZY_FAULTS.load(Ordering::Relaxed) as i64,
        majflt: 0,
        nswap: 0,
        inblock: 0,
        oublock: 0,
        msgsnd: 0,
        msgrcv: 0,
        nsignals: 0,
        nvcsw: sched::SWITCHES.load(Ordering::Relaxed) as i64,
        nivcsw: sched::PREEMPTIONS.load(Ordering::Relaxed) as i64,
    };
    // SAFETY: as the caller promised.
    unsafe { usage.write(r) };
    0
}

/// Frees that the VMM refused on any vCPU so far (after draining this vCPU's magazines).
fn bad_frees() -> u64 {
    let _g = NoPreempt::new();
    heap::flush();
    (0..cpus()).map(heap::bad_frees_of).sum()
}

/// Ends the program with `status`: prints its `@result` line and stops the VM (exit status 0
/// for status 0, `PROGRAM_FAILED` otherwise, `ABORTED` if the allocator refused a free).
fn finish(status: i32, aborted: bool) -> ! {
    let _g = NoPreempt::new();
    let wall = now_ns().saturating_sub(START_NS.load(Ordering::Relaxed));
    let bad = bad_frees();
    let (waited, exchanging) = heap::all_cycles(cpus());
    let mut status = status;
    let mut aborted = aborted;
    if bad > 0 && !aborted {
        crate::println!("free(): invalid pointer: the VMM refused {bad} free(s) (a double free, or not an object)");
        status = 134;
        aborted = true;
    }
    crate::println!(
        "@result scenario=cbench name={} status={status} wall_ns={wall} threads={} exits={} allocs={} bad_frees={bad} \
         switches={} preemptions={} service_waits={} service_wait_ns={} exchange_ns={} busy_ns={}",
        NAME.get(),
        sched::CREATED.load(Ordering::Relaxed).saturating_sub(1),
        heap::all_exits(cpus()),
        heap::all_allocs(cpus()),
        sched::SWITCHES.load(Ordering::Relaxed),
        sched::PREEMPTIONS.load(Ordering::Relaxed),
        heap::all_service_waits(cpus()),
        tsc_to_ns(waited),
        tsc_to_ns(exchanging),
        tsc_to_ns(crate::sched::process_tsc(cpus())),
    );
    let code = if aborted {
        protocol::exit::ABORTED
    } else if status == 0 {
        protocol::exit::SUCCESS
    } else {
        protocol::exit::PROGRAM_FAILED
    };
    crate::arch::exit(code)
}

/// Called by the C runtime's `exit` once `atexit` handlers ran and streams are flushed.
#[unsafe(no_mangle)]
pub extern "C" fn __cbench_exit(status: i32) -> ! {
    finish(status, false)
}

#[unsafe(no_mangle)]
pub extern "C" fn __cbench_abort() -> ! {
    finish(134, true)
}

/// A signal with the default action arrived: the program ends as if killed (status 128 + sig).
pub fn killed(sig: i32) -> ! {
    let _ = writeln!(crate::console::RawConsole, "guest: the program got signal {sig}");
    finish(128 + sig, sig == super::signal::SIGABRT)
}

/// An error the C library reports and dies of (like glibc's "free(): invalid pointer").
pub fn fatal(args: core::fmt::Arguments<'_>) -> ! {
    crate::println!("{args}");
    finish(134, true)
}

/// The last thread ended (without `exit`): the program ends with status 0, as on Linux.
pub fn last_thread_ended() -> ! {
    unsafe extern "C" {
        fn exit(status: i32) -> !;
    }
    // SAFETY: the C runtime's exit runs atexit handlers, flushes, and calls __cbench_exit.
    unsafe { exit(0) }
}
