//! Asking a running guest for something: the shared page and the notification that goes with it.
//!
//! The VMM updates the [`SharedPage`] (the balloon's target, a shutdown request), bumps its
//! `seq`, and interrupts the vCPU whose handler the guest registered: a kick makes it leave
//! `KVM_RUN`, and before it enters again it pushes the interrupted RFLAGS and RIP onto the guest's
//! stack and resumes at the handler, the way a kernel delivers a signal (see
//! `protocol::port::SET_NOTIFY`). One notification at a time: the next is delivered only after
//! the guest reported the last one done. Everything the guest says here is checked.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use vm_memory::{GuestAddress, GuestMemoryBackend, VolatileMemory};

use protocol::shared::SharedPage;

use crate::memory::backing::ram::GuestRam;
use crate::memory::reclaim::balloon::BalloonSnapshot;
use crate::metrics::{Counter, Histogram, LatencySummary};
use crate::sync::lock;

/// No handler registered.
const NO_CPU: u32 = u32::MAX;
/// How long a request keeps kicking a vCPU that has not taken its notification yet.
const KICK_FOR: Duration = Duration::from_millis(100);

/// Notification counts.
#[derive(Debug, Default)]
pub struct NotifyCounters {
    /// Requests made (shared-page updates with a notification).
    pub requests: Counter,
    /// Handler entries.
    pub deliveries: Counter,
    /// NOTIFY_DONE reports that matched a delivery.
    pub done: Counter,
    /// Deliveries given up: the guest's stack could not take the frame.
    pub failed: Counter,
    /// Registrations refused (handler outside executable image pages).
    pub refused: Counter,
}

/// A snapshot (the stats JSON's `notify`).
#[derive(Clone, Debug, serde::Serialize)]
pub struct NotifyReport {
    /// The vCPU whose handler is registered.
    pub handler_cpu: Option<u32>,
    pub seq: u64,
    pub requests: u64,
    pub deliveries: u64,
    pub done: u64,
    pub failed: u64,
    pub refused: u64,
    /// From a request to the handler's entry.
    pub latency: LatencySummary,
    /// From a request to the guest's NOTIFY_DONE (its handler ran).
    pub handled_latency: LatencySummary,
}

/// The shared page and the guest's notification handler.
#[derive(Debug)]
pub struct Notifier {
    page_gpa: GuestAddress,
    /// What the page says now.
    page: Mutex<SharedPage>,
    handler_cpu: AtomicU32,
    handler_va: AtomicU64,
    /// Last seq published, delivered to the handler, and reported done.
    seq: AtomicU64,
    delivered: AtomicU64,
    done: AtomicU64,
    /// When the oldest request not yet delivered was made, and when the request delivered
    /// last (not yet reported done) was.
    since: Mutex<Option<Instant>>,
    handling: Mutex<Option<Instant>>,
    /// The vCPU threads, for kicks.
    threads: OnceLock<Vec<libc::pthread_t>>,
    pub counters: NotifyCounters,
    latency: Histogram,
    handled: Histogram,
}

impl Notifier {
    /// For the shared page at `page_gpa` (resident for good), which holds `page`.
    pub fn new(page_gpa: GuestAddress, page: SharedPage) -> Self {
        Notifier {
            page_gpa,
            page: Mutex::new(page),
            handler_cpu: AtomicU32::new(NO_CPU),
            handler_va: AtomicU64::new(0),
            seq: AtomicU64::new(page.seq),
            delivered: AtomicU64::new(page.seq),
            done: AtomicU64::new(page.seq),
            since: Mutex::new(None),
            handling: Mutex::new(None),
            threads: OnceLock::new(),
            counters: NotifyCounters::default(),
            latency: Histogram::default(),
            handled: Histogram::default(),
        }
    }

    /// The vCPU threads, indexed by vCPU id, once they run.
    pub fn set_threads(&self, threads: Vec<libc::pthread_t>) {
        let _ = self.threads.set(threads);
    }

    /// Registers `va` on vCPU `cpu` as the guest's handler (the caller checked it).
    pub fn register(&self, cpu: u32, va: u64) {
        self.handler_va.store(va, Ordering::Release);
        self.handler_cpu.store(cpu, Ordering::Release);
    }

