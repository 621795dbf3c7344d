//! `scenario=cache seconds=N keys=K fill=PCT`: a page cache or memcached on every vCPU, living
//! within what the balloon lets the guest hold.
//!
//! Each vCPU serves a get/set stream over its own keys with a skewed (Zipf-like) popularity.
//! Values of mixed sizes (64 B to 16 KiB) are written with a checksum that every hit verifies.
//! Values live in 1 MiB arenas (ALLOC'd regions, like memcached's slab pages), filled in order
//! and evicted oldest first; a hit on a value in the oldest quarter moves it to the newest arena,
//! so eviction drops the least recently used values. Evicting an arena frees it whole, so the
//! cache can really give memory back.
//!
//! The cache fills `fill` percent of what the guest may hold (`SharedPage::guest_limit_frames`),
//! checks that limit every few hundred operations, shrinks as soon as the balloon takes memory
//! and grows back after a deflate. Every second each vCPU prints ops/s, its hit rate and its
//! size; vCPU 0 reports the cache bytes to the VMM (GUEST_STATS) as often as asked. It stops
//! after `seconds`, or when asked to finish, and exits 0 only if every hit verified.

use alloc::collections::VecDeque;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicU64, Ordering};

use protocol::exit;
use protocol::memcall::{op, policy};

use super::util::sig;
use super::{Ctx, fail};
use crate::rng::Rng;
use crate::{arch, mem, notify, println};

const ARENA: u64 = 1 << 20;
/// Bytes the guest keeps outside the cache (its index, stacks, tables, heap), per vCPU.
const RESERVE: u64 = 24 << 20;

/// Cache bytes per vCPU, for GUEST_STATS.
static CACHE_BYTES: [AtomicU64; protocol::MAX_VCPUS] = [const { AtomicU64::new(0) }; protocol::MAX_VCPUS];

#[derive(Clone, Copy, Default)]
struct Entry {
    /// Arena id (0: absent).
    arena: u64,
    off: u32,
    len: u32,
    sum: u64,
}

struct Arena {
    id: u64,
    va: u64,
    used: u64,
}

struct Cache {
    index: Vec<Entry>,
    arenas: VecDeque<Arena>,
    next_id: u64,
    /// Arenas this vCPU may hold now.
    budget: u64,
    evicted: u64,
    errors: u64,
}

/// The size of the value of `key`: 64 B to 16 KiB, many small, a multiple of 8.
fn value_len(key: u64) -> u64 {
    let h = sig(key, 0x51e, 0);
    let base = 64u64 << (h % 9);
    (base + (h >> 8) % 64 * 8).min(16 << 10)
}

/// Word `i` of the value of `key`, version `v`.
fn word(key: u64, v: u64, i: u64) -> u64 {
    sig(key, v, i)
}

impl Cache {
    /// Arenas the vCPU may hold with the guest's limit at `limit_frames`.
    fn budget_for(limit_frames: u64, cpus: u64, fill: u64, index_bytes: u64) -> u64 {
        let limit = limit_frames * 4096;
        let usable = (limit * fill / 100).saturating_sub(cpus * (RESERVE + index_bytes));
        usable / cpus / ARENA
    }

    fn oldest(&self) -> u64 {
        self.arenas.front().map_or(u64::MAX, |a| a.id)
    }

    fn evict_oldest(&mut self) {
        if let Some(a) = self.arenas.pop_front() {
            if mem::free(a.va).is_err() {
                self.errors += 1;
            }
            self.evicted += 1;
        }
    }

    /// Shrinks to the budget.
    fn fit(&mut self) {
        while self.arenas.len() as u64 > self.budget {
            self.evict_oldest();
        }
    }

    /// Room for `len` bytes at the end of the newest arena, making a new one if needed.
    fn room(&mut self, len: u64) -> Option<(u64, u64, u64)> {
        if let Some(a) = self.arenas.back_mut()
            && a.used + len <= ARENA
        {
            let off = a.used;
            a.used += len;
            return Some((a.id, a.va, off));
        }
        if self.budget == 0 {
            return None;
        }
        while self.arenas.len() as u64 >= self.budget {
            self.evict_oldest();
        }
        let va = loop {
            match mem::alloc(ARENA, policy::LOCAL, 0, 0) {
                Ok((va, _)) => break va,
                // Out of memory (the balloon took it): make room from our own oldest values.
                Err(_) if !self.arenas.is_empty() => self.evict_oldest(),
                Err(_) => return None,
            }
        };
        self.next_id += 1;
        self.arenas.push_back(Arena { id: self.next_id, va, used: len });
        Some((self.next_id, va, 0))
    }

    /// Writes the value of `key` (version `v`) into the newest arena.
    fn set(&mut self, key: u64, v: u64) {
        let len = value_len(key);
        let Some((id, va, off)) = self.room(len) else { return };
        let mut sum = 0u64;
        for i in 0..len / 8 {
            let w = word(key, v, i);
            sum = sum.wrapping_add(w);
            // SAFETY: [va + off, va + off + len) lies in an arena this vCPU allocated.
            unsafe { core::ptr::write_volatile((va + off + i * 8) as *mut u64, w) };
        }
        self.index[key as usize] = Entry { arena: id, off: off as u32, len: len as u32, sum };
    }

