//! Locking helpers shared by every thread kind.

use std::sync::{Mutex, MutexGuard, PoisonError};

/// Locks a mutex, recovering the data if a panicking thread poisoned it (the process is about
/// to report that failure anyway).
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// What a thread runs first, before its work (installing its seccomp filter, say); an error
/// stops the thread before it does anything.
pub type ThreadInit = std::sync::Arc<dyn Fn() -> Result<(), Box<dyn std::error::Error + Send + Sync>> + Send + Sync>;

/// The nice value of threads that vCPUs wait on (fault handlers, the swapper): above the vCPUs,
/// which otherwise keep both cores of a small host busy while a blocked vCPU's fault waits for
/// a core, and reclaim falls behind the guest it reclaims from. (Linux does this work in the
/// faulting thread itself.)
pub const URGENT_NICE: i32 = -10;

/// Gives the calling thread nice value `nice`, if the process may (root, or CAP_SYS_NICE);
/// otherwise it keeps its own.
/// Makes this thread's sleeps end within `ns` nanoseconds of when they are due (the default
/// slack is 50 us, longer than the short sleeps of a polling thread).
pub fn set_timer_slack(ns: u64) {
    // SAFETY: PR_SET_TIMERSLACK changes only this thread's timer slack.
    let rc = unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, ns as libc::c_ulong, 0, 0, 0) };
    if rc != 0 {
        log::debug!("cannot set a thread's timer slack: {}", std::io::Error::last_os_error());
    }
}

pub fn set_thread_nice(nice: i32) {
    // SAFETY: gettid has no preconditions.
    let tid = unsafe { libc::gettid() };
    // SAFETY: setpriority on this thread's own id; it changes only its scheduling weight.
    let rc = unsafe { libc::setpriority(libc::PRIO_PROCESS, tid.unsigned_abs(), nice) };
    if rc != 0 {
        log::debug!("cannot raise a thread's priority: {}", std::io::Error::last_os_error());
    }
}
