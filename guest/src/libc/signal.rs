//! Signals, as far as single-process C benchmarks use them: handlers for `SIGALRM` set with
//! `signal` or `sigaction`, `alarm`, and `raise`. A due alarm runs its handler on whatever
//! thread a tick or an idle vCPU finds (like a process-directed signal), with preemption off.

use core::sync::atomic::{AtomicU64, Ordering};

use crate::arch;

use super::errno::EINVAL;
use super::time::{ns_to_tsc, tsc_to_ns};

pub const SIGABRT: i32 = 6;
pub const SIGALRM: i32 = 14;
const NSIG: usize = 65;
const SIG_DFL: u64 = 0;
const SIG_IGN: u64 = 1;

static HANDLERS: [AtomicU64; NSIG] = [const { AtomicU64::new(SIG_DFL) }; NSIG];
/// TSC deadline of the pending alarm (0: none).
static ALARM: AtomicU64 = AtomicU64::new(0);

fn valid(sig: i32) -> bool {
    (1..NSIG as i32).contains(&sig) && sig != 9 && sig != 19
}

#[unsafe(no_mangle)]
pub extern "C" fn signal(sig: i32, handler: u64) -> u64 {
    if !valid(sig) {
        super::set_errno(EINVAL);
        return u64::MAX;
    }
    HANDLERS[sig as usize].swap(handler, Ordering::AcqRel)
}

/// glibc's `struct sigaction` begins with the handler; the mask and flags are ignored.
///
/// # Safety
/// `act` and `old` are null or point at a `struct sigaction`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sigaction(sig: i32, act: *const u64, old: *mut u64) -> i32 {
    if !valid(sig) {
        super::set_errno(EINVAL);
        return -1;
    }
    let prev = HANDLERS[sig as usize].load(Ordering::Acquire);
    // SAFETY: as the caller promised.
    unsafe {
        if let Some(&h) = act.as_ref() {
            HANDLERS[sig as usize].store(h, Ordering::Release);
        }
        if !old.is_null() {
            old.write(prev);
        }
    }
    0
}

/// Signal masks are accepted and ignored (there is no asynchronous signal but the alarm).
#[unsafe(no_mangle)]
pub extern "C" fn sigemptyset(set: *mut u64) -> i32 {
    // SAFETY: the caller passes a writable sigset_t (128 bytes).
    unsafe { core::ptr::write_bytes(set, 0, 16) };
    0
}

#[unsafe(no_mangle)]
pub extern "C" fn sigaddset(_set: *mut u64, _sig: i32) -> i32 {
    0
}

#[unsafe(no_mangle)]
pub extern "C" fn sigprocmask(_how: i32, _set: *const u64, _old: *mut u64) -> i32 {
    0
}

#[unsafe(no_mangle)]
pub extern "C" fn pthread_sigmask(_how: i32, _set: *const u64, _old: *mut u64) -> i32 {
    0
}

/// Sets the alarm `secs` from now (0 cancels it); returns the seconds left of the previous.
#[unsafe(no_mangle)]
pub extern "C" fn alarm(secs: u32) -> u32 {
    let now = arch::rdtsc();
    let at = if secs == 0 { 0 } else { now.saturating_add(ns_to_tsc(u64::from(secs) * 1_000_000_000)) };
    let prev = ALARM.swap(at, Ordering::AcqRel);
    if prev == 0 { 0 } else { tsc_to_ns(prev.saturating_sub(now)).div_ceil(1_000_000_000) as u32 }
}

/// When the alarm is due (TSC), if one is set.
pub fn alarm_deadline() -> Option<u64> {
    Some(ALARM.load(Ordering::Acquire)).filter(|&d| d != 0)
}

/// Runs the alarm's handler if it is due (from ticks and idle vCPUs).
pub fn poll_alarm() {
    let at = ALARM.load(Ordering::Acquire);
    if at == 0 || arch::rdtsc() < at || ALARM.compare_exchange(at, 0, Ordering::AcqRel, Ordering::Relaxed).is_err() {
        return;
    }
    deliver(SIGALRM);
}

fn deliver(sig: i32) {
    match HANDLERS[sig as usize].load(Ordering::Acquire) {
        SIG_IGN => {}
        SIG_DFL => super::sys::killed(sig),
        h => {
            // SAFETY: the program installed `h` as a `void (*)(int)` handler for `sig`.
            let f: extern "C" fn(i32) = unsafe { core::mem::transmute(h as usize) };
            f(sig);
        }
    }
}

#[unsafe(no_mangle)]
pub extern "C" fn raise(sig: i32) -> i32 {
    if !valid(sig) {
        super::set_errno(EINVAL);
        return -1;
    }
    deliver(sig);
    0
}