    /// Updates the shared page with `change`, then notifies the guest and kicks its handler's
    /// vCPU until it has taken the notification (or for at most [`KICK_FOR`]).
    pub fn request(&self, ram: &GuestRam, change: impl FnOnce(&mut SharedPage)) {
        let seq = self.update(ram, |p| {
            change(p);
            p.seq += 1;
        });
        self.counters.requests.inc();
        lock(&self.since).get_or_insert_with(Instant::now);
        let cpu = self.handler_cpu.load(Ordering::Acquire);
        let Some(&thread) = self.threads.get().and_then(|t| t.get(cpu as usize)) else { return };
        let deadline = Instant::now() + KICK_FOR;
        while Instant::now() < deadline {
            let delivered = self.delivered.load(Ordering::Acquire);
            // Taken, or the handler is busy with an earlier one (it gets this one after).
            if delivered >= seq || self.done.load(Ordering::Acquire) < delivered {
                return;
            }
            crate::signals::kick_vcpu(thread);
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Updates the shared page without a notification (figures the guest may poll). Returns
    /// its seq.
    pub fn update(&self, ram: &GuestRam, change: impl FnOnce(&mut SharedPage)) -> u64 {
        let mut page = lock(&self.page);
        change(&mut page);
        let words: [u64; 8] = [
            page.magic,
            page.seq,
            page.balloon_target_frames,
            page.balloon_actual_frames,
            page.guest_limit_frames,
            page.shutdown,
            page.stats_interval_ms,
            page.deflate_on_oom,
        ];
        // Every field with one aligned 8-byte store, seq last, so the guest never reads half
        // a field and sees the new seq only with the new fields.
        for (i, w) in words.iter().enumerate().rev() {
            store(ram, GuestAddress(self.page_gpa.0 + i as u64 * 8), *w);
        }
        self.seq.store(page.seq, Ordering::Release);
        page.seq
    }

    /// Whether the guest was asked to finish.
    pub fn shutdown_requested(&self) -> bool {
        lock(&self.page).shutdown != 0
    }

    /// If vCPU `cpu` should enter the handler now: `(seq, handler address)`.
    pub fn pending_for(&self, cpu: u32) -> Option<(u64, u64)> {
        let seq = self.seq.load(Ordering::Acquire);
        let delivered = self.delivered.load(Ordering::Acquire);
        if seq == delivered || self.handler_cpu.load(Ordering::Acquire) != cpu {
            return None;
        }
        if self.done.load(Ordering::Acquire) < delivered {
            return None;
        }
        Some((seq, self.handler_va.load(Ordering::Acquire)))
    }

    /// The handler was entered for `seq` (or could not be: `ok` false).
    pub fn delivered(&self, seq: u64, ok: bool) {
        self.delivered.store(seq, Ordering::Release);
        if ok {
            self.counters.deliveries.inc();
            let since = lock(&self.since).take();
            if let Some(t) = since {
                self.latency.record(nanos(t));
            }
            *lock(&self.handling) = since;
        } else {
            // The guest will not hear of it: do not wait for its NOTIFY_DONE.
            self.done.store(seq, Ordering::Release);
            self.counters.failed.inc();
        }
    }

    /// NOTIFY_DONE from the guest, with the low 32 bits of a seq: only the delivered one counts.
    pub fn done(&self, seq32: u32) {
        let seq = self.delivered.load(Ordering::Acquire);
        if seq & 0xffff_ffff == u64::from(seq32) && self.done.swap(seq, Ordering::AcqRel) != seq {
            self.counters.done.inc();
            if let Some(t) = lock(&self.handling).take() {
                self.handled.record(nanos(t));
            }
        }
    }

    /// A snapshot.
    pub fn report(&self) -> NotifyReport {
        let cpu = self.handler_cpu.load(Ordering::Acquire);
        let c = &self.counters;
        NotifyReport {
            handler_cpu: (cpu != NO_CPU).then_some(cpu),
            seq: self.seq.load(Ordering::Acquire),
            requests: c.requests.get(),
            deliveries: c.deliveries.get(),
            done: c.done.get(),
            failed: c.failed.get(),
            refused: c.refused.get(),
            latency: self.latency.summary(),
            handled_latency: self.handled.summary(),
        }
    }
}

fn nanos(since: Instant) -> u64 {
    u64::try_from(since.elapsed().as_nanos()).unwrap_or(u64::MAX)
}

/// Puts the balloon's figures into the shared page (`total_frames`: the guest's RAM).
pub fn balloon_fields(page: &mut SharedPage, b: &BalloonSnapshot, total_frames: u64) {
    page.balloon_target_frames = b.target_frames;
    page.balloon_actual_frames = b.actual_frames;
    page.guest_limit_frames = total_frames - b.target_frames;
    page.deflate_on_oom = u64::from(b.config.deflate_on_oom);
    page.stats_interval_ms = b.config.stats_interval_s.saturating_mul(1000);
}

/// One aligned 8-byte store into resident guest RAM.
fn store(ram: &GuestRam, gpa: GuestAddress, v: u64) {
    let Ok(slice) = ram.mem().get_slice(gpa, 8) else { return };
    if let Ok(a) = slice.get_atomic_ref::<AtomicU64>(0) {
        a.store(v, Ordering::Release);
    }
}
