//! `scenario=race rounds=N huge=0|1 pages=N opmask=M`: the guest's own races with the VMM. vCPU 0
//! allocates a region, fills it, publishes its address, and soon frees it (or moves or protects
//! it first) and at once allocates again, so the same frames come straight back; meanwhile every
//! other vCPU keeps reading and writing the published address through the fault-catching probes.
//!
//! What must hold: an access ends in the data of the allocation at that address or a #PF, never
//! a VM stop; a fresh allocation reads zero; no write through an old address ever shows up in
//! another allocation (every word a toucher writes names the address it wrote through, and
//! every read checks that name). vCPU 0 writes and checks only the first pages of each
//! allocation: the rest get host memory on a toucher's first touch, a second-level fault that
//! races with the free.

use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use protocol::exit;
use protocol::memcall::{flags, policy, prot};

use super::util::sig;
use super::{Ctx, fail};
use crate::rng::Rng;
use crate::{arch, mem, println, trap};

/// The region the touchers hammer (0: none yet), and its page count.
static CURRENT: AtomicU64 = AtomicU64::new(0);
static PAGES: AtomicU64 = AtomicU64::new(0);
static STOP: AtomicBool = AtomicBool::new(false);

/// Pages vCPU 0 writes (one fault-around window); the rest stay untouched until a toucher
/// gives them host memory, so the touchers' first touches race with the free as second-level
/// faults.
const WRITTEN: u64 = 16;

/// What offset 0 of page `p` of the allocation at `va` holds.
fn data(va: u64, p: u64) -> u64 {
    if p < WRITTEN { sig(va, p, 0xda7a) } else { 0 }
}

/// What a toucher writes at offset 8 of page `p`, through address `va`.
fn tag(va: u64, p: u64) -> u64 {
    sig(va, p, 0x7a9)
}

#[derive(Default)]
struct Counts {
    rounds: u64,
    reads: u64,
    writes: u64,
    faults: u64,
    violations: u64,
}

impl Counts {
    fn violation(&mut self, what: &str, addr: u64, v: u64) {
        self.violations += 1;
        if self.violations <= 8 {
            println!("guest: race: cpu {}: {what} at {addr:#x} ({v:#x})", arch::cpu_id());
        }
    }
}

pub fn run(ctx: &Ctx) {
    if ctx.cpus < 2 {
        if ctx.cpu == 0 {
            println!("guest: race needs at least 2 vCPUs");
        }
        fail(exit::BAD_ARGS);
        return;
    }
    let rounds = ctx.args.num("rounds", 2000).unwrap_or(2000);
    let huge = ctx.args.num("huge", 0).unwrap_or(0) != 0;
    let pages = if huge { 512 } else { ctx.args.num("pages", 64).unwrap_or(64).clamp(1, 512) };
    // Bit per operation on the old region before its free: none, move, protect none, read-only.
    let op_mask = ctx.args.num("opmask", 0xf).unwrap_or(0xf) | 1;
    let mut c = Counts::default();
    ctx.barrier();
    if ctx.cpu == 0 {
        mutate(ctx, rounds, pages, huge, op_mask, &mut c);
        STOP.store(true, Ordering::Release);
    } else {
        touch(&mut c);
    }
    ctx.barrier();
    println!(
        "@result scenario=race cpu={} huge={} rounds={} reads={} writes={} faults={} violations={}",
        ctx.cpu,
        u64::from(huge),
        c.rounds,
        c.reads,
        c.writes,
        c.faults,
        c.violations
    );
    if c.violations > 0 {
        fail(exit::VERIFY_FAILED);
    }
}

/// vCPU 0: allocate, check, fill, publish, wait a little, then take it away again.
fn mutate(ctx: &Ctx, rounds: u64, pages: u64, huge: bool, op_mask: u64, c: &mut Counts) {
    let mut rng = Rng::new(ctx.seed());
    let len = pages * 4096;
    let fl = if huge { flags::HUGE } else { 0 };
    for _ in 0..rounds {
        let va = match mem::alloc(len, policy::LOCAL, 0, fl) {
            Ok((va, _)) => va,
            Err(e) => {
                c.violation("allocation failed", 0, e.0);
                return;
            }
        };
        // Only the pages vCPU 0 writes: a check of the others would give them host memory
        // before the touchers' first touch.
        for p in 0..pages.min(WRITTEN) {
            let a = va + p * 4096;
            // Zero, but for a toucher's tag written through this very address (one that still
            // holds it from the last time the address was handed out, 512 frees ago).
            for (off, ok) in [(0, 0), (8, tag(va, p))] {
                match trap::read(a + off) {
                    Ok(v) if v == 0 || v == ok => {}
                    Ok(v) => c.violation("a fresh allocation holds old data", a + off, v),
                    Err(f) => c.violation("a fresh allocation faults", a + off, f.error),
                }
            }
            if p < WRITTEN {
                super::util::write(a, data(va, p));
            }
        }
        PAGES.store(pages, Ordering::Release);
        CURRENT.store(va, Ordering::Release);
        for _ in 0..rng.below(2000) {
            arch::pause();
        }
        let mut at = va;
        let mut readable = true;
        match rng.below(4) {
            1 if op_mask & 2 != 0 => match mem::mremap(va) {
                Ok(new) => at = new,
                Err(e) => c.violation("move failed", va, e.0),
            },
            2 if op_mask & 4 != 0 => {
                if let Err(e) = mem::protect(va, len, prot::NONE) {
                    c.violation("protect failed", va, e.0);
                }
                readable = false;
            }
            3 if op_mask & 8 != 0 => {
                if let Err(e) = mem::protect(va, len, prot::READ) {
                    c.violation("protect failed", va, e.0);
                }
            }
            _ => {}
        }
        // Before the free: this allocation holds its own data and its touchers' tags only.
        if readable {
            for p in 0..pages.min(WRITTEN) {
                let a = at + p * 4096;
                match trap::read(a) {
                    Ok(v) if v == data(va, p) => {}
                    Ok(v) => c.violation("an allocation lost its data", a, v),
                    Err(f) => c.violation("an allocation faults", a, f.error),
                }
                match trap::read(a + 8) {
                    Ok(v) if v == 0 || v == tag(va, p) => {}
                    Ok(v) => c.violation("another allocation's write shows", a + 8, v),
                    Err(f) => c.violation("an allocation faults", a + 8, f.error),
                }
            }
        }
        if let Err(e) = mem::free(at) {
            c.violation("free failed", at, e.0);
        }
        c.rounds += 1;
    }
}

/// The other vCPUs: read and write every page of whatever region is published, as fast as they
/// can, across its free, until the next one is published.
fn touch(c: &mut Counts) {
    while !STOP.load(Ordering::Acquire) {
        let va = CURRENT.load(Ordering::Acquire);
        let pages = PAGES.load(Ordering::Acquire);
        if va == 0 {
            arch::pause();
            continue;
        }
        for p in 0..pages {
            if p > 0 && CURRENT.load(Ordering::Acquire) != va {
                break;
            }
            let a = va + p * 4096;
            match trap::read(a) {
                Ok(v) if v == data(va, p) => c.reads += 1,
                Ok(v) => c.violation("stale read through a freed address", a, v),
                Err(_) => c.faults += 1,
            }
            match trap::read(a + 8) {
                Ok(v) if v == 0 || v == tag(va, p) => {}
                Ok(v) => c.violation("another allocation's write shows", a + 8, v),
                Err(_) => c.faults += 1,
            }
            match trap::write(a + 8, tag(va, p)) {
                Ok(()) => c.writes += 1,
                Err(_) => c.faults += 1,
            }
        }
    }
}
