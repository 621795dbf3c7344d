//! `scenario=workingset size=SIZE hot=PCT seconds=N write=PCT compress=PCT zero=PCT slow_us=N`:
//! a working set with a hot subset, for a VMM that takes memory away (swap, compression) and
//! has to bring it back.
//!
//! Each vCPU allocates its own share of `size` (LOCAL policy, so on its own node, in 2 MiB
//! regions, no HUGE): a contiguous range of global page indices, so no two vCPUs ever write the
//! same page and every check is exact. It also allocates an array of the version it expects in
//! each of its pages (8 bytes a page, ordinary guest memory too; version 0: never written).
//!
//! A page is a pure function of (global index, version, seed): word 0 is `MAGIC ^ index`, word 1
//! the version, then `compress` percent of the remaining words repeat a 64-byte pattern derived
//! from (index, version) and the rest are pseudo-random words (a fast hash of index, version,
//! seed and word), so lz4 compresses a page to about (100 - compress) percent. `zero` percent of
//! the pages (a fixed function of index and seed) are never written and must read all zero.
//!
//! The hot set is `hot` percent of a vCPU's pages, scattered over its share by a seeded affine
//! permutation (so every 2 MiB region holds some hot pages); it takes 90% of the accesses, the
//! others pick uniformly among the rest. For `seconds` each vCPU picks a page and, with
//! probability `write` percent, rewrites it whole at the next version, otherwise verifies it
//! whole (zero pages are only ever verified). Every access is timed with rdtsc; one slower than
//! `slow_us` (20) microseconds is `slow`: the VMM had to bring a page back (a second-level
//! fault). Every second each vCPU prints a tick; at the end (or when asked to finish) it
//! verifies every page of its share again. Exits 0 only if every check passed.

use alloc::vec::Vec;
use core::sync::atomic::{AtomicBool, Ordering};

use protocol::exit;
use protocol::memcall::policy;

use super::util::{read, sig, write};
use super::workload::Hist;
use super::{Ctx, fail};
use crate::mem::{self, Error};
use crate::rng::Rng;
use crate::{arch, notify, println};

const PAGE: u64 = 4096;
const WORDS: u64 = PAGE / 8;
/// Allocation granule: 2 MiB regions.
const REGION: u64 = 2 << 20;
const REGION_PAGES: u64 = REGION / PAGE;
/// Word 0 of a written page is this xor its global index.
const MAGIC: u64 = 0x574b_5345_0000_0000;
/// Percent of the accesses that go to the hot set.
const HOT_SHARE: u64 = 90;
/// Salt of the function picking the zero pages.
const ZERO_SALT: u64 = 0x2e40;
/// Mismatches printed per vCPU while filling and in the final verification.
const MAX_REPORTS: u64 = 4;

/// Set by a vCPU that could not allocate its share: every vCPU then gives up.
static FAILED: AtomicBool = AtomicBool::new(false);

/// Word `i` of a page from `h` (a hash of index, version and seed): one multiply.
#[inline(always)]
fn mix(h: u64, i: u64) -> u64 {
    let z = h ^ i.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    let z = (z ^ (z >> 32)).wrapping_mul(0xd6e8_feb8_6659_fd93);
    z ^ (z >> 32)
}

/// What pages hold.
#[derive(Clone, Copy)]
struct Content {
    seed: u64,
    /// Words `2..pat_end` hold the pattern, the rest pseudo-random words.
    pat_end: u64,
}

/// A word that did not verify: (word index, expected, found).
type Mismatch = (u64, u64, u64);

impl Content {
    /// Word `i` of page `g` at version `ver` (0: all zero), with `h = sig(g, ver, seed)`.
    fn word(&self, g: u64, ver: u64, h: u64, i: u64) -> u64 {
        if ver == 0 {
            0
        } else if i == 0 {
            MAGIC ^ g
        } else if i == 1 {
            ver
        } else if i < self.pat_end {
            // Eight words repeated: lz4 squeezes the run to almost nothing.
            h.wrapping_add(i & 7)
        } else {
            mix(h, i)
        }
    }

