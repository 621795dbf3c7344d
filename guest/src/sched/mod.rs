//! Threads for C programs: green threads over the vCPUs (M:N), preempted by the VMM's timer
//! ticks ([`port::SET_TICK`]), with a vCPU that has nothing to run asleep in the VMM
//! ([`port::IDLE`], woken by [`port::WAKE`]).
//!
//! - One scheduler lock (a spinlock) guards the run queue, the wait queues (futex-like, keyed by
//!   address), the timers and the stack cache. It is only taken with preemption disabled.
//! - Preemption is disabled through the per-vCPU tick mask (`CpuPage::tick_mask`), used as a
//!   nesting count: the VMM enters the tick handler only while it is zero, and sets it to 1.
//!   Code that uses per-vCPU state (magazines, console, the memory-call area) raises it; a tick
//!   that came meanwhile is taken when it drops back to zero.
//! - A context switch happens with the lock held and the count at exactly 1; the thread switched
//!   to releases the lock. So a thread that blocks is never resumed by another vCPU before its
//!   registers are saved, and a dead thread's stack is free once anyone else holds the lock.
//! - Each vCPU has an idle context (its boot stack) that runs when no thread is ready: it sleeps
//!   in the VMM until a timer is due or a thread is made ready for it.
//! - A tick saves the interrupted thread's whole register file, SSE included (C code uses it);
//!   a voluntary switch saves only what the C ABI says a call preserves.

use alloc::boxed::Box;
use alloc::collections::{BTreeMap, VecDeque};
use alloc::vec::Vec;
use core::arch::{asm, global_asm};
use core::cell::UnsafeCell;
use core::ptr::null_mut;
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use protocol::{CPU_PAGE_THREAD, MAX_VCPUS, port, status};

use crate::{arch, mem};

/// Tick period: how long a thread runs before others waiting for a vCPU get their turn.
pub const TICK_US: u32 = 4000;
/// Stack of each thread (mapped at creation, kept for reuse when the thread ends).
pub const STACK_SIZE: u64 = 256 * 1024;
/// Thread-specific data keys (`pthread_key_create`).
pub const KEYS: usize = 32;

mod preempt;
mod queue;

pub use preempt::{NoPreempt, preempt_disable, preempt_enable};
use preempt::{clear_tick_pending, preempt_enable_no_resched};
use queue::{DEFERRED_WAKES, IDLE_CPUS, SCHED, Sched, Wakes, lock, unlock};

// ---------------------------------------------------------------------------------------------
// Threads.

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// On the run queue.
    Ready,
    Running,
    /// Waiting on an address, a timer, or a thread to end.
    Blocked,
    /// Ended; its stack is free once the scheduler lock changed hands.
    Dead,
    /// A vCPU's idle context.
    Idle,
}

pub type Entry = unsafe extern "C" fn(*mut u8) -> *mut u8;

/// A thread. Lives in the Rust heap; its address is its `pthread_t`.
pub struct Thread {
    /// Saved stack pointer while not running (at offset 0 for the switch code).
    rsp: u64,
    state: State,
    pub errno: i32,
    stack: u64,
    entry: Option<Entry>,
    arg: *mut u8,
    retval: *mut u8,
    detached: bool,
    /// A thread blocked in `join` for this one.
    joiner: *mut Thread,
    /// TSC deadline of a timed wait (0: none), and the address it waits on (0: none).
    deadline: u64,
    wait_addr: u64,
    timed_out: bool,
    /// TSC the thread ran, and when it last started running.
    run_tsc: u64,
    since: u64,
    pub keys: [u64; KEYS],
}

// SAFETY: a Thread's raw pointers (its argument, result, joiner) are only used under the
// scheduler lock or by the thread itself; moving the struct between vCPUs is what threads do.
unsafe impl Send for Thread {}

