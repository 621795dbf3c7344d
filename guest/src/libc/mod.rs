//! The Rust half of the C runtime for `scenario=cbench`: what needs the VMM or the scheduler
//! (memory, threads, time, signals, process exit). The C half (`guest/crt/`: stdio with
//! `printf`, `strtod`, `getopt`, `rand`, strings, C++ support) keeps every `float`/`double` on
//! the C side: this target's Rust is soft-float, so none may cross.
//!
//! Everything here is `extern "C"` with glibc's names and struct layouts (x86-64), so the
//! benchmarks compile against glibc's headers unchanged.

pub mod malloc;
pub mod pthread;
pub mod signal;
pub mod sys;
pub mod time;

/// glibc's errno values (the ones these functions return).
pub mod errno {
    pub const EPERM: i32 = 1;
    pub const EAGAIN: i32 = 11;
    pub const ENOMEM: i32 = 12;
    pub const EBUSY: i32 = 16;
    pub const EINVAL: i32 = 22;
    pub const EDEADLK: i32 = 35;
    pub const ETIMEDOUT: i32 = 110;
}

/// Sets the calling thread's errno.
pub fn set_errno(e: i32) {
    // SAFETY: errno_location points at the calling thread's errno.
    unsafe { *crate::sched::errno_location() = e };
}

#[unsafe(no_mangle)]
pub extern "C" fn __errno_location() -> *mut i32 {
    crate::sched::errno_location()
}
