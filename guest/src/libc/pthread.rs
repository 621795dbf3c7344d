//! POSIX threads on the guest scheduler (`sched`), with glibc's x86-64 type sizes so that
//! programs compile against glibc's `<pthread.h>` unchanged. Every lock and condition blocks the
//! waiting thread (futex-style, on its word), so waiters do not burn a vCPU.

use core::sync::atomic::{AtomicU32, Ordering};

use crate::sched::{self, Entry, Thread};

use super::errno::{EBUSY, EDEADLK, EINVAL, EPERM, ETIMEDOUT};
use super::time::{Timespec, deadline_of};

/// Spins before a contended lock blocks (the holder may be running on another vCPU).
const SPINS: u32 = 100;

/// Thread ids for mutex owners (never 0).
static NEXT_ID: AtomicU32 = AtomicU32::new(1);

fn word<'a>(p: *mut u8, offset: usize) -> &'a AtomicU32 {
    // SAFETY: callers pass a pthread object of glibc's size, 4-byte aligned, which the program
    // keeps alive while it uses it; the offsets lie inside it.
    unsafe { &*p.add(offset).cast::<AtomicU32>() }
}

/// The calling thread's id for mutex owners, kept in its last key slot.
fn my_id() -> u32 {
    let t = sched::current();
    if t.is_null() {
        return u32::MAX;
    }
    // SAFETY: t is the calling thread; slot KEYS-1 is reserved for its id.
    let slot = unsafe { &mut (*t).keys[sched::KEYS - 1] };
    if *slot == 0 {
        *slot = u64::from(NEXT_ID.fetch_add(1, Ordering::Relaxed));
    }
    *slot as u32
}

// ---- threads ----

#[repr(C)]
pub struct Attr {
    detached: i32,
    scope: i32,
    stack_size: u64,
    _rest: [u8; 40],
}

/// # Safety
/// `thread` is writable; `attr` is null or initialised; `start` is a thread function.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn pthread_create(thread: *mut u64, attr: *const Attr, start: Entry, arg: *mut u8) -> i32 {
    // SAFETY: attr is null or an initialised attribute object.
    let detached = unsafe { attr.as_ref() }.is_some_and(|a| a.detached != 0);
    match sched::spawn(start, arg, detached) {
        Some(t) => {
            // SAFETY: the caller passes a writable pthread_t.
            unsafe { thread.write(t as u64) };
            0
        }
        None => super::errno::EAGAIN,
    }
}

/// # Safety
/// `thread` is a joinable thread of this process; `ret` is null or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn pthread_join(thread: u64, ret: *mut *mut u8) -> i32 {
    match sched::join(thread as *mut Thread) {
        Ok(r) => {
            if !ret.is_null() {
                // SAFETY: the caller passes a writable pointer.
                unsafe { ret.write(r) };
            }
            0
        }
        Err(e) => e,
    }
}

/// # Safety
/// `thread` is a thread of this process, not yet joined or detached.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn pthread_detach(thread: u64) -> i32 {
    match sched::detach(thread as *mut Thread) {
        Ok(()) => 0,
        Err(e) => e,
    }
}

#[unsafe(no_mangle)]
pub extern "C" fn pthread_exit(ret: *mut u8) -> ! {
    sched::exit_thread(ret)
}

#[unsafe(no_mangle)]
pub extern "C" fn pthread_self() -> u64 {
    sched::current() as u64
}

#[unsafe(no_mangle)]
pub extern "C" fn pthread_equal(a: u64, b: u64) -> i32 {
    i32::from(a == b)
}

#[unsafe(no_mangle)]
pub extern "C" fn sched_yield() -> i32 {
    sched::yield_now();
    0
}

#[unsafe(no_mangle)]
pub extern "C" fn pthread_yield() -> i32 {
    sched_yield()
}

static CONCURRENCY: AtomicU32 = AtomicU32::new(0);