impl Thread {
    const fn new(state: State) -> Self {
        Thread {
            rsp: 0,
            state,
            errno: 0,
            stack: 0,
            entry: None,
            arg: null_mut(),
            retval: null_mut(),
            detached: false,
            joiner: null_mut(),
            deadline: 0,
            wait_addr: 0,
            timed_out: false,
            run_tsc: 0,
            since: 0,
            keys: [0; KEYS],
        }
    }
}

crate::percpu! {
    /// Each vCPU's idle context.
    static IDLE: Thread = Thread::new(State::Idle);
}

fn idle_context() -> *mut Thread {
    IDLE.get_mut() as *mut Thread
}

/// The thread running on this vCPU (null before threads start). One load, so it is right even
/// if the caller moves to another vCPU right after (it is the caller's own thread either way).
pub fn current() -> *mut Thread {
    let t: u64;
    // SAFETY: reads this vCPU's thread word (GS base), which only this vCPU writes.
    unsafe { asm!("mov {}, qword ptr gs:[{t}]", out(reg) t, t = const CPU_PAGE_THREAD, options(nostack, readonly)) };
    t as *mut Thread
}

fn set_current(t: *mut Thread) {
    // SAFETY: writes this vCPU's thread word (GS base).
    unsafe { asm!("mov qword ptr gs:[{t}], {}", in(reg) t as u64, t = const CPU_PAGE_THREAD, options(nostack)) };
}

global_asm!(
    r#"
    .section .text.sched, "ax"
    // sched_switch(save: *mut u64, next_rsp: u64): saves the callee-saved registers and the
    // stack pointer into *save, resumes the context whose stack pointer is next_rsp.
    .global sched_switch
    sched_switch:
        push rbp
        push rbx
        push r12
        push r13
        push r14
        push r15
        mov [rdi], rsp
        mov rsp, rsi
        pop r15
        pop r14
        pop r13
        pop r12
        pop rbx
        pop rbp
        ret

    // First code of a new thread: r12 = its Thread.
    sched_trampoline:
        mov rdi, r12
        and rsp, -16
        call {start}
        ud2

    // The tick handler: entered by the VMM with [rsp] = interrupted RFLAGS, [rsp + 8] = RIP,
    // every register as it was, and the tick mask set.
    .global sched_tick_entry
    sched_tick_entry:
        push rax
        push rcx
        push rdx
        push rsi
        push rdi
        push r8
        push r9
        push r10
        push r11
        push rbx
        mov rbx, rsp
        sub rsp, 512
        and rsp, -16
        fxsave [rsp]
        cld
        call {tick}
        fxrstor [rsp]
        mov rsp, rbx
        pop rbx
        pop r11
        pop r10
        pop r9
        pop r8
        pop rdi
        pop rsi
        pop rdx
        pop rcx
        pop rax
        popfq
        ret

    .section .rodata.sched, "a"
    .balign 8
    .global sched_trampoline_addr
    sched_trampoline_addr:
        .quad sched_trampoline
    "#,
    start = sym thread_start,
    tick = sym on_tick,
);

unsafe extern "C" {
    fn sched_switch(save: *mut u64, next_rsp: u64);
    fn sched_tick_entry();
    static sched_trampoline_addr: u64;
}

/// Threads started (main included), context switches, ticks taken, and the TSC run by ended
/// threads.
pub static CREATED: AtomicU64 = AtomicU64::new(0);
/// Threads started and not yet ended.
static LIVE: AtomicU64 = AtomicU64::new(0);
pub static SWITCHES: AtomicU64 = AtomicU64::new(0);
pub static PREEMPTIONS: AtomicU64 = AtomicU64::new(0);
/// Per vCPU: TSC spent in its idle context so far, and when the current idle stretch began (0:
/// running a thread). CPU time is what is not idle.
static IDLE_TSC: [AtomicU64; MAX_VCPUS] = [const { AtomicU64::new(0) }; MAX_VCPUS];
static IDLE_SINCE: [AtomicU64; MAX_VCPUS] = [const { AtomicU64::new(0) }; MAX_VCPUS];
/// When the scheduler started.
static START_TSC: AtomicU64 = AtomicU64::new(0);
/// Whether threads run (ticks are on).
static RUNNING: AtomicBool = AtomicBool::new(false);

