//! What a guest that schedules threads of its own needs from its kernel: timer ticks that
//! interrupt a busy vCPU (so one thread cannot keep the others from running), and a way for a
//! vCPU with nothing to run to sleep instead of spinning, until another vCPU wakes it.
//!
//! A tick is delivered like a notification (`vcpu.rs`): the vCPU is kicked out of `KVM_RUN` and
//! resumes in the guest's tick handler, with the interrupted RFLAGS and RIP on its stack. A
//! ticker thread kicks the vCPUs whose ticks are due; vCPUs that sleep are not kicked. The
//! guest masks ticks with a word of its per-vCPU page, which the VMM sets on delivery (like a
//! CPU clearing IF); a tick due while masked is only marked pending.
//!
//! Everything the guest gives is checked: handlers must lie in executable image pages, periods
//! are clamped, sleeps last at most a second, wake targets must exist.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use crate::metrics::Counter;
use crate::sync::lock;

/// Shortest and longest tick period accepted, in microseconds.
pub const MIN_TICK_US: u64 = 1000;
pub const MAX_TICK_US: u64 = 1_000_000;
/// Longest a vCPU sleeps in one IDLE.
pub const MAX_IDLE: Duration = Duration::from_secs(1);
/// A sleeping vCPU looks at the VM's state (a stop, a notification) this often.
const IDLE_RECHECK: Duration = Duration::from_millis(50);

/// One vCPU's ticks and sleep.
#[derive(Debug, Default)]
struct CpuTicks {
    /// The tick handler (0: ticks off), the period, and when the next tick is due (ns since
    /// the VM's start).
    handler: AtomicU64,
    period_ns: AtomicU64,
    next_ns: AtomicU64,
    /// Set while the vCPU sleeps in IDLE (the ticker leaves it alone).
    idle: AtomicBool,
    /// A wake-up waiting to be taken (a WAKE that came before the IDLE counts).
    woken: Mutex<bool>,
    cv: Condvar,
}

/// Counts (the stats JSON's `ticks`).
#[derive(Debug, Default)]
pub struct TickCounters {
    pub delivered: Counter,
    /// Ticks that found the guest's mask set.
    pub masked: Counter,
    pub idles: Counter,
    pub wakes: Counter,
    /// Time vCPUs spent asleep in IDLE.
    pub idle_us: Counter,
    /// SET_TICK, IDLE or WAKE requests refused (bad handler, bad target).
    pub refused: Counter,
}

/// A snapshot.
#[derive(Clone, Debug, serde::Serialize)]
pub struct TickReport {
    pub delivered: u64,
    pub masked: u64,
    pub idles: u64,
    pub wakes: u64,
    pub idle_us: u64,
    pub refused: u64,
}

/// Every vCPU's ticks and sleep.
#[derive(Debug)]
pub struct Ticks {
    start: Instant,
    cpus: Vec<CpuTicks>,
    /// The vCPU threads, for kicks.
    threads: OnceLock<Vec<libc::pthread_t>>,
    /// Wakes the ticker when a vCPU's ticks change.
    changed: (Mutex<u64>, Condvar),
    pub counters: TickCounters,
}

impl Ticks {
    pub fn new(cpus: u32) -> Self {
        Ticks {
            start: Instant::now(),
            cpus: (0..cpus).map(|_| CpuTicks::default()).collect(),
            threads: OnceLock::new(),
            changed: (Mutex::new(0), Condvar::new()),
            counters: TickCounters::default(),
        }
    }

    /// How many vCPUs sleep in IDLE now (their threads need no host CPU).
    pub fn sleeping(&self) -> usize {
        self.cpus.iter().filter(|c| c.idle.load(Ordering::Relaxed)).count()
    }

    /// The vCPU threads, indexed by vCPU id, once they run.
    pub fn set_threads(&self, threads: Vec<libc::pthread_t>) {
        let _ = self.threads.set(threads);
    }

