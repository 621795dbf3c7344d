//! `scenario=pages seed=N iterations=N`: allocate random sizes (4 KiB to 4 MiB) with random
//! NUMA policies and flags, check each allocation is zero, write a signature into every page,
//! verify every page before freeing in random order, and check where the VMM placed the frames
//! (TRANSLATE) against the policy. Freed addresses must fault afterwards. vCPU 0 also records
//! the VMM's RSS before, at the peak and after everything is freed.

use protocol::exit;
use protocol::memcall::{ALL_NODES, flags, policy};

use super::util::{node_of_gpa, read, sig, write};
use super::{Ctx, fail};
use crate::mem::{self, Error};
use crate::rng::Rng;
use crate::{println, trap};

const MAX_LIVE: usize = 48;

#[derive(Clone, Copy)]
struct Live {
    va: u64,
    len: u64,
    id: u64,
}

struct Run<'a> {
    ctx: &'a Ctx,
    rng: Rng,
    live: [Option<Live>; MAX_LIVE],
    next_id: u64,
    allocs: u64,
    frees: u64,
    bytes: u64,
    pages_verified: u64,
    placement_checks: u64,
    oom: u64,
    errors: u64,
}

impl Run<'_> {
    fn error(&mut self, what: &str, va: u64, detail: u64) {
        self.errors += 1;
        if self.errors <= 8 {
            println!("guest: pages: cpu {}: {what} at {va:#x} ({detail:#x})", self.ctx.cpu);
        }
    }

    fn alloc(&mut self, slot: usize) {
        let ctx = self.ctx;
        let nodes = u64::from(ctx.bi.nr_nodes);
        // Log-uniform sizes from 4 KiB to 4 MiB, not page-aligned.
        let k = self.rng.range(12, 21);
        let size = (1u64 << k) + self.rng.below(1 << k);
        let (pol, node) = match self.rng.below(4) {
            0 => (policy::LOCAL, 0),
            1 => (policy::BIND, self.rng.below(nodes)),
            2 => (policy::PREFERRED, self.rng.below(nodes)),
            _ => (policy::INTERLEAVE, 0),
        };
        let mut fl = flags::ZERO;
        for (f, pct) in [(flags::CONTIGUOUS, 25), (flags::HUGE, 15), (flags::POPULATE, 10), (flags::DMA32, 10)] {
            if self.rng.below(100) < pct {
                fl |= f;
            }
        }
        let (va, len) = match mem::alloc(size, pol, node, fl) {
            Ok(r) => r,
            Err(Error(protocol::status::ENOMEM)) => {
                self.oom += 1;
                return;
            }
            Err(e) => {
                self.error("alloc failed", size, e.0);
                return;
            }
        };
        if len < size || va % 4096 != 0 {
            self.error("short or misaligned allocation", va, len);
        }
        let id = self.next_id;
        self.next_id += 1;
        let pages = len / 4096;
        for p in 0..pages {
            let a = va + p * 4096;
            // Fresh memory reads as zero (first, middle and last word).
            if read(a) != 0 || read(a + 2048) != 0 || read(a + 4088) != 0 {
                self.error("allocation not zeroed", a, read(a));
            }
            write(a, sig(ctx.seed(), id, p));
            write(a + 4088, !sig(ctx.seed(), id, p));
        }
        self.check_placement(va, len, pol, node, fl);
        self.live[slot] = Some(Live { va, len, id });
        self.allocs += 1;
        self.bytes += len;
    }

    /// TRANSLATE the first and last page: BIND lands on its node, DMA32 below 4 GiB,
    /// CONTIGUOUS physically contiguous.
    fn check_placement(&mut self, va: u64, len: u64, pol: u64, node: u64, fl: u32) {
        let last = va + len - 4096;
        let (Ok((g0, n0)), Ok((g1, n1))) = (mem::translate(va), mem::translate(last)) else {
            self.error("translate failed", va, 0);
            return;
        };
        self.placement_checks += 1;
        if node_of_gpa(self.ctx.bi, g0).map(u64::from) != Some(n0) {
            self.error("translate reported the wrong node", va, g0);
        }
        if pol == policy::BIND && (n0 != node || n1 != node) {
            self.error("BIND allocation on another node", va, n0 * 16 + n1);
        }
        if fl & flags::DMA32 != 0 && (g0 >= 1 << 32 || g1 >= 1 << 32) {
            self.error("DMA32 allocation above 4 GiB", va, g1);
        }
        if fl & flags::CONTIGUOUS != 0 && g1 - g0 != len - 4096 {
            self.error("CONTIGUOUS allocation is not contiguous", va, g1 - g0);
        }
    }

    fn free(&mut self, slot: usize) {
        let Some(l) = self.live[slot].take() else { return };
        let seed = self.ctx.seed();
        for p in 0..l.len / 4096 {
            let a = l.va + p * 4096;
            if read(a) != sig(seed, l.id, p) || read(a + 4088) != !sig(seed, l.id, p) {
                self.error("page lost its contents", a, read(a));
            }
            self.pages_verified += 1;
        }
        if let Err(e) = mem::free(l.va) {
            self.error("free failed", l.va, e.0);
            return;
        }
        // The address is gone: the guest's #PF handler catches the access.
        match trap::read(l.va) {
            Ok(v) => self.error("freed memory still readable", l.va, v),
            Err(f) if f.addr != l.va || f.error & trap::pf::PRESENT != 0 => self.error("wrong fault", f.addr, f.error),
            Err(_) => {}
        }
        self.frees += 1;
    }
}