/// Switches from `cur` (whose state the caller set) to the next ready thread, or to this vCPU's
/// idle context. Lock held, count 1; returns (on whatever vCPU) with the same.
fn schedule(s: &mut Sched, cur: *mut Thread, wakes: &mut Wakes) {
    // Whoever runs next on this vCPU sends the wake-ups collected so far (this thread may not
    // run again for a while), after it releases the lock.
    *DEFERRED_WAKES.get_mut() |= core::mem::take(&mut wakes.0);
    let next = match s.runq.pop_front() {
        Some(t) => t,
        None => idle_context(),
    };
    if next == cur {
        // SAFETY: cur is live.
        unsafe { (*cur).state = State::Running };
        return;
    }
    let now = arch::rdtsc();
    // SAFETY: both threads are live; next is not running anywhere (it was on the run queue, or
    // is this vCPU's idle context, saved since this vCPU left it).
    unsafe {
        let cpu = arch::cpu_id() as usize % MAX_VCPUS;
        if (*cur).state == State::Idle {
            let since = IDLE_SINCE[cpu].swap(0, Ordering::Relaxed);
            IDLE_TSC[cpu].fetch_add(now.saturating_sub(since), Ordering::Relaxed);
        } else {
            (*cur).run_tsc += now.wrapping_sub((*cur).since);
        }
        if (*next).state == State::Idle {
            IDLE_SINCE[cpu].store(now, Ordering::Relaxed);
        } else {
            (*next).state = State::Running;
            (*next).since = now;
        }
        SWITCHES.fetch_add(1, Ordering::Relaxed);
        set_current(next);
        sched_switch(&mut (*cur).rsp, (*next).rsp);
    }
}

/// A new thread's first code: releases the lock its creator's switch held.
extern "C" fn thread_start(t: *mut Thread) -> ! {
    unlock();
    Wakes::default().send();
    preempt_enable();
    // SAFETY: t is this thread, set up by `spawn`.
    let (entry, arg) = unsafe { ((*t).entry.expect("threads have an entry"), (*t).arg) };
    // SAFETY: the entry and argument are what the creator passed to pthread_create.
    let ret = unsafe { entry(arg) };
    exit_thread(ret)
}

// ---------------------------------------------------------------------------------------------
// Public API (the pthreads layer and the C runtime build on this).

/// Sets up the scheduler (once, before any thread exists).
pub fn init() {
    let _g = NoPreempt::new();
    START_TSC.store(arch::rdtsc(), Ordering::Relaxed);
    // SAFETY: called once by vCPU 0 before other vCPUs use the scheduler.
    unsafe {
        *SCHED.sched.get() = Some(Sched {
            runq: VecDeque::new(),
            waits: BTreeMap::new(),
            timers: Vec::new(),
            stacks: Vec::new(),
            reap: Vec::new(),
        })
    };
}

/// Turns on ticks for this vCPU (each vCPU calls it).
pub fn start_ticks() -> Result<(), u64> {
    let page = arch::cpu_page();
    let _g = NoPreempt::new();
    // SAFETY: this vCPU's CpuPage; the VMM writes the status into args[0] during the exit.
    let st = unsafe {
        (*page).args[0] = sched_tick_entry as *const () as u64;
        arch::out32(port::SET_TICK, TICK_US);
        core::ptr::read_volatile(&(*page).args[0])
    };
    RUNNING.store(true, Ordering::Release);
    if st == status::OK { Ok(()) } else { Err(st) }
}