#[unsafe(no_mangle)]
pub extern "C" fn pthread_setconcurrency(n: i32) -> i32 {
    if n < 0 {
        return EINVAL;
    }
    CONCURRENCY.store(n as u32, Ordering::Relaxed);
    0
}

#[unsafe(no_mangle)]
pub extern "C" fn pthread_getconcurrency() -> i32 {
    CONCURRENCY.load(Ordering::Relaxed) as i32
}

/// # Safety
/// `a` is writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn pthread_attr_init(a: *mut Attr) -> i32 {
    // SAFETY: the caller passes a writable pthread_attr_t (56 bytes, as Attr).
    unsafe { a.write(Attr { detached: 0, scope: 0, stack_size: sched::STACK_SIZE, _rest: [0; 40] }) };
    0
}

#[unsafe(no_mangle)]
pub extern "C" fn pthread_attr_destroy(_a: *mut Attr) -> i32 {
    0
}

/// # Safety
/// `a` is an initialised attribute object.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn pthread_attr_setdetachstate(a: *mut Attr, state: i32) -> i32 {
    if !(0..=1).contains(&state) {
        return EINVAL;
    }
    // SAFETY: as the caller promised.
    unsafe { (*a).detached = state };
    0
}

/// # Safety
/// `a` is an initialised attribute object; `state` is writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn pthread_attr_getdetachstate(a: *const Attr, state: *mut i32) -> i32 {
    // SAFETY: as the caller promised.
    unsafe { state.write((*a).detached) };
    0
}

/// # Safety
/// `a` is an initialised attribute object.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn pthread_attr_setscope(a: *mut Attr, scope: i32) -> i32 {
    if !(0..=1).contains(&scope) {
        return EINVAL;
    }
    // SAFETY: as the caller promised.
    unsafe { (*a).scope = scope };
    0
}

/// Stack sizes are accepted and ignored: every thread gets `sched::STACK_SIZE`.
#[unsafe(no_mangle)]
pub extern "C" fn pthread_attr_setstacksize(_a: *mut Attr, size: usize) -> i32 {
    if size < 16384 { EINVAL } else { 0 }
}

/// # Safety
/// `size` is writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn pthread_attr_getstacksize(_a: *const Attr, size: *mut usize) -> i32 {
    // SAFETY: as the caller promised.
    unsafe { size.write(sched::STACK_SIZE as usize) };
    0
}

// ---- mutexes ----
// pthread_mutex_t (40 bytes): lock word at 0 (0 free, 1 held, 2 held with waiters), recursion
// count at 4, owner id at 8, kind at 16 (glibc's __kind: 0 normal, 1 recursive, 2 error check).

const LOCK: usize = 0;
const COUNT: usize = 4;
const OWNER: usize = 8;
const KIND: usize = 16;
const RECURSIVE: u32 = 1;
const ERRORCHECK: u32 = 2;

fn lock_word(m: *mut u8) {
    let w = word(m, LOCK);
    if w.compare_exchange(0, 1, Ordering::Acquire, Ordering::Relaxed).is_ok() {
        return;
    }
    for _ in 0..SPINS {
        core::hint::spin_loop();
        if w.load(Ordering::Relaxed) == 0 && w.compare_exchange(0, 1, Ordering::Acquire, Ordering::Relaxed).is_ok() {
            return;
        }
    }
    while w.swap(2, Ordering::Acquire) != 0 {
        sched::wait(w.as_ptr(), 2, 0);
    }
}

fn unlock_word(m: *mut u8) {
    let w = word(m, LOCK);
    if w.fetch_sub(1, Ordering::Release) != 1 {
        w.store(0, Ordering::Release);
        sched::wake(w.as_ptr(), 1);
    }
}

#[unsafe(no_mangle)]
pub extern "C" fn pthread_mutex_init(m: *mut u8, attr: *const u32) -> i32 {
    // SAFETY: the caller passes a writable pthread_mutex_t (40 bytes) and a null or
    // initialised attribute (an int holding the kind).
    unsafe {
        core::ptr::write_bytes(m, 0, 40);
        if let Some(&kind) = attr.as_ref() {
            word(m, KIND).store(kind, Ordering::Relaxed);
        }
    }
    0
}

