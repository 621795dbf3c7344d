//! What the allocation workloads share: self-describing objects filled with a pattern and
//! checked before they are freed, a realistic size distribution, per-operation latency
//! histograms, and the result line.

use core::sync::atomic::{AtomicI64, AtomicU64, Ordering};

use alloc::alloc::{Layout, alloc, dealloc};

use super::util::{ns, sig};
use super::{Ctx, fail};
use crate::rng::Rng;
use crate::{arch, heap, println};

/// Log2 histogram of nanoseconds.
pub struct Hist {
    buckets: [u64; 40],
    count: u64,
}

impl Hist {
    pub const fn new() -> Self {
        Hist { buckets: [0; 40], count: 0 }
    }

    pub fn record(&mut self, ns: u64) {
        let b = (64 - ns.leading_zeros() as usize).min(39);
        self.buckets[b] += 1;
        self.count += 1;
    }

    /// Counts per bucket: bucket `i` holds values in `[2^(i-1), 2^i)`.
    pub fn counts(&self) -> &[u64] {
        &self.buckets
    }

    /// Upper bound of the bucket holding quantile `q` (0..=100).
    pub fn percentile(&self, q: u64) -> u64 {
        let rank = (self.count * q).div_ceil(100).max(1);
        let mut seen = 0;
        for (i, &c) in self.buckets.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return if i == 0 { 0 } else { (1 << i) - 1 };
            }
        }
        0
    }
}

/// Bytes live across all vCPUs (objects may be freed on another vCPU than their allocation).
static LIVE: AtomicI64 = AtomicI64::new(0);
/// The highest `LIVE` seen: the workload's peak footprint.
static PEAK: AtomicU64 = AtomicU64::new(0);

/// Starts a new peak measurement (between workloads, while nothing is live).
pub fn reset_peak() {
    PEAK.store(LIVE.load(Ordering::Relaxed).max(0) as u64, Ordering::Relaxed);
}

/// Accounts `bytes` allocated (positive) or freed (negative).
pub fn account(bytes: i64) {
    let now = LIVE.fetch_add(bytes, Ordering::Relaxed) + bytes;
    PEAK.fetch_max(now.max(0) as u64, Ordering::Relaxed);
}

/// A workload's running figures on one vCPU.
pub struct Run {
    pub ops: u64,
    pub errors: u64,
    pub checksum: u64,
    pub hist: Hist,
    start: u64,
    exits0: u64,
    tsc_khz: u64,
}

impl Run {
    pub fn new(ctx: &Ctx) -> Self {
        Run {
            ops: 0,
            errors: 0,
            checksum: 0,
            hist: Hist::new(),
            start: arch::rdtsc(),
            exits0: heap::exits(),
            tsc_khz: ctx.bi.tsc_khz.max(1),
        }
    }

    /// Records one operation that took `cycles` TSC ticks.
    pub fn timed(&mut self, cycles: u64) {
        self.hist.record(cycles * 1_000_000 / self.tsc_khz);
        self.ops += 1;
    }

    fn error(&mut self, what: &str, ptr: u64) {
        self.errors += 1;
        if self.errors <= 8 {
            println!("guest: workload: cpu {}: {what} at {ptr:#x}", arch::cpu_id());
        }
    }

    /// Prints the result line and records a failure if any check failed.
    pub fn report(&self, ctx: &Ctx, name: &str, extra: core::fmt::Arguments<'_>) {
        let elapsed = ns(ctx.bi, arch::rdtsc() - self.start).max(1);
        let exits = heap::exits() - self.exits0;
        println!(
            "@result scenario={name} cpu={} ops={} ops_per_sec={} p50_ns={} p99_ns={} peak_bytes={} checksum={:#x} allocator_exits={} ops_per_exit={} errors={} ring_depth={} {extra}",
            ctx.cpu,
            self.ops,
            self.ops * 1_000_000_000 / elapsed,
            self.hist.percentile(50),
            self.hist.percentile(99),
            PEAK.load(Ordering::Relaxed),
            self.checksum,
            exits,
            self.ops / exits.max(1),
            self.errors,
            // The 64-byte class's.
            protocol::slab::class_for(64, 8).map_or(0, heap::ring_depth),
        );
        if self.errors > 0 {
            fail(protocol::exit::VERIFY_FAILED);
        }
    }
}

/// An object: its first word holds its size, its second a signature, the rest a pattern derived
/// from both, so any vCPU can check it before freeing it.
#[derive(Clone, Copy)]
pub struct Obj(pub *mut u8);

// SAFETY: an Obj is a pointer to memory the workload owns; workloads hand objects between vCPUs
// only through synchronised queues and barriers.
unsafe impl Send for Obj {}

/// Smallest object (size and signature words).
pub const MIN_OBJ: usize = 16;

fn word(s: u64, i: usize) -> u64 {
    s ^ (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15)
}

impl Obj {
    /// Allocates `size >= 16` bytes, timed, and fills them. `None` when memory ran out.
    pub fn new(run: &mut Run, size: usize, id: u64) -> Option<Obj> {
        let layout = Layout::from_size_align(size, 8).ok()?;
        let t0 = arch::rdtsc();
        // SAFETY: layout has a non-zero size.
        let p = unsafe { alloc(layout) };
        run.timed(arch::rdtsc() - t0);
        if p.is_null() {
            return None;
        }
        // Not the address: where an object lands depends on when the VMM refilled the rings.
        let s = sig(id, size as u64, 0);
        let words = p.cast::<u64>();
        // SAFETY: p is a fresh allocation of `size` >= 16 bytes, aligned to 8.
        unsafe {
            words.write(size as u64);
            words.add(1).write(s);
            for i in 2..size / 8 {
                words.add(i).write(word(s, i));
            }
            for b in (size / 8) * 8..size {
                p.add(b).write(s as u8);
            }
        }
        account(size as i64);
        Some(Obj(p))
    }

    /// Checks the contents, then frees it (timed).
    pub fn free(self, run: &mut Run) {
        let p = self.0;
        let words = p.cast::<u64>();
        // SAFETY: the object was filled by `new` and is owned by the caller.
        let (size, s) = unsafe { (words.read() as usize, words.add(1).read()) };
        if !(MIN_OBJ..=1 << 20).contains(&size) {
            run.error("object header corrupted", p as u64);
            return;
        }
        let mut ok = true;
        for i in 2..size / 8 {
            // SAFETY: within the object.
            ok &= unsafe { words.add(i).read() } == word(s, i);
        }
        for b in (size / 8) * 8..size {
            // SAFETY: within the object.
            ok &= unsafe { p.add(b).read() } == s as u8;
        }
        if !ok {
            run.error("object contents corrupted", p as u64);
        }
        run.checksum = run.checksum.wrapping_add(s);
        account(-(size as i64));
        let layout = Layout::from_size_align(size, 8).expect("valid");
        let t0 = arch::rdtsc();
        // SAFETY: allocated by `new` with this layout and not freed since.
        unsafe { dealloc(p, layout) };
        run.timed(arch::rdtsc() - t0);
    }
}

/// Sizes as programs allocate them: many small, few large (about 1% above a page).
pub fn realistic_size(rng: &mut Rng) -> usize {
    let r = rng.below(1000);
    let (lo, hi) = match r {
        0..=449 => (16, 32),
        450..=699 => (33, 128),
        700..=849 => (129, 512),
        850..=949 => (513, 2048),
        950..=989 => (2049, 4096),
        _ => (4097, 32768),
    };
    rng.range(lo, hi) as usize
}