    /// Writes page `g` at version `ver` (> 0) at `va`.
    fn fill(&self, va: u64, g: u64, ver: u64) {
        let h = sig(g, ver, self.seed);
        write(va, MAGIC ^ g);
        write(va + 8, ver);
        for i in 2..self.pat_end {
            write(va + i * 8, h.wrapping_add(i & 7));
        }
        for i in self.pat_end..WORDS {
            write(va + i * 8, mix(h, i));
        }
    }

    /// Checks the whole page at `va` against page `g` at version `ver`: the first bad word.
    fn check(&self, va: u64, g: u64, ver: u64) -> Option<Mismatch> {
        let h = sig(g, ver, self.seed);
        // The differences, or'ed together in straight loops; a mismatch is located afterwards.
        let diff = if ver == 0 {
            (0..WORDS).fold(0, |d, i| d | read(va + i * 8))
        } else {
            let d = (read(va) ^ (MAGIC ^ g)) | (read(va + 8) ^ ver);
            let d = (2..self.pat_end).fold(d, |d, i| d | (read(va + i * 8) ^ h.wrapping_add(i & 7)));
            (self.pat_end..WORDS).fold(d, |d, i| d | (read(va + i * 8) ^ mix(h, i)))
        };
        if diff == 0 {
            return None;
        }
        (0..WORDS).find_map(|i| {
            let (want, got) = (self.word(g, ver, h, i), read(va + i * 8));
            (want != got).then_some((i, want, got))
        })
    }
}

/// Prints a page that did not verify.
fn report(cpu: u32, phase: &str, g: u64, ver: u64, va: u64, (i, want, got): Mismatch) {
    println!(
        "@result scenario=workingset cpu={cpu} error=mismatch phase={phase} page={g} version={ver} word={i} expected={want:#x} found={got:#x} found_version={}",
        read(va + 8)
    );
}

/// A vCPU's pages (global indices `first..first + pages`, local `0..pages`).
struct Share {
    pages: u64,
    /// The 2 MiB regions holding them, in order.
    regions: Vec<u64>,
    /// The expected version of each page (u64s; 0 until allocated).
    versions: u64,
}

impl Share {
    /// Allocates the version array and the regions; what it got stays in `self` either way.
    fn allocate(&mut self) -> Result<(), Error> {
        self.versions = mem::alloc((self.pages * 8).next_multiple_of(PAGE), policy::LOCAL, 0, 0)?.0;
        let bytes = self.pages * PAGE;
        while (self.regions.len() as u64) * REGION < bytes {
            let len = REGION.min(bytes - self.regions.len() as u64 * REGION);
            self.regions.push(mem::alloc(len, policy::LOCAL, 0, 0)?.0);
        }
        Ok(())
    }

    /// The address of local page `p`.
    fn va(&self, p: u64) -> u64 {
        self.regions[(p / REGION_PAGES) as usize] + (p % REGION_PAGES) * PAGE
    }

    fn version(&self, p: u64) -> u64 {
        read(self.versions + p * 8)
    }

    fn set_version(&self, p: u64, v: u64) {
        write(self.versions + p * 8, v);
    }

    /// Frees everything; false if a free failed.
    fn free(&mut self) -> bool {
        let mut ok = true;
        for va in self.regions.drain(..).chain((self.versions != 0).then_some(self.versions)) {
            ok &= mem::free(va).is_ok();
        }
        self.versions = 0;
        ok
    }
}

fn gcd(mut a: u64, mut b: u64) -> u64 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

/// A seeded permutation of `[0, n)`: `j -> (a * j + b) mod n` with `gcd(a, n) = 1`. The hot
/// set is its first `hot` percent, spread over the whole share. Needs `n < 2^32` (16 TiB).
struct Perm {
    a: u64,
    b: u64,
    n: u64,
}

impl Perm {
    fn new(rng: &mut Rng, n: u64) -> Perm {
        let mut a = 1 + rng.below(n);
        while gcd(a, n) != 1 {
            a += 1;
        }
        Perm { a: a % n, b: rng.below(n), n }
    }