/// Creates a thread running `entry(arg)`; returns it, or None without memory.
pub fn spawn(entry: Entry, arg: *mut u8, detached: bool) -> Option<*mut Thread> {
    let _g = NoPreempt::new();
    let stack = {
        let s = lock();
        s.reap();
        let st = s.stacks.pop();
        unlock();
        match st {
            Some(st) => st,
            None => mem::alloc(STACK_SIZE, protocol::memcall::policy::LOCAL, 0, 0).ok()?.0,
        }
    };
    let mut t = Box::new(Thread::new(State::Ready));
    t.stack = stack;
    t.entry = Some(entry);
    t.arg = arg;
    t.detached = detached;
    // The first switch "returns" into the trampoline with r12 = the thread.
    let top = stack + STACK_SIZE;
    let frame = (top - 8 * 8) as *mut u64;
    let t = Box::into_raw(t);
    // SAFETY: the frame lies at the top of the thread's own fresh stack, mapped read-write.
    unsafe {
        for i in 0..8 {
            frame.add(i).write(0);
        }
        // r15, r14, r13, r12, rbx, rbp, return address.
        frame.add(3).write(t as u64);
        frame.add(6).write(sched_trampoline_addr);
        (*t).rsp = frame as u64;
    }
    CREATED.fetch_add(1, Ordering::Relaxed);
    LIVE.fetch_add(1, Ordering::AcqRel);
    let mut wakes = Wakes::default();
    let s = lock();
    s.make_ready(t, &mut wakes);
    unlock();
    wakes.send();
    Some(t)
}

/// Ends the calling thread with `ret`.
pub fn exit_thread(ret: *mut u8) -> ! {
    if LIVE.fetch_sub(1, Ordering::AcqRel) == 1 {
        crate::libc::sys::last_thread_ended();
    }
    preempt_disable();
    let cur = current();
    let mut wakes = Wakes::default();
    let s = lock();
    // SAFETY: cur is this thread.
    unsafe {
        (*cur).retval = ret;
        (*cur).state = State::Dead;
        if (*cur).detached {
            s.reap.push(cur);
        }
        let j = core::mem::replace(&mut (*cur).joiner, null_mut());
        if !j.is_null() {
            s.make_ready(j, &mut wakes);
        }
    }
    // This thread never runs again: the next context on this vCPU sends its wake-ups.
    schedule(s, cur, &mut wakes);
    unreachable!("a dead thread was resumed");
}

/// Waits for `t` to end; returns its result. Err(EINVAL) for a detached thread or a second
/// joiner, Err(EDEADLK) for the caller itself.
pub fn join(t: *mut Thread) -> Result<*mut u8, i32> {
    let cur = current();
    if t == cur {
        return Err(crate::libc::errno::EDEADLK);
    }
    let _g = NoPreempt::new();
    let mut wakes = Wakes::default();
    let s = lock();
    // SAFETY: t is a thread the caller created and nobody has joined (the caller's promise, as
    // with pthreads); its fields are the scheduler's under the lock.
    unsafe {
        if (*t).detached || !(*t).joiner.is_null() {
            unlock();
            return Err(crate::libc::errno::EINVAL);
        }
        if (*t).state != State::Dead {
            (*t).joiner = cur;
            (*cur).state = State::Blocked;
            schedule(s, cur, &mut wakes);
        }
        let ret = (*t).retval;
        s.free_thread(t);
        unlock();
        wakes.send();
        Ok(ret)
    }
}

/// Marks `t` detached (freed when it ends). Err(EINVAL) if it already is.
pub fn detach(t: *mut Thread) -> Result<(), i32> {
    let _g = NoPreempt::new();
    let s = lock();
    // SAFETY: t is a live or ended, unjoined thread (the caller's promise).
    let r = unsafe {
        if (*t).detached {
            Err(crate::libc::errno::EINVAL)
        } else if (*t).state == State::Dead {
            s.free_thread(t);
            Ok(())
        } else {
            (*t).detached = true;
            Ok(())
        }
    };
    unlock();
    r
}