#[unsafe(no_mangle)]
pub extern "C" fn pthread_mutex_destroy(m: *mut u8) -> i32 {
    if word(m, LOCK).load(Ordering::Relaxed) != 0 { EBUSY } else { 0 }
}

#[unsafe(no_mangle)]
pub extern "C" fn pthread_mutex_lock(m: *mut u8) -> i32 {
    let kind = word(m, KIND).load(Ordering::Relaxed);
    if kind != 0 {
        let me = my_id();
        if word(m, OWNER).load(Ordering::Relaxed) == me {
            if kind == RECURSIVE {
                word(m, COUNT).fetch_add(1, Ordering::Relaxed);
                return 0;
            }
            if kind == ERRORCHECK {
                return EDEADLK;
            }
        }
        lock_word(m);
        word(m, OWNER).store(me, Ordering::Relaxed);
        word(m, COUNT).store(1, Ordering::Relaxed);
        return 0;
    }
    lock_word(m);
    0
}

#[unsafe(no_mangle)]
pub extern "C" fn pthread_mutex_trylock(m: *mut u8) -> i32 {
    let kind = word(m, KIND).load(Ordering::Relaxed);
    if kind == RECURSIVE && word(m, OWNER).load(Ordering::Relaxed) == my_id() {
        word(m, COUNT).fetch_add(1, Ordering::Relaxed);
        return 0;
    }
    if word(m, LOCK).compare_exchange(0, 1, Ordering::Acquire, Ordering::Relaxed).is_err() {
        return EBUSY;
    }
    if kind != 0 {
        word(m, OWNER).store(my_id(), Ordering::Relaxed);
        word(m, COUNT).store(1, Ordering::Relaxed);
    }
    0
}

#[unsafe(no_mangle)]
pub extern "C" fn pthread_mutex_unlock(m: *mut u8) -> i32 {
    let kind = word(m, KIND).load(Ordering::Relaxed);
    if kind != 0 {
        if word(m, OWNER).load(Ordering::Relaxed) != my_id() {
            return EPERM;
        }
        if word(m, COUNT).fetch_sub(1, Ordering::Relaxed) > 1 {
            return 0;
        }
        word(m, OWNER).store(0, Ordering::Relaxed);
    }
    unlock_word(m);
    0
}

#[unsafe(no_mangle)]
pub extern "C" fn pthread_mutexattr_init(a: *mut u32) -> i32 {
    // SAFETY: the caller passes a writable pthread_mutexattr_t (an int).
    unsafe { a.write(0) };
    0
}

#[unsafe(no_mangle)]
pub extern "C" fn pthread_mutexattr_destroy(_a: *mut u32) -> i32 {
    0
}

#[unsafe(no_mangle)]
pub extern "C" fn pthread_mutexattr_settype(a: *mut u32, kind: i32) -> i32 {
    if !(0..=3).contains(&kind) {
        return EINVAL;
    }
    // SAFETY: as in pthread_mutexattr_init. Kind 3 (adaptive) behaves as normal.
    unsafe { a.write(if kind == 3 { 0 } else { kind as u32 }) };
    0
}

// ---- condition variables ----
// pthread_cond_t (48 bytes): sequence at 0, clock (from the attribute) at 4.

const SEQ: usize = 0;
const CLOCK: usize = 4;

#[unsafe(no_mangle)]
pub extern "C" fn pthread_cond_init(c: *mut u8, attr: *const u32) -> i32 {
    // SAFETY: the caller passes a writable pthread_cond_t (48 bytes) and a null or initialised
    // attribute (an int holding the clock).
    unsafe {
        core::ptr::write_bytes(c, 0, 48);
        if let Some(&clock) = attr.as_ref() {
            word(c, CLOCK).store(clock, Ordering::Relaxed);
        }
    }
    0
}

