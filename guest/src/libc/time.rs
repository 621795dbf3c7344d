//! Time from the TSC: `clock_gettime`, `gettimeofday`, `time`, `clock`, and sleeping (which
//! blocks the thread, not the vCPU).

use core::sync::atomic::{AtomicU64, Ordering};

use crate::{arch, sched};

use super::errno;

/// TSC kHz (from the boot info), set by `init`.
static TSC_KHZ: AtomicU64 = AtomicU64::new(1);
/// Seconds since the epoch at boot (the realtime clock's offset; the VMM gives none, so a fixed
/// date: clocks only need to move).
const EPOCH_AT_BOOT: u64 = 1_764_201_600;

pub fn init(tsc_khz: u64) {
    TSC_KHZ.store(tsc_khz.max(1), Ordering::Relaxed);
}

pub fn tsc_to_ns(tsc: u64) -> u64 {
    (u128::from(tsc) * 1_000_000 / u128::from(TSC_KHZ.load(Ordering::Relaxed))) as u64
}

pub fn ns_to_tsc(ns: u64) -> u64 {
    (u128::from(ns) * u128::from(TSC_KHZ.load(Ordering::Relaxed)) / 1_000_000).min(u128::from(u64::MAX / 2)) as u64
}

/// Nanoseconds since boot.
pub fn now_ns() -> u64 {
    tsc_to_ns(arch::rdtsc())
}

#[repr(C)]
pub struct Timespec {
    pub tv_sec: i64,
    pub tv_nsec: i64,
}

#[repr(C)]
pub struct Timeval {
    pub tv_sec: i64,
    pub tv_usec: i64,
}

const CLOCK_REALTIME: i32 = 0;
const CLOCK_MONOTONIC: i32 = 1;
const CLOCK_PROCESS_CPUTIME_ID: i32 = 2;
const CLOCK_THREAD_CPUTIME_ID: i32 = 3;
const CLOCK_MONOTONIC_RAW: i32 = 4;
const CLOCK_REALTIME_COARSE: i32 = 5;
const CLOCK_MONOTONIC_COARSE: i32 = 6;
const CLOCK_BOOTTIME: i32 = 7;

/// The clock's reading in ns, or None for an unknown clock.
pub fn clock_ns(clock: i32) -> Option<u64> {
    Some(match clock {
        CLOCK_REALTIME | CLOCK_REALTIME_COARSE => now_ns() + EPOCH_AT_BOOT * 1_000_000_000,
        CLOCK_MONOTONIC | CLOCK_MONOTONIC_RAW | CLOCK_MONOTONIC_COARSE | CLOCK_BOOTTIME => now_ns(),
        CLOCK_PROCESS_CPUTIME_ID => tsc_to_ns(sched::process_tsc(super::sys::cpus())),
        CLOCK_THREAD_CPUTIME_ID => tsc_to_ns(sched::thread_tsc()),
        _ => return None,
    })
}

fn split(ns: u64) -> Timespec {
    Timespec { tv_sec: (ns / 1_000_000_000) as i64, tv_nsec: (ns % 1_000_000_000) as i64 }
}

/// # Safety
/// `ts` is null or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn clock_gettime(clock: i32, ts: *mut Timespec) -> i32 {
    let Some(ns) = clock_ns(clock) else {
        super::set_errno(errno::EINVAL);
        return -1;
    };
    if !ts.is_null() {
        // SAFETY: the caller passes a writable timespec.
        unsafe { ts.write(split(ns)) };
    }
    0
}

/// # Safety
/// `ts` is null or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn clock_getres(clock: i32, ts: *mut Timespec) -> i32 {
    if clock_ns(clock).is_none() {
        super::set_errno(errno::EINVAL);
        return -1;
    }
    if !ts.is_null() {
        // SAFETY: the caller passes a writable timespec.
        unsafe { ts.write(Timespec { tv_sec: 0, tv_nsec: 1 }) };
    }
    0
}