    fn now_ns(&self) -> u64 {
        u64::try_from(self.start.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    /// SET_TICK from vCPU `cpu`: ticks every `period_us` (clamped) into `handler`, which the
    /// caller checked; `period_us == 0` turns them off.
    pub fn set(&self, cpu: u32, handler: u64, period_us: u64) {
        let Some(c) = self.cpus.get(cpu as usize) else { return };
        if period_us == 0 {
            c.handler.store(0, Ordering::Release);
        } else {
            let ns = period_us.clamp(MIN_TICK_US, MAX_TICK_US) * 1000;
            c.period_ns.store(ns, Ordering::Relaxed);
            c.next_ns.store(self.now_ns() + ns, Ordering::Relaxed);
            c.handler.store(handler, Ordering::Release);
        }
        *lock(&self.changed.0) += 1;
        self.changed.1.notify_all();
    }

    /// If vCPU `cpu`'s tick is due: its handler (and the next tick is scheduled).
    pub fn due(&self, cpu: u32) -> Option<u64> {
        let c = self.cpus.get(cpu as usize)?;
        let handler = c.handler.load(Ordering::Acquire);
        if handler == 0 {
            return None;
        }
        let now = self.now_ns();
        let next = c.next_ns.load(Ordering::Relaxed);
        if now < next {
            return None;
        }
        // Ticks missed while the vCPU was busy elsewhere are not made up.
        c.next_ns.store(now + c.period_ns.load(Ordering::Relaxed), Ordering::Relaxed);
        Some(handler)
    }

    /// IDLE from vCPU `cpu`: sleeps until woken, `timeout` passes, or `interrupted()` says the
    /// VM has something for it. `asleep()` runs once the vCPU counts as sleeping.
    pub fn idle(&self, cpu: u32, timeout: Duration, interrupted: impl Fn() -> bool, asleep: impl FnOnce()) {
        let Some(c) = self.cpus.get(cpu as usize) else { return };
        self.counters.idles.inc();
        let start = Instant::now();
        let deadline = start + timeout.min(MAX_IDLE);
        c.idle.store(true, Ordering::Release);
        asleep();
        let mut woken = lock(&c.woken);
        while !*woken && !interrupted() {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            let wait = (deadline - now).min(IDLE_RECHECK);
            woken = c.cv.wait_timeout(woken, wait).map_or_else(|e| e.into_inner().0, |r| r.0);
        }
        *woken = false;
        drop(woken);
        c.idle.store(false, Ordering::Release);
        // Ticks resume from now: a sleeping vCPU was not running anything to preempt.
        let period = c.period_ns.load(Ordering::Relaxed);
        c.next_ns.store(self.now_ns() + period, Ordering::Relaxed);
        self.counters.idle_us.add(crate::metrics::micros(start.elapsed()));
    }

    /// WAKE for vCPU `cpu`: `false` if there is no such vCPU.
    pub fn wake(&self, cpu: u32) -> bool {
        let Some(c) = self.cpus.get(cpu as usize) else { return false };
        self.counters.wakes.inc();
        *lock(&c.woken) = true;
        c.cv.notify_one();
        true
    }

    /// Wakes every sleeping vCPU (the VM stops, or has something for them).
    pub fn wake_all(&self) {
        for c in &self.cpus {
            *lock(&c.woken) = true;
            c.cv.notify_one();
        }
    }

    /// The ticker: kicks each vCPU out of `KVM_RUN` when its tick is due (unless it sleeps),
    /// until `stop()` says the VM is over. Runs on its own thread.
    pub fn run_ticker(&self, stop: impl Fn() -> bool) {
        while !stop() {
            let now = self.now_ns();
            let mut next = now + 100_000_000;
            let threads = self.threads.get();
            for (i, c) in self.cpus.iter().enumerate() {
                if c.handler.load(Ordering::Acquire) == 0 {
                    continue;
                }
                let due = c.next_ns.load(Ordering::Relaxed);
                if due <= now {
                    if !self.is_idle(i)
                        && let Some(&t) = threads.and_then(|t| t.get(i))
                    {
                        crate::signals::kick_vcpu(t);
                    }
                    next = next.min(now + c.period_ns.load(Ordering::Relaxed));
                } else {
                    next = next.min(due);
                }
            }
            let wait = Duration::from_nanos(next.saturating_sub(self.now_ns()).max(200_000));
            let g = lock(&self.changed.0);
            let seen = *g;
            let _ = self.changed.1.wait_timeout_while(g, wait, |n| *n == seen);
        }
    }

    /// Whether vCPU `cpu` sleeps (in the VMM, waiting for a wake-up or its timeout).
    pub fn is_idle(&self, cpu: usize) -> bool {
        self.cpus.get(cpu).is_some_and(|c| c.idle.load(Ordering::Acquire))
    }

    /// Whether any vCPU has ticks on (the ticker is needed).
    pub fn any(&self) -> bool {
        self.cpus.iter().any(|c| c.handler.load(Ordering::Acquire) != 0)
    }

    pub fn report(&self) -> TickReport {
        let c = &self.counters;
        TickReport {
            delivered: c.delivered.get(),
            masked: c.masked.get(),
            idles: c.idles.get(),
            wakes: c.wakes.get(),
            idle_us: c.idle_us.get(),
            refused: c.refused.get(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn periods_are_clamped_and_due_ticks_come_once_per_period() {
        let t = Ticks::new(2);
        t.set(0, 0x2000_0000, 1);
        assert_eq!(t.cpus[0].period_ns.load(Ordering::Relaxed), MIN_TICK_US * 1000);
        t.set(1, 0x2000_0000, u64::MAX);
        assert_eq!(t.cpus[1].period_ns.load(Ordering::Relaxed), MAX_TICK_US * 1000);
        assert_eq!(t.due(0), None, "not yet");
        std::thread::sleep(Duration::from_millis(2));
        assert_eq!(t.due(0), Some(0x2000_0000));
        assert_eq!(t.due(0), None, "missed ticks are not made up");
        t.set(0, 0, 0);
        std::thread::sleep(Duration::from_millis(2));
        assert_eq!(t.due(0), None, "off");
        assert_eq!(t.due(7), None, "no such vCPU");
        assert!(t.any(), "vCPU 1 still ticks");
    }

    #[test]
    fn a_wake_before_the_idle_is_not_lost_and_sleeps_are_bounded() {
        let t = Ticks::new(1);
        assert!(t.wake(0));
        assert!(!t.wake(1), "no such vCPU");
        let start = Instant::now();
        t.idle(0, Duration::from_secs(10), || false, || {});
        assert!(start.elapsed() < Duration::from_millis(100), "the earlier WAKE counts");
        let start = Instant::now();
        t.idle(0, Duration::from_millis(30), || false, || {});
        let slept = start.elapsed();
        assert!(slept >= Duration::from_millis(30) && slept < Duration::from_millis(500), "{slept:?}");
        let start = Instant::now();
        t.idle(0, Duration::from_secs(3600), || true, || {});
        assert!(start.elapsed() < Duration::from_millis(100), "interrupted at once");
        assert_eq!(t.report().idles, 3);
    }

    #[test]
    fn another_thread_wakes_a_sleeping_vcpu() {
        let t = std::sync::Arc::new(Ticks::new(1));
        let t2 = std::sync::Arc::clone(&t);
        let waker = std::thread::spawn(move || {
            while !t2.cpus[0].idle.load(Ordering::Acquire) {
                std::thread::yield_now();
            }
            t2.wake(0);
        });
        let start = Instant::now();
        t.idle(0, MAX_IDLE, || false, || {});
        waker.join().unwrap();
        assert!(start.elapsed() < Duration::from_millis(500));
    }
}