#[unsafe(no_mangle)]
pub extern "C" fn pthread_cond_destroy(_c: *mut u8) -> i32 {
    0
}

fn cond_wait(c: *mut u8, m: *mut u8, deadline: u64) -> i32 {
    let seq = word(c, SEQ).load(Ordering::Acquire);
    let kind = word(m, KIND).load(Ordering::Relaxed);
    let count = if kind != 0 { word(m, COUNT).swap(1, Ordering::Relaxed) } else { 1 };
    pthread_mutex_unlock(m);
    let woken = sched::wait(word(c, SEQ).as_ptr(), seq, deadline);
    // Relock as contended: other waiters may be queued behind us.
    let w = word(m, LOCK);
    while w.swap(2, Ordering::Acquire) != 0 {
        sched::wait(w.as_ptr(), 2, 0);
    }
    if kind != 0 {
        word(m, OWNER).store(my_id(), Ordering::Relaxed);
        word(m, COUNT).store(count, Ordering::Relaxed);
    }
    if woken { 0 } else { ETIMEDOUT }
}

#[unsafe(no_mangle)]
pub extern "C" fn pthread_cond_wait(c: *mut u8, m: *mut u8) -> i32 {
    cond_wait(c, m, 0)
}

/// # Safety
/// `ts` is a readable absolute time on the condition's clock.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn pthread_cond_timedwait(c: *mut u8, m: *mut u8, ts: *const Timespec) -> i32 {
    // SAFETY: as the caller promised.
    let Some(ts) = (unsafe { ts.as_ref() }) else { return EINVAL };
    if !(0..1_000_000_000).contains(&ts.tv_nsec) {
        return EINVAL;
    }
    cond_wait(c, m, deadline_of(word(c, CLOCK).load(Ordering::Relaxed) as i32, ts))
}

#[unsafe(no_mangle)]
pub extern "C" fn pthread_cond_signal(c: *mut u8) -> i32 {
    word(c, SEQ).fetch_add(1, Ordering::Release);
    sched::wake(word(c, SEQ).as_ptr(), 1);
    0
}

#[unsafe(no_mangle)]
pub extern "C" fn pthread_cond_broadcast(c: *mut u8) -> i32 {
    word(c, SEQ).fetch_add(1, Ordering::Release);
    sched::wake(word(c, SEQ).as_ptr(), usize::MAX);
    0
}

#[unsafe(no_mangle)]
pub extern "C" fn pthread_condattr_init(a: *mut u32) -> i32 {
    // SAFETY: the caller passes a writable pthread_condattr_t (an int).
    unsafe { a.write(0) };
    0
}

#[unsafe(no_mangle)]
pub extern "C" fn pthread_condattr_destroy(_a: *mut u32) -> i32 {
    0
}

#[unsafe(no_mangle)]
pub extern "C" fn pthread_condattr_setclock(a: *mut u32, clock: i32) -> i32 {
    if !(0..=1).contains(&clock) {
        return EINVAL;
    }
    // SAFETY: as in pthread_condattr_init.
    unsafe { a.write(clock as u32) };
    0
}

// ---- barriers, once, keys ----
// pthread_barrier_t (32 bytes): count at 0, arrived at 4, generation at 8.

#[unsafe(no_mangle)]
pub extern "C" fn pthread_barrier_init(b: *mut u8, _attr: *const u32, count: u32) -> i32 {
    if count == 0 {
        return EINVAL;
    }
    // SAFETY: the caller passes a writable pthread_barrier_t (32 bytes).
    unsafe { core::ptr::write_bytes(b, 0, 32) };
    word(b, 0).store(count, Ordering::Release);
    0
}

#[unsafe(no_mangle)]
pub extern "C" fn pthread_barrier_destroy(_b: *mut u8) -> i32 {
    0
}