    fn at(&self, j: u64) -> u64 {
        (self.a * j + self.b) % self.n
    }
}

/// Access counts (for a tick or the whole run).
#[derive(Clone, Copy, Default)]
struct Counts {
    reads: u64,
    writes: u64,
    hot_slow: u64,
    cold_slow: u64,
}

impl Counts {
    fn ops(&self) -> u64 {
        self.reads + self.writes
    }

    fn slow(&self) -> u64 {
        self.hot_slow + self.cold_slow
    }

    fn add(&mut self, o: &Counts) {
        self.reads += o.reads;
        self.writes += o.writes;
        self.hot_slow += o.hot_slow;
        self.cold_slow += o.cold_slow;
    }
}

pub fn run(ctx: &Ctx) {
    let size = ctx.args.num("size", 64 << 20).unwrap_or(64 << 20);
    let hot = ctx.args.num("hot", 10).unwrap_or(10).min(100);
    let seconds = ctx.args.num("seconds", 10).unwrap_or(10);
    let write_pct = ctx.args.num("write", 30).unwrap_or(30).min(100);
    let compress = ctx.args.num("compress", 50).unwrap_or(50).min(100);
    let zero = ctx.args.num("zero", 0).unwrap_or(0).min(100);
    let slow_us = ctx.args.num("slow_us", 20).unwrap_or(20);
    let (cpu, cpus) = (u64::from(ctx.cpu), u64::from(ctx.cpus));
    let total = size / PAGE;
    if total < cpus {
        if ctx.cpu == 0 {
            println!("guest: workingset: size={size} is less than a page per vCPU");
        }
        fail(exit::BAD_ARGS);
        return;
    }
    let khz = ctx.bi.tsc_khz.max(1);
    let content = Content { seed: ctx.bi.seed, pat_end: 2 + (WORDS - 2) * compress / 100 };
    let first = total * cpu / cpus;
    let mut share = Share { pages: total * (cpu + 1) / cpus - first, regions: Vec::new(), versions: 0 };
    let n = share.pages;

    if let Err(e) = share.allocate() {
        let versions_kib = (n * 8).next_multiple_of(PAGE) / 1024;
        println!(
            "@result scenario=workingset cpu={} error=alloc_failed status={} wanted_kib={} got_kib={}",
            ctx.cpu,
            e.name(),
            n * 4 + versions_kib,
            share.regions.len() as u64 * (REGION / 1024) + if share.versions != 0 { versions_kib } else { 0 }
        );
        FAILED.store(true, Ordering::Release);
        fail(exit::MEMCALL_FAILED);
    }
    ctx.barrier();
    if FAILED.load(Ordering::Acquire) {
        share.free();
        return;
    }

    // Every page: fresh memory must read zero; then version 1, or 0 for a zero page.
    let mut errors = 0u64;
    let mut zero_pages = 0u64;
    let t_fill = arch::rdtsc();
    for p in 0..n {
        let (g, va) = (first + p, share.va(p));
        if let Some(m) = content.check(va, g, 0) {
            errors += 1;
            if errors <= MAX_REPORTS {
                report(ctx.cpu, "fill", g, 0, va, m);
            }
        }
        let ver = if sig(g, content.seed, ZERO_SALT) % 100 < zero { 0 } else { 1 };
        if ver == 0 {
            zero_pages += 1;
        } else {
            content.fill(va, g, ver);
        }
        share.set_version(p, ver);
    }
    let fill_ms = (arch::rdtsc() - t_fill) / khz;
    ctx.barrier();

    let mut rng = Rng::new(ctx.seed());
    let hot_n = (n * hot / 100).max(u64::from(hot > 0));
    let cold_n = n - hot_n;
    let perm = Perm::new(&mut rng, n);
    let slow_cycles = slow_us.saturating_mul(khz) / 1000;
    let second = khz * 1000;
    let mut hist = Hist::new();
    let (mut all, mut tick) = (Counts::default(), Counts::default());
    let start = arch::rdtsc();
    let end = start.saturating_add(seconds.saturating_mul(second));
    // Ticks fall on whole seconds from the start (the last one at the end); each covers the
    // time since the one before.
    let (mut tick_t, mut next_tick) = (start, start + second);
    let mut now = start;
    while errors == 0 {
        let is_hot = hot_n > 0 && (cold_n == 0 || rng.below(100) < HOT_SHARE);
        let p = perm.at(if is_hot { rng.below(hot_n) } else { hot_n + rng.below(cold_n) });
        let is_write = rng.below(100) < write_pct;
        let (g, va) = (first + p, share.va(p));
        let t0 = arch::rdtsc();
        let ver = share.version(p);
        // Zero pages are only ever read.
        let wrote = is_write && ver != 0;
        let bad = if wrote {
            content.fill(va, g, ver + 1);
            share.set_version(p, ver + 1);
            None
        } else {
            content.check(va, g, ver)
        };
        now = arch::rdtsc();
        let dt = now - t0;
        hist.record(dt * 1_000_000 / khz);
        if wrote {
            tick.writes += 1;
        } else {
            tick.reads += 1;
        }
        if dt >= slow_cycles {
            if is_hot {
                tick.hot_slow += 1;
            } else {
                tick.cold_slow += 1;
            }
        }
        if let Some(m) = bad {
            errors += 1;
            report(ctx.cpu, "run", g, ver, va, m);
        }
        if now >= next_tick {
            println!(
                "@result scenario=workingset-tick cpu={} t_ms={} ops_per_sec={} reads={} writes={} slow={} hot_slow={} cold_slow={}",
                ctx.cpu,
                (now - start) / khz,
                tick.ops() * 1000 / ((now - tick_t) / khz).max(1),
                tick.reads,
                tick.writes,
                tick.slow(),
                tick.hot_slow,
                tick.cold_slow
            );
            all.add(&tick);
            // Boundaries missed while the vCPU did not run are skipped.
            next_tick += ((now - next_tick) / second + 1) * second;
            (tick, tick_t) = (Counts::default(), now);
        }
        if now >= end || (tick.ops() % 256 == 0 && notify::shutdown_requested()) {
            break;
        }
    }
    all.add(&tick);
    let run_ms = ((now - start) / khz).max(1);

    // Every page again, whatever happened above.
    let mut verified = 0u64;
    for p in 0..n {
        let (g, va, ver) = (first + p, share.va(p), share.version(p));
        match content.check(va, g, ver) {
            None => verified += 1,
            Some(m) => {
                errors += 1;
                if errors <= MAX_REPORTS {
                    report(ctx.cpu, "final", g, ver, va, m);
                }
            }
        }
    }
    println!(
        "@result scenario=workingset cpu={} pages={n} hot_pages={hot_n} zero_pages={zero_pages} ops={} ops_per_sec={} reads={} writes={} verified_pages={verified} errors={errors} slow={} hot_slow={} cold_slow={} p50_ns={} p99_ns={} fill_ms={fill_ms}",
        ctx.cpu,
        all.ops(),
        all.ops() * 1000 / run_ms,
        all.reads,
        all.writes,
        all.slow(),
        all.hot_slow,
        all.cold_slow,
        hist.percentile(50),
        hist.percentile(99),
    );
    // The access-time distribution, for plots: log2 buckets of nanoseconds, `:`-separated.
    let mut buckets = alloc::string::String::new();
    for (i, c) in hist.counts().iter().enumerate() {
        let _ = core::fmt::Write::write_fmt(&mut buckets, format_args!("{}{c}", if i > 0 { ":" } else { "" }));
    }
    println!("@result scenario=workingset-latency cpu={} log2_ns={buckets}", ctx.cpu);
    if !share.free() {
        println!("guest: workingset: cpu {}: a free failed", ctx.cpu);
        fail(exit::MEMCALL_FAILED);
    }
    if errors > 0 {
        fail(exit::VERIFY_FAILED);
    }
}
