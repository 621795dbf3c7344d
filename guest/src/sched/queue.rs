//! The scheduler's shared state behind its lock: the run queue, the wait queues, the timers,
//! the stack cache; and the wake-ups of sleeping vCPUs that go with making threads ready.

use alloc::boxed::Box;
use alloc::collections::{BTreeMap, VecDeque};
use alloc::vec::Vec;
use core::cell::UnsafeCell;
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use protocol::port;

use super::{State, Thread};
use crate::arch;

pub(super) struct Sched {
    pub(super) runq: VecDeque<*mut Thread>,
    /// Threads waiting on an address, in arrival order.
    pub(super) waits: BTreeMap<u64, VecDeque<*mut Thread>>,
    /// Threads with a deadline.
    pub(super) timers: Vec<*mut Thread>,
    /// Stacks of ended threads, for reuse.
    pub(super) stacks: Vec<u64>,
    /// Ended detached threads, freed at the next chance.
    pub(super) reap: Vec<*mut Thread>,
}

pub(super) struct Locked {
    held: AtomicBool,
    pub(super) sched: UnsafeCell<Option<Sched>>,
}

// SAFETY: `sched` is only reached through `lock`, which serialises access with `held`.
unsafe impl Sync for Locked {}

pub(super) static SCHED: Locked = Locked { held: AtomicBool::new(false), sched: UnsafeCell::new(None) };

/// vCPUs asleep in IDLE (bit per vCPU).
pub(super) static IDLE_CPUS: AtomicU64 = AtomicU64::new(0);
/// Takes the scheduler lock. Preemption must be off.
#[allow(clippy::mut_from_ref)]
pub(super) fn lock() -> &'static mut Sched {
    while SCHED.held.compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed).is_err() {
        while SCHED.held.load(Ordering::Relaxed) {
            arch::pause();
        }
    }
    // SAFETY: the lock is held; `init` set the state before any thread could take it.
    unsafe { (*SCHED.sched.get()).as_mut().expect("scheduler initialised") }
}

pub(super) fn unlock() {
    SCHED.held.store(false, Ordering::Release);
}

/// vCPUs to wake once the lock is released.
#[derive(Default)]
pub(super) struct Wakes(pub(super) u64);

impl Wakes {
    /// Claims a sleeping vCPU other than this one for a newly ready thread.
    pub(super) fn claim(&mut self) {
        let me = 1u64 << arch::cpu_id();
        let mut m = IDLE_CPUS.load(Ordering::Acquire);
        loop {
            let others = m & !me & !self.0;
            if others == 0 {
                return;
            }
            let bit = others & others.wrapping_neg();
            match IDLE_CPUS.compare_exchange(m, m & !bit, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => {
                    self.0 |= bit;
                    return;
                }
                Err(now) => m = now,
            }
        }
    }

    /// Sends the wake-ups (after the lock is released: each is an exit), with any a thread that
    /// ended on this vCPU left behind. Preemption must still be off.
    pub(super) fn send(self) {
        let mut m = self.0 | core::mem::take(DEFERRED_WAKES.get_mut());
        while m != 0 {
            let cpu = m.trailing_zeros();
            m &= m - 1;
            arch::out32(port::WAKE, cpu);
        }
    }
}

impl Sched {
    pub(super) fn make_ready(&mut self, t: *mut Thread, wakes: &mut Wakes) {
        // SAFETY: t is a live thread; its fields are the scheduler's while the lock is held.
        unsafe { (*t).state = State::Ready };
        self.runq.push_back(t);
        wakes.claim();
    }

    /// Readies every thread whose deadline passed.
    pub(super) fn expire(&mut self, now: u64, wakes: &mut Wakes) {
        let mut i = 0;
        while i < self.timers.len() {
            let t = self.timers[i];
            // SAFETY: threads on the timer list are live and blocked.
            let due = unsafe { (*t).deadline <= now };
            if !due {
                i += 1;
                continue;
            }
            self.timers.swap_remove(i);
            // SAFETY: as above.
            let addr = unsafe {
                (*t).deadline = 0;
                (*t).timed_out = true;
                core::mem::replace(&mut (*t).wait_addr, 0)
            };
            if addr != 0 {
                self.unwait(addr, t);
            }
            self.make_ready(t, wakes);
        }
    }

    pub(super) fn unwait(&mut self, addr: u64, t: *mut Thread) {
        if let Some(q) = self.waits.get_mut(&addr) {
            q.retain(|&w| w != t);
            if q.is_empty() {
                self.waits.remove(&addr);
            }
        }
    }

    pub(super) fn untime(&mut self, t: *mut Thread) {
        // SAFETY: t is live.
        if unsafe { core::mem::replace(&mut (*t).deadline, 0) } != 0 {
            self.timers.retain(|&w| w != t);
        }
    }

    pub(super) fn earliest_deadline(&self) -> Option<u64> {
        // SAFETY: threads on the timer list are live.
        self.timers.iter().map(|&t| unsafe { (*t).deadline }).min()
    }

    /// Frees ended detached threads (their stacks are free: the lock changed hands since).
    pub(super) fn reap(&mut self) {
        while let Some(t) = self.reap.pop() {
            self.free_thread(t);
        }
    }

    pub(super) fn free_thread(&mut self, t: *mut Thread) {
        // SAFETY: t ended and nothing refers to it any more; it was made by Box::into_raw.
        let b = unsafe { Box::from_raw(t) };
        if b.stack != 0 {
            self.stacks.push(b.stack);
        }
    }
}

crate::percpu! {
    /// Wake-ups a thread that ended here could not send (it never runs again): the next
    /// context on this vCPU sends them.
    pub(super) static DEFERRED_WAKES: u64 = 0;
}