#[unsafe(no_mangle)]
pub extern "C" fn pthread_barrier_wait(b: *mut u8) -> i32 {
    const SERIAL: i32 = -1;
    let generation = word(b, 8);
    let g = generation.load(Ordering::Acquire);
    if word(b, 4).fetch_add(1, Ordering::AcqRel) + 1 == word(b, 0).load(Ordering::Relaxed) {
        word(b, 4).store(0, Ordering::Relaxed);
        generation.fetch_add(1, Ordering::Release);
        sched::wake(generation.as_ptr(), usize::MAX);
        return SERIAL;
    }
    while generation.load(Ordering::Acquire) == g {
        sched::wait(generation.as_ptr(), g, 0);
    }
    0
}

/// # Safety
/// `once` is a pthread_once_t; `f` is a function.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn pthread_once(once: *mut u32, f: unsafe extern "C" fn()) -> i32 {
    let w = word(once.cast(), 0);
    loop {
        match w.compare_exchange(0, 1, Ordering::AcqRel, Ordering::Acquire) {
            Ok(_) => {
                // SAFETY: the caller's initialiser.
                unsafe { f() };
                w.store(2, Ordering::Release);
                sched::wake(w.as_ptr(), usize::MAX);
                return 0;
            }
            Err(2) => return 0,
            Err(_) => {
                sched::wait(w.as_ptr(), 1, 0);
            }
        }
    }
}

/// Keys handed out (the last slot is the thread id's, see `my_id`).
static KEYS_USED: AtomicU32 = AtomicU32::new(0);

/// Destructors are not run at thread exit (none of the benchmarks relies on them).
#[unsafe(no_mangle)]
pub extern "C" fn pthread_key_create(key: *mut u32, _dtor: *const u8) -> i32 {
    let k = KEYS_USED.fetch_add(1, Ordering::Relaxed);
    if k as usize >= sched::KEYS - 1 {
        return super::errno::EAGAIN;
    }
    // SAFETY: the caller passes a writable pthread_key_t.
    unsafe { key.write(k) };
    0
}

#[unsafe(no_mangle)]
pub extern "C" fn pthread_key_delete(_key: u32) -> i32 {
    0
}

#[unsafe(no_mangle)]
pub extern "C" fn pthread_getspecific(key: u32) -> u64 {
    let t = sched::current();
    if t.is_null() || key as usize >= sched::KEYS - 1 {
        return 0;
    }
    // SAFETY: t is the calling thread.
    unsafe { (*t).keys[key as usize] }
}

#[unsafe(no_mangle)]
pub extern "C" fn pthread_setspecific(key: u32, value: u64) -> i32 {
    let t = sched::current();
    if t.is_null() || key as usize >= sched::KEYS - 1 {
        return EINVAL;
    }
    // SAFETY: t is the calling thread.
    unsafe { (*t).keys[key as usize] = value };
    0
}

// ---- spin locks (as mutexes: a waiter that blocks beats one that spins on a shared vCPU) ----

#[unsafe(no_mangle)]
pub extern "C" fn pthread_spin_init(s: *mut u32, _shared: i32) -> i32 {
    // SAFETY: the caller passes a writable pthread_spinlock_t (an int).
    unsafe { s.write(0) };
    0
}

#[unsafe(no_mangle)]
pub extern "C" fn pthread_spin_destroy(_s: *mut u32) -> i32 {
    0
}

#[unsafe(no_mangle)]
pub extern "C" fn pthread_spin_lock(s: *mut u32) -> i32 {
    lock_word(s.cast());
    0
}

#[unsafe(no_mangle)]
pub extern "C" fn pthread_spin_trylock(s: *mut u32) -> i32 {
    if word(s.cast(), 0).compare_exchange(0, 1, Ordering::Acquire, Ordering::Relaxed).is_ok() { 0 } else { EBUSY }
}

#[unsafe(no_mangle)]
pub extern "C" fn pthread_spin_unlock(s: *mut u32) -> i32 {
    unlock_word(s.cast());
    0
}