/// Lets other ready threads run; returns whether one did (the caller ran again after it).
pub fn yield_now() -> bool {
    let cur = current();
    if cur.is_null() {
        return false;
    }
    preempt_disable();
    clear_tick_pending();
    let mut wakes = Wakes::default();
    let s = lock();
    s.expire(arch::rdtsc(), &mut wakes);
    let others = !s.runq.is_empty();
    if others {
        // SAFETY: cur is this thread.
        unsafe { (*cur).state = State::Ready };
        s.runq.push_back(cur);
        schedule(s, cur, &mut wakes);
    }
    unlock();
    preempt_enable_no_resched();
    wakes.send();
    others
}

/// A tick that came while preemption was off.
#[cold]
fn deferred_tick() {
    if RUNNING.load(Ordering::Relaxed) && !is_idle(current()) {
        if yield_now() {
            PREEMPTIONS.fetch_add(1, Ordering::Relaxed);
        }
    } else {
        clear_tick_pending();
    }
}

fn is_idle(t: *mut Thread) -> bool {
    // SAFETY: t is null or a live thread (the current one).
    t.is_null() || unsafe { (*t).state == State::Idle }
}

extern "C" fn on_tick() {
    // The VMM set the mask: the count is 1.
    clear_tick_pending();
    let cur = current();
    if !is_idle(cur) {
        let mut wakes = Wakes::default();
        let s = lock();
        s.expire(arch::rdtsc(), &mut wakes);
        if !s.runq.is_empty() {
            PREEMPTIONS.fetch_add(1, Ordering::Relaxed);
            // SAFETY: cur is this thread.
            unsafe { (*cur).state = State::Ready };
            s.runq.push_back(cur);
            schedule(s, cur, &mut wakes);
        }
        unlock();
        wakes.send();
    }
    crate::libc::signal::poll_alarm();
    preempt_enable_no_resched();
}

/// Blocks while the u32 at `addr` holds `expected`, until [`wake`] for `addr` or the TSC
/// `deadline` (0: none). Returns false if it timed out.
pub fn wait(addr: *const u32, expected: u32, deadline: u64) -> bool {
    let cur = current();
    let _g = NoPreempt::new();
    let mut wakes = Wakes::default();
    let s = lock();
    // SAFETY: addr is the caller's live synchronisation word.
    if unsafe { core::ptr::read_volatile(addr) } != expected {
        unlock();
        return true;
    }
    if deadline != 0 && deadline <= arch::rdtsc() {
        unlock();
        return false;
    }
    // SAFETY: cur is this thread; the lock is held.
    let timed_out = unsafe {
        (*cur).state = State::Blocked;
        (*cur).wait_addr = addr as u64;
        (*cur).timed_out = false;
        s.waits.entry(addr as u64).or_default().push_back(cur);
        if deadline != 0 {
            (*cur).deadline = deadline;
            s.timers.push(cur);
        }
        s.expire(arch::rdtsc(), &mut wakes);
        schedule(s, cur, &mut wakes);
        (*cur).timed_out
    };
    unlock();
    wakes.send();
    !timed_out
}

/// Wakes up to `n` threads waiting on `addr`; returns how many.
pub fn wake(addr: *const u32, n: usize) -> usize {
    let _g = NoPreempt::new();
    let mut wakes = Wakes::default();
    let s = lock();
    let mut woken = 0;
    if let Some(q) = s.waits.get_mut(&(addr as u64)) {
        let mut ready = Vec::new();
        while woken < n {
            let Some(t) = q.pop_front() else { break };
            ready.push(t);
            woken += 1;
        }
        if q.is_empty() {
            s.waits.remove(&(addr as u64));
        }
        for t in ready {
            // SAFETY: t was waiting, so it is live and blocked.
            unsafe { (*t).wait_addr = 0 };
            s.untime(t);
            s.make_ready(t, &mut wakes);
        }
    }
    unlock();
    wakes.send();
    woken
}