pub fn run(ctx: &Ctx) {
    let iterations = ctx.args.num("iterations", 300).unwrap_or(300);
    let mut r = Run {
        ctx,
        rng: crate::rng::Rng::new(ctx.seed()),
        live: [None; MAX_LIVE],
        next_id: 1,
        allocs: 0,
        frees: 0,
        bytes: 0,
        pages_verified: 0,
        placement_checks: 0,
        oom: 0,
        errors: 0,
    };
    // Warm up: run every path once (the VMM's code pages fault in on first use, which would
    // otherwise count as growth), then take the post-boot baseline.
    for fl in [0, flags::CONTIGUOUS, flags::HUGE, flags::POPULATE] {
        if let Ok((va, len)) = mem::alloc(3 << 20, policy::LOCAL, 0, fl) {
            for p in 0..len / 4096 {
                write(va + p * 4096, 1);
            }
            let _ = mem::protect(va, 4096, protocol::memcall::prot::READ);
            let va = mem::mremap(va).unwrap_or(va);
            let _ = mem::translate(va);
            let _ = mem::free(va);
            let _ = trap::read(va);
        }
    }
    ctx.barrier();
    let base = mem::stats(ALL_NODES).unwrap_or_default();
    ctx.barrier();
    let mut peak = base.host_rss_kib;
    for it in 0..iterations {
        let live = r.live.iter().filter(|l| l.is_some()).count();
        if live < MAX_LIVE && (live == 0 || r.rng.below(100) < 60) {
            let slot = r.live.iter().position(|l| l.is_none()).expect("room");
            r.alloc(slot);
        } else {
            let mut slot = r.rng.below(MAX_LIVE as u64) as usize;
            while r.live[slot].is_none() {
                slot = (slot + 1) % MAX_LIVE;
            }
            r.free(slot);
        }
        if ctx.cpu == 0 && it % 16 == 0 {
            peak = peak.max(mem::stats(ALL_NODES).map(|s| s.host_rss_kib).unwrap_or(0));
        }
    }
    if ctx.cpu == 0 {
        peak = peak.max(mem::stats(ALL_NODES).map(|s| s.host_rss_kib).unwrap_or(0));
    }
    // Free the rest in random order.
    while r.live.iter().any(|l| l.is_some()) {
        let mut slot = r.rng.below(MAX_LIVE as u64) as usize;
        while r.live[slot].is_none() {
            slot = (slot + 1) % MAX_LIVE;
        }
        r.free(slot);
    }
    println!(
        "@result scenario=pages cpu={} allocs={} frees={} bytes={} pages_verified={} placement_checks={} oom={} errors={}",
        ctx.cpu, r.allocs, r.frees, r.bytes, r.pages_verified, r.placement_checks, r.oom, r.errors
    );
    if r.errors > 0 {
        fail(exit::VERIFY_FAILED);
    }
    ctx.barrier();
    if ctx.cpu == 0 {
        let end = mem::stats(ALL_NODES).unwrap_or_default();
        println!(
            "@result scenario=pages-summary rss_base_kib={} rss_peak_kib={} rss_end_kib={} anon_base_kib={} anon_end_kib={} frames_base={} frames_end={} resident_base={} resident_end={}",
            base.host_rss_kib,
            peak,
            end.host_rss_kib,
            base.host_rss_anon_kib,
            end.host_rss_anon_kib,
            base.allocated_frames,
            end.allocated_frames,
            base.resident_frames,
            end.resident_frames
        );
        // Page-table pages stay (tables are never repointed); everything else must be back.
        if super::util::data_frames(&end) != super::util::data_frames(&base) {
            println!(
                "guest: pages: {} data frames before, {} after freeing everything",
                super::util::data_frames(&base),
                super::util::data_frames(&end)
            );
            fail(exit::VERIFY_FAILED);
        }
    }
}