    /// Looks `key` up: `Some(true)` a verified hit, `Some(false)` a corrupt value, `None` a miss.
    fn get(&mut self, key: u64) -> Option<bool> {
        let e = self.index[key as usize];
        if e.arena == 0 || e.arena < self.oldest() {
            return None;
        }
        let a = &self.arenas[(e.arena - self.oldest()) as usize];
        let mut sum = 0u64;
        for i in 0..u64::from(e.len) / 8 {
            // SAFETY: the entry points into a live arena of this vCPU.
            sum =
                sum.wrapping_add(unsafe { core::ptr::read_volatile((a.va + u64::from(e.off) + i * 8) as *const u64) });
        }
        let ok = sum == e.sum;
        // A hit in the oldest quarter moves to the newest arena: eviction drops what is cold.
        if ok && (e.arena - self.oldest()) * 4 < self.arenas.len() as u64 {
            self.set(key, 1);
        }
        Some(ok)
    }

    fn bytes(&self) -> u64 {
        self.arenas.len() as u64 * ARENA
    }
}

/// A key with a skewed popularity over `[0, n)`: small keys are far more popular.
fn zipf(rng: &mut Rng, n: u64) -> u64 {
    let u = u128::from(rng.below(1 << 32));
    // u^3 over [0, 1) puts most of the mass near 0.
    (((u * u * u) >> 64) as u64 * n) >> 32
}

pub fn run(ctx: &Ctx) {
    let seconds = ctx.args.num("seconds", 10).unwrap_or(10);
    let keys = ctx.args.num("keys", 1 << 20).unwrap_or(1 << 20).max(1024) / u64::from(ctx.cpus);
    let fill = ctx.args.num("fill", 85).unwrap_or(85).min(95);
    let cpus = u64::from(ctx.cpus);
    let khz = ctx.bi.tsc_khz.max(1);
    let mut rng = Rng::new(ctx.seed());
    let index_bytes = keys * core::mem::size_of::<Entry>() as u64;
    let mut cache = Cache {
        index: alloc::vec![Entry::default(); keys as usize],
        arenas: VecDeque::new(),
        next_id: 0,
        budget: Cache::budget_for(notify::page().guest_limit_frames, cpus, fill, index_bytes),
        evicted: 0,
        errors: 0,
    };
    ctx.barrier();
    let start = arch::rdtsc();
    let end = start.saturating_add(seconds.saturating_mul(khz).saturating_mul(1000));
    let (mut ops, mut hits, mut misses, mut peak) = (0u64, 0u64, 0u64, 0u64);
    let (mut tick_ops, mut tick_hits, mut tick) = (0u64, 0u64, start);
    let mut last_report = start;
    let mut limit = notify::page().guest_limit_frames;
    loop {
        for _ in 0..256 {
            let key = zipf(&mut rng, keys);
            match cache.get(key) {
                Some(true) => {
                    hits += 1;
                    tick_hits += 1;
                }
                Some(false) => {
                    cache.errors += 1;
                    if cache.errors <= 4 {
                        println!("guest: cache: cpu {}: value of key {key} does not verify", ctx.cpu);
                    }
                }
                None => {
                    misses += 1;
                    cache.set(key, 0);
                }
            }
        }
        ops += 256;
        tick_ops += 256;
        peak = peak.max(cache.bytes());
        CACHE_BYTES[ctx.cpu as usize].store(cache.bytes(), Ordering::Relaxed);
        // The balloon's limit: shrink at once, grow back when it rises.
        let page = notify::page();
        if page.guest_limit_frames != limit {
            limit = page.guest_limit_frames;
            cache.budget = Cache::budget_for(limit, cpus, fill, index_bytes);
            cache.fit();
        }
        let now = arch::rdtsc();
        if now - tick >= khz * 1000 {
            let elapsed_ms = (now - tick) / khz;
            println!(
                "@result scenario=cache-tick cpu={} t_ms={} ops_per_sec={} hit_rate_pct={} cache_kib={} limit_kib={}",
                ctx.cpu,
                (now - start) / khz,
                tick_ops * 1000 / elapsed_ms.max(1),
                tick_hits * 100 / tick_ops.max(1),
                cache.bytes() / 1024,
                limit * 4
            );
            (tick_ops, tick_hits, tick) = (0, 0, now);
        }
        if ctx.cpu == 0 && page.stats_interval_ms > 0 && now - last_report >= page.stats_interval_ms * khz {
            let total: u64 = CACHE_BYTES.iter().take(ctx.cpus as usize).map(|b| b.load(Ordering::Relaxed)).sum();
            let _ =
                mem::call(mem::mk(op::GUEST_STATS, 0, [total, crate::trap::LAZY_FAULTS.load(Ordering::Relaxed), 0, 0]));
            last_report = now;
        }
        if now >= end || page.shutdown != 0 {
            break;
        }
    }
    println!(
        "@result scenario=cache cpu={} ops={ops} hits={hits} misses={misses} hit_rate_pct={} evicted_arenas={} peak_kib={} notified={} errors={}",
        ctx.cpu,
        hits * 100 / ops.max(1),
        cache.evicted,
        peak / 1024,
        notify::entries(),
        cache.errors
    );
    while !cache.arenas.is_empty() {
        cache.evict_oldest();
    }
    CACHE_BYTES[ctx.cpu as usize].store(0, Ordering::Relaxed);
    if cache.errors > 0 {
        fail(exit::VERIFY_FAILED);
    }
}