/// # Safety
/// `tv` is null or writable; the time zone is ignored.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn gettimeofday(tv: *mut Timeval, _tz: *mut u8) -> i32 {
    let ns = clock_ns(CLOCK_REALTIME).unwrap_or(0);
    if !tv.is_null() {
        // SAFETY: the caller passes a writable timeval.
        unsafe {
            tv.write(Timeval { tv_sec: (ns / 1_000_000_000) as i64, tv_usec: (ns % 1_000_000_000 / 1000) as i64 })
        };
    }
    0
}

/// # Safety
/// `t` is null or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn time(t: *mut i64) -> i64 {
    let s = (clock_ns(CLOCK_REALTIME).unwrap_or(0) / 1_000_000_000) as i64;
    if !t.is_null() {
        // SAFETY: the caller passes a writable time_t.
        unsafe { t.write(s) };
    }
    s
}

/// Processor time in microseconds (CLOCKS_PER_SEC is a million).
#[unsafe(no_mangle)]
pub extern "C" fn clock() -> i64 {
    (tsc_to_ns(sched::process_tsc(super::sys::cpus())) / 1000) as i64
}

/// Blocks the calling thread for `ns`.
pub fn sleep_ns(ns: u64) {
    sched::sleep_until(arch::rdtsc().saturating_add(ns_to_tsc(ns)));
}

/// # Safety
/// `req` is readable; `rem` is null or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nanosleep(req: *const Timespec, rem: *mut Timespec) -> i32 {
    // SAFETY: the caller passes a readable timespec.
    let r = unsafe { req.as_ref() };
    let Some(r) = r.filter(|r| r.tv_sec >= 0 && (0..1_000_000_000).contains(&r.tv_nsec)) else {
        super::set_errno(errno::EINVAL);
        return -1;
    };
    sleep_ns((r.tv_sec as u64).saturating_mul(1_000_000_000).saturating_add(r.tv_nsec as u64));
    if !rem.is_null() {
        // SAFETY: the caller passes a writable timespec.
        unsafe { rem.write(Timespec { tv_sec: 0, tv_nsec: 0 }) };
    }
    0
}

/// # Safety
/// As for `nanosleep`; only relative sleeps on the supported clocks.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn clock_nanosleep(clock: i32, flags: i32, req: *const Timespec, rem: *mut Timespec) -> i32 {
    const TIMER_ABSTIME: i32 = 1;
    let Some(now) = clock_ns(clock) else { return errno::EINVAL };
    if flags & TIMER_ABSTIME != 0 {
        // SAFETY: the caller passes a readable timespec.
        let Some(r) = (unsafe { req.as_ref() }) else { return errno::EINVAL };
        let at = (r.tv_sec.max(0) as u64).saturating_mul(1_000_000_000).saturating_add(r.tv_nsec.max(0) as u64);
        sleep_ns(at.saturating_sub(now));
        return 0;
    }
    // SAFETY: as the caller promised.
    if unsafe { nanosleep(req, rem) } == 0 { 0 } else { errno::EINVAL }
}

#[unsafe(no_mangle)]
pub extern "C" fn usleep(us: u32) -> i32 {
    sleep_ns(u64::from(us) * 1000);
    0
}

#[unsafe(no_mangle)]
pub extern "C" fn sleep(s: u32) -> u32 {
    sleep_ns(u64::from(s) * 1_000_000_000);
    0
}

/// The TSC deadline of an absolute `CLOCK_REALTIME`/`CLOCK_MONOTONIC` timespec (timed waits).
pub fn deadline_of(clock: i32, ts: &Timespec) -> u64 {
    let at = (ts.tv_sec.max(0) as u64).saturating_mul(1_000_000_000).saturating_add(ts.tv_nsec.max(0) as u64);
    let now = clock_ns(clock).unwrap_or(0);
    arch::rdtsc().saturating_add(ns_to_tsc(at.saturating_sub(now))).max(1)
}