/// Sleeps until the TSC reaches `deadline`.
pub fn sleep_until(deadline: u64) {
    let cur = current();
    if cur.is_null() {
        while arch::rdtsc() < deadline {
            arch::pause();
        }
        return;
    }
    let _g = NoPreempt::new();
    let mut wakes = Wakes::default();
    let s = lock();
    s.expire(arch::rdtsc(), &mut wakes);
    if deadline > arch::rdtsc() {
        // SAFETY: cur is this thread; the lock is held.
        unsafe {
            (*cur).state = State::Blocked;
            (*cur).deadline = deadline;
        }
        s.timers.push(cur);
        schedule(s, cur, &mut wakes);
    }
    unlock();
    wakes.send();
}

/// This vCPU's scheduling loop: runs ready threads, sleeps in the VMM when there are none.
pub fn idle_loop() -> ! {
    let idle = idle_context();
    set_current(idle);
    IDLE_SINCE[arch::cpu_id() as usize % MAX_VCPUS].store(arch::rdtsc(), Ordering::Relaxed);
    let me = 1u64 << arch::cpu_id();
    loop {
        preempt_disable();
        let mut wakes = Wakes::default();
        let s = lock();
        let now = arch::rdtsc();
        s.expire(now, &mut wakes);
        if !s.runq.is_empty() {
            schedule(s, idle, &mut wakes);
            unlock();
            preempt_enable_no_resched();
            wakes.send();
            continue;
        }
        IDLE_CPUS.fetch_or(me, Ordering::AcqRel);
        let due = s.earliest_deadline().into_iter().chain(crate::libc::signal::alarm_deadline()).min();
        let timeout_ns = due.map_or(0, |d| crate::libc::time::tsc_to_ns(d.saturating_sub(now)).max(1));
        unlock();
        preempt_enable_no_resched();
        wakes.send();
        crate::libc::signal::poll_alarm();
        let page = arch::cpu_page();
        // SAFETY: this vCPU's CpuPage; the idle context never leaves this vCPU.
        unsafe { (*page).args[0] = timeout_ns };
        arch::out32(port::IDLE, 0);
        IDLE_CPUS.fetch_and(!me, Ordering::AcqRel);
    }
}

/// CPU time used by all threads so far, in TSC cycles: the time each vCPU was not idle since
/// the scheduler started.
pub fn process_tsc(cpus: u32) -> u64 {
    let start = START_TSC.load(Ordering::Relaxed);
    if start == 0 {
        return 0;
    }
    let now = arch::rdtsc();
    (0..(cpus as usize).min(MAX_VCPUS))
        .map(|c| {
            let since = IDLE_SINCE[c].load(Ordering::Relaxed);
            let idle = IDLE_TSC[c].load(Ordering::Relaxed) + if since != 0 { now.saturating_sub(since) } else { 0 };
            now.saturating_sub(start).saturating_sub(idle)
        })
        .sum()
}

/// CPU time of the calling thread, in TSC cycles.
pub fn thread_tsc() -> u64 {
    let cur = current();
    if is_idle(cur) {
        return 0;
    }
    // SAFETY: cur is this thread.
    unsafe { (*cur).run_tsc + arch::rdtsc().wrapping_sub((*cur).since) }
}

/// The calling thread's `errno`.
pub fn errno_location() -> *mut i32 {
    let cur = current();
    if cur.is_null() {
        static BOOT_ERRNO: crate::percpu::PerCpu<i32> =
            crate::percpu::PerCpu { slots: [const { crate::percpu::Slot(UnsafeCell::new(0)) }; protocol::MAX_VCPUS] };
        return BOOT_ERRNO.get_mut();
    }
    // SAFETY: cur is this thread; its errno field lives as long as it does.
    unsafe { &raw mut (*cur).errno }
}
